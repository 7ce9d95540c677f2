"""Kernels, k-DPP draws, masks and reweighting for pruning.

Sections: the exact k-DPP sampler; kernels (from Gram matrices); the registry of pruning
strategies that draw masks; reweighting of the kept weights.

The k-DPP sampler. A k-DPP with kernel L (n, n), symmetric
positive semi-definite, draws a k-subset S of {0..n-1} with P(S) = det(L_S) / e_k(λ(L)).

Sampling follows Kulesza & Taskar (2012), Algorithm 8, then the chain rule of the
projection DPP:
1. choose k eigenvectors of L; eigenvector m is kept with probability
   λ_m e_{l-1}(λ_1..λ_{m-1}) / e_l(λ_1..λ_m) while walking m = r..1 with l still to choose,
   the elementary symmetric polynomials e_l being computed in log space;
2. draw from the projection DPP onto the chosen orthonormal columns V (n, k), picking one
   item at a time with probability proportional to its squared residual row norm, which
   is clipped at zero (a drawn item's set to exactly zero) and renormalised at every step
   (the rounding fix that dppy 0.3.3 needs patched into site-packages; nothing to patch
   here).
When k > n/2 step 2 instead draws the complement: eigh returns a complete orthonormal
basis, the projection DPP onto the n - k unchosen eigenvectors has kernel I - V Vᵀ, and its
sample is exactly the complement of a sample of the projection DPP onto V. A draw costs
O(n min(k, n - k)²) after one O(n³) eigendecomposition, which KDPP keeps across draws.
Step 2 updates the residual norms lazily (_draw_projection): a step reads only the rows
that its running sum passes, and a block of rows catches up on the steps it missed in one
small matrix-matrix product, where updating every row at every step would be one
matrix-vector product per step. The draws are those of the row-by-row chain rule
(tests/reference.py) up to rounding: the normaliser is d - t, what the residual norms sum
to in exact arithmetic, where the row-by-row rule sums the rounded norms.

Tolerances, relative to the largest eigenvalue magnitude λ_max:
- eigenvalues in [-NEG_RTOL·λ_max, n·eps·λ_max] become exactly zero: the upper end is the
  accuracy of a float64 eigh (the rank threshold of numpy's matrix_rank), so exactly
  low-rank float64 kernels get their true rank; the lower end absorbs float32 rounding
  (kernels built in float32 at paper scale show eigenvalues near -1e-6·λ_max). Clipping the
  negatives is the projection onto the nearest positive semi-definite matrix.
  Small positive eigenvalues above n·eps·λ_max are kept as they are: a Gaussian kernel plus
  0.01·I over a few thousand columns legitimately has eigenvalues down to ~3e-6·λ_max,
  and zeroing them would make large k fail for want of rank.
- an eigenvalue below -NEG_RTOL·λ_max, or an asymmetry max|L - Lᵀ| above
  NEG_RTOL·max|L|, is not rounding: KDPPError.
"""

import itertools
import operator
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import scipy.linalg
import threadpoolctl
import torch

from dpp_pruning.base.choices import IMPORTANCE_RULES, k_range

NEG_RTOL = 1e-4  # relative size of negative eigenvalues / asymmetry accepted as rounding
SMALL_LAPACK = 1024  # below this size LAPACK calls run on one BLAS thread (see _one_blas_thread)

_BLAS = threadpoolctl.ThreadpoolController()


def _one_blas_thread():
    """Context in which numpy / scipy's BLAS uses one thread. The eigendecompositions and
    solves here are small (n <= ~1000); on a busy 2-core machine OpenBLAS's threads made a
    500 x 500 eigh up to 70 times slower (benchmarks/README.md), and one thread is never
    much slower at these sizes."""
    return _BLAS.limit(limits=1, user_api="blas")


class KDPPError(ValueError):
    """A kernel or subset size that no k-DPP can be drawn from."""


def eig_kernel(L):
    """Eigendecomposition of a PSD kernel with rounding-level eigenvalues set to zero.

    L (n, n) -> eigvals (n,) float64 ascending, all >= 0; eigvecs (n, n) orthonormal columns.
    """
    L = np.asarray(L, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] != L.shape[1]:
        raise KDPPError(f"the kernel must be a square matrix, got shape {L.shape}.")
    if not np.all(np.isfinite(L)):
        raise KDPPError("the kernel has non-finite entries.")
    scale = np.abs(L).max(initial=0.0)
    if np.abs(L - L.T).max(initial=0.0) > NEG_RTOL * scale:
        raise KDPPError("the kernel is not symmetric (max |L - L.T| exceeds "
                        f"{NEG_RTOL:g} of max |L|).")
    if L.shape[0] <= SMALL_LAPACK:
        with _one_blas_thread():
            eigvals, eigvecs = np.linalg.eigh((L + L.T) / 2)
    else:
        eigvals, eigvecs = np.linalg.eigh((L + L.T) / 2)
    return clip_eigvals(eigvals), eigvecs


def clip_eigvals(eigvals):
    """eigvals (n,) of a symmetric kernel -> (n,) float64 with rounding-level values set to 0."""
    eigvals = np.asarray(eigvals, dtype=np.float64)
    top = np.abs(eigvals).max(initial=0.0)
    if eigvals.min(initial=0.0) < -NEG_RTOL * top:
        raise KDPPError("the kernel is not positive semi-definite: its smallest eigenvalue "
                        f"{eigvals.min():.3g} is below -{NEG_RTOL:g} times its largest "
                        f"magnitude {top:.3g}.")
    zero_tol = eigvals.size * np.finfo(np.float64).eps * top
    return np.where(eigvals > zero_tol, eigvals, 0.0)


def log_esp_table(eigvals, k):
    """eigvals (r,) > 0 -> (k + 1, r + 1): entry [l, m] = log e_l(eigvals[:m]), -inf when m < l."""
    r = eigvals.size
    log_lam = np.log(eigvals)
    table = np.full((k + 1, r + 1), -np.inf)
    table[0] = 0.0
    for m in range(1, r + 1):
        table[1:, m] = np.logaddexp(table[1:, m - 1], log_lam[m - 1] + table[:-1, m - 1])
    return table


def eigvec_keep_probabilities(eigvals, k):
    """eigvals (r,) > 0 -> (k, r): entry [l - 1, m - 1] = P(keep eigenvector m | l still to pick).

    Equals λ_m e_{l-1}(λ_1..λ_{m-1}) / e_l(λ_1..λ_m); exactly 1 when m == l, and 1 (never
    reached) when m < l.
    """
    table = log_esp_table(eigvals, k)
    log_num = np.log(eigvals) + table[:-1, :-1]  # (k, r)
    log_den = table[1:, 1:]  # (k, r)
    log_p = np.zeros_like(log_den)
    np.subtract(log_num, log_den, out=log_p, where=np.isfinite(log_den))
    return np.exp(log_p)


@numba.njit(cache=True)
def choose_eigvecs(keep_prob, u):
    """keep_prob (k, r) from eigvec_keep_probabilities, u (r,) uniform -> (k,) chosen columns,
    ascending: walk m = r-1..0, keep m when u[m] < keep_prob[left - 1, m], left = k still to
    choose."""
    k, r = keep_prob.shape
    chosen = np.empty(k, dtype=np.int64)
    left = k
    for m in range(r - 1, -1, -1):
        if left == 0:
            break
        if u[m] < keep_prob[left - 1, m]:
            left -= 1
            chosen[left] = m
    return chosen


ROW_BLOCK = 4  # rows whose deferred updates are applied together (_catch_up is written for 4)
_FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, fastmath=_FASTMATH)
def _catch_up(first, t, V, Q, C, norms, done, picked):
    """Apply the chain rule's steps done[block]..t-1 to the rows first..first+3 of one block:
    C[i, a] = V[i]·Q[a], the conditional kernel's entry (i, j_a) over sqrt of its diagonal,
    and norms[i] <- max(norms[i] - C[i, a]², 0) step by step, norms[j_a] <- 0 at step a.
    The products are a (4, d) x (d, steps) matrix product, two steps at a time."""
    block = first // ROW_BLOCK
    start = done[block]
    if start >= t:
        return
    d = V.shape[1]
    i = first
    a = start
    while a + 1 < t:
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        r0 = 0.0
        r1 = 0.0
        r2 = 0.0
        r3 = 0.0
        for e in range(d):
            q = Q[a, e]
            p = Q[a + 1, e]
            v0 = V[i, e]
            v1 = V[i + 1, e]
            v2 = V[i + 2, e]
            v3 = V[i + 3, e]
            s0 += v0 * q
            s1 += v1 * q
            s2 += v2 * q
            s3 += v3 * q
            r0 += v0 * p
            r1 += v1 * p
            r2 += v2 * p
            r3 += v3 * p
        C[i, a], C[i + 1, a], C[i + 2, a], C[i + 3, a] = s0, s1, s2, s3
        C[i, a + 1], C[i + 1, a + 1], C[i + 2, a + 1], C[i + 3, a + 1] = r0, r1, r2, r3
        a += 2
    if a < t:
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        for e in range(d):
            q = Q[a, e]
            s0 += V[i, e] * q
            s1 += V[i + 1, e] * q
            s2 += V[i + 2, e] * q
            s3 += V[i + 3, e] * q
        C[i, a], C[i + 1, a], C[i + 2, a], C[i + 3, a] = s0, s1, s2, s3
    for row in range(i, i + ROW_BLOCK):
        w = norms[row]
        for a in range(start, t):
            w = max(w - C[row, a] * C[row, a], 0.0)
            if picked[a] == row:
                w = 0.0
        norms[row] = w
    done[block] = t


@numba.njit(cache=True, fastmath=_FASTMATH)
def _draw_projection(V, u, C, Q, norms, done, picked):
    """Fill picked (d,) with a draw of the projection DPP with kernel V Vᵀ, in the order
    drawn. V (m, d) orthonormal columns, m a multiple of ROW_BLOCK (trailing zero rows are
    never drawn); u (d,) uniforms; C (m, d), Q (d, d), norms (m,), done (m / ROW_BLOCK,)
    work space.

    Chain rule: at step t the item j is drawn with probability norms[j] / (d - t), norms the
    squared residual row norms (clipped at zero; in exact arithmetic Σ norms = d - t, the
    trace of the projection still to draw); then Gram-Schmidt in the d coordinates,
    Q[t] = q_t = (V[j] - Σ_{a<t} C[j, a] Q[a]) / sqrt(norms[j]), C[:, t] = V q_t and
    norms -= C[:, t]², norms[j] = 0. Item j is where the running sum of the positive
    weights first exceeds u[t] (d - t); should rounding leave the sum short, the last
    positive weight is drawn (it owns the top of the interval), so a zero weight never is.
    The sum runs from the front when u[t] < 1/2, and otherwise from the back, to the first
    item whose suffix sum reaches (1 - u[t]) (d - t): the same item, ties included. Rows are
    brought up to date only when a sum reaches them, a block of ROW_BLOCK rows at a time,
    with all the steps they missed at once (_catch_up)."""
    m, d = V.shape
    for i in range(m):
        w = 0.0
        for e in range(d):
            w += V[i, e] * V[i, e]
        norms[i] = w
    done[:] = 0
    picked[:] = -1
    blocks = m // ROW_BLOCK
    for t in range(d):
        left = float(d - t)
        j = -1
        running = 0.0
        found = False
        if u[t] < 0.5:
            target = u[t] * left
            for block in range(blocks):
                first = block * ROW_BLOCK
                _catch_up(first, t, V, Q, C, norms, done, picked)
                for i in range(first, first + ROW_BLOCK):
                    if norms[i] > 0.0:
                        j = i
                        running += norms[i]
                        if running > target:
                            found = True
                            break
                if found:
                    break
        else:
            target = left - u[t] * left
            for block in range(blocks - 1, -1, -1):
                first = block * ROW_BLOCK
                _catch_up(first, t, V, Q, C, norms, done, picked)
                for i in range(first + ROW_BLOCK - 1, first - 1, -1):
                    if norms[i] > 0.0:
                        j = i
                        running += norms[i]
                        if running >= target:
                            found = True
                            break
                if found:
                    break
        picked[t] = j
        inv_norm = 1.0 / np.sqrt(norms[j])
        q = Q[t]
        for e in range(d):
            q[e] = V[j, e]
        a = 0
        while a + 3 < t:
            x0, x1, x2, x3 = C[j, a], C[j, a + 1], C[j, a + 2], C[j, a + 3]
            for e in range(d):
                q[e] -= x0 * Q[a, e] + x1 * Q[a + 1, e] + x2 * Q[a + 2, e] + x3 * Q[a + 3, e]
            a += 4
        while a < t:
            x0 = C[j, a]
            for e in range(d):
                q[e] -= x0 * Q[a, e]
            a += 1
        for e in range(d):
            q[e] *= inv_norm


def sample_projection_dpp(V, u):
    """V (n, d) orthonormal columns, u (d,) uniforms in [0, 1) -> (d,) int64 draw of the
    projection DPP with kernel V Vᵀ, in the order drawn (see _draw_projection)."""
    n, d = V.shape
    m = -(-n // ROW_BLOCK) * ROW_BLOCK
    padded = np.zeros((m, d))
    padded[:n] = V
    picked = np.empty(d, dtype=np.int64)
    _draw_projection(padded, np.asarray(u, dtype=np.float64), np.empty((m, d)),
                     np.empty((d, d)), np.empty(m), np.empty(m // ROW_BLOCK, np.int64), picked)
    return picked


@numba.njit(cache=True)
def _sample_kdpp(eigvecs, support, keep_prob, u):
    """Draws of the k-DPP with eigenvectors eigvecs (n, n), support (r,) the columns with
    nonzero eigenvalue, keep_prob (k, r); u (num, r + d), d = min(k, n - k): row b's first
    r uniforms choose its eigenvectors (choose_eigvecs), the other d drive the projection
    DPP onto the chosen columns, or for k > n/2 onto the unchosen ones, whose draw is the
    complement. -> (num, k) int64, rows sorted. The work space is shared by the draws."""
    n = eigvecs.shape[0]
    k, r = keep_prob.shape
    num = u.shape[0]
    complement = 2 * k > n
    d = n - k if complement else k
    m = (n + ROW_BLOCK - 1) // ROW_BLOCK * ROW_BLOCK
    V = np.zeros((m, d))
    C = np.empty((m, d))
    Q = np.empty((d, d))
    norms = np.empty(m)
    done = np.empty(m // ROW_BLOCK, dtype=np.int64)
    picked = np.empty(d, dtype=np.int64)
    columns = np.empty(d, dtype=np.int64)
    member = np.empty(n, dtype=np.bool_)
    out = np.empty((num, k), dtype=np.int64)
    for b in range(num):
        chosen = support[choose_eigvecs(keep_prob, u[b, :r])]
        if complement:
            member[:] = True
            member[chosen] = False
            columns[:] = np.flatnonzero(member)
        else:
            columns[:] = chosen
        for i in range(n):
            for a in range(d):
                V[i, a] = eigvecs[i, columns[a]]
        _draw_projection(V, u[b, r:], C, Q, norms, done, picked)
        if complement:
            member[:] = True
            member[picked] = False
            out[b] = np.flatnonzero(member)
        else:
            out[b] = np.sort(picked)
    return out


class KDPP:
    """Exact k-DPP sampler for a fixed kernel L (n, n); the eigendecomposition is done once
    and the eigenvector-selection probabilities are cached per k."""

    def __init__(self, L):
        self._set_eig(*eig_kernel(L))

    @classmethod
    def from_eig(cls, eigvals, eigvecs):
        """eigvals (n,), eigvecs (n, n) a complete orthonormal basis (as from np.linalg.eigh)."""
        eigvecs = np.asarray(eigvecs, dtype=np.float64)
        n = eigvecs.shape[0]
        if eigvecs.shape != (n, n) or np.shape(eigvals) != (n,):
            raise KDPPError("from_eig needs eigvals (n,) and a square eigvecs (n, n), got "
                            f"{np.shape(eigvals)} and {eigvecs.shape}.")
        kdpp = cls.__new__(cls)
        kdpp._set_eig(clip_eigvals(eigvals), eigvecs)
        return kdpp

    def _set_eig(self, eigvals, eigvecs):
        self.n = eigvals.size
        self.eigvals = eigvals  # (n,)
        self.eigvecs = np.ascontiguousarray(eigvecs)  # (n, n)
        self._support = np.flatnonzero(eigvals > 0)  # (r,) columns with nonzero eigenvalue
        self._keep_prob = {}  # k -> (k, r)

    @property
    def rank(self):
        """Number of nonzero eigenvalues after rounding-level ones are set to zero."""
        return int(self._support.size)

    def check_k(self, k):
        """k as an int, or KDPPError if no k-subset can be drawn: k outside 0..n, or above
        the rank (every k-subset then has probability zero). The one rank check of this
        k-DPP, shared by its draws, its exact subset probabilities (dpp_node expectations)
        and its inclusion probabilities (mask_marginals)."""
        k = operator.index(k)
        if not 0 <= k <= self.n:
            raise KDPPError(f"k = {k} is outside 0..n = 0..{self.n}.")
        if k > self.rank:
            raise KDPPError(f"k = {k} exceeds the kernel's rank {self.rank}: every "
                            f"{k}-subset has probability zero.")
        return k

    def _keep_probabilities(self, k):
        if k not in self._keep_prob:
            self._keep_prob[k] = eigvec_keep_probabilities(self.eigvals[self._support], k)
        return self._keep_prob[k]

    def sample(self, k, rng):
        """One draw: sorted (k,) int64 indices; rng a numpy Generator."""
        return self.sample_many(k, 1, rng)[0]

    def sample_many(self, k, num, rng):
        """num independent draws -> (num, k) int64, each row sorted. Draw b takes the uniforms
        rng.random(rank) then rng.random(min(k, n - k)), in that order, after draw b - 1's
        (one rng.random((num, rank + min(k, n - k))) call); nothing when k = 0."""
        k = self.check_k(k)
        if k == 0 or num == 0:
            return np.empty((num, k), dtype=np.int64)
        u = rng.random((num, self.rank + min(k, self.n - k)))
        return _sample_kdpp(self.eigvecs, self._support, self._keep_probabilities(k), u)


def sampler(kernel):
    """A KDPP for a kernel (n, n), or the KDPP itself if one is passed: strategies and
    expectations take either, so that one eigendecomposition serves every draw and budget."""
    return kernel if isinstance(kernel, KDPP) else KDPP(kernel)


def exact_subset_probabilities(L, k):
    """Brute force over all k-subsets: {sorted k-tuple: det(L_S) / Σ_T det(L_T)}.

    C(n, k) determinants: meant for tests on small n (n <= 12 or so). Determinants that
    rounding leaves slightly negative count as zero.
    """
    L = np.asarray(L, dtype=np.float64)
    KDPP(L).check_k(k)
    subsets = list(itertools.combinations(range(L.shape[0]), k))
    idx = np.array(subsets, dtype=np.int64).reshape(len(subsets), k)  # (s, k)
    dets = np.maximum(np.linalg.det(L[idx[:, :, None], idx[:, None, :]]), 0.0)  # (s,)
    return dict(zip(subsets, (dets / dets.sum()).tolist(), strict=True))


def exact_inclusion_probabilities(L, k):
    """Brute force: (n,) P(i in S) under the k-DPP with kernel L; small n only."""
    incl = np.zeros(np.shape(L)[0])
    for subset, prob in exact_subset_probabilities(L, k).items():
        incl[list(subset)] += prob
    return incl


# ----------------------------------------------------------------------------------------
# Kernels. Everything is built from the input Gram matrix G = X^T X / P (N, N), never from
# the P x N inputs themselves, and in float64.

def node_kernel(w1, gram):
    """dpp_node kernel L = W G W^T: w1 (K, N), gram (N, N) -> (K, K)."""
    w1 = np.asarray(w1, dtype=np.float64)
    return w1 @ np.asarray(gram, dtype=np.float64) @ w1.T


def edge_kernel(w_i, gram):
    """dpp_edge kernel of one hidden node, diag(w_i) G diag(w_i): w_i (N,) -> (N, N)."""
    w_i = np.asarray(w_i, dtype=np.float64)
    return np.asarray(gram, dtype=np.float64) * np.outer(w_i, w_i)


def gaussian_kernels(gram, beta, eps=0.01, weights=None):
    """Gaussian kernels L = exp(-beta ||a_p - a_q||^2) + eps I over the columns a_p of a
    matrix A, from its Gram matrix: squared distances are gram_pp + gram_qq - 2 gram_pq
    (clipped at 0), so A itself is never needed.

    gram (n, n) float64 torch tensor on any device; weights None -> (1, n, n), the kernel of
    A's own columns; weights (B, n) -> (B, n, n), kernel b over the columns of A diag(weights_b)
    (whose Gram matrix is gram * outer(weights_b, weights_b)), all computed on gram's device."""
    diag = torch.diagonal(gram)                                                  # (n,)
    if weights is None:
        sq = diag[None]                                                          # (1, n)
        cross = 2.0 * gram[None]                                                 # (1, n, n)
    else:
        sq = weights ** 2 * diag                                                 # (B, n)
        cross = 2.0 * weights[:, :, None] * weights[:, None, :] * gram          # (B, n, n)
    dist2 = sq[:, :, None] + sq[:, None, :] - cross                             # (B, n, n)
    kernel = torch.exp_(dist2.clamp_(min=0.0).mul_(-beta))
    kernel.diagonal(dim1=1, dim2=2).add_(eps)
    return kernel


def gaussian_kernel(gram, beta, eps=0.01):
    """The kernel of gaussian_kernels for one numpy Gram matrix A^T A (n, n) -> (n, n) float64."""
    gram = torch.as_tensor(np.asarray(gram, dtype=np.float64))
    return gaussian_kernels(gram, beta, eps)[0].numpy()


# ----------------------------------------------------------------------------------------
# Masks. A mask is a 0/1 array (N, K): column i holds the incoming weights of hidden node i
# (kept = 1), the transpose of w1 (K, N), as in the original code. Strategies share one
# signature and live in the PRUNERS registry.

class MaskList(list):
    """The masks of one pruning run, a plain list of (N, K) float32 0/1 arrays, carrying
    what made them: choice, k, input_dim, student_h_size, seed and teacher_id."""

    def __init__(self, masks=(), **meta):
        super().__init__(masks)
        self.__dict__.update(meta)


@dataclass(frozen=True)
class Pruner:
    name: str
    granularity: str          # 'node': k counts hidden nodes; 'edge': k counts inputs per node
    draw: Callable            # (w1 (K,N), w2 (K,), gram (N,N), k, num_masks, rng, kernels,
    #                           importance_rule) -> (B, N, K) bool; kernels: precomputed DPP
    #                           kernel(s) or their KDPP samplers, or None; importance_rule:
    #                           see importance_node_keep


PRUNERS = {}


def _register(name, granularity):
    def wrap(draw):
        PRUNERS[name] = Pruner(name, granularity, draw)
        return draw
    return wrap


def _node_masks(keep, n):
    """(B, K) bool kept nodes -> (B, N, K) masks."""
    return np.repeat(keep[:, None, :], n, axis=1)


@_register("dpp_node", "node")
def dpp_node(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule=None):
    kernel = node_kernel(w1, gram) if kernels is None else kernels
    subsets = sampler(kernel).sample_many(k, num_masks, rng)                 # (B, k)
    keep = np.zeros((num_masks, w1.shape[0]), dtype=bool)
    np.put_along_axis(keep, subsets, True, axis=1)
    return _node_masks(keep, w1.shape[1])


@_register("dpp_edge", "edge")
def dpp_edge(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule=None,
             progress=None):
    num_nodes, n = w1.shape
    masks = np.zeros((num_masks, n, num_nodes), dtype=bool)
    for i in range(num_nodes):
        kernel = edge_kernel(w1[i], gram) if kernels is None else kernels[i]
        subsets = sampler(kernel).sample_many(k, num_masks, rng)              # (B, k)
        np.put_along_axis(masks[:, :, i], subsets, True, axis=1)
        if progress is not None:
            progress(i + 1, num_nodes)
    return masks


@_register("random_edge", "edge")
def random_edge(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule=None):
    num_nodes, n = w1.shape
    return rng.random((num_masks, n, num_nodes)) < k / n


@_register("random_node", "node")
def random_node(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule=None):
    num_nodes = w1.shape[0]
    scores = rng.random((num_masks, num_nodes))
    keep = np.zeros((num_masks, num_nodes), dtype=bool)
    np.put_along_axis(keep, np.argsort(scores, axis=1)[:, :k], True, axis=1)
    return _node_masks(keep, w1.shape[1])


@_register("importance_edge", "edge")
def importance_edge(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule=None):
    top = np.argsort(-np.abs(w1), axis=1, kind="stable")[:, :k]               # (K, k)
    mask = np.zeros(w1.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return np.repeat(mask.T[None], num_masks, axis=0)


def importance_node_keep(w2, k, rule="magnitude"):
    """(K,) bool: the k hidden nodes importance_node keeps, from the outgoing weights w2 (K,).

    `magnitude`: the k largest |v_i| (ties to the lower index). `signed`: the original code's
    rule, which removes np.argpartition(w2, K - k)[:K - k], the K - k smallest signed values
    (nodes with negative v go first), ties broken exactly as that expression breaks them.
    """
    w2 = np.ravel(np.asarray(w2, dtype=np.float64))
    num_nodes = w2.size
    keep = np.zeros(num_nodes, dtype=bool)
    if rule == "magnitude":
        keep[np.argsort(-np.abs(w2), kind="stable")[:k]] = True
    elif rule == "signed":
        keep[:] = True
        keep[np.argpartition(w2, num_nodes - k)[:num_nodes - k]] = False
    else:
        raise ValueError(f"unknown importance rule {rule!r}; choose one of "
                         f"{', '.join(IMPORTANCE_RULES)}")
    return keep


@_register("importance_node", "node")
def importance_node(w1, w2, gram, k, num_masks, rng, kernels=None, importance_rule="magnitude"):
    keep = importance_node_keep(w2, k, importance_rule)
    return _node_masks(np.repeat(keep[None], num_masks, axis=0), w1.shape[1])


def normalise_rows(w1):
    """Rescale every row of w1 (K, N) to norm sqrt(N), so that Q_ii = 1 (original code)."""
    w1 = np.asarray(w1, dtype=np.float64)
    norms = np.linalg.norm(w1, axis=1, keepdims=True)
    return w1 * (np.sqrt(w1.shape[1]) / np.where(norms > 0, norms, 1.0))


def draw_masks(choice, w1, w2, gram, k, num_masks, rng, kernels=None,
               importance_rule="magnitude", progress=None):
    """(num_masks, N, K) bool masks from the strategy `choice` for the student (w1, w2).

    progress(done, total), if given, is called as the work advances: after each hidden node
    for dpp_edge (total K), once at the end for the other strategies (total 1)."""
    pruner = PRUNERS[choice]
    lo, hi = k_range(choice, w1.shape[1], w1.shape[0])
    if not lo <= k <= hi:
        raise ValueError(f"k = {k} is outside {lo}..{hi} for {choice}")
    args = (np.asarray(w1, np.float64), np.ravel(np.asarray(w2, np.float64)), gram, k,
            num_masks, rng)
    if choice == "dpp_edge":
        return pruner.draw(*args, kernels=kernels, progress=progress)
    masks = pruner.draw(*args, kernels=kernels, importance_rule=importance_rule)
    if progress is not None:
        progress(1, 1)
    return masks


# ----------------------------------------------------------------------------------------
# Reweighting: after pruning, refit the kept weights so that the removed ones' contribution
# is absorbed as well as the (training) data allow. Both fits are small normal-equation
# solves on Gram matrices.

def solve_psd(a, b):
    """a^{-1} b for a symmetric PSD a; the minimum-norm least-squares solution if singular."""
    try:
        return scipy.linalg.solve(a, b, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, b, rcond=None)[0]


@torch.no_grad()
def reweight_edges_batched(w1, keep, gram, device="cpu", max_bytes=256 << 20):
    """Edge reweighting of every node at once: w1 (K, N), keep (K, N) bool (the transpose of
    a mask), gram G = X^T X / P (N, N) -> (K, N) float64 numpy. For node i with kept inputs S
    and removed R, w_iS += G_SS^{-1} G_SR w_iR (the least-squares fit X_S delta ~ X_R w_iR on
    the training inputs), w_iR = 0. Nodes are solved together on `device` as padded
    (B, kmax, kmax) systems by Cholesky, B chosen so that a batch stays near max_bytes.
    Inputs that are zero in every training sample (G_jj = 0, e.g. MNIST's border pixels) have
    zero rows and columns in G: they are left out of the systems and keep their weights, which
    is the minimum-norm least-squares solution for them. Any other singular G_SS (fewer
    samples than kept inputs) gets the minimum-norm solution through a pseudo-inverse (slow,
    but rare). A bias, where the network has one, is not part of the fit."""
    w = torch.as_tensor(np.asarray(w1, dtype=np.float64), device=device)
    keep_t = torch.as_tensor(np.asarray(keep, dtype=bool), device=device)
    g = torch.as_tensor(np.asarray(gram, dtype=np.float64), device=device)
    h, d = w.shape
    out = w * keep_t
    removed_w = w * ~keep_t                                                     # (H, D)
    solvable = keep_t & (torch.diagonal(g) > 0)[None, :]                        # (H, D)
    counts = solvable.sum(1)
    todo = torch.nonzero((counts > 0) & (keep_t.sum(1) < d)).flatten().tolist()
    kmax_all = int(counts.max()) if h else 0
    batch = max(1, max_bytes // max(1, 8 * kmax_all * kmax_all))
    for start in range(0, len(todo), batch):
        nodes = torch.tensor(todo[start:start + batch], device=device)
        kk = counts[nodes]
        kmax = int(kk.max())
        # padded kept-input indices: (B, kmax), pads point at input 0 and are masked out
        order = torch.argsort((~solvable[nodes]).to(torch.int8), dim=1, stable=True)
        idx = order[:, :kmax]
        valid = torch.arange(kmax, device=device)[None, :] < kk[:, None]         # (B, kmax)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        a = g[idx[:, :, None], idx[:, None, :]]                                 # (B, kmax, kmax)
        both = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(kmax, device=device, dtype=torch.float64).expand_as(a)
        a = torch.where(both, a, eye * (~valid[:, :, None]))
        rhs = torch.gather(removed_w[nodes] @ g, 1, idx) * valid                # (B, kmax)
        chol, info = torch.linalg.cholesky_ex(a)
        delta = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
        bad = torch.nonzero(info != 0).flatten()
        if len(bad):
            pinv = torch.linalg.pinv(a[bad], hermitian=True)
            delta[bad] = (pinv @ rhs[bad][:, :, None])[:, :, 0]
        delta = delta * valid
        rows = nodes[:, None].expand_as(idx)
        out.index_put_((rows[valid], idx[valid]), delta[valid], accumulate=True)
    return out.cpu().numpy()


def reweight_edges(w1, mask, gram):
    """reweight_edges_batched for a mask (N, K) on the CPU: w1 (K, N), gram (N, N) -> (K, N).
    Its K systems are small: one torch thread, like the LAPACK calls of _one_blas_thread (on
    a busy 2-core machine two threads made it ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reweight_edges_batched(w1, np.asarray(mask, dtype=bool).T, gram)
    finally:
        torch.set_num_threads(before)


def reweight_nodes(w2, keep, hidden_gram):
    """Fold every removed node r into the kept ones S: alpha_r = argmin ||A_S a - A_r||^2 =
    H_SS^{-1} H_Sr with H = A^T A / P the hidden-activation Gram matrix; v_S += alpha v_R,
    v_R = 0. w2 (K,) -> (K,), or the outgoing weights of a layer with C outputs (C, K) ->
    (C, K), every output row refit alike; keep (K,) bool."""
    w2 = np.asarray(w2, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    s, r = np.flatnonzero(keep), np.flatnonzero(~keep)
    out = np.where(keep, w2, 0.0)
    if s.size and r.size:
        alpha = solve_psd(hidden_gram[np.ix_(s, s)], hidden_gram[np.ix_(s, r)])   # (|S|, |R|)
        out[..., s] += w2[..., r] @ alpha.T
    return out


def pruned_students(w1, w2, masks, granularity, reweighting=False, gram=None, hidden_gram=None):
    """Apply every mask: w1 (K, N), w2 (K,), masks (B, N, K) -> W (B, K, N), v (B, K).

    Without reweighting W_b = w1 * mask_b^T and v_b = w2 (a removed node has zero fields and
    g(0) = 0, so it contributes nothing). With it, edge masks refit the kept incoming
    weights (needs `gram`), node masks refit the outgoing weights (needs `hidden_gram`)."""
    w1 = np.asarray(w1, dtype=np.float64)
    w2 = np.ravel(np.asarray(w2, dtype=np.float64))
    masks = np.asarray(masks).astype(bool)
    weights = w1[None] * np.swapaxes(masks, 1, 2)
    outs = np.repeat(w2[None], len(masks), axis=0)
    if reweighting and granularity == "edge":
        weights = np.stack([reweight_edges(w1, m, gram) for m in masks])
    elif reweighting and granularity == "node":
        outs = np.stack([reweight_nodes(w2, m.any(axis=0), hidden_gram) for m in masks])
    return weights, outs
