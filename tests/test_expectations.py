"""Expected losses over the mask distributions against enumeration and sampled masks.

Sampled means are of ε_g computed from each sampled mask's own order parameters (no test-set
noise), so the only randomness is the masks': a tolerance of Z standard errors of the
sampled mean is a check that fails with probability ~1e-5 for a correct expectation, and
the seeds are fixed, so the tests are deterministic.
"""
import itertools

import mpmath
import numpy as np
import pytest

from dpp_pruning.base.data import generate_teacher
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory import expectations
from dpp_pruning.theory.mask_marginals import BernoulliMarginals, KDPPMarginals, kdpp_eigen_ratios
from dpp_pruning.theory.order_params import gaussian_moment, generalisation_error, order_parameters
from dpp_sample_ts import (
    KDPP,
    KDPPError,
    draw_masks,
    exact_subset_probabilities,
    importance_node_keep,
    node_kernel,
    normalise_rows,
)

N, P, K = 40, 64000, 6
Z = 4.5            # standard errors allowed between a sampled mean and its expectation
SAMPLES = 1500     # masks drawn per comparison


def brute_force_pairs(L, k):
    """(n,) P(a in S) and (n, n) P(a, b in S), a != b (zero diagonal), by enumeration."""
    n = L.shape[0]
    incl, pair = np.zeros(n), np.zeros((n, n))
    for subset, prob in exact_subset_probabilities(L, k).items():
        s = list(subset)
        incl[s] += prob
        pair[np.ix_(s, s)] += prob
    np.fill_diagonal(pair, 0.0)
    return incl, pair


@pytest.mark.parametrize("kind", ["full_rank", "rank_deficient", "near_diagonal"])
def test_kdpp_marginals_match_enumeration(kind):
    rng = np.random.default_rng(7)
    n = 9
    if kind == "full_rank":
        a = rng.normal(size=(n, n))
        L = a @ a.T / n
    elif kind == "rank_deficient":
        a = rng.normal(size=(n, 5))
        L = a @ a.T
    else:                                  # as dpp_edge kernels: diag(w) G diag(w), G ~ I
        w = rng.normal(size=n)
        g = np.eye(n) + 0.01 * rng.normal(size=(n, n))
        L = (g + g.T) / 2 * np.outer(w, w)
    kdpp = KDPP(L)
    x = rng.normal(size=(n, 3))
    for k in range(1, kdpp.rank + 1):
        incl, pair = brute_force_pairs(L, k)
        marg = KDPPMarginals(kdpp, k)
        np.testing.assert_allclose(marg.pi, incl, atol=1e-12)
        np.testing.assert_allclose(marg.pair_form(x), x.T @ pair @ x, atol=1e-11)
        cov = pair + np.diag(incl) - np.outer(incl, incl)
        np.testing.assert_allclose(marg.cov_form(x), x.T @ cov @ x, atol=1e-11)
        assert marg.rho.sum() == pytest.approx(k, abs=1e-9)


def exact_ratios(lam, k, nodes, pairs):
    """ρ_n for the given n and c_nm for the given pairs (n, m), in 60-digit arithmetic: e_j of
    every reduced eigenvalue set by the plain recurrence over its members (no deletion)."""
    mpmath.mp.dps = 60
    lam = [mpmath.mpf(float(x)) for x in lam]

    def esp(values, top):
        e = [mpmath.mpf(1)] + [mpmath.mpf(0)] * top
        for x in values:
            for j in range(top, 0, -1):
                e[j] += x * e[j - 1]
        return e

    e_k = esp(lam, k)[k]
    rho = [lam[n] * esp(lam[:n] + lam[n + 1:], k - 1)[k - 1] / e_k for n in nodes]
    c = [lam[n] * lam[m] * esp([x for i, x in enumerate(lam) if i not in (n, m)], k - 2)[k - 2]
         / e_k for n, m in pairs]
    return np.array(rho, dtype=np.float64), np.array(c, dtype=np.float64)


@pytest.mark.parametrize("kind,r,ks", [("near_equal", 200, (2, 100, 199)),
                                       ("spread", 60, (2, 20, 45)),
                                       ("spread", 150, (3, 80))])
def test_eigen_ratios_against_60_digit_arithmetic(kind, r, ks):
    """Eigenvalues within 1e-6 of each other (deletion recurrences lose every digit there)
    or spread log-uniformly over 1e-10..1e3 (e_j spans hundreds of orders of magnitude)."""
    rng = np.random.default_rng(r)
    lam = (1.0 + 1e-6 * rng.random(r) if kind == "near_equal"
           else np.sort(10.0 ** rng.uniform(-10, 3, r)))
    nodes = [0, 1, r // 3, r // 2, r - 2, r - 1]
    pairs = [(0, 1), (0, r - 1), (r // 2, r // 2 + 1), (r - 2, r - 1), (3, r // 3)]
    for k in ks:
        rho, c = kdpp_eigen_ratios(lam, k)
        rho_exact, c_exact = exact_ratios(lam, k, nodes, pairs)
        np.testing.assert_allclose(rho[nodes], rho_exact, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose([c[n, m] for n, m in pairs], c_exact, rtol=1e-9, atol=1e-13)


def test_eigen_ratios_are_stable_for_many_close_eigenvalues():
    """500 eigenvalues within 1% of each other (where deletion recurrences lose every digit):
    ρ sums to k, c is symmetric, non-negative, and each row of c sums to (k - 1) ρ_n
    (given eigenvector n chosen, k - 1 others are)."""
    lam = 1.0 + 0.01 * np.random.default_rng(0).random(500)
    for k in (2, 100, 250, 499):
        rho, c = kdpp_eigen_ratios(lam, k)
        assert rho.sum() == pytest.approx(k, rel=1e-12)
        assert np.all(c >= -1e-12) and np.allclose(c, c.T)
        off = c - np.diag(np.diag(c))
        np.testing.assert_allclose(off.sum(axis=1), (k - 1) * rho, rtol=1e-9)


@pytest.fixture(scope="module")
def trained():
    """A small trained student as pruning sees it (rows rescaled), its teacher and H."""
    teacher = generate_teacher(N, 2, P, sig_w=0.25, seed=3)
    student = workflow.rescaled(workflow.train(teacher, K, seed=5))
    return teacher, student, workflow.hidden_gram(teacher, student)


def sampled(teacher, student, hgram, choice, k, reweighting, num=SAMPLES):
    """Per-mask predicted test loss (theory at each mask's order parameters)."""
    _, masks = workflow.prune(teacher, student, choice, k, num, seed=11, rescale=False)
    weights, outs = workflow.apply_masks(teacher, student, masks, choice, reweighting, hgram)
    return workflow.predicted_loss(teacher, weights, outs)


@pytest.mark.parametrize("choice,k", [("dpp_node", 1), ("dpp_node", 3), ("dpp_node", 5),
                                      ("random_node", 2), ("random_node", 4)])
@pytest.mark.parametrize("reweighting", [False, True])
def test_node_expectation_matches_sampled_masks(trained, choice, k, reweighting):
    teacher, student, hgram = trained
    found = workflow.expected_test_loss(teacher, student, choice, k, reweighting, hgram)
    losses = sampled(teacher, student, hgram, choice, k, reweighting)
    assert found.kind == "exact"
    assert abs(losses.mean() - found.value) < Z * losses.std() / np.sqrt(len(losses))
    assert found.sd == pytest.approx(losses.std(), rel=0.15)


@pytest.mark.parametrize("rule", ["magnitude", "signed"])
@pytest.mark.parametrize("reweighting", [False, True])
def test_importance_node_expectation_is_its_one_mask(trained, rule, reweighting):
    teacher, student, hgram = trained
    found = workflow.expected_test_loss(teacher, student, "importance_node", 3, reweighting,
                                        hgram, importance_rule=rule)
    _, masks = workflow.prune(teacher, student, "importance_node", 3, 1, rescale=False,
                              importance_rule=rule)
    weights, outs = workflow.apply_masks(teacher, student, masks, "importance_node",
                                         reweighting, hgram)
    assert found.value == pytest.approx(float(workflow.predicted_loss(teacher, weights, outs)[0]),
                                        rel=1e-12)
    assert found.sd == 0.0


def test_dpp_node_subset_probabilities_by_eigenvalues(trained):
    """P(S) e_k(λ) = det(L_S), each side by another route than the code's LU determinants:
    e_k(λ) is a coefficient of Π_n (x + λ_n) (np.poly of the eigenvalues), det(L_S) the
    product of L_S's own eigenvalues."""
    teacher, student, _ = trained
    w1 = student.w1.weight.detach().double().numpy()
    kernel = node_kernel(w1, teacher.gram.numpy())
    coefficients = np.poly(-np.linalg.eigvalsh(kernel))                     # (K + 1,) e_0..e_K
    for k in (1, 2, 4, 6):
        subsets = expectations.all_subsets(K, k)
        probs = expectations.node_subset_probabilities("dpp_node", subsets, kernel)
        dets = [np.prod(np.linalg.eigvalsh(kernel[np.ix_(s, s)])) for s in subsets]
        np.testing.assert_allclose(probs * coefficients[k], dets, rtol=1e-9)


def test_dpp_node_subset_probabilities_are_the_sampling_frequencies():
    """Against the sampler's own draws, on a kernel far from uniform."""
    a = np.random.default_rng(4).normal(size=(K, K))
    kernel = a @ a.T + 0.1 * np.eye(K)
    subsets = expectations.all_subsets(K, 2)
    probs = expectations.node_subset_probabilities("dpp_node", subsets, kernel)
    draws = KDPP(kernel).sample_many(2, 40000, np.random.default_rng(5))    # (40000, 2)
    index = {tuple(s): i for i, s in enumerate(subsets)}
    freq = np.bincount([index[tuple(d)] for d in draws], minlength=len(subsets)) / len(draws)
    assert probs.max() > 10 * probs.min()                                    # far from uniform
    np.testing.assert_array_less(np.abs(freq - probs),
                                 Z * np.sqrt(probs * (1 - probs) / len(draws)))


def test_dpp_node_agrees_with_random_node_at_one_node(trained):
    """With rows of norm sqrt(N) and G close to I, L_ii = w_i^T G w_i is near N for every
    node, so the 1-DPP (P(i) = L_ii / tr L) is near uniform: the two expectations differ by
    at most max_i |P(i) - 1/K| * Σ_i |ε_i - mean ε|, which is small."""
    teacher, student, _ = trained
    w1 = student.w1.weight.detach().double().numpy()
    kernel = node_kernel(w1, teacher.gram.numpy())
    p = np.diag(kernel) / np.trace(kernel)
    spread = np.abs(p - 1 / K).max()
    assert spread < 0.02                                   # G ~ I: O(1/sqrt(P)) off uniform
    q, r, t = order_parameters(w1, teacher.w1.numpy())
    v, v_star = student.w2.weight.detach().double().numpy().ravel(), teacher.w2.numpy().ravel()
    eps = expectations.node_subset_losses(q, r, t, v, v_star, expectations.all_subsets(K, 1))
    dpp = expectations.expected_node_loss("dpp_node", 1, q, r, t, v, v_star, kernel=kernel)
    rand = expectations.expected_node_loss("random_node", 1, q, r, t, v, v_star)
    assert abs(dpp - rand) <= spread * np.abs(eps - eps.mean()).sum() + 1e-12
    assert abs(dpp - rand) < 0.01 * rand


@pytest.mark.parametrize("choice,k", [("dpp_edge", 7), ("dpp_edge", 20), ("dpp_edge", 33),
                                      ("random_edge", 7), ("random_edge", 20)])
def test_edge_expectation_matches_sampled_masks(trained, choice, k):
    teacher, student, hgram = trained
    found = workflow.expected_test_loss(teacher, student, choice, k, False, hgram)
    losses = sampled(teacher, student, hgram, choice, k, False)
    se = losses.std() / np.sqrt(len(losses))
    assert found.kind == "delta"
    assert abs(losses.mean() - found.value) < Z * se
    assert found.sd == pytest.approx(losses.std(), rel=0.15)
    # the delta method's correction is the size of the first-order gap: where that gap is
    # resolved by the samples, the corrected value is the closer one
    if abs(losses.mean() - found.first_order) > Z * se:
        assert abs(losses.mean() - found.value) < abs(losses.mean() - found.first_order)


def test_importance_edge_expectation_is_its_one_mask(trained):
    teacher, student, hgram = trained
    found = workflow.expected_test_loss(teacher, student, "importance_edge", 12)
    assert found.kind == "exact"
    assert found.value == pytest.approx(float(sampled(teacher, student, hgram,
                                                      "importance_edge", 12, False, 1)[0]),
                                        rel=1e-12)


def test_importance_edge_reweighted_expectation_is_its_one_refit_mask(trained):
    """Its mask and refit are deterministic: the expectation is the predicted loss of the
    refit student that testing builds from the pruner's one mask."""
    teacher, student, hgram = trained
    found = workflow.expected_test_loss(teacher, student, "importance_edge", 12, True)
    assert found.kind == "exact" and found.sd == 0.0
    refit = sampled(teacher, student, hgram, "importance_edge", 12, True, 1)[0]
    plain = sampled(teacher, student, hgram, "importance_edge", 12, False, 1)[0]
    assert found.value == pytest.approx(float(refit), rel=1e-12)
    assert abs(refit - plain) > 1e-3 * plain                 # the refit did change the loss


@pytest.mark.parametrize("choice", ["dpp_edge", "random_edge"])
def test_random_edge_masks_with_reweighting_have_no_expectation(trained, choice):
    teacher, student, _ = trained
    assert workflow.expected_test_loss(teacher, student, choice, 10, True) is None


def rank_two_student(num_nodes=K, n=N, seed=0):
    """w1 (K, N) whose rows span two directions, rows of norm sqrt(N), and v (K,)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(num_nodes, 2)) @ rng.normal(size=(2, n))
    return normalise_rows(w1), rng.normal(size=num_nodes)


@pytest.mark.parametrize("exactly_singular", [False, True])
def test_dpp_node_expectation_refuses_k_above_the_kernel_rank(exactly_singular):
    """The sampler refuses k = 3 for a rank-2 kernel; so must the expectation, with the same
    error and message, instead of probabilities made of rounding noise (or NaN when the
    kernel is exactly singular)."""
    w1, v = rank_two_student()
    if exactly_singular:
        w1[2:] = w1[:1]                                  # rows 2.. repeat row 0: rank 2 exactly
    w_star = np.random.default_rng(1).normal(size=(2, N))
    kernel = node_kernel(w1, np.eye(N))
    with pytest.raises(KDPPError) as drawn:
        KDPP(kernel).sample(3, np.random.default_rng(0))
    with pytest.raises(KDPPError) as expected:
        expectations.expectation("dpp_node", 3, w1, v, w_star, np.ones(2), np.eye(N))
    assert str(expected.value) == str(drawn.value)
    assert "k = 3 exceeds the kernel's rank 2" in str(drawn.value)
    assert expectations.expectation("dpp_node", 2, w1, v, w_star, np.ones(2),
                                    np.eye(N)).kind == "exact"


def test_kdpp_marginals_refuse_k_above_the_kernel_rank():
    """mask_marginals answers a k above the rank with the sampler's KDPPError and message."""
    w = np.random.default_rng(2).normal(size=(N, 3))
    kdpp = KDPP(w @ w.T)                                                     # rank 3
    with pytest.raises(KDPPError) as drawn:
        kdpp.sample(4, np.random.default_rng(0))
    with pytest.raises(KDPPError) as marginal:
        KDPPMarginals(kdpp, 4)
    assert str(marginal.value) == str(drawn.value)
    with pytest.raises(KDPPError, match="k = 4 exceeds the kernel's rank 3"):
        expectations.edge_expectation("dpp_edge", 4, w.T, np.ones(3), w[:, :2].T, np.ones(2),
                                      kernels=[kdpp] * 3)


def test_importance_edge_expectation_takes_the_pruners_mask_with_ties():
    """Rows full of equal |w|: whichever tie rule the pruner has, the expectation's mask is
    the one it draws."""
    w1 = np.array([[1.0, -1.0, 0.5, 1.0, -0.5, 0.5],
                   [0.5, 0.5, -0.5, 0.5, 0.25, -0.5],
                   [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])                        # (K = 3, N = 6)
    for k in (1, 2, 3, 5):
        drawn = draw_masks("importance_edge", w1, np.ones(3), None, k, 1,
                           np.random.default_rng(0))[0]                      # (N, K)
        marginals = expectations.edge_marginals("importance_edge", k, w1)
        np.testing.assert_array_equal(np.stack([m.pi for m in marginals]), drawn.T)


def test_random_edge_closed_form_is_the_first_order_value(trained):
    teacher, student, _ = trained
    w1 = student.w1.weight.detach().double().numpy()
    v, v_star = student.w2.weight.detach().double().numpy().ravel(), teacher.w2.numpy().ravel()
    q, r, t = order_parameters(w1, teacher.w1.numpy())
    found = expectations.edge_expectation("random_edge", 10, w1, v, teacher.w1.numpy(), v_star)
    closed = expectations.expected_random_edge_loss(q, r, t, v, v_star, 10 / N)
    assert closed == pytest.approx(found.first_order, rel=1e-12)


@pytest.mark.parametrize("k", [4, 7])
def test_delta_method_correction_against_1e5_random_edge_masks(trained, k):
    """random_edge's per-mask ε_g is a closed form in the mask, so 10^5 masks resolve the
    second-order correction ½ tr(H Cov): it is well over 2Z standard errors here, so a
    correction twice (or zero times) its size would miss the sampled mean."""
    teacher, student, _ = trained
    w1 = student.w1.weight.detach().double().numpy()                          # (K, N)
    v, v_star = student.w2.weight.detach().double().numpy().ravel(), teacher.w2.numpy().ravel()
    w_star = teacher.w1.numpy().astype(np.float64)                            # (M, N)
    found = expectations.edge_expectation("random_edge", k, w1, v, w_star, v_star)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(20):
        masks = rng.random((5000, K, N)) < k / N                             # (B, K, N)
        q, r, t = order_parameters(w1 * masks, w_star)
        losses.append(generalisation_error(q, r, t, v, v_star))
    losses = np.concatenate(losses)                                          # (100000,)
    se = losses.std() / np.sqrt(len(losses))
    assert abs(found.value - found.first_order) > 2 * Z * se
    assert abs(losses.mean() - found.value) < Z * se
    assert found.sd == pytest.approx(losses.std(), rel=0.05)


def test_edge_moments_are_exact_for_bernoulli_masks_by_enumeration():
    """Mean and covariance of θ = (Q' upper triangle, R') over every one of the 2^(K N) masks
    of K = 3 nodes with N = 4 inputs, each weight kept with probability 0.3."""
    rng = np.random.default_rng(6)
    num_nodes, n, f = 3, 4, 0.3
    w1, w_star = rng.normal(size=(num_nodes, n)), rng.normal(size=(2, n))
    theta, mean, cov = expectations.edge_moments(
        w1, w_star, [BernoulliMarginals(f, n) for _ in range(num_nodes)])
    bits = (np.arange(2 ** (num_nodes * n))[:, None] >> np.arange(num_nodes * n)) & 1
    masks = bits.reshape(-1, num_nodes, n).astype(np.float64)                # (4096, K, N)
    prob = f ** bits.sum(axis=1) * (1 - f) ** (num_nodes * n - bits.sum(axis=1))   # (4096,)
    q, r, _ = order_parameters(w1 * masks, w_star)
    points = np.stack([theta.pack(a, b) for a, b in zip(q, r, strict=True)])  # (4096, D)
    exact_mean = prob @ points
    exact_cov = (points - exact_mean).T @ ((points - exact_mean) * prob[:, None])
    assert prob.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cov, exact_cov, rtol=1e-10, atol=1e-14)


def test_bernoulli_covariance_is_diagonal():
    x = np.random.default_rng(1).normal(size=(30, 4))
    marg = BernoulliMarginals(0.3, 30)
    np.testing.assert_allclose(marg.cov_form(x), 0.21 * x.T @ x)


def test_rescaled_order_parameters_are_those_of_rescaled_rows():
    rng = np.random.default_rng(2)
    w, w_star = rng.normal(size=(5, 50)) * rng.random((5, 1)) * 2, rng.normal(size=(2, 50))
    q, r, _ = order_parameters(w, w_star)
    q1, r1, _ = order_parameters(normalise_rows(w), w_star)
    got_q, got_r = expectations.rescale_order_parameters(q, r)
    np.testing.assert_allclose(got_q, q1, rtol=1e-12)
    np.testing.assert_allclose(got_r, r1, rtol=1e-12)


def test_hidden_gram_tends_to_its_gaussian_limit(trained):
    """workflow.hidden_gram A^T A / P against <g(λ_i) g(λ_j)> over Gaussian inputs, from Q
    alone (I2 of NOTES.md), the value it tends to as P grows."""
    teacher, student, hgram = trained
    w1 = student.w1.weight.detach().double().numpy()
    q, _, _ = order_parameters(w1, teacher.w1.numpy())
    d = np.diag(q)
    limit = gaussian_moment(q, d[:, None], d[None, :])                       # (K, K)
    # entries are means of products of bounded activations: O(1/sqrt(P)) sampling error
    np.testing.assert_allclose(limit, hgram, atol=6 / np.sqrt(P))


# (w2, k, nodes kept), worked out by hand: the k largest signed values. Where values tie at
# the boundary, the original expression np.argpartition(w2, K - k)[:K - k] (numpy's
# introselect) removes the earlier of the tied nodes, so the later ones are kept.
SIGNED_CASES = [([0.5, -2.0, 1.0, -0.1, 3.0, 0.7], 2, [2, 4]),
                ([0.5, -2.0, 1.0, -0.1, 3.0, 0.7], 4, [0, 2, 4, 5]),
                ([-1.0, -2.0, -3.0], 3, [0, 1, 2]),
                ([-1.0, -2.0, -3.0], 1, [0]),
                ([1.0, 1.0, -1.0, 1.0, -1.0, 0.0], 3, [0, 1, 3]),
                ([2.0, 2.0, 2.0, -2.0], 1, [2]),                      # ties: the last 2.0
                ([0.3, -0.3, 0.3, -0.3, 0.3], 4, [0, 2, 3, 4]),       # ties: the last -0.3
                ([1.0, 1.0, 1.0, 1.0], 2, [2, 3]),
                ([0.0, 0.0, -1.0, 0.0, 2.0], 2, [3, 4]),
                ([-1.0] * 6, 4, [2, 3, 4, 5])]


@pytest.mark.parametrize("w2,k,kept", SIGNED_CASES)
def test_signed_importance_rule_on_worked_cases(w2, k, kept):
    assert importance_node_keep(np.array(w2), k, "signed").nonzero()[0].tolist() == kept


@pytest.mark.parametrize("w2,k,kept", [([0.5, -2.0, 1.0, -0.1, 3.0, 0.7], 2, [1, 4]),
                                       ([1.0, -1.0, 1.0, -1.0], 2, [0, 1]),   # ties: lower
                                       ([0.0, -0.0, 0.0], 1, [0])])
def test_magnitude_importance_rule_on_worked_cases(w2, k, kept):
    assert importance_node_keep(np.array(w2), k, "magnitude").nonzero()[0].tolist() == kept


def test_magnitude_and_signed_rules_differ_on_mixed_signs():
    w2 = np.array([1.3, -1.2, 1.25, -1.3, 0.1, -0.05])
    assert importance_node_keep(w2, 2, "magnitude").nonzero()[0].tolist() == [0, 3]
    assert importance_node_keep(w2, 2, "signed").nonzero()[0].tolist() == [0, 2]


def test_every_subset_enumerated_once():
    subsets = expectations.all_subsets(7, 3)
    assert len(subsets) == 35
    assert {tuple(s) for s in subsets} == set(itertools.combinations(range(7), 3))
