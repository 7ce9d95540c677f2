"""reproduce.py --scheduler: the smoke study on a real Dask scheduler and real worker processes
started from the `dask` command line on 127.0.0.1, stopped by the tests. Results must be the
same bytes as the committed --jobs 1 run (tests/fixtures/smoke_run), also when a worker is
killed with SIGKILL half-way."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import reproduce
from dpp_pruning.base import cli
from dpp_pruning.experiments import executors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "smoke_run")
COMPARED = ("results.csv", "expectations.csv", "claims.csv")
DASK = shutil.which("dask")
pytestmark = pytest.mark.skipif(DASK is None, reason="the dask command line is not installed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    with executors.LocalDaskCluster(2, str(tmp_path), root=ROOT) as c:
        yield c


def _same_as_fixture(out):
    for name in COMPARED:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(FIXTURE, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from the --jobs 1 run"


def test_smoke_study_on_a_dask_cluster_is_byte_identical_to_jobs_1(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    reproduce.main(["--preset", "smoke", "--students", "2", "--out", str(out),
                    "--scheduler", cluster.address])
    _same_as_fixture(out)
    printed = capsys.readouterr()
    assert (f"the workers of the Dask scheduler {cluster.address} "
            "(2 now; dashboard http://127.0.0.1:") in printed.out
    assert "smoke grid: 100%" in printed.err               # the same progress bar
    assert not (out / ".lock").exists()


def test_a_worker_killed_mid_run_loses_nothing(cluster, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "reproduce.py"), "--preset", "smoke",
               "--students", "2", "--out", str(out), "--scheduler", cluster.address]
    client = subprocess.Popen(command, cwd=str(tmp_path), env=executors.project_env(ROOT),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    cells = list(out.glob("student_*/cells/*.npz"))
    deadline = time.monotonic() + 300
    while len(cells) < 30:                                    # of 96 cells
        assert client.poll() is None, client.stdout.read()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
        cells = list(out.glob("student_*/cells/*.npz"))
    os.killpg(cluster.workers[0].pid, signal.SIGKILL)
    output, _ = client.communicate(timeout=300)
    assert client.returncode == 0, output
    assert cluster.workers[0].wait(timeout=10) == -signal.SIGKILL
    _same_as_fixture(out)
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))


def test_an_unreachable_scheduler_is_one_line_and_status_2(tmp_path, capsys):
    out = tmp_path / "run"
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--preset", "smoke", "--out", str(out), "--scheduler", address])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no Dask scheduler answered at {address}" in err[0]
    assert not out.exists()


def test_a_malformed_scheduler_address_is_one_line_before_any_connection(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(reproduce.main, ["--preset", "smoke", "--out", str(out), "--scheduler", "nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "error: --scheduler must be a Dask scheduler's address such as tcp://HOST:8786, got "
        "'nonsense'")
    assert not out.exists()
