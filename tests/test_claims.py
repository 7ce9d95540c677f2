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


def test_students_are_paired_only_where_both_sides_have_them():
    """Student 2 lacks random_node: the claim pairs students 0, 1, 3 and 4, and its interval
    is that of their four differences."""
    rows = [r for r in expectation_rows() if not (r["student"] == 2
                                                  and r["method"] == "random_node")]
    row = claims.evaluate(rows, claims=claims.CLAIMS[:1])[0]
    diffs = [d for s, d in enumerate(DIFFERENCES[1]) if s != 2]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    half = 3.1824463052837078 * sd / 2                      # t(0.975, 3 degrees of freedom)
    assert row["students"] == 4 and row["agree"] == 4
    assert row["mean_difference"] == pytest.approx(mean, rel=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert row["mean_b"] == pytest.approx(sum(b for s, b in enumerate(LOSS_B) if s != 2) / 4)


def test_measured_losses_stand_in_only_where_no_expectation_is_derived():
    """dpp_edge reweighted has no expectation (NaN): its mean measured loss over the student's
    rounds is used, and the row says so; a derived expectation is never replaced."""
    expected, measured = [], []
    for student in range(3):
        common = dict(student=student, noise=0.0, teacher_h_size=2, student_h_size=6,
                      rescale=1, nodes_equivalent=2)
        expected += [dict(common, method="dpp_edge", reweighting=1, expected="nan"),
                     dict(common, method="dpp_edge", reweighting=0, expected=0.5 + student)]
        for rnd, loss in enumerate((0.40, 0.44)):
            measured += [dict(common, method="dpp_edge", reweighting=1, round=rnd,
                              test_loss=loss + student),
                         dict(common, method="dpp_edge", reweighting=0, round=rnd,
                              test_loss=99.0)]
    claim = next(c for c in claims.CLAIMS if c.text == "reweighting lowers dpp_edge")
    row = claims.evaluate(expected, measured, claims=[claim])[0]
    assert row["basis"] == "measured" and row["students"] == 3
    assert row["mean_a"] == pytest.approx(0.42 + 1) and row["mean_b"] == pytest.approx(0.5 + 1)
    assert row["mean_difference"] == pytest.approx(-0.08) and row["verdict"] == "holds"


def test_an_interval_that_touches_zero_is_not_resolved():
    assert claims.verdict(-0.2, 0.0, 5) == "not resolved at 5 students"
    assert claims.verdict(0.0, 0.2, 5) == "not resolved at 5 students"
    assert claims.verdict(-0.2, -1e-12, 5) == "holds"
    assert claims.verdict(1e-12, 0.2, 1) == "fails"
    assert claims.verdict(float("nan"), float("nan"), 1) == "not resolved at 1 student"


def test_each_row_says_what_fraction_of_the_parameters_each_side_kept():
    rows = [dict(r, fraction_kept=r["nodes_equivalent"] / 6) for r in expectation_rows()]
    out = claims.evaluate(rows, claims=claims.CLAIMS[:1])
    assert [(r["kept_a"], r["kept_b"]) for r in out] == [(1 / 6, 1 / 6), (2 / 6, 2 / 6),
                                                        (3 / 6, 3 / 6)]
    text = claims.markdown(out, dict(name="t", input_dim=20, num_data=4000, seed=1), "2026-01-01")
    assert "| 6 | 2 | 1 | 2 | expected | 33.3% / 33.3% | 5 |" in text
