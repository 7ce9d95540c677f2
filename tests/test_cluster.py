"""reproduce.py --scheduler on real Dask schedulers and worker processes, started by the tests on
127.0.0.1 from the `dask` command line beside this interpreter (never skipped: requirements.txt
installs it), in a folder other than the checkout, and stopped by the tests. Every run that
ends must have written the bytes of a clean local --jobs 1 run of the same study (`local_run`);
every run that cannot must end in one line with exit status 2."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dpp_pruning.experiments import identity, local_cluster
from run_folders import assert_same_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ("--preset", "smoke", "--students", "2")
BIN = os.path.dirname(sys.executable)


def client(args, cwd, timeout=600):
    """Run reproduce.py as a user types it, from `cwd` -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def start_client(args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "reproduce.py"), *args],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(stderr):
    """The stderr of a refused run: one line, `reproduce.py: error: ...`, after at most the
    lines of the progress bar."""
    lines = [line for line in stderr.strip().splitlines()
             if not re.match(r"^\S+ grid: +\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("reproduce.py: error: "), stderr
    return lines[0]


def wait_for_cells(out, count, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while len(list(out.glob("student_*/cells/*.npz"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A scheduler and two workers for the tests that need no cluster of their own."""
    with local_cluster.LocalDaskCluster(2, str(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


@pytest.fixture
def cluster(shared):
    """The shared cluster, given back to the next test as it was: two sound workers (those a
    test added are stopped, those it killed are replaced)."""
    before = list(shared.workers)
    yield shared
    for proc in shared.workers:
        if proc not in before and proc.poll() is None:
            shared.stop_worker(proc)
    alive = [proc for proc in before if proc.poll() is None]
    shared.workers = alive
    if len(alive) < len(before):
        shared.add_workers(len(before) - len(alive))


def test_the_dask_command_is_found_beside_the_interpreter(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")           # an environment used unactivated
    assert local_cluster.dask_command() == os.path.join(BIN, "dask")


def recipe():
    """The commands of docs/studies.md's cluster recipe, in order."""
    with open(os.path.join(ROOT, "docs", "studies.md")) as f:
        text = f.read()
    block = re.search(r"The recipe, run as written.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_docs_recipe_run_as_written_from_other_folders(tmp_path, local_run):
    """Steps 2-4 of the recipe, with HOST = 127.0.0.1, free ports, CORES = 2, the smoke study
    and a relative --out; the scheduler, the workers and the client each in a folder of its
    own, none of them the checkout, and no PYTHONPATH: the installed project is imported."""
    install, scheduler, worker, run = recipe()
    assert install.endswith("make install")
    port, dashboard = local_cluster.free_port(), local_cluster.free_port()

    def filled(line):
        return (line.replace("HOST", "127.0.0.1").replace("8786", str(port))
                .replace("8787", str(dashboard)).replace("CORES", "2"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = BIN + os.pathsep + env["PATH"]             # the environment, activated
    folders = {name: tmp_path / name for name in ("scheduler", "workers", "client")}
    for folder in folders.values():
        folder.mkdir()
    procs = []
    try:
        for line, where in ((scheduler, "scheduler"), (worker, "workers")):
            procs.append(subprocess.Popen(filled(line).split(), cwd=folders[where], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            time.sleep(2)
        args = filled(run).split()
        assert args[:2] == ["python3", "reproduce.py"]
        args = args[2:]
        args[args.index("--study"):args.index("--study") + 2] = SMOKE
        args[args.index("--out") + 1] = "rel"
        deadline = time.monotonic() + 120
        while True:                                          # the workers take a moment
            done = client(args, folders["client"])
            if done.returncode == 0 or "has no workers" not in done.stderr:
                break
            assert time.monotonic() < deadline, done.stderr
            time.sleep(1)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"the workers of the Dask scheduler tcp://127.0.0.1:{port} (2 now" in done.stdout
    assert_same_tables(folders["client"] / "rel", local_run(*SMOKE))
    assert not list((folders["workers"]).rglob("*.csv"))     # nothing went to a worker's folder


def test_a_worker_killed_mid_run_loses_nothing(cluster, tmp_path, local_run):
    out = tmp_path / "run"
    proc = start_client([*SMOKE, "--out", str(out), "--scheduler", cluster.address], tmp_path)
    wait_for_cells(out, 30, proc)                               # of 96 cells
    os.killpg(cluster.workers[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert cluster.workers[0].wait(timeout=10) == -signal.SIGKILL
    assert_same_tables(out, local_run(*SMOKE))
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))


def test_a_folder_made_again_is_not_served_from_the_workers_cache(cluster, tmp_path,
                                                                  local_run):
    """Run study A into a folder, remove it, run study B (another lr) into the same path on the
    same workers: B's tables are those of B run alone (a cache keyed by the folder's path gave
    most of B's K = 6 rows A's unpruned loss)."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    with open(os.path.join(ROOT, "studies", "smoke.toml")) as f:    # one data set: one worker
        text = f.read().replace('name = "smoke"', 'name = "lr"').replace(   # makes it, the
            "noise_levels = [0.0, 0.25]", "noise_levels = [0.0]")          # other has a cache
    a.write_text(text)
    b.write_text(text.replace("lr = 0.5", "lr = 0.3"))
    out = tmp_path / "run"
    first = client(["--study", str(a), "--out", str(out), "--scheduler", cluster.address],
                   tmp_path)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(out)
    second = client(["--study", str(b), "--out", str(out), "--scheduler", cluster.address],
                    tmp_path)
    assert second.returncode == 0, second.stderr
    assert_same_tables(out, local_run("--study", b))


def test_a_lost_scheduler_is_one_line_and_the_resume_is_byte_identical(tmp_path, local_run):
    elsewhere = tmp_path / "cluster"
    elsewhere.mkdir()
    out = tmp_path / "run"
    with local_cluster.LocalDaskCluster(2, str(elsewhere)) as c:
        proc = start_client([*SMOKE, "--out", str(out), "--scheduler", c.address], tmp_path)
        wait_for_cells(out, 48, proc)                          # half of the 96 cells
        c.kill_scheduler()
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2
    line = one_error_line(err)
    done = re.search(r"lost the Dask scheduler at tcp://127\.0\.0\.1:\d+ .*: (\d+) of (\d+) units "
                     r"done and kept in (\S+); start the scheduler and its workers again and "
                     r"run the same command to resume$", line)
    total = 96 + 8 + 8                             # cells, expectation groups, theory units
    assert done and 0 < int(done.group(1)) < total == int(done.group(2)), line
    assert done.group(3) == str(out), line
    with local_cluster.LocalDaskCluster(2, str(elsewhere)) as c:
        resumed = client([*SMOKE, "--out", str(out), "--scheduler", c.address], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    kept = int(re.search(r"(\d+) already done", resumed.stdout).group(1))
    assert int(done.group(1)) <= kept < total
    assert_same_tables(out, local_run(*SMOKE))


KILLER = '''
import os, signal
from dpp_pruning.experiments import sweep
_run_cell = sweep.run_cell


def run_cell(study, folder, cell):
    if cell.name == os.environ["KILL_UNIT"]:
        with open(os.environ["KILL_LOG"], "a") as f:
            f.write("killed\\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return _run_cell(study, folder, cell)


sweep.run_cell = run_cell
'''


def test_a_unit_that_kills_its_workers_is_named_and_the_rest_kept(tmp_path):
    """A unit whose worker dies each time it runs it (its nanny restarts the worker): after
    the scheduler's allowed failures (2 here: three deaths) the run stops in one line naming
    the unit, and the units finished by then are kept (the resume of a stopped run is the
    lost scheduler's test)."""
    elsewhere = tmp_path / "cluster"
    elsewhere.mkdir()
    (elsewhere / "killer.py").write_text(KILLER)
    unit = "sigma0_K6_dpp_node_k3"
    out = tmp_path / "run"
    with local_cluster.LocalDaskCluster(
            0, str(elsewhere),
            scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "2"}) as c:
        c.add_workers(2, nanny=True, preload=str(elsewhere / "killer.py"),
                      env={"KILL_UNIT": unit, "KILL_LOG": str(elsewhere / "killed.log")})
        failed = client(["--preset", "smoke", "--out", str(out), "--scheduler", c.address],
                        tmp_path)
    assert (elsewhere / "killed.log").read_text().count("killed") == 3
    assert failed.returncode == 2, failed.stderr
    line = one_error_line(failed.stderr)
    assert line == (f"reproduce.py: error: {out}: unit {unit} killed every Dask worker that ran "
                    "it, up to the scheduler's limit of retries (out of memory?); the units "
                    "already done are kept: give each worker more memory (docs/studies.md) and "
                    "run the same command to resume"), line
    assert not (out / "student_0" / "cells" / f"{unit}.npz").exists()
    assert list(out.glob("student_0/theory/*.npz"))      # the units done before are kept


def copy_of_the_project(to):
    """A copy of the project's source (what a worker imports) and studies/."""
    for rel in identity.source_files(ROOT):
        os.makedirs(os.path.dirname(os.path.join(to, rel)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), os.path.join(to, rel))
    shutil.copytree(os.path.join(ROOT, "studies"), os.path.join(to, "studies"))
    return to


def test_workers_that_would_write_other_bytes_are_refused(cluster, tmp_path):
    """A worker on a modified copy of the project, then a worker whose math library takes
    another code path (MKL_CBWR=COMPATIBLE, which changes the rounding of torch's products):
    each is named in one line, and no unit is sent."""
    copy = copy_of_the_project(tmp_path / "copy")
    with open(copy / "models.py", "a") as f:
        f.write("\n# a local change\n")
    out = tmp_path / "run"
    args = [*SMOKE, "--out", str(out), "--scheduler", cluster.address]
    cluster.add_workers(1, env=local_cluster.project_env(str(copy)))
    other_code = client(args, tmp_path)
    cluster.stop_worker(cluster.workers[-1])
    cluster.add_workers(1, env={"MKL_CBWR": "COMPATIBLE"})
    other_bits = client(args, tmp_path)
    assert other_code.returncode == 2 and other_bits.returncode == 2
    assert re.fullmatch(
        r"reproduce\.py: error: Dask worker tcp://127\.0\.0\.1:\d+ runs other code than this "
        rf"client \(the project at {re.escape(str(copy))} on \S+ hashes to [0-9a-f]{{16}}, this "
        r"checkout to [0-9a-f]{16}\): install the same checkout on every node "
        r"\(pip install -e \.\)", one_error_line(other_code.stderr)), other_code.stderr
    assert re.fullmatch(
        r"reproduce\.py: error: Dask worker tcp://127\.0\.0\.1:\d+ on \S+ computes other bits "
        r"than this client for the same numbers \(another CPU type or math library\), so its "
        r"units would not be the bytes of a local run: use nodes of this machine's kind, or set "
        r"MKL_CBWR=COMPATIBLE for the client and every worker \(docs/reproducibility\.md\)",
        one_error_line(other_bits.stderr)), other_bits.stderr
    assert not out.exists()


def test_a_scheduler_that_cannot_import_the_project_is_refused(tmp_path):
    """A scheduler started where the project is not installed (the site-packages of this
    environment without its .pth files, so without the editable install) cannot unpickle the
    units: one line before any unit is sent."""
    import site
    packages = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "start.py").write_text(
        f"import sys\nsys.path[:0] = {packages!r}\n"
        "from distributed.cli.dask_scheduler import main\nmain()\n")
    port = local_cluster.free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-S", "start.py", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", f"127.0.0.1:{local_cluster.free_port()}"], cwd=bare,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "run"
    try:
        deadline = time.monotonic() + 60
        while True:
            refused = client([*SMOKE, "--out", str(out), "--scheduler", address], tmp_path)
            if "no Dask scheduler answered" not in refused.stderr:
                break
            assert time.monotonic() < deadline, refused.stderr
    finally:
        os.killpg(scheduler.pid, signal.SIGTERM)
        scheduler.wait(timeout=30)
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert (f"error: the Dask scheduler at {address} cannot run this checkout's code "
            "(ModuleNotFoundError: No module named 'dpp_pruning'); start it in this "
            "checkout's environment after `pip install -e .`") in line, line
    assert not out.exists()


def test_a_worker_that_does_not_see_the_run_folder_is_refused(cluster, tmp_path):
    """A worker in a mount namespace of its own, where the run folder's parent is an empty
    file system (as on a node that does not mount the shared one), cannot read the client's
    token file: it is named, and no unit is sent."""
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "run"
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs none "$0" && exec "$@"', str(runs)]
    cluster.add_workers(1, prefix=private)
    refused = client([*SMOKE, "--out", str(out), "--scheduler", cluster.address], tmp_path)
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert re.fullmatch(rf"reproduce\.py: error: Dask worker tcp://127\.0\.0\.1:\d+ on \S+ does "
                        rf"not see the run folder {re.escape(str(out))}: put it on a file system "
                        r"that every worker mounts at the same path", line), line
    assert not out.exists()


def test_an_unreachable_scheduler_is_one_line_and_status_2(tmp_path):
    out = tmp_path / "run"
    address = f"tcp://127.0.0.1:{local_cluster.free_port()}"
    refused = client(["--preset", "smoke", "--out", str(out), "--scheduler", address], tmp_path)
    assert refused.returncode == 2
    assert f"no Dask scheduler answered at {address}" in one_error_line(refused.stderr)
    assert not out.exists()


def test_a_malformed_scheduler_address_is_one_line_before_any_connection(tmp_path):
    out = tmp_path / "run"
    refused = client(["--preset", "smoke", "--out", str(out), "--scheduler", "nonsense"],
                     tmp_path)
    assert refused.returncode == 2
    assert one_error_line(refused.stderr).endswith(
        "error: --scheduler must be a Dask scheduler's address such as tcp://HOST:8786, got "
        "'nonsense'")
    assert not out.exists()


JOBQUEUE = '''
import sys, time
from dask_jobqueue.local import LocalCluster
cluster = LocalCluster(cores=1, processes=1, memory="2GB", python=sys.executable,
                       local_directory=sys.argv[1],
                       scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
cluster.scale(jobs=2)
print(cluster.scheduler_address, flush=True)
time.sleep(600)
'''


def test_the_smoke_study_through_dask_jobqueue(tmp_path, local_run):
    """dask-jobqueue's local job runner: the JobQueueCluster machinery of SLURMCluster (the job
    script, its worker command line with a nanny, scale(jobs=...), the scheduler inside the
    Python process that made the cluster), with the jobs started as local processes instead
    of through sbatch."""
    elsewhere = tmp_path / "jobqueue"
    elsewhere.mkdir()
    (elsewhere / "cluster.py").write_text(JOBQUEUE)
    holder = subprocess.Popen([sys.executable, "cluster.py", str(elsewhere)], cwd=elsewhere,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        out = tmp_path / "run"
        deadline = time.monotonic() + 120
        while True:
            done = client([*SMOKE, "--out", str(out), "--scheduler", address], tmp_path)
            if done.returncode == 0 or "has no workers" not in done.stderr:
                break
            assert time.monotonic() < deadline, done.stderr
            time.sleep(1)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)        # the cluster, its scheduler and its jobs
        holder.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    assert_same_tables(out, local_run(*SMOKE))
