#!/usr/bin/env python3
"""dpp_edge k-DPP draws: KDPP.sample_many against the row-by-row sampler, one thread.

    python3 benchmarks/kdpp_batch.py [--nodes 6] [--calls 5] [--draws 20] [--big_draws 20]

Not part of the test suite. Paper-like kernels: n = 500, L_i = diag(w_i) G diag(w_i) for
`--nodes` hidden nodes, w_i ~ N(0, I) rescaled to norm √n, G = XᵀX / P from P = 20000
Gaussian rows. For every k in 83, 166, 250, 333, 417 each kernel gets `--calls` calls of
`--draws` draws, as that many pruning rounds would ask, from both samplers given the same
seed: the row-by-row chain rule that updates every row at every step
(tests/reference.reference_kdpp_sample_many, the baseline of every ratio) and
KDPP.sample_many (lazy row updates as small matrix products). Then one line at n = 2000,
k = 1000 (one kernel, one call of `--big_draws` draws).

Times are CPU seconds of this process (time.process_time, one BLAS thread, the samplers are
single-threaded numba), summed over the calls; the machine's load average is printed
because wall times on a shared machine carry the other users' load. GFLOP/s counts the
arithmetic each method needs per draw, with d = min(k, n - k): 3 n d² for the row-by-row
rule (V V[j]ᵀ and the correction C C[j]ᵀ for every row at every step), 2 n d² + d³ for
sample_many (V q_t for every row once per step, Gram-Schmidt in d coordinates). "same"
says whether every draw of sample_many equals the baseline's.
"""
import argparse
import os
import pathlib
import sys
import time

import numpy as np
import threadpoolctl

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):          # the project's modules; tests/reference.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from dpp_sample_ts import KDPP, edge_kernel  # noqa: E402
from reference import reference_kdpp_sample_many  # noqa: E402

KS = (83, 166, 250, 333, 417)


def edge_kdpps(n, nodes, samples, seed):
    """KDPPs of `nodes` dpp_edge kernels at input dimension n, G from `samples` rows."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, n))                                    # (P, n)
    gram = X.T @ X / samples                                                 # (n, n)
    del X
    w = rng.standard_normal((nodes, n))
    w *= np.sqrt(n) / np.linalg.norm(w, axis=1, keepdims=True)               # (K, n)
    return [KDPP(edge_kernel(w_i, gram)) for w_i in w]


def compare(kdpps, k, calls, draws):
    """CPU seconds of both samplers over every kernel and call, and whether they agree.
    -> (baseline s, sample_many s, number of draws, number of differing draws)."""
    t_ref = t_new = 0.0
    differ = 0
    for i, kdpp in enumerate(kdpps):
        for call in range(calls):
            seed = (k, i, call)
            start = time.process_time()
            ref = reference_kdpp_sample_many(kdpp, k, draws, np.random.default_rng(seed))
            t_ref += time.process_time() - start
            start = time.process_time()
            new = kdpp.sample_many(k, draws, np.random.default_rng(seed))
            t_new += time.process_time() - start
            differ += int(np.any(ref != new, axis=1).sum())
    return t_ref, t_new, len(kdpps) * calls * draws, differ


def line(n, k, t_ref, t_new, num, differ):
    d = min(k, n - k)
    flops_ref = 3.0 * n * d * d * num
    flops_new = (2.0 * n * d * d + d ** 3) * num
    same = "yes" if differ == 0 else f"NO ({differ} of {num} draws differ)"
    return (f"{n:5d} {k:5d} {num:6d} {t_ref:9.2f} {t_new:9.2f} {t_ref / t_new:7.2f} "
            f"{flops_ref / t_ref / 1e9:8.1f} {flops_new / t_new / 1e9:8.1f}  {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--big_draws", type=int, default=20)
    args = parser.parse_args()

    threadpoolctl.threadpool_limits(1)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("    n     k  draws    ref s    new s   ratio ref GF/s new GF/s  same")
    kdpps = edge_kdpps(500, args.nodes, 20000, seed=0)
    for kdpp in kdpps[:1]:                       # compile (or load) the numba functions
        kdpp.sample_many(3, 2, np.random.default_rng(0))
        reference_kdpp_sample_many(kdpp, 3, 2, np.random.default_rng(0))
    totals = np.zeros(2)
    for k in KS:
        t_ref, t_new, num, differ = compare(kdpps, k, args.calls, args.draws)
        totals += (t_ref, t_new)
        print(line(500, k, t_ref, t_new, num, differ), flush=True)
    print(f"all k at n = 500: {totals[0]:.2f} s against {totals[1]:.2f} s, "
          f"ratio {totals[0] / totals[1]:.2f}")
    big = edge_kdpps(2000, 1, 20000, seed=1)
    t_ref, t_new, num, differ = compare(big, 1000, 1, args.big_draws)
    print(line(2000, 1000, t_ref, t_new, num, differ))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
