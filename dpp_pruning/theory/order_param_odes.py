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
`i4`, `j2`; the I4 sum is a compiled loop, `delta_sq_average`):

    <g(lambda_i) Delta>                  = sum_c u_c I2(i, c),
    <g'(lambda_i) f_b Delta>             = sum_c u_c I3(i, b, c),
    <g'(lambda_i) g'(lambda_k) Delta^2>  = sum_cd u_c u_d I4(i, k, c, d).

Integrator: scipy's adaptive Dormand-Prince 5(4) embedded Runge-Kutta pair (`RK45`). The
pair's embedded fourth-order solution estimates the local error of every step; a step is
accepted only when that error is below atol + rtol |y| in every component, and the next step
size follows from it. Adaptive because the time scales change by orders of magnitude along one
run: at the paper's settings (K = 6, eta = 0.5, v* = 4) the accepted steps grow from 0.005 in
alpha at the start, where the loss falls from ~10 within alpha ~ 1, to ~1-2 on the plateau and
during the slow convergence (1355 steps, ~8000 evaluations up to alpha = 1600, about one
second); a fixed step small enough for the start would cost hundreds of times more. The
outputs at the requested alphas come from the pair's dense (interpolating) output. Defaults
rtol = 1e-8, atol = 1e-10 are far below the O(1/sqrt N) asymmetries that decide the
specialisation; the tests check that tightening both tenfold changes the curve by far less
than the finite-N fluctuations.
"""
import math
import time
from dataclasses import dataclass

import numba
import numpy as np
from scipy.integrate import solve_ivp

from dpp_pruning.theory.order_params import generalisation_error, order_parameters

_TWO_OVER_PI = 2.0 / math.pi


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


_i4_scalar = numba.njit(i4, cache=True)   # the same formula, compiled for scalars


@numba.njit(cache=True)
def delta_sq_average(c, u, k):
    """sum_cd u_c u_d I4(i, l, c, d) (k, k) for covariance c (L, L) and weights u (L,): the
    <g'(lambda_i) g'(lambda_l) Delta^2> of the ODEs without the noise, i.e. the einsum
    "ilcd,c,d->il" of `gaussian_averages`' I4, over i <= l and c <= d only (I4 is symmetric
    under i <-> l and under c <-> d) and without the (k, k, L, L) tensor."""
    n_fields = c.shape[0]
    out = np.empty((k, k))
    for i in range(k):
        for l in range(i, k):  # noqa: E741  (l as in the docstring's I4(i, l, c, d))
            total = 0.0
            for a in range(n_fields):
                for b in range(a, n_fields):
                    term = u[a] * u[b] * _i4_scalar(c[i, i], c[l, l], c[i, l], c[i, a], c[i, b],
                                                    c[l, a], c[l, b], c[a, a], c[b, b], c[a, b])
                    total += term if a == b else 2.0 * term
            out[i, l] = total
            out[l, i] = total
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


def derivatives(q, r, t, v, v_star, lr, noise_std=0.0, train_v=True):
    """(dQ/dalpha (K, K), dR/dalpha (K, M), dv/dalpha (K,)) at q (K, K), r (K, M), t (M, M),
    v (K,), v_star (M,), for learning rate lr (eta) and output noise noise_std (sigma)."""
    k = q.shape[0]
    u = np.concatenate([v, -np.asarray(v_star, dtype=np.float64)])        # (L,)
    c = covariance(q, r, t)
    two, three, jj = gaussian_averages(c, k)
    field_delta = three @ u                     # (k, L): <g'(lambda_i) f_b Delta>
    delta_sq = delta_sq_average(c, u, k) + noise_std ** 2 * jj            # (k, k)
    dr = -lr * v[:, None] * field_delta[:, k:]
    drift = -lr * v[:, None] * field_delta[:, :k]                         # (k, k) [i, l]
    dq = drift + drift.T + lr ** 2 * np.outer(v, v) * delta_sq
    dv = -lr * (two @ u) if train_v else np.zeros_like(v)
    return dq, dr, dv


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
    sizes = np.cumsum([k * k, k * m])

    def unpack(y):
        return y[:sizes[0]].reshape(k, k), y[sizes[0]:sizes[1]].reshape(k, m), y[sizes[1]:]

    def rhs(_, y):
        q, r, v = unpack(y)
        dq, dr, dv = derivatives(q, r, t, v, v_star, lr, noise_std, train_v)
        return np.concatenate([dq.ravel(), dr.ravel(), dv])

    y0 = np.concatenate([q0.ravel(), r0.ravel(), v0])
    start = time.perf_counter()
    if alphas[-1] > 0:
        sol = solve_ivp(rhs, (0.0, alphas[-1]), y0, method="RK45", t_eval=alphas, rtol=rtol,
                        atol=atol)
        if not sol.success:
            raise IntegrationError(f"the ODE integration failed: {sol.message}")
        ys, evaluations = sol.y.T, sol.nfev
    else:
        ys, evaluations = np.repeat(y0[None], alphas.size, axis=0), 0
    q, r, v = (np.stack(parts) for parts in zip(*(unpack(y) for y in ys), strict=True))
    return Trajectory(alphas, q, r, v, t, v_star, float(noise_std), evaluations,
                      time.perf_counter() - start)


def initial_conditions(w1, w2, w_star):
    """Q0 (K, K), R0 (K, M), T (M, M), v0 (K,) of the student w1 (K, N), w2 (K,) or (1, K)
    against the teacher w_star (M, N): the finite-N values the simulation starts from."""
    q, r, t = order_parameters(w1, w_star)
    return q, r, t, np.asarray(w2, dtype=np.float64).reshape(-1)
