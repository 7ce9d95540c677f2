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
import functools
import hashlib
import importlib.metadata
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from dpp_pruning import ROOT
from dpp_pruning.base import cli

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


# ----------------------------------------------------------------------------------------
# What a process runs, as the Dask check compares it

def source_files(root=ROOT):
    """The project's source as a worker imports it: every module at the root (models.py,
    dpp_sample_ts.py, the scripts) and every module of the dpp_pruning package, as paths
    relative to `root`, sorted."""
    found = [name for name in os.listdir(root) if name.endswith(".py")]
    for folder, _, names in os.walk(os.path.join(root, "dpp_pruning")):
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if n.endswith(".py")]
    return sorted(found)


def source_hash(root=ROOT):
    """SHA-256 (16 hex digits) of the project's source files, names and contents."""
    digest = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16]


LIBRARIES = ("torch", "numpy", "scipy", "numba", "dppy", "threadpoolctl")


def library_versions():
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


@functools.lru_cache(maxsize=1)
def numeric_probe():
    """A hash of a tiny study's numbers, computed on one thread as units are: a teacher data
    set (labels and Gram matrix), a trained student (the numba SGD kernel), a dpp_edge
    kernel's eigendecomposition (LAPACK) and the batched test losses and hidden activations
    of pruned students (torch's float32 products). Two processes that disagree here would
    write other bytes for the same unit (another CPU type or math library)."""
    def compute():
        import numpy as np

        from dpp_pruning.base.data import generate_teacher
        from dpp_pruning.pipeline import workflow
        from dpp_sample_ts import edge_kernel, eig_kernel
        teacher = generate_teacher(24, 2, 4096, sig_w=0.25, seed=7)
        student = workflow.train(teacher, 3, seed=7)
        w1 = student.w1.weight.detach().double().numpy()                   # (3, 24)
        w2 = student.w2.weight.detach().double().numpy().ravel()
        eigvals, eigvecs = eig_kernel(edge_kernel(w1[0], teacher.gram.numpy()))
        masks = np.random.default_rng(7).random((4,) + w1.shape) < 0.5     # (4, 3, 24)
        losses = workflow.test_weights(teacher, w1 * masks, np.tile(w2, (4, 1)))
        digest = hashlib.sha256()
        for array in (teacher.labels.numpy(), teacher.gram.numpy(), w1, eigvals,
                      np.abs(eigvecs), losses, workflow.test_activations(teacher, student)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]
    return one_thread(compute)


def code_identity():
    """The code this process imports: host, project root, source hash, library versions
    (what a Dask scheduler needs to agree on: it unpickles the units' task graphs)."""
    return dict(host=socket.gethostname(), root=ROOT, code=source_hash(),
                versions=library_versions())


def identity(folder=None, token=None):
    """What this process runs units with, before any computation: `code_identity`, the
    memory available, and whether it reads `token` from `folder`'s token file (None: not
    asked). `numeric_probe` is asked apart, once the code is known to be the same."""
    found = dict(code_identity(), memory=cli.available_memory())
    if folder is not None:
        try:
            with open(os.path.join(folder, TOKEN_FILE)) as f:
                found["sees_folder"] = f.read() == token
        except OSError:
            found["sees_folder"] = False
    return found


TOKEN_FILE = ".worker_check"


def compare_identity(who, theirs, ours):
    """The one-line problem of a process whose identity differs from this client's, or None."""
    if theirs["code"] != ours["code"]:
        return (f"{who} runs other code than this client (the project at {theirs['root']} on "
                f"{theirs['host']} hashes to {theirs['code']}, this checkout to {ours['code']}):"
                " install the same checkout on every node (pip install -e .)")
    differ = [f"{name} {theirs['versions'][name]} (here {version})"
              for name, version in ours["versions"].items()
              if theirs["versions"].get(name) != version]
    if differ:
        return (f"{who} on {theirs['host']} has other libraries than this client: "
                f"{', '.join(differ)}; install requirements.txt in every node's environment")
    return None


def compare_numbers(who, host, theirs, ours):
    """The one-line problem of a worker whose numerical probe differs from this client's."""
    if theirs != ours:
        return (f"{who} on {host} computes other bits than this client for the same "
                "numbers (another CPU type or math library), so its units would not be the "
                "bytes of a local run: use nodes of this machine's kind, or set "
                "MKL_CBWR=COMPATIBLE for the client and every worker (docs/reproducibility.md)")
    return None


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
        ours = code_identity()
        try:
            scheduler = self._client.run_on_scheduler(code_identity)
        except Exception as e:      # noqa: BLE001 - whatever the scheduler failed with
            raise WorkerProblem(f"the Dask scheduler at {self.address} cannot run this "
                                f"checkout's code ({_one_line(e)}); start it in this "
                                "checkout's environment after `pip install -e .`, and again "
                                "after the code changes (docs/studies.md)") from None
        problem = compare_identity(f"the Dask scheduler at {self.address}", scheduler, ours)
        if problem:
            raise WorkerProblem(problem)
        from dpp_pruning.base.storage import atomic_open
        token = secrets.token_hex(16)
        path = os.path.join(out, TOKEN_FILE)
        with atomic_open(path, "w") as f:
            f.write(token)
        try:
            found = self._client.run(identity, out, token, on_error="return")
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
            problem = compare_identity(who, theirs, ours)
            if problem:
                raise WorkerProblem(problem)
            if not theirs["sees_folder"]:
                raise WorkerProblem(f"{who} on {theirs['host']} does not see the run folder "
                                    f"{out}: put it on a file system that every worker mounts "
                                    "at the same path")
            hosts[theirs["host"]].append(theirs["memory"])
        probes = self._client.run(numeric_probe, on_error="return")
        for worker, probe in sorted(probes.items()):
            who = f"Dask worker {worker}"
            if isinstance(probe, BaseException):
                raise WorkerProblem(f"{who} failed to compute the numerical probe "
                                    f"({_one_line(probe)})")
            problem = compare_numbers(who, found[worker]["host"], probe, numeric_probe())
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
