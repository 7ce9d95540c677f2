"""What a new user meets first: a rank-deficient data set, fast --help, progress in logs."""
import argparse
import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from dpp_pruning.base import progress
from dpp_pruning.base.data import generate_teacher
from entry_points import call

# ----------------------------------------------------------------------------------------
# Fewer samples than input dimensions: the Gram matrix is singular and must look it.

def test_gram_of_fewer_samples_than_dimensions_has_their_rank():
    n, p = 50, 30
    teacher = generate_teacher(n, 2, p, seed=3)
    eigvals = np.linalg.eigvalsh(teacher.gram.numpy())              # ascending, (N,)
    # N - P eigenvalues are zero up to float64 rounding of a P-term sum, the rest are not.
    assert np.abs(eigvals[:n - p]).max() < 1e-12 * eigvals[-1]
    assert eigvals[n - p] > 1e-3 * eigvals[-1]
    x = teacher.inputs.double().numpy()                              # (P, N)
    np.testing.assert_allclose(teacher.gram.numpy(), x.T @ x / p, rtol=0, atol=1e-12)


def test_dpp_edge_k_above_the_rank_is_one_sentence(tmp_path):
    d = str(tmp_path)
    teacher = os.path.join(d, "teacher.pkl")
    assert call("teacher_dataset.py", ["--input_dim", 50, "--num_data", 30,
                                       "--teacher_path", teacher])[0] == 0
    common = ["--input_dim", 50, "--student_h_size", 3, "--teacher_path", teacher,
              "--output_dir", d]
    assert call("teacher_student.py", common)[0] == 0
    code, out, err = call("teacher_student.py", common + [
        "--trained_weights", os.path.join(d, "student_3.pth"), "--procedure", "pruning",
        "--pruning_choice", "dpp_edge", "--k", 40, "--num_masks", 2])
    assert code == 2, (out, err)
    assert "--k 40 cannot be drawn by dpp_edge" in err, err
    assert not os.path.exists(os.path.join(d, "student_masks_dpp_edge_3_40.pkl"))


# ----------------------------------------------------------------------------------------
# --help and flag errors come back without loading torch, numba or scipy.

HEAVY = ("torch", "numba", "scipy")
ENTRY_POINTS = {
    "teacher_dataset.py": ["--input_dim", "5", "--num_data", "5", "--teacher_path", "t.pkl"],
    "teacher_student.py": ["--input_dim", "5", "--student_h_size", "3", "--teacher_path", "t.pkl",
                           "--procedure", "pruning", "--pruning_choice", "dpp_node", "--k", "9"],
    "evaluate.py": ["--path_to_student_mask", "m.pkl", "--path_to_teacher", "t.pkl",
                    "--input_dim", "5", "--threshold", "2"],
    "reproduce.py": ["--methods", "dpp_nodes"],
    "real_data.py": ["--rounds", "three"],
}
# Runs a script as __main__ and reports, whatever way it exits, which heavy modules it loaded.
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: sys.__stderr__.write(
    "LOADED " + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n"))
sys.argv = [{script!r}] + {argv!r}
sys.path.insert(0, {root!r})
runpy.run_path({script!r}, run_name="__main__")
"""


def probe(root, tmp_path, script, argv):
    code = PROBE.format(heavy=HEAVY, script=str(root / script), argv=list(argv), root=str(root))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert len(loaded) == 1, done.stderr
    return done, loaded[0].split(" ", 1)[1]


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_loads_no_heavy_module(root, tmp_path, script):
    done, loaded = probe(root, tmp_path, script, ["--help"])
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert loaded == "", f"{script} --help imported {loaded}"


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_flag_error_loads_no_heavy_module(root, tmp_path, script):
    done, loaded = probe(root, tmp_path, script, ENTRY_POINTS[script])
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert loaded == "", f"{script} imported {loaded} before rejecting its flags"
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_shows_every_default(script):
    module = importlib.import_module(script[:-3])
    parser = None
    # The parser each script builds: intercept parse_args to reach it.
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        nonlocal parser
        parser = self
        raise SystemExit

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = " ".join(formatter._expand_help(action).split())
        # the value itself, or a hand-written "(default: all six)" where it is long
        assert f"(default: {action.default})" in shown or "(default: " in shown, \
            f"{script} --help hides the default of {action.option_strings[0]}: {shown!r}"


def test_light_names_agree_with_the_heavy_modules():
    import dpp_sample_ts
    import real_data
    from dpp_pruning.base.choices import IMPORTANCE_RULES, PRUNING_CHOICES, SWEEP_PRESETS, k_range
    from dpp_pruning.experiments import sweep
    from dpp_pruning.real_data import first_layer_pruning, real_data_sweep
    assert {name: p.granularity for name, p in dpp_sample_ts.PRUNERS.items()} == PRUNING_CHOICES
    assert IMPORTANCE_RULES == dpp_sample_ts.IMPORTANCE_RULES
    assert tuple(PRUNING_CHOICES) == sweep.ALL_METHODS
    from dpp_pruning.experiments import study
    names = {n[:-5] for n in os.listdir(study.STUDIES_DIR) if n.endswith(".toml")}
    assert names >= set(SWEEP_PRESETS)
    assert all(study.preset(name).name == name for name in SWEEP_PRESETS)
    assert set(PRUNING_CHOICES) == set(first_layer_pruning.METHODS)
    default = real_data.parse_args([]).fractions
    assert tuple(float(f) for f in default.split(",")) == real_data_sweep.FRACTIONS
    for choice in PRUNING_CHOICES:
        assert k_range(choice, 50, 6) == dpp_sample_ts.k_range(choice, 50, 6)


# ----------------------------------------------------------------------------------------
# Progress: plain lines, no carriage returns, when stderr is not a terminal.

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_one_line_per_tenth_and_no_carriage_return():
    stream, clock = io.StringIO(), FakeClock()
    with progress.Bar(1000, "drawing", unit="mask", stream=stream, quiet=0, clock=clock) as bar:
        for _ in range(1000):
            clock.now += 0.003
            bar.update()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 11, text
    percents = [int(line.split(":")[1].split("%")[0]) for line in lines]
    assert percents == list(range(0, 101, 10))
    assert lines[-1] == "drawing: 100%| 1000/1000 mask [3.0 s]"


def test_progress_of_a_quick_step_in_a_log_is_its_start_and_its_end():
    stream, clock = io.StringIO(), FakeClock()
    with progress.Bar(None, "drawing", unit="node", stream=stream, clock=clock) as bar:
        for done in range(1, 7):
            clock.now += 0.3
            bar.update_to(done, 6)
    assert stream.getvalue().splitlines() == ["drawing:   ?%| 0/? node [0.0 s]",
                                              "drawing: 100%| 6/6 node [1.8 s]"]


def test_progress_in_a_log_writes_after_the_interval_and_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    with progress.Bar(10**6, "online SGD", unit="sample", unit_scale=True, stream=stream,
                      interval=10.0, clock=clock) as bar:
        for done in range(1, 50):           # 49 small steps, 3 s apart: < 15% in 147 s
            clock.now += 3.0
            bar.update_to(done * 3000)
    lines = stream.getvalue().splitlines()
    # the start, a line each 12 s (the first step past 10 s since the last), the end
    assert len(lines) == 1 + 147 // 12 + 1, lines
    assert lines[:2] == ["online SGD:   0%| 0/1M sample [0.0 s]",
                         "online SGD:   1%| 12k/1M sample [12.0 s]"]
    assert lines[-1] == "online SGD:  15%| 147k/1M sample [147.0 s]"


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with progress.Bar(4, "testing", unit="mask", stream=stream) as bar:
        for _ in range(4):
            bar.update()
    assert "\r" in stream.getvalue() and "4/4" in stream.getvalue()


# ----------------------------------------------------------------------------------------
# Figures: readable heatmap numbers, intervals across students, no surprise long runs.

def test_heatmap_numbers_are_white_on_dark_cells_and_black_on_light_ones():
    import matplotlib

    from dpp_pruning.experiments import plots
    cmap = matplotlib.colormaps["RdBu_r"]
    assert plots.text_colour(cmap(0.0)) == "white"      # dark blue, R = -1
    assert plots.text_colour(cmap(1.0)) == "white"      # dark red, Q = 1
    assert plots.text_colour(cmap(0.5)) == "black"      # white, 0
    assert plots.text_colour((1.0, 1.0, 0.0, 1.0)) == "black"   # yellow is light


def test_heatmaps_name_their_axes(tmp_path):
    from dpp_pruning.experiments import plots
    fig = plots.heatmap_figure({"Q unpruned": np.eye(3), "R unpruned": np.ones((3, 2))})
    q, r = fig.axes[:2]
    assert (q.get_xlabel(), q.get_ylabel()) == ("student node j", "student node i")
    assert (r.get_xlabel(), r.get_ylabel()) == ("teacher node n", "student node i")
    plots.save_figure(fig, str(tmp_path / "h.png"))


def results(students, rounds, loss):
    """A results table of one cell: loss(student, round) for every student and round, beside
    rows of the other rescaling and another teacher size that must never be shown."""
    import pandas as pd
    rows = [dict(noise=0.0, student_h_size=6, method="dpp_node", reweighting=0, k=3,
                 nodes_equivalent=3, fraction_kept=0.5, round=r, test_loss=loss(s, r),
                 predicted_loss=loss(s, r), unpruned_test_loss=0.1 * (s + 1), student=s,
                 rescale=rescale, teacher_h_size=m)
            for s in range(students) for r in range(rounds) for rescale in (0, 1) for m in (2, 4)]
    df = pd.DataFrame(rows)
    df.loc[(df.rescale == 0) | (df.teacher_h_size == 4), "test_loss"] = 1e6
    return df


def run_of(df):
    """The parts of a figures.Run that figures.selected_rows reads."""
    import types
    return types.SimpleNamespace(df=df, preset=types.SimpleNamespace(teacher_h_size=2))


def test_points_are_means_over_students_with_t_intervals_across_them():
    import scipy.stats

    from dpp_pruning.experiments import figures
    df = figures.selected_rows(run_of(results(4, 3, lambda s, r: 1.0 + s + 0.1 * r)))
    row = figures._summary(df).iloc[0]
    per_student = np.array([1.1, 2.1, 3.1, 4.1])            # each student's mean over rounds
    assert row["mean"] == pytest.approx(per_student.mean())
    half = scipy.stats.t.ppf(0.975, 3) * per_student.std(ddof=1) / 2
    assert row["ci"] == pytest.approx(half)
    assert row["unpruned"] == pytest.approx(0.25)


def test_with_one_student_the_intervals_are_across_rounds():
    import scipy.stats

    from dpp_pruning.experiments import figures
    df = figures.selected_rows(run_of(results(1, 5, lambda s, r: 2.0 + r)))
    row = figures._summary(df).iloc[0]
    assert row["mean"] == pytest.approx(4.0)
    assert row["ci"] == pytest.approx(scipy.stats.t.ppf(0.975, 4) * np.sqrt(2.5 / 5))


class Smoke:
    def __init__(self):
        self.calls = []

    def __call__(self, study_, out):
        self.calls.append((study_.name, out))
        os.makedirs(out)
        results(2, 2, lambda s, r: 1.0).to_csv(os.path.join(out, "results.csv"), index=False)
        from dpp_pruning.experiments import study
        study.claim_folder(study.preset("smoke"), out)


def test_notebook_without_results_runs_only_the_smoke_preset_and_says_so(tmp_path, monkeypatch):
    from dpp_pruning.experiments import figures, runner
    monkeypatch.delenv("REPRO_OUT", raising=False)
    monkeypatch.delenv("REPRO_PRESET", raising=False)
    monkeypatch.setattr(figures, "ROOT", str(tmp_path))
    smoke = Smoke()
    monkeypatch.setattr(runner, "run", smoke)
    run = figures.load_run()
    assert smoke.calls == [("smoke", str(tmp_path / "runs" / "smoke"))]
    text = run.describe()
    assert "folder runs/smoke" in text                   # relative to the repository
    assert "smoke preset" in text and f"--preset paper --out {tmp_path / 'runs' / 'paper'}" in text
    figures.load_run()                   # the smoke run is reused, not run again
    assert len(smoke.calls) == 1


@pytest.mark.parametrize("env", [{"REPRO_PRESET": "paper"}, {"REPRO_OUT": "elsewhere"}])
def test_notebook_pointed_at_a_missing_run_stops_with_the_command(tmp_path, monkeypatch, env):
    from dpp_pruning.experiments import figures, runner
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REPRO_OUT", raising=False)
    monkeypatch.delenv("REPRO_PRESET", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(figures, "ROOT", str(tmp_path))
    monkeypatch.setattr(runner, "run", Smoke())
    with pytest.raises(figures.NoResults, match=r"holds no results.csv: run `python3 .*"
                                                 r"reproduce.py --preset paper --out /"):
        figures.load_run()
    assert runner.run.calls == []


def test_figure_one_has_two_panels_a_row_and_its_legend_outside_them(tmp_path):
    from dpp_pruning.experiments import figures
    out = tmp_path / "run"
    from dpp_pruning.experiments import study
    Smoke()(study.preset("smoke"), str(out))
    run = figures.Run(str(out))
    fig = figures.figure_loss_vs_budget(run)
    fig.canvas.draw()
    columns = {round(ax.get_position().x0, 3) for ax in fig.axes}
    assert len(columns) <= 2
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent())


def test_entry_points_log_progress_without_carriage_returns(tmp_path):
    d = str(tmp_path)
    teacher = os.path.join(d, "teacher.pkl")
    code, _, err = call("teacher_dataset.py", ["--input_dim", 10, "--num_data", 2000,
                                               "--teacher_path", teacher])
    assert code == 0 and "\r" not in err
    assert err.splitlines()[0].startswith("generating:   0%| 0/2.2k sample")
    assert err.splitlines()[-1].startswith("generating: 100%| 2.2k/2.2k sample")
    common = ["--input_dim", 10, "--student_h_size", 3, "--teacher_path", teacher,
              "--output_dir", d]
    code, _, err = call("teacher_student.py", common)
    assert code == 0 and "\r" not in err and "online SGD: 100%| 2k/2k sample" in err
    code, _, err = call("teacher_student.py", common + [
        "--trained_weights", os.path.join(d, "student_3.pth"), "--procedure", "pruning",
        "--pruning_choice", "dpp_edge", "--k", 4, "--num_masks", 3])
    assert code == 0 and "\r" not in err and "drawing 3 dpp_edge masks: 100%| 3/3 node" in err
    code, out, err = call("teacher_student.py", common + [
        "--procedure", "testing", "--pruning_choice", "dpp_edge", "--k", 4])
    assert code == 0 and "\r" not in err
    assert "testing 3 masks, then their expected loss: 100%" in err
    assert "pruned MLP avg. test loss" in out
