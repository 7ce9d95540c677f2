"""What the entry points share: one-line errors with exit status 2, and input checks.

Every problem a user can cause (a bad flag, a missing or mismatched file, a job too big for
the machine) ends as one sentence on stderr and exit status 2, never a traceback.
"""
import argparse
import logging
import os
import sys

from storage import FileProblem

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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main, argv=None):
    """Call main(argv) and turn user-caused failures into one line and exit status 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        main(argv)
    except (UserError, FileProblem) as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; files already written are intact\n")
        sys.exit(130)
    except MemoryError:
        sys.stderr.write(f"{prog}: error: ran out of memory; use a smaller --num_data or "
                         "--input_dim\n")
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
        raise UserError(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory but only "
                        f"{free / 2**30:.1f} GiB is available; reduce the size")


def positive(name, value, allow_zero=False):
    if value is None:
        raise UserError(f"{name} is required")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def finite(name, value):
    if value is None or value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{name} must be a finite number, got {value}")


def resolve_device(name, flag="--device"):
    """'cpu', 'cuda' (or 'cuda:N') or 'auto' -> a torch device string that exists here."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name} asked for a GPU but torch sees none here; use {flag} cpu")
        return name
    raise UserError(f"{flag} must be cpu, cuda or auto, got {name!r}")
