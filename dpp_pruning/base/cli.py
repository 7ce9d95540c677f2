"""What the entry points share: one-line errors with exit status 2, and input checks.

Every problem a user can cause (a bad flag, a missing or mismatched file, a job too big for
the machine) ends as one sentence on stderr and exit status 2, never a traceback.
"""
import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys

log = logging.getLogger("dpp_pruning")


class _StdoutHandler(logging.Handler):
    """Writes to whatever sys.stdout is at the time (so captured output works in-process)."""

    def emit(self, record):
        sys.stdout.write(self.format(record) + "\n")


log.addHandler(_StdoutHandler())
log.setLevel(logging.INFO)
log.propagate = False


class UserError(Exception):
    """Bad flags or inputs; the message is one sentence naming the flag or file."""


class HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, unless the help already speaks of it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, argparse.SUPPRESS) and not action.required
                and action.option_strings and "default" not in text):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default in --help, errors that point to --help, and no
    abbreviated flags: a typo such as --num_mask is refused instead of being read as
    --num_masks (or as whichever flag it happens to prefix)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that temporary files are cleaned up."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _user_errors():
    """UserError, and storage.FileProblem once storage is loaded (only storage raises it;
    importing it here would load torch before the flags are read)."""
    storage = sys.modules.get("dpp_pruning.base.storage")
    return (UserError,) + ((storage.FileProblem,) if storage is not None else ())


def run(main, argv=None):
    """Call main(argv) and turn user-caused failures into one line and exit status 2.

    SIGTERM (what `kill` and job schedulers send) unwinds like Ctrl-C, so a write in
    progress removes its temporary file and the previous output stays as it was.
    """
    prog = os.path.basename(sys.argv[0])
    with contextlib.suppress(ValueError):   # signal.signal works only in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except _user_errors() as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(2)
    except Terminated:
        sys.stderr.write(f"{prog}: terminated; files already written are intact\n")
        sys.exit(143)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; files already written are intact\n")
        sys.exit(130)
    except MemoryError:
        sys.stderr.write(f"{prog}: error: ran out of memory; use a smaller --num_data or "
                         "--input_dim\n")
        sys.exit(2)
    except OSError as e:
        # The machine, not the code: disk full, file system gone read-only, ...
        where = f" ({e.filename})" if e.filename else ""
        sys.stderr.write(f"{prog}: error: {e.strerror or e}{where}; nothing was left half "
                         "written\n")
        sys.exit(2)


def available_memory():
    """Bytes of memory available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(nbytes, what):
    """Refuse before starting when `nbytes` would not fit in the memory available."""
    free = available_memory()
    if free is not None and nbytes > 0.9 * free:
        raise UserError(f"{what} needs about {_gib(nbytes)} of memory but only "
                        f"{_gib(free)} is available; use smaller values")


def check_disk(nbytes, path, what):
    """Refuse before starting when a file of `nbytes` would not fit on the disk of `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    # The old file, if any, is replaced only once the new one is complete: no credit for it.
    if nbytes > free:
        raise UserError(f"{what} needs about {_gib(nbytes)} of disk space in {folder} but only "
                        f"{_gib(free)} is free; free some space or write elsewhere")


def _gib(nbytes):
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


def positive(name, value, allow_zero=False):
    if value is None:
        raise UserError(f"{name} is required")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, "
                        f"got {value}")


def seed(name, value):
    if not 0 <= value < 2**63:
        raise UserError(f"{name} must be an integer in 0..2**63-1, got {value}")


def finite(name, value):
    if value is None or value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{name} must be a finite number, got {value}")


FLOAT32_MAX = 3.4028234663852886e38     # the teacher's weights, inputs and labels are float32


def float32(name, value):
    """Refuse a number that float32 cannot hold (after `finite`)."""
    finite(name, value)
    if abs(value) > FLOAT32_MAX:
        raise UserError(f"{name} must be at most {FLOAT32_MAX:.3g} in magnitude (float32), "
                        f"got {value:g}")


def resolve_device(name, flag="--device"):
    """'cpu', 'cuda' (or 'cuda:N') or 'auto' -> a torch device string that exists here."""
    if name == "cpu":
        return name
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name} asked for a GPU but torch sees none here; "
                            f"use {flag} cpu")
        return name
    raise UserError(f"{flag} must be cpu, cuda or auto, got {name!r}")


# ----------------------------------------------------------------------------------------
# What the files handed from one step to the next must hold.

def _all_finite(array, rows=65536):
    """True if every entry of a float tensor/array is finite (checked in slices, so a
    paper-size data set needs no second copy in memory)."""
    import numpy as np
    a = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
    if a.ndim == 0:
        return bool(np.isfinite(a))
    return all(np.isfinite(a[start:start + rows]).all() for start in range(0, a.shape[0], rows))


def _is_int(x):
    import numbers
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_float_tensor(x, shape):
    import torch
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == "cpu"
            and tuple(x.shape) == tuple(shape))


def check_teacher(teacher, path, input_dim=None, flag="--input_dim"):
    """Raise UserError unless `teacher` is a complete, finite teacher data set (of dimension
    `input_dim` if given); `path` names the file it came from."""
    from dpp_pruning.base.data import TeacherDataset
    again = "generate it again with teacher_dataset.py"
    if not isinstance(teacher, TeacherDataset):
        raise UserError(f"teacher file {path} does not hold a teacher data set (it holds an "
                        f"object of type {type(teacher).__name__}); pass the file "
                        "teacher_dataset.py wrote")
    try:
        w1, w2 = teacher.w1, teacher.w2
        m, n = w1.shape
        p, t = teacher.inputs.shape[0], teacher.test_inputs.shape[0]
        shapes_ok = (_is_float_tensor(w1, (m, n)) and _is_float_tensor(w2, (1, m))
                     and _is_float_tensor(teacher.inputs, (p, n))
                     and _is_float_tensor(teacher.labels, (p,))
                     and _is_float_tensor(teacher.test_inputs, (t, n))
                     and _is_float_tensor(teacher.test_labels, (t,))
                     and _is_float_tensor(teacher.gram, (n, n))
                     and isinstance(teacher.settings, dict) and m > 0 and n > 0)
        noise = teacher.noise_std
    except (AttributeError, ValueError, TypeError, IndexError):
        shapes_ok = False
    if not shapes_ok:
        raise UserError(f"teacher file {path} is incomplete or inconsistent (missing arrays or "
                        f"mismatched shapes); {again}")
    if input_dim is not None and n != input_dim:
        raise UserError(f"teacher file {path} has input dimension {n} but {flag} is "
                        f"{input_dim}; pass {flag} {n} or another teacher file")
    if p == 0 or t == 0:
        raise UserError(f"teacher file {path} has {p} training and {t} test samples; {again} "
                        "with --num_data 10 or more")
    if not noise == noise or noise < 0 or noise == float("inf"):
        raise UserError(f"teacher file {path} records an invalid noise level sig_w = {noise}; "
                        f"{again}")
    for name in ("w1", "w2", "gram", "labels", "test_labels", "inputs", "test_inputs"):
        if not _all_finite(getattr(teacher, name)):
            raise UserError(f"teacher file {path} holds non-finite values (NaN or inf) in its "
                            f"{name}; {again}")
    return teacher


def check_same_teacher(masks, teacher, path, teacher_path, again):
    """Raise UserError unless the masks were drawn for this teacher data set."""
    from dpp_pruning.base.data import teacher_id
    if masks.teacher_id != teacher_id(teacher):
        raise UserError(f"masks file {path} was made with another teacher than "
                        f"{teacher_path}; {again}")


def check_student(student, path, what="masks file"):
    """Raise UserError unless `student` (a models.Student) has finite float weights."""
    import torch

    from models import Student
    if not isinstance(student, Student):
        raise UserError(f"{what} {path} does not hold a student network")
    w1, w2 = student.w1.weight, student.w2.weight
    if not (torch.isfinite(w1).all() and torch.isfinite(w2).all()):
        raise UserError(f"{what} {path} holds a student with non-finite weights; write it again")
    return student


def check_masks(content, path, input_dim=None, teacher=None, teacher_path=None):
    """Raise UserError unless `content` is the (unpruned student, MaskList) a pruning run wrote,
    with 0/1 masks of the right shape, for `input_dim` and `teacher` if given."""
    import numpy as np

    from dpp_pruning.base.choices import k_range
    from dpp_sample_ts import PRUNERS, MaskList
    again = "prune again with teacher_student.py --procedure pruning"
    if not (isinstance(content, tuple) and len(content) == 2
            and isinstance(content[1], MaskList)):
        raise UserError(f"masks file {path} does not hold (student, masks) from a pruning run; "
                        f"pass a student_masks_*.pkl file or {again}")
    student, masks = content
    try:
        choice, k = masks.choice, masks.k
        n, h = masks.input_dim, masks.student_h_size
        tid = masks.teacher_id
        meta_ok = (choice in PRUNERS and _is_int(n) and _is_int(h) and _is_int(k)
                   and n > 0 and h > 0 and isinstance(tid, str))
        meta_ok = meta_ok and k_range(choice, n, h)[0] <= k <= k_range(choice, n, h)[1]
    except (AttributeError, TypeError):
        meta_ok = False
    if not meta_ok:
        raise UserError(f"masks file {path} lacks the settings of the pruning run (corrupted?); "
                        f"{again}")
    check_student(student, path)
    if tuple(student.w1.weight.shape) != (h, n):
        raise UserError(f"masks file {path} holds a student of shape "
                        f"{tuple(student.w1.weight.shape)} but masks for ({h}, {n}); {again}")
    if not masks:
        raise UserError(f"masks file {path} holds no masks; {again} with --num_masks 1 or more")
    for mask in masks:
        if not (isinstance(mask, np.ndarray) and mask.shape == (n, h)
                and np.isin(mask, (0, 1)).all()):
            raise UserError(f"masks file {path} holds a mask that is not a 0/1 array of shape "
                            f"({n}, {h}); {again}")
    if input_dim is not None and n != input_dim:
        raise UserError(f"masks file {path} has input dimension {n} but --input_dim is "
                        f"{input_dim}")
    if teacher is not None:
        check_same_teacher(masks, teacher, path, teacher_path, f"{again} and this teacher")
    return student, masks


def check_rescale(masks, path, rescale):
    """Raise UserError unless the masks were drawn with the same --rescale (files written
    before the flag existed were all drawn from rescaled students)."""
    made = int(getattr(masks, "rescale", 1))
    if made != rescale:
        raise UserError(f"masks file {path} was made with --rescale {made}, not --rescale "
                        f"{rescale}; pass --rescale {made} or prune again with --rescale {rescale}")
