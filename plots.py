"""Figures shared by evaluate.py and the notebooks (matplotlib, no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from storage import atomic_open  # noqa: E402


def heatmap_figure(panels, suptitle=None, vmin=-1.0, vmax=1.0):
    """One annotated heatmap per (title -> 2-D array) panel, side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels.items()):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        if matrix.size <= 64:
            for (i, j), value in _cells(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


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
