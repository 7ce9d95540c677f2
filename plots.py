"""Figures shared by evaluate.py and the notebooks (matplotlib, no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from storage import atomic_open  # noqa: E402


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
    for ax, (title, matrix) in zip(axes.ravel(), panels.items()):
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


def save_figure(fig, path):
    """Write a figure as PNG atomically and close it."""
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_heatmaps(path, panels, suptitle=None):
    save_figure(heatmap_figure(panels, suptitle), path)
