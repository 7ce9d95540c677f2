"""Figures 1 and 2 draw the N → ∞ theory as lines and the simulation as points, in one colour
and marker per method; a run without theory draws no theory lines; the phase diagram's
winners are the theory's own."""
import os
import shutil

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from dpp_pruning.experiments import figures, plots, study, sweep, theory_rows
from dpp_pruning.theory.expectations import EDGE_METHODS, rescale_order_parameters
from dpp_pruning.theory.pruning_limit import pruned_loss

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


def panels_drawn(run, reweighting):
    """(noise, panel, theory lines, point sets) of each panel of figure 1 (drawn), the figure
    closed once the caller is done with it."""
    fig = figures.figure_loss_vs_budget(run, reweighting)
    try:
        for ax, (noise, panel) in zip(fig.axes, panels(run), strict=True):
            yield (noise, panel, *drawn(ax))
    finally:
        plt.close(fig)


def shown(table, noise, panel, method, reweighting):
    return table[(table.rescale == 1) & (table.noise == noise) & (table.method == method)
                 & (table.student_h_size == panel.student_h_size)
                 & (table.reweighting == reweighting)]


@pytest.mark.parametrize("reweighting", [0, 1])
def test_each_method_is_one_theory_line_and_one_set_of_points_in_its_colour(smoke_run,
                                                                            reweighting):
    results = pd.read_csv(os.path.join(smoke_run.out, "results.csv"))
    for noise, panel, lines, points in panels_drawn(smoke_run, reweighting):
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


@pytest.mark.parametrize("reweighting", [0, 1])
def test_theory_lines_pass_through_the_mean_over_students_of_theory_csv(smoke_run,
                                                                        reweighting):
    theory = pd.read_csv(os.path.join(smoke_run.out, "theory.csv"))
    for noise, panel, lines, _ in panels_drawn(smoke_run, reweighting):
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


# ----------------------------------------------------------------------------------------
# The phase diagram

@pytest.fixture(scope="module")
def diagram():
    return figures.phase_diagram(noises=(0.0, 0.5), student_h_sizes=(3, 6), edge_points=8)


def direct_losses(noise, size):
    """theory_rows.theory_losses of the paper's settings at σ = noise and K = size, for a study
    written out here (not by figures.phase_study), and the trained order parameters."""
    text = f"""
[data]
input_dim = 500
num_data = 800000
teacher_h_sizes = [2]
v_star = 4
noise_levels = [{noise}]
[training]
lr = 0.5
epochs = 1
[[panels]]
student_h_size = {size}
methods = "all"
nodes_kept = {list(range(1, size))}
"""
    chosen = study.parse(text, "phase cell")
    end = theory_rows.trained_order_parameters(chosen, sweep.Dataset(0, noise), size)
    point = (end.q[-1], end.r[-1], end.t, end.v[-1], end.v_star)
    return theory_rows.theory_losses(chosen, chosen.panels[0], *point, noise, 1), point


def test_phase_diagram_winners_are_the_argmin_of_the_theory_losses(diagram):
    rows = diagram.by_noise + diagram.by_size
    assert [(r.noise, r.student_h_size) for r in rows] == [(0.0, 6), (0.5, 6), (0.0, 3),
                                                           (0.0, 6)]
    for row in rows:
        losses, (q, r, t, v, v_star) = direct_losses(row.noise, row.student_h_size)
        for rw in (0, 1):
            for k in range(1, row.student_h_size):
                values = [losses[(m, k, rw)] for m in sweep.ALL_METHODS]
                assert row.columns[rw][k] == sweep.ALL_METHODS[int(np.argmin(values))]
        q, r = rescale_order_parameters(q, r)
        for f, winner in zip(row.fractions, row.edge, strict=True):
            values = [pruned_loss(m, f, q, r, t, v, v_star) for m in EDGE_METHODS]
            assert winner == EDGE_METHODS[int(np.argmin(values))]


def test_phase_diagram_cells_have_the_winners_colours(diagram):
    fig = figures.figure_phase_diagram(diagram)
    main = [ax for ax in fig.axes if any(p.get_gid() for p in ax.patches)]
    assert len(main) == 4
    for ax, (rows, rw) in zip(main, [(diagram.by_noise, 0), (diagram.by_size, 0),
                                     (diagram.by_noise, 1), (diagram.by_size, 1)], strict=True):
        cells = {p.get_gid(): p for p in ax.patches if p.get_gid()}
        assert len(cells) == sum(row.student_h_size - 1 for row in rows)
        for i, row in enumerate(rows):
            for k, method in row.columns[rw].items():
                cell = cells[f"row={i} k={k}"]
                assert matplotlib.colors.to_hex(cell.get_facecolor()) == style(method)[0]
                assert cell.get_x() + cell.get_width() / 2 == pytest.approx(
                    100 * k / row.student_h_size)
    plt.close(fig)


def test_phase_diagram_notebook_saves_its_figure_and_stores_no_machine_folder(root, tmp_path,
                                                                              monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    path = root / "notebooks" / "7_phase_diagram.ipynb"
    stored = "".join(o.get("text", "") for c in nbformat.read(path, as_version=4).cells
                     if c.cell_type == "code" for o in c.outputs)
    assert stored.startswith("saved runs/theory/figures/phase_diagram.png\n")
    assert str(root) not in stored and "/tmp" not in stored
    monkeypatch.setenv("PHASE_OUT", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs)
    assert f"saved {tmp_path / 'figures' / 'phase_diagram.png'}" in text
    assert (tmp_path / "figures" / "phase_diagram.png").read_bytes()[:4] == b"\x89PNG"
