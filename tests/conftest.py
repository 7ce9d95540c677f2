"""Shared fixtures: the project root on sys.path, and clean local runs of studies to compare
other runs with."""
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    """local_run(*args) -> the folder of a clean local `reproduce.py *args --jobs 1` run in
    this process, made once per pytest run: the reference every other way of running the
    same study (a Dask cluster, a folder grown or resumed) must equal byte for byte."""
    import reproduce
    made = {}

    def run(*args):
        args = tuple(str(a) for a in args)
        if args not in made:
            out = tmp_path_factory.mktemp("local_run") / "run"
            reproduce.main(list(args) + ["--jobs", "1", "--out", str(out)])
            made[args] = out
        return made[args]
    return run
