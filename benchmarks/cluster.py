"""reproduce.py on a local process pool against a Dask cluster of as many workers, in one run.

    python3 benchmarks/cluster.py                       # small preset, 1 student, 2 workers
    python3 benchmarks/cluster.py --preset smoke --workers 2 --no_op 400

Runs the same study from scratch twice, `--jobs W` and `--scheduler` with W one-thread Dask
workers started on 127.0.0.1, and prints both wall times, their ratio (baseline: --jobs W),
whether results.csv, expectations.csv and claims.csv are the same bytes, and the overhead
per work unit of each executor measured on `--no_op` units that do nothing. Writes the
report to benchmarks/cluster_results.md (--out).
"""
import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dpp_pruning.experiments import executors, local_cluster  # noqa: E402  (the root first)


def no_op():
    return None


def time_run(command, cwd):
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def per_unit_overhead(pool, units):
    """Seconds per unit to submit and collect `units` units that do nothing."""
    with pool:
        pool.next_done([pool.submit(no_op)])             # warm: workers started, torch imported
        start = time.perf_counter()
        pending = {pool.submit(no_op) for _ in range(units)}
        while pending:
            pending -= set(pool.next_done(pending))
        return (time.perf_counter() - start) / units


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--students", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no_op", type=int, default=400, help="no-op units for the overhead")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "cluster_results.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        base = [sys.executable, os.path.join(ROOT, "reproduce.py"), "--preset", args.preset,
                "--students", str(args.students)]
        local_out, dask_out = os.path.join(work, "local"), os.path.join(work, "dask")
        local = time_run(base + ["--jobs", str(args.workers), "--out", local_out], ROOT)
        with local_cluster.LocalDaskCluster(args.workers, work) as cluster:
            remote = time_run(base + ["--scheduler", cluster.address, "--out", dask_out], ROOT)
            dask_unit = per_unit_overhead(executors.DaskPool(cluster.address), args.no_op)
        local_unit = per_unit_overhead(executors.LocalPool(args.workers), args.no_op)
        identical = {name: filecmp.cmp(os.path.join(local_out, name),
                                       os.path.join(dask_out, name), shallow=False)
                     for name in ("results.csv", "expectations.csv", "claims.csv")}
    load_after = os.getloadavg()
    lines = [
        f"# reproduce.py: --jobs {args.workers} against {args.workers} Dask workers",
        "",
        f"`python3 benchmarks/cluster.py --preset {args.preset} --students {args.students} "
        f"--workers {args.workers} --no_op {args.no_op}`, {time.strftime('%Y-%m-%d')}; "
        f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before and "
        f"{load_after[0]:.1f} after.",
        "",
        "| executor | wall time | ratio (baseline: --jobs) | overhead per unit |",
        "|---|---|---|---|",
        f"| --jobs {args.workers} (local processes) | {local:.1f} s | 1.00 | "
        f"{1000 * local_unit:.2f} ms |",
        f"| --scheduler, {args.workers} Dask workers on 127.0.0.1 | {remote:.1f} s | "
        f"{remote / local:.2f} | {1000 * dask_unit:.2f} ms |",
        "",
        "The Dask workers are started (and have imported torch) before the clock starts; the "
        "local pool's start-up is inside its time, as it is inside every --jobs run.",
        "",
        "Same bytes in both runs: " + ", ".join(f"{name} {'yes' if same else 'NO'}"
                                                for name, same in identical.items()) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
