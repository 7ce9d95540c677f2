"""The N → ∞ theory in a study: beside the simulation (theory.csv, and the theory and
theory_trained columns of results.csv and expectations.csv), alone (--theory only: no data,
no SGD), or not at all (--theory none); claims judged on it beside the simulation."""
import csv
import math

import pytest

import reproduce
from dpp_pruning.base.data import StudyData
from dpp_pruning.base.storage import load_state_dict
from dpp_pruning.experiments import claims, study, sweep, theory_rows
from run_folders import assert_same_tables

SMOKE = ("--preset", "smoke")


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def setting(row):
    return tuple(row[k] for k in ("student", "noise", "teacher_h_size", "student_h_size",
                                  "rescale", "method", "nodes_equivalent", "reweighting"))


def test_beside_the_simulation_every_row_carries_both_theories(local_run):
    out = local_run(*SMOKE)
    theory = {setting(r): float(r["theory"]) for r in rows(out / "theory.csv")}
    smoke = study.preset("smoke")
    assert len(theory) == len(sweep.groups(smoke)) * 6 * 3 * 2   # six methods, 3 budgets, rw
    for name in ("results.csv", "expectations.csv"):
        for r in rows(out / name):
            assert float(r["theory"]) == theory[setting(r)]
            assert math.isfinite(float(r["theory_trained"])) and float(r["theory_trained"]) > 0
    judged = {r["judged_on"] for r in rows(out / "claims.csv")}
    assert judged == set(claims.JUDGED_ON)


def test_the_theory_is_what_theory_rows_computes_from_the_seeds(local_run):
    """theory.csv of a run equals theory_rows.study_theory of its study, and theory_trained
    equals theory_rows.theory_at at the trained student's own weights."""
    out = local_run(*SMOKE)
    smoke = study.preset("smoke")
    expected = {setting({k: str(v) for k, v in r.items()}): r["theory"]
                for r in theory_rows.study_theory(smoke)}
    found = {setting(r): float(r["theory"]) for r in rows(out / "theory.csv")}
    assert found.keys() == expected.keys()
    for key, value in found.items():
        assert value == pytest.approx(expected[key], rel=1e-12)
    data = StudyData.load(out / "student_0" / "sigma_0.25" / "data.npz")
    state = load_state_dict(out / "student_0" / "sigma_0.25" / "student_6.pth")
    at = theory_rows.theory_at(smoke, smoke.panels[0], state["w1.weight"].numpy(),
                               state["w2.weight"].numpy(), data.w1.numpy(),
                               data.w2.numpy().ravel(), 0.25, rescale=1)
    trained = [r for r in rows(out / "expectations.csv") if r["noise"] == "0.25"
               and r["student"] == "0" and r["student_h_size"] == "6"]
    assert len(trained) == 6 * 3 * 2                       # the K = 6 panel has all six
    for r in trained:          # the run prunes the rescaled student as stored, in float32
        assert float(r["theory_trained"]) == pytest.approx(
            at[(r["method"], int(r["nodes_equivalent"]), int(r["reweighting"]))], rel=1e-6)


def test_theory_only_draws_no_data_and_judges_on_the_theory(tmp_path, local_run):
    out = tmp_path / "run"
    reproduce.main([*SMOKE, "--theory", "only", "--out", str(out)])
    assert not list(out.rglob("data.npz")) and not list(out.rglob("*.pth"))
    assert rows(out / "results.csv") == [] and rows(out / "expectations.csv") == []
    assert {r["judged_on"] for r in rows(out / "claims.csv")} == {"theory"}
    with open(out / "theory.csv", "rb") as a, open(local_run(*SMOKE) / "theory.csv", "rb") as b:
        assert a.read() == b.read()                       # the same theory as beside a run


def test_a_theory_only_folder_grown_by_the_simulation_equals_a_fresh_run(tmp_path, local_run):
    out = tmp_path / "run"
    reproduce.main([*SMOKE, "--theory", "only", "--out", str(out)])
    reproduce.main([*SMOKE, "--out", str(out)])
    assert_same_tables(out, local_run(*SMOKE))


def test_no_theory_leaves_its_columns_empty(tmp_path):
    out = tmp_path / "run"
    reproduce.main([*SMOKE, "--theory", "none", "--out", str(out), "--methods", "random_node",
                    "--rounds", "1"])
    assert not (out / "student_0" / "theory").exists() and rows(out / "theory.csv") == []
    assert all(math.isnan(float(r["theory"])) for r in rows(out / "results.csv"))
    assert all(math.isfinite(float(r["theory_trained"])) for r in rows(out / "results.csv"))
    assert "theory" not in {r["judged_on"] for r in rows(out / "claims.csv")}
