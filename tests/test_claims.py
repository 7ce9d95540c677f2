"""claims.evaluate on hand-made expected losses: every row's interval, verdict and relative
difference against values worked out here from the students' paired differences."""
import math

import pytest

from dpp_pruning.experiments import claims

T_975_4 = 2.7764451051977987      # t quantile at 0.975 with 4 degrees of freedom (tables)
LOSS_B = [0.50, 0.60, 0.55, 0.65, 0.70]     # random_node's expected loss of students 0..4
DIFFERENCES = {                             # dpp_node - random_node per student, by setting
    1: [-0.030, -0.010, -0.020, -0.040, -0.025],     # all below zero: holds
    2: [0.010, 0.030, 0.020, 0.015, 0.040],          # all above zero: fails
    3: [-0.020, 0.030, 0.010, -0.010, 0.000],        # straddles zero: not resolved
}
VERDICTS = {1: "holds", 2: "fails", 3: "not resolved at 5 students"}


def expectation_rows():
    """expectations.csv rows of one panel at three budgets (nodes 1, 2, 3), five students."""
    rows = []
    for nodes, diffs in DIFFERENCES.items():
        for student, (b, d) in enumerate(zip(LOSS_B, diffs, strict=True)):
            for method, value in (("random_node", b), ("dpp_node", b + d)):
                rows.append(dict(student=student, noise=0.0, teacher_h_size=2,
                                 student_h_size=6, rescale=1, nodes_equivalent=nodes,
                                 method=method, reweighting=0, expected=value))
    return rows


def by_hand(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = T_975_4 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_intervals_verdicts_and_relative_are_those_worked_by_hand():
    rows = claims.evaluate(expectation_rows(), claims=claims.CLAIMS[:1])
    assert [r["nodes_equivalent"] for r in rows] == [1, 2, 3]
    for row in rows:
        diffs = DIFFERENCES[row["nodes_equivalent"]]
        mean, low, high = by_hand(diffs)
        mean_a = sum(b + d for b, d in zip(LOSS_B, diffs, strict=True)) / 5
        mean_b = sum(LOSS_B) / 5
        assert row["claim"] == "dpp_node below random_node"
        assert (row["a"], row["b"], row["basis"], row["students"]) == (
            "dpp_node", "random_node", "expected", 5)
        assert row["mean_a"] == pytest.approx(mean_a, rel=1e-12)
        assert row["mean_b"] == pytest.approx(mean_b, rel=1e-12)
        assert row["mean_difference"] == pytest.approx(mean, rel=1e-12)
        assert row["ci_low"] == pytest.approx(low, rel=1e-9)
        assert row["ci_high"] == pytest.approx(high, rel=1e-9)
        assert row["relative"] == pytest.approx(mean / mean_b, rel=1e-12)
        assert row["agree"] == sum(d < 0 for d in diffs)
        assert row["verdict"] == VERDICTS[row["nodes_equivalent"]]
        assert (row["verdict"] == "holds") == (row["ci_high"] < 0)
        assert (row["verdict"] == "fails") == (row["ci_low"] > 0)


def test_relative_differences_read_in_whole_percent_without_minus_zero():
    from dpp_pruning.experiments.claims import percent
    assert [percent(x) for x in (-0.0612, 0.2049, -0.004, 0.0049, 0.0, -0.005001)] == [
        "-6%", "+20%", "0%", "0%", "0%", "-1%"]
