"""Reading and writing the files the scripts pass to each other, safely.

- Every write goes to a temporary file in the target folder and is renamed over the target
  only once complete: a run killed at any moment leaves the old file or the new one, never a
  truncated one.
- Pickles are read through an unpickler that admits only the classes our files contain
  (numpy arrays, our own dataset / student / mask classes, builtin containers); anything
  else is refused before it can run.
- Weight files are read with `torch.load(..., weights_only=True)`.
Problems with a file raise `FileProblem`, whose message is one sentence naming the file.
"""
import contextlib
import io
import os
import pickle
import tempfile
import zipfile

import torch


class FileProblem(Exception):
    """A file that cannot be used; the message names it and says what to do."""


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary sibling of `path` for writing; rename it to `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part",
                               dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pickle(obj, path):
    with atomic_open(path) as f:
        pickle.dump(obj, f, protocol=5)


def save_state_dict(state_dict, path):
    with atomic_open(path) as f:
        torch.save(state_dict, f)


# (module, name) pairs our pickles may reference. numpy moved its internals between 1.x and
# 2.x (numpy.core -> numpy._core), so both spellings are admitted.
_ALLOWED = {
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("data", "TeacherDataset"),
    ("models", "_rebuild_student"),
    ("dpp_sample_ts", "MaskList"),
    ("dpp_sample_ts", "EdgeKernels"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pickle(path, what="file"):
    """Load one of our pickles; any other content raises FileProblem (nothing is executed)."""
    path = os.fspath(path)
    _check_exists(path, what)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise FileProblem(f"{what} {path} contains objects this project never writes "
                              f"({str(e)[len('refusing to load '):]}); it was not loaded, "
                              "since it could run code on this machine") from None
        raise FileProblem(f"{what} {path} is not a valid pickle (truncated or corrupted?); "
                          "write it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, ImportError) as e:
        raise FileProblem(f"{what} {path} is truncated or corrupted ({type(e).__name__}); "
                          "write it again") from None


def load_state_dict(path, what="weights file"):
    """Load a state_dict written by `save_state_dict` (tensors only, nothing executed)."""
    path = os.fspath(path)
    _check_exists(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile,
            io.UnsupportedOperation, KeyError, AttributeError, TypeError) as e:
        raise FileProblem(f"{what} {path} cannot be read as a torch state_dict "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                          "pass the .pth that training wrote") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileProblem(f"{what} {path} does not hold a state_dict of tensors")
    return state


def _check_exists(path, what):
    if not os.path.exists(path):
        raise FileProblem(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise FileProblem(f"{what} {path} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise FileProblem(f"{what} {path} is empty; write it again")
