"""Order-parameter ODEs of online SGD for the erf two-layer network (NOTES.md, "Theory of
training").

Notation (NOTES.md): K student nodes with fields lambda_i = w_i . x / sqrt(N), M teacher nodes
with fields nu_n = w*_n . x / sqrt(N), g(z) = erf(z / sqrt 2), g'(z) = sqrt(2/pi) exp(-z^2/2).
The L = K + M fields f = (lambda, nu) are jointly Gaussian with covariance

    C = [[Q, R], [R^T, T]]   (L, L),   Q = W W^T / N, R = W W*^T / N, T = W* W*^T / N.

With the combined output weights u = (v, -v*) (L,), the error is
Delta = sum_c u_c g(f_c) - sigma eps. In the time alpha = steps / N, our SGD (first layer
eta / sqrt(N), second layer eta / N) gives, as N -> infinity (Saad & Solla 1995; Riegler &
Biehl 1995; Goldt et al. 2019):

    dR_in/da = -eta v_i <g'(lambda_i) nu_n Delta>
    dQ_ik/da = -eta v_i <g'(lambda_i) lambda_k Delta> - eta v_k <g'(lambda_k) lambda_i Delta>
               + eta^2 v_i v_k (<g'(lambda_i) g'(lambda_k) Delta^2>
                                + sigma^2 <g'(lambda_i) g'(lambda_k)>)
    dv_i/da  = -eta <g(lambda_i) Delta>        (0 in `soft_committee` mode)

and every average is a sum over u of four Gaussian integrals with closed forms (`i2`, `i3`,
`i4`, `j2`, vectorised numpy, which the tests check against Monte Carlo):

    <g(lambda_i) Delta>                  = sum_c u_c I2(i, c),
    <g'(lambda_i) f_b Delta>             = sum_c u_c I3(i, b, c),
    <g'(lambda_i) g'(lambda_k) Delta^2>  = sum_cd u_c u_d I4(i, k, c, d).

Right-hand side: `rates`, one compiled function of the state vector (Q's upper triangle, R, v;
`pack`, `unpack`) in explicit loops: the I2, I3 and J2 sums in O(K L^2), and the I4
sum, the costly one, in `delta_sq_average`: O(K^2 L^2) terms, over i <= l and c <= d only,
with what depends on one field computed once and the innermost loop running over the
K (K + 1) / 2 student pairs with a branch-free arcsin (`asin`), so that it vectorises. It
equals the previous formulation (numpy closed forms and a scalar I4 loop) to ~1e-15 relative
(tested to 1e-12). At the paper's settings one evaluation costs 5.5 us for K = 6 and 84 us
for K = 20, 11 and 8 times less than before (benchmarks/ode_speed.py).

Integrator: scipy's adaptive Dormand-Prince 5(4) embedded Runge-Kutta pair (`RK45`). The
pair's embedded fourth-order solution estimates the local error of every step; a step is
accepted only when that error is below atol + rtol |y| in every component, and the next step
size follows from it. Adaptive because the time scales change by orders of magnitude along one
run: at the paper's settings (K = 6, eta = 0.5, v* = 4) the accepted steps grow from 0.005 in
alpha at the start, where the loss falls from ~10 within alpha ~ 1, to ~1 on the plateau and
during the slow convergence (1369 steps, 8216 evaluations up to alpha = 1600, 0.09 s; K = 20:
1521 steps, 9128 evaluations, 0.86 s, on one core of a 2-core machine); a fixed step small
enough for the start would cost hundreds of times more. Beyond the first few units of alpha
the steps are held by the stability of the explicit scheme rather than by the tolerance (the
Jacobian's eigenvalues reach -1.5 for K = 6, -2.2 for K = 20), so a higher-order pair does
not pay: DOP853 needed about as many evaluations (6938 and 9050), and its dense output erred
more between steps (K = 6, sigma = 0.25, frozen v: up to 8e-7 relative, RK45's 1.5e-7). The
outputs at the requested alphas come from the pair's dense (interpolating) output. Defaults
rtol = 1e-8, atol = 1e-10 are far below the O(1/sqrt N) asymmetries that decide the
specialisation; the tests check that tightening both tenfold changes the curve by far less
than the finite-N fluctuations, and that the final Q, R, v agree with the previous
integration at 100 times tighter tolerances to 1e-7 relative.
"""
import math
import time
from dataclasses import dataclass

import numba
import numpy as np
from scipy.integrate import solve_ivp

from dpp_pruning.theory.order_params import generalisation_error, order_parameters

_TWO_OVER_PI = 2.0 / math.pi


DIVERGED = 1e6     # order parameters this many times their start's scale: training diverges
MAX_EVALUATIONS = 500_000   # of the right-hand side (the paper's settings need about 9,000)


class IntegrationError(RuntimeError):
    """The integrator could not follow the ODEs (they diverge at this learning rate)."""


def i2(c_ab, c_aa, c_bb):
    """I2 = <g(a) g(b)> = (2/pi) asin(C_ab / sqrt((1 + C_aa)(1 + C_bb))), elementwise."""
    return _TWO_OVER_PI * np.arcsin(c_ab / np.sqrt((1.0 + c_aa) * (1.0 + c_bb)))


def j2(c_ab, c_aa, c_bb):
    """J2 = <g'(a) g'(b)> = (2/pi) / sqrt((1 + C_aa)(1 + C_bb) - C_ab^2), elementwise."""
    return _TWO_OVER_PI / np.sqrt((1.0 + c_aa) * (1.0 + c_bb) - c_ab ** 2)


def i3(c_aa, c_ab, c_ac, c_bc, c_cc):
    """I3 = <g'(a) b g(c)> = (2/pi) (C_bc (1 + C_aa) - C_ab C_ac) / ((1 + C_aa) sqrt(Lambda3)),
    Lambda3 = (1 + C_aa)(1 + C_cc) - C_ac^2; elementwise over broadcast arrays."""
    one_a = 1.0 + c_aa
    lam3 = one_a * (1.0 + c_cc) - c_ac ** 2
    return _TWO_OVER_PI * (c_bc * one_a - c_ab * c_ac) / (one_a * np.sqrt(lam3))


def i4(c_aa, c_bb, c_ab, c_ac, c_ad, c_bc, c_bd, c_cc, c_dd, c_cd):
    """I4 = <g'(a) g'(b) g(c) g(d)> = (4/pi^2) asin(Lambda0 / sqrt(Lambda1 Lambda2)) / sqrt(Lambda4)
    with (NOTES.md)
        Lambda4 = (1 + C_aa)(1 + C_bb) - C_ab^2,
        Lambda0 = Lambda4 C_cd - C_bc C_bd (1 + C_aa) - C_ac C_ad (1 + C_bb)
                  + C_ab C_ac C_bd + C_ab C_ad C_bc,
        Lambda1 = Lambda4 (1 + C_cc) - C_bc^2 (1 + C_aa) - C_ac^2 (1 + C_bb) + 2 C_ab C_ac C_bc,
        Lambda2 = the same with d in place of c; elementwise over broadcast arrays."""
    one_a, one_b = 1.0 + c_aa, 1.0 + c_bb
    lam4 = one_a * one_b - c_ab ** 2
    lam0 = (lam4 * c_cd - c_bc * c_bd * one_a - c_ac * c_ad * one_b
            + c_ab * (c_ac * c_bd + c_ad * c_bc))
    lam1 = lam4 * (1.0 + c_cc) - c_bc ** 2 * one_a - c_ac ** 2 * one_b + 2.0 * c_ab * c_ac * c_bc
    lam2 = lam4 * (1.0 + c_dd) - c_bd ** 2 * one_a - c_ad ** 2 * one_b + 2.0 * c_ab * c_ad * c_bd
    return (4.0 / math.pi ** 2) * np.arcsin(lam0 / np.sqrt(lam1 * lam2)) / np.sqrt(lam4)


# (asin(s) - s) / s^3 as a polynomial in z = s^2 on [0, 1/4], coefficients of z^0 .. z^12: a
# near-minimax fit (Chebyshev, mpmath.chebyfit) whose error is below 1.5e-17.
_ASIN_SERIES = np.array([
    0.16666666666666669, 0.07499999999998433, 0.04464285714635543, 0.030381944138531247,
    0.02237217294214989, 0.017352392720869973, 0.013971212973552933, 0.011479177415184906,
    0.01032281435018578, 0.005457506718640358, 0.01740087944269402, -0.014851887071247204,
    0.028757851367421566])
_FUSED = {"contract"}    # fused multiply-adds (about 25% faster here)


@numba.njit(cache=True, fastmath=_FUSED, error_model="numpy")
def asin(x):
    """arcsin(x) for |x| <= 1 by arithmetic alone, so that the loops calling it vectorise:
    asin(s) = s + s^3 P(s^2) for s = |x| <= 1/2 (P: `_ASIN_SERIES`), and
    asin(s) = pi/2 - 2 asin(sqrt((1 - s) / 2)) above; the sign of x restored. Within a few
    units in the last place of np.arcsin (tested); NaN outside [-1, 1]."""
    s = abs(x)
    outer = s > 0.5
    z = 0.5 * (1.0 - s) if outer else s * s
    root = math.sqrt(z) if outer else s
    poly = 0.0
    for j in range(_ASIN_SERIES.size - 1, -1, -1):
        poly = poly * z + _ASIN_SERIES[j]
    inner = root + root * z * poly                 # asin(root)
    angle = 0.5 * math.pi - 2.0 * inner if outer else inner
    return angle if x >= 0.0 else -angle


@numba.njit(cache=True, fastmath=_FUSED, error_model="numpy")
def delta_sq_average(c, u, k):
    """sum_cd u_c u_d I4(i, l, c, d) (k, k) for covariance c (L, L) and weights u (L,): the
    <g'(lambda_i) g'(lambda_l) Delta^2> of the ODEs without the noise, i.e. the einsum
    "ilcd,c,d->il" of `i4_tensor`, without the (k, k, L, L) tensor.

    Over the pairs p = (i <= l) and c <= d only (I4 is symmetric in both), and arranged so that
    what depends on one field is computed once: with Lambda4_p = (1 + C_ii)(1 + C_ll) - C_il^2,
    alpha_pc = C_il C_ic - C_lc (1 + C_ii) and beta_pc = C_il C_lc - C_ic (1 + C_ll),
        Lambda0 = Lambda4_p C_cd + alpha_pc C_ld + beta_pc C_id,
        Lambda1 = Lambda4_p (1 + C_cc) + alpha_pc C_lc + beta_pc C_ic   (Lambda2: d for c),
    so I4 = (4/pi^2) asin(Lambda0 rho_pc rho_pd) / sqrt(Lambda4_p), rho_pc = Lambda1^(-1/2).
    The innermost loop runs over the pairs p, with `asin` inlined, and vectorises."""
    n_fields, n_pairs = c.shape[0], k * (k + 1) // 2
    first, second = np.empty(n_pairs, np.int64), np.empty(n_pairs, np.int64)   # i, l of p
    one_i, one_l, c_il = np.empty(n_pairs), np.empty(n_pairs), np.empty(n_pairs)
    c_i, c_l = np.empty((n_fields, n_pairs)), np.empty((n_fields, n_pairs))  # [c, p]: C_ic, C_lc
    p = 0
    for i in range(k):
        for l in range(i, k):  # noqa: E741  (l as in the docstring's I4(i, l, c, d))
            first[p], second[p] = i, l
            one_i[p], one_l[p], c_il[p] = 1.0 + c[i, i], 1.0 + c[l, l], c[i, l]
            for a in range(n_fields):
                c_i[a, p], c_l[a, p] = c[i, a], c[l, a]
            p += 1
    lam4 = one_i * one_l - c_il ** 2                        # (P,)
    rho = np.empty((n_fields, n_pairs))                     # (L, P) [c, p]: rho_pc
    lam4_rho = np.empty((n_fields, n_pairs))                # Lambda4_p rho_pc
    alpha_rho = np.empty((n_fields, n_pairs))               # alpha_pc rho_pc
    beta_rho = np.empty((n_fields, n_pairs))                # beta_pc rho_pc
    for a in range(n_fields):
        for p in range(n_pairs):
            alpha = c_il[p] * c_i[a, p] - c_l[a, p] * one_i[p]
            beta = c_il[p] * c_l[a, p] - c_i[a, p] * one_l[p]
            rho[a, p] = 1.0 / math.sqrt(lam4[p] * (1.0 + c[a, a]) + alpha * c_l[a, p]
                                        + beta * c_i[a, p])
            lam4_rho[a, p] = lam4[p] * rho[a, p]
            alpha_rho[a, p] = alpha * rho[a, p]
            beta_rho[a, p] = beta * rho[a, p]
    total = np.zeros(n_pairs)
    for a in range(n_fields):
        for b in range(a, n_fields):
            weight = u[a] * u[b] if a == b else 2.0 * u[a] * u[b]
            for p in range(n_pairs):
                lam0_rho = (lam4_rho[a, p] * c[a, b] + alpha_rho[a, p] * c_l[b, p]
                            + beta_rho[a, p] * c_i[b, p])           # Lambda0 rho_pc
                total[p] += weight * asin(lam0_rho * rho[b, p])
    out = np.empty((k, k))
    for p in range(n_pairs):
        out[first[p], second[p]] = out[second[p], first[p]] = (
            (4.0 / math.pi ** 2) * total[p] / math.sqrt(lam4[p]))
    return out


def covariance(q, r, t):
    """C = [[Q, R], [R^T, T]]: (K + M, K + M) from q (K, K), r (K, M), t (M, M)."""
    return np.block([[q, r], [r.T, t]])


def gaussian_averages(c, k):
    """I2 (k, L) [i, c], I3 (k, L, L) [i, b, c] and J2 (k, k) [i, l] for covariance c (L, L)
    whose first k fields are the student's."""
    d = np.diag(c)                                               # (L,)
    two = i2(c[:k], d[:k, None], d[None, :])
    three = i3(d[:k, None, None], c[:k, :, None], c[:k, None, :], c[None, :, :],
               d[None, None, :])
    return two, three, j2(c[:k, :k], d[:k, None], d[None, :k])


def i4_tensor(c, k):
    """I4 (k, k, L, L) [i, l, c, d] for covariance c (L, L) whose first k fields are the
    student's (the ODEs contract it on the fly, `delta_sq_average`)."""
    d, cs = np.diag(c), c[:k]
    a = (slice(None), None, None, None)                          # broadcast index i
    b = (None, slice(None), None, None)                          # broadcast index l
    return i4(d[:k][a], d[:k][b], c[:k, :k, None, None], cs[:, None, :, None],
              cs[:, None, None, :], cs[None, :, :, None], cs[None, :, None, :],
              d[None, None, :, None], d[None, None, None, :], c[None, None, :, :])


@numba.njit(cache=True, error_model="numpy")
def rates(y, k, t, v_star, lr, noise_var, train_v):
    """d/dalpha of the packed state y = (Q's upper triangle row by row, R (k, M) row by row, v),
    the layout of `pack`, for T (M, M), v_star (M,), learning rate lr (eta), output noise
    variance noise_var (sigma^2) and trainable (train_v) or frozen second layer.

    With C the covariance, u = (v, -v*), 1_a = 1 + C_aa and Lambda3_ic = 1_i 1_c - C_ic^2:
        <g(lambda_i) Delta>        = sum_c u_c I2(i, c),
        <g'(lambda_i) f_b Delta>   = sum_c u_c I3(i, b, c)
                                   = (2/pi) sum_c (C_bc - C_ib C_ic / 1_i) u_c / sqrt(Lambda3_ic),
        J2(i, l) = (2/pi) / sqrt(1_i 1_l - C_il^2), and the I4 sum of `delta_sq_average`."""
    m = t.shape[0]
    n_fields = k + m
    c, u = np.empty((n_fields, n_fields)), np.empty(n_fields)
    p = 0
    for i in range(k):
        for l in range(i, k):  # noqa: E741
            c[i, l] = c[l, i] = y[p]
            p += 1
    for i in range(k):
        for n in range(m):
            c[i, k + n] = c[k + n, i] = y[p]
            p += 1
    for n in range(m):
        u[k + n] = -v_star[n]
        for o in range(m):
            c[k + n, k + o] = t[n, o]
    for i in range(k):
        u[i] = y[p + i]
    one = np.empty(n_fields)                                     # (L,) 1 + C_aa
    for a in range(n_fields):
        one[a] = 1.0 + c[a, a]
    field_delta = np.empty((k, n_fields))                        # <g'(lambda_i) f_b Delta>
    output_delta = np.zeros(k)                                   # <g(lambda_i) Delta> pi / 2
    weight = np.empty(n_fields)                                  # u_c / sqrt(Lambda3_ic)
    for i in range(k):
        own = 0.0                                                # sum_c C_ic weight_c
        for a in range(n_fields):
            weight[a] = u[a] / math.sqrt(one[i] * one[a] - c[i, a] ** 2)
            own += c[i, a] * weight[a]
            output_delta[i] += u[a] * math.asin(c[i, a] / math.sqrt(one[i] * one[a]))
        for b in range(n_fields):
            field_delta[i, b] = _TWO_OVER_PI * (np.dot(c[b], weight) - c[i, b] / one[i] * own)
    delta_sq = delta_sq_average(c, u, k)
    out = np.empty_like(y)
    p = 0
    for i in range(k):
        for l in range(i, k):  # noqa: E741
            j2_il = _TWO_OVER_PI / math.sqrt(one[i] * one[l] - c[i, l] ** 2)
            out[p] = (-lr * (u[i] * field_delta[i, l] + u[l] * field_delta[l, i])
                      + lr ** 2 * u[i] * u[l] * (delta_sq[i, l] + noise_var * j2_il))
            p += 1
    for i in range(k):
        for n in range(m):
            out[p] = -lr * u[i] * field_delta[i, k + n]
            p += 1
    for i in range(k):
        out[p + i] = -lr * _TWO_OVER_PI * output_delta[i] if train_v else 0.0
    return out


def pack(q, r, v):
    """The state vector (K (K + 1) / 2 + K M + K,) of q (K, K) (symmetric: its upper triangle
    row by row), r (K, M) and v (K,)."""
    k = len(v)
    return np.concatenate([q[np.triu_indices(k)], np.ravel(r), v])


def unpack(y, k, m):
    """q (..., K, K), r (..., K, M), v (..., K) of state vectors y (..., S) in the layout of
    `pack`."""
    upper, rest = np.triu_indices(k), y.shape[:-1]
    size = len(upper[0])
    q = np.empty(rest + (k, k))
    q[..., upper[0], upper[1]] = q[..., upper[1], upper[0]] = y[..., :size]
    return q, y[..., size:size + k * m].reshape(rest + (k, m)), y[..., size + k * m:]


def derivatives(q, r, t, v, v_star, lr, noise_std=0.0, train_v=True):
    """(dQ/dalpha (K, K), dR/dalpha (K, M), dv/dalpha (K,)) at q (K, K), r (K, M), t (M, M),
    v (K,), v_star (M,), for learning rate lr (eta) and output noise noise_std (sigma)."""
    v = np.asarray(v, dtype=np.float64)
    t, v_star = np.asarray(t, dtype=np.float64), np.asarray(v_star, dtype=np.float64)
    dy = rates(pack(np.asarray(q, dtype=np.float64), np.asarray(r, dtype=np.float64), v),
               len(v), t, v_star, float(lr), float(noise_std) ** 2, bool(train_v))
    return unpack(dy, len(v), t.shape[0])


@dataclass
class Trajectory:
    alpha: np.ndarray        # (A,) steps / N
    q: np.ndarray            # (A, K, K)
    r: np.ndarray            # (A, K, M)
    v: np.ndarray            # (A, K)
    t: np.ndarray            # (M, M), constant
    v_star: np.ndarray       # (M,)
    noise_std: float
    evaluations: int         # right-hand side evaluations of the integrator
    seconds: float           # wall-clock time of the integration

    @property
    def eps_g(self):
        """Generalisation error eps_g at every alpha (A,), without output noise."""
        return generalisation_error(self.q, self.r, self.t, self.v, self.v_star)

    @property
    def test_loss(self):
        """Expected test loss eps_g + sigma^2 / 2 at every alpha (A,)."""
        return self.eps_g + 0.5 * self.noise_std ** 2


def integrate(q0, r0, t, v0, v_star, lr, alphas, noise_std=0.0, train_v=True, rtol=1e-8,
              atol=1e-10):
    """Integrate the ODEs from Q0 (K, K), R0 (K, M), v0 (K,) with T (M, M), v_star (M,) fixed;
    returns the Trajectory at the increasing alphas (A,) (the first may be 0)."""
    q0, r0, t = (np.asarray(a, dtype=np.float64) for a in (q0, r0, t))
    v0 = np.asarray(v0, dtype=np.float64).reshape(-1)
    v_star = np.asarray(v_star, dtype=np.float64).reshape(-1)
    alphas = np.asarray(alphas, dtype=np.float64)
    k, m = r0.shape
    if q0.shape != (k, k) or t.shape != (m, m) or v0.shape != (k,) or v_star.shape != (m,):
        raise ValueError(f"shapes do not match: Q {q0.shape}, R {r0.shape}, T {t.shape}, "
                         f"v {v0.shape}, v* {v_star.shape}")
    if alphas.ndim != 1 or alphas.size == 0 or alphas[0] < 0 or (np.diff(alphas) < 0).any():
        raise ValueError("alphas must be a non-empty increasing sequence of times >= 0")
    y0, settings = pack(q0, r0, v0), (float(lr), float(noise_std) ** 2, bool(train_v))
    limit = DIVERGED * (1.0 + np.abs(y0).max() + np.abs(t).max() + np.abs(v_star).max() ** 2)

    def diverges(_, y):               # crosses zero when an order parameter passes `limit`
        return limit - np.abs(y).max()
    diverges.terminal = True
    calls = [0]

    def right_hand_side(alpha, y):
        calls[0] += 1
        if calls[0] > MAX_EVALUATIONS:
            raise IntegrationError(
                f"the ODEs needed more than {MAX_EVALUATIONS} evaluations to reach alpha = "
                f"{alpha:.3g} of {alphas[-1]:g} (their steps shrink as the learning rate grows)")
        return rates(y, k, t, v_star, *settings)
    start = time.perf_counter()
    if alphas[-1] > 0:
        sol = solve_ivp(right_hand_side, (0.0, alphas[-1]), y0, method="RK45", t_eval=alphas,
                        rtol=rtol, atol=atol, events=diverges)
        if sol.status == 1:
            raise IntegrationError(f"the order parameters diverge (beyond {limit:.3g} at alpha "
                                   f"= {sol.t_events[0][0]:.3g}): the training they describe "
                                   "diverges")
        if not sol.success:
            raise IntegrationError(f"the ODE integration failed: {sol.message}")
        ys, evaluations = sol.y.T, sol.nfev
    else:
        ys, evaluations = np.repeat(y0[None], alphas.size, axis=0), 0
    q, r, v = unpack(ys, k, m)
    return Trajectory(alphas, q, r, v, t, v_star, float(noise_std), evaluations,
                      time.perf_counter() - start)


def initial_conditions(w1, w2, w_star):
    """Q0 (K, K), R0 (K, M), T (M, M), v0 (K,) of the student w1 (K, N), w2 (K,) or (1, K)
    against the teacher w_star (M, N): the finite-N values the simulation starts from."""
    q, r, t = order_parameters(w1, w_star)
    return q, r, t, np.asarray(w2, dtype=np.float64).reshape(-1)
