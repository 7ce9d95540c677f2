"""Untrusted pickles and weight files never run code; interrupted writes never leave a
truncated output; every output goes through storage.atomic_open."""
import builtins
import glob
import io
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dpp_pruning.base import storage
from entry_points import call

N, K = 10, 3


def ts_args(d, *extra):
    return ["--input_dim", N, "--student_h_size", K, "--teacher_path",
            os.path.join(d, "teacher.pkl"), "--output_dir", d, *extra]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A teacher, a trained student, dpp_node and dpp_edge masks and the dpp_edge kernels."""
    d = str(tmp_path_factory.mktemp("safety"))
    assert call("teacher_dataset.py", ["--input_dim", N, "--num_data", 1000, "--teacher_path",
                                       os.path.join(d, "teacher.pkl")])[0] == 0
    assert call("teacher_student.py", ts_args(d))[0] == 0
    for choice, k in (("dpp_node", 2), ("dpp_edge", 4)):
        assert call("teacher_student.py", ts_args(
            d, "--procedure", "pruning", "--trained_weights", os.path.join(d, f"student_{K}.pth"),
            "--pruning_choice", choice, "--k", k, "--num_masks", 3))[0] == 0
    return d


def copy_of(good, dest):
    for name in os.listdir(good):
        shutil.copy(os.path.join(good, name), dest)
    return str(dest)


# ----------------------------------------------------------------------------------------
# Pickles that would run code

class _Reduce:
    """Pickles as a call of `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_pickles(marker):
    touch = f"open({marker!r}, 'w').close()"
    torch_bytes = io.BytesIO()
    torch.save(torch.zeros(2), torch_bytes)
    return {
        "os.system": pickle.dumps(_Reduce(os.system, f"touch {marker}")),
        "builtins.exec": pickle.dumps(_Reduce(builtins.exec, touch)),
        "builtins.eval": pickle.dumps(_Reduce(builtins.eval, touch)),
        "nested in a tuple": pickle.dumps(([1.0], {"k": _Reduce(builtins.exec, touch)})),
        "torch.storage._load_from_bytes": pickle.dumps(
            _Reduce(torch.storage._load_from_bytes, torch_bytes.getvalue())),
        "numpy.load": pickle.dumps(_Reduce(np.load, marker, None, True)),
        "numpy.fromfile": pickle.dumps(_Reduce(np.fromfile, "/etc/hostname")),
        "protocol 0 GLOBAL": f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode(),
    }


ROLES = ["teacher", "masks", "kernels", "evaluate masks", "evaluate teacher"]


def role_argv(role, d, path):
    masks = os.path.join(d, f"student_masks_dpp_node_{K}_2.pkl")
    if role == "teacher":
        return "teacher_student.py", ts_args(d)[:5] + [path] + ts_args(d)[6:]
    if role == "masks":
        shutil.copy(path, masks)
        return "teacher_student.py", ts_args(d, "--procedure", "testing", "--pruning_choice",
                                              "dpp_node", "--k", 2)
    if role == "kernels":
        return "teacher_student.py", ts_args(
            d, "--procedure", "pruning", "--trained_weights", os.path.join(d, f"student_{K}.pth"),
            "--pruning_choice", "dpp_edge", "--k", 4, "--load_from_pkl", 1, "--kernel_path", path)
    teacher = os.path.join(d, "teacher.pkl")
    if role == "evaluate masks":
        masks = path
    else:
        teacher = path
    return "evaluate.py", ["--path_to_student_mask", masks, "--path_to_teacher", teacher,
                           "--input_dim", N, "--output_dir", d]


@pytest.mark.parametrize("role", ROLES)
def test_pickles_that_would_run_code_are_refused(role, good, tmp_path):
    marker = str(tmp_path / "pwned")
    for name, payload in evil_pickles(marker).items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        copy_of(good, d)
        path = str(d / "evil.pkl")
        with open(path, "wb") as f:
            f.write(payload)
        script, argv = role_argv(role, str(d), path)
        code, _, err = call(script, argv)
        assert not os.path.exists(marker), f"{name} ran code as {role}"
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "it was not loaded" in err, (name, err)


def test_weight_files_that_would_run_code_are_refused(good, tmp_path):
    marker = str(tmp_path / "pwned")
    d = copy_of(good, tmp_path)
    cases = {
        "zip with os.system": _Reduce(os.system, f"touch {marker}"),
        "tensor dict with exec": {"w1.weight": _Reduce(builtins.exec,
                                                       f"open({marker!r}, 'w').close()")},
    }
    paths = []
    for i, obj in enumerate(cases.values()):
        paths.append(os.path.join(d, f"evil{i}.pth"))
        torch.save(obj, paths[-1])
    paths.append(os.path.join(d, "legacy.pth"))
    with open(paths[-1], "wb") as f:
        pickle.dump(_Reduce(os.system, f"touch {marker}"), f)
    for path in paths:
        code, _, err = call("teacher_student.py", ts_args(
            d, "--procedure", "pruning", "--trained_weights", path, "--pruning_choice",
            "dpp_node", "--k", 2))
        assert not os.path.exists(marker)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "weights file" in err and "Traceback" not in err, err


def test_evil_teacher_through_the_real_script(root, good, tmp_path):
    marker = str(tmp_path / "pwned")
    d = copy_of(good, tmp_path)
    with open(os.path.join(d, "teacher.pkl"), "wb") as f:
        f.write(evil_pickles(marker)["os.system"])
    before = {name: pathlib.Path(d, name).read_bytes() for name in os.listdir(d)}
    proc = subprocess.run([sys.executable, str(root / "teacher_student.py"), *map(str, ts_args(d))],
                          capture_output=True, text=True, timeout=120)
    assert not os.path.exists(marker)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "teacher file" in proc.stderr, proc.stderr
    assert {name: pathlib.Path(d, name).read_bytes() for name in os.listdir(d)} == before


def test_allowlisted_constructor_with_hostile_arguments_is_refused(tmp_path):
    """models._rebuild_student is admitted, but only with arguments that fit together, so a
    crafted file cannot make it build an enormous network."""
    import models
    bad = _Reduce(models._rebuild_student, 10**9, 10**9, "sigmoid", "normal",
                  np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))
    path = tmp_path / "student.pkl"
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(storage.FileProblem, match="not a valid pickle"):
        storage.load_pickle(path, "masks file")


def test_checksum_line_is_transparent_to_plain_pickle(tmp_path):
    obj = {"a": np.arange(5.0), "b": [1, 2]}
    path = tmp_path / "x.pkl"
    storage.save_pickle(obj, path)
    with open(path, "rb") as f:
        plain = pickle.load(f)
    assert np.array_equal(plain["a"], obj["a"]) and plain["b"] == obj["b"]
    legacy = tmp_path / "legacy.pkl"     # written before checksums: still read
    legacy.write_bytes(pickle.dumps(obj, protocol=5))
    assert storage.load_pickle(legacy)["b"] == [1, 2]


# ----------------------------------------------------------------------------------------
# Interrupted writes

BIG = ["--input_dim", 100, "--num_data", 300000]   # ~133 MB: a write that takes a while


def start_teacher_dataset(root, d, target):
    # the child's stderr, open while it runs: the caller closes it
    err = open(os.path.join(d, "stderr.txt"), "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(root / "teacher_dataset.py"), *map(str, BIG),
                             "--teacher_path", target], stdout=subprocess.DEVNULL, stderr=err)
    return proc, err


def wait_for(condition, proc, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the writer exited ({proc.returncode}) before {what}"
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def parts(folder):
    return glob.glob(os.path.join(folder, ".teacher.pkl.*.part"))


def signal_while_writing(root, good, d, signum):
    """Start teacher_dataset.py over an existing good teacher file and send `signum` while
    the temporary file is being written -> (return code, path of the target, old bytes)."""
    target = os.path.join(d, "teacher.pkl")
    shutil.copy(os.path.join(good, "teacher.pkl"), target)
    old = pathlib.Path(target).read_bytes()
    proc, err = start_teacher_dataset(root, d, target)
    try:
        wait_for(lambda: any(os.path.getsize(p) > 0 for p in parts(d)), proc,
                 "the temporary file was being written")
        proc.send_signal(signum)
        proc.wait(30)
    finally:
        err.close()
    return proc.returncode, target, old


def test_sigkill_while_writing_leaves_the_old_file_intact(root, good, tmp_path):
    d = str(tmp_path)
    code, target, old = signal_while_writing(root, good, d, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert pathlib.Path(target).read_bytes() == old
    assert storage.load_pickle(target, "teacher file").input_dim == N
    # What SIGKILL leaves behind is hidden, and removed by the next write of the same target.
    leftovers = parts(d)
    assert leftovers and all(os.path.basename(p).startswith(".") for p in leftovers)
    code, _, _ = call("teacher_dataset.py", ["--input_dim", N, "--num_data", 100,
                                             "--teacher_path", target])
    assert code == 0 and not parts(d)
    assert storage.load_pickle(target).input_dim == N


def test_sigkill_while_generating_leaves_no_file(root, tmp_path):
    d = str(tmp_path)
    target = os.path.join(d, "teacher.pkl")
    proc, err = start_teacher_dataset(root, d, target)
    try:
        wait_for(lambda: "generating" in pathlib.Path(d, "stderr.txt").read_text(), proc,
                 "generation started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        err.close()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(d)) == ["stderr.txt"]


def test_sigterm_while_writing_cleans_up(root, good, tmp_path):
    """SIGTERM (kill, job schedulers) unwinds: the temporary file is removed too."""
    d = str(tmp_path)
    code, target, old = signal_while_writing(root, good, d, signal.SIGTERM)
    assert code == 143
    assert pathlib.Path(target).read_bytes() == old and not parts(d)
    assert "terminated" in pathlib.Path(d, "stderr.txt").read_text()


# ----------------------------------------------------------------------------------------
# Every writer goes through atomic_open

def test_every_output_is_renamed_into_place(good, tmp_path, monkeypatch):
    """Run every kind of writer; each output file must appear by os.replace of a hidden
    temporary file, and no output path may ever be opened for writing directly."""
    d = str(tmp_path)
    for name in ("teacher.pkl", f"student_{K}.pth"):
        shutil.copy(os.path.join(good, name), d)
    replaced, opened = [], []
    real_replace, real_open, real_os_open = os.replace, builtins.open, os.open

    def replace(src, dst, *a, **kw):
        replaced.append(os.path.abspath(dst))
        return real_replace(src, dst, *a, **kw)

    def tracked_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            opened.append(os.path.abspath(file))
        return real_open(file, mode, *a, **kw)

    def tracked_os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            opened.append(os.path.abspath(path))
        return real_os_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(builtins, "open", tracked_open)
    monkeypatch.setattr(os, "open", tracked_os_open)
    runs = [
        ("teacher_dataset.py", ["--input_dim", N, "--num_data", 500, "--teacher_path",
                                os.path.join(d, "t2.pkl")]),
        ("teacher_student.py", ts_args(d)),
        ("teacher_student.py", ts_args(d, "--procedure", "pruning", "--trained_weights",
                                       os.path.join(d, f"student_{K}.pth"), "--pruning_choice",
                                       "dpp_edge", "--k", 4, "--num_masks", 2)),
        ("evaluate.py", ["--path_to_student_mask",
                         os.path.join(d, f"student_masks_dpp_edge_{K}_4.pkl"),
                         "--path_to_teacher", os.path.join(d, "teacher.pkl"), "--input_dim", N,
                         "--output_dir", d]),
    ]
    for script, argv in runs:
        code, _, err = call(script, argv)
        assert code == 0, err
    monkeypatch.undo()
    outputs = {os.path.join(d, name) for name in os.listdir(d)} - {
        os.path.join(d, "teacher.pkl")}
    expected = {os.path.join(d, name) for name in (
        "t2.pkl", f"student_{K}.pth", f"student_masks_dpp_edge_{K}_4.pkl",
        f"dpp_edge_kernels_{K}.pkl", f"order_params_dpp_edge_{K}_4.png")}
    assert outputs == expected
    assert outputs <= set(replaced)
    direct = [p for p in opened if os.path.dirname(p) == d and not p.endswith(".part")]
    assert not direct, direct


def test_write_errors_are_one_line(tmp_path):
    """An OS error while writing (here: the target turned into a folder) is a FileProblem,
    and the temporary file is gone."""
    target = tmp_path / "out.pkl"
    target.mkdir()
    with pytest.raises(storage.FileProblem, match="out.pkl"):
        storage.save_pickle([1], target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pkl"]


def test_unwritable_output_dir_is_refused_before_work(good, tmp_path):
    """A folder without write permission (root may write anyway: the /proc and /sys cases in
    test_hardening.py cover that)."""
    if os.geteuid() == 0:
        pytest.skip("permissions do not bind root")
    d = copy_of(good, tmp_path)
    ro = os.path.join(d, "ro")
    os.mkdir(ro, 0o555)
    try:
        code, _, err = call("teacher_student.py", ts_args(d)[:-1] + [ro])
        assert code == 2 and "--output_dir" in err and "not writable" in err, err
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


def test_a_temporary_file_of_a_killed_unreaped_writer_is_removed(tmp_path):
    """A writer killed with SIGKILL whose parent has not reaped it yet (a zombie, as a killed
    Dask worker is until its parent waits) has no run left: its temporary file goes."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        stat = pathlib.Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        part = tmp_path / f".cell.npz.{child.pid}.abc123.part"
        part.write_bytes(b"half")
        storage.remove_stale_parts(str(tmp_path / "cell.npz"))
        assert not part.exists()
    finally:
        child.wait()


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    """A temporary file of a writer that still runs (another process, alive) is not touched
    by another write of the same target."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        part = tmp_path / f".cell.npz.{child.pid}.abc123.part"
        part.write_bytes(b"being written")
        storage.save_pickle([1], str(tmp_path / "cell.npz"))
        assert part.read_bytes() == b"being written"
    finally:
        child.kill()
        child.wait()


def test_a_process_it_may_not_signal_counts_as_alive(tmp_path, monkeypatch):
    """os.kill(pid, 0) answering EPERM (a process of another user) means the process exists:
    its temporary file stays."""
    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    part = tmp_path / ".cell.npz.4242.abc123.part"
    part.write_bytes(b"another user's")
    monkeypatch.setattr(os, "kill", not_permitted)
    storage.remove_stale_parts(str(tmp_path / "cell.npz"))
    assert part.exists()
    assert storage._pid_alive(4242)
