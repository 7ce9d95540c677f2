"""reproduce.py: the grid on independent students, resuming, expectations beside the
sampled masks, the claims, and every notebook on the smoke preset."""
import csv
import json
import math
import shutil

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import reproduce
from dpp_pruning.base import cli
from dpp_pruning.experiments import claims, study, sweep
from dpp_pruning.experiments.run_tables import EXPECTATION_COLUMNS, RESULT_COLUMNS


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--preset", "smoke", "--out", str(out)])
    return out


def test_results_csv_has_one_row_per_cell_and_round(smoke_run):
    preset = study.preset("smoke")
    with open(smoke_run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cells = sweep.grid(preset)
    assert len(rows) == len(cells) * preset.rounds * len(preset.reweighting)
    assert set(rows[0]) == set(RESULT_COLUMNS)
    for row in rows:
        assert 0 < float(row["fraction_kept"]) <= 1
        assert float(row["test_loss"]) > 0 and float(row["predicted_loss"]) > 0
        underived = row["method"] in ("dpp_edge", "random_edge") and row["reweighting"] == "1"
        assert math.isnan(float(row["expected"])) == underived


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    args = ["--preset", "smoke", "--out", out, "--methods", "random_node,importance_edge"]
    real_run_cell, calls = sweep.run_cell, []

    def interrupt_after_three(study_, out_, cell):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell.name)
        return real_run_cell(study_, out_, cell)

    monkeypatch.setattr(sweep, "run_cell", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    cells_dir = tmp_path / "run" / "student_0" / "cells"
    done = sorted(p.name for p in cells_dir.iterdir())
    assert len(done) == 3
    stamps = {p: p.stat().st_mtime_ns for p in cells_dir.iterdir()}

    calls.clear()
    monkeypatch.setattr(sweep, "run_cell", lambda *a: calls.append(a[2].name) or real_run_cell(*a))
    reproduce.main(args)
    total = len(sweep.grid(study.preset("smoke"), ["random_node", "importance_edge"]))
    assert len(calls) == total - 3 and not set(calls) & {d[:-4] for d in done}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_reused_folder_of_another_preset_is_refused(smoke_run):
    from dpp_pruning.base.cli import UserError
    with pytest.raises(UserError, match="another study or seed .*differs in seed"):
        reproduce.main(["--preset", "smoke", "--out", str(smoke_run), "--seed", "2"])


@pytest.fixture(scope="module")
def three_students(tmp_path_factory):
    """Two students first, then a third added to the same folder (resuming per student)."""
    out = tmp_path_factory.mktemp("students")
    args = ["--preset", "smoke", "--out", str(out), "--methods",
            "dpp_node,random_node,random_edge,dpp_edge", "--rounds", "1"]
    reproduce.main(args + ["--students", "2"])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "student_0").rglob("*") if p.is_file()}
    reproduce.main(args + ["--students", "3", "--jobs", "2"])
    return out, stamps


def test_students_are_independent_and_seeded_from_the_run_seed(three_students):
    out, _ = three_students
    seeds = [json.loads((out / f"student_{s}" / "sigma_0" / "seeds.json").read_text())
             for s in range(3)]
    teachers = [s["teacher"] for s in seeds]
    inits = [s["student_6"] for s in seeds]
    assert len(set(teachers)) == 3 and len(set(inits)) == 3
    # student 0 keeps the seeds of a single-student run
    smoke = study.preset("smoke")
    assert teachers[0] == sweep.teacher_seed(smoke, sweep.Dataset(0, 0.0))
    assert inits[0] == sweep.init_seed(smoke, sweep.Dataset(0, 0.0), 6)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["student"] for r in rows} == {"0", "1", "2"}
    by_student = {s: {r["unpruned_test_loss"] for r in rows if r["student"] == s} for s in "012"}
    assert len({min(v) for v in by_student.values()}) == 3


def test_adding_students_leaves_finished_students_untouched(three_students):
    out, stamps = three_students
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_expected_column_is_the_mean_over_many_sampled_masks(three_students):
    """The expected loss of a cell against the sampled masks' predicted losses: the rounds of
    one cell are few, so pool every cell's z-score of (sampled mean - expected) and check
    they are standard-normal-sized."""
    out, _ = three_students
    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] != "random_edge"
                and not (r["method"].endswith("_edge") and r["reweighting"] == "1")]
    with open(out / "expectations.csv") as f:
        spread = {(r["student"], r["noise"], r["student_h_size"], r["method"], r["k"],
                   r["reweighting"]): float(r["expected_sd"]) for r in csv.DictReader(f)}
    num_masks = study.preset("smoke").num_masks
    z = []
    for r in rows:
        sd = spread[(r["student"], r["noise"], r["student_h_size"], r["method"], r["k"],
                     r["reweighting"])]
        if sd > 0:
            z.append((float(r["predicted_loss"]) - float(r["expected"]))
                     / (sd / math.sqrt(num_masks)))
    z = np.array(z)
    assert len(z) > 30
    assert abs(z.mean()) < 4 / math.sqrt(len(z)) + 0.3 and 0.4 < z.std() < 1.6


def test_claims_table_pairs_students(three_students):
    out, _ = three_students
    with open(out / "claims.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["students"] == "3" for r in rows)
    assert (out / "claims.md").read_text().startswith(
        "# Claims of study 'smoke': N = 20, P = 32000, 3 students, seed ")
    with open(out / "expectations.csv") as f:
        exp = list(csv.DictReader(f))
    assert set(exp[0]) == set(EXPECTATION_COLUMNS)
    row = next(r for r in rows if r["claim"] == "dpp_node below random_node"
               and r["noise"] == "0.0" and r["student_h_size"] == "6"
               and r["nodes_equivalent"] == "3")
    pick = {(e["student"], e["method"]): float(e["expected"]) for e in exp
            if e["noise"] == "0.0" and e["student_h_size"] == "6" and e["k"] == "3"
            and e["reweighting"] == "0" and e["method"] in ("dpp_node", "random_node")}
    d = [pick[(s, "dpp_node")] - pick[(s, "random_node")] for s in "012"]
    assert float(row["mean_difference"]) == pytest.approx(np.mean(d), rel=1e-9)
    assert int(row["agree"]) == sum(x < 0 for x in d)


def test_claims_are_judged_on_the_students_asked_for(three_students, tmp_path, capsys):
    """A run with --students 2 in a folder of three judges the claims on students 0 and 1,
    and its summary line says so."""
    out = tmp_path / "run"
    shutil.copytree(three_students[0], out)
    reproduce.main(["--preset", "smoke", "--out", str(out), "--methods",
                    "dpp_node,random_node,random_edge,dpp_edge", "--rounds", "1",
                    "--students", "2"])
    with open(out / "claims.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["students"] == "2" for r in rows)
    assert "claims on 2 student(s), judged on the expected losses: " in capsys.readouterr().out
    with open(out / "expectations.csv") as f:
        assert {r["student"] for r in csv.DictReader(f)} == {"0", "1", "2"}


def test_paired_interval_and_verdicts():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        d = rng.normal(0.3, 1.0, size=5)
        _, low, high = claims.paired_interval(d)
        covered += low < 0.3 < high
    assert abs(covered / 2000 - 0.95) < 0.015            # the t interval's coverage
    assert claims.verdict(-0.3, -0.1, 5) == "holds"
    assert claims.verdict(0.1, 0.3, 5) == "fails"
    assert claims.verdict(-0.1, 0.3, 5) == "not resolved at 5 students"
    assert math.isnan(claims.paired_interval([0.2])[1])


def test_specialisation_counts_groups_and_signed_weights():
    r = np.array([[0.9, 0.1], [-0.95, 0.0], [0.2, 0.8], [0.1, -0.9], [0.05, 0.7]])
    v = np.array([1.2, -1.3, 0.5, -0.4, 2.0])
    counts, summed, effective = sweep.specialisation(r, v)
    assert counts.tolist() == [2, 3]
    np.testing.assert_allclose(summed, [1.2 - 1.3, 0.5 - 0.4 + 2.0])
    np.testing.assert_allclose(effective, [1.2 + 1.3, 0.5 + 0.4 + 2.0])


def test_bad_student_count_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--preset", "smoke", "--students", "0"])
    assert e.value.code == 2
    assert "--students must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("name, pngs", [
    ("1_test_loss_vs_parameters", ["figure1_loss_vs_budget", "figure1_loss_vs_budget_reweighted"]),
    ("2_node_methods", ["figure2_node_methods", "figure2_node_methods_reweighted"]),
    ("3_order_parameter_heatmaps", [f"figure3_heatmaps_{m}" for m in
                                    ("dpp_node", "random_node", "dpp_edge", "random_edge")]),
    ("4_theory_vs_simulation", ["figure4_theory_vs_simulation",
                                "figure4_random_edge_closed_form"])])
def test_notebook_runs_on_smoke_preset(name, pngs, smoke_run, root, monkeypatch):
    monkeypatch.setenv("REPRO_PRESET", "smoke")
    monkeypatch.setenv("REPRO_OUT", str(smoke_run))
    nb = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "study 'smoke'" in first
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == len(pngs)
    for png in pngs:                         # every figure shown is saved beside the run
        assert (smoke_run / "figures" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_data_0_removes_teachers_and_changes_no_result(three_students, tmp_path):
    out, _ = three_students
    other = tmp_path / "lean"
    reproduce.main(["--preset", "smoke", "--out", str(other), "--methods",
                    "dpp_node,random_node,random_edge,dpp_edge", "--rounds", "1",
                    "--students", "2", "--jobs", "2", "--keep_data", "0"])
    assert not list(other.rglob("data.npz"))
    assert list(other.rglob("student_6.pth"))
    with open(out / "results.csv") as f, open(other / "results.csv") as g:
        full = [r for r in csv.DictReader(f) if r["student"] in "01"]
        lean = list(csv.DictReader(g))
    # the fixture ran students 0 and 1 in this process (torch's own thread count), this run in
    # one-thread workers: float32 products may round differently, nothing else may differ
    def settings(r):
        return {k: r[k] for k in r if "loss" not in k and not k.startswith("expected")}
    assert [settings(r) for r in full] == [settings(r) for r in lean]
    for a, b in zip(full, lean, strict=True):
        for key in ("test_loss", "predicted_loss", "expected", "expected_first_order"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, nan_ok=True)


def test_heatmaps_of_several_students_show_each_budget_once(three_students):
    from dpp_pruning.experiments import figures
    run = figures.Run(three_students[0])
    budgets = run.preset.panels[0].node_budgets
    fig = figures.figure_heatmaps(run, "dpp_node")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["unpruned"] + [f"k = {k}" for k in budgets]


def test_claims_notebook_runs_on_several_students(three_students, root, monkeypatch):
    out, _ = three_students
    monkeypatch.setenv("REPRO_OUT", str(out))
    nb = nbformat.read(root / "notebooks" / "6_claims.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(o.get("text", "") for o in code[0].outputs)
    assert "3 independently trained student(s)" in printed
    # one vocabulary: the counts under each verdict grid use the words of claims.md only
    counts = [line for c in code[1:3] for o in c.outputs
              for line in o.get("text", "").splitlines() if not line.startswith("saved ")]
    assert len(counts) == 2
    words = {part.split(" ", 1)[1] for line in counts for part in line.split(": ")[-1].split(", ")}
    assert words and words <= {"holds", "fails", "not resolved (3 students)"}
    text = "".join(c.source for c in nb.cells if c.cell_type == "markdown") + "".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for c in code for o in c.outputs)
    assert not [old for old in ("FAILS", "✓", "✗", "?", "not resolved at") if old in text]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 8
    saved = sorted(p.name for p in (out / "figures").iterdir())
    assert saved == sorted(["verdict_grid_K6.png", "verdict_grid_K20_M2.png",
                            "paired_dpp_node_vs_random_node.png",
                            "paired_dpp_node_vs_importance_node.png",
                            "paired_dpp_node_vs_random_node_reweighted.png",
                            "paired_dpp_edge_vs_random_edge.png",
                            "paired_random_edge_vs_dpp_node.png",
                            "dpp_advantage_vs_specialisation.png"])
