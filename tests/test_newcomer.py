"""What a new user meets first: a rank-deficient data set, fast --help, progress in logs."""
import argparse
import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import progress
from data import generate_teacher
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
    import real_data_lib
    import sweep
    from choices import PRUNING_CHOICES, SWEEP_PRESETS, k_range
    assert {name: p.granularity for name, p in dpp_sample_ts.PRUNERS.items()} == PRUNING_CHOICES
    assert tuple(PRUNING_CHOICES) == sweep.ALL_METHODS
    assert set(SWEEP_PRESETS) == set(sweep.PRESETS)
    assert set(PRUNING_CHOICES) == set(real_data_lib.METHODS)
    default = real_data.parse_args([]).fractions
    assert tuple(float(f) for f in default.split(",")) == real_data_lib.FRACTIONS
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
    assert len(lines) == 10, text
    percents = [int(line.split(":")[1].split("%")[0]) for line in lines]
    assert percents == list(range(10, 101, 10))
    assert lines[-1] == "drawing: 100%| 1000/1000 mask [3.0 s]"


def test_progress_of_a_quick_step_in_a_log_is_silent():
    stream, clock = io.StringIO(), FakeClock()
    with progress.Bar(None, "drawing", unit="node", stream=stream, clock=clock) as bar:
        for done in range(1, 7):
            clock.now += 0.3
            bar.update_to(done, 6)
    assert stream.getvalue() == ""


def test_progress_in_a_log_writes_after_the_interval_and_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    with progress.Bar(10**6, "online SGD", unit="sample", unit_scale=True, stream=stream,
                      interval=10.0, clock=clock) as bar:
        for done in range(1, 50):           # 49 small steps, 3 s apart: < 15% in 147 s
            clock.now += 3.0
            bar.update_to(done * 3000)
    lines = stream.getvalue().splitlines()
    # a line each 12 s (the first step past 10 s since the last line), one at the end
    assert len(lines) == 147 // 12 + 1, lines
    assert lines[0] == "online SGD:   1%| 12k/1M sample [12.0 s]"
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
