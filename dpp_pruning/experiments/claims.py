"""Verdicts on the paper's teacher-student claims, across independently trained students.

A claim says that method A prunes to a lower test loss than method B at the same parameter
budget (or that reweighting lowers a method's loss). For every student s the paired
difference d_s = loss_s(A) - loss_s(B) is taken at the same noise level, panel, rescaling and
budget. The losses are the exact (node methods) or delta-method (edge methods) expected test
losses over the mask distribution (expectations.csv), so mask noise does not enter; only
where no expectation is derived (dpp_edge and random_edge with reweighting) is the measured
mean over all of that student's masks used, and the row says so (basis `measured`).

Across students the d_s are independent draws (each student has its own teacher, data and
initialisation), so the 95% interval is mean ± t_{0.975, S-1} · sd / sqrt(S). Verdict:
`holds` where the interval lies below zero, `fails` where it lies above, else `not resolved
at S students` (shown as "not resolved (S students)"). Each interval is for its own row:
with many rows some will exclude zero by chance (about 1 in 40 false verdicts each way at
95%), so read patterns across budgets, not single rows.
"""
import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import scipy.stats

CLAIM_COLUMNS = ("claim", "noise", "student_h_size", "teacher_h_size", "rescale",
                 "nodes_equivalent", "judged_on", "a", "b", "kept_a", "kept_b", "basis",
                 "students",
                 "mean_a", "mean_b", "mean_difference", "ci_low", "ci_high", "relative",
                 "agree", "verdict")


@dataclass(frozen=True)
class Claim:
    text: str
    a: tuple            # (method, reweighting): the side claimed lower
    b: tuple


CLAIMS = (
    Claim("dpp_node below random_node", ("dpp_node", 0), ("random_node", 0)),
    Claim("dpp_node below importance_node", ("dpp_node", 0), ("importance_node", 0)),
    Claim("dpp_node below random_node, reweighted", ("dpp_node", 1), ("random_node", 1)),
    Claim("dpp_node below importance_node, reweighted", ("dpp_node", 1),
          ("importance_node", 1)),
    Claim("dpp_edge below random_edge", ("dpp_edge", 0), ("random_edge", 0)),
    Claim("dpp_edge below importance_edge", ("dpp_edge", 0), ("importance_edge", 0)),
    Claim("edge below node: random_edge below dpp_node", ("random_edge", 0), ("dpp_node", 0)),
    Claim("edge below node: dpp_edge below dpp_node", ("dpp_edge", 0), ("dpp_node", 0)),
    Claim("reweighting lowers dpp_node", ("dpp_node", 1), ("dpp_node", 0)),
    Claim("reweighting lowers random_node", ("random_node", 1), ("random_node", 0)),
    Claim("reweighting lowers importance_node", ("importance_node", 1), ("importance_node", 0)),
    Claim("reweighting lowers dpp_edge", ("dpp_edge", 1), ("dpp_edge", 0)),
    Claim("reweighting lowers random_edge", ("random_edge", 1), ("random_edge", 0)),
    Claim("reweighting lowers importance_edge", ("importance_edge", 1), ("importance_edge", 0)),
)


def _key(row):
    return (float(row["noise"]), int(row["student_h_size"]), int(row["teacher_h_size"]),
            int(row["rescale"]), int(row["nodes_equivalent"]))


# what a claim is judged on, each its own row: the expected loss over the mask distribution
# (the measured mean where none is derived), the measured mean over the masks drawn, and the
# N → ∞ theory of the training ODEs and the pruning theory
JUDGED_ON = ("expected", "measured", "theory")
JUDGED_ON_WORDS = {"expected": "expected", "measured": "measured", "theory": "N → ∞"}


def fractions_kept(*row_lists):
    """{(setting, method): fraction of the student's parameters its budget keeps}, from the
    rows' fraction_kept (NaN where the rows do not say)."""
    return {(_key(row), row["method"]): float(row.get("fraction_kept", math.nan))
            for rows in row_lists for row in rows}


def _values(rows, column, basis):
    """{(setting, method, reweighting): {student: (value, basis)}} of the rows' finite
    `column` values, the mean over a student's rows of one setting (rounds of masks)."""
    found = defaultdict(list)
    for row in rows:
        value = float(row[column])
        if math.isfinite(value):
            found[(_key(row), row["method"], int(row["reweighting"]), int(row["student"]))
                  ].append(value)
    table = defaultdict(dict)
    for (setting, method, rw, student), values in found.items():
        table[(setting, method, rw)][student] = (float(np.mean(values)), basis)
    return table


def losses_by_student(expectation_rows, result_rows=()):
    """{(setting, method, reweighting): {student: (loss, basis)}}, setting = (noise, K, M,
    rescale, nodes): the expected loss where derived, else the measured mean over rounds."""
    table = _values(expectation_rows, "expected", "expected")
    for key, students in _values(result_rows, "test_loss", "measured").items():
        for student, found in students.items():
            table[key].setdefault(student, found)
    return table


def paired_interval(differences, level=0.95):
    """Mean, and the t interval of the mean, of independent paired differences."""
    d = np.asarray(differences, dtype=np.float64)
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = scipy.stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def label(verdict_text):
    """The words a verdict is shown with: holds, fails or not resolved (n students)."""
    if verdict_text.startswith("not resolved at "):
        return f"not resolved ({verdict_text[len('not resolved at '):]})"
    return verdict_text


def verdict(low, high, students):
    if high < 0:
        return "holds"
    if low > 0:
        return "fails"
    return f"not resolved at {students} student{'s' if students != 1 else ''}"


def evaluate(expectation_rows, result_rows=(), claims=CLAIMS, theory_rows=()):
    """One row per claim, setting and what it is judged on (JUDGED_ON) where both sides exist
    for at least one student: the expected losses (expectations.csv, with the measured mean
    standing in where none is derived), the measured means (results.csv: both sides
    simulated) and the N → ∞ theory (theory.csv)."""
    tables = {"expected": losses_by_student(expectation_rows, result_rows),
              "measured": _values(result_rows, "test_loss", "measured"),
              "theory": _values(theory_rows, "theory", "theory")}
    kept = fractions_kept(expectation_rows, result_rows, theory_rows)
    settings = sorted({key[0] for table in tables.values() for key in table})
    out = []
    for claim in claims:
        for setting in settings:
            for judged_on in JUDGED_ON:
                row = _judge(claim, setting, judged_on, tables[judged_on], kept)
                if row is not None:
                    out.append(row)
    return out


def _judge(claim, setting, judged_on, table, kept):
    """The claim's row at one setting, judged on one table; None where no student has both
    sides."""
    a = table.get((setting, *claim.a), {})
    b = table.get((setting, *claim.b), {})
    students = sorted(set(a) & set(b))
    if not students:
        return None
    la = np.array([a[s][0] for s in students])
    lb = np.array([b[s][0] for s in students])
    bases = {a[s][1] for s in students} | {b[s][1] for s in students}
    mean, low, high = paired_interval(la - lb)
    noise, k_nodes, m, rescale, nodes = setting
    return dict(claim=claim.text, noise=noise, student_h_size=k_nodes, teacher_h_size=m,
                rescale=rescale, nodes_equivalent=nodes, judged_on=judged_on,
                a=f"{claim.a[0]}{' rw' if claim.a[1] else ''}",
                b=f"{claim.b[0]}{' rw' if claim.b[1] else ''}",
                kept_a=kept.get((setting, claim.a[0]), math.nan),
                kept_b=kept.get((setting, claim.b[0]), math.nan),
                basis="measured" if "measured" in bases else bases.pop(),
                students=len(students), mean_a=float(la.mean()), mean_b=float(lb.mean()),
                mean_difference=mean, ci_low=low, ci_high=high,
                relative=mean / float(lb.mean()), agree=int(np.sum(la < lb)),
                verdict=verdict(low, high, len(students)))


def kept_percent(fraction):
    """A fraction of the parameters kept, as the tables show it ("16.8%"; "?" if unknown)."""
    return "?" if not math.isfinite(float(fraction)) else f"{100 * float(fraction):.1f}%"


def percent(relative):
    """A relative difference in whole percent, signed ("-6%", "+21%"); "0%" when it rounds to
    zero either way (never "-0%")."""
    whole = round(100 * float(relative))
    return f"{whole:+d}%" if whole else "0%"


def describe_run(record, students, date):
    """A run in words: its study, N, P, students, seed and date. `record` is the run
    folder's study record (study.json)."""
    return (f"study '{record['name']}': N = {record['input_dim']}, "
            f"P = {record['num_data']}, {students} student{'s' if students != 1 else ''}, "
            f"seed {record['seed']}, run {date}")


def title(record, students, date):
    """The heading of a run's claims.md."""
    return f"Claims of {describe_run(record, students, date)}"


def run_date(claims_md):
    """The date in the title line of a claims.md text (None when it has no such title)."""
    match = re.match(r"# Claims of .*, run (\d{4}-\d{2}-\d{2})\n", claims_md)
    return match.group(1) if match else None


def small_run(record, students):
    """Whether a run is smaller than the paper's scale (N or P below the paper's, or under 5
    students), so that its verdicts are not the paper-scale ones."""
    return record["input_dim"] < 500 or record["num_data"] < 800000 or students < 5


def small_run_note(record, students):
    return (f"This run is below the paper's scale (N = {record['input_dim']}, P = "
            f"{record['num_data']}, {students} student{'s' if students != 1 else ''}; the "
            "paper: N = 500, P = 800000, 5 students): its verdicts and numbers are not the "
            "paper-scale ones.")


def markdown(rows, record, date):
    """The claims as a Markdown page: a title naming the run, a warning line for a run
    below the paper's scale, and a table with one line per claim and setting."""
    students = max((r["students"] for r in rows), default=0)
    lines = [f"# {title(record, students, date)}", ""]
    if small_run(record, students):
        lines += [small_run_note(record, students), ""]
    lines += ["Verdicts: holds (the 95% interval of the mean difference A − B lies below "
              "zero), fails (above zero), not resolved (n students) (the interval contains "
              "zero). Judged on: expected (the expected loss over each method's mask "
              "distribution; basis `measured` where none is derived), measured (the mean "
              "over the masks drawn), N → ∞ (the training ODEs and the pruning theory alone).",
              "",
              "| claim | σ | K | M | rescale | nodes | judged on | kept A / B | students | "
              "mean A − B (95% CI) | relative | A lower for | basis | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = ("" if not math.isfinite(r["ci_low"])
              else f" ({r['ci_low']:+.4f}, {r['ci_high']:+.4f})")
        lines.append(f"| {r['claim']} | {r['noise']:g} | {r['student_h_size']} | "
                     f"{r['teacher_h_size']} | {r['rescale']} | {r['nodes_equivalent']} | "
                     f"{JUDGED_ON_WORDS[r['judged_on']]} | "
                     f"{kept_percent(r['kept_a'])} / {kept_percent(r['kept_b'])} | "
                     f"{r['students']} | {r['mean_difference']:+.4f}{ci} | "
                     f"{100 * r['relative']:+.1f}% | {r['agree']}/{r['students']} | "
                     f"{r['basis']} | {label(r['verdict'])} |")
    return "\n".join(lines) + "\n"
