"""Time of the N → ∞ theory of a whole study from its seeds alone
(dpp_pruning/experiments/theory_rows.py `study_theory`): no data, no SGD, no masks.

    python3 benchmarks/theory_only.py                    # studies/paper.toml, 1 and 5 students
    python3 benchmarks/theory_only.py --study studies/smoke.toml --students 1 2 --repeat 3

For each number of students and of jobs, prints the rows made and the wall-clock seconds of
study_theory: the first call in this process (it loads the compiled ODE right-hand side from
numba's cache and builds the table of older seeds; the first call with jobs > 1 also starts
multiprocessing's fork server, which imports the project once) and the best of --repeat
calls after it (with jobs > 1 each call forks its workers from that server, and each worker
loads the compiled right-hand side again). The ratio is jobs 1's best over this row's best,
for the same students. Then where jobs 1's time goes, per (data set, K): the seeded start, the ODE's
integration, and the pruning theory of its rescalings. Target (the issue's): the paper study
with 1 student in under 10 s. Torch and every BLAS run on one thread per process.
"""
import argparse
import os
import pathlib
import sys
import time

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_name] = "1"
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_S = 10.0


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def parts(study):
    """Seconds of jobs 1's three parts, summed per K: {K: [start, ODE, pruning]}."""
    from dpp_pruning.experiments import sweep
    from dpp_pruning.experiments import theory_rows as tr
    out = {}
    for dataset in sweep.datasets(study):
        for panel in sweep.panels_of(study, dataset):
            size = panel.student_h_size
            start_s, start = timed(tr.initial_order_parameters, study, dataset, size)
            ode_s, trajectory = timed(tr._integrate, study, dataset, size, start)
            prune_s = 0.0
            for rescale in study.rescale:
                seconds, _ = timed(tr.theory_losses, study, panel, trajectory.q[-1],
                                   trajectory.r[-1], trajectory.t, trajectory.v[-1],
                                   trajectory.v_star, dataset.noise, rescale)
                prune_s += seconds
            total = out.setdefault(size, [0.0, 0.0, 0.0, 0])
            total[0] += start_s
            total[1] += ode_s
            total[2] += prune_s
            total[3] += 1
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(ROOT / "studies" / "paper.toml"))
    parser.add_argument("--students", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start; "
          f"one thread per process; study {args.study}")
    import_s, _ = timed(__import__, "dpp_pruning.experiments.theory_rows")
    from dataclasses import replace

    from dpp_pruning.experiments import study as study_file
    from dpp_pruning.experiments import theory_rows as tr
    base = study_file.load(args.study)
    print(f"importing theory_rows (torch, scipy, numba): {import_s:.2f} s, not counted below")
    print("| students | jobs | rows | first call, s | best of "
          f"{args.repeat}, s | ratio (jobs 1 / this) | under {TARGET_S:g} s |")
    print("|---|---|---|---|---|---|---|")
    for students in args.students:
        study = replace(base, students=students)
        best = {}
        for jobs in args.jobs:
            first, rows = timed(tr.study_theory, study, jobs=jobs)
            times = [first] + [timed(tr.study_theory, study, jobs=jobs)[0]
                               for _ in range(args.repeat)]
            best[jobs] = min(times[1:]) if args.repeat else first
            ratio = best[min(best)] / best[jobs] if 1 in best else float("nan")
            print(f"| {students} | {jobs} | {len(rows)} | {first:.2f} | {best[jobs]:.2f} | "
                  f"{ratio:.2f} | {'yes' if best[jobs] < TARGET_S else 'no'} |", flush=True)
    study = replace(base, students=1)
    print(f"\nWhere jobs 1's time goes, {study.name} with 1 student (summed over its data "
          "sets; pruning: every method, budget and reweighting of every rescaling):")
    print("| K | (data set, K) pairs | seeded start, s | ODE to epochs P / N, s | "
          "pruning theory, s |")
    print("|---|---|---|---|---|")
    for size, (start_s, ode_s, prune_s, count) in parts(study).items():
        print(f"| {size} | {count} | {start_s:.3f} | {ode_s:.3f} | {prune_s:.3f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
