"""The paper's teacher-student figures, drawn from a reproduce.py run folder.

The notebooks in notebooks/ are thin: they call `load_run` and one plotting function per
figure. The run folder defaults to runs/<preset>, with the preset taken from the
environment variable REPRO_PRESET (default `paper`) and the folder from REPRO_OUT; a folder
without results.csv is filled by running reproduce.py's grid first.
"""
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import reproduce
import sweep
from order_params import NotSpecialised, block_order, generalisation_error, random_edge_expected

ROOT = os.path.dirname(os.path.abspath(__file__))
STYLE = {"dpp_node": ("C0", "o"), "dpp_edge": ("C1", "s"), "random_node": ("C2", "^"),
         "random_edge": ("C3", "v"), "importance_node": ("C4", "D"),
         "importance_edge": ("C5", "P")}


class Run:
    """A reproduce.py output folder: results.csv as a DataFrame, the preset, the cells."""

    def __init__(self, out):
        self.out = out
        with open(os.path.join(out, "preset.json")) as f:
            self.record = json.load(f)
        self.preset_name = self.record["preset"]
        self.preset = sweep.PRESETS[self.preset_name]
        self.df = pd.read_csv(os.path.join(out, "results.csv"))

    def describe(self):
        r = self.record
        return (f"preset '{self.preset_name}': N = {r['input_dim']}, P = {r['num_data']}, "
                f"{r['rounds']} rounds x {r['num_masks']} masks per cell, seed {r['seed']}, "
                f"folder {os.path.relpath(self.out, ROOT)}")

    def cell(self, noise, student_h_size, method, k):
        return np.load(sweep.cell_path(self.out, sweep.Cell(float(noise), student_h_size,
                                                            method, k, 0)))


def load_run(out=None, preset=None):
    """The run in `out` (default: $REPRO_OUT or runs/<preset>), computed first if missing."""
    preset = preset or os.environ.get("REPRO_PRESET", "paper")
    out = out or os.environ.get("REPRO_OUT") or os.path.join(ROOT, "runs", preset)
    if not os.path.exists(os.path.join(out, "results.csv")):
        reproduce.main(["--preset", preset, "--out", out])
    return Run(out)


def _summary(df):
    """Mean and std over rounds of every (method, k) cell."""
    keys = ["method", "k", "nodes_equivalent", "fraction_kept"]
    return df.groupby(keys, as_index=False).agg(
        mean=("test_loss", "mean"), std=("test_loss", "std"),
        predicted=("predicted_loss", "mean"), unpruned=("unpruned_test_loss", "first"))


def plot_loss_vs_budget(run, ax, noise, student_h_size, reweighting=0, methods=None,
                        x="fraction_kept"):
    """Average test loss against parameters kept (%), error bars over rounds."""
    df = run.df[(run.df.noise == noise) & (run.df.student_h_size == student_h_size)
                & (run.df.reweighting == reweighting)]
    summary = _summary(df)
    for method in methods or sweep.ALL_METHODS:
        part = summary[summary.method == method].sort_values(x)
        if part.empty:
            continue
        color, marker = STYLE[method]
        xs = part[x] * (100 if x == "fraction_kept" else 1)
        ax.errorbar(xs, part["mean"], yerr=part["std"].fillna(0), color=color, marker=marker,
                    capsize=3, label=method)
    if not summary.empty:
        ax.axhline(summary.unpruned.iloc[0], color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("% of parameters kept" if x == "fraction_kept" else "hidden nodes kept")
    ax.set_ylabel("test loss")
    ax.set_yscale("log")
    ax.set_title(f"K = {student_h_size}, $\\sigma$ = {noise:g}"
                 + (", reweighted" if reweighting else ""), fontsize=10)
    ax.legend(fontsize=7)


def figure_loss_vs_budget(run, reweighting=0):
    """Figure 1: both noise levels for K = 6 (six methods) and the K = 20 panel."""
    panels = [(noise, p) for p in run.preset.panels for noise in run.preset.noise_levels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (noise, panel) in zip(axes[0], panels):
        plot_loss_vs_budget(run, ax, noise, panel.student_h_size, reweighting, panel.methods)
    fig.tight_layout()
    return fig


def figure_node_methods(run, reweighting=0):
    """Figure 2: the node methods against hidden nodes kept, K = 6."""
    noises = run.preset.noise_levels
    fig, axes = plt.subplots(1, len(noises), figsize=(4.6 * len(noises), 3.8), squeeze=False)
    student_h_size = run.preset.panels[0].student_h_size
    for ax, noise in zip(axes[0], noises):
        plot_loss_vs_budget(run, ax, noise, student_h_size, reweighting,
                            ("dpp_node", "random_node", "importance_node"), x="k")
    fig.tight_layout()
    return fig


def figure_heatmaps(run, method, noise=0.0, reweighting=0):
    """Figure 3: expected Q and R after pruning, block-diagonal order, across budgets."""
    panel = run.preset.panels[0]
    ks = [c.k for c in sweep.grid(run.preset, [method])
          if c.noise == noise and c.student_h_size == panel.student_h_size]
    fig, axes = plt.subplots(2, len(ks) + 1, figsize=(2.3 * (len(ks) + 1), 4.6), squeeze=False)
    with run.cell(noise, panel.student_h_size, method, ks[0]) as z:
        q, r = z["unpruned_q"], z["unpruned_r"]
    try:
        order, _ = block_order(r)
        title = "block-diagonal order"
    except NotSpecialised as e:
        order, title = np.arange(len(q)), f"students' own order ({e})"
    columns = [("unpruned", q, r)]
    for k in ks:
        with run.cell(noise, panel.student_h_size, method, k) as z:
            tags = [f"rw{reweighting}_round{i}" for i in range(run.preset.rounds)]
            columns.append((f"k = {k}", np.mean([z[f"eq_{t}"] for t in tags], axis=0),
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
    fig.suptitle(f"{method}, K = {panel.student_h_size}, $\\sigma$ = {noise:g}; {title}",
                 fontsize=10)
    return fig


def figure_theory_vs_simulation(run):
    """Figure 4a: predicted against measured test loss, every cell and round."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for method, part in run.df.groupby("method"):
        color, marker = STYLE[method]
        ax.scatter(part.predicted_loss, part.test_loss, s=12, color=color, marker=marker,
                   label=method, alpha=0.7)
    lo = min(run.df.predicted_loss.min(), run.df.test_loss.min())
    hi = max(run.df.predicted_loss.max(), run.df.test_loss.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="theory = simulation")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"predicted: $\epsilon_g(Q, R, T) + \sigma^2/2$")
    ax.set_ylabel("measured test loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def random_edge_curve(run, noise, student_h_size, fractions):
    """Closed-form loss of random_edge pruning against the fraction f of edges kept, from
    the unpruned student's order parameters; None if the student has not specialised."""
    cell = next(c for c in sweep.grid(run.preset) if c.noise == noise
                and c.student_h_size == student_h_size)   # any cell stores the unpruned student
    with run.cell(noise, student_h_size, cell.method, cell.k) as z:
        q, r, t, v, v_star = (z[name] for name in ("unpruned_q", "unpruned_r", "t", "v", "v_star"))
    try:
        block_order(r)
    except NotSpecialised:
        return None
    return np.array([generalisation_error(*random_edge_expected(q, r, f)[:2], t, v, v_star)
                     for f in fractions]) + 0.5 * noise ** 2


def figure_random_edge_closed_form(run):
    """Figure 4b: random_edge measured against the closed form in the fraction kept."""
    panels = [(noise, p.student_h_size) for p in run.preset.panels for noise in run.preset.noise_levels
              if "random_edge" in p.methods]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    fractions = np.linspace(0.01, 1.0, 100)
    for ax, (noise, student_h_size) in zip(axes[0], panels):
        df = run.df[(run.df.noise == noise) & (run.df.student_h_size == student_h_size)
                    & (run.df.method == "random_edge") & (run.df.reweighting == 0)]
        f = df.k / run.preset.input_dim
        ax.scatter(f, df.test_loss, s=14, color=STYLE["random_edge"][0], label="measured")
        curve = random_edge_curve(run, noise, student_h_size, fractions)
        if curve is None:
            ax.set_title(f"K = {student_h_size}, $\\sigma$ = {noise:g}: not specialised", fontsize=9)
        else:
            ax.plot(fractions, curve, "k-", lw=1, label="closed form")
            ax.set_title(f"K = {student_h_size}, $\\sigma$ = {noise:g}", fontsize=10)
        ax.set_xlabel("fraction of edges kept f = k / N")
        ax.set_ylabel("test loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
