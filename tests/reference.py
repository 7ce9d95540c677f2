"""Slow reference implementations of the original code's approach: one Python iteration per
sample, autograd one sample at a time, kernels from materialised P x N products, P x |S|
least-squares fits, dppy draws; and the k-DPP chain rule one draw and one full row update
at a time, which the sampler of dpp_sample_ts must reproduce draw for draw. Correct and slow
on purpose, sized by their callers: the equivalence tests here and in test_kdpp.py,
benchmarks/run.py and benchmarks/kdpp_batch.py (which put this folder on their path). Not
used by the scripts."""
import math

import numba
import numpy as np
import torch
from torch import nn

from models import Student


def reference_online_sgd(student, inputs, labels, lr, epochs=1, momentum=0.0):
    """Online SGD one sample at a time through autograd, as the original code did it.

    loss = MSELoss(yhat, y) = (yhat - y)^2; after backward the first layer's gradient is scaled
    by sqrt(N)/2 and the second's halved; torch.optim.SGD with learning rate eta/sqrt(N) for
    w1 and eta/N for w2 (w2 left out in `soft_committee` mode). inputs (P, N), labels (P,);
    works in the student's dtype (float32, or float64 after student.double()). Returns the
    student, trained in place.
    """
    n_in = student.input_dim
    dtype = student.w1.weight.dtype
    groups = [{"params": [student.w1.weight], "lr": lr / math.sqrt(n_in)}]
    if student.mode != "soft_committee":
        groups.append({"params": [student.w2.weight], "lr": lr / n_in})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    criterion = nn.MSELoss()
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels).reshape(-1)
    for _ in range(int(epochs)):
        for p in range(inputs.shape[0]):
            x = inputs[p:p + 1].to(dtype)     # (1, N)
            y = labels[p:p + 1].to(dtype)     # (1,)
            optimizer.zero_grad()
            loss = criterion(student(x), y)
            loss.backward()
            student.w1.weight.grad *= math.sqrt(n_in) / 2.0
            if student.w2.weight.grad is not None:
                student.w2.weight.grad /= 2.0
            optimizer.step()
    return student


def reference_test_loss(student, inputs, labels):
    """Test loss 0.5 * mean((yhat - y)^2), one sample at a time like the original testing."""
    dtype = student.w1.weight.dtype
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels).reshape(-1)
    total = 0.0
    with torch.no_grad():
        for p in range(inputs.shape[0]):
            yhat = student(inputs[p:p + 1].to(dtype))
            total += 0.5 * float((yhat - labels[p:p + 1].to(dtype)) ** 2)
    return total / max(1, inputs.shape[0])


def _erf_act(z):
    return torch.erf(z / math.sqrt(2.0))


def reference_labels(w1, w2, inputs, sig_w=0.0, generator=None):
    """Teacher labels one sample at a time: y = sum_n v*_n g(w*_n . x / sqrt(N)) + sig_w eps.

    w1 (M, N), w2 (1, M) or (M,), inputs (P, N), all as torch tensors or arrays; computed in
    the dtype of w1 (float32 for a data.py teacher). eps ~ N(0, 1) is drawn from `generator`
    (one draw per sample) only when sig_w != 0. Returns (P,) tensor.
    """
    w1 = torch.as_tensor(w1)
    w2 = torch.as_tensor(w2).reshape(-1).to(w1.dtype)                      # (M,)
    inputs = torch.as_tensor(inputs)
    scale = math.sqrt(w1.shape[1])
    labels = torch.empty(inputs.shape[0], dtype=w1.dtype)
    for p in range(inputs.shape[0]):
        x = inputs[p].to(w1.dtype)                                           # (N,)
        y = torch.dot(w2, _erf_act(torch.mv(w1, x) / scale))
        if sig_w:
            y = y + sig_w * torch.randn((), generator=generator, dtype=w1.dtype)
        labels[p] = y
    return labels


def reference_generate(input_dim, teacher_h_size, num_data, mode="normal", sig_w=0.0, v_star=4,
                       seed=None, w1=None, w2=None):
    """Teacher and data set the original way: one Python iteration per sample.

    Same mathematics as data.generate_teacher (teacher w* ~ N(0, I), x ~ N(0, I), labels from
    `reference_labels`, P training and P // 10 test samples) but not the same random stream:
    compare statistically, or recompute labels of given inputs with `reference_labels`.
    w1 (M, N) / w2 (1, M) may be given to reuse a teacher. Returns a dict of float32 tensors
    w1, w2, inputs (P, N), labels (P,), test_inputs (P // 10, N), test_labels.
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    if w1 is None:
        w1 = torch.randn(teacher_h_size, input_dim, generator=generator)
    if w2 is None:
        w2 = torch.full((1, teacher_h_size), float(v_star) if mode == "normal" else 1.0)
    w1 = torch.as_tensor(w1, dtype=torch.float32)
    w2 = torch.as_tensor(w2, dtype=torch.float32).reshape(1, -1)

    def draw(count):
        xs, ys = [], []
        for _ in range(count):
            x = torch.randn(1, input_dim, generator=generator)                 # (1, N)
            ys.append(reference_labels(w1, w2, x, sig_w, generator)[0])
            xs.append(x[0])
        if not xs:
            return torch.empty(0, input_dim), torch.empty(0)
        return torch.stack(xs), torch.stack(ys)

    inputs, labels = draw(int(num_data))
    test_inputs, test_labels = draw(int(num_data) // 10)
    return dict(w1=w1, w2=w2, inputs=inputs, labels=labels, test_inputs=test_inputs,
                test_labels=test_labels)


def _float64(array):
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def reference_node_kernel(w1, inputs):
    """dpp_node kernel the original way, (1/P) (X W^T)^T (X W^T), in float64.

    w1 (K, N), inputs X (P, N) -> (K, K)."""
    x = _float64(inputs)                                                     # (P, N)
    a = x @ _float64(w1).T                                                   # (P, K)
    return a.T @ a / x.shape[0]


def reference_edge_kernels(w1, inputs):
    """dpp_edge kernels the original way, (1/P) (X diag(w_i))^T (X diag(w_i)) in float64,
    materialising X diag(w_i) (P, N) one node at a time (the original did all K at once).

    w1 (K, N), inputs X (P, N) -> list of K (N, N) arrays."""
    x = _float64(inputs)                                                     # (P, N)
    kernels = []
    for w_i in _float64(w1):
        a = x * w_i[None, :]                                                 # (P, N)
        kernels.append(a.T @ a / x.shape[0])
        del a
    return kernels


def reference_kdpp_draws(L, k, num, seed=None):
    """`num` k-DPP draws from dppy, FiniteDPP('likelihood', L=L).sample_exact_k_dpp, in a loop.

    dppy's failures (ValueError "probabilities do not sum to 1", "array with entries not all
    >= 0", LinAlgError...) are caught and counted, not raised; after a failure the FiniteDPP
    object is rebuilt (dppy keeps a half-validated eigendecomposition otherwise). Returns
    (draws (num_ok, k) int64 with sorted rows, number of failures).
    """
    from dppy.finite_dpps import FiniteDPP

    L = np.asarray(L, dtype=np.float64)
    rng = np.random.RandomState(seed)
    draws, failures, dpp = [], 0, None
    for _ in range(int(num)):
        try:
            if dpp is None:
                dpp = FiniteDPP("likelihood", L=L)
            draws.append(np.sort(np.asarray(dpp.sample_exact_k_dpp(size=k, random_state=rng),
                                            dtype=np.int64)))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError,
                IndexError):
            failures += 1
            dpp = None
    out = np.array(draws, dtype=np.int64).reshape(len(draws), k)
    return out, failures


def reference_choose_eigvecs(eigvals, k, u):
    """eigvals (r,) > 0, u (r,) uniform -> (k,) chosen eigenvectors, ascending. Walks
    m = r-1..0 with l still to choose and keeps m when u[m] < λ_m e_{l-1}(λ_0..λ_{m-1}) /
    e_l(λ_0..λ_m), the elementary symmetric polynomials e by the plain recursion
    e_l(λ_0..λ_m) = e_l(λ_0..λ_{m-1}) + λ_m e_{l-1}(λ_0..λ_{m-1}) (no logarithms: small r)."""
    r = len(eigvals)
    e = np.zeros((k + 1, r + 1))                       # e[l, m] = e_l(λ_0..λ_{m-1})
    e[0] = 1.0
    for m in range(1, r + 1):
        e[1:, m] = e[1:, m - 1] + eigvals[m - 1] * e[:-1, m - 1]
    chosen = []
    left = k
    for m in range(r - 1, -1, -1):
        if left == 0:
            break
        if u[m] < eigvals[m] * e[left - 1, m] / e[left, m + 1]:
            chosen.append(m)
            left -= 1
    return np.array(chosen[::-1], dtype=np.int64)


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def reference_projection_dpp(V, u):
    """V (n, d) C-contiguous orthonormal columns, u (d,) uniforms -> (d,) int64 draw of the
    projection DPP with kernel V Vᵀ, in the order drawn.

    The chain rule with every row updated at every step: column t of C (n, d) is
    (V V[j]ᵀ - C[:, :t] C[j, :t]ᵀ) / sqrt(norms[j]), norms (n,) the squared residual row
    norms, clipped at zero; item j is where the running sum of the positive weights first
    exceeds u[t] times their sum (the last positive weight if rounding leaves it short)."""
    n, d = V.shape
    norms = np.empty(n)
    for i in range(n):
        s = 0.0
        for a in range(d):
            s += V[i, a] * V[i, a]
        norms[i] = s
    C = np.empty((n, d))
    picked = np.empty(d, dtype=np.int64)
    for t in range(d):
        total = 0.0
        for i in range(n):
            total += norms[i]
        target = u[t] * total
        running = 0.0
        j = -1
        for i in range(n):
            if norms[i] > 0.0:
                j = i
                running += norms[i]
                if running > target:
                    break
        picked[t] = j
        inv_norm = 1.0 / np.sqrt(norms[j])
        for i in range(n):
            s = 0.0
            for a in range(d):
                s += V[i, a] * V[j, a]
            for a in range(t):
                s -= C[i, a] * C[j, a]
            c = s * inv_norm
            C[i, t] = c
            norms[i] = max(norms[i] - c * c, 0.0)
        norms[j] = 0.0
    return picked


def reference_kdpp_sample_many(kdpp, k, num, rng):
    """`num` k-DPP draws one at a time from a dpp_sample_ts.KDPP's eigendecomposition and
    cached eigenvector keep probabilities -> (num, k) int64, rows sorted. Per draw:
    rng.random(r) chooses the eigenvectors (r = rank), rng.random(d) drives
    reference_projection_dpp onto d = min(k, n - k) columns: the chosen ones, or for k > n/2
    the unchosen ones, whose draw is the complement."""
    n = kdpp.n
    support = np.flatnonzero(kdpp.eigvals > 0)                                # (r,)
    out = np.empty((num, k), dtype=np.int64)
    if k == 0:
        return out
    eigvals = kdpp.eigvals[support]                                         # (r,)
    for b in range(num):
        chosen = support[reference_choose_eigvecs(eigvals, k, rng.random(support.size))]
        if 2 * k <= n:
            V = np.ascontiguousarray(kdpp.eigvecs[:, chosen])               # (n, k)
            out[b] = np.sort(reference_projection_dpp(V, rng.random(k)))
            continue
        unchosen = np.ones(n, dtype=bool)
        unchosen[chosen] = False
        V = np.ascontiguousarray(kdpp.eigvecs[:, unchosen])                 # (n, n - k)
        keep = np.ones(n, dtype=bool)
        keep[reference_projection_dpp(V, rng.random(n - k))] = False
        out[b] = np.flatnonzero(keep)
    return out


def reference_reweight_edges(w1, mask, inputs):
    """Edge reweighting the original way: per node i with kept inputs S and removed R, the
    P x |S| least-squares fit delta = argmin ||X_S delta - X_R w_iR||^2 (np.linalg.lstsq);
    w_iS += delta, w_iR = 0. w1 (K, N), mask (N, K) 0/1, inputs X (P, N) -> (K, N) float64."""
    x = _float64(inputs)                                                     # (P, N)
    w1 = _float64(w1)
    mask = np.asarray(mask).astype(bool)
    out = np.zeros_like(w1)
    for i in range(w1.shape[0]):
        s, r = np.flatnonzero(mask[:, i]), np.flatnonzero(~mask[:, i])
        out[i, s] = w1[i, s]
        if s.size and r.size:
            target = x[:, r] @ w1[i, r]                                      # (P,)
            out[i, s] += np.linalg.lstsq(x[:, s], target, rcond=None)[0]     # (|S|,)
    return out


def reference_hidden_activations(w1, inputs, nonlinearity="sigmoid"):
    """A = g(X W^T / sqrt(N)) (P, K) in float64."""
    w1 = _float64(w1)
    z = torch.from_numpy(_float64(inputs) @ w1.T / math.sqrt(w1.shape[1]))
    if nonlinearity == "sigmoid":
        z = _erf_act(z)
    elif nonlinearity == "relu":
        z = torch.relu(z)
    elif nonlinearity != "linear":
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}")
    return z.numpy()


def reference_reweight_nodes(w1, w2, keep, inputs, nonlinearity="sigmoid"):
    """Node reweighting by direct least squares on the hidden activations A (P, K): for every
    removed node r, alpha_r = argmin ||A_S alpha - A_r||^2 (np.linalg.lstsq); v_S += sum_r
    alpha_r v_r, v_R = 0. w1 (K, N), w2 (K,) or (1, K), keep (K,) bool -> (K,) float64."""
    a = reference_hidden_activations(w1, inputs, nonlinearity)               # (P, K)
    w2 = _float64(w2).reshape(-1)
    keep = np.asarray(keep).astype(bool)
    s, r = np.flatnonzero(keep), np.flatnonzero(~keep)
    out = np.where(keep, w2, 0.0)
    if s.size:
        for j in r:
            out[s] += np.linalg.lstsq(a[:, s], a[:, j], rcond=None)[0] * w2[j]
    return out


def _reference_student(w1, w2, nonlinearity, mode, dtype):
    w1, w2 = _float64(w1), _float64(w2).reshape(1, -1)
    student = Student(w1.shape[1], w1.shape[0], nonlinearity, mode).to(dtype)
    with torch.no_grad():
        student.w1.weight.copy_(torch.from_numpy(w1))
        student.w2.weight.copy_(torch.from_numpy(w2))
    return student


def reference_test_masks(w1, w2, masks, test_inputs, test_labels, nonlinearity="sigmoid",
                         mode="normal", granularity="edge", reweighting=False, inputs=None,
                         dtype=torch.float32):
    """Test loss of every pruned student, one mask and one test sample at a time (original).

    w1 (K, N), w2 (K,) or (1, K), masks (B, N, K) 0/1; with `reweighting`, edge masks refit
    w1 by `reference_reweight_edges` and node masks refit w2 by `reference_reweight_nodes`,
    both on the training inputs `inputs` (P, N). Each pruned student is a models.Student in
    `dtype` (float32, as the original) scored by `reference_test_loss`. Returns (B,) float64.
    """
    w1, w2 = _float64(w1), _float64(w2).reshape(-1)
    losses = []
    for mask in masks:
        mask = np.asarray(mask).astype(bool)                                 # (N, K)
        pruned_w1, pruned_w2 = w1 * mask.T, w2
        if reweighting and granularity == "edge":
            pruned_w1 = reference_reweight_edges(w1, mask, inputs)
        elif reweighting and granularity == "node":
            pruned_w2 = reference_reweight_nodes(w1, w2, mask.any(axis=0), inputs, nonlinearity)
        student = _reference_student(pruned_w1, pruned_w2, nonlinearity, mode, dtype)
        losses.append(reference_test_loss(student, test_inputs, test_labels))
    return np.array(losses, dtype=np.float64)


def reference_order_parameters(w1, masks, w_star):
    """Expected Q and R over masks, one mask at a time in torch float64 (original evaluate).

    w1 (K, N), masks (B, N, K), w_star (M, N) -> (E[Q] (K, K), E[R] (K, M))."""
    w1 = torch.from_numpy(_float64(w1))
    w_star = torch.from_numpy(_float64(w_star))
    n = w1.shape[1]
    q_sum = torch.zeros(w1.shape[0], w1.shape[0], dtype=torch.float64)
    r_sum = torch.zeros(w1.shape[0], w_star.shape[0], dtype=torch.float64)
    for mask in masks:
        w = w1 * torch.from_numpy(_float64(mask)).T
        q_sum += w @ w.T / n
        r_sum += w @ w_star.T / n
    return (q_sum / len(masks)).numpy(), (r_sum / len(masks)).numpy()
