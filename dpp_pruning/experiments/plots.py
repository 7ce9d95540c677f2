"""Figures shared by evaluate.py and the notebooks (matplotlib, no display needed)."""
import os

import matplotlib
import numpy as np

if "inline" not in matplotlib.get_backend():     # a notebook keeps its inline figures
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from dpp_pruning import ROOT  # noqa: E402
from dpp_pruning.base.storage import atomic_open  # noqa: E402

# One colour and one marker per pruning method, for every figure of the suite (teacher-student
# and real data), in the order the legends list them.
METHOD_STYLE = {"dpp_node": ("C0", "o"), "random_node": ("C2", "^"),
                "importance_node": ("C4", "D"), "dpp_edge": ("C1", "s"),
                "random_edge": ("C3", "v"), "importance_edge": ("C5", "P")}


def method_style(method):
    """matplotlib keyword arguments (color, marker) of a pruning method."""
    color, marker = METHOD_STYLE[method]
    return dict(color=color, marker=marker)


def method_offsets(methods, width):
    """A small sideways shift per method, centred on zero and `width` apart, so that points of
    methods that coincide stay visible side by side."""
    return {m: (i - (len(methods) - 1) / 2) * width for i, m in enumerate(methods)}


def _percent(value, _position=None):
    return f"{value:g}%"


def percent_axis(axis, log=False):
    """Tick labels of `axis` (ax.xaxis or ax.yaxis) read as percent ("2%", "60%"); on a log
    axis the 2x and 5x ticks of each decade are labelled too, never in powers of ten."""
    axis.set_major_formatter(FuncFormatter(_percent))
    if log:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())


def band(ax, xs, mean, half, floor, **style):
    """The interval mean ± half as a shaded band; where its lower end reaches `floor` or
    below (on a log axis, zero or less cannot be drawn) it is cut at `floor`."""
    low = [max(m - h, floor) for m, h in zip(mean, half, strict=True)]
    high = [m + h for m, h in zip(mean, half, strict=True)]
    ax.fill_between(xs, low, high, alpha=0.12, lw=0, **style)


def error_bars(ax, xs, mean, half, floor, joined=False, **style):
    """Points at `mean` with error bars mean ± half; where a bar's lower end reaches `floor`
    or below (on a log axis, zero or less cannot be drawn) it is cut at `floor`, as `band`
    cuts bands (floor None: not cut). joined: a line joins the points too (where no theory
    line is drawn). Returns the ErrorbarContainer."""
    mean = np.asarray(mean, dtype=float)
    half = np.asarray(half, dtype=float)
    below = half if floor is None else mean - np.maximum(mean - half, floor)
    return ax.errorbar(xs, mean, yerr=[below, half], ls="-" if joined else "none", lw=1.0,
                       ms=5, capsize=2.5, elinewidth=1.0, zorder=3, **style)


def heatmap_figure(panels, suptitle=None, vmin=-1.0, vmax=1.0, columns=2):
    """One annotated heatmap per (title -> 2-D array) panel, `columns` panels per row.

    Rows are student nodes; a panel whose title starts with R or E[R] has teacher nodes as
    columns (student-teacher overlaps), any other student nodes (student-student)."""
    rows = -(-len(panels) // columns)
    matrices = list(panels.values())
    widths = [max(m.shape[1] for m in matrices[c::columns]) for c in range(columns)]
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 + 0.5 * sum(widths), 3.4 * rows),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, matrix) in zip(axes.ravel(), panels.items(), strict=False):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        teacher = title.split()[0] in ("R", "E[R]")
        ax.set_xlabel("teacher node n" if teacher else "student node j")
        ax.set_ylabel("student node i")
        if matrix.size <= 64:
            for (i, j), value in _cells(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color=text_colour(image.cmap(image.norm(value))))
    for ax in axes.ravel()[len(panels):]:
        ax.remove()
    fig.colorbar(image, ax=axes.ravel()[:len(panels)].tolist(), shrink=0.6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def text_colour(rgba):
    """Black on light cells, white on dark ones, by the cell's relative luminance."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 else "white"


def _cells(matrix):
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            yield (i, j), matrix[i, j]


def _write_png(fig, path):
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def save_figure(fig, path):
    """Write a figure as PNG atomically and close it."""
    _write_png(fig, path)
    plt.close(fig)


def shown(path, root=ROOT):
    """A path as the notebooks print it: relative to the repository when inside it, so that
    stored outputs do not depend on where the repository lies."""
    inside = os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == \
        os.path.abspath(root)
    return os.path.relpath(path, root) if inside else os.path.abspath(path)


def save_beside(fig, run_or_folder, name):
    """Write a notebook's figure as <folder>/figures/<name>.png, beside the run it was drawn
    from, and return that path as `shown` prints it. `run_or_folder` is the folder, or an
    object holding it in `.out` (figures.Run).
    The figure stays open, so the notebook still shows it."""
    folder = os.fspath(getattr(run_or_folder, "out", run_or_folder))
    path = os.path.join(folder, "figures", f"{name}.png")
    _write_png(fig, path)
    return shown(path)


def save_heatmaps(path, panels, suptitle=None):
    save_figure(heatmap_figure(panels, suptitle), path)


def figure_test_error(rows, dataset):
    """Real data: test error (%) against p, the % of remaining parameters of the first two
    weight matrices, one panel without and one with reweighting. `rows` are the results CSV's
    rows of one weights file (a pandas DataFrame); points are means over rounds, bands their
    standard deviation over rounds."""
    summary = (rows.assign(percent=100 * rows.fraction)
               .groupby(["reweighting", "method", "percent"]).test_error
               .agg(["mean", "std"]).reset_index().fillna({"std": 0.0}))
    unpruned = rows.unpruned_test_error.iloc[0]
    low = min(summary["mean"].min(), unpruned) / 1.3
    methods = [m for m in METHOD_STYLE if m in set(summary.method)]
    shift = method_offsets(methods, 0.6)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, rw in zip(axes, (0, 1), strict=True):
        for method in methods:
            s = summary[(summary.reweighting == rw) & (summary.method == method)]
            style = method_style(method)
            xs = s.percent + shift[method]
            band(ax, xs, s["mean"], s["std"], low, color=style["color"])
            ax.plot(xs, s["mean"], ms=4, lw=1.3, alpha=0.9, label=method, **style)
        ax.axhline(unpruned, color="k", ls="--", lw=1, label=f"unpruned ({unpruned:.2f}%)")
        ax.set_yscale("log")
        ax.set_ylim(low, summary["mean"].max() * 1.5)
        percent_axis(ax.yaxis, log=True)
        percent_axis(ax.xaxis)
        ax.set_xlabel("p, remaining parameters of the first two weight matrices")
        ax.set_title(f"{dataset}: {'with' if rw else 'without'} reweighting", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("test error, mean over rounds (band: ± std)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
