"""Exact k-DPP sampler: draws against brute-force enumeration, rounding, failures."""

import itertools
import json
import os
import platform
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import threadpoolctl
from scipy import stats
from scipy.special import gammaln

from dpp_sample_ts import (
    KDPP,
    KDPPError,
    choose_eigvecs,
    eig_kernel,
    eigvec_keep_probabilities,
    exact_inclusion_probabilities,
    exact_subset_probabilities,
    sample_projection_dpp,
)
from reference import reference_kdpp_sample_many, reference_projection_dpp

NUM_DRAWS = 6000


def spectral_kernel(eigvals, seed):
    """eigvals (n,) -> L (n, n) = Q diag(eigvals) Qᵀ with Q a random orthogonal matrix."""
    n = len(eigvals)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (Q * np.asarray(eigvals)) @ Q.T


def low_rank_kernel(n, r, seed):
    """B (n, r) with rows of uneven scale -> (L = B Bᵀ (n, n), B)."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, r)) * rng.uniform(0.3, 2.0, size=(n, 1))
    return B @ B.T, B


def edge_like_kernel(n, seed):
    """A small dpp_edge kernel: diag(w) G diag(w), G = XᵀX / P close to I (X (P, n) Gaussian,
    P = 50 n), w (n,) Gaussian rescaled to norm √n."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((50 * n, n))
    w = rng.standard_normal(n)
    w *= np.sqrt(n) / np.linalg.norm(w)
    return (X.T @ X / (50 * n)) * np.outer(w, w)


def chi_square(draws, probs):
    """Pearson's chi-square of the subsets drawn (num, k) against {subset: probability}:
    cells with expected count below 5 are pooled into one. -> (statistic, dof, p-value)."""
    num = len(draws)
    counts = Counter(map(tuple, draws.tolist()))
    subsets = sorted(set(probs) | set(counts))
    expected = np.array([probs.get(s, 0.0) for s in subsets]) * num    # (s,)
    observed = np.array([counts[s] for s in subsets], dtype=float)       # (s,)
    small = expected < 5
    f_exp = np.append(expected[~small], expected[small].sum())
    f_obs = np.append(observed[~small], observed[small].sum())
    if f_exp[-1] == 0:
        if f_obs[-1] > 0:                                                 # drawn, impossible
            return np.inf, len(f_exp) - 1, 0.0
        f_exp, f_obs = f_exp[:-1], f_obs[:-1]
    statistic = float(np.sum((f_obs - f_exp) ** 2 / f_exp))
    dof = len(f_exp) - 1
    return statistic, dof, float(stats.chi2.sf(statistic, dof))


def assert_matches_exact(draws, L):
    """draws (num, k) vs the k-DPP(L) by enumeration: support, chi-square, inclusion."""
    num, k = draws.shape
    subset_probs = exact_subset_probabilities(L, k)
    counts = Counter(map(tuple, draws.tolist()))
    assert set(counts) <= {s for s, p in subset_probs.items() if p > 0}

    subsets = list(subset_probs)
    expected = np.array([subset_probs[s] for s in subsets]) * num  # (s,)
    observed = np.array([counts[s] for s in subsets], dtype=float)  # (s,)
    small = expected < 5  # pool sparse cells into one
    f_exp = np.append(expected[~small], expected[small].sum())
    f_obs = np.append(observed[~small], observed[small].sum())
    keep = f_exp > 0
    if keep.sum() > 1:
        assert stats.chisquare(f_obs[keep], f_exp[keep] * f_obs.sum() / f_exp.sum()).pvalue > 1e-4

    incl_exact = exact_inclusion_probabilities(L, k)  # (n,)
    incl_emp = np.bincount(draws.ravel(), minlength=len(L)) / num  # (n,)
    se = np.sqrt(incl_exact * (1 - incl_exact) / num)
    assert np.all(np.abs(incl_emp - incl_exact) <= 5 * se + 1e-12)


@pytest.mark.parametrize("n, k", [(5, 1), (5, 2), (5, 3), (5, 4), (5, 5),
                                  (6, 3), (6, 4), (7, 2), (7, 5), (7, 6)])
def test_full_rank_matches_enumeration(n, k):
    L = spectral_kernel(np.geomspace(0.05, 20.0, n), seed=n)
    kdpp = KDPP(L)
    draws = kdpp.sample_many(k, NUM_DRAWS, np.random.default_rng(100 * n + k))
    assert draws.shape == (NUM_DRAWS, k) and draws.dtype == np.int64
    assert np.all(np.diff(draws, axis=1) > 0)
    assert_matches_exact(draws, L)


@pytest.mark.parametrize("n, r, k", [(7, 3, 2), (7, 3, 3), (6, 4, 4), (7, 5, 4), (6, 5, 5)])
def test_rank_deficient_matches_det_of_B(n, r, k):
    _, B = low_rank_kernel(n, r, seed=n + r + k)
    B[0] = 0.0  # an item that no subset of positive probability contains
    L = B @ B.T
    kdpp = KDPP(L)
    assert kdpp.rank == r
    probs = exact_subset_probabilities(L, k)
    gram_dets = {s: np.linalg.det(B[list(s)] @ B[list(s)].T) for s in probs}  # det(B_S B_Sᵀ)
    total = sum(gram_dets.values())
    for s, p in probs.items():
        assert p == pytest.approx(gram_dets[s] / total, abs=1e-12)
    draws = kdpp.sample_many(k, NUM_DRAWS, np.random.default_rng(k))
    assert not np.any(draws == 0)
    assert_matches_exact(draws, L)


CHI2_DRAWS = 20000


@pytest.mark.parametrize("n, r, k", [(6, 6, 3), (7, 7, 2), (7, 7, 5), (8, 8, 4), (8, 8, 6),
                                     (8, 5, 3), (8, 6, 5)])
def test_subset_frequencies_chi_square(n, r, k):
    """CHI2_DRAWS draws of sample_many against the brute-force subset probabilities, full rank
    (r = n) and rank-deficient (r < n; k = 5 > n/2 draws the complement, which then holds
    eigenvectors of eigenvalue 0). The same counts must reject the distribution that ignores
    the correlations, P(S) ∝ Π_{i∈S} L_ii, which a sampler without the Gram-Schmidt step
    would come close to: the test has the power to see a wrong sampler."""
    if r == n:
        L = spectral_kernel(np.geomspace(0.1, 10.0, n), seed=20 + n + k)
    else:
        L, _ = low_rank_kernel(n, r, seed=20 + n + k)
    draws = KDPP(L).sample_many(k, CHI2_DRAWS, np.random.default_rng(30 + n + k))
    statistic, dof, pvalue = chi_square(draws, exact_subset_probabilities(L, k))
    assert pvalue > 1e-3, (statistic, dof, pvalue)
    diag = np.diag(np.diag(L))
    _, _, p_wrong = chi_square(draws, exact_subset_probabilities(diag, k))
    assert p_wrong < 1e-9


def draw_kernel(kind, n, seed):
    if kind == "full":
        return spectral_kernel(np.geomspace(0.05, 20.0, n), seed=seed)
    if kind == "rank_deficient":
        return low_rank_kernel(n, 30, seed=seed)[0]
    return edge_like_kernel(n, seed=seed)


@pytest.mark.parametrize("num", [1, 2, 37])
@pytest.mark.parametrize("kind, k", [("full", 3), ("full", 21), ("full", 22), ("full", 35),
                                     ("full", 41), ("rank_deficient", 3),
                                     ("rank_deficient", 21), ("rank_deficient", 22),
                                     ("rank_deficient", 30), ("edge", 3), ("edge", 21),
                                     ("edge", 22), ("edge", 35)])
def test_draws_equal_one_at_a_time_reference(kind, k, num):
    """sample_many equals the sampler that draws one subset at a time and updates every row
    at every step (tests/reference.py), given the same generator: the same uniforms in the
    same order, the same decisions. n = 42 (not a multiple of the row block); k small, n/2,
    just above n/2 (the complement) and large; rank 30 for the rank-deficient kernel."""
    n = 42
    for seed in range(4):
        kdpp = KDPP(draw_kernel(kind, n, seed))
        ours = kdpp.sample_many(k, num, np.random.default_rng(seed))
        theirs = reference_kdpp_sample_many(kdpp, k, num, np.random.default_rng(seed))
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("k", [17, 101, 150])
def test_edge_kernel_draws_equal_reference_at_larger_n(k):
    n = 203
    for seed in range(2):
        kdpp = KDPP(edge_like_kernel(n, seed=40 + seed))
        rng = np.random.default_rng(seed)
        ours = kdpp.sample_many(k, 6, rng)
        tail = rng.random(3)                                  # the generator is left where
        rng = np.random.default_rng(seed)                     # the reference leaves it
        np.testing.assert_array_equal(ours, reference_kdpp_sample_many(kdpp, k, 6, rng))
        np.testing.assert_array_equal(tail, rng.random(3))


def test_sample_many_equals_repeated_sample():
    kdpp = KDPP(edge_like_kernel(30, seed=50))
    for k in (4, 15, 16, 26):
        rng = np.random.default_rng(k)
        one_by_one = np.stack([kdpp.sample(k, rng) for _ in range(9)])
        np.testing.assert_array_equal(one_by_one,
                                      kdpp.sample_many(k, 9, np.random.default_rng(k)))


def test_extreme_uniforms_never_draw_an_item_twice():
    """u = 0 draws the first item of positive weight, u just below 1 the last: a drawn item's
    weight must be exactly zero afterwards, not a rounding residue, or it is drawn again."""
    rng = np.random.default_rng(60)
    top = np.nextafter(1.0, 0.0)
    for _ in range(20):
        V = np.linalg.qr(rng.standard_normal((30, 12)))[0]                # (30, 12)
        for u in (np.zeros(12), np.full(12, top), np.resize([0.0, top], 12)):
            ours = sample_projection_dpp(V, u)
            assert np.unique(ours).size == 12
            np.testing.assert_array_equal(ours, reference_projection_dpp(V, u))


def test_ties_are_broken_as_one_at_a_time():
    """A projection onto coordinate axes has weights exactly 1 and 0, so u (d - t) lands on
    the boundaries of the running sum: the item drawn is the one the one-at-a-time rule
    draws (the first whose running sum exceeds the target), whichever end the sum runs from."""
    n, axes = 11, [1, 4, 5, 9]
    V = np.zeros((n, len(axes)))
    V[axes, range(len(axes))] = 1.0
    for u in itertools.product([0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75], repeat=len(axes)):
        u = np.array(u)
        np.testing.assert_array_equal(sample_projection_dpp(V, u),
                                      reference_projection_dpp(V, u))


def test_rank_below_k_raises():
    L, _ = low_rank_kernel(8, 3, seed=0)
    kdpp = KDPP(L)
    with pytest.raises(KDPPError, match=r"k = 4 exceeds the kernel's rank 3"):
        kdpp.sample(4, np.random.default_rng(0))
    with pytest.raises(KDPPError, match=r"k = 4 exceeds the kernel's rank 3"):
        exact_subset_probabilities(L, 4)


@pytest.mark.parametrize("k", [-1, 9])
def test_k_out_of_range_raises(k):
    kdpp = KDPP(spectral_kernel(np.arange(1.0, 9.0), seed=0))
    with pytest.raises(KDPPError, match=r"outside 0\.\.n = 0\.\.8"):
        kdpp.sample(k, np.random.default_rng(0))


def test_k_zero_and_zero_draws():
    kdpp = KDPP(spectral_kernel(np.arange(1.0, 6.0), seed=0))
    assert kdpp.sample(0, np.random.default_rng(0)).shape == (0,)
    assert kdpp.sample_many(3, 0, np.random.default_rng(0)).shape == (0, 3)


def test_complement_identity_for_projection_kernel():
    """For k > n/2 the sampler draws the projection DPP onto the unchosen eigenvectors and
    returns the complement; for a projection kernel V Vᵀ both sides are explicit."""
    n, k = 7, 5
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
    V, V_rest = Q[:, :k], Q[:, k:]  # (n, k), (n, n - k)
    incl = np.einsum("ij,ij->i", V, V)  # (n,) diag(V Vᵀ)
    L = V @ V.T
    np.testing.assert_allclose(exact_inclusion_probabilities(L, k), incl, atol=1e-10)
    np.testing.assert_allclose(1 - np.einsum("ij,ij->i", V_rest, V_rest), incl, atol=1e-12)

    rng = np.random.default_rng(4)
    rest_draws = np.array([sample_projection_dpp(np.ascontiguousarray(V_rest), rng.random(n - k))
                           for _ in range(NUM_DRAWS)])  # (num, n - k)
    complement_freq = 1 - np.bincount(rest_draws.ravel(), minlength=n) / NUM_DRAWS
    se = np.sqrt(incl * (1 - incl) / NUM_DRAWS)
    assert np.all(np.abs(complement_freq - incl) <= 5 * se)

    kdpp = KDPP(L)
    assert kdpp.rank == k
    assert_matches_exact(kdpp.sample_many(k, NUM_DRAWS, rng), L)


def test_log_space_selection_at_scale():
    """Diagonal kernel, n = 2000, half the eigenvalues 1e3 and half 1: e_k(λ) ~ 1e3000 would
    overflow. The number J of large eigenvalues chosen has
    P(J = j) ∝ C(1000, j) C(1000, k - j) 1000^j."""
    half, k = 1000, 1200
    eigvals = np.repeat([1.0, 1e3], half)  # (2000,)
    keep_prob = eigvec_keep_probabilities(eigvals, k)
    assert np.all(np.isfinite(keep_prob)) and keep_prob.max() <= 1 + 1e-9

    j = np.arange(k - half, half + 1)
    log_pj = (gammaln(half + 1) - gammaln(j + 1) - gammaln(half - j + 1)
              + gammaln(half + 1) - gammaln(k - j + 1) - gammaln(half - k + j + 1)
              + j * np.log(1e3))
    pj = np.exp(log_pj - log_pj.max())
    pj /= pj.sum()
    mean, sd = pj @ j, np.sqrt(pj @ j**2 - (pj @ j) ** 2)

    rng = np.random.default_rng(5)
    num = 300
    big = [np.sum(choose_eigvecs(keep_prob, rng.random(2 * half)) >= half) for _ in range(num)]
    assert abs(np.mean(big) - mean) <= 5 * sd / np.sqrt(num)

    kdpp = KDPP.from_eig(eigvals, np.eye(2 * half))
    draw = kdpp.sample(k, rng)
    assert draw.shape == (k,) and np.unique(draw).size == k


def test_float32_rounding_negatives_where_dppy_fails():
    """Eigenvalues near -1e-6 of the largest, as float32-built kernels have at paper scale."""
    eigvals = np.array([-2e-6, -1e-6, 0.5, 1.0, 2.0, 5.0, 10.0])
    L = spectral_kernel(eigvals, seed=6)
    k = 3
    finite_dpps = pytest.importorskip("dppy.finite_dpps")
    with pytest.raises(ValueError, match="not all >= 0"):
        finite_dpps.FiniteDPP("likelihood", L=L).sample_exact_k_dpp(size=k, random_state=0)

    vals, _ = eig_kernel(L)
    assert np.count_nonzero(vals) == 5 and vals.min() == 0.0
    kdpp = KDPP(L)
    L_clipped = spectral_kernel(np.maximum(eigvals, 0.0), seed=6)
    draws = kdpp.sample_many(k, NUM_DRAWS, np.random.default_rng(7))
    assert_matches_exact(draws, L_clipped)


def test_float32_built_gram_kernel_samples():
    """A rank-deficient Gram kernel built in float32, like the original dpp_edge kernels."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((30, 40)).astype(np.float32)  # (P, N), P < N: rank 30
    Xw = X * (3 * rng.standard_normal(40)).astype(np.float32)
    L = (Xw.T @ Xw / 30).astype(np.float64)  # (40, 40)
    assert np.linalg.eigvalsh((L + L.T) / 2).min() < -1e-8  # what dppy refuses
    draw = KDPP(L).sample(10, rng)
    assert draw.shape == (10,) and np.unique(draw).size == 10


@pytest.mark.parametrize("relative", [-2e-4, -1e-2])
def test_materially_negative_kernel_raises(relative):
    L = spectral_kernel([relative * 10.0, 1.0, 3.0, 10.0], seed=9)
    with pytest.raises(KDPPError, match="not positive semi-definite"):
        KDPP(L)


def test_negative_tolerance_boundary_accepts_rounding():
    L = spectral_kernel([-5e-5 * 10.0, 1.0, 3.0, 10.0], seed=9)
    assert KDPP(L).rank == 3


def test_asymmetric_and_malformed_kernels_raise():
    L = spectral_kernel([1.0, 2.0, 3.0], seed=10)
    L[0, 1] += 0.1
    with pytest.raises(KDPPError, match="not symmetric"):
        KDPP(L)
    with pytest.raises(KDPPError, match="square"):
        KDPP(np.ones((3, 4)))
    with pytest.raises(KDPPError, match="non-finite"):
        KDPP(np.full((2, 2), np.nan))


def test_same_seed_same_draws():
    kdpp = KDPP(spectral_kernel(np.geomspace(0.1, 10.0, 30), seed=11))
    for k in (7, 22):
        a = kdpp.sample_many(k, 50, np.random.default_rng(12))
        b = kdpp.sample_many(k, 50, np.random.default_rng(12))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, kdpp.sample_many(k, 50, np.random.default_rng(13)))


@pytest.mark.parametrize("scale", [1e-3, 7.3, 1e4])
def test_scale_invariance(scale):
    """k-DPP(c L) = k-DPP(L): with the same seed the draws coincide (the computed
    probabilities differ only by rounding)."""
    L = spectral_kernel(np.geomspace(0.1, 10.0, 30), seed=14)
    for k in (7, 22):
        a = KDPP(L).sample_many(k, 100, np.random.default_rng(15))
        b = KDPP(scale * L).sample_many(k, 100, np.random.default_rng(15))
        np.testing.assert_array_equal(a, b)


def test_from_eig_equals_kernel_construction():
    L = spectral_kernel(np.geomspace(0.1, 10.0, 12), seed=16)
    kdpp = KDPP.from_eig(*np.linalg.eigh(L))
    np.testing.assert_array_equal(kdpp.sample_many(5, 20, np.random.default_rng(17)),
                                  KDPP(L).sample_many(5, 20, np.random.default_rng(17)))
    with pytest.raises(KDPPError, match="square eigvecs"):
        KDPP.from_eig(np.ones(3), np.ones((3, 2)))


def test_exact_inclusion_probabilities_sum_to_k():
    L = spectral_kernel(np.geomspace(0.1, 10.0, 9), seed=18)
    for k in range(10):
        assert exact_inclusion_probabilities(L, k).sum() == pytest.approx(k)


DRAW_SCRIPT = """
import itertools
import json
import numpy as np
import threadpoolctl
from dpp_sample_ts import KDPP, edge_kernel
rng = np.random.default_rng(0)
n = 100
g = rng.normal(size=(n, 4 * n))
gram = g @ g.T / (4 * n)                            # (n, n) ~ I, as a Gram matrix of inputs
draws = []
for i in range(4):
    kdpp = KDPP(edge_kernel(rng.normal(size=n), gram))
    draws.append(kdpp.sample_many(16, 50, np.random.default_rng(i)))
blas = [x.get("architecture") for x in threadpoolctl.threadpool_info() if x["user_api"] == "blas"]
print(json.dumps(dict(draws=np.stack(draws).tolist(), blas=blas)))
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or not any(
    x["internal_api"] == "openblas" for x in threadpoolctl.threadpool_info()),
    reason="simulates other x86 CPUs through OpenBLAS's OPENBLAS_CORETYPE")
def test_dpp_edge_draws_do_not_depend_on_the_blas_kernels(root):
    """The same kernels' draws under OpenBLAS's Haswell and Prescott kernels (as on two other
    CPUs) with one and two BLAS threads: the eigendecompositions may differ in the last bits,
    the draws must not."""
    runs = []
    for coretype, threads in (("Haswell", "2"), ("Prescott", "1")):
        env = dict(os.environ, OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS=threads,
                   OMP_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-c", DRAW_SCRIPT], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout))
    assert runs[0]["blas"] != runs[1]["blas"]              # the two kernels were in use
    assert runs[0]["draws"] == runs[1]["draws"]
