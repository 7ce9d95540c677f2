"""Expected test loss of a pruned student over its mask distribution, without sampling.

For a student (w1 (K, N), v (K,)), a teacher (w* (M, N), v* (M,)), a method and a budget k,
the mask is random (except for the importance methods) and so is the pruned student's
generalisation error ε_g. These functions give its expectation over the masks (NOTES.md,
"Expected loss over the mask distribution"); the expected test loss is that plus σ²/2.

Node methods, exactly: every k-subset S of hidden nodes is enumerated (C(20, 5) = 15,504 at
most here), ε_g(S) follows from the full student's order parameters restricted to S (with
node reweighting, from the refitted outgoing weights, which are deterministic given S), and
the subsets are weighted by P(S): det(L_S) / e_k(L) for dpp_node, uniform for random_node,
one subset for importance_node.

Edge methods, through order parameters: Q' and R' are linear in each node's mask, so E[Q']
and E[R'] need only first-order inclusion probabilities (mask_marginals.py). ε_g is not
linear, so ε_g(E[Q'], E[R']) ("first order") differs from E[ε_g] by the fluctuations of Q'
and R' over masks; the delta method adds ½ tr(H Cov) with H the Hessian of ε_g in (Q', R')
and Cov their covariance over masks, from the second-order inclusion probabilities. The
fluctuations are O(1/N), so at N = 500 the first-order value is already close and the
corrected one closer (tests and the sweep measure both against sampled masks). Covariances
are exact except one term of Var(Q'_ij), i != j: Σ_{a != b} C_i(a,b) C_j(a,b) w_ia w_ja w_ib w_jb
/ N², a product of two nodes' off-diagonal mask covariances, each O(1/N) per pair, which is
O(1/N) relative to the terms kept and is dropped (it is zero for random_edge). With edge
reweighting the refit is not linear in the mask; no expectation is given for it here, except
for importance_edge, whose one deterministic mask and refit give ε_g exactly.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np

from dpp_pruning.theory.mask_marginals import BernoulliMarginals, FixedMarginals, KDPPMarginals
from dpp_pruning.theory.order_params import (
    generalisation_error,
    order_parameters,
    random_edge_expected,
)
from dpp_sample_ts import (
    PRUNERS,
    edge_kernel,
    importance_node_keep,
    node_kernel,
    reweight_edges,
    sampler,
    solve_psd,
)

NODE_METHODS = ("dpp_node", "random_node", "importance_node")
# the most k-subsets of K nodes that dpp_node and random_node are averaged over exactly
# (C(20, 5) = 15,504 in the paper's K = 20 panel); above it they have no expectation here
MAX_SUBSETS = 200_000
EDGE_METHODS = ("dpp_edge", "random_edge", "importance_edge")
CURVATURE_STEP = 1e-3     # step of the central differences of ε_g along covariance axes


@dataclass(frozen=True)
class Expectation:
    """Expected ε_g over masks: `value` is the best estimate, `kind` says how it was
    obtained ('exact' for node methods and deterministic masks, 'delta' for the
    second-order correction), `first_order` is ε_g at the expected order parameters (NaN
    for node methods), `sd` the standard deviation of ε_g over masks (node methods: exact;
    edge methods: the delta method's, sqrt(g^T Cov g))."""
    value: float
    kind: str
    first_order: float
    sd: float


# ----------------------------------------------------------------------------------------
# Order-parameter helpers

def rescale_order_parameters(q, r):
    """Q (K, K), R (K, M) of a student -> those of the same student with every row of w1
    rescaled to norm sqrt(N) (Q_ii = 1), as pruning does before drawing masks."""
    q = np.asarray(q, dtype=np.float64)
    scale = 1.0 / np.sqrt(np.diag(q))
    return q * np.outer(scale, scale), np.asarray(r, dtype=np.float64) * scale[:, None]


# ----------------------------------------------------------------------------------------
# Node methods

def all_subsets(num_nodes, k):
    """(C(K, k), k) int64: every k-subset of range(K), rows sorted, lexicographic order."""
    combos = list(itertools.combinations(range(num_nodes), k))
    return np.array(combos, dtype=np.int64).reshape(len(combos), k)


def node_subset_probabilities(method, subsets, kernel=None, v=None, importance_rule="magnitude"):
    """P(S) (C,) of every row of subsets (C, k) under a node method; `kernel` (K, K) or its
    KDPP sampler for dpp_node, which refuses (KDPPError, as its draws do) a k above the
    kernel's numerical rank, where every det(L_S) would be rounding noise."""
    num, k = subsets.shape
    if method == "random_node":
        return np.full(num, 1.0 / num)
    if method == "dpp_node":
        if kernel is None:
            raise ValueError("dpp_node needs its kernel L = W G W^T")
        kdpp = sampler(kernel)
        kdpp.check_k(k)
        kernel = kdpp.eigvecs @ (kdpp.eigvals[:, None] * kdpp.eigvecs.T)     # (K, K), as drawn
        blocks = kernel[subsets[:, :, None], subsets[:, None, :]]             # (C, k, k)
        dets = np.maximum(np.linalg.det(blocks), 0.0)
        return dets / dets.sum()
    if method == "importance_node":
        keep = importance_node_keep(v, k, importance_rule)                    # (K,) bool
        chosen = np.flatnonzero(keep)
        return np.all(subsets == chosen[None, :], axis=1).astype(np.float64)
    raise ValueError(f"{method!r} is not a node method")


def reweighted_outgoing(v, subsets, hidden_gram):
    """Outgoing weights (C, K) after node reweighting with kept set S (each row of subsets):
    v_S + H_SS^{-1} H_SR v_R on S, zero elsewhere (dpp_sample_ts.reweight_nodes, batched)."""
    v = np.asarray(v, dtype=np.float64)
    h = np.asarray(hidden_gram, dtype=np.float64)
    num_nodes = v.size
    num, k = subsets.shape
    out = np.zeros((num, num_nodes))
    keep = np.zeros((num, num_nodes), dtype=bool)
    np.put_along_axis(keep, subsets, True, axis=1)
    rest = np.nonzero(~keep)[1].reshape(num, num_nodes - k)                   # (C, K - k)
    out[np.arange(num)[:, None], subsets] = v[subsets]
    if k == num_nodes:
        return out
    h_ss = h[subsets[:, :, None], subsets[:, None, :]]                         # (C, k, k)
    h_sr = h[subsets[:, :, None], rest[:, None, :]]                            # (C, k, K - k)
    rhs = np.einsum("csr,cr->cs", h_sr, v[rest])[..., None]                    # (C, k, 1)
    try:
        delta = np.linalg.solve(h_ss, rhs)[..., 0]
    except np.linalg.LinAlgError:
        delta = np.stack([solve_psd(a, b)[:, 0] for a, b in zip(h_ss, rhs, strict=True)])
    out[np.arange(num)[:, None], subsets] += delta
    return out


def node_subset_losses(q, r, t, v, v_star, subsets, hidden_gram=None, reweighting=False,
                       nonlinearity="sigmoid"):
    """ε_g (C,) of the student keeping only the nodes of each row of subsets (C, k)."""
    q = np.asarray(q, dtype=np.float64)
    num_nodes = q.shape[0]
    if reweighting:
        if hidden_gram is None:
            raise ValueError("node reweighting needs the hidden-activation Gram matrix")
        outs = reweighted_outgoing(v, subsets, hidden_gram)                   # (C, K)
    else:
        keep = np.zeros((len(subsets), num_nodes), dtype=bool)
        np.put_along_axis(keep, subsets, True, axis=1)
        outs = np.where(keep, np.ravel(v)[None, :], 0.0)
    # a removed node has zero outgoing weight, so the full Q and R serve every subset
    return generalisation_error(q, r, t, outs, v_star, nonlinearity)


def enumerable(num_nodes, k):
    """Whether the k-subsets of num_nodes nodes are few enough to average over exactly."""
    return math.comb(num_nodes, k) <= MAX_SUBSETS


def node_subsets(method, num_nodes, k, v=None, importance_rule="magnitude"):
    """The subsets (C, k) a node method's expectation averages over: all of them, or the one
    importance_node keeps; None where there are more than MAX_SUBSETS."""
    if method == "importance_node":
        return np.flatnonzero(importance_node_keep(v, k, importance_rule))[None, :]
    return all_subsets(num_nodes, k) if enumerable(num_nodes, k) else None


def node_expectation(method, k, q, r, t, v, v_star, kernel=None, hidden_gram=None,
                     reweighting=False, importance_rule="magnitude", nonlinearity="sigmoid"):
    """Exact expected ε_g over the masks of a node method (an Expectation), or None where
    its subsets are too many to enumerate (`enumerable`)."""
    subsets = node_subsets(method, np.asarray(q).shape[0], k, np.ravel(v), importance_rule)
    if subsets is None:
        return None
    probs = node_subset_probabilities(method, subsets, kernel, np.ravel(v), importance_rule)
    losses = node_subset_losses(q, r, t, v, v_star, subsets, hidden_gram, reweighting,
                                nonlinearity)
    mean = float(probs @ losses)
    sd = float(np.sqrt(max(probs @ (losses - mean) ** 2, 0.0)))
    return Expectation(mean, "exact", float("nan"), sd)


def expected_node_loss(method, k, q, r, t, v, v_star, kernel=None, hidden_gram=None,
                       reweighting=False, importance_rule="magnitude", nonlinearity="sigmoid"):
    """Expected ε_g over the masks of a node method, from order parameters alone: q (K, K),
    r (K, M), t (M, M), v (K,), v_star (M,); `kernel` (K, K) for dpp_node; `hidden_gram`
    (K, K) with reweighting. Add σ²/2 for the expected test loss. NaN where the subsets are
    too many to enumerate."""
    found = node_expectation(method, k, q, r, t, v, v_star, kernel, hidden_gram, reweighting,
                             importance_rule, nonlinearity)
    return math.nan if found is None else found.value


# ----------------------------------------------------------------------------------------
# Edge methods

def importance_edge_mask(w1, k):
    """The one mask (N, K) bool that the importance_edge pruner draws for w1 (K, N)."""
    return PRUNERS["importance_edge"].draw(w1, None, None, k, 1, None)[0]


def importance_edge_reweighted(k, w1, w2, w_star, v_star, gram, nonlinearity="sigmoid"):
    """ε_g of importance_edge with edge reweighting, exactly: its mask is deterministic, so
    is the refit (dpp_sample_ts.reweight_edges), and ε_g follows from the refit student's
    order parameters. w1 (K, N), w2 (K,), w_star (M, N), v_star (M,), gram (N, N)."""
    refit = reweight_edges(w1, importance_edge_mask(w1, k), gram)                # (K, N)
    q, r, t = order_parameters(refit, w_star)
    value = float(generalisation_error(q, r, t, np.ravel(w2), v_star, nonlinearity))
    return Expectation(value, "exact", value, 0.0)


def edge_marginals(method, k, w1, gram=None, kernels=None):
    """The mask distribution of every hidden node: a list of K marginals objects; `kernels`
    (dpp_edge): the nodes' kernels or their KDPP samplers, else built from w1 and gram."""
    w1 = np.asarray(w1, dtype=np.float64)
    num_nodes, n = w1.shape
    if method == "random_edge":
        return [BernoulliMarginals(k / n, n) for _ in range(num_nodes)]
    if method == "importance_edge":
        return [FixedMarginals(m) for m in importance_edge_mask(w1, k).T]
    if method == "dpp_edge":
        return [KDPPMarginals(sampler(edge_kernel(w1[i], gram) if kernels is None
                                      else kernels[i]), k) for i in range(num_nodes)]
    raise ValueError(f"{method!r} is not an edge method")


class _Theta:
    """The pruned order parameters as a vector θ: the upper triangle of Q' (i <= j), then
    R' row by row; `unpack` maps a batch (..., D) back to Q' (..., K, K), R' (..., K, M)."""

    def __init__(self, num_nodes, num_teacher):
        self.k, self.m = num_nodes, num_teacher
        self.iu = np.triu_indices(num_nodes)
        self.size = len(self.iu[0]) + num_nodes * num_teacher

    def pack(self, q, r):
        return np.concatenate([q[self.iu], np.ravel(r)])

    def unpack(self, theta):
        n_q = len(self.iu[0])
        q = np.zeros(theta.shape[:-1] + (self.k, self.k))
        q[..., self.iu[0], self.iu[1]] = theta[..., :n_q]
        q[..., self.iu[1], self.iu[0]] = theta[..., :n_q]
        return q, theta[..., n_q:].reshape(theta.shape[:-1] + (self.k, self.m))


def edge_moments(w1, w_star, marginals):
    """Mean (D,) and covariance (D, D) over masks of θ = (Q' upper triangle, R'), for the
    student w1 (K, N), teacher w_star (M, N) and each node's mask marginals."""
    w1 = np.asarray(w1, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    num_nodes, n = w1.shape
    num_teacher = w_star.shape[0]
    theta = _Theta(num_nodes, num_teacher)
    pi = np.stack([mg.pi for mg in marginals])                               # (K, N)
    var = np.stack([mg.var for mg in marginals])                             # (K, N)
    wp = w1 * pi
    mean_q = wp @ wp.T / n
    np.fill_diagonal(mean_q, (pi * w1 * w1).sum(axis=1) / n)
    mean_r = wp @ w_star.T / n
    # index of θ for Q'_ij and R'_in
    q_index = np.zeros((num_nodes, num_nodes), dtype=np.int64)
    q_index[theta.iu] = np.arange(len(theta.iu[0]))
    q_index[theta.iu[1], theta.iu[0]] = q_index[theta.iu]
    r_index = len(theta.iu[0]) + np.arange(num_nodes * num_teacher).reshape(num_nodes, num_teacher)
    cov = np.zeros((theta.size, theta.size))
    for i, mg in enumerate(marginals):
        # θ entries that depend on node i's mask, each as Σ_a m_ia x_a given the other masks'
        # means: Q'_ii (x = w_i²/N), R'_in (x = w_i w*_n/N), Q'_ij (x = π_j w_i w_j/N)
        others = [j for j in range(num_nodes) if j != i]
        x = np.concatenate([(w1[i] ** 2)[:, None], (w1[i] * w_star).T,
                            (w1[i] * pi[others] * w1[others]).T], axis=1) / n   # (N, K + M)
        idx = np.concatenate([[q_index[i, i]], r_index[i], q_index[i, others]])
        cov[np.ix_(idx, idx)] += mg.cov_form(x)
    for i, j in zip(*np.triu_indices(num_nodes, 1), strict=True):
        # Var(Q'_ij): the diagonal part of Σ_ab C_i(a,b) C_j(a,b) z_a z_b (see module doc)
        z = w1[i] * w1[j] / n
        cov[q_index[i, j], q_index[i, j]] += np.sum(var[i] * var[j] * z * z)
    return theta, theta.pack(mean_q, mean_r), cov


def edge_expectation(method, k, w1, w2, w_star, v_star, gram=None, kernels=None,
                     nonlinearity="sigmoid", marginals=None):
    """Expected ε_g over the masks of an edge method (no reweighting): an Expectation whose
    value is first order plus the delta-method correction ½ tr(H Cov)."""
    if marginals is None:
        marginals = edge_marginals(method, k, w1, gram, kernels)
    w_star64 = np.asarray(w_star, dtype=np.float64)
    t = w_star64 @ w_star64.T / np.shape(w1)[1]
    v = np.ravel(np.asarray(w2, dtype=np.float64))

    theta, mean, cov = edge_moments(w1, w_star, marginals)

    def eps(points):                                                         # (B, D) -> (B,)
        q, r = theta.unpack(points)
        return generalisation_error(q, r, t, v, v_star, nonlinearity)

    at_mean = float(eps(mean[None])[0])
    if method == "importance_edge":
        return Expectation(at_mean, "exact", at_mean, 0.0)
    s, axes = np.linalg.eigh(cov)                                            # Cov = Σ s_l e_l e_l^T
    keep = s > 0
    s, axes = s[keep], axes[:, keep].T                                       # (L,), (L, D)
    h = CURVATURE_STEP
    plus, minus = eps(mean + h * axes), eps(mean - h * axes)
    curvature = (plus + minus - 2.0 * at_mean) / h ** 2                      # e_l^T H e_l
    slope = (plus - minus) / (2.0 * h)                                       # g . e_l
    value = at_mean + 0.5 * float(s @ curvature)
    sd = float(np.sqrt(s @ slope ** 2))
    return Expectation(value, "delta", at_mean, sd)


def expected_random_edge_loss(q, r, t, v, v_star, fraction, nonlinearity="sigmoid"):
    """ε_g at the expected order parameters of random_edge keeping each weight with
    probability f (order_params.random_edge_expected: E[Q'_ii] = f Q_ii, E[Q'_ij] = f² Q_ij,
    E[R'] = f R). Needs only Q and R, specialised or not; its gap to E[ε_g] is O(1/N)
    (edge_expectation adds the correction from the weights)."""
    pruned_q, pruned_r = random_edge_expected(q, r, fraction)
    return float(generalisation_error(pruned_q, pruned_r, t, v, v_star, nonlinearity))


# ----------------------------------------------------------------------------------------
# One entry point for a trained student

def expectation(method, k, w1, w2, w_star, v_star, gram, reweighting=False, hidden_gram=None,
                importance_rule="magnitude", nonlinearity="sigmoid", kernels=None):
    """Expected ε_g over the masks that `method` draws with budget k for the student w1
    (K, N), w2 (K,) as it is pruned (already rescaled if pruning rescales). Returns an
    Expectation, or None for dpp_edge and random_edge with reweighting (no expectation is
    derived: their refit is not linear in the random mask) and for dpp_node and random_node
    beyond MAX_SUBSETS subsets."""
    w1 = np.asarray(w1, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    n = w1.shape[1]
    if method in NODE_METHODS:
        q, r = w1 @ w1.T / n, w1 @ w_star.T / n
        t = w_star @ w_star.T / n
        kernel = node_kernel(w1, gram) if method == "dpp_node" else None
        return node_expectation(method, k, q, r, t, w2, v_star, kernel, hidden_gram,
                                reweighting, importance_rule, nonlinearity)
    if reweighting and method == "importance_edge":
        return importance_edge_reweighted(k, w1, w2, w_star, v_star, gram, nonlinearity)
    if reweighting:
        return None
    return edge_expectation(method, k, w1, w2, w_star, v_star, gram, kernels, nonlinearity)
