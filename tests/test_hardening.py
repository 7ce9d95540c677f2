"""Bad input, reproducibility and random abuse of the three entry points.

Every user mistake must end as exit status 2 with one line on stderr naming the flag or file,
no traceback, and no output file created or modified. Most calls run `main(argv)` in-process
through `cli.run` (a subprocess costs ~3 s of imports); a few run the real scripts.
"""
import hashlib
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dpp_pruning.base import storage
from entry_points import call

N, P, K = 10, 2000, 3
NODE_K, EDGE_K = 2, 4


# ----------------------------------------------------------------------------------------
# Helpers

def run_script(root, cwd, script, *argv, timeout=120):
    """The real script in a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(root / script), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder):
    """{relative path: sha1} of every file under `folder`, hidden ones included."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


def error_lines(err):
    """stderr without the progress bars of work done before a late error."""
    return [line for line in err.strip().splitlines() if "%|" not in line]


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert ": error: " in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def ts_args(d, *extra, teacher="teacher.pkl"):
    return ["--input_dim", N, "--student_h_size", K, "--teacher_path", os.path.join(d, teacher),
            "--output_dir", d, *extra]


def prune_args(d, choice="dpp_node", k=NODE_K, *extra):
    return ts_args(d, "--trained_weights", os.path.join(d, f"student_{K}.pth"), "--procedure",
                   "pruning", "--pruning_choice", choice, "--k", k, "--num_masks", 5, *extra)


def args_testing(d, choice="dpp_node", k=NODE_K, *extra):
    return ts_args(d, "--procedure", "testing", "--pruning_choice", choice, "--k", k, *extra)


def eval_args(d, masks=f"student_masks_dpp_node_{K}_{NODE_K}.pkl", *extra):
    return ["--path_to_student_mask", os.path.join(d, masks), "--path_to_teacher",
            os.path.join(d, "teacher.pkl"), "--input_dim", N, "--output_dir", d, *extra]


def make_good_files(d):
    """teacher, student, dpp_node and dpp_edge masks, dpp_edge kernels, all in `d`."""
    assert call("teacher_dataset.py", ["--input_dim", N, "--num_data", P, "--teacher_path",
                                       os.path.join(d, "teacher.pkl")])[0] == 0
    assert call("teacher_student.py", ts_args(d))[0] == 0
    assert call("teacher_student.py", prune_args(d))[0] == 0
    assert call("teacher_student.py", prune_args(d, "dpp_edge", EDGE_K))[0] == 0


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("good"))
    make_good_files(d)
    return d


def fresh_copy(good, dest):
    for name in os.listdir(good):
        shutil.copy(os.path.join(good, name), dest)
    return str(dest)


# ----------------------------------------------------------------------------------------
# Setups that damage one file of a good set (in folder d)

def truncate(name, keep=0.5):
    def setup(d):
        path = os.path.join(d, name)
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[:int(len(data) * keep)])
    return setup


def flip(name):
    def setup(d):
        path = os.path.join(d, name)
        data = bytearray(pathlib.Path(path).read_bytes())
        data[len(data) // 2] ^= 0x10
        pathlib.Path(path).write_bytes(bytes(data))
    return setup


def write(name, content):
    def setup(d):
        with open(os.path.join(d, name), "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    return setup


def append(name, content):
    def setup(d):
        with open(os.path.join(d, name), "ab") as f:
            f.write(content)
    return setup


def edit_teacher(change):
    def setup(d):
        path = os.path.join(d, "teacher.pkl")
        teacher = storage.load_pickle(path)
        change(teacher)
        storage.save_pickle(teacher, path)
    return setup


def edit_masks(change, name=f"student_masks_dpp_node_{K}_{NODE_K}.pkl"):
    def setup(d):
        path = os.path.join(d, name)
        student, masks = storage.load_pickle(path)
        change(student, masks)
        storage.save_pickle((student, masks), path)
    return setup


def edit_weights(change):
    def setup(d):
        path = os.path.join(d, f"student_{K}.pth")
        state = torch.load(path, weights_only=True)
        state = change(state)
        torch.save(state, path)
    return setup


def mkdir(name):
    return lambda d: os.makedirs(os.path.join(d, name))


def rank_one_student(student, masks):
    """Every hidden node of the masks file's student made ± the first (rows keep their
    norm): its dpp_node kernel W G W^T has rank 1, below the masks' k = NODE_K."""
    w = student.w1.weight.data                                               # (K, N)
    signs = 1.0 - 2.0 * (torch.arange(len(w)) % 2)                            # (K,) ±1
    w.copy_(signs[:, None] * w[:1])


def other_student(d):
    """Replace the trained student by one trained from another --seed."""
    os.makedirs(os.path.join(d, "other"))
    argv = ts_args(d)[:-1] + [os.path.join(d, "other"), "--seed", 5]
    assert call("teacher_student.py", argv)[0] == 0
    os.replace(os.path.join(d, "other", WEIGHTS), os.path.join(d, WEIGHTS))


def set_nan(tensor_name, index=(0, 0)):
    def change(teacher):
        getattr(teacher, tensor_name)[index] = float("nan")
    return change


MASKS = f"student_masks_dpp_node_{K}_{NODE_K}.pkl"
WEIGHTS = f"student_{K}.pth"
TD = "teacher_dataset.py"
TS = "teacher_student.py"
EV = "evaluate.py"


def td_args(d, *extra, path="new.pkl", n=N, num=P):
    return ["--input_dim", n, "--num_data", num, "--teacher_path", os.path.join(d, path), *extra]


# (id, setup or None, script, argv builder (folder -> argv), fragments the one line must contain)
BAD_INPUTS = [
    ("td input_dim 0", None, TD, lambda d: td_args(d, n=0), ["--input_dim", "positive"]),
    ("td input_dim -3", None, TD, lambda d: td_args(d, n=-3), ["--input_dim"]),
    ("td num_data 5", None, TD, lambda d: td_args(d, num=5), ["--num_data 5", "test set"]),
    ("td num_data 0", None, TD, lambda d: td_args(d, num=0), ["--num_data"]),
    ("td memory", None, TD, lambda d: td_args(d, n=500, num=10**9),
     ["--num_data 1000000000", "GiB of memory", "smaller values"]),
    ("td teacher_h_size 0", None, TD, lambda d: td_args(d, "--teacher_h_size", 0),
     ["--teacher_h_size"]),
    ("td sig_w nan", None, TD, lambda d: td_args(d, "--sig_w", "nan"), ["--sig_w", "finite"]),
    ("td sig_w negative", None, TD, lambda d: td_args(d, "--sig_w", -1), ["--sig_w"]),
    ("td v_star inf", None, TD, lambda d: td_args(d, "--v_star", "inf"), ["--v_star"]),
    ("td mode", None, TD, lambda d: td_args(d, "--mode", "committee"), ["--mode"]),
    ("td seed negative", None, TD, lambda d: td_args(d, "--seed", -1), ["--seed"]),
    ("td seed huge", None, TD, lambda d: td_args(d, "--seed", 2**70), ["--seed"]),
    ("td device tpu", None, TD, lambda d: td_args(d, "--device", "tpu"), ["--device"]),
    ("td path is a folder", mkdir("sub"), TD, lambda d: td_args(d, path="sub"),
     ["--teacher_path", "folder"]),
    ("td path under a file", None, TD, lambda d: td_args(d, path="teacher.pkl/t.pkl"),
     ["--teacher_path", "not a folder"]),
    ("td path empty", None, TD, lambda d: ["--input_dim", N, "--num_data", P,
                                          "--teacher_path", ""], ["--teacher_path"]),
    ("td path in /proc", None, TD, lambda d: td_args(d, path="/proc/teacher.pkl"),
     ["--teacher_path", "not writable"]),
    ("ts procedure", None, TS, lambda d: ts_args(d, "--procedure", "train"), ["--procedure"]),
    ("ts nonlinearity", None, TS, lambda d: ts_args(d, "--nonlinearity", "tanh"),
     ["--nonlinearity"]),
    ("ts mode", None, TS, lambda d: ts_args(d, "--mode", "soft"), ["--mode"]),
    ("ts lr nan", None, TS, lambda d: ts_args(d, "--lr", "nan"), ["--lr"]),
    ("ts epoch 0", None, TS, lambda d: ts_args(d, "--epoch", 0), ["--epoch"]),
    ("ts momentum 1", None, TS, lambda d: ts_args(d, "--momentum", 1), ["--momentum"]),
    ("ts input_dim mismatch", None, TS, lambda d: ts_args(d)[:1] + [20] + ts_args(d)[2:],
     ["teacher file", "input dimension 10", "--input_dim is 20"]),
    ("ts teacher missing", None, TS, lambda d: ts_args(d, teacher="nope.pkl"),
     ["teacher file", "does not exist"]),
    ("ts teacher is a folder", mkdir("tdir"), TS, lambda d: ts_args(d, teacher="tdir"),
     ["teacher file", "folder"]),
    ("ts teacher empty", write("teacher.pkl", b""), TS, ts_args, ["teacher file", "empty"]),
    ("ts teacher truncated", truncate("teacher.pkl"), TS, ts_args, ["teacher file"]),
    ("ts teacher flipped", flip("teacher.pkl"), TS, ts_args, ["teacher file", "corrupted"]),
    ("ts teacher checksum cut", truncate("teacher.pkl", keep=0.9999), TS, ts_args,
     ["teacher file", "truncated"]),
    ("ts teacher garbage appended", append("teacher.pkl", b"xyz"), TS, ts_args,
     ["teacher file", "corrupted"]),
    ("ts teacher is a dict", write("teacher.pkl", pickle.dumps({"a": 1})), TS, ts_args,
     ["teacher file", "does not hold a teacher"]),
    ("ts teacher is masks", None, TS, lambda d: ts_args(d, teacher=MASKS),
     ["teacher file", "does not hold a teacher"]),
    ("ts teacher is text", write("teacher.pkl", "hello\n"), TS, ts_args, ["teacher file"]),
    ("ts teacher NaN input", edit_teacher(set_nan("inputs")), TS, ts_args,
     ["teacher file", "non-finite", "inputs"]),
    ("ts teacher inf label", edit_teacher(set_nan("test_labels", 3)), TS, ts_args,
     ["teacher file", "non-finite"]),
    ("ts teacher no test set", edit_teacher(lambda t: setattr(t, "test_labels", t.test_labels[:0])),
     TS, ts_args, ["teacher file"]),
    ("ts output_dir is a file", None, TS, lambda d: ts_args(d)[:-1] + [os.path.join(d, MASKS)],
     ["--output_dir", "not a folder"]),
    ("ts output_dir in /proc", None, TS, lambda d: ts_args(d)[:-1] + ["/proc/out"],
     ["--output_dir", "not writable"]),
    ("ts output over teacher", None, TS, lambda d: ts_args(d, teacher=WEIGHTS),
     ["--teacher_path"]),
    ("ts diverges", None, TS, lambda d: ts_args(d, "--lr", 1e7), ["diverged", "--lr"]),
    ("pr choice", None, TS, lambda d: prune_args(d, "dpp"), ["--pruning_choice"]),
    ("pr k negative", None, TS, lambda d: prune_args(d, "dpp_node", -1),
     ["--k -1", "hidden nodes"]),
    ("pr k 0", None, TS, lambda d: prune_args(d, "random_node", 0), ["--k 0"]),
    ("pr k nodes > K", None, TS, lambda d: prune_args(d, "dpp_node", K + 1),
     ["--k 4", "--student_h_size 3"]),
    ("pr k edges > N", None, TS, lambda d: prune_args(d, "dpp_edge", N + 1),
     ["--k 11", "weights kept per hidden node", "--input_dim 10"]),
    ("pr num_masks 0", None, TS, lambda d: prune_args(d)[:-1] + [0], ["--num_masks"]),
    ("pr num_masks memory", None, TS, lambda d: prune_args(d)[:-1] + [10**10],
     ["--num_masks", "GiB of memory", "smaller values"]),
    ("pr no weights", None, TS, lambda d: ts_args(d, "--procedure", "pruning",
                                                   "--pruning_choice", "dpp_node"),
     ["--trained_weights"]),
    ("pr weights missing", lambda d: os.remove(os.path.join(d, WEIGHTS)), TS, prune_args,
     ["weights file", "does not exist"]),
    ("pr weights text", write(WEIGHTS, "not a weights file\n"), TS, prune_args,
     ["weights file", "not a torch weights file"]),
    ("pr weights truncated", truncate(WEIGHTS), TS, prune_args, ["weights file"]),
    ("pr weights flipped", flip(WEIGHTS), TS, prune_args, ["weights file", "corrupted"]),
    ("pr weights inf", edit_weights(lambda s: {**s, "w2.weight": s["w2.weight"] * float("inf")}),
     TS, prune_args, ["weights file", "non-finite"]),
    ("pr weights other net", edit_weights(lambda s: {"fc.weight": s["w1.weight"]}), TS,
     prune_args, ["weights file", "w1.weight"]),
    ("pr weights integer", edit_weights(lambda s: {k: v.long() for k, v in s.items()}), TS,
     prune_args, ["weights file", "floating"]),
    ("pr weights student size", None, TS,
     lambda d: prune_args(d)[:3] + [2] + prune_args(d)[4:], ["weights file", "--student_h_size 2"]),
    ("pr weights = teacher pickle", None, TS,
     lambda d: [os.path.join(d, "teacher.pkl") if a == os.path.join(d, WEIGHTS) else a
                for a in prune_args(d)], ["weights file"]),
    ("pr kernel missing", lambda d: os.remove(os.path.join(d, f"dpp_edge_kernels_{K}.pkl")), TS,
     lambda d: prune_args(d, "dpp_edge", EDGE_K, "--load_from_pkl", 1), ["kernel file"]),
    ("pr kernel_path missing", None, TS,
     lambda d: prune_args(d, "dpp_edge", EDGE_K, "--load_from_pkl", 1,
                          "--kernel_path", os.path.join(d, "k.pkl")),
     ["kernel file", "does not exist"]),
    ("pr kernel of other student", other_student, TS,
     lambda d: prune_args(d, "dpp_edge", EDGE_K, "--load_from_pkl", 1),
     ["kernel file", "another student"]),
    ("pr kernel is masks", None, TS,
     lambda d: prune_args(d, "dpp_edge", EDGE_K, "--load_from_pkl", 1, "--kernel_path",
                          os.path.join(d, MASKS)), ["kernel file", "--load_from_pkl 0"]),
    ("pr kernel_path is a folder", mkdir("kdir"), TS,
     lambda d: prune_args(d, "dpp_edge", EDGE_K, "--kernel_path", os.path.join(d, "kdir")),
     ["--kernel_path", "folder"]),
    ("te before pruning", None, TS, lambda d: args_testing(d, "random_node", 1),
     ["masks file", "--procedure pruning", "first"]),
    ("te masks other k", lambda d: shutil.copy(os.path.join(d, MASKS), os.path.join(
        d, f"student_masks_dpp_node_{K}_1.pkl")), TS, lambda d: args_testing(d, "dpp_node", 1),
     ["masks file", "--k 2, not --k 1"]),
    ("te masks other choice", lambda d: shutil.copy(os.path.join(d, MASKS), os.path.join(
        d, f"student_masks_random_node_{K}_{NODE_K}.pkl")), TS,
     lambda d: args_testing(d, "random_node"), ["masks file", "random_node"]),
    ("te masks other teacher", lambda d: call(TD, td_args(d, "--seed", 9, path="teacher.pkl")),
     TS, args_testing, ["masks file", "another teacher"]),
    ("te masks same seed other data",
     lambda d: call(TD, td_args(d, "--sig_w", 0.3, path="teacher.pkl", num=1000)),
     TS, args_testing, ["masks file", "another teacher"]),
    ("ev masks same seed other data", lambda d: call(TD, td_args(d, path="teacher.pkl", num=1000)),
     EV, eval_args, ["masks file", "another teacher"]),
    ("te masks truncated", truncate(MASKS), TS, args_testing, ["masks file"]),
    ("te masks empty", write(MASKS, b""), TS, args_testing, ["masks file", "empty"]),
    ("te masks flipped", flip(MASKS), TS, args_testing, ["masks file", "corrupted"]),
    ("te masks not 0/1", edit_masks(lambda s, m: m[0].__setitem__((0, 0), 0.5)), TS, args_testing,
     ["masks file", "0/1"]),
    ("te masks none", edit_masks(lambda s, m: m.clear()), TS, args_testing,
     ["masks file", "no masks"]),
    ("te masks NaN student", edit_masks(lambda s, m: s.w1.weight.data.fill_(float("nan"))), TS,
     args_testing, ["masks file", "non-finite"]),
    ("te masks unknown choice", edit_masks(lambda s, m: setattr(m, "choice", "foo")), TS,
     args_testing, ["masks file"]),
    ("te nonlinearity differs", None, TS, lambda d: args_testing(d, "dpp_node", NODE_K,
                                                               "--nonlinearity", "relu"),
     ["masks file", "relu"]),
    ("te k above kernel rank", edit_masks(rank_one_student), TS, args_testing,
     ["dpp_node", "k = 2 exceeds the kernel's rank 1", "smaller --k"]),
    ("ev k above kernel rank", edit_masks(rank_one_student), EV, eval_args,
     ["dpp_node", "k = 2 exceeds the kernel's rank 1", "smaller --k"]),
    ("pr abbreviated flag", None, TS,
     lambda d: prune_args(d)[:-2] + ["--num_mask", 10], ["unrecognized arguments: --num_mask"]),
    ("te abbreviated flag", None, TS,
     lambda d: args_testing(d, "dpp_node", NODE_K, "--reweight", 1),
     ["unrecognized arguments: --reweight"]),
    ("ev abbreviated flag", None, EV, lambda d: eval_args(d, MASKS, "--thresh", 0.5),
     ["unrecognized arguments: --thresh"]),
    ("td abbreviated flag", None, TD, lambda d: td_args(d, "--sig", 0.1),
     ["unrecognized arguments: --sig"]),
    ("ev masks missing", None, EV, lambda d: eval_args(d, "student_masks_x_3_1.pkl"),
     ["masks file", "--procedure pruning first"]),
    ("ev teacher missing", lambda d: os.remove(os.path.join(d, "teacher.pkl")), EV, eval_args,
     ["teacher file"]),
    ("ev input_dim", None, EV, lambda d: eval_args(d)[:5] + [20] + eval_args(d)[6:],
     ["--input_dim is 20"]),
    ("ev threshold", None, EV, lambda d: eval_args(d, MASKS, "--threshold", 2), ["--threshold"]),
    ("ev masks = teacher", None, EV, lambda d: eval_args(d, "teacher.pkl"),
     ["masks file", "(student, masks)"]),
    ("ev masks other teacher", lambda d: call(TD, td_args(d, "--seed", 9, path="teacher.pkl")),
     EV, eval_args, ["another teacher"]),
    ("ev output_dir is a file", None, EV,
     lambda d: eval_args(d)[:-1] + [os.path.join(d, "teacher.pkl")], ["--output_dir"]),
    ("ev output_dir in /sys", None, EV, lambda d: eval_args(d)[:-1] + ["/sys/out"],
     ["--output_dir", "not writable"]),
]


@pytest.mark.parametrize("name,setup,script,argv", [c[:4] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, setup, script, argv, good,
                                                         tmp_path):
    fragments = {c[0]: c[4] for c in BAD_INPUTS}[name]
    d = fresh_copy(good, tmp_path)
    if setup is not None:
        setup(d)
    before = snapshot(d)
    code, _, err = call(script, argv(d))
    assert_one_line_error(code, err, *fragments)
    assert snapshot(d) == before


def test_bad_inputs_through_the_real_scripts(root, good, tmp_path):
    """The same contract with real processes: exit status 2 and one line on stderr."""
    d = fresh_copy(good, tmp_path)
    before = snapshot(d)
    proc = run_script(root, d, TD, *td_args(d, n=500, num=10**9))
    assert_one_line_error(proc.returncode, proc.stderr, "GiB of memory")
    proc = run_script(root, d, TS, *args_testing(d, "random_node", 1))
    assert_one_line_error(proc.returncode, proc.stderr, "--procedure pruning")
    if not torch.cuda.is_available():
        proc = run_script(root, d, TD, *td_args(d, "--device", "cuda"))
        assert_one_line_error(proc.returncode, proc.stderr, "--device cuda", "--device cpu")
    assert snapshot(d) == before


@pytest.mark.parametrize("script,argv", [("demo.py", ["--num_mask", "10"]),
                                         ("reproduce.py", ["--student", "3"]),
                                         ("benchmarks/run.py", ["--scal", "paper"])])
def test_abbreviated_flags_are_refused_by_the_other_scripts(root, tmp_path, script, argv):
    """argparse's prefix matching is off everywhere: a prefix of a flag is an error, before
    any work (the folder stays empty)."""
    proc = run_script(root, tmp_path, script, *argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"unrecognized arguments: {' '.join(argv)}" in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("rescale", [1, 0])
def test_testing_reports_the_loss_as_trained_beside_the_rescaled_one(good, tmp_path, rescale):
    """The unpruned student of --rescale 1 has rescaled rows; testing keeps its line and adds
    the student's loss as trained (the loss training printed)."""
    from dpp_pruning.pipeline.workflow import rescaled, test_loss
    from models import student_from_weights
    d = fresh_copy(good, tmp_path)
    assert call(TS, prune_args(d, "random_node", 1, "--rescale", rescale))[0] == 0
    code, out, err = call(TS, args_testing(d, "random_node", 1, "--rescale", rescale))
    assert code == 0, err
    teacher = storage.load_pickle(os.path.join(d, "teacher.pkl"))
    state = torch.load(os.path.join(d, WEIGHTS), weights_only=True)
    trained = student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy())
    unpruned = rescaled(trained) if rescale else trained
    lines = out.splitlines()
    first = lines.index(f"unpruned MLP test loss: {test_loss(teacher, unpruned)}")
    if rescale:
        assert lines[first + 1] == ("the rows of w1 were rescaled to norm sqrt(N) before "
                                    "pruning (--rescale 1); test loss as trained: "
                                    f"{test_loss(teacher, trained)}")
        assert test_loss(teacher, trained) != test_loss(teacher, unpruned)
    else:
        assert lines[first + 1].startswith("pruned MLP avg. test loss:")


# ----------------------------------------------------------------------------------------
# Reproducibility

PIPELINE = [
    (TD, lambda d, s: td_args(d, "--seed", s, "--sig_w", 0.1, path="teacher.pkl")),
    (TS, lambda d, s: ts_args(d, "--seed", s)),
    (TS, lambda d, s: prune_args(d, "dpp_node", NODE_K, "--seed", s)),
    (TS, lambda d, s: prune_args(d, "dpp_edge", EDGE_K, "--seed", s)),
    (TS, lambda d, s: prune_args(d, "random_edge", EDGE_K, "--seed", s)),
]
OUTPUTS = ["teacher.pkl", WEIGHTS, MASKS, f"student_masks_dpp_edge_{K}_{EDGE_K}.pkl",
           f"student_masks_random_edge_{K}_{EDGE_K}.pkl", f"dpp_edge_kernels_{K}.pkl"]


def run_pipeline(d, seed):
    for script, argv in PIPELINE:
        code, _, err = call(script, argv(d, seed))
        assert code == 0, err
    return {name: open(os.path.join(d, name), "rb").read() for name in OUTPUTS}


def test_same_seed_same_bytes_other_seed_other_results(root, tmp_path):
    """Teacher data, trained weights, masks (and kernels) are bit-identical on the CPU run
    after run, in this process and in a fresh one; another --seed changes all of them."""
    first = run_pipeline(str(tmp_path / "a"), 3)
    # The same commands in a separate Python process (fresh RNG state, hash seed, JIT).
    other = tmp_path / "b"
    steps = "; ".join(f"cli.run(m[{script!r}].main, {[str(a) for a in argv(str(other), 3)]!r})"
                      for script, argv in PIPELINE)
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); from dpp_pruning.base import cli; "
            f"import teacher_dataset, "
            f"teacher_student; m = {{'teacher_dataset.py': teacher_dataset, "
            f"'teacher_student.py': teacher_student}}; {steps}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in OUTPUTS:
        assert (other / name).read_bytes() == first[name], name
    different = run_pipeline(str(tmp_path / "c"), 4)
    for name in OUTPUTS:
        assert different[name] != first[name], name
    teacher_a = storage.load_pickle(tmp_path / "a" / "teacher.pkl")
    teacher_c = storage.load_pickle(tmp_path / "c" / "teacher.pkl")
    assert not np.array_equal(teacher_a.inputs.numpy(), teacher_c.inputs.numpy())
    masks_a = storage.load_pickle(tmp_path / "a" / f"student_masks_dpp_edge_{K}_{EDGE_K}.pkl")[1]
    masks_c = storage.load_pickle(tmp_path / "c" / f"student_masks_dpp_edge_{K}_{EDGE_K}.pkl")[1]
    assert not all(np.array_equal(a, c) for a, c in zip(masks_a, masks_c, strict=True))


# ----------------------------------------------------------------------------------------
# Property-based: random flags and damaged files never give a traceback or a partial file

CHOICES = ["dpp_node", "dpp_edge", "random_edge", "random_node", "importance_edge",
           "importance_node"]
FILES = ["teacher.pkl", WEIGHTS, MASKS, f"student_masks_dpp_edge_{K}_{EDGE_K}.pkl",
         f"dpp_edge_kernels_{K}.pkl"]

def mostly(valid, invalid):
    """Valid values four times out of five, so that whole commands succeed often."""
    return st.sampled_from(list(valid) * 4 + list(invalid)) if invalid else st.sampled_from(valid)


small_int = mostly([1, 2, 3, 4], [0, -1, 11, 10**12])
damage = st.one_of(
    st.just(("keep",)),
    st.just(("empty",)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=20)),
    st.just(("remove",)),
)


def apply_damage(path, how):
    if how[0] == "keep":
        return
    if how[0] == "remove":
        os.remove(path)
        return
    data = bytearray(pathlib.Path(path).read_bytes())
    if how[0] == "empty":
        data = bytearray()
    elif how[0] == "truncate":
        data = data[:int(len(data) * how[1])]
    elif how[0] == "flip":
        data[min(int(len(data) * how[1]), len(data) - 1)] ^= how[2]
    elif how[0] == "append":
        data += how[1]
    with open(path, "wb") as f:
        f.write(bytes(data))


@st.composite
def command(draw):
    """(script, argv builder, the files a success may write) with random flags."""
    script = draw(st.sampled_from(["td", "train", "prune", "test", "eval"]))
    seed = draw(mostly([1, 2], [-1]))
    if script == "td":
        n = draw(mostly([N, 15, 1], [0, -2, 10**12]))
        num = draw(mostly([200, 1000, 10], [5, 0]))
        extra = draw(mostly([[], ["--sig_w", 0.1], ["--mode", "soft_committee"]],
                            [["--sig_w", "nan"], ["--teacher_h_size", 0], ["--device", "cuda"]]))
        return TD, lambda d: td_args(d, "--seed", seed, *extra, path="new.pkl", n=n, num=num), {
            "new.pkl"}
    n = draw(mostly([N], [7, 0]))
    h = draw(mostly([K], [2, -1]))
    common = lambda d: ["--input_dim", n, "--student_h_size", h, "--teacher_path",  # noqa: E731
                        os.path.join(d, "teacher.pkl"), "--output_dir", d, "--seed", seed]
    if script == "train":
        lr = draw(mostly([0.5, 0.1], [0.0, float("nan"), 1e9]))
        mode = draw(st.sampled_from(["normal", "soft_committee"]))
        return TS, lambda d: common(d) + ["--lr", lr, "--mode", mode, "--epoch", 1], {
            f"student_{h}.pth"}
    choice, k = draw(mostly(CHOICES, ["bogus"])), draw(small_int)
    if script == "prune":
        num_masks = draw(mostly([1, 3], [0, -1]))
        load = draw(st.sampled_from([0, 0, 1]))
        return TS, lambda d: common(d) + [
            "--procedure", "pruning", "--trained_weights", os.path.join(d, WEIGHTS),
            "--pruning_choice", choice, "--k", k, "--num_masks", num_masks,
            "--load_from_pkl", load], {f"student_masks_{choice}_{h}_{k}.pkl",
                                       f"dpp_edge_kernels_{h}.pkl"}
    if script == "test":
        choice, k = draw(mostly([("dpp_node", NODE_K), ("dpp_edge", EDGE_K)],
                                [("random_node", 1), ("dpp_node", 0), ("bogus", 1)]))
        rw = draw(st.sampled_from([0, 1]))
        return TS, lambda d: common(d) + ["--procedure", "testing", "--pruning_choice", choice,
                                          "--k", k, "--reweighting", rw], set()
    masks = draw(st.sampled_from([MASKS, f"student_masks_dpp_edge_{K}_{EDGE_K}.pkl"]))
    stem = masks[len("student_masks_"):-len(".pkl")]
    return EV, lambda d: ["--path_to_student_mask", os.path.join(d, masks), "--path_to_teacher",
                          os.path.join(d, "teacher.pkl"), "--input_dim", n, "--output_dir",
                          d], {f"order_params_{stem}.png"}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cmd=command(), target=st.sampled_from(FILES),
       how=st.one_of(st.just(("keep",)), damage))
def test_random_flags_and_damaged_files(good, cmd, target, how):
    """Exit status 0 or 2 only (anything else escaping cli.run fails the test); with 2,
    nothing in the folder changed; with 0, only complete expected outputs were added or
    replaced; never a leftover temporary file."""
    script, argv, may_write = cmd
    with tempfile.TemporaryDirectory() as d:
        fresh_copy(good, d)
        apply_damage(os.path.join(d, target), how)
        before = snapshot(d)
        code, _, err = call(script, argv(d))
        after = snapshot(d)
        event(f"{os.path.basename(script)} exit {code}")
        assert code in (0, 2), err
        assert not [name for name in after if name.endswith(".part")], after
        if code == 2:
            assert "Traceback" not in err
            assert err.strip().splitlines()[-1].count(": error: ") == 1, err
            assert after == before
            return
        changed = {name for name in after if before.get(name) != after[name]}
        assert changed <= may_write, (changed, may_write)
        assert set(before) <= set(after)
        for name in changed:
            path = os.path.join(d, name)
            if name.endswith(".pkl"):
                storage.load_pickle(path)
            elif name.endswith(".pth"):
                storage.load_state_dict(path)
            else:
                with open(path, "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
