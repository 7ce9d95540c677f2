"""Where reproduce.py's work units run: in this process, in a local process pool, or on a
Dask distributed cluster. All three have one interface:

    with executor as pool:
        pool.check(out, unit_bytes)                     # can it do the work? (one line if not)
        future = pool.submit(fn, *args)
        for future in pool.next_done(pending): ...      # at least one finished future
        result = pool.result(future)

Every unit runs on one thread (torch and BLAS), one unit at a time per process, so that its
results are the same bits wherever it runs: the parallelism is across units. On a Dask
cluster `check` makes sure of that before any unit is sent: the scheduler and every worker
import this checkout's code (a hash of its source, the root modules included) with the same
libraries, compute a small numerical probe to the same bits as this process, and see the run
folder (a token file written here and read there), with memory for one unit's data set.
"""
import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import secrets
import threading

from dpp_pruning.base import cli
from dpp_pruning.experiments import identity

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


class WorkerProblem(ValueError):
    """The executor cannot run the units as a local --jobs 1 run would; one line."""


class SchedulerLost(ConnectionError):
    """The Dask scheduler stopped answering during the run."""


def _data_file_bytes(study):
    """Bytes of a data set's data.npz: its test set (float32) and Gram matrix (float64)."""
    n = study.input_dim
    return 4 * study.num_test * (n + 1) + 8 * n * n


def unit_memory(study):
    """Bytes one worker process holds while it runs a unit of `study`: the training inputs
    the data set unit keeps between its passes (up to sweep.KEEP_BYTES; larger ones stream),
    one chunk of them in float64, the data file's test set and Gram matrix, and the dpp_edge
    kernels with their eigenvectors of the widest panel. A theory-only study holds no data."""
    from dpp_pruning.base.data import CHUNK_ROWS
    from dpp_pruning.experiments.sweep import KEEP_BYTES
    if study.theory == "only":
        return 256 << 20
    n, widest = study.input_dim, max(p.student_h_size for p in study.panels)
    inputs = 4 * study.num_data * n
    held = inputs if inputs <= KEEP_BYTES else 0
    return (int(1.1 * (held + _data_file_bytes(study))) + 2 * CHUNK_ROWS * n * 8
            + 2 * widest * n * n * 8)


def check_disk(study, out, datasets):
    """Refuse before any unit runs when `datasets` more data files would not fit on the disk
    of the run folder."""
    if datasets:
        cli.check_disk(datasets * _data_file_bytes(study), os.path.join(out, "x"),
                       f"{datasets} data set(s) of N = {study.input_dim}, {study.num_test} "
                       "test samples")


def _check_local_memory(slots, unit_bytes):
    cli.check_memory(slots * unit_bytes, f"{slots} worker process(es) holding one data set "
                     f"each ({unit_bytes / 2**30:.1f} GiB)")


class Serial:
    """Runs submitted work in this process, in order, one unit per `next_done`."""

    description = "this process"
    slots = 1

    def __init__(self):
        self._queue = collections.deque()

    def check(self, out, unit_bytes):
        _check_local_memory(1, unit_bytes)

    def result(self, future):
        return future.result()

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

    def check(self, out, unit_bytes):
        _check_local_memory(self.slots, unit_bytes)

    def submit(self, fn, *args):
        return self._pool.submit(one_thread, fn, *args)

    def next_done(self, pending):
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        return done

    def result(self, future):
        return future.result()

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
    system they all see; `check` refuses the run in one line otherwise. A unit whose worker
    dies is run again on another worker (Dask retries it); units write their files
    atomically, so a unit killed half-way leaves nothing behind but a temporary file that
    the next write removes. A scheduler that stops answering raises SchedulerLost."""

    # the client's own logs (reconnection attempts and their tracebacks when the scheduler
    # goes away) are silenced while the pool is open: what matters reaches the user as one line
    QUIET = ("distributed", "tornado", "asyncio")

    def __init__(self, address, timeout=5):
        import distributed
        self._distributed = distributed
        self.address = address
        names = [name for name in list(logging.root.manager.loggerDict) + list(self.QUIET)
                 if name.split(".")[0] in self.QUIET]
        self._levels = {name: logging.getLogger(name).level for name in names}
        for name in names:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        try:
            self._client = distributed.Client(address, timeout=timeout,
                                              set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            self._restore_logging()
            raise SchedulerUnreachable(f"no Dask scheduler answered at {address} within "
                                       f"{timeout} s ({type(e).__name__}); start one with "
                                       "`dask scheduler` or check the address") from None
        workers = self._client.scheduler_info().get("workers", {})
        self.slots = max(1, len(workers))
        self.dashboard = self._client.dashboard_link
        self.description = (f"the workers of the Dask scheduler {address} ({len(workers)} now;"
                            f" dashboard {self.dashboard})")

    def check(self, out, unit_bytes):
        """Refuse (WorkerProblem, one line) unless the scheduler and every worker import this
        checkout's code with the same libraries and bits, every worker sees `out`, and each
        host has memory for one data set per worker process on it."""
        ours = identity.code_identity()
        try:
            scheduler = self._client.run_on_scheduler(identity.code_identity)
        except Exception as e:      # noqa: BLE001 - whatever the scheduler failed with
            raise WorkerProblem(f"the Dask scheduler at {self.address} cannot run this "
                                f"checkout's code ({_one_line(e)}); start it in this "
                                "checkout's environment after `pip install -e .`, and again "
                                "after the code changes (docs/studies.md)") from None
        problem = identity.compare_identity(f"the Dask scheduler at {self.address}", scheduler,
                                            ours)
        if problem:
            raise WorkerProblem(problem)
        from dpp_pruning.base.storage import atomic_open
        token = secrets.token_hex(16)
        path = os.path.join(out, identity.TOKEN_FILE)
        with atomic_open(path, "w") as f:
            f.write(token)
        try:
            found = self._client.run(identity.identity, out, token, on_error="return")
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)
        if not found:
            raise WorkerProblem(f"the Dask scheduler at {self.address} has no workers; start "
                                f"them with `dask worker {self.address} --nthreads 1`")
        hosts = collections.defaultdict(list)
        for worker, theirs in sorted(found.items()):
            who = f"Dask worker {worker}"
            if isinstance(theirs, BaseException):
                raise WorkerProblem(f"{who} cannot run this checkout's code "
                                    f"({_one_line(theirs)}); start the workers in this "
                                    "checkout's environment after `pip install -e .`, and again "
                                    "after the code changes (docs/studies.md)")
            problem = identity.compare_identity(who, theirs, ours)
            if problem:
                raise WorkerProblem(problem)
            if not theirs["sees_folder"]:
                raise WorkerProblem(f"{who} on {theirs['host']} does not see the run folder "
                                    f"{out}: put it on a file system that every worker mounts "
                                    "at the same path")
            hosts[theirs["host"]].append(theirs["memory"])
        probes = self._client.run(identity.numeric_probe, on_error="return")
        for worker, probe in sorted(probes.items()):
            who = f"Dask worker {worker}"
            if isinstance(probe, BaseException):
                raise WorkerProblem(f"{who} failed to compute the numerical probe "
                                    f"({_one_line(probe)})")
            problem = identity.compare_numbers(who, found[worker]["host"], probe,
                                               identity.numeric_probe())
            if problem:
                raise WorkerProblem(problem)
        for host, memory in hosts.items():
            free = memory[0]
            if free is not None and len(memory) * unit_bytes > 0.9 * free:
                raise WorkerProblem(
                    f"the {len(memory)} Dask worker(s) on {host} need about "
                    f"{len(memory) * unit_bytes / 2**30:.1f} GiB for one data set each but "
                    f"{free / 2**30:.1f} GiB is available there; run fewer workers per node or "
                    "a smaller study")

    def submit(self, fn, *args):
        return self._client.submit(one_thread, fn, *args, pure=False)

    def next_done(self, pending):
        try:
            with self._client.as_current():
                done, _ = self._distributed.wait(list(pending), return_when="FIRST_COMPLETED")
        except (OSError, concurrent.futures.CancelledError, TimeoutError) as e:
            raise SchedulerLost(f"lost the Dask scheduler at {self.address} "
                                f"({type(e).__name__})") from None
        return done

    def result(self, future):
        if future.status == "cancelled":
            raise SchedulerLost(f"lost the Dask scheduler at {self.address} (its units were "
                                "cancelled)")
        try:
            return future.result()
        except (OSError, concurrent.futures.CancelledError) as e:
            raise SchedulerLost(f"lost the Dask scheduler at {self.address} "
                                f"({type(e).__name__})") from None

    def __enter__(self):
        return self

    def _restore_logging(self):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self._client.close(timeout=5)
        self._restore_logging()
        return False


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip().rstrip(":")


def executor(jobs=1, scheduler=None):
    """The executor for --jobs / --scheduler."""
    if scheduler:
        return DaskPool(scheduler)
    return Serial() if jobs == 1 else LocalPool(jobs)
