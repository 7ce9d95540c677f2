"""Inclusion probabilities of the edge-mask distributions, first and second order.

A pruning method draws, for hidden node i, a random 0/1 mask m (N,) over its incoming
weights. Every pruned order parameter is linear in m (NOTES.md, "Expected loss over the mask
distribution"), so its mean needs the first-order inclusion probabilities pi_a = P(m_a = 1)
and its covariances need the covariance C_ab = Cov(m_a, m_b) of the mask. Each class here
holds one node's mask distribution and answers
- `pi`: (N,) inclusion probabilities;
- `var`: (N,) the diagonal of C, pi (1 - pi), as for any 0/1 variable;
- `cov_form(X)`: (p, p) the quadratic forms X^T C X for p vectors X (N, p), without ever
  forming the N x N matrix C where it is dense.

The k-DPP (dpp_edge). With kernel L = Σ_n λ_n v_n v_n^T and e_j the elementary symmetric
polynomials of the eigenvalues,
    P(a in S)    = Σ_n ρ_n V_an²,                        ρ_n  = λ_n e_{k-1}(λ∖n) / e_k(λ)
    P(a, b in S) = Σ_{n,m} c_nm (V_an² V_bm² − V_an V_bn V_am V_bm)   (a != b),
                   c_nm = λ_n λ_m e_{k-2}(λ∖{n,m}) / e_k(λ)
(the n = m terms vanish). A quadratic form over the pairs then needs only u = (V∘V)^T x and
B = V^T diag(x) V: Σ_{a!=b} x_a y_b P(a, b) = u_x^T c u_y − Σ_nm c_nm B_x,nm B_y,nm.

The ratios ρ and c are computed without deletion recurrences, which cancel catastrophically
when eigenvalues are close (as here, where the kernel is nearly diagonal): e_j is the
coefficient of z^j in E(z) = Π_n (1 + λ_n z), extracted exactly by the discrete Cauchy
integral over T = r + 1 points z_t = s·exp(2πi t / T) of a circle (T exceeds the degree r,
so no other coefficient aliases onto it):
    e_j(λ∖{n,m}) = (1/T) Σ_t E(z_t) / ((1 + λ_n z_t)(1 + λ_m z_t)) z_t^{-j}.
The radius s is the saddle point where Σ_n λ_n s / (1 + λ_n s) = k, at which the z^k term
dominates E on the circle, so the sum loses only a few digits; E(z_t) is summed in log
space, so nothing overflows. Cost O(r² T) per node, one complex matrix product.

A diagonal kernel diag(λ) (dpp_edge at G = I) has the items as eigenvectors, V = I, so
P(a in S) = ρ_a and P(a, b in S) = c_ab: DiagonalKDPPMarginals sums them over the circle a
block of items at a time, in O(N T) time and bounded memory, without an N × N
eigendecomposition.
"""
import numpy as np
import scipy.optimize

from dpp_sample_ts import KDPP


class FixedMarginals:
    """A deterministic mask (importance_edge): pi = mask, no covariance."""

    def __init__(self, mask):
        self.pi = np.asarray(mask, dtype=np.float64)   # (N,)
        self.var = np.zeros_like(self.pi)

    def cov_form(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.zeros((x.shape[1], x.shape[1]))


class BernoulliMarginals:
    """Every weight kept independently with probability f (random_edge)."""

    def __init__(self, fraction, n):
        self.pi = np.full(n, float(fraction))
        self.var = self.pi * (1.0 - self.pi)

    def cov_form(self, x):
        x = np.asarray(x, dtype=np.float64)
        return (x * self.var[:, None]).T @ x


def saddle_radius(eigvals, k):
    """s > 0 with Σ_n λ_n s / (1 + λ_n s) = k, for 0 < k < r = len(eigvals), all λ > 0."""
    log_lam = np.log(eigvals)

    def excess(log_s):
        return np.sum(1.0 / (1.0 + np.exp(-(log_lam + log_s)))) - k

    lo, hi = -log_lam.max() - 50.0, -log_lam.min() + 50.0
    return float(np.exp(scipy.optimize.brentq(excess, lo, hi, xtol=1e-12)))


CHUNK_ENTRIES = 1 << 21   # complex entries of one (rows, r) block of the circle sums (32 MB)


def _log_generating(z, eigvals):
    """log E(z_t) = Σ_n log(1 + λ_n z_t) (T,) for z (T,), eigvals (r,), a block of points at a
    time, so that no T × r array is formed (T = r + 1 reaches tens of thousands)."""
    rows = max(1, CHUNK_ENTRIES // eigvals.size)
    return np.concatenate([np.log1p(np.outer(z[i:i + rows], eigvals)).sum(axis=1)
                           for i in range(0, z.size, rows)])


def _circle(eigvals, k):
    """The saddle circle of E(z) = Π_n (1 + λ_n z) for e_k: returns z (T,), its T = r + 1
    points, and log_terms(j) (T,) = log(E(z_t) z_t^{-j} / T) − log e_k(λ), so that
    Σ_t exp(log_terms(j)) f(z_t) = [z^j] E(z) f(z) / e_k(λ) for any f that keeps E f a
    polynomial of degree below T (here f = 1/(1 + λ_n z) or a product of two of those)."""
    r = eigvals.size
    n_points = r + 1
    s = saddle_radius(eigvals, k)
    z = s * np.exp(2j * np.pi * np.arange(n_points) / n_points)              # (T,)
    log_e = _log_generating(z, eigvals)                                      # (T,) log E(z)
    log_z = np.log(s) + 2j * np.pi * np.arange(n_points) / n_points

    def log_coefficient(j):
        terms = log_e - j * log_z - np.log(n_points)                         # (T,)
        top = terms.real.max()
        return top + np.log(np.exp(terms - top).sum().real)

    log_ek = log_coefficient(k)

    def log_terms(j):
        return log_e - j * log_z - np.log(n_points) - log_ek

    return z, log_terms


def kdpp_eigen_ratios(eigvals, k):
    """ρ (r,) and c (r, r) of a k-DPP whose kernel has positive eigenvalues λ (r,).

    ρ_n = λ_n e_{k-1}(λ∖n) / e_k(λ): the probability that eigenvector n is chosen (Σ ρ = k);
    c_nm = λ_n λ_m e_{k-2}(λ∖{n,m}) / e_k(λ): that both n and m are chosen (n != m).
    """
    lam = np.asarray(eigvals, dtype=np.float64)
    r = lam.size
    if not 1 <= k <= r:
        raise ValueError(f"k = {k} is outside 1..{r}")
    if k == r:                       # every eigenvector is chosen: a projection DPP
        return np.ones(r), np.ones((r, r))
    z, log_terms = _circle(lam, k)
    a = lam[:, None] / (1.0 + lam[:, None] * z[None, :])                     # (r, T)
    rho = (a * np.exp(log_terms(k - 1))[None, :]).sum(axis=1).real
    if k == 1:
        return rho, np.zeros((r, r))
    c = ((a * np.exp(log_terms(k - 2))[None, :]) @ a.T).real
    return rho, c


class KDPPMarginals:
    """The k-DPP of one node's dpp_edge kernel, given its KDPP sampler (same eigenvalues,
    rounding-level ones set to zero, as the draws use). A k the sampler refuses (above the
    kernel's rank) raises the sampler's KDPPError."""

    def __init__(self, kdpp: KDPP, k):
        k = kdpp.check_k(k)
        support = kdpp.eigvals > 0
        lam = kdpp.eigvals[support]                                          # (r,)
        self.v = np.ascontiguousarray(kdpp.eigvecs[:, support])              # (N, r)
        self.rho, self.c = kdpp_eigen_ratios(lam, k)                         # (r,), (r, r)
        self.v2 = self.v * self.v                                            # (N, r)
        self.pi = np.clip(self.v2 @ self.rho, 0.0, 1.0)                      # (N,)
        self.var = self.pi * (1.0 - self.pi)

    def pair_form(self, x):
        """Σ_{a != b} x_a y_b P(a, b in S) for every pair of columns of x (N, p) -> (p, p)."""
        x = np.asarray(x, dtype=np.float64)
        u = self.v2.T @ x                                                    # (r, p)
        b = np.einsum("an,ax,am->xnm", self.v, x, self.v, optimize=True)     # (p, r, r)
        p = x.shape[1]
        cb = (b * self.c[None]).reshape(p, -1)
        return u.T @ self.c @ u - cb @ b.reshape(p, -1).T

    def cov_form(self, x):
        x = np.asarray(x, dtype=np.float64)
        xp = x.T @ self.pi                                                   # (p,)
        return self.pair_form(x) + (x * self.pi[:, None]).T @ x - np.outer(xp, xp)


class DiagonalKDPPMarginals:
    """The k-DPP of a diagonal kernel diag(λ) (λ (N,) >= 0), e.g. dpp_edge's kernel
    diag(w_i²) at G = I. Its eigenvectors are the items, so P(a in S) = ρ_a and
    P(a, b in S) = c_ab (a != b), ρ and c as in kdpp_eigen_ratios over the positive λ (items
    with λ_a = 0 are never drawn). Both are summed over the circle's points a block of items
    at a time: nothing of size N × N is formed, so N = 20000 fits in memory (time O(N²))."""

    def __init__(self, eigvals, k):
        lam = np.asarray(eigvals, dtype=np.float64)
        self.support = lam > 0
        self.lam = lam[self.support]                                         # (r,)
        r = self.lam.size
        if not 1 <= k <= r:
            raise ValueError(f"k = {k} is outside 1..{r}, the number of positive eigenvalues")
        self.k = k
        self.pi = np.zeros(lam.size)
        if k == r:
            self.pi[self.support] = 1.0
        else:
            self.z, log_terms = _circle(self.lam, k)
            self.w1 = np.exp(log_terms(k - 1))                                # (T,)
            self.w2 = np.exp(log_terms(k - 2)) if k >= 2 else None
            self.pi[self.support] = np.clip(
                np.concatenate([(a @ self.w1).real for a, _ in self._blocks()]), 0.0, 1.0)
        self.var = self.pi * (1.0 - self.pi)

    def _blocks(self):
        """(a, items): a = λ_n / (1 + λ_n z_t) (rows, T) for consecutive blocks of items."""
        rows = max(1, CHUNK_ENTRIES // self.z.size)
        for i in range(0, self.lam.size, rows):
            lam = self.lam[i:i + rows, None]
            yield lam / (1.0 + lam * self.z[None, :]), slice(i, i + rows)

    def pair_form(self, x):
        """Σ_{a != b} x_a y_b P(a, b in S) for every pair of columns of x (N, p) -> (p, p):
        Σ_t w2_t U_tx U_ty − Σ_a c_aa x_a y_a with U = aᵀ x, c_aa = Σ_t w2_t a_at²."""
        x = np.asarray(x, dtype=np.float64)[self.support]                     # (r, p)
        p = x.shape[1]
        if self.k == 1:
            return np.zeros((p, p))
        if self.k == self.lam.size:
            total = x.sum(axis=0)
            return np.outer(total, total) - x.T @ x
        u = np.zeros((self.z.size, p), dtype=complex)                       # (T, p)
        diagonal = np.zeros(self.lam.size)                                   # (r,) c_aa
        for a, items in self._blocks():
            u += a.T @ x[items]
            diagonal[items] = ((a * a) @ self.w2).real
        return ((u * self.w2[:, None]).T @ u).real - (x * diagonal[:, None]).T @ x

    def cov_form(self, x):
        x = np.asarray(x, dtype=np.float64)
        xp = x.T @ self.pi                                                   # (p,)
        return self.pair_form(x) + (x * self.pi[:, None]).T @ x - np.outer(xp, xp)
