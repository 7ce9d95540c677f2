"""A Dask scheduler and worker processes on 127.0.0.1, started from the `dask` command line as
docs/studies.md starts them on a real cluster, for the tests and benchmarks."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from dpp_pruning import ROOT


def project_env(root=ROOT):
    """PYTHONPATH with the project at `root` first on the import path (for a worker on
    another copy of the project: LocalDaskCluster's worker_env)."""
    return dict(PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def dask_command():
    """The `dask` command line of this interpreter's environment (beside it, also when the
    environment is used without being activated), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "dask")
    found = beside if os.access(beside, os.X_OK) else shutil.which("dask")
    if found is None:
        raise FileNotFoundError("the dask command line is not installed (requirements.txt)")
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDaskCluster:
    """A Dask scheduler and `workers` worker processes on 127.0.0.1, started from the `dask`
    command line as docs/studies.md starts them on a real cluster: in `folder` (not the
    checkout), with the environment of this process (the project importable because it is
    installed, `pip install -e .`), one thread each. `close` stops them all. For tests and
    benchmarks.

    nanny=False (default): a killed worker stays dead; nanny=True: its nanny restarts it.
    worker_env: extra environment of the workers (e.g. project_env(copy) for a worker on
    another copy of the project); scheduler_env likewise; preload: a module file each worker
    runs at start (`dask worker --preload`); prefix: a command the workers are started
    through (e.g. in a mount namespace of their own)."""

    def __init__(self, workers, folder, timeout=60, nanny=False, worker_env=None,
                 scheduler_env=None, preload=None):
        self._dask = dask_command()
        self.folder = folder
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = []
        self.workers = []
        # held open for the processes' output while the cluster runs; closed by close()
        self._log = open(os.path.join(folder, "dask_cluster.log"), "a")  # noqa: SIM115
        self.scheduler = self._start(
            [self._dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--dashboard-address", f"127.0.0.1:{free_port()}", "--idle-timeout", "600"],
            scheduler_env)
        try:
            self.add_workers(workers, timeout, nanny, worker_env, preload)
        except BaseException:
            self.close()
            raise

    def add_workers(self, count, timeout=60, nanny=False, env=None, preload=None, prefix=()):
        """Start `count` more worker processes and wait until the scheduler sees them."""
        command = [*prefix, self._dask, "worker", self.address, "--host", "127.0.0.1", "--nthreads",
                   "1", "--nworkers", "1", "--no-dashboard", "--memory-limit", "0",
                   "--death-timeout", "60", "--lifetime", "900", "--local-directory",
                   self.folder, "--nanny" if nanny else "--no-nanny"]
        if preload:
            command += ["--preload", preload]
        self.workers += [self._start(command, env) for _ in range(count)]
        self._wait_for(sum(proc.poll() is None for proc in self.workers), timeout)

    def _start(self, command, env=None):
        proc = subprocess.Popen(command, cwd=self.folder, env=dict(os.environ, **(env or {})),
                                stdout=self._log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_for(self, workers, timeout):
        from distributed import Client
        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            while len(client.scheduler_info()["workers"]) < workers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{workers} Dask workers did not start in {timeout} s")
                time.sleep(0.2)

    def stop_worker(self, proc):
        """Stop one worker process (SIGTERM) and wait for it."""
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    def kill_scheduler(self):
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait()

    def close(self):
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
