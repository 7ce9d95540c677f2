"""A finite-size study: the simulation against the N → ∞ theory as the input dimension grows.

A study file with a [sizes] section (studies/finite_size.toml) runs one study per input
dimension N, each in its own run folder <out>/N<N>, at P = samples_per_dim · N (α fixed).
For every size, noise level, method, budget and reweighting, and for every student:
- simulated: the expected loss over the student's mask distribution (expectations.csv: exact
  for node methods, delta method for edge methods); where none is derived (dpp_edge and
  random_edge reweighted), the mean over the student's masks of each pruned network's exact
  ε_g + σ²/2 (results.csv's predicted_loss). Neither has test-set noise: finite N is all
  that separates it from the theory;
- theory_trained: the pruning theory at N → ∞ at the trained student's own Q, R, T, v;
- theory: the training ODEs from the student's seeded start, then the pruning theory.
The relative gap simulated / theory − 1 splits into the pruning theory's part (simulated /
theory_trained − 1) and the training ODEs' part (theory_trained / theory − 1). Each is
averaged over students with a 95% t-interval across them; its slope in N is the least-squares
slope of log |mean gap| against log N over the sizes (−1/2 for a gap of order 1/√N, −1 for
1/N). A gap whose slope is near 0 does not shrink: finite N is not its cause.

write(out, study) writes finite_size.csv (one row per size and setting) and
finite_size_slopes.csv (one row per setting) into <out>; docs_tables.py turns them into a
page and a figure.
"""
import csv
import math
import os
from collections import defaultdict

import numpy as np

from dpp_pruning.experiments import study as studies

GAP_COLUMNS = ("input_dim", "noise", "method", "reweighting", "nodes_equivalent",
               "fraction_kept", "students", "simulated", "theory_trained", "theory",
               "gap", "gap_ci", "pruning_gap", "pruning_gap_ci", "training_gap",
               "training_gap_ci")
SLOPE_COLUMNS = ("noise", "method", "reweighting", "nodes_equivalent", "sizes", "gap_first",
                 "gap_last", "slope", "pruning_slope", "training_slope")
PARTS = (("gap", "total"), ("pruning_gap", "pruning"), ("training_gap", "training"))


def size_folder(out, input_dim):
    return os.path.join(out, f"N{input_dim}")


def _read(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _setting(row):
    return (float(row["noise"]), row["method"], int(row["reweighting"]),
            int(row["nodes_equivalent"]))


def student_losses(folder):
    """{setting: {student: (simulated, theory_trained, theory, fraction kept)}} of one size's
    run folder, setting = (noise, method, reweighting, nodes kept); rows rescaled before
    pruning (rescale = 1) with the study's own teacher only."""
    expected = [r for r in _read(os.path.join(folder, "expectations.csv"))
                if r["rescale"] == "1"]
    measured = defaultdict(list)
    for r in _read(os.path.join(folder, "results.csv")):
        if r["rescale"] == "1":
            measured[_setting(r), int(r["student"])].append(float(r["predicted_loss"]))
    found = defaultdict(dict)
    for r in expected:
        key, student = _setting(r), int(r["student"])
        value = float(r["expected"])
        if not math.isfinite(value) and measured.get((key, student)):
            value = float(np.mean(measured[key, student]))
        if math.isfinite(value):
            found[key][student] = (value, float(r["theory_trained"]), float(r["theory"]),
                                   float(r["fraction_kept"]))
    return found


def _mean_interval(values):
    """(mean, half-width of the 95% t-interval of the mean) of a sample (NaN width for one)."""
    import scipy.stats
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    half = scipy.stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def gap_rows(out, sizes):
    """One row per size and setting (GAP_COLUMNS): the means over students of the simulated
    loss and of both theories, and the three relative gaps with their 95% intervals."""
    rows = []
    for n in sizes:
        for key, students in sorted(student_losses(size_folder(out, n)).items()):
            values = np.array(list(students.values()))          # (S, 4)
            sim, trained, theory = values[:, 0], values[:, 1], values[:, 2]
            gaps = {"gap": sim / theory - 1, "pruning_gap": sim / trained - 1,
                    "training_gap": trained / theory - 1}
            noise, method, rw, nodes = key
            row = dict(input_dim=n, noise=noise, method=method, reweighting=rw,
                       nodes_equivalent=nodes, fraction_kept=float(values[0, 3]),
                       students=len(values), simulated=float(sim.mean()),
                       theory_trained=float(trained.mean()), theory=float(theory.mean()))
            for name, gap in gaps.items():
                row[name], row[f"{name}_ci"] = _mean_interval(gap)
            rows.append(row)
    return rows


def slope(sizes, gaps):
    """Least-squares slope of log |gap| against log N (NaN with fewer than two sizes or a
    zero gap)."""
    sizes, gaps = np.asarray(sizes, dtype=np.float64), np.abs(np.asarray(gaps, np.float64))
    if sizes.size < 2 or not (gaps > 0).all():
        return math.nan
    return float(np.polyfit(np.log(sizes), np.log(gaps), 1)[0])


def slope_rows(rows):
    """One row per setting (SLOPE_COLUMNS): the sizes, the mean gap at the first and last
    size, and the fitted slopes of the total gap and of its two parts."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[(r["noise"], r["method"], r["reweighting"], r["nodes_equivalent"])].append(r)
    out = []
    for (noise, method, rw, nodes), part in sorted(by_setting.items()):
        part = sorted(part, key=lambda r: r["input_dim"])
        sizes = [r["input_dim"] for r in part]
        out.append(dict(noise=noise, method=method, reweighting=rw, nodes_equivalent=nodes,
                        sizes=len(sizes), gap_first=part[0]["gap"], gap_last=part[-1]["gap"],
                        slope=slope(sizes, [r["gap"] for r in part]),
                        pruning_slope=slope(sizes, [r["pruning_gap"] for r in part]),
                        training_slope=slope(sizes, [r["training_gap"] for r in part])))
    return out


def write(out, study):
    """Write finite_size.csv and finite_size_slopes.csv of a finite-size study's folders,
    and the family's study record (study.json, for docs_tables.py)."""
    import json

    from dpp_pruning.base.storage import atomic_open
    from dpp_pruning.experiments.run_tables import write_csv
    rows = gap_rows(out, study.input_dims)
    write_csv(os.path.join(out, "finite_size.csv"), GAP_COLUMNS, rows)
    write_csv(os.path.join(out, "finite_size_slopes.csv"), SLOPE_COLUMNS, slope_rows(rows))
    with atomic_open(os.path.join(out, studies.RECORD), "w") as f:
        json.dump(studies.record(study), f, indent=1)
    return rows
