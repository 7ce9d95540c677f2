"""Figures 1 and 2 draw the N → ∞ theory as lines and the simulation as points, in one colour
and marker per method; a run without theory draws no theory lines."""
import os
import shutil

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from dpp_pruning.experiments import figures, plots, sweep
from dpp_pruning.theory.expectations import EDGE_METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "smoke_run")


def colour(artist):
    return matplotlib.colors.to_hex(artist.get_color())


def style(method):
    c, marker = plots.METHOD_STYLE[method]
    return matplotlib.colors.to_hex(c), marker


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The committed smoke run with the theory unit files its theory.csv was made from (the
    ODEs' end points, which the fixture does not carry), written again by sweep.run_theory."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    shutil.copytree(FIXTURE, out)
    preset = figures.Run(str(out)).preset
    for unit in sweep.theories(preset):
        sweep.run_theory(preset, sweep.Folder(str(out), "test"), unit)
    return figures.Run(str(out))


def drawn(ax):
    """{method: theory lines} and {method: point sets (ErrorbarContainer)} of one panel."""
    lines, points = {}, {}
    for line in ax.get_lines():
        if line.get_label().endswith(": " + figures.THEORY):
            lines.setdefault(line.get_label().split(": ")[0], []).append(line)
    for container in ax.containers:
        if container.get_label().endswith(": " + figures.SIMULATION):
            points.setdefault(container.get_label().split(": ")[0], []).append(container)
    return lines, points


def panels(run):
    return [(noise, p) for p in run.preset.panels for noise in run.preset.noise_levels]


def shown(table, noise, panel, method, reweighting):
    return table[(table.rescale == 1) & (table.noise == noise) & (table.method == method)
                 & (table.student_h_size == panel.student_h_size)
                 & (table.reweighting == reweighting)]


@pytest.mark.parametrize("reweighting", [0, 1])
def test_each_method_is_one_theory_line_and_one_set_of_points_in_its_colour(smoke_run,
                                                                            reweighting):
    results = pd.read_csv(os.path.join(smoke_run.out, "results.csv"))
    fig = figures.figure_loss_vs_budget(smoke_run, reweighting)
    for ax, (noise, panel) in zip(fig.axes, panels(smoke_run), strict=True):
        lines, points = drawn(ax)
        assert sorted(lines) == sorted(points) == sorted(panel.methods)
        for method in panel.methods:
            (line,), (bars,) = lines[method], points[method]
            data, _, (errors,) = bars.lines
            assert (colour(line), line.get_marker()) == (style(method)[0], "None")
            assert line.get_linestyle() == "-"
            assert (colour(data), data.get_marker()) == style(method)
            assert data.get_linestyle() == "None"            # points, not joined
            assert matplotlib.colors.to_hex(errors.get_colors()[0]) == style(method)[0]
            # the points: mean over students of each student's mean over rounds
            rows = shown(results, noise, panel, method, reweighting)
            means = rows.groupby(["fraction_kept", "student"]).test_loss.mean() \
                .groupby("fraction_kept").mean()
            assert len(errors.get_segments()) == len(means)
            np.testing.assert_allclose(np.sort(data.get_ydata()), np.sort(means.to_numpy()),
                                       rtol=1e-12)
    plt.close(fig)


@pytest.mark.parametrize("reweighting", [0, 1])
def test_theory_lines_pass_through_the_mean_over_students_of_theory_csv(smoke_run,
                                                                        reweighting):
    theory = pd.read_csv(os.path.join(smoke_run.out, "theory.csv"))
    fig = figures.figure_loss_vs_budget(smoke_run, reweighting)
    for ax, (noise, panel) in zip(fig.axes, panels(smoke_run), strict=True):
        lines, _ = drawn(ax)
        for method in panel.methods:
            xs, ys = (np.asarray(a, dtype=float) for a in lines[method][0].get_data())
            means = shown(theory, noise, panel, method, reweighting) \
                .groupby("fraction_kept").theory.mean()
            assert len(means) == len(panel.node_budgets)
            for fraction, mean in means.items():
                at = np.flatnonzero(np.isclose(xs, 100 * fraction, rtol=0, atol=1e-9))
                assert len(at) == 1, (method, fraction)
                assert ys[at[0]] == pytest.approx(mean, rel=1e-9), (noise, method, fraction)
            if method in EDGE_METHODS:                  # smooth: a fine grid of f
                assert len(xs) > 10 * len(means) and np.all(np.diff(xs) > 0)
            else:                                       # whole node counts only
                assert len(xs) == len(means)
    plt.close(fig)


def test_figure_two_lines_sit_at_whole_node_counts(smoke_run):
    theory = pd.read_csv(os.path.join(smoke_run.out, "theory.csv"))
    fig = figures.figure_node_methods(smoke_run, 1)
    panel = smoke_run.preset.panels[0]
    for ax, noise in zip(fig.axes, smoke_run.preset.noise_levels, strict=True):
        lines, points = drawn(ax)
        assert sorted(lines) == sorted(points) == ["dpp_node", "importance_node",
                                                   "random_node"]
        for method, (line,) in lines.items():
            means = shown(theory, noise, panel, method, 1).groupby("k").theory.mean()
            np.testing.assert_array_equal(line.get_xdata(), means.index.to_numpy())
            np.testing.assert_allclose(line.get_ydata(), means.to_numpy(), rtol=1e-12)
            xs = np.asarray(points[method][0].lines[0].get_xdata(), dtype=float)
            assert np.all(np.abs(xs - np.round(xs)) < 0.1)    # beside the budget, shifted
    plt.close(fig)


def test_error_bars_stay_on_the_log_axis(smoke_run):
    fig, ax = plt.subplots()
    figures.plot_loss_vs_budget(smoke_run, ax, 0.25, 6)
    low, _ = ax.get_ylim()
    for _, (bars,) in drawn(ax)[1].items():
        ends = np.concatenate([s[:, 1] for s in bars.lines[2][0].get_segments()])
        assert ends.min() >= low * (1 - 1e-9) and ends.min() > 0
    plt.close(fig)


@pytest.mark.parametrize("theory", ["missing", "empty"])
def test_a_run_without_theory_draws_no_theory_lines(tmp_path, theory):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    if theory == "missing":                      # a folder of an earlier release
        os.remove(out / "theory.csv")
    else:                                        # --theory none
        pd.read_csv(out / "theory.csv").iloc[:0].to_csv(out / "theory.csv", index=False)
    run = figures.Run(str(out))
    assert not figures.has_theory(run)
    fig = figures.figure_loss_vs_budget(run)
    for ax, (_, panel) in zip(fig.axes, panels(run), strict=True):
        lines, points = drawn(ax)
        assert lines == {} and sorted(points) == sorted(panel.methods)
        for (bars,) in points.values():
            assert bars.lines[0].get_linestyle() == "-"      # the points are joined instead
    assert "no N → ∞ theory" in fig.legends[0].get_title().get_text()
    assert "has no N → ∞ theory" in figures.error_bar_caption(run)
    plt.close(fig)


def test_the_legend_says_what_lines_and_points_are(smoke_run):
    fig = figures.figure_loss_vs_budget(smoke_run)
    assert fig.legends[0].get_title().get_text() == (
        "lines: N → ∞ theory; points: simulation, mean over 2 students, 95% interval")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["unpruned"] + list(sweep.ALL_METHODS)     # one entry per method
    caption = figures.error_bar_caption(smoke_run)
    assert caption.startswith("Lines: the N → ∞ theory") and "lack" not in caption
    assert "lacks the theory unit files" in figures.error_bar_caption(figures.Run(FIXTURE))
    plt.close(fig)
