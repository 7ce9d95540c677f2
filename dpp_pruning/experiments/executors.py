"""Where reproduce.py's work units run: in this process, in a local process pool, or on a
Dask distributed cluster. All three have one interface:

    with executor as pool:
        future = pool.submit(fn, *args)
        for future in pool.next_done(pending): ...      # at least one finished future

Every unit runs on one thread (torch and BLAS), one unit at a time per process, so that its
results are the same bits wherever it runs: the parallelism is across units.
"""
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from dpp_pruning import ROOT

_UNIT_LOCK = threading.Lock()   # a Dask worker with several threads still runs one unit at a time


def one_thread(fn, *args):
    """fn(*args) with torch and every BLAS limited to one thread, then the limits restored."""
    import threadpoolctl
    import torch
    with _UNIT_LOCK, threadpoolctl.threadpool_limits(1):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)


class Serial:
    """Runs submitted work in this process, in order, one unit per `next_done`."""

    description = "this process"
    slots = 1

    def __init__(self):
        self._queue = collections.deque()

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        self._queue.append((future, fn, args))
        return future

    def next_done(self, pending):
        future, fn, args = self._queue.popleft()
        try:
            future.set_result(one_thread(fn, *args))
        except Exception as e:        # raised by future.result(), as from a process pool
            future.set_exception(e)
        return [future]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LocalPool:
    """Runs submitted work in `jobs` worker processes on this machine."""

    def __init__(self, jobs):
        self.description = f"{jobs} local worker processes"
        self.slots = jobs
        self._pool = concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn, *args):
        return self._pool.submit(one_thread, fn, *args)

    def next_done(self, pending):
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(cancel_futures=True)
        return False


class SchedulerUnreachable(ConnectionError):
    """No Dask scheduler answered at the address given."""


class DaskPool:
    """Runs submitted work on the workers of a running Dask distributed scheduler.

    The workers need this project importable (the same checkout) and the run folder on a file
    system they all see. A unit whose worker dies is run again on another worker (Dask
    retries it); units write their files atomically, so a unit killed half-way leaves nothing
    behind but a temporary file that the next write removes."""

    def __init__(self, address, timeout=10):
        import distributed
        self._distributed = distributed
        try:
            self._client = distributed.Client(address, timeout=timeout,
                                              set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise SchedulerUnreachable(f"no Dask scheduler answered at {address} within "
                                       f"{timeout} s ({type(e).__name__}); start one with "
                                       "`dask scheduler` or check the address") from None
        workers = self._client.scheduler_info().get("workers", {})
        self.slots = max(1, len(workers))
        self.dashboard = self._client.dashboard_link
        self.description = (f"the workers of the Dask scheduler {address} ({len(workers)} now;"
                            f" dashboard {self.dashboard})")

    def submit(self, fn, *args):
        return self._client.submit(one_thread, fn, *args, pure=False)

    def next_done(self, pending):
        with self._client.as_current():
            done, _ = self._distributed.wait(list(pending), return_when="FIRST_COMPLETED")
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._client.close()
        return False


def executor(jobs=1, scheduler=None):
    """The executor for --jobs / --scheduler."""
    if scheduler:
        return DaskPool(scheduler)
    return Serial() if jobs == 1 else LocalPool(jobs)


def project_env(root=ROOT):
    """This process's environment with the project at `root` importable (a worker's)."""
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


class LocalDaskCluster:
    """A Dask scheduler and `workers` worker processes on 127.0.0.1, started from the `dask`
    command line as on a real cluster (one thread each, no nanny, so a killed worker stays
    dead), with this project importable; `close` stops them all. For tests and benchmarks."""

    def __init__(self, workers, folder, root=None, timeout=60):
        dask = shutil.which("dask")
        if dask is None:
            raise FileNotFoundError("the dask command line is not installed (requirements.txt)")
        root = root or ROOT
        self._env = project_env(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        self.procs = []
        # held open for the processes' output while the cluster runs; closed by close()
        self._log = open(os.path.join(folder, "dask_cluster.log"), "w")  # noqa: SIM115
        self._start([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--dashboard-address", "127.0.0.1:0", "--idle-timeout", "600"], root)
        self.workers = [self._start([dask, "worker", self.address, "--host", "127.0.0.1",
                                     "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                                     "--no-dashboard", "--memory-limit", "0",
                                     "--death-timeout", "60", "--lifetime", "900",
                                     "--local-directory", folder], root)
                        for _ in range(workers)]
        try:
            self._wait_for(workers, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, command, root):
        proc = subprocess.Popen(command, cwd=root, env=self._env, stdout=self._log,
                                stderr=subprocess.STDOUT, start_new_session=True)
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

    def close(self):
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
