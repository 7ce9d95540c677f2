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
The relative gap simulated / theory − 1 of each student splits into the pruning theory's
part (simulated / theory_trained − 1) and the training ODEs' part (theory_trained / theory
− 1). Each is summarised over the students twice: its mean with a 95% t-interval (a bias that
finite N leaves in every student) and its root mean square (the typical size of one
student's gap, bias and the student-to-student fluctuation of the trained order parameters
together). The slope in N is the least-squares slope of log rms gap against log N over the
sizes (−1/2 for a gap of order 1/√N, −1 for 1/N); a slope near 0 means the gap does not
shrink with N: finite N is not its cause.

The theory assumes each node's incoming weights Gaussian across inputs; finite_size_weights.csv
measures that assumption in the trained students themselves: the excess kurtosis of each
node's rescaled weights (0 for a Gaussian, ±√(24/N) from sampling alone), per size and
noise level.

write(out, study) writes finite_size.csv (one row per size and setting),
finite_size_slopes.csv (one row per setting) and finite_size_weights.csv into <out>;
docs_tables.py turns them into a page and a figure.
"""
import csv
import math
import os
from collections import defaultdict

import numpy as np

from dpp_pruning.experiments import study as studies

GAP_COLUMNS = ("input_dim", "noise", "method", "reweighting", "nodes_equivalent",
               "fraction_kept", "students", "simulated", "theory_trained", "theory",
               "gap", "gap_ci", "gap_rms", "pruning_gap", "pruning_gap_ci", "pruning_gap_rms",
               "training_gap", "training_gap_ci", "training_gap_rms")
WEIGHT_COLUMNS = ("input_dim", "noise", "students", "kurtosis_mean", "kurtosis_rms",
                  "kurtosis_max", "kurtosis_sampling_sd")
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
                row[f"{name}_rms"] = float(np.sqrt(np.mean(gap ** 2)))
            rows.append(row)
    return rows


def slope(sizes, gaps):
    """Least-squares slope of log |gap| against log N (NaN with fewer than two sizes or a
    zero gap: a part that is exact, as the pruning theory of random_node is)."""
    sizes, gaps = np.asarray(sizes, dtype=np.float64), np.abs(np.asarray(gaps, np.float64))
    if sizes.size < 2 or not (gaps > 0).all():
        return math.nan
    return float(np.polyfit(np.log(sizes), np.log(gaps), 1)[0])


def slope_rows(rows):
    """One row per setting (SLOPE_COLUMNS): the sizes, the rms gap at the first and last
    size, and the fitted slopes of the rms total gap and of its two parts."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[(r["noise"], r["method"], r["reweighting"], r["nodes_equivalent"])].append(r)
    out = []
    for (noise, method, rw, nodes), part in sorted(by_setting.items()):
        part = sorted(part, key=lambda r: r["input_dim"])
        sizes = [r["input_dim"] for r in part]
        out.append(dict(noise=noise, method=method, reweighting=rw, nodes_equivalent=nodes,
                        sizes=len(sizes), gap_first=part[0]["gap_rms"],
                        gap_last=part[-1]["gap_rms"],
                        slope=slope(sizes, [r["gap_rms"] for r in part]),
                        pruning_slope=slope(sizes, [r["pruning_gap_rms"] for r in part]),
                        training_slope=slope(sizes, [r["training_gap_rms"] for r in part])))
    return out


def excess_kurtosis(w1):
    """(K,) excess kurtosis of each row of w1 (K, N) across its N entries (0 for Gaussian)."""
    w1 = np.asarray(w1, dtype=np.float64)
    z = (w1 - w1.mean(axis=1, keepdims=True)) / w1.std(axis=1, keepdims=True)
    return (z ** 4).mean(axis=1) - 3.0


def weight_rows(out, study):
    """One row per size and noise level (WEIGHT_COLUMNS): the mean, root mean square and
    largest over students and nodes of the excess kurtosis of the trained students' rows
    (every panel's student; rescaling does not change it), and the standard deviation
    √(24/N) that sampling N Gaussian weights alone gives it."""
    from dpp_pruning.base.storage import load_state_dict
    from dpp_pruning.experiments import sweep
    rows = []
    for size in studies.sizes(study):
        folder = size_folder(out, size.input_dim)
        for noise in size.noise_levels:
            values, students = [], set()
            for dataset in sweep.datasets(size):
                if dataset.noise != noise:
                    continue
                for panel in sweep.panels_of(size, dataset):
                    path = sweep.student_path(folder, dataset, panel.student_h_size)
                    if os.path.exists(path):
                        values += list(excess_kurtosis(load_state_dict(path)["w1.weight"]))
                        students.add(dataset.student)
            if values:
                rows.append(dict(input_dim=size.input_dim, noise=noise, students=len(students),
                                 kurtosis_mean=float(np.mean(values)),
                                 kurtosis_rms=float(np.sqrt(np.mean(np.square(values)))),
                                 kurtosis_max=float(np.max(values)),
                                 kurtosis_sampling_sd=math.sqrt(24 / size.input_dim)))
    return rows


def write(out, study):
    """Write finite_size.csv, finite_size_slopes.csv and finite_size_weights.csv of a
    finite-size study's folders, and the family's study record (study.json, for
    docs_tables.py)."""
    import json

    from dpp_pruning.base.storage import atomic_open
    from dpp_pruning.experiments.run_tables import write_csv
    rows = gap_rows(out, study.input_dims)
    write_csv(os.path.join(out, "finite_size.csv"), GAP_COLUMNS, rows)
    write_csv(os.path.join(out, "finite_size_slopes.csv"), SLOPE_COLUMNS, slope_rows(rows))
    write_csv(os.path.join(out, "finite_size_weights.csv"), WEIGHT_COLUMNS,
              weight_rows(out, study))
    with atomic_open(os.path.join(out, studies.RECORD), "w") as f:
        json.dump(studies.record(study), f, indent=1)
    return rows


def _label(gap):
    return "" if not math.isfinite(gap) else f"{100 * gap:+.2f}%"


def _percent(size):
    return "" if not math.isfinite(size) else f"{100 * size:.2g}%"


def _slope(value):
    return "" if not math.isfinite(value) else f"{value:+.2f}"


def markdown(rows, slopes, record, weights=()):
    """The finite-size page: what is compared, the slopes of every setting, the gaps at every
    size at the middle budget, and the trained weights' excess kurtosis."""
    sizes = sorted({r["input_dim"] for r in rows})
    lines = ["# Finite size: the simulation against the N → ∞ theory", "",
             f"From study '{record['name']}': N = {', '.join(map(str, sizes))} at P = "
             f"{record['samples_per_dim']} N, {max((r['students'] for r in rows), default=0)} "
             f"students per size, seed {record['seed']}.",
             "Generated by `python3 docs_tables.py`; do not edit by hand.", "",
             "Gap: a student's simulated loss (the exact expectation over its masks; the mean "
             "exact ε_g + σ²/2 of its masks where no expectation is derived) relative to the "
             "N → ∞ theory, split into the pruning theory's part (against the pruning theory "
             "at the trained student's own order parameters) and the training ODEs' part (that "
             "theory against the ODEs' end point); rms: root mean square over the students; "
             "mean: with its 95% interval across them. Slope: least-squares slope of log rms "
             "gap against log N (−0.5: O(1/√N); −1: O(1/N); near 0: the gap does not shrink "
             "with N; blank: that part is exact).", "",
             "## Slopes", "",
             "| σ | method | reweighted | nodes | rms gap at N = "
             f"{sizes[0] if sizes else ''} | at N = {sizes[-1] if sizes else ''} | slope | "
             "pruning part | training part |", "|---|---|---|---|---|---|---|---|---|"]
    for r in slopes:
        lines.append(f"| {r['noise']:g} | {r['method']} | {r['reweighting']} | "
                     f"{r['nodes_equivalent']} | {_percent(r['gap_first'])} | "
                     f"{_percent(r['gap_last'])} | {_slope(r['slope'])} | "
                     f"{_slope(r['pruning_slope'])} | {_slope(r['training_slope'])} |")
    middle = sorted({r["nodes_equivalent"] for r in rows})
    middle = middle[len(middle) // 2] if middle else None
    lines += ["", f"## Gaps at {middle} nodes kept (or their parameters in edges), by N", "",
              "Each cell: rms total gap (rms pruning part, rms training part); mean total gap "
              "± its 95% interval across students.", "",
              "| σ | method | reweighted | " + " | ".join(f"N = {n}" for n in sizes) + " |",
              "|---|---|---|" + "---|" * len(sizes)]
    cells = defaultdict(dict)
    for r in rows:
        if r["nodes_equivalent"] == middle:
            cells[r["noise"], r["method"], r["reweighting"]][r["input_dim"]] = (
                f"{_percent(r['gap_rms'])} ({_percent(r['pruning_gap_rms'])}, "
                f"{_percent(r['training_gap_rms'])}); {_label(r['gap'])} ± "
                f"{100 * r['gap_ci']:.2f}%")
    for (noise, method, rw), by_size in sorted(cells.items()):
        lines.append(f"| {noise:g} | {method} | {rw} | "
                     + " | ".join(by_size.get(n, "") for n in sizes) + " |")
    if weights:
        lines += ["", "## The trained weights", "",
                  "Excess kurtosis of each trained node's incoming weights across the N inputs "
                  "(0 for Gaussian weights; N Gaussian draws alone give it a standard deviation "
                  "of √(24/N)): mean, root mean square and largest over students and nodes.", "",
                  "| N | σ | students | mean | rms | largest | √(24/N) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['input_dim']} | {r['noise']:g} | {r['students']} | "
                  f"{r['kurtosis_mean']:+.3f} | {r['kurtosis_rms']:.3f} | "
                  f"{r['kurtosis_max']:.3f} | {r['kurtosis_sampling_sd']:.3f} |" for r in weights]
    return "\n".join(lines) + "\n"


def figure(rows):
    """The rms relative gap over students against N on log axes, one line per method at the
    middle budget without reweighting: the total gap (top) and the pruning theory's part
    (bottom), one column per noise level, with the slopes −1/2 and −1 for reference."""
    import matplotlib.pyplot as plt

    from dpp_pruning.experiments.plots import METHOD_STYLE
    noises = sorted({r["noise"] for r in rows})
    middle = sorted({r["nodes_equivalent"] for r in rows})[len({r["nodes_equivalent"]
                                                                for r in rows}) // 2]
    fig, axes = plt.subplots(2, len(noises), figsize=(5.2 * len(noises), 7.4), squeeze=False)
    for j, noise in enumerate(noises):
        for i, (column, what) in enumerate((("gap", "total gap"),
                                            ("pruning_gap", "pruning theory's part"))):
            ax = axes[i, j]
            for method, (color, marker) in METHOD_STYLE.items():
                part = sorted((r for r in rows if r["noise"] == noise and r["method"] == method
                               and r["reweighting"] == 0 and r["nodes_equivalent"] == middle),
                              key=lambda r: r["input_dim"])
                if not part:
                    continue
                n = np.array([r["input_dim"] for r in part], dtype=float)
                gap = np.array([r[f"{column}_rms"] for r in part])
                keep = gap > 0                           # an exact part has nothing to show
                ax.plot(n[keep], gap[keep], color=color, marker=marker, ms=5, lw=1.2,
                        label=method)
            sizes = sorted({r["input_dim"] for r in rows})
            ax.set_xscale("log")
            ax.set_yscale("log")
            ys = ax.get_ylim()
            top = np.sqrt(ys[0] * ys[1]) * 3
            for power, style in ((-0.5, "--"), (-1.0, ":")):
                ax.plot([sizes[0], sizes[-1]], [top, top * (sizes[-1] / sizes[0]) ** power],
                        color="0.5", ls=style, lw=1, label=f"slope {power:g}")
            ax.set_ylim(*ys)
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            ax.set_xlabel("N (input dimension)")
            ax.set_ylabel(f"rms {what} (relative)")
            ax.set_title(f"$\\sigma$ = {noise:g}, {middle} nodes kept: {what}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, 0), frameon=False)
    return fig
