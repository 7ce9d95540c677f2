"""A run folder grown, resumed, damaged or asked too much of: its tables are the bytes of one
clean local run of the study it holds, or the run ends in one line with exit status 2 and
nothing already done is lost."""
import csv
import json
import os
import re
import threading
import time

import pytest

import reproduce
from dpp_pruning.base import cli
from dpp_pruning.experiments import study, sweep
from run_folders import assert_same_tables

STUDY = """\
[study]
name = "{name}"

[data]
input_dim = 20
num_data = 4000
noise_levels = {noise}

[masks]
rounds = 1
num_masks = 4

[[panels]]
student_h_size = {size}
methods = {methods}
nodes_kept = {nodes}
"""


def study_file(folder, name="grow", noise="[0.0]", size=6, methods='["dpp_node", "random_edge"]',
               nodes="[2]", extra=""):
    """A small study file in its own folder (its name, not its path, names the study)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, noise=noise, size=size, methods=methods,
                                 nodes=nodes) + extra)
    return path


def run(args, capsys=None):
    """reproduce.py as cli.run runs it -> (exit status, stdout, stderr lines of this run
    only, when capsys is given)."""
    if capsys is not None:
        capsys.readouterr()
    try:
        cli.run(reproduce.main, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    if capsys is None:
        return code, "", []
    printed = capsys.readouterr()
    return code, printed.out, printed.err.strip().splitlines()


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_panel_grown_by_a_budget_and_a_method_equals_a_fresh_run(tmp_path, local_run):
    out = tmp_path / "run"
    small = study_file(tmp_path / "a")
    assert run(["--study", small, "--out", out])[0] == 0
    grown = study_file(tmp_path / "b", methods='["dpp_node", "dpp_edge", "random_edge"]',
                       nodes="[2, 4]")
    assert run(["--study", grown, "--out", out])[0] == 0
    assert_same_tables(out, local_run("--study", grown))
    expected = rows(out / "expectations.csv")
    assert {(r["method"], r["nodes_equivalent"]) for r in expected if r["method"] == "dpp_edge"} \
        == {("dpp_edge", "2"), ("dpp_edge", "4")}


def test_noise_levels_have_one_identity(tmp_path, local_run, capsys):
    """-0.0 is 0.0 (one folder, one set of rows); 0.25 and 0.2500001 are two levels (two
    folders, two sets of rows), whatever order the folder was grown in."""
    out = tmp_path / "zero"
    assert run(["--study", study_file(tmp_path / "a", noise="[-0.0]"), "--out", out])[0] == 0
    code, printed, _ = run(["--study", study_file(tmp_path / "b", noise="[0.0]"), "--out", out],
                           capsys)
    assert code == 0 and "0 to run" in printed
    assert sorted(os.listdir(out / "student_0")) == ["cells", "expectations", "sigma_0", "theory"]
    assert_same_tables(out, local_run("--study", study_file(tmp_path / "c", noise="[0.0]")))

    out = tmp_path / "near"
    assert run(["--study", study_file(tmp_path / "d", noise="[0.25]"), "--out", out])[0] == 0
    code, printed, _ = run(["--study", study_file(tmp_path / "e", noise="[0.2500001]"),
                            "--out", out], capsys)
    assert code == 0 and "0 already done" in printed
    both = study_file(tmp_path / "f", noise="[0.25, 0.2500001]")
    assert_same_tables(out, local_run("--study", both))
    assert {r["noise"] for r in rows(out / "results.csv")} == {"0.25", "0.2500001"}


def test_two_node_budgets_of_one_edge_budget_are_two_cells(tmp_path, capsys):
    """At N = 20 a student of K = 50 keeps e = 2 weights per node for both 6 and 7 nodes kept
    ((21 n - 50) / 50 = 1.52 and 1.94): two cells, whose rows a rerun keeps."""
    path = study_file(tmp_path, size=50, methods='["random_edge"]', nodes="[6, 7]")
    out = tmp_path / "run"
    assert run(["--study", path, "--out", out])[0] == 0
    assert sorted(os.listdir(out / "student_0" / "cells")) == [
        "sigma0_K50_random_edge_k2_n6.npz", "sigma0_K50_random_edge_k2_n7.npz"]
    before = (out / "results.csv").read_bytes()
    code, printed, _ = run(["--study", path, "--out", out], capsys)
    assert code == 0 and "0 to run" in printed
    assert (out / "results.csv").read_bytes() == before
    assert [r["nodes_equivalent"] for r in rows(out / "results.csv")] == ["6", "6", "7", "7"]


def test_a_truncated_unit_file_is_said_and_run_again(tmp_path, local_run, capsys):
    path = study_file(tmp_path)
    out = tmp_path / "run"
    assert run(["--study", path, "--out", out])[0] == 0
    cell = out / "student_0" / "cells" / "sigma0_K6_dpp_node_k2.npz"
    group = out / "student_0" / "expectations" / "sigma0_K6.npz"
    cell.write_bytes(cell.read_bytes()[:300])
    group.write_bytes(b"")
    code, printed, _ = run(["--study", path, "--out", out], capsys)
    assert code == 0
    assert ("student_0/cells/sigma0_K6_dpp_node_k2.npz is not used (it cannot be read "
            "(BadZipFile: truncated, damaged or written by an earlier release)); its unit runs "
            "again") in printed
    assert "student_0/expectations/sigma0_K6.npz is not used" in printed
    assert "2 to run" in printed
    assert_same_tables(out, local_run("--study", path))


def test_a_file_named_for_another_noise_level_is_refused(tmp_path, capsys):
    """An earlier release named σ = 0.25 and 0.2500001 alike (`{σ:g}`): a file whose name
    says 0.25 but holds 0.2500001 makes the folder unusable, in one line."""
    path = study_file(tmp_path, noise="[0.2500001]")
    out = tmp_path / "run"
    assert run(["--study", path, "--out", out])[0] == 0
    cells = out / "student_0" / "cells"
    for f in cells.iterdir():
        f.rename(cells / f.name.replace("sigma0.2500001", "sigma0.25"))
    code, _, err = run(["--study", path, "--out", out], capsys)
    assert code == 2 and len(err) == 1
    assert "sigma0.25_K6_dpp_node_k2.npz holds the unit sigma0.2500001_K6_dpp_node_k2 of " \
           "another setting than its name says" in err[0]


@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp/elsewhere", "", "a\nb", "."])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path, capsys, name):
    path = tmp_path / "s.toml"
    path.write_text(f"[study]\nname = {json.dumps(name)}\n"
                    + STUDY.split("\n", 3)[3].format(noise="[0.0]", size=6, methods='"all"',
                                                     nodes="[2]"))
    code, _, err = run(["--study", path], capsys)
    assert code == 2 and len(err) == 1
    assert "study.name must be one folder name (letters, digits, '-', '_', '.'; not '.' or " \
           f"'..'), got {name!r}" in err[0]


def test_huge_sizes_are_refused_before_anything_is_written(tmp_path, capsys):
    path = study_file(tmp_path, extra="")
    path.write_text(path.read_text().replace("input_dim = 20", "input_dim = 500").replace(
        "num_data = 4000", "num_data = 4000000000"))
    out = tmp_path / "run"
    code, _, err = run(["--study", path, "--out", out], capsys)
    assert code == 2 and len(err) == 1
    assert re.search(r"error: 1 worker process\(es\) holding one data set each \((\d+\.\d) GiB\) "
                     r"needs about \1 GiB of memory but only \S+ \S+ is available; use smaller "
                     r"values$", err[0]), err[0]
    assert not out.exists()


def test_a_diverged_training_says_so(tmp_path, capsys):
    path = study_file(tmp_path, methods='["random_node"]', extra="\n[training]\nlr = 1e6\n")
    out = tmp_path / "run"
    code, _, err = run(["--study", path, "--out", out, "--theory", "none"], capsys)
    assert code == 2
    assert err[-1].endswith(f"error: {out}: training diverged (non-finite weights) for the "
                            f"student of K = 6 on data set {out}/student_0/sigma_0 (lr 1e+06, "
                            "v_star 4, noise 0); use a smaller lr or v_star"), err
    code, _, err = run(["--study", path, "--out", tmp_path / "theory", "--theory", "only"],
                       capsys)
    assert code == 2
    assert err[-1].split(": error: ", 1)[1].startswith(f"{tmp_path / 'theory'}: the training ODEs "
                              "of student 0, noise 0, M = 2, K = 6 (lr 1e+06, v_star 4, "
                              "alpha_end 200) could not be integrated (") and err[-1].endswith(
        "; use a smaller lr or v_star (or run without the theory: --theory none)"), err
    assert not list(out.rglob("student_6.pth"))
    assert not (out / "student_0" / "sigma_0" / "data.npz").exists()   # nothing half made


def test_seeds_json_follows_the_folder_as_it_grows(tmp_path):
    out = tmp_path / "run"
    assert run(["--study", study_file(tmp_path / "a"), "--out", out])[0] == 0
    record = out / "student_0" / "sigma_0" / "seeds.json"
    assert set(json.loads(record.read_text())) == {"teacher", "student_6"}
    wider = study_file(tmp_path / "b")
    wider.write_text(wider.read_text() + "\n[[panels]]\nstudent_h_size = 8\n"
                     'methods = ["random_node"]\nnodes_kept = [2]\n')
    assert run(["--study", wider, "--out", out])[0] == 0
    seeds = json.loads(record.read_text())
    assert set(seeds) == {"teacher", "student_6", "student_8"}
    assert seeds["student_8"] == sweep.init_seed(study.load(str(wider)), sweep.Dataset(0, 0.0), 8)


def test_keep_data_0_never_holds_more_teacher_files_than_jobs(tmp_path):
    """With --keep_data 0 --jobs 2, a watcher counts the teacher files (and their temporary
    files) on disk every few milliseconds during the run: never more than 2."""
    path = study_file(tmp_path, noise="[0.0, 0.1, 0.2]", methods='["random_node"]')
    out = tmp_path / "run"
    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            found = [p for p in out.rglob("*") if p.name == "data.npz"
                     or p.name.startswith(".data.npz.")]
            most[0] = max(most[0], len(found))
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = run(["--study", path, "--out", out, "--students", "2", "--jobs", "2",
                    "--keep_data", "0"])[0]
    finally:
        stop.set()
        watcher.join()
    assert code == 0
    assert 1 <= most[0] <= 2, most[0]
    assert not list(out.rglob("data.npz"))


def test_a_damaged_data_set_file_is_said_and_made_again(tmp_path, local_run, capsys):
    path = study_file(tmp_path)
    out = tmp_path / "run"
    assert run(["--study", path, "--out", out])[0] == 0
    folder = out / "student_0" / "sigma_0"
    for name in ("data.npz", "hidden_6.npz", "student_6.pth"):
        (folder / name).write_bytes((folder / name).read_bytes()[:-200])
        for f in (out / "student_0" / "cells").iterdir():
            f.unlink()
        code, printed, _ = run(["--study", path, "--out", out], capsys)
        assert code == 0
        assert (f"{folder / name} is not used (it cannot be read: truncated or damaged); it "
                "is made again") in printed, name
        assert_same_tables(out, local_run("--study", path))
