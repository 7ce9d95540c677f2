"""Calling the entry points in-process exactly as `cli.run` runs them, for the tests."""
import contextlib
import io
import signal

import evaluate
import teacher_dataset
import teacher_student
from dpp_pruning.base import cli

SCRIPTS = {"teacher_dataset.py": teacher_dataset, "teacher_student.py": teacher_student,
           "evaluate.py": evaluate}


def call(script, argv):
    """Run a script's main(argv) as `cli.run` does -> (exit status, stdout, stderr).

    Only SystemExit may leave cli.run; any other exception propagates and fails the test
    (that would be a traceback for the user)."""
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(SCRIPTS[script].main, [str(a) for a in argv])
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, out.getvalue(), err.getvalue()
