"""The pruned student's generalisation error as N → ∞, from the order parameters alone.

Input: the unpruned student's order parameters q = Q (K, K), r = R (K, M), t = T (M, M) and
the outgoing weights v (K,), v_star (M,); no weights, masks or data. Output: ε_g (without
σ²/2) of the student pruned by each of the six methods, with and without reweighting.

Assumption. As N → ∞ the incoming weights of the student's nodes and of the teacher's at one
input a, (w_1a..w_Ka, w*_1a..w*_Ma), are jointly Gaussian with covariance [[Q, R], [Rᵀ, T]],
independently over a, and the input Gram matrix G = XᵀX/P is the identity (α = P/N → ∞).

Node methods enumerate the C(K, k) subsets exactly (expectations.node_expectation): at G = I
the dpp_node kernel W G Wᵀ is N·Q, so P(S) ∝ det(Q_S); node reweighting refits v on the
hidden Gram matrix, whose limit is H_ik = E[g(λ_i) g(λ_k)] (order_params.gaussian_moment, the
I2 of Saad & Solla for the erf network).

Edge methods keep weight a of node i with a probability π_i(w_ia) that depends only on the
weight, independently across nodes. In the standardised weight x = w_i / √Q_ii it depends
only on the fraction f kept:
- random_edge: π = f;
- importance_edge: π(x) = 1{|x| > c}, c = Φ⁻¹(1 − f/2);
- dpp_edge: at G = I node i's kernel is diag(w_i²), and its k-DPP keeps a weight with the
  grand-canonical probability π(x) = x² / (b² + x²), b fixed by E[π(x)] = f (the fugacity is
  z_i = 1 / (b² Q_ii)); the exact k-DPP marginals differ by O(1/N).
The pruned order parameters are averages over the inputs, which concentrate on
    Q'_ii = Q_ii E[π(x) x²],  R'_in = R_in E[π(x) x²]  (w*_n regressed on w_i),
    Q'_ik = √(Q_ii Q_kk) E[π(x) π(y) x y]  (i ≠ k; x, y standard, correlation Q_ik/√(Q_ii Q_kk)),
and ε_g = order_params.generalisation_error(Q', R', T, v, v*). The masks' fluctuations of Q'
and R' vanish as N → ∞, so this ε_g is the expected one. At G = I the edge refit
δ = G_SS⁻¹ G_SR w_R is zero: edge reweighting changes nothing.

Closed forms, x ~ N(0, 1): E[π x²] is f (random), f + 2 c φ(c) (importance), 1 − f b²
(dpp_edge; with E[b² / (b² + x²)] = √(π/2) b erfcx(b/√2) = 1 − f fixing b). The pair moment
is f² ρ for random_edge; for the other two, the expectation over y given x has a closed form
(Gaussian partial moments for importance_edge, the Faddeeva function for dpp_edge), which
leaves a 1-D integral over x done by Gauss-Legendre panels graded where the integrand varies
fast. docs/theory.md, "Pruning at N → ∞", has the derivation.
"""
import numpy as np
import scipy.optimize
import scipy.special

from dpp_pruning.theory.expectations import (
    EDGE_METHODS,
    NODE_METHODS,
    all_subsets,
    enumerable,
    node_expectation,
    node_subset_losses,
    node_subset_probabilities,
    node_subsets,
)
from dpp_pruning.theory.order_params import gaussian_moment, generalisation_error
from dpp_sample_ts import KDPP

QUAD_NODES = 10      # Gauss-Legendre nodes per panel (16 or 60 change nothing above 1e-13)
TAIL = 12.0          # the 1-D integrals stop at 12 standard deviations (φ(12) ≈ 2e-32)
S_FLOOR = 1e-8       # conditional s.d. √(1 − ρ²) below this is treated as this (O(s²) change)
_LEG_T, _LEG_W = np.polynomial.legendre.leggauss(QUAD_NODES)
# importance_edge: panels around the jump of π(y) at |y| = c, in units of the conditional s.d.
_JUMP_OFFSETS = np.array([-16.0, -8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
_FIXED_OFFSETS = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, TAIL])
# dpp_edge: geometric panels from the poles' scale up to 1, then these
_GEOMETRIC_PANELS = 12
_OUTER_BREAKS = np.array([1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, TAIL])


def _normal_pdf(x):
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _check_fraction(fraction):
    f = np.asarray(fraction, dtype=np.float64)
    if np.any(~(f > 0.0)) or np.any(f > 1.0):
        raise ValueError(f"the fraction of weights kept must lie in (0, 1], got {fraction}")
    return f


# ----------------------------------------------------------------------------------------
# Keep probabilities

def importance_cut(fraction):
    """c = Φ⁻¹(1 − f/2): P(|x| > c) = f for x ~ N(0, 1)."""
    return -scipy.special.ndtri(0.5 * _check_fraction(fraction))


def importance_threshold(fraction, q_ii):
    """t_i = √Q_ii Φ⁻¹(1 − f/2): importance_edge keeps the weights with |w| > t_i."""
    return np.sqrt(q_ii) * importance_cut(fraction)


def _dpp_b_scalar(f):
    if f == 1.0:
        return 0.0
    # E[b² / (b² + x²)] = √(π/2) b erfcx(b/√2) rises from 0 to 1 with b
    def excess(log_b):
        b = np.exp(log_b)
        return np.sqrt(0.5 * np.pi) * b * scipy.special.erfcx(b / np.sqrt(2.0)) - (1.0 - f)
    return float(np.exp(scipy.optimize.brentq(excess, -60.0, 60.0, xtol=1e-15)))


def dpp_edge_saturation(fraction):
    """b (same shape as fraction) with E[x² / (b² + x²)] = f for x ~ N(0, 1); b = 0 at f = 1.
    The dpp_edge keep probability of a standardised weight x is x² / (b² + x²)."""
    f = _check_fraction(fraction)
    distinct, index = np.unique(f, return_inverse=True)                      # one root each
    return np.array([_dpp_b_scalar(x) for x in distinct])[index].reshape(f.shape)


def dpp_edge_fugacity(fraction, q_ii):
    """z_i with E[z w² / (1 + z w²)] = f for w ~ N(0, Q_ii): z_i = 1 / (b² Q_ii) (inf at
    f = 1); the N → ∞ form of mask_marginals.saddle_radius for the kernel diag(w_i²)."""
    b = dpp_edge_saturation(fraction)
    with np.errstate(divide="ignore"):
        return 1.0 / (b * b * np.asarray(q_ii, dtype=np.float64))


def keep_probability(method, w, fraction, q_ii):
    """π_i(w): the probability that an edge method keeps a weight w of a node with Q_ii,
    keeping the fraction f of its weights, as N → ∞ (broadcasts over w)."""
    w = np.asarray(w, dtype=np.float64)
    if method == "random_edge":
        return np.broadcast_to(_check_fraction(fraction), w.shape).astype(np.float64)
    if method == "importance_edge":
        return (np.abs(w) > importance_threshold(fraction, q_ii)).astype(np.float64)
    if method == "dpp_edge":
        b2q = dpp_edge_saturation(fraction) ** 2 * q_ii
        return w * w / (b2q + w * w)
    raise ValueError(f"{method!r} is not an edge method")


# ----------------------------------------------------------------------------------------
# The Gaussian moments of the kept weights, for standardised weights

def kept_second_moment(method, fraction):
    """E[π(x) x²] for x ~ N(0, 1): f (random_edge), f + 2 c φ(c) (importance_edge),
    1 − f b² (dpp_edge)."""
    f = _check_fraction(fraction)
    if method == "random_edge":
        return f
    if method == "importance_edge":
        c = importance_cut(f)
        return f + 2.0 * c * _normal_pdf(c)
    if method == "dpp_edge":
        b = dpp_edge_saturation(f)
        return 1.0 - f * b * b
    raise ValueError(f"{method!r} is not an edge method")


def _panels(breaks):
    """Gauss-Legendre nodes and weights on consecutive panels: breaks (L, P + 1) sorted ->
    x, w (L, P · QUAD_NODES)."""
    lo, hi = breaks[:, :-1, None], breaks[:, 1:, None]
    half = 0.5 * (hi - lo)                                                     # (L, P, 1)
    x = lo + half * (1.0 + _LEG_T)
    w = half * _LEG_W
    return x.reshape(len(breaks), -1), w.reshape(len(breaks), -1)


def _importance_pair(c, rho):
    """E[x y 1{|x| > c} 1{|y| > c}] for standard (x, y) with correlation ρ; c, rho (L,).

    Given x, y ~ N(μ, s²) with μ = ρ x, s = √(1 − ρ²), and
        h(μ) = E[y 1{|y| > c}] = μ [Φ̄((c − μ)/s) + Φ̄((c + μ)/s)] + s [φ((c − μ)/s) − φ((c + μ)/s)],
    odd in μ, so the moment is 2 ∫_c^∞ x h(ρ x) φ(x) dx. Panels are graded around the step
    of h at x = c/|ρ| (width s/|ρ|)."""
    s = np.maximum(np.sqrt(np.maximum(1.0 - rho * rho, 0.0)), np.finfo(np.float64).tiny)
    a = np.maximum(np.abs(rho), 1e-200)
    step, width = c / a, s / a
    jump = np.clip(step[:, None] + width[:, None] * _JUMP_OFFSETS, c[:, None], c[:, None] + TAIL)
    breaks = np.sort(np.concatenate([c[:, None] + _FIXED_OFFSETS, jump], axis=1), axis=1)
    x, w = _panels(breaks)
    mu, cc, ss = rho[:, None] * x, c[:, None], s[:, None]
    with np.errstate(over="ignore", under="ignore"):
        lo, hi = (cc - mu) / ss, (cc + mu) / ss
        h = (mu * (scipy.special.ndtr(-lo) + scipy.special.ndtr(-hi))
             + ss * (_normal_pdf(lo) - _normal_pdf(hi)))
    return 2.0 * np.sum(w * x * h * _normal_pdf(x), axis=1)


def _dpp_pair(b, rho):
    """E[x π(x) y π(y)], π(x) = x² / (b² + x²), for standard (x, y) with correlation ρ;
    b, rho (L,).

    Given x, y ~ N(μ, s²) with μ = ρ x, s = √(1 − ρ²): y π(y) = y − b² y / (b² + y²) and
        E[y / (b² + y²)] = −(√π / (s √2)) Im w((i b − μ) / (s √2)),
    w the Faddeeva function (w(ξ) = (i/π) ∫ e^{−t²} / (ξ − t) dt, Im ξ > 0). The integrand
    x π(x) m(ρ x) φ(x), m(μ) = E[y π(y) | μ], is even: 2 ∫_0^∞. Its poles near x = ±i b
    set the first panel's width; panels then grow geometrically to 1."""
    s = np.maximum(np.sqrt(np.maximum(1.0 - rho * rho, 0.0)), S_FLOOR)
    first = np.clip(0.5 * b, 1e-4, 0.5)
    grow = first[:, None] * (1.0 / first[:, None]) ** (np.arange(_GEOMETRIC_PANELS + 1)
                                                        / _GEOMETRIC_PANELS)
    outer = np.broadcast_to(_OUTER_BREAKS, (len(b), _OUTER_BREAKS.size))
    breaks = np.concatenate([np.zeros((len(b), 1)), grow, outer], axis=1)
    x, w = _panels(breaks)
    bb, ss = b[:, None], s[:, None]
    mu = rho[:, None] * x
    xi = (1j * bb - mu) / (ss * np.sqrt(2.0))
    m = mu + bb * bb * np.sqrt(np.pi) / (ss * np.sqrt(2.0)) * scipy.special.wofz(xi).imag
    pi_x = x * x / (bb * bb + x * x)
    return 2.0 * np.sum(w * x * pi_x * m * _normal_pdf(x), axis=1)


def kept_cross_moment(method, fraction, rho):
    """E[π(x) π(y) x y] for standard (x, y) with correlation ρ, the two masks independent;
    fraction and rho broadcast against each other."""
    f, rho = np.broadcast_arrays(_check_fraction(fraction), np.asarray(rho, dtype=np.float64))
    if method == "random_edge":
        return f * f * rho
    flat_f, flat_rho = f.ravel(), rho.ravel()
    if flat_f.size == 0:
        return np.zeros(f.shape)
    if method == "importance_edge":
        out = _importance_pair(importance_cut(flat_f), flat_rho)
    elif method == "dpp_edge":
        out = _dpp_pair(dpp_edge_saturation(flat_f), flat_rho)
    else:
        raise ValueError(f"{method!r} is not an edge method")
    return out.reshape(f.shape)


# ----------------------------------------------------------------------------------------
# Pruned order parameters and ε_g

def edge_order_parameters(method, fraction, q, r):
    """(Q' (K, K), R' (K, M)) of an edge method keeping `fraction` of each node's incoming
    weights, N → ∞: Q'_ii = Q_ii E[π x²], R'_in = R_in E[π x²], Q'_ik = √(Q_ii Q_kk)
    E[π(x) π(y) x y] with correlation Q_ik / √(Q_ii Q_kk). A fraction of shape (B,) gives
    (B, K, K) and (B, K, M)."""
    f = _check_fraction(fraction)
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    num_nodes = q.shape[0]
    scale = np.sqrt(np.diag(q))                                              # (K,)
    outer = np.outer(scale, scale)
    rho = np.clip(np.divide(q, outer, out=np.zeros_like(q), where=outer > 0), -1.0, 1.0)
    iu = np.triu_indices(num_nodes, 1)
    second = kept_second_moment(method, f)                                   # f.shape
    cross = kept_cross_moment(method, f[..., None], rho[iu])                # f.shape + (P,)
    pruned_q = np.empty(f.shape + (num_nodes, num_nodes))
    pruned_q[..., iu[0], iu[1]] = cross * outer[iu]
    pruned_q[..., iu[1], iu[0]] = cross * outer[iu]
    diag = np.arange(num_nodes)
    pruned_q[..., diag, diag] = second[..., None] * np.diag(q)
    return pruned_q, second[..., None, None] * r


def hidden_gram_limit(q, nonlinearity="sigmoid"):
    """H (K, K) = E[g(λ_i) g(λ_k)], the N, P → ∞ limit of the hidden-activation Gram matrix
    AᵀA/P that node reweighting fits on; for the erf network (2/π) asin(Q_ik /
    √((1 + Q_ii)(1 + Q_kk)))."""
    q = np.asarray(q, dtype=np.float64)
    dq = np.diag(q)
    return gaussian_moment(q, dq[:, None], dq[None, :], nonlinearity)


def _node_count(budget, num_nodes):
    if isinstance(budget, bool) or not float(budget).is_integer():
        raise ValueError(f"node methods keep a whole number of nodes, got {budget!r}")
    k = int(budget)
    if not 1 <= k <= num_nodes:
        raise ValueError(f"k = {k} nodes is outside 1..{num_nodes}")
    return k


def pruned_loss(method, budget, q, r, t, v, v_star, reweighting=False,
                importance_rule="magnitude", nonlinearity="sigmoid"):
    """ε_g (no σ²/2) of the pruned student at N → ∞. budget: hidden nodes kept (int, node
    methods) or the fraction of each node's incoming weights kept (float in (0, 1], edge
    methods). q (K, K), r (K, M), t (M, M), v (K,), v_star (M,) of the student as it is
    pruned. Edge reweighting changes nothing at G = I (module docstring)."""
    q = np.asarray(q, dtype=np.float64)
    if method in NODE_METHODS:
        k = _node_count(budget, q.shape[0])
        kernel = q if method == "dpp_node" else None                          # W G Wᵀ / N
        hidden = hidden_gram_limit(q, nonlinearity) if reweighting else None
        found = node_expectation(method, k, q, r, t, np.ravel(v), v_star, kernel, hidden,
                                 reweighting, importance_rule, nonlinearity)
        return np.nan if found is None else found.value
    if method in EDGE_METHODS:
        pruned_q, pruned_r = edge_order_parameters(method, float(budget), q, r)
        return float(generalisation_error(pruned_q, pruned_r, t, np.ravel(v), v_star,
                                          nonlinearity))
    raise ValueError(f"unknown pruning method {method!r}")


def pruned_losses(budgets, q, r, t, v, v_star, reweighting=(False, True),
                  importance_rule="magnitude", nonlinearity="sigmoid"):
    """pruned_loss for many budgets at once: budgets maps each method to its budgets (node
    counts for node methods, fractions for edge methods); returns {(method, budget,
    reweighting): ε_g}. Node methods share each k's subsets, their losses and the dpp_node
    kernel's eigendecomposition; edge methods are vectorised over their fractions."""
    q = np.asarray(q, dtype=np.float64)
    v = np.ravel(np.asarray(v, dtype=np.float64))
    num_nodes = q.shape[0]
    unknown = set(budgets) - set(NODE_METHODS) - set(EDGE_METHODS)
    if unknown:
        raise ValueError(f"unknown pruning method(s) {sorted(unknown)}")
    out = {}
    for method in EDGE_METHODS:
        if method not in budgets:
            continue
        fractions = np.array([float(f) for f in budgets[method]])            # (B,)
        pruned_q, pruned_r = edge_order_parameters(method, fractions, q, r)
        losses = generalisation_error(pruned_q, pruned_r, t, v, v_star, nonlinearity)
        for budget, loss in zip(budgets[method], losses, strict=True):
            out.update({(method, budget, rw): float(loss) for rw in reweighting})
    node_methods = [m for m in NODE_METHODS if m in budgets]
    kernel = KDPP(q) if "dpp_node" in node_methods else None
    hidden = hidden_gram_limit(q, nonlinearity) if any(reweighting) else None
    counts = sorted({_node_count(b, num_nodes) for m in node_methods for b in budgets[m]})
    for k in counts:
        subsets = all_subsets(num_nodes, k) if enumerable(num_nodes, k) else None
        every = {}                                                           # rw -> (C,)
        for method in node_methods:
            chosen = [b for b in budgets[method] if _node_count(b, num_nodes) == k]
            if not chosen:
                continue
            if method != "importance_node" and subsets is None:             # too many
                out.update({(method, b, rw): np.nan for b in chosen for rw in reweighting})
                continue
            if method == "importance_node":                                  # one subset
                one = node_subsets(method, num_nodes, k, v, importance_rule)
            else:
                probs = node_subset_probabilities(method, subsets, kernel, v, importance_rule)
            for rw in reweighting:
                if method == "importance_node":
                    loss = node_subset_losses(q, r, t, v, v_star, one, hidden, rw,
                                              nonlinearity)[0]
                else:
                    if rw not in every:
                        every[rw] = node_subset_losses(q, r, t, v, v_star, subsets, hidden,
                                                       rw, nonlinearity)
                    loss = probs @ every[rw]
                out.update({(method, b, rw): float(loss) for b in chosen})
    return out
