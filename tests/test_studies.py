"""Study files: the presets as TOML, bad files refused in one line before anything is written,
the folder's study record, seeds unique over a large study, the worker cache keyed by folder,
and one run at a time per folder."""
import csv
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest

import reproduce
from dpp_pruning.base import cli
from dpp_pruning.experiments import study, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """\
[data]
input_dim = 20
num_data = 4000
noise_levels = [0.0]

[masks]
rounds = 1
num_masks = 4

[[panels]]
student_h_size = 6
methods = ["random_node", "importance_edge"]
nodes_kept = [2]
"""


def test_presets_are_the_paper_grids():
    paper = study.preset("paper")
    assert (paper.input_dim, paper.num_data, paper.num_test, paper.noise_levels) == (
        500, 800000, 80000, (0.0, 0.25))
    assert (paper.teacher_h_size, paper.v_star, paper.lr, paper.epochs) == (2, 4.0, 0.5, 1)
    assert (paper.rounds, paper.num_masks, paper.reweighting, paper.rescale) == (5, 20, (0, 1),
                                                                                (1,))
    assert [(p.student_h_size, p.methods, p.node_budgets) for p in paper.panels] == [
        (6, sweep.ALL_METHODS, (1, 2, 3, 4, 5)), (20, ("dpp_node", "random_edge"), (1, 2, 3, 4, 5))]
    assert [sweep.budget("dpp_edge", n, 500, 6)
            for n in (1, 2, 3, 4, 5)] == [83, 166, 250, 333, 417]
    smoke, small = study.preset("smoke"), study.preset("small")
    assert (smoke.input_dim, smoke.num_data, smoke.rounds, smoke.num_masks) == (20, 32000, 2, 10)
    assert smoke.panels[1].node_budgets == (2, 3, 5)             # from fractions 10%, 15%, 25%
    assert (small.input_dim, small.num_data, small.rounds) == (100, 160000, 3)
    for s in (smoke, small, paper):
        assert study.from_record(study.record(s)) == s


def test_a_study_file_and_its_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    s = study.load(str(path))
    assert s.name == "mine" and s.students == 1 and s.seed == 1 and s.teacher_h_sizes == (2,)
    assert s.num_test == 400 and s.test_size is None
    assert s.panels[0].methods == ("random_node", "importance_edge")


BAD = {
    "unknown key": (GOOD.replace("num_data = 4000", "num_data = 4000\nnum_dta = 5"),
                    "data.num_dta is not a key of [data]; allowed: input_dim, num_data"),
    "unknown section": (GOOD + "\n[optimiser]\nlr = 1\n",
                        "optimiser is not a section; allowed: study, data, training"),
    "wrong type": (GOOD.replace("input_dim = 20", 'input_dim = "20"'),
                   "data.input_dim must be an integer, got '20'"),
    "a boolean for a number": (GOOD.replace("rounds = 1", "rounds = true"),
                               "masks.rounds must be an integer, got True"),
    "K out of range": (GOOD.replace("student_h_size = 6", "student_h_size = 1"),
                       "panels[0].student_h_size must be in 2..1000, got 1"),
    "M out of range": (GOOD.replace("noise_levels = [0.0]", "noise_levels = [0.0]\n"
                                    "teacher_h_sizes = [2, 0]"),
                       "data.teacher_h_sizes[1] must be in 1..1000, got 0"),
    "budget out of range": (GOOD.replace("nodes_kept = [2]", "nodes_kept = [2, 7]"),
                            "panels[0].nodes_kept[1] must be in 1..6, got 7"),
    "fraction of no whole node": (GOOD.replace("nodes_kept = [2]", "fractions_kept = [0.1]"),
                                  "panels[0].fractions_kept[0] must keep a whole number of the 6"),
    "negative noise": (GOOD.replace("noise_levels = [0.0]", "noise_levels = [0.0, -0.25]"),
                       "data.noise_levels[1] must be non-negative, got -0.25"),
    "negative lr": (GOOD + "\n[training]\nlr = -0.5\n", "training.lr must be positive, got -0.5"),
    "zero lr": (GOOD + "\n[training]\nlr = 0\n", "training.lr must be positive, got 0"),
    "empty list": (GOOD.replace("noise_levels = [0.0]", "noise_levels = []"),
                   "data.noise_levels must not be empty"),
    "empty methods": (GOOD.replace('methods = ["random_node", "importance_edge"]', "methods = []"),
                      "panels[0].methods must not be empty"),
    "unknown method": (GOOD.replace('"random_node"', '"random_nodes"'),
                       "panels[0].methods[0] must be one of dpp_node, dpp_edge"),
    "repeated value": (GOOD.replace("noise_levels = [0.0]", "noise_levels = [0.25, 0.25]"),
                       "data.noise_levels repeats a value"),
    "no panels": (GOOD[:GOOD.index("[[panels]]")], "panels is required"),
    "missing N": (GOOD.replace("input_dim = 20\n", ""), "data.input_dim is required"),
    "both budgets": (GOOD.replace("nodes_kept = [2]", "nodes_kept = [2]\nfractions_kept = [0.5]"),
                     "panels[0] needs one of nodes_kept"),
    "panel teacher not in study": (GOOD + "teacher_h_sizes = [3]\n",
                                   "panels[0].teacher_h_sizes lists 3, which is not one of"),
    "two panels on one K": (GOOD + GOOD[GOOD.index("[[panels]]"):],
                            "panels[1] repeats student_h_size 6 on the teacher of size 2"),
    "rescale not 0 or 1": (GOOD + "\n[variants]\nrescale = [2]\n",
                           "variants.rescale[0] must be in 0..1, got 2"),
    "not TOML": ("[data\ninput_dim = 20\n", "not valid TOML"),
    "'all' beside names": (GOOD.replace('methods = ["random_node", "importance_edge"]',
                                        'methods = ["all", "dpp_node"]'),
                           'panels[0].methods is either "all" or a list of methods, not both'),
    "v_star beyond float32": (GOOD.replace("num_data = 4000", "num_data = 4000\nv_star = 1e300"),
                              "data.v_star must be at most 3.4e+38 in magnitude (float32), got "
                              "1e+300"),
    "no test set": (GOOD.replace("num_data = 4000", "num_data = 4000\ntest_size = 0"),
                    "data.test_size must be at least 1, got 0"),
    "a name that climbs out of runs/": ('[study]\nname = "../../../elsewhere/x"\n' + GOOD,
                                        "study.name must be one folder name (letters, digits"),
    "an absolute name": ('[study]\nname = "/elsewhere/x"\n' + GOOD,
                         "study.name must be one folder name"),
    "an empty name": ('[study]\nname = ""\n' + GOOD, "study.name must be one folder name"),
    "a name of two lines": ('[study]\nname = "a\\nb"\n' + GOOD,
                            "study.name must be one folder name"),
    "the name ..": ('[study]\nname = ".."\n' + GOOD, "study.name must be one folder name"),
    "edge budget below one weight": (
        GOOD.replace("student_h_size = 6", "student_h_size = 20").replace(
            "nodes_kept = [2]", "nodes_kept = [2, 1]"),
        "panels[0].nodes_kept[1] keeps 1 of the 20 hidden nodes (21 parameters), which edge "
        "methods would match with 0.05 weights per node (K e + K = nodes (N + 1)), fewer than "
        "one; drop this budget, list only node methods in this panel, or use a larger "
        "input_dim"),
    "edge fraction below one weight": (
        GOOD.replace("student_h_size = 6", "student_h_size = 20").replace(
            "nodes_kept = [2]", "fractions_kept = [0.05]"),
        "panels[0].fractions_kept[0] keeps 1 of the 20 hidden nodes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_study_file_is_one_line_and_status_2_before_anything_is_written(case, tmp_path,
                                                                               capsys):
    text, message = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--study", str(path), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"error: {path}: " in err[0] and message in err[0], err[0]
    assert not out.exists()


def test_budgets_at_the_edges_of_their_ranges(tmp_path):
    """A fraction that keeps every node, fractions that are not exact in binary (0.29 of
    K = 100 is 29 nodes), an edge budget of exactly half a weight per node (rounds to one)
    and node methods alone at a budget edge methods could not meet."""
    text = GOOD.replace("nodes_kept = [2]", "fractions_kept = [1.0, 0.5]")
    assert study.parse(text, "f.toml").panels[0].node_budgets == (3, 6)
    wide = GOOD.replace("student_h_size = 6", "student_h_size = 100").replace(
        "nodes_kept = [2]", "fractions_kept = [0.29, 0.07, 0.01]").replace(
        "input_dim = 20", "input_dim = 200")
    assert study.parse(wide, "w.toml").panels[0].node_budgets == (1, 7, 29)
    # N = 19, K = 20, one node: K e + K = 20 gives e = 0 exactly: refused; N = 29: e = 0.5
    edge = GOOD.replace("student_h_size = 6", "student_h_size = 20").replace(
        "nodes_kept = [2]", "nodes_kept = [1]")
    with pytest.raises(study.StudyError, match=r"nodes_kept\[0\] keeps 1 of the 20"):
        study.parse(edge.replace("input_dim = 20", "input_dim = 19"), "e.toml")
    half = study.parse(edge.replace("input_dim = 20", "input_dim = 29"), "e.toml")
    assert sweep.budget("random_edge", 1, 29, 20) == 1 and half.panels[0].node_budgets == (1,)
    nodes_only = edge.replace('["random_node", "importance_edge"]', '["random_node"]')
    assert study.parse(nodes_only, "n.toml").panels[0].node_budgets == (1,)


def test_noise_levels_are_one_float_each():
    text = GOOD.replace("noise_levels = [0.0]", "noise_levels = [-0.0, 0.25, 0.2500001]")
    s = study.parse(text, "n.toml")
    assert s.noise_levels == (0.0, 0.25, 0.2500001)
    assert str(s.noise_levels[0]) == "0.0"                       # not -0.0
    assert [study.noise_name(x) for x in s.noise_levels] == ["0", "0.25", "0.2500001"]
    assert study.noise_name(1 / 3) == repr(1 / 3)                # {:g} would say 0.333333
    assert study.from_record(study.record(s)).noise_levels == s.noise_levels


def test_a_study_file_whose_name_is_no_folder_name_is_one_line(tmp_path, capsys):
    path = tmp_path / "my study.toml"
    path.write_text(GOOD)
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--study", str(path)])
    assert e.value.code == 2
    assert "the file's name gives the study no valid name ('my study'); set [study] name" in (
        capsys.readouterr().err)


def test_seeds_use_the_whole_64_bit_study_seed():
    """Seeds 1 and 2**32 + 1 share their low 32 bits: every seed must still differ, in the
    units of the older scheme (the presets' students) and in the current one."""
    one = study.preset("smoke")
    high = replace(one, seed=2 ** 32 + 1)
    other = sweep.Dataset(0, 0.0, 3)                                # another M: current scheme
    for dataset in (sweep.Dataset(0, 0.0), other):
        assert sweep.teacher_seed(one, dataset) != sweep.teacher_seed(high, dataset)
        assert sweep.init_seed(one, dataset, 6) != sweep.init_seed(high, dataset, 6)
    for cell in (sweep.Cell(0.0, 6, "dpp_node", 3, 3), sweep.Cell(0.0, 6, "dpp_node", 3, 3, 0, 0)):
        assert sweep.mask_seed(one, cell, 0) != sweep.mask_seed(high, cell, 0)


def test_a_missing_study_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--study", str(tmp_path / "none.toml")])
    assert e.value.code == 2
    assert "none.toml: cannot be read" in capsys.readouterr().err


def test_command_line_flags_override_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    args = reproduce.parse_args(["--study", str(path), "--students", "3", "--rounds", "2",
                                 "--rescale", "both", "--seed", "7",
                                 "--importance_rule", "signed"])
    s, _ = reproduce.configure(args)
    assert (s.students, s.rounds, s.rescale, s.seed, s.importance_rule) == (3, 2, (1, 0), 7,
                                                                          "signed")
    assert s.num_masks == 4                               # the file's, not overridden


def test_the_record_accepts_added_cells_and_keeps_the_folders_identity(tmp_path):
    base = study.parse(GOOD, "mine.toml")
    out = str(tmp_path / "run")
    _, identity = study.claim_folder(base, out)
    more = replace(base, students=3, noise_levels=(0.0, 0.5), rescale=(1, 0),
                   panels=base.panels + (study.Panel(8, ("dpp_node",), (1, 2)),))
    merged, same = study.claim_folder(more, out)
    assert merged.students == 3 and merged.noise_levels == (0.0, 0.5) and same == identity
    assert study.read_record(out) == merged
    fewer = replace(base, panels=(replace(base.panels[0], methods=("random_node",)),))
    assert study.claim_folder(fewer, out) == (merged, identity)   # leaving cells out: nothing
    shutil.rmtree(out)                                 # a folder made again at the same path
    assert study.claim_folder(base, out)[1] not in (identity, None)


# a value of every field the record compares, other than GOOD's
CHANGES = dict(input_dim=30, num_data=8000, test_size=123, mode="soft_committee", v_star=3.0,
               lr=0.25, epochs=2, nonlinearity="relu", rounds=2, num_masks=5,
               reweighting=(0,), importance_rule="signed", seed=2, teacher_h_size=None)


@pytest.mark.parametrize("field", study.CORE)
def test_the_record_refuses_a_change_to_every_field_it_compares(tmp_path, field):
    base = study.parse(GOOD, "mine.toml")
    out = str(tmp_path)
    study.claim_folder(base, out)
    change = ({"teacher_h_sizes": (3,)} if field == "teacher_h_size"
              else {field: CHANGES[field]})
    with pytest.raises(study.StudyError, match=f"another study or seed .*differs in {field}"):
        study.claim_folder(replace(base, **change), out)
    assert set(CHANGES) == set(study.CORE)


def _legacy(*parts):
    """The 32-bit seeds of earlier releases, written out independently."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def unit_seeds(study):
    """Every seed a run draws from, by its key; the keys of one student's noise levels that
    share a teacher or an initialisation on purpose appear once."""
    seeds = {}
    for d in sweep.datasets(study):
        shared = sweep.Dataset(d.student, 0.0, d.teacher_h_size)   # the key leaves σ out
        seeds[("teacher", shared, None)] = sweep.teacher_seed(study, d)
        for panel in sweep.panels_of(study, d):
            seeds[("init", shared, panel.student_h_size)] = sweep.init_seed(
                study, d, panel.student_h_size)
    for cell in sweep.grid(study):
        for rnd in range(study.rounds):
            seeds[("mask", cell, rnd)] = sweep.mask_seed(study, cell, rnd)
    return seeds


def test_seeds_are_unique_over_a_large_study_and_keep_the_presets_seeds():
    big = replace(study.preset("smoke"), noise_levels=(0.0, 0.25, 0.28, 0.29),
                  teacher_h_sizes=(2, 3, 4), students=8, rescale=(1, 0), rounds=3,
                  panels=(study.Panel(4, sweep.ALL_METHODS, (1, 2, 3)),
                          study.Panel(6, sweep.ALL_METHODS, (1, 3, 5)),
                          study.Panel(20, ("dpp_node", "random_edge"), (1, 3, 5))))
    seeds = unit_seeds(big)
    assert len(seeds) > 20000
    assert len(set(seeds.values())) == len(seeds)
    # the collisions of the older scheme are gone
    d = sweep.Dataset
    assert sweep.teacher_seed(big, d(0, 0.0, 3)) != sweep.teacher_seed(big, d(3, 0.0))
    cell = sweep.Cell(0.28, 6, "random_node", 3, 3)
    assert sweep.mask_seed(big, cell, 0) != sweep.mask_seed(big, replace(cell, noise=0.29), 0)
    # the presets' units keep the seeds of earlier releases: student s, N = 20
    assert sweep.teacher_seed(big, d(0, 0.25)) == _legacy(1, 0)
    assert sweep.teacher_seed(big, d(5, 0.0)) == _legacy(1, 0, 5)
    assert sweep.init_seed(big, d(2, 0.0), 6) == _legacy(1, 1, 6, 2)
    k = sweep.budget("random_edge", 3, 20, 20)
    assert sweep.mask_seed(big, sweep.Cell(0.25, 20, "random_edge", k, 3, 1), 1) == _legacy(
        1, 2, 25, 20, 3, k, 1, 1)
    # ... but not where the older scheme's 32-bit seeds collided (paper, --seed 1)
    paper = study.preset("paper")
    a = sweep.Cell(0.0, 6, "dpp_node", 5, 5, 6)
    b = sweep.Cell(0.25, 6, "importance_edge", 166, 2, 17)
    assert _legacy(1, 2, 0, 6, 0, 5, 4, 6) == _legacy(1, 2, 25, 6, 5, 166, 1, 17)
    assert sweep.mask_seed(paper, a, 4) != sweep.mask_seed(paper, b, 1)
    assert sweep.mask_seed(paper, a, 3) == _legacy(1, 2, 0, 6, 0, 5, 3, 6)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_worker_cache_keeps_two_folders_apart(tmp_path):
    """Folder B resumed in the process that just ran folder A (same groups, same seed, other
    data) gives the results B gives alone."""
    a_file, b_file = tmp_path / "a.toml", tmp_path / "b.toml"
    a_file.write_text(GOOD)
    b_file.write_text(GOOD.replace("num_data = 4000", "num_data = 6000"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sweep._CACHE.clear()
    reproduce.main(["--study", str(b_file), "--out", b])
    alone = _rows(os.path.join(b, "results.csv"))
    for unit in ("cells", "expectations"):
        for name in os.listdir(os.path.join(b, "student_0", unit)):
            os.remove(os.path.join(b, "student_0", unit, name))
    reproduce.main(["--study", str(a_file), "--out", a])
    reproduce.main(["--study", str(b_file), "--out", b])
    assert _rows(os.path.join(b, "results.csv")) == alone
    assert _rows(os.path.join(a, "results.csv")) != alone


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from dpp_pruning.base import storage
            with storage.folder_lock({str(out)!r}, "reproduce.py run"):
                print("locked", flush=True)
                time.sleep(60)
            """)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            cli.run(reproduce.main, ["--preset", "smoke", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out} is in use by another reproduce.py run (pid " \
            f"{holder.pid} on " in err[0]
        assert not (out / "study.json").exists()
    finally:
        holder.kill()
        holder.wait()
    start = time.monotonic()
    reproduce.main(["--study", _write(tmp_path, GOOD), "--out", str(out)])   # the lock died
    assert time.monotonic() - start < 60 and not (out / ".lock").exists()


def _write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def test_a_budget_beyond_the_kernels_rank_is_one_line(tmp_path, capsys):
    """P = 30 < N = 50: the dpp_edge kernels have rank 30, and 5 of 6 nodes' worth of edges is
    42 per node; the run stops in one sentence naming the unit, whatever runs the units."""
    path = _write(tmp_path, GOOD.replace("num_data = 4000", "num_data = 30")
                  .replace("input_dim = 20", "input_dim = 50")
                  .replace('methods = ["random_node", "importance_edge"]', 'methods = ["dpp_edge"]')
                  .replace("nodes_kept = [2]", "nodes_kept = [5]"))
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--study", path, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("study grid:")]                      # the progress lines
    assert len(err) == 1 and "k = 42 exceeds the kernel's rank 30" in err[0], err


SIZED = GOOD.replace("input_dim = 20\nnum_data = 4000\n", "") + """
[sizes]
input_dims = [40, 20]
samples_per_dim = 200
"""


def test_a_finite_size_study_is_one_study_per_input_dimension():
    s = study.parse(SIZED, "f.toml")
    assert (s.input_dims, s.samples_per_dim) == ((20, 40), 200)
    sizes = study.sizes(s)
    assert [(x.name, x.input_dim, x.num_data, x.num_test, x.input_dims) for x in sizes] == [
        ("study_N20", 20, 4000, 400, ()), ("study_N40", 40, 8000, 800, ())]
    assert study.sizes(study.parse(GOOD, "g.toml"))[0].input_dims == ()


@pytest.mark.parametrize("text, message", [
    (SIZED.replace("samples_per_dim = 200\n", ""), "sizes.samples_per_dim is required"),
    (SIZED.replace("noise_levels", "input_dim = 20\nnoise_levels"),
     "data.input_dim must not be given with [sizes]"),
    (SIZED.replace("samples_per_dim = 200", "samples_per_dim = 0"),
     "sizes.samples_per_dim must be at least 1, got 0"),
    (SIZED.replace("input_dims = [40, 20]", "input_dims = [40, 1]"),
     "sizes.input_dims[1] must be at least 2, got 1"),
    (SIZED.replace("student_h_size = 6", "student_h_size = 30").replace("input_dims = [40, 20]",
                                                                        "input_dims = [100, 5]"),
     "panels[0].nodes_kept[0] keeps 2 of the 30 hidden nodes (12 parameters), which edge"),
])
def test_a_bad_finite_size_study_is_one_line(text, message):
    with pytest.raises(study.StudyError, match=re.escape(message)):
        study.parse(text, "f.toml")
