"""Speed of the order-parameter ODEs (dpp_pruning/theory/order_param_odes.py) against the
previous integration (tests/test_ode.py `reference_integrate`: RK45 on the full Q, R, v with
the numpy closed forms and the previous compiled I4 loop), at the paper's settings: the
simulation's initial student at N = 500 (seed 1) against a teacher w* ~ N(0, 1), M = 2,
v* = 4, eta = 0.5, sigma = 0, alpha up to 1600 with 50 log-spaced outputs, on one thread.

    python3 benchmarks/ode_speed.py             # K = 6 and K = 20, best of 3: about 30 s
    python3 benchmarks/ode_speed.py --tight     # and both against the previous at rtol 1e-10

Prints, per K, the seconds, right-hand-side evaluations and final eps_g of both, the ratio of
the times (previous / ours), and the largest relative differences of the final Q, R, v and
eps_g and of the eps_g curve (tests/test_ode.py `largest_differences`); then the time of one
right-hand-side evaluation of each. Compilation is excluded (one short warm-up integration
first); times are the best of --repeat runs.
"""
import argparse
import math
import os
import pathlib
import sys
import time

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_name] = "1"
ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):          # the project; tests/test_ode.py (the reference)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from dpp_pruning.theory import order_param_odes as ode  # noqa: E402

V_STAR, LR, ALPHA_MAX = [4.0, 4.0], 0.5, 1600.0


def best_of(repeat, integrate, *args, **kwargs):
    """The Trajectory of the fastest of `repeat` identical integrations."""
    runs = [integrate(*args, **kwargs) for _ in range(repeat)]
    return min(runs, key=lambda run: run.seconds)


def seconds_per_call(function, *args, calls=200, repeat=5):
    """Best over `repeat` rounds of the mean time of `calls` calls of function(*args)."""
    function(*args)
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            function(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def right_hand_sides(k):
    """Seconds of one right-hand-side evaluation at the initial state: the previous
    (`reference_derivatives`) and ours (`ode.rates` on the packed state)."""
    from test_ode import paper_start, reference_derivatives
    q, r, t, v = paper_start(k)
    v_star = np.array(V_STAR)
    previous = seconds_per_call(reference_derivatives, q, r, t, v, v_star, LR)
    ours = seconds_per_call(ode.rates, ode.pack(q, r, v), k, t, v_star, LR, 0.0, True)
    return previous, ours


def compare(k, repeat, tight):
    """Rows of the table for K = k: (label, baseline, compared, differences of compared)."""
    from test_ode import largest_differences, paper_start, reference_integrate
    q, r, t, v = paper_start(k)
    alphas = np.concatenate([[0.0], np.geomspace(0.01, ALPHA_MAX, 49)])
    args = (q, r, t, v, V_STAR, LR)
    for integrate in (ode.integrate, reference_integrate):          # compile, warm up
        integrate(*args, alphas[:3])
    previous = best_of(repeat, reference_integrate, *args, alphas)
    ours = best_of(repeat, ode.integrate, *args, alphas)
    rows = [("previous / ours", previous, ours, largest_differences(ours, previous))]
    if tight:
        exact = reference_integrate(*args, alphas, rtol=1e-10, atol=1e-12)
        rows.append(("previous at rtol 1e-10 / previous", exact, previous,
                     largest_differences(previous, exact)))
        rows.append(("previous at rtol 1e-10 / ours", exact, ours,
                     largest_differences(ours, exact)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[6, 20])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tight", action="store_true",
                        help="also integrate the previous way at rtol 1e-10, atol 1e-12")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start; "
          f"one thread; times: best of {args.repeat}")
    print("Integrations at rtol 1e-8, atol 1e-10 unless named. Columns: baseline / compared;"
          " the time ratio is the baseline's time over the compared one's; the differences"
          " are the compared one's, relative to the baseline.")
    print("| K | baseline / compared | baseline: s, evaluations, final eps_g | compared: s, "
          "evaluations, final eps_g | time ratio | largest relative differences |")
    print("|---|---|---|---|---|---|")
    for k in args.k:
        for label, baseline, other, gaps in compare(k, args.repeat, args.tight):
            gap_text = ", ".join(f"{name} {value:.1e}" for name, value in gaps.items())
            print(f"| {k} | {label} | {baseline.seconds:.3f}, {baseline.evaluations}, "
                  f"{baseline.eps_g[-1]:.10g} | {other.seconds:.3f}, {other.evaluations}, "
                  f"{other.eps_g[-1]:.10g} | {baseline.seconds / other.seconds:.1f} | "
                  f"{gap_text} |", flush=True)
    print("\nOne right-hand-side evaluation at the initial state (best of 5 rounds of 200):")
    for k in args.k:
        previous, ours = right_hand_sides(k)
        print(f"K = {k}: previous {1e6 * previous:.1f} us, ours {1e6 * ours:.1f} us, "
              f"ratio {previous / ours:.1f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
