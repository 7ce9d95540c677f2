"""Pruning at N → ∞ (theory/pruning_limit.py) against Monte Carlo, adaptive quadrature, exact
k-DPP inclusion probabilities, and the exact expectations over masks of synthetic students
whose weights are Gaussian with given Q, R, T.

Monte Carlo tolerances are Z standard errors of a sample mean; seeds are fixed, so every test
is deterministic. `PYTHONPATH=. python3 tests/test_pruning_limit.py` prints the gaps of the
last part, the table of docs/theory.md ("Pruning at N → ∞").
"""
import functools

import numpy as np
import pytest
import scipy.integrate

from dpp_pruning.theory import expectations
from dpp_pruning.theory import pruning_limit as limit
from dpp_pruning.theory.mask_marginals import (
    DiagonalKDPPMarginals,
    KDPPMarginals,
    saddle_radius,
)
from dpp_pruning.theory.order_params import (
    gaussian_moment,
    generalisation_error,
    order_parameters,
    random_edge_expected,
)
from dpp_sample_ts import KDPP, importance_node_keep

EDGE_METHODS = ("dpp_edge", "random_edge", "importance_edge")
NODE_METHODS = ("dpp_node", "random_node", "importance_node")
Z = 5.0                   # standard errors allowed between a Monte Carlo mean and its integral
MC_SAMPLES = 1_000_000


def normal_pdf(x):
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


# ----------------------------------------------------------------------------------------
# 1. The Gaussian integrals

@pytest.mark.parametrize("method", EDGE_METHODS)
def test_pruned_order_parameters_against_monte_carlo(method):
    """Q'_ii, Q'_kk, Q'_ik, R'_i, R'_k and E[π] = f for two nodes of unequal norms and one
    teacher node, at correlations from -0.95 to 0.95, against 10⁶ Gaussian draws."""
    rng = np.random.default_rng(11)
    q_ii, q_kk, t_nn = 1.7, 0.6, 1.2
    for fraction in (0.15, 0.6):
        for rho in (0.95, 0.5, 0.0, -0.4, -0.95):
            q = np.array([[q_ii, rho * np.sqrt(q_ii * q_kk)], [rho * np.sqrt(q_ii * q_kk), q_kk]])
            a = 0.6                                    # correlations with the teacher node
            b = a * rho - 0.5 * np.sqrt((1.0 - rho * rho) * (1.0 - a * a))
            r = np.array([[a * np.sqrt(q_ii * t_nn)], [b * np.sqrt(q_kk * t_nn)]])
            cov = np.block([[q, r], [r.T, np.array([[t_nn]])]])
            w_i, w_k, w_star = np.linalg.cholesky(cov) @ rng.standard_normal((3, MC_SAMPLES))
            pi_i = limit.keep_probability(method, w_i, fraction, q_ii)
            pi_k = limit.keep_probability(method, w_k, fraction, q_kk)
            pruned_q, pruned_r = limit.edge_order_parameters(method, fraction, q, r)
            cases = [(pi_i, fraction), (pi_k, fraction),
                     (pi_i * w_i * w_i, pruned_q[0, 0]), (pi_k * w_k * w_k, pruned_q[1, 1]),
                     (pi_i * pi_k * w_i * w_k, pruned_q[0, 1]),
                     (pi_i * w_i * w_star, pruned_r[0, 0]), (pi_k * w_k * w_star, pruned_r[1, 0])]
            for samples, predicted in cases:
                se = samples.std() / np.sqrt(MC_SAMPLES)
                assert abs(samples.mean() - predicted) < Z * se + 1e-12, (fraction, rho)
            assert pruned_q[0, 1] == pruned_q[1, 0]


def cross_moment_by_quadrature(method, fraction, rho):
    """E[π(x) π(y) x y] by scipy's adaptive 2-D quadrature over (x, u), y = ρ x + √(1 − ρ²) u
    with x, u independent standard normals: no closed form of the module enters."""
    s = np.sqrt(1.0 - rho * rho)
    top = 14.0
    if method == "importance_edge":
        c = limit.importance_cut(fraction)

        def integrand(u, x):
            return x * (rho * x + s * u) * normal_pdf(x) * normal_pdf(u)

        above = scipy.integrate.dblquad(integrand, c, top, lambda x: max((c - rho * x) / s, -20),
                                        20, epsabs=1e-15, epsrel=1e-12)[0]
        below = scipy.integrate.dblquad(integrand, c, top, -20,
                                        lambda x: min((-c - rho * x) / s, 20),
                                        epsabs=1e-15, epsrel=1e-12)[0]
        return 2.0 * (above + below)                   # x < -c mirrors x > c
    b = limit.dpp_edge_saturation(fraction)

    def keep(x):
        return x * x / (b * b + x * x)

    def integrand(u, x):
        y = rho * x + s * u
        return x * keep(x) * y * keep(y) * normal_pdf(x) * normal_pdf(u)

    return 2.0 * sum(scipy.integrate.dblquad(integrand, lo, hi, -top, top, epsabs=1e-15,
                                             epsrel=1e-12)[0] for lo, hi in ((0, b), (b, top)))


@pytest.mark.parametrize("method,fraction,rho", [
    ("importance_edge", 0.02, 0.95), ("importance_edge", 0.5, 0.999),
    ("importance_edge", 0.1, 0.99999), ("importance_edge", 0.5, -0.3),
    ("importance_edge", 0.97, 0.6), ("dpp_edge", 0.02, -0.95), ("dpp_edge", 0.5, 0.999),
    ("dpp_edge", 0.3, 0.1), ("dpp_edge", 0.97, 0.95)])
def test_cross_moments_against_adaptive_quadrature(method, fraction, rho):
    """The closed inner expectations (Gaussian partial moments, the Faddeeva function) and
    the graded Gauss-Legendre panels to 1e-9 relative, strong correlations included."""
    expected = cross_moment_by_quadrature(method, fraction, rho)
    assert limit.kept_cross_moment(method, fraction, rho) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.5, 0.9, 0.999])
def test_second_moments_and_thresholds_against_quadrature(fraction):
    """E[π] = f and E[π x²] by adaptive 1-D quadrature: importance_edge's threshold and
    f + 2 c φ(c), dpp_edge's saturation b and 1 − f b²."""
    c = limit.importance_cut(fraction)
    b = limit.dpp_edge_saturation(fraction)

    def both_tails(g, breaks):                # ∫ over |x| > breaks[0] of g(x) φ(x), g even
        pieces = list(zip(breaks, list(breaks[1:]) + [np.inf], strict=True))
        return 2.0 * sum(scipy.integrate.quad(lambda x: g(x) * normal_pdf(x), lo, hi, epsabs=0,
                                              epsrel=1e-13, limit=200)[0] for lo, hi in pieces)

    def dpp_keep(x):
        return x * x / (b * b + x * x)

    assert both_tails(lambda x: 1.0, [c]) == pytest.approx(fraction, rel=1e-10)
    assert both_tails(lambda x: x * x, [c]) == pytest.approx(
        limit.kept_second_moment("importance_edge", fraction), rel=1e-10)
    assert both_tails(dpp_keep, [0.0, b]) == pytest.approx(fraction, rel=1e-10)
    assert both_tails(lambda x: x * x * dpp_keep(x), [0.0, b]) == pytest.approx(
        limit.kept_second_moment("dpp_edge", fraction), rel=1e-10)
    assert limit.dpp_edge_fugacity(fraction, 2.0) == pytest.approx(1.0 / (2.0 * b * b))
    assert limit.importance_threshold(fraction, 4.0) == pytest.approx(2.0 * c)


def test_limits_and_identities():
    q = np.array([[1.3, 0.9, -0.2], [0.9, 0.8, 0.1], [-0.2, 0.1, 1.0]])
    r = np.array([[1.0, 0.1], [0.7, -0.2], [0.0, 0.6]])
    for method in EDGE_METHODS:
        pruned_q, pruned_r = limit.edge_order_parameters(method, 1.0, q, r)
        np.testing.assert_allclose(pruned_q, q, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(pruned_r, r, rtol=1e-13)
        batch_q, batch_r = limit.edge_order_parameters(method, np.array([0.3, 0.7]), q, r)
        for b, f in enumerate((0.3, 0.7)):
            one_q, one_r = limit.edge_order_parameters(method, f, q, r)
            np.testing.assert_allclose(batch_q[b], one_q, rtol=1e-15)
            np.testing.assert_allclose(batch_r[b], one_r, rtol=1e-15)
        assert limit.kept_cross_moment(method, 0.4, 0.0) == pytest.approx(0.0, abs=1e-15)
    expected_q, expected_r = random_edge_expected(q, r, 0.35)
    pruned_q, pruned_r = limit.edge_order_parameters("random_edge", 0.35, q, r)
    np.testing.assert_allclose(pruned_q, expected_q, rtol=1e-15)
    np.testing.assert_allclose(pruned_r, expected_r, rtol=1e-15)
    # importance masks are 0/1: at ρ = ±1 the two nodes keep the same inputs
    for rho in (1.0, -1.0):
        assert limit.kept_cross_moment("importance_edge", 0.3, rho) == pytest.approx(
            rho * limit.kept_second_moment("importance_edge", 0.3), rel=1e-12)
    with pytest.raises(ValueError):
        limit.edge_order_parameters("dpp_edge", 0.0, q, r)
    with pytest.raises(ValueError):
        limit.pruned_loss("dpp_node", 1.5, q, r, np.eye(2), np.ones(3), np.ones(2))


# ----------------------------------------------------------------------------------------
# 2. The grand-canonical dpp_edge marginals

def test_diagonal_kdpp_marginals_match_the_eigendecomposition_path():
    rng = np.random.default_rng(5)
    lam = rng.normal(size=25) ** 2
    lam[[3, 17]] = 0.0                                  # never drawn
    x = rng.normal(size=(25, 3))
    kdpp = KDPP(np.diag(lam))
    for k in (1, 2, 9, 22, 23):
        diagonal, full = DiagonalKDPPMarginals(lam, k), KDPPMarginals(kdpp, k)
        np.testing.assert_allclose(diagonal.pi, full.pi, atol=1e-13)
        np.testing.assert_allclose(diagonal.cov_form(x), full.cov_form(x), atol=1e-11)
    with pytest.raises(ValueError):
        DiagonalKDPPMarginals(lam, 24)


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_grand_canonical_marginals_approach_the_exact_kdpp(fraction):
    """Kernel diag(w²), w ~ N(0, 1), k = fN: the grand-canonical π_a = z w_a² / (1 + z w_a²),
    z solving Σ_a π_a = k (mask_marginals.saddle_radius), is within O(1/N) of the exact
    inclusion probabilities; z itself tends to dpp_edge_fugacity(f, 1) like 1/√N."""
    rng = np.random.default_rng(21)
    sizes = np.array([100, 400, 1600, 6400])
    gaps, fugacity_gaps = [], []
    for n in sizes:
        lam = rng.normal(size=n) ** 2
        k = int(fraction * n)
        z = saddle_radius(lam, k)
        grand = z * lam / (1.0 + z * lam)
        gaps.append(np.abs(grand - DiagonalKDPPMarginals(lam, k).pi).max())
        fugacity_gaps.append(abs(z / limit.dpp_edge_fugacity(fraction, 1.0) - 1.0))
    slope = np.polyfit(np.log(sizes), np.log(gaps), 1)[0]
    assert -1.2 < slope < -0.8, gaps
    assert np.all(np.array(gaps) * sizes < 1.0), gaps
    assert np.all(np.array(fugacity_gaps) * np.sqrt(sizes) < 5.0), fugacity_gaps


# ----------------------------------------------------------------------------------------
# 3. The whole prediction against the exact expectations over masks

# a specialised student: nodes 0-2 on teacher node 0, 3-5 on teacher node 1, unequal norms
OVERLAP = np.array([[0.95, 0.05], [-0.9, 0.1], [0.93, -0.05],
                    [0.05, 0.92], [0.1, -0.88], [-0.05, 0.85]])      # correlations with w*
NORMS = np.array([1.0, 0.7, 1.3, 1.0, 1.1, 0.9])                     # √Q_ii
V = np.array([1.4, -1.3, 1.2, 1.35, -1.25, 1.3])
V_STAR = np.array([4.0, 4.0])
N_LARGE, N_DPP, N_REWEIGHT = 20000, 4000, 1000
FRACTIONS = (0.2, 0.5, 0.8)
DPP_FRACTIONS = (0.25, 0.5)


def synthetic_student(n, seed=3):
    """w1 (6, n), w_star (2, n): every input's weights Gaussian with Q_ii = NORMS², R as
    OVERLAP (scaled), T = I, and residual correlations 0.6 within a teacher's group."""
    rng = np.random.default_rng(seed)
    residual = np.full((6, 6), 0.6)
    residual[3:, :3] = residual[:3, 3:] = -0.2
    np.fill_diagonal(residual, 1.0)
    spread = np.sqrt(1.0 - (OVERLAP ** 2).sum(axis=1))
    chol = np.linalg.cholesky(np.outer(spread, spread) * residual)
    w_star = rng.normal(size=(2, n))
    w1 = (OVERLAP @ w_star + chol @ rng.normal(size=(6, n))) * NORMS[:, None]
    return w1, w_star


def relative_gap(predicted, exact):
    return abs(predicted - exact) / abs(exact)


@functools.lru_cache(maxsize=1)
def prediction_gaps():
    """{(method, reweighting): (N, largest relative gap to the exact expectation, largest to
    its first-order value)} over the budgets, for the synthetic student, the prediction
    taking the student's own sample Q, R, T."""
    gaps = {}

    def record(method, reweighting, n, predicted, exact):
        first = exact.first_order if np.isfinite(exact.first_order) else exact.value
        old = gaps.get((method, reweighting), (n, 0.0, 0.0))
        gaps[(method, reweighting)] = (n, max(old[1], relative_gap(predicted, exact.value)),
                                       max(old[2], relative_gap(predicted, first)))

    w1, w_star = synthetic_student(N_LARGE)
    q, r, t = order_parameters(w1, w_star)
    hidden = gaussian_moment(q, np.diag(q)[:, None], np.diag(q)[None, :])   # I2(Q_sample)
    for method in NODE_METHODS:
        for k in range(1, 6):
            for reweighting in (False, True):
                exact = expectations.node_expectation(
                    method, k, q, r, t, V, V_STAR, kernel=w1 @ w1.T, hidden_gram=hidden,
                    reweighting=reweighting)
                record(method, reweighting, N_LARGE,
                       limit.pruned_loss(method, k, q, r, t, V, V_STAR, reweighting), exact)
    for method in ("random_edge", "importance_edge"):
        for fraction in FRACTIONS:
            k = round(fraction * N_LARGE)
            exact = expectations.edge_expectation(method, k, w1, V, w_star, V_STAR)
            record(method, False, N_LARGE,
                   limit.pruned_loss(method, k / N_LARGE, q, r, t, V, V_STAR), exact)
    # with reweighting only importance_edge has an exact expectation; G = I is N × N here
    w1, w_star = synthetic_student(N_REWEIGHT)
    q, r, t = order_parameters(w1, w_star)
    for fraction in FRACTIONS:
        k = round(fraction * N_REWEIGHT)
        exact = expectations.expectation("importance_edge", k, w1, V, w_star, V_STAR,
                                         np.eye(N_REWEIGHT), reweighting=True)
        record("importance_edge", True, N_REWEIGHT,
               limit.pruned_loss("importance_edge", k / N_REWEIGHT, q, r, t, V, V_STAR, True),
               exact)
    # dpp_edge at G = I: kernels diag(w_i²), exact marginals from the eigenvalues
    w1, w_star = synthetic_student(N_DPP)
    q, r, t = order_parameters(w1, w_star)
    for fraction in DPP_FRACTIONS:
        k = round(fraction * N_DPP)
        marginals = [DiagonalKDPPMarginals(w * w, k) for w in w1]
        exact = expectations.edge_expectation("dpp_edge", k, w1, V, w_star, V_STAR,
                                              marginals=marginals)
        record("dpp_edge", False, N_DPP,
               limit.pruned_loss("dpp_edge", k / N_DPP, q, r, t, V, V_STAR), exact)
    return gaps


def test_node_methods_are_the_exact_enumeration_at_g_identity():
    """At G = I the dpp_node kernel is W Wᵀ = N Q and the hidden Gram I2(Q): the prediction
    is the exact expectation (rounding apart), reweighting included."""
    for method in NODE_METHODS:
        for reweighting in (False, True):
            n, gap, _ = prediction_gaps()[(method, reweighting)]
            assert gap < 1e-10, (method, reweighting, gap)


def test_edge_methods_are_within_one_over_root_n_of_the_exact_expectation():
    """The sample's weights are Gaussian only up to O(1/√N) in the moments the prediction
    uses (importance_edge, dpp_edge); random_edge's first-order value is the same formula,
    and its mask fluctuations move E[ε_g] by O(1/N)."""
    gaps = prediction_gaps()
    n, gap, first = gaps[("random_edge", False)]
    assert first < 1e-12 and gap < 5.0 / n, gap
    for key in (("importance_edge", False), ("importance_edge", True), ("dpp_edge", False)):
        n, gap, first = gaps[key]
        assert gap < 4.0 / np.sqrt(n) and first < 4.0 / np.sqrt(n), (key, gap, first)


def test_edge_reweighting_changes_nothing_and_the_table_matches_single_calls():
    w1, w_star = synthetic_student(500)
    q, r, t = order_parameters(w1, w_star)
    budgets = {m: (1, 3, 5) for m in NODE_METHODS} | {m: (0.1, 0.5, 1.0) for m in EDGE_METHODS}
    table = limit.pruned_losses(budgets, q, r, t, V, V_STAR)
    assert len(table) == 6 * 3 * 2
    for (method, budget, reweighting), value in table.items():
        assert value == pytest.approx(
            limit.pruned_loss(method, budget, q, r, t, V, V_STAR, reweighting), rel=1e-12)
        if method in EDGE_METHODS:
            assert value == table[(method, budget, not reweighting)]
    unpruned = generalisation_error(q, r, t, V, V_STAR)
    for method in EDGE_METHODS:
        assert table[(method, 1.0, False)] == pytest.approx(unpruned, rel=1e-12)
    signed = limit.pruned_losses({"importance_node": (2,)}, q, r, t, V, V_STAR, (False,),
                                 importance_rule="signed")
    kept = np.where(importance_node_keep(V, 2, "signed"), V, 0.0)     # the two largest v
    assert signed[("importance_node", 2, False)] == pytest.approx(
        generalisation_error(q, r, t, kept, V_STAR), rel=1e-12)

if __name__ == "__main__":
    print("| method | reweighting | N | largest gap to E[ε_g] | to its first-order value |")
    print("|---|---|---|---|---|")
    for (method, reweighting), (n, gap, first) in prediction_gaps().items():
        print(f"| {method} | {int(reweighting)} | {n} | {gap:.2e} | {first:.2e} |")
