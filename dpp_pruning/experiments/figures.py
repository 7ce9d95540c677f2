"""The paper's teacher-student figures, drawn from a reproduce.py run folder.

The notebooks in notebooks/ are thin: they call `load_run` and one plotting function per
figure. The run folder is $REPRO_OUT, or runs/<preset> with the preset from $REPRO_PRESET
(default `paper`). A notebook never starts a long run by itself: with neither variable set
and no runs/paper it runs the smoke preset (seconds) and says so; a folder named by them
without results.csv stops it with one sentence naming the command that fills it.

Figures 1 and 2 draw theory as lines and simulation as points. Lines are the N → ∞ theory
(theory.csv, `theory_line`), the mean over the run's students. Points are means over
independently trained students (the `student` column of results.csv, when there is more
than one) of each student's mean over rounds, with 95% t-intervals across students as error
bars; with one student, means over rounds with 95% t-intervals across rounds. Only rows with
`rescale` = 1 (rows rescaled to norm sqrt(N) before pruning, the default) are shown.
`figure_phase_diagram` needs no run: it is the N → ∞ theory alone.
"""
import dataclasses
import glob
import os

import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.stats
from matplotlib.legend_handler import HandlerTuple

from dpp_pruning import ROOT
from dpp_pruning.experiments import claims as claims_module
from dpp_pruning.experiments import run_tables, runner, study, sweep, theory_rows
from dpp_pruning.experiments.plots import (
    METHOD_STYLE,
    error_bars,
    method_offsets,
    method_style,
    percent_axis,
    shown,
)
from dpp_pruning.theory.expectations import (
    EDGE_METHODS,
    expected_random_edge_loss,
    rescale_order_parameters,
)
from dpp_pruning.theory.order_params import NotSpecialised, block_order
from dpp_pruning.theory.pruning_limit import pruned_losses


class NoResults(Exception):
    """The run folder a notebook was pointed at holds no results.csv."""


class Run:
    """A reproduce.py output folder: results.csv as a DataFrame (`df`), theory.csv as one
    (`theory`: empty when the run has none), the preset, the cells.

    `note` says why this run is shown when it is not the one asked for."""

    def __init__(self, out, note=""):
        self.out, self.note = os.path.abspath(out), note
        self.preset = study.read_record(out)
        if self.preset is None:
            raise NoResults(f"{out} holds no {study.RECORD}: it is not a reproduce.py run folder")
        self.preset_name = self.preset.name
        self.df = pd.read_csv(os.path.join(out, "results.csv"))
        self.theory = read_theory(out)

    def describe(self):
        p = self.preset
        return (f"study '{self.preset_name}': N = {p.input_dim}, P = {p.num_data}, "
                f"{students(self.df)} student(s), "
                f"{p.rounds} rounds x {p.num_masks} masks per cell, seed {p.seed}, "
                f"folder {shown(self.out, ROOT)}" + (f"\n{self.note}" if self.note else ""))

    def cell(self, cell):
        """The arrays stored for a sweep.Cell of this run."""
        return np.load(sweep.cell_path(self.out, cell))


def load_run(out=None, preset=None):
    """The run in `out` (default: $REPRO_OUT, or runs/<preset> with the preset from
    $REPRO_PRESET, default paper). Only the smoke preset (seconds) is ever computed here:
    when nothing was asked for and runs/paper does not exist, it is run in runs/smoke
    instead; a folder that was asked for and holds no results raises NoResults."""
    asked = out or os.environ.get("REPRO_OUT") or preset or os.environ.get("REPRO_PRESET")
    preset = preset or os.environ.get("REPRO_PRESET") or "paper"
    out = os.path.abspath(out or os.environ.get("REPRO_OUT")
                          or os.path.join(ROOT, "runs", preset))
    if os.path.exists(os.path.join(out, "results.csv")):
        return Run(out)
    command = f"python3 {os.path.join(ROOT, 'reproduce.py')} --preset {preset} --out {out}"
    if asked and preset != "smoke":
        raise NoResults(f"{out} holds no results.csv: run `{command}` first (the paper "
                        "preset with --students 5 --jobs 2 takes about 7 minutes on two "
                        "cores), or set REPRO_PRESET=smoke")
    if not asked:
        note = (f"no results in {out}, so the smoke preset (N = 20, seconds) was run instead; "
                f"for the paper's figures run `{command}` first")
        out = os.path.join(ROOT, "runs", "smoke")
        preset = "smoke"
        if os.path.exists(os.path.join(out, "results.csv")):
            return Run(out, note)
    else:
        note = "the smoke preset was run here first (seconds)"
    runner.run(study.preset(preset), out)
    return Run(out, note)


def read_theory(out):
    """theory.csv of a run folder as a DataFrame, empty (with its columns) when the run has
    no theory: --theory none, or a folder of an earlier release, which has no theory.csv."""
    path = os.path.join(out, "theory.csv")
    if not os.path.exists(path):
        return pd.DataFrame(columns=run_tables.THEORY_COLUMNS)
    return pd.read_csv(path)


def selected_rows(run):
    """The rows of results.csv the figures show: students rescaled before pruning
    (rescale = 1), with the preset's teacher (a run may add a K = 20 panel with another
    teacher size, which notebook 6 shows)."""
    return _shown_rows(run.df, run.preset)


def selected_theory(run):
    """The rows of theory.csv the figures draw, chosen as `selected_rows` chooses, without
    the budgets whose theory could not be computed (NaN)."""
    rows = _shown_rows(run.theory, run.preset)
    return rows[rows.theory.notna()]


def has_theory(run):
    """Whether the figures of this run have N → ∞ theory lines to draw."""
    return not selected_theory(run).empty


def _shown_rows(df, preset):
    return df[(df.rescale == 1) & (df.teacher_h_size == preset.teacher_h_size)]


def students(df):
    """Number of independently trained students in these rows."""
    return df.student.nunique()


def _interval(values):
    """(mean, half-width of the 95% t-interval of the mean) of a 1-D sample."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return values.mean(), 0.0
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return values.mean(), scipy.stats.t.ppf(0.975, len(values) - 1) * sem


def _summary(df):
    """Per (method, k) cell: the mean test loss, the half-width of its 95% t-interval
    (across students when there are several, else across rounds), the mean prediction and
    the unpruned loss."""
    keys = ["method", "k", "nodes_equivalent", "fraction_kept"]
    unit = ["student"] if students(df) > 1 else ["round"]
    per_unit = df.groupby(keys + unit, as_index=False).agg(
        loss=("test_loss", "mean"), predicted=("predicted_loss", "mean"),
        unpruned=("unpruned_test_loss", "first"))
    rows = []
    for key, part in per_unit.groupby(keys):
        mean, half = _interval(part.loss)
        rows.append(dict(zip(keys, key, strict=True), mean=mean, ci=half,
                         predicted=part.predicted.mean(), unpruned=part.unpruned.mean()))
    return pd.DataFrame(rows, columns=keys + ["mean", "ci", "predicted", "unpruned"])


THEORY = "N → ∞ theory"      # the label of a theory line: '<method>: N → ∞ theory'
SIMULATION = "simulation"     # the label of a method's points: '<method>: simulation'
EDGE_LINE_POINTS = 60         # fractions kept on an edge method's theory line (and its budgets)


def _ode_end_points_missing(run):
    """Whether a run with theory lacks the unit files that hold its ODEs' end points (a
    folder copied without them), so that edge lines join their budgets only."""
    return not glob.glob(os.path.join(run.out, "student_*", "theory", "*.npz"))


def error_bar_caption(run):
    """What the lines, points and error bars of figures 1 and 2 are (a few sentences)."""
    df = selected_rows(run)
    s = students(df)
    if s > 1:
        what = (f"mean over {s} independently trained students of each student's mean over "
                f"{df['round'].nunique()} rounds; error bars: 95% t-interval of that mean "
                "across students")
    else:
        what = (f"mean over {df['round'].nunique()} rounds of mask draws from one trained "
                "student; error bars: 95% t-interval of that mean across rounds")
    if has_theory(run):
        theory_s = selected_theory(run).student.nunique()
        lines = (f"Lines: the N → ∞ theory (theory.csv: the training ODEs from each student's "
                 "seeded start, then the pruning theory of docs/theory.md), mean over "
                 f"{theory_s} student{'s' if theory_s > 1 else ''}; edge methods on a fine "
                 "grid of the fraction kept, node methods through their whole node counts"
                 + (" (this folder lacks the theory unit files that hold the ODEs' end "
                    "points, so the edge methods' lines join their budgets too)"
                    if _ode_end_points_missing(run) else "") + ". ")
    else:
        lines = ("This run has no N → ∞ theory (theory.csv is empty or missing: --theory "
                 "none, or a folder of an earlier release), so lines only join the points. ")
    if s == 0:
        return f"{lines}This run has no simulation (--theory only), so there are no points."
    return (f"{lines}Points: simulation, {what}; an error bar that reaches past the plot "
            "(with few students its lower end can be at or below zero, which a log axis "
            "cannot show) is cut at the axis. The methods' points (not the lines) are shifted "
            "slightly sideways so that coinciding points stay visible. The dashed line is the "
            "unpruned (rescaled) student.")


def lines_and_points(run):
    """The legend's title: what the lines and the points of figures 1 and 2 are."""
    df = selected_rows(run)
    s = students(df)
    if s > 1:
        points = f"points: simulation, mean over {s} students, 95% interval"
    elif s == 1:
        points = (f"points: simulation, mean over {df['round'].nunique()} rounds of one "
                  "student, 95% interval")
    else:
        points = "no simulation in this run"
    if has_theory(run):
        return f"lines: {THEORY}; {points}"
    return f"{points}; lines join the points (no N → ∞ theory in this run)"


def x_positions_caption(run):
    """One sentence on why node and edge points of the same budget sit apart."""
    n = run.preset.input_dim
    return (f"Node methods keeping k of K nodes sit at k/K of the parameters; edge methods keep "
            f"e weights per node, e = k(N + 1)/K - 1 rounded to a whole number, and sit at "
            f"(e + 1)/(N + 1) (N = {n}), so the two differ slightly at the same budget.")


def ode_end_point(run, student, noise, student_h_size):
    """(q (K, K), r (K, M), t (M, M), v (K,), v_star (M,)): where the training ODEs of a
    student ended (not rescaled), as its theory unit file stores them (sweep.run_theory), for
    the study's own teacher; None when the file is missing."""
    unit = sweep.Theory(sweep.Dataset(int(student), float(noise)), int(student_h_size))
    path = sweep.theory_path(run.out, unit)
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return tuple(z[name] for name in ("q", "r", "t", "v", "v_star"))


def edge_theory(run, method, fractions, end_point, noise):
    """ε_g + σ²/2 at N → ∞ (F,) of an edge method keeping the fractions f (F,) of each node's
    incoming weights, of the student at `end_point` with its rows rescaled to norm √N (the
    figures show rescale = 1): pruning_limit.pruned_losses, as theory_rows.theory_losses
    computes it at the study's budgets. Edge reweighting changes nothing at N → ∞."""
    q, r, t, v, v_star = end_point
    q, r = rescale_order_parameters(q, r)
    fractions = [float(f) for f in fractions]
    eps = pruned_losses({method: fractions}, q, r, t, v, v_star, (False,),
                        run.preset.importance_rule, run.preset.nonlinearity)
    return np.array([eps[(method, f, False)] for f in fractions]) + 0.5 * float(noise) ** 2


def theory_line(run, noise, student_h_size, method, reweighting=0, x="fraction_kept"):
    """(xs, ys) of a method's N → ∞ theory line, or None when the run has no theory of it:
    ys is the mean over the run's students of the test loss ε_g + σ²/2 (theory.csv).
    x = 'fraction_kept': xs is the fraction of the parameters kept; x = 'k': the method's
    --k (nodes, or weights per node). Node methods have theory at whole node counts only,
    so their line joins theory.csv's budgets. Edge methods are drawn on a fine grid of the
    fraction f of each node's incoming weights kept, from the panel's smallest to its
    largest budget with the budgets' own f = e/N among them, at (fN + 1)/(N + 1) of the
    parameters (f N weights per node), from each student's ODE end point (`ode_end_point`,
    `edge_theory`); when a student's unit file is missing, their line joins the budgets."""
    rows = selected_theory(run)
    rows = rows[(rows.noise == noise) & (rows.student_h_size == student_h_size)
                & (rows.method == method) & (rows.reweighting == reweighting)]
    if rows.empty:
        return None
    budgets = rows.groupby("nodes_equivalent").agg(
        k=("k", "first"), fraction_kept=("fraction_kept", "first"), theory=("theory", "mean"))
    if method in EDGE_METHODS:
        n = run.preset.input_dim
        ends = [ode_end_point(run, s, noise, student_h_size) for s in sorted(rows.student.unique())]
        if all(end is not None for end in ends):
            kept = budgets.k.to_numpy() / n                                   # f = e / N
            f = np.union1d(np.linspace(kept.min(), kept.max(), EDGE_LINE_POINTS), kept)
            ys = np.mean([edge_theory(run, method, f, end, noise) for end in ends], axis=0)
            return (f * n if x == "k" else (f * n + 1) / (n + 1)), ys
    return budgets[x].to_numpy(dtype=float), budgets.theory.to_numpy()


def plot_loss_vs_budget(run, ax, noise, student_h_size, reweighting=0, methods=None,
                        x="fraction_kept"):
    """Average test loss against parameters kept (x = 'fraction_kept', in %) or the methods'
    --k (x = 'k'): per method its N → ∞ theory as a line (`theory_line`, labelled
    '<method>: N → ∞ theory') and the simulation as points with 95% intervals as error bars
    (the module docstring; an ErrorbarContainer labelled '<method>: simulation'), in the
    method's colour and marker; a method without theory has its points joined by a line
    instead. The y range is set by the means, the theory and the unpruned loss; error bars
    reaching past it are cut at the axis. The points (not the lines) are shifted slightly
    sideways per method, so that coinciding points stay visible."""
    df = selected_rows(run)
    df = df[(df.noise == noise) & (df.student_h_size == student_h_size)
            & (df.reweighting == reweighting)]
    summary = _summary(df)
    candidates = list(methods or sweep.ALL_METHODS)
    lines = {m: theory_line(run, noise, student_h_size, m, reweighting, x) for m in candidates}
    lines = {m: line for m, line in lines.items() if line is not None}
    methods = [m for m in candidates if m in set(summary.method) or m in lines]
    summary = summary[summary.method.isin(methods)]
    scale = 100 if x == "fraction_kept" else 1
    span = (summary[x].max() - summary[x].min()) * scale if not summary.empty else 1.0
    shift = method_offsets(methods, (0.02 if x == "k" else 0.008) * (span or 1.0))
    values = list(summary["mean"]) + [y for _, ys in lines.values() for y in ys]
    if not summary.empty:
        unpruned = summary.unpruned.iloc[0]
        values.append(unpruned)
        ax.axhline(unpruned, color="k", ls="--", lw=1, label="unpruned")
    low = min(values) / 1.6 if values else None
    if values:
        ax.set_ylim(low, max(values) * 2.0)
    for method in methods:
        style = method_style(method)
        if method in lines:
            xs, ys = lines[method]
            ax.plot(xs * scale, ys, color=style["color"], lw=1.4, alpha=0.85,
                    label=f"{method}: {THEORY}")
        part = summary[summary.method == method].sort_values(x)
        if not part.empty:
            error_bars(ax, part[x] * scale + shift[method], part["mean"], part["ci"], low,
                       joined=method not in lines, label=f"{method}: {SIMULATION}", **style)
    if x == "fraction_kept":
        ax.set_xlabel("parameters kept")
        percent_axis(ax.xaxis)
    else:
        ax.set_xlabel("hidden nodes kept")
    ax.set_ylabel("test loss")
    ax.set_yscale("log")
    ax.set_title(f"K = {student_h_size}, $\\sigma$ = {noise:g}"
                 + (", reweighted" if reweighting else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def _grid(count, columns=2, width=5.2, height=3.9):
    """A figure with `count` panels, at most `columns` per row -> (fig, flat list of axes)."""
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, min(count, columns), figsize=(width * min(count, columns),
                                                                 height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.remove()
    return fig, flat[:count]


def _legend_below(fig, axes, title=None):
    """One legend for everything drawn in any panel, below the panels (it covers none), with
    `title` above its entries. Artists labelled '<name>: <what>' (a method's theory line and
    its points) share the one entry <name>, drawn on top of each other."""
    entries = {}                                          # name -> {label: handle}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label.split(": ")[0], {}).setdefault(label, handle)
    fig.tight_layout()
    fig.legend([tuple(e.values()) for e in entries.values()], list(entries), loc="upper center",
               ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0), frameon=False, title=title,
               title_fontsize=8, handler_map={tuple: HandlerTuple(ndivide=1)})


def figure_loss_vs_budget(run, reweighting=0):
    """Figure 1: both noise levels for K = 6 (six methods) and the K = 20 panel, two
    panels per row; theory as lines, simulation as points (`plot_loss_vs_budget`)."""
    panels = [(noise, p) for p in run.preset.panels for noise in run.preset.noise_levels]
    fig, axes = _grid(len(panels))
    for ax, (noise, panel) in zip(axes, panels, strict=True):
        plot_loss_vs_budget(run, ax, noise, panel.student_h_size, reweighting, panel.methods)
    _legend_below(fig, axes, lines_and_points(run))
    return fig


def figure_node_methods(run, reweighting=0):
    """Figure 2: the node methods against hidden nodes kept, K = 6; theory as lines through
    the whole node counts, simulation as points (`plot_loss_vs_budget`)."""
    noises = run.preset.noise_levels
    fig, axes = _grid(len(noises))
    student_h_size = run.preset.panels[0].student_h_size
    for ax, noise in zip(axes, noises, strict=True):
        plot_loss_vs_budget(run, ax, noise, student_h_size, reweighting,
                            ("dpp_node", "random_node", "importance_node"), x="k")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    _legend_below(fig, axes, lines_and_points(run))
    return fig


def figure_heatmaps(run, method, noise=0.0, reweighting=0):
    """Figure 3: expected Q and R after pruning, block-diagonal order, across budgets."""
    panel = run.preset.panels[0]
    cells = [c for c in sweep.grid(run.preset, [method], students=1)
             if c.noise == noise and c.student_h_size == panel.student_h_size
             and c.teacher_h_size is None and c.rescale == 1]
    fig, axes = plt.subplots(2, len(cells) + 1, figsize=(2.3 * (len(cells) + 1), 4.6),
                             squeeze=False)
    with run.cell(cells[0]) as z:
        q, r = z["unpruned_q"], z["unpruned_r"]
    try:
        order, _ = block_order(r)
        title = "block-diagonal order"
    except NotSpecialised as e:
        order, title = np.arange(len(q)), f"students' own order ({e})"
    columns = [("unpruned", q, r)]
    for cell in cells:
        with run.cell(cell) as z:
            tags = [f"rw{reweighting}_round{i}" for i in range(run.preset.rounds)]
            columns.append((f"k = {cell.k}", np.mean([z[f"eq_{t}"] for t in tags], axis=0),
                            np.mean([z[f"er_{t}"] for t in tags], axis=0)))
    for j, (label, eq, er) in enumerate(columns):
        axes[0, j].imshow(eq[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
        image = axes[1, j].imshow(er[order], cmap="RdBu_r", vmin=-1.5, vmax=1.5)
        axes[0, j].set_title(label, fontsize=9)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("E[Q]")
    axes[1, 0].set_ylabel("E[R]")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    which = ", student 0" if students(run.df) > 1 else ""
    fig.suptitle(f"{method}, K = {panel.student_h_size}, $\\sigma$ = {noise:g}{which}; {title}",
                 fontsize=10)
    return fig


def figure_theory_vs_simulation(run):
    """Figure 4a: predicted against measured test loss, every cell and round."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    df = selected_rows(run)
    for method, part in df.groupby("method"):
        ax.scatter(part.predicted_loss, part.test_loss, s=12, label=method, alpha=0.7,
                   **method_style(method))
    lo = min(df.predicted_loss.min(), df.test_loss.min())
    hi = max(df.predicted_loss.max(), df.test_loss.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="theory = simulation")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"predicted: $\epsilon_g(Q, R, T) + \sigma^2/2$")
    ax.set_ylabel("measured test loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    return fig


def random_edge_curve(run, noise, student_h_size, fractions):
    """Closed-form loss of random_edge pruning against the fraction f of edges kept, from
    the unpruned student's order parameters (expectations.expected_random_edge_loss; it
    holds for any student, specialised or not)."""
    cell = next(c for c in sweep.grid(run.preset, students=1) if c.noise == noise
                and c.student_h_size == student_h_size and c.teacher_h_size is None
                and c.rescale == 1)               # any cell stores the unpruned student
    with run.cell(cell) as z:
        q, r, t, v, v_star = (z[name] for name in ("unpruned_q", "unpruned_r", "t", "v", "v_star"))
    return np.array([expected_random_edge_loss(q, r, t, v, v_star, f)
                     for f in fractions]) + 0.5 * noise ** 2


def figure_random_edge_closed_form(run):
    """Figure 4b: random_edge measured against the closed form in the fraction kept, for
    student 0 (whose order parameters give the curve)."""
    panels = [(noise, p.student_h_size) for p in run.preset.panels
              for noise in run.preset.noise_levels if "random_edge" in p.methods]
    fig, axes = _grid(len(panels))
    fractions = np.linspace(0.01, 1.0, 100)
    rows = selected_rows(run)
    for ax, (noise, student_h_size) in zip(axes, panels, strict=True):
        df = rows[(rows.noise == noise) & (rows.student_h_size == student_h_size)
                  & (rows.method == "random_edge") & (rows.reweighting == 0)
                  & (rows.student == 0)]
        f = df.k / run.preset.input_dim
        label = "measured (student 0)" if students(rows) > 1 else "measured"
        ax.scatter(f, df.test_loss, s=14, label=label, **method_style("random_edge"))
        curve = random_edge_curve(run, noise, student_h_size, fractions)
        ax.plot(fractions, curve, "k-", lw=1, label="closed form")
        ax.set_title(f"K = {student_h_size}, $\\sigma$ = {noise:g}", fontsize=10)
        ax.set_xlabel("fraction of edges kept f = k / N")
        ax.set_ylabel("test loss")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    _legend_below(fig, axes)
    return fig


# ----------------------------------------------------------------------------------------
# The phase diagram: which method wins as N → ∞, from the theory alone (no run, no data)

PHASE_NOISES = tuple(np.round(np.linspace(0.0, 0.5, 11), 10))   # σ, the first panel's rows
PHASE_SIZES = tuple(range(2, 13))      # K, the second panel's rows (K/M = 1..6 at M = 2)


def phase_study(noise=0.0, student_h_size=6, base=None):
    """The study of one row of the phase diagram: `base` (default studies/paper.toml: N = 500
    for the seeded start, α = epochs · P / N = 1600, M = 2, v* = 4, η = 0.5) with one student,
    the noise level σ = noise, rows rescaled before pruning, and one panel of K =
    student_h_size ≥ 2 nodes with all six methods at every node budget 1..K − 1."""
    base = base or study.preset("paper")
    panel = study.Panel(int(student_h_size), tuple(sweep.ALL_METHODS),
                        tuple(range(1, int(student_h_size))))
    return dataclasses.replace(base, noise_levels=(float(noise),), panels=(panel,), students=1,
                               rescale=(1,), name="phase")


@dataclasses.dataclass(frozen=True)
class PhaseRow:
    """One row of the phase diagram: a trained student's winners at N → ∞.

    columns: reweighting -> {k: the method of lowest test loss of all six at the parameters of
    k nodes, k = 1..K − 1} (edge methods at the study's matched e weights per node);
    fractions (F,): fractions f of each node's incoming weights for the background, which
    keep (fN + 1)/(N + 1) of the parameters; edge (F,): the edge method of lowest test loss
    at each f (the same with and without reweighting at N → ∞); unpruned: the trained
    student's test loss (before rescaling); losses: theory_rows.theory_losses."""
    noise: float
    student_h_size: int
    input_dim: int
    columns: dict
    fractions: np.ndarray
    edge: tuple
    unpruned: float
    losses: dict


def _lowest(losses, methods):
    """The method of lowest loss (methods -> loss), the first in `methods` on a tie; NaN
    losses (node subsets too many to enumerate) never win."""
    values = np.array([losses[m] for m in methods], dtype=float)
    return methods[int(np.nanargmin(values))]


def phase_row(noise, student_h_size, edge_points=100, base=None):
    """The PhaseRow of a student of K = student_h_size nodes trained at noise σ (`phase_study`):
    the training ODEs from the seeded start (theory_rows.trained_order_parameters), then
    theory_rows.theory_losses at every node budget, and pruning_limit.pruned_losses of the
    edge methods at `edge_points` fractions f = (j + 1/2) / edge_points."""
    chosen = phase_study(noise, student_h_size, base)
    panel = chosen.panels[0]
    trajectory = theory_rows.trained_order_parameters(chosen, sweep.Dataset(0, float(noise)),
                                                      panel.student_h_size)
    q, r, t = trajectory.q[-1], trajectory.r[-1], trajectory.t
    v, v_star = trajectory.v[-1], trajectory.v_star
    losses = theory_rows.theory_losses(chosen, panel, q, r, t, v, v_star, noise, 1)
    columns = {rw: {k: _lowest({m: losses[(m, k, rw)] for m in sweep.ALL_METHODS},
                               sweep.ALL_METHODS) for k in panel.node_budgets}
               for rw in chosen.reweighting}
    fractions = (np.arange(edge_points) + 0.5) / edge_points
    scaled_q, scaled_r = rescale_order_parameters(q, r)
    eps = pruned_losses({m: list(fractions) for m in EDGE_METHODS}, scaled_q, scaled_r, t, v,
                        v_star, (False,), chosen.importance_rule, chosen.nonlinearity)
    edge = tuple(_lowest({m: eps[(m, f, False)] for m in EDGE_METHODS}, EDGE_METHODS)
                 for f in fractions)
    return PhaseRow(float(noise), panel.student_h_size, chosen.input_dim, columns, fractions,
                    edge, float(trajectory.test_loss[-1]), losses)


def _phase_panel(ax, rows, labels, reweighting):
    """Draw one panel: row i of `rows` at y = i, x the parameters kept (%); the background is
    each row's edge winner, the outlined cells at k/K the winner of all six (a Rectangle with
    gid 'row=<i> k=<k>', and the method's marker on it)."""
    colours = matplotlib.colors.ListedColormap([METHOD_STYLE[m][0] for m in sweep.ALL_METHODS])
    for i, row in enumerate(rows):
        n = row.input_dim
        f_edges = np.linspace(0.0, 1.0, len(row.fractions) + 1)
        x_edges = 100 * (f_edges * n + 1) / (n + 1)
        codes = np.array([[sweep.ALL_METHODS.index(m) for m in row.edge]], dtype=float)
        ax.pcolormesh(x_edges, [i - 0.5, i + 0.5], codes, cmap=colours, vmin=-0.5,
                      vmax=len(sweep.ALL_METHODS) - 0.5, alpha=0.3, shading="flat",
                      edgecolors="none")
        width = 100 * min(0.5 / row.student_h_size, 0.06)
        for k, method in row.columns[reweighting].items():
            colour, marker = METHOD_STYLE[method]
            x = 100 * k / row.student_h_size
            ax.add_patch(matplotlib.patches.Rectangle(
                (x - width / 2, i - 0.42), width, 0.84, facecolor=colour, edgecolor="k",
                lw=0.6, gid=f"row={i} k={k}"))
            ax.plot(x, i, ls="none", marker=marker, ms=6, color="white", mec="k", mew=0.5)
    ax.set_xlim(0.0, 100.0)
    ax.set_ylim(-0.5, len(rows) - 0.5)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    percent_axis(ax.xaxis)
    ax.set_xlabel("parameters kept")
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(range(len(rows)), [f"{row.unpruned:.2g}" for row in rows], fontsize=7)
    right.set_ylabel("unpruned test loss", fontsize=8)


@dataclasses.dataclass(frozen=True)
class PhaseDiagram:
    """The rows of both panels of the phase diagram: by_noise (one PhaseRow per σ, one K),
    by_size (one per K, one σ), and the study they were made from (`phase_study`'s base)."""
    by_noise: list
    by_size: list
    base: study.Study


def phase_diagram(noises=PHASE_NOISES, student_h_sizes=PHASE_SIZES, student_h_size=6,
                  noise_for_sizes=0.0, edge_points=100, base=None):
    """PhaseDiagram: phase_row(σ, student_h_size) for σ in noises and
    phase_row(noise_for_sizes, K) for K in student_h_sizes, from `base` (default the paper's
    study). About 6 s for the defaults (22 ODEs to α = 1600, K up to 12)."""
    base = base or study.preset("paper")
    return PhaseDiagram([phase_row(s, student_h_size, edge_points, base) for s in noises],
                        [phase_row(noise_for_sizes, k, edge_points, base)
                         for k in student_h_sizes], base)


def figure_phase_diagram(diagram=None):
    """Which pruning method has the lowest N → ∞ test loss, from the theory alone (no data,
    no SGD): x the fraction of parameters kept; y σ (left) and K/M (right); top row without,
    bottom row with reweighting. diagram: a PhaseDiagram (default `phase_diagram()`, its
    default settings). Shaded: the best edge method at every fraction kept; outlined cells
    at k/K: the best of all six at the parameters of k nodes (`phase_diagram_caption`)."""
    diagram = diagram or phase_diagram()
    by_noise, by_size = diagram.by_noise, diagram.by_size
    chosen = phase_study(base=diagram.base)
    m = chosen.teacher_h_size
    tall = max(len(by_noise), len(by_size))
    fig, axes = plt.subplots(2, 2, figsize=(11.5, 2.4 + 0.62 * tall), squeeze=False)
    for i, rw in enumerate((0, 1)):
        words = "with reweighting" if rw else "without reweighting"
        _phase_panel(axes[i, 0], by_noise, [f"{row.noise:g}" for row in by_noise], rw)
        axes[i, 0].set_ylabel("σ (label noise)")
        axes[i, 0].set_title(f"K = {by_noise[0].student_h_size}, M = {m}, {words}", fontsize=10)
        _phase_panel(axes[i, 1], by_size,
                     [f"{row.student_h_size} ({row.student_h_size / m:g})" for row in by_size],
                     rw)
        axes[i, 1].set_ylabel("K (K/M)")
        axes[i, 1].set_title(f"σ = {by_size[0].noise:g}, M = {m}, {words}", fontsize=10)
    fig.suptitle(f"Lowest test loss at N → ∞ (theory alone): the training ODEs from a seeded "
                 f"N = {chosen.input_dim} start to α = {theory_rows.training_alpha(chosen):g}, "
                 f"v* = {chosen.v_star:g}, η = {chosen.lr:g}", fontsize=10)
    handles = [(matplotlib.patches.Patch(facecolor=METHOD_STYLE[mth][0], edgecolor="k", lw=0.6),
                matplotlib.lines.Line2D([], [], ls="none", marker=METHOD_STYLE[mth][1], ms=6,
                                        color="white", mec="k", mew=0.5))
               for mth in sweep.ALL_METHODS]
    labels = list(sweep.ALL_METHODS)
    for mth in EDGE_METHODS:                       # the shades the background shows
        if any(mth in row.edge for row in by_noise + by_size):
            handles.append((matplotlib.patches.Patch(facecolor=METHOD_STYLE[mth][0],
                                                     alpha=0.3),))
            labels.append(f"{mth} (shaded)")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0),
               ncol=len(labels), fontsize=8, frameon=False,
               handler_map={tuple: HandlerTuple(ndivide=1)},
               title="outlined cells at k/K: lowest of all six methods at the parameters of k "
                     "nodes; shaded: lowest edge method at every fraction kept",
               title_fontsize=8)
    return fig


def phase_counts(diagram):
    """In words: how many node-budget cells each method wins, without and with reweighting,
    and which edge methods win somewhere in the background."""
    rows = diagram.by_noise + diagram.by_size
    parts = []
    for rw in (0, 1):
        won = pd.Series([m for row in rows for m in row.columns[rw].values()]).value_counts()
        parts.append(f"{'with' if rw else 'without'} reweighting, cells won: "
                     + ", ".join(f"{m} {won[m]}" for m in sweep.ALL_METHODS if m in won))
    edge = [m for m in EDGE_METHODS if any(m in row.edge for row in rows)]
    parts.append("best edge method somewhere in the background: " + ", ".join(edge))
    return "; ".join(parts)


def phase_diagram_caption(diagram):
    """What the phase diagram shows and how node and edge methods are compared."""
    chosen = phase_study(base=diagram.base)
    student_h_size = diagram.by_noise[0].student_h_size
    noise_for_sizes = diagram.by_size[0].noise
    return (
        "Each row is one student (seeded as student 0 of a study: teacher of M = "
        f"{chosen.teacher_h_size}, start at N = {chosen.input_dim}) trained by the N → ∞ "
        f"order-parameter ODEs to α = {theory_rows.training_alpha(chosen):g}, then pruned "
        "in theory (docs/theory.md, 'Pruning at N → ∞'), rows rescaled to norm √N first; no "
        "data and no SGD. Edge methods keep any fraction f of each node's incoming weights, "
        "so the shaded background is the edge method of lowest test loss at every fraction "
        "of parameters kept, (fN + 1)/(N + 1). Node methods exist only at k/K: there the "
        "outlined cell (colour and marker of the method) compares all six methods at the "
        "parameters of k nodes, edge methods at the matched e = k(N + 1)/K − 1 weights per "
        "node rounded, as the study does; between those columns no node method can keep that "
        "many parameters. At N → ∞ edge reweighting changes nothing, so the background is "
        "the same in both rows. Left: σ at K = "
        f"{student_h_size} (every σ shares the teacher and the initial student, only the label "
        "noise differs). Right: the student's width K/M at σ = "
        f"{noise_for_sizes:g}: the redundancy of the student's nodes is what node pruning, "
        "and dpp_node's diversity above all, acts on, and it is the paper's own second axis "
        "(K = 6 and K = 20); η would only move the student along the same training path "
        "(faster, with an error floor growing with η σ²). Each K has its own seeded start. "
        "The right-hand labels are the unpruned student's test loss: a large one (K near M) "
        "is a student still on the plateau at the end of training.")


# ----------------------------------------------------------------------------------------
# The claims across students (claims.csv, expectations.csv, specialisation.csv)

def claim_tables(run, judged_on="expected"):
    """claims (those judged on `judged_on`: claims.JUDGED_ON), expectations and
    specialisation of a run as DataFrames (rescaled rows)."""
    claims, expected, special = (pd.read_csv(os.path.join(run.out, name)) for name in
                                 ("claims.csv", "expectations.csv", "specialisation.csv"))
    if "judged_on" in claims:                           # runs of earlier releases lack it
        claims = claims[claims.judged_on == judged_on]
    return (claims[claims.rescale == 1], expected[expected.rescale == 1],
            special[special.rescale == 1])


def _claim_grid(claims, student_h_size, teacher_h_size, value):
    part = claims[claims.student_h_size == student_h_size]
    if teacher_h_size is not None:
        part = part[part.teacher_h_size == teacher_h_size]
    grid = part.assign(cell=part.apply(value, axis=1)).pivot_table(
        index="claim", columns=["noise", "nodes_equivalent"], values="cell", aggfunc="first",
        sort=False)
    grid.columns = [f"σ={n:g}, {k} nodes" for n, k in grid.columns]
    return grid


def verdict_counts(claims, student_h_size, teacher_h_size=None):
    """How many settings have each verdict, in words, e.g. '12 holds, 3 fails, 35 not
    resolved (3 students)'."""
    part = claims[claims.student_h_size == student_h_size]
    if teacher_h_size is not None:
        part = part[part.teacher_h_size == teacher_h_size]
    words = part.verdict.map(claims_module.label)
    order = ["holds", "fails"] + sorted(set(words) - {"holds", "fails"})
    return ", ".join(f"{(words == w).sum()} {w}" for w in order if (words == w).any())


VERDICT_COLOUR = {"holds": "#4c9be8", "fails": "#f28e2b", "not resolved": "#e6e6e6"}


def figure_verdict_grid(claims, student_h_size, teacher_h_size=None):
    """The verdict grid as a figure: one coloured cell per claim and (σ, nodes), holds / fails
    / not resolved, with the relative difference of the means written in it."""
    kind = _claim_grid(claims, student_h_size, teacher_h_size,
                       lambda r: claims_module.label(r.verdict).split(" (")[0])
    text = _claim_grid(claims, student_h_size, teacher_h_size,
                       lambda r: claims_module.percent(r.relative))
    kinds = list(VERDICT_COLOUR)
    codes = kind.apply(lambda column: column.map(
        lambda v: kinds.index(v) if isinstance(v, str) else np.nan)).to_numpy(dtype=float)
    colours = matplotlib.colors.ListedColormap(list(VERDICT_COLOUR.values()))
    rows, columns = codes.shape
    fig, ax = plt.subplots(figsize=(2.2 + 1.0 * columns, 0.9 + 0.32 * rows))
    ax.imshow(np.ma.masked_invalid(codes), cmap=colours, vmin=-0.5, vmax=len(kinds) - 0.5,
              aspect="auto")
    for (i, j), value in np.ndenumerate(text.to_numpy(dtype=object)):
        if isinstance(value, str):
            ax.text(j, i, value, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(columns), text.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), text.index, fontsize=8)
    ax.set_xticks(np.arange(columns + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    students_ = sorted(claims[claims.student_h_size == student_h_size].students.unique())
    handles = [matplotlib.patches.Patch(color=c, label=k if k != "not resolved" else
                                        f"not resolved ({'/'.join(map(str, students_))} "
                                        "students)") for k, c in VERDICT_COLOUR.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.6 / rows),
              ncol=3, fontsize=8, frameon=False)
    teacher = f", M = {teacher_h_size}" if teacher_h_size is not None else ""
    ax.set_title(f"Claims 'A below B', K = {student_h_size}{teacher}: verdict and relative "
                 "difference (A − B) / B of the means", fontsize=9)
    fig.tight_layout()
    return fig


def plot_paired_differences(run, axes, a, b, student_h_size=6, rw=0):
    """Per noise level (one axis each): loss(a) - loss(b) of every student (dots) at every
    node budget, their mean and 95% t-interval across students (bars)."""
    _, expected, _ = claim_tables(run)
    part = expected[(expected.student_h_size == student_h_size) & (expected.reweighting == rw)]
    for ax, noise in zip(axes, sorted(part.noise.unique()), strict=False):
        p = part[part.noise == noise]
        pa = p[p.method == a].set_index(["student", "nodes_equivalent"]).expected
        pb = p[p.method == b].set_index(["student", "nodes_equivalent"]).expected
        d = (pa - pb).dropna().reset_index()
        for s, ds in d.groupby("student"):
            ax.plot(ds.nodes_equivalent + 0.06 * (s - d.student.max() / 2), ds.expected, "o",
                    color="0.6", ms=4, label="one student" if s == 0 else None)
        stats = [(n, *_interval(g.expected)) for n, g in d.groupby("nodes_equivalent")]
        xs, means, halves = zip(*stats, strict=True)
        ax.errorbar(xs, means, yerr=halves, color="C0", marker="s", capsize=4, lw=2,
                    label="mean, 95% CI")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"σ = {noise:g}, K = {student_h_size}")
        ax.set_xlabel("hidden nodes kept (or the same parameters in edges)")
        ax.set_ylabel(f"{a} − {b}{' (reweighted)' if rw else ''}")
    axes[0].legend(loc="best", fontsize=8)


def plot_advantage_vs_specialisation(run, ax, noise, nodes, student_h_size=6):
    """random_node − dpp_node expected loss of each student against how fully its groups
    have learnt their teacher nodes (the effective outgoing weight per teacher node, v* when
    complete), one marker per way the student's nodes split between the teacher nodes."""
    _, expected, special = claim_tables(run)
    e = expected[(expected.noise == noise) & (expected.student_h_size == student_h_size)
                 & (expected.reweighting == 0) & (expected.nodes_equivalent == nodes)
                 & (expected.teacher_h_size == run.preset.teacher_h_size)]
    gain = (e[e.method == "random_node"].set_index("student").expected
            - e[e.method == "dpp_node"].set_index("student").expected)
    s = special[(special.noise == noise) & (special.student_h_size == student_h_size)
                & (special.teacher_h_size == run.preset.teacher_h_size)]
    effective = s.groupby("student").effective_v.mean()
    split = s.groupby("student").student_nodes.agg(
        lambda c: " + ".join(map(str, sorted(c, reverse=True))))
    for i, (how, students_) in enumerate(split.groupby(split).groups.items()):
        st = [x for x in students_ if x in gain.index]
        ax.scatter(effective[st], gain[st], marker="osD^v"[i % 5], label=f"split {how}")
        for x in st:
            ax.annotate(str(x), (effective[x], gain[x]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("effective outgoing weight per teacher node (v* when learnt)")
    ax.set_ylabel(f"random_node − dpp_node at {nodes} node(s)")
    ax.set_title(f"σ = {noise:g}, K = {student_h_size}: numbers are students")
    ax.legend(loc="best", fontsize=8)


def expectation_agreement(run):
    """Per cell and reweighting: the expected loss beside the mean over all sampled masks of
    the loss theory gives for each mask, its standard error (std over masks / sqrt(masks)),
    the z-score of the gap, and for edge methods the first-order value's gap as well."""
    _, expected, _ = claim_tables(run)
    df = run.df[run.df.rescale == 1]
    keys = ["student", "noise", "teacher_h_size", "student_h_size", "method", "k", "reweighting"]
    cells = df.groupby(keys, as_index=False).agg(sampled=("predicted_loss", "mean"),
                                                 measured=("test_loss", "mean"),
                                                 rounds=("round", "nunique"))
    out = cells.merge(expected[keys + ["expected", "expected_first_order", "expected_sd"]],
                      on=keys).dropna(subset=["expected"])
    masks = out.rounds * run.preset.num_masks
    out["se"] = out.expected_sd / np.sqrt(masks)
    out["gap"] = (out.sampled - out.expected) / out.expected
    out["z"] = np.where(out.se > 0, (out.sampled - out.expected) / out.se.where(out.se > 0), 0.0)
    out["first_order_gap"] = (out.sampled - out.expected_first_order) / out.expected
    return out
