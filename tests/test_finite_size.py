"""The finite-size comparison (experiments/finite_size) on hand-made run folders whose gaps
to the theory are known: the gaps, their split into the pruning theory's and the training
ODEs' parts, the measured stand-in where no expectation is derived, and the slopes in N."""
import csv
import math
import os

import numpy as np
import pytest

from dpp_pruning.experiments import finite_size
from dpp_pruning.experiments.run_tables import EXPECTATION_COLUMNS, RESULT_COLUMNS

SIZES = (100, 400, 1600)
THEORY = 0.5
STUDENTS = 4


def write(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="nan")
        writer.writeheader()
        writer.writerows(rows)


def folder(tmp_path, n):
    """One size's folder: dpp_node gaps of 2/√N (pruning part) and 1/N (training part) per
    student (plus a student-to-student spread that averages out); dpp_edge reweighted has no
    expectation, its masks' predicted losses stand in."""
    out = finite_size.size_folder(str(tmp_path), n)
    os.makedirs(out)
    expected, results = [], []
    spread = np.linspace(-1, 1, STUDENTS) / n
    for s in range(STUDENTS):
        common = dict(student=s, noise=0.0, teacher_h_size=2, student_h_size=6, rescale=1,
                      nodes_equivalent=3, fraction_kept=0.5, reweighting=0)
        trained = THEORY * (1 + 1 / n)
        simulated = trained * (1 + 2 / math.sqrt(n) + spread[s])
        expected.append(dict(common, method="dpp_node", expected=simulated,
                             theory_trained=trained, theory=THEORY))
        expected.append(dict(common, method="dpp_edge", reweighting=1, expected="nan",
                             theory_trained=THEORY, theory=THEORY))
        expected.append(dict(common, method="dpp_node", rescale=0, expected=99.0,
                             theory_trained=1.0, theory=1.0))            # not shown: rescale 0
        for rnd, loss in enumerate((THEORY * 1.02, THEORY * 1.04)):
            results.append(dict(common, method="dpp_edge", reweighting=1, round=rnd,
                                predicted_loss=loss))
    write(f"{out}/expectations.csv", EXPECTATION_COLUMNS, expected)
    write(f"{out}/results.csv", RESULT_COLUMNS, results)


def test_gaps_their_parts_and_slopes(tmp_path):
    for n in SIZES:
        folder(tmp_path, n)
    rows = finite_size.gap_rows(str(tmp_path), SIZES)
    node = [r for r in rows if r["method"] == "dpp_node"]
    edge = [r for r in rows if r["method"] == "dpp_edge"]
    assert [r["input_dim"] for r in node] == list(SIZES) and len(edge) == 3
    for r in node:
        n = r["input_dim"]
        assert r["students"] == STUDENTS and r["theory"] == pytest.approx(THEORY)
        assert r["training_gap"] == pytest.approx(1 / n, rel=1e-9)
        assert r["pruning_gap"] == pytest.approx(2 / math.sqrt(n), rel=1e-9)
        assert r["gap"] == pytest.approx((1 + 1 / n) * (1 + 2 / math.sqrt(n)) - 1, rel=1e-9)
        assert r["training_gap_ci"] < 1e-12 and r["pruning_gap_ci"] > 0
    for r in edge:                              # the mean of the masks' predicted losses
        assert r["gap"] == pytest.approx(0.03) and r["simulated"] == pytest.approx(THEORY * 1.03)
    for r in node:                       # rms over students: the gap and its spread of ±1/N
        spread = np.linspace(-1, 1, STUDENTS) / r["input_dim"]
        assert r["training_gap_rms"] == pytest.approx(1 / r["input_dim"], rel=1e-9)
        assert r["pruning_gap_rms"] == pytest.approx(np.sqrt(np.mean(
            (2 / math.sqrt(r["input_dim"]) + spread) ** 2)), rel=1e-9)
    slopes = {(r["method"], r["reweighting"]): r for r in finite_size.slope_rows(rows)}
    assert slopes["dpp_node", 0]["pruning_slope"] == pytest.approx(-0.5, abs=1e-3)
    assert slopes["dpp_node", 0]["training_slope"] == pytest.approx(-1.0, abs=1e-9)
    assert -1.0 < slopes["dpp_node", 0]["slope"] < -0.5
    assert slopes["dpp_edge", 1]["slope"] == pytest.approx(0.0, abs=1e-9)   # does not shrink
    assert slopes["dpp_node", 0]["sizes"] == 3


def test_a_slope_needs_two_sizes_and_no_zero_gap():
    assert math.isnan(finite_size.slope([100], [0.1]))
    assert math.isnan(finite_size.slope([100, 400], [0.1, 0.0]))
    assert finite_size.slope([100, 400], [-0.1, -0.05]) == pytest.approx(-0.5)


def test_excess_kurtosis_of_gaussian_uniform_and_heavy_tailed_rows():
    rng = np.random.default_rng(0)
    n = 200_000
    rows = np.stack([rng.normal(size=n), rng.uniform(-1, 1, size=n), rng.laplace(size=n)])
    found = finite_size.excess_kurtosis(rows)
    assert abs(found[0]) < 4 * math.sqrt(24 / n)
    assert found[1] == pytest.approx(-1.2, abs=0.03) and found[2] == pytest.approx(3.0, abs=0.2)
