"""Reading and writing the files the scripts pass to each other, safely.

- Every write goes to a hidden temporary file `.<name>.<pid>.<random>.part` in the target
  folder and is renamed over the target only once complete and flushed to disk: a run killed
  at any moment leaves the old file or the new one, never a truncated one. A temporary file
  left behind by a run killed with SIGKILL (which no program can intercept) is removed by the
  next write of the same target once its process is gone.
- Our pickles end with a checksum line (`#crc32:<hex>`, after the pickle's STOP opcode, so
  plain `pickle.load` still reads them), computed while writing and checked while reading
  (no second pass); a truncated or altered file is refused with a clear message.
- Pickles are read through an unpickler that admits only the classes our files contain
  (numpy arrays, our own dataset / student / mask classes, builtin containers); anything
  else is refused before it can run.
- Weight files are read with `torch.load(..., weights_only=True)`, after their zip CRCs are
  checked (torch itself does not check them).
Problems with a file raise `FileProblem`, whose message is one sentence naming the file.
"""
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import pickle
import re
import socket
import tempfile
import warnings
import zipfile
import zlib

import numpy as np
import torch


class FileProblem(Exception):
    """A file that cannot be used; the message names it and says what to do."""


# ----------------------------------------------------------------------------------------
# Writing

def _part_prefix(path):
    return "." + os.path.basename(path) + "."


def _pid_alive(pid):
    """Whether process `pid` runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_parts(path):
    """Delete temporary files of earlier writes of `path` whose writing process is gone."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _part_prefix(path)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[^.]+\.part$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def _describe_os_error(e):
    return e.strerror or type(e).__name__


def _check_folder(folder, name):
    """Raise FileProblem (starting with `name`) unless files can be created in `folder`, or,
    if it does not exist yet, it can be created (it is, at write time)."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileProblem(f"{name} cannot be written: {existing} is a file, not a folder")
    try:  # a real probe: catches read-only file systems, and permissions even for root
        os.rmdir(tempfile.mkdtemp(prefix=".probe.", dir=existing))
    except OSError as e:
        raise FileProblem(f"{name} cannot be written: folder {existing} is not writable "
                          f"({_describe_os_error(e)}); choose another location") from None


def check_writable(path, what="output file", flag=None):
    """Raise FileProblem unless `path` can be written (call it before any work is done):
    a file name, not a folder, in a folder that exists and is writable or can be created."""
    path = os.fspath(path)
    shown = path or "''"
    name = f"{flag} {shown}" if flag else f"{what} {shown}"
    if not path or path.endswith(os.sep) or os.path.basename(path) in ("", ".", ".."):
        raise FileProblem(f"{name} is not a file name; give a path such as out/file.pkl")
    if os.path.isdir(path):
        raise FileProblem(f"{name} is a folder; give a file name inside it")
    _check_folder(os.path.dirname(os.path.abspath(path)), name)


def check_folder_writable(folder, flag):
    """Raise FileProblem unless files can be created in `folder` (created later if missing)."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileProblem(f"{flag} {folder} is a file, not a folder")
    _check_folder(os.path.abspath(folder), f"{flag} {folder}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary sibling of `path` for writing; rename it to `path` on success.

    OS errors (folder not writable, disk full, path is a folder) become FileProblem.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
        os.makedirs(folder, exist_ok=True)
        remove_stale_parts(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_part_prefix(path)}{os.getpid()}.", suffix=".part",
                                   dir=folder)
    except OSError as e:
        raise FileProblem(f"{path} cannot be written ({_describe_os_error(e)}); choose "
                          "another location") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise FileProblem(f"{path} could not be written ({_describe_os_error(e)}); the "
                              "previous file, if any, is unchanged") from None
        raise
    _fsync_folder(folder)


class FolderInUse(FileProblem):
    """Another process holds the folder's lock."""


def _acquire_lock_file(path, blocking):
    """An open descriptor of `path` (made if missing) holding an exclusive flock on it. A
    process that waited on a file which its holder then removed finds that the path no longer
    names the file it locked, and locks anew. BlockingIOError if not `blocking` and held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _release_lock_file(path, fd):
    with contextlib.suppress(OSError):
        os.unlink(path)                       # while still held: no one can lock the old file
    os.close(fd)


@contextlib.contextmanager
def lock_file(path):
    """Hold an exclusive lock on the file `path` for the block, waiting for it if another
    process holds it, and remove the file when the block ends, normally or not."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = _acquire_lock_file(path, blocking=True)
    try:
        yield
    finally:
        _release_lock_file(path, fd)


@contextlib.contextmanager
def folder_lock(folder, what="run"):
    """Hold `folder`/.lock (an exclusive flock) for the block, or raise FolderInUse naming
    the process that holds it. The lock file names its holder (pid, host, what) and is
    removed when the block ends; the lock dies with its process, so a run killed with
    SIGKILL never leaves the folder locked."""
    path = os.path.join(folder, ".lock")
    os.makedirs(folder, exist_ok=True)
    try:
        fd = _acquire_lock_file(path, blocking=False)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError), open(path) as f:
            holder = f.read(200).strip()
        raise FolderInUse(f"{folder} is in use by another {what} ({holder or 'a process'}); "
                          "wait for it to finish or use another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        _release_lock_file(path, fd)


def _fsync_folder(folder):
    """Make the rename itself durable (best effort; not every file system supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TRAILER_TAG = b"\n#crc32:"
_TRAILER_LEN = len(_TRAILER_TAG) + 8 + 1


def _trailer(crc):
    return _TRAILER_TAG + b"%08x\n" % crc


_SLICE = 1 << 26   # 64 MiB: large arrays are checksummed a slice at a time, beside the I/O


class _Checksummed:
    """A file whose bytes are checksummed (CRC-32) as they pass. For a large buffer the
    checksum of a slice runs on a helper thread while the file I/O of the next (reading) or
    the same (writing) slice goes on, since zlib and file I/O both release the GIL: a
    checked read or write takes no longer than a plain one on two cores."""

    def __init__(self, f):
        self._f, self.crc = f, 0

    def _update(self, data):
        self.crc = zlib.crc32(data, self.crc)

    def write(self, data):
        view = memoryview(data).cast("B")
        if len(view) < _SLICE:
            self._update(view)
            return self._f.write(view)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for start in range(0, len(view), _SLICE):
                part = view[start:start + _SLICE]
                checked = pool.submit(self._update, part)
                self._f.write(part)
                checked.result()
        return len(view)

    def read(self, n=-1):
        data = self._f.read(n)
        self._update(data)
        return data

    def readline(self):
        data = self._f.readline()
        self._update(data)
        return data

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        if len(view) < _SLICE:
            n = self._f.readinto(view)
            self._update(view[:n])
            return n
        done, checked = 0, None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            while done < len(view):
                n = self._f.readinto(view[done:done + _SLICE])
                if checked is not None:
                    checked.result()
                if not n:
                    break
                checked = pool.submit(self._update, view[done:done + n])
                done += n
            if checked is not None:
                checked.result()
        return done


def save_pickle(obj, path):
    """Pickle `obj` (protocol 5) to `path` atomically, followed by a checksum line."""
    with atomic_open(path) as f:
        writer = _Checksummed(f)
        pickle.dump(obj, writer, protocol=5)
        f.write(_trailer(writer.crc))


def save_state_dict(state_dict, path):
    with atomic_open(path) as f:
        torch.save(state_dict, f)


# ----------------------------------------------------------------------------------------
# Reading pickles

def _checked_rebuild_student(input_dim, hidden_size, nonlinearity, mode, w1, w2):
    """models._rebuild_student, after checking that its arguments are plausible, so that a
    corrupted file cannot make it allocate an enormous network."""
    import models
    ok = (isinstance(input_dim, int) and isinstance(hidden_size, int)
          and input_dim > 0 and hidden_size > 0
          and isinstance(w1, np.ndarray) and isinstance(w2, np.ndarray)
          and w1.shape == (hidden_size, input_dim) and w2.size == hidden_size
          and nonlinearity in models.NONLINEARITIES and mode in models.MODES)
    if not ok:
        raise pickle.UnpicklingError("inconsistent student record")
    return models._rebuild_student(input_dim, hidden_size, nonlinearity, mode, w1, w2)


# (module, name) pairs our pickles may reference. numpy moved its internals between 1.x and
# 2.x (numpy.core -> numpy._core), so both spellings are admitted.
_ALLOWED = {
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("dpp_pruning.base.data", "TeacherDataset"),
    ("models", "_rebuild_student"),
    ("dpp_sample_ts", "MaskList"),
}
_REPLACED = {("models", "_rebuild_student"): _checked_rebuild_student}
# where classes pickled by earlier releases live now (before the library became a package)
_MOVED = {("data", "TeacherDataset"): ("dpp_pruning.base.data", "TeacherDataset")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module, name = _MOVED.get((module, name), (module, name))
        if (module, name) in _REPLACED:
            return _REPLACED[(module, name)]
        if (module, name) in _ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing to load persistent id")


def load_pickle(path, what="file"):
    """Load one of our pickles; any other content raises FileProblem (nothing is executed)."""
    path = os.fspath(path)
    _check_exists(path, what)
    try:
        with open(path, "rb") as f:
            reader = _Checksummed(f)
            obj = _RestrictedUnpickler(reader).load()
            rest = f.read(_TRAILER_LEN + 1)
    except FileProblem:
        raise
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise FileProblem(f"{what} {path} contains objects this project never writes "
                              f"({str(e)[len('refusing to load '):]}); it was not loaded, "
                              "since it could run code on this machine") from None
        raise FileProblem(f"{what} {path} is not a valid pickle (truncated or corrupted?); "
                          "write it again") from None
    except OSError as e:
        raise FileProblem(f"{what} {path} cannot be read ({_describe_os_error(e)})") from None
    except RecursionError:
        raise FileProblem(f"{what} {path} is corrupted (nested too deeply); write it "
                          "again") from None
    except Exception as e:  # noqa: BLE001 - only allowlisted constructors ran; any failure
        # of theirs means the content is damaged
        raise FileProblem(f"{what} {path} is truncated or corrupted ({type(e).__name__}); "
                          "write it again") from None
    if not rest or rest == _trailer(reader.crc):
        return obj          # checked, or a plain pickle (not ours: its content is checked)
    if (len(rest) < _TRAILER_LEN and _TRAILER_TAG.startswith(rest[:len(_TRAILER_TAG)])):
        raise FileProblem(f"{what} {path} is truncated (its checksum line is cut short); "
                          "write it again")
    if rest.startswith(_TRAILER_TAG) and len(rest) == _TRAILER_LEN:
        raise FileProblem(f"{what} {path} is corrupted (its checksum does not match its "
                          "content); write it again")
    raise FileProblem(f"{what} {path} is corrupted (unexpected bytes after the pickle); "
                      "write it again")


# ----------------------------------------------------------------------------------------
# Reading weight files

def load_state_dict(path, what="weights file"):
    """Load a state_dict written by `save_state_dict` (tensors only, nothing executed)."""
    path = os.fspath(path)
    _check_exists(path, what)
    again = "pass the .pth file that training wrote"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError,
                NotImplementedError):
            bad = "?"
        if bad is not None:
            raise FileProblem(f"{what} {path} is corrupted (a checksum inside it does not "
                              f"match); {again}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        if refused:
            raise FileProblem(f"{what} {path} contains objects other than tensors "
                              f"({refused.group(1)}); it was not loaded, since it could run "
                              f"code on this machine; {again}") from None
        raise FileProblem(f"{what} {path} is not a torch weights file (truncated, corrupted "
                          f"or another format); {again}") from None
    except OSError as e:
        raise FileProblem(f"{what} {path} cannot be read ({_describe_os_error(e)})") from None
    except Exception:  # noqa: BLE001 - torch reports damaged archives in many ways
        raise FileProblem(f"{what} {path} is not a torch weights file (truncated, corrupted "
                          f"or another format); {again}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileProblem(f"{what} {path} does not hold a state_dict of tensors; {again}")
    return state


def _check_exists(path, what):
    if not path:
        raise FileProblem(f"{what} path is empty; give a file name")
    if not os.path.exists(path):
        raise FileProblem(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise FileProblem(f"{what} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise FileProblem(f"{what} {path} is not readable (check its permissions)")
    if os.path.getsize(path) == 0:
        raise FileProblem(f"{what} {path} is empty; write it again")


def check_readable(path, what):
    """Raise FileProblem unless `path` is an existing, non-empty, readable file."""
    _check_exists(os.fspath(path), what)
