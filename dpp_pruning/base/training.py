"""Online SGD of the two-layer student and its test loss (NOTES.md, "Student and online SGD").

Notation: N = input dimension, K = student hidden size, P = number of samples, B = number of
networks evaluated at once. Per sample x (N,) with label y:

    lam = w1 @ x / sqrt(N)   (K,)      h = g(lam)   (K,)      yhat = w2 . h      delta = yhat - y
    w1_i <- w1_i - (eta / sqrt(N)) * delta * w2_i * g'(lam_i) * x
    w2_i <- w2_i - (eta / N)       * delta * h_i              (not in `soft_committee` mode)

Both gradients are taken at the weights before the step, as autograd does; with momentum the
torch SGD rule applies (buf = momentum * buf + grad; p -= lr * buf), without it the first layer
steps as w1_i -= (lr * delta * w2_i * g'(lam_i)) * x. The per-sample loop is a numba kernel over
float64 weights that reads x as stored (float32). What is fixed is the order of every sum (no
fastmath, so no reassociation; no threads): on one machine the weights are bitwise
reproducible and do not depend on the chunking. erf and exp come from the platform's libm or
the compiler's intrinsics, so another CPU or numba/LLVM version may round them differently.
"""
import math

import numba
import numpy as np
import torch

# Integer codes of the nonlinearities for the numba kernel (models.NONLINEARITIES order).
NONLINEARITY_CODES = {"sigmoid": 0, "relu": 1, "linear": 2}

_SQRT_HALF = math.sqrt(0.5)


def nonlinearity_code(name):
    """The kernel's integer code for a `--nonlinearity` name."""
    try:
        return NONLINEARITY_CODES[name]
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of "
                         f"{', '.join(NONLINEARITY_CODES)}") from None


# ---------------------------------------------------------------------------------------------
# Dot products with a fixed summation order.
#
# numba compiles without fastmath (strict IEEE semantics), so a dot product written as one
# running sum is one long chain of dependent additions. The loop below keeps LANES = 16
# independent partial sums instead, in a scratch array acc (16,): element n of each block of
# 16 goes to acc[n % 16]; the partial sums are then added in a fixed pairwise order and the
# tail (N % 16 elements) one at a time. No sum is ever reassociated: the order of summation
# is fixed by the code, whatever the compiler does. The loop over a block reads its length
# from acc at run time: the compiler then vectorises it across the 16 independent sums (as it
# may, since they do not interact) instead of unrolling it into scalar code. Measured on the
# training kernel (N = 500, K = 6, 200,000 samples, best of 3, load average 2.0 on 2 cores):
# 0.21 s with the run-time bound, 0.40 s with the constant bound LANES; bitwise equal weights.
LANES = 16


@numba.njit(cache=True, fastmath=False, nogil=True)
def _combine(acc):
    """Fixed pairwise sum of the 16 partial sums acc (16,): ((a0+a4)+(a8+a12)) for each of the
    four residues mod 4, then (r0+r1)+(r2+r3)."""
    r0 = (acc[0] + acc[4]) + (acc[8] + acc[12])
    r1 = (acc[1] + acc[5]) + (acc[9] + acc[13])
    r2 = (acc[2] + acc[6]) + (acc[10] + acc[14])
    r3 = (acc[3] + acc[7]) + (acc[11] + acc[15])
    return (r0 + r1) + (r2 + r3)


@numba.njit(cache=True, fastmath=False, nogil=True)
def _entry(w, a, x_old, i, update):
    """w[i], after w[i] -= a * x_old[i] in place when `update` is set."""
    if update:
        w[i] -= a * x_old[i]
    return w[i]


@numba.njit(cache=True, fastmath=False, nogil=True)
def axpy_fixed_order_dot(w, a, x_old, x_new, acc, update=True):
    """w -= a * x_old in place (when `update` is set), then return dot(w, x_new) in the fixed
    order above, in one pass over w. w, x_old, x_new (N,) float64; acc (LANES,) scratch."""
    n = w.shape[0]
    blocks = n // LANES
    lanes = acc.shape[0]                 # == LANES, but a run-time bound (see above)
    acc[:] = 0.0
    for b in range(blocks):
        base = b * LANES
        for j in range(lanes):
            acc[j] += _entry(w, a, x_old, base + j, update) * x_new[base + j]
    total = _combine(acc)
    for i in range(blocks * LANES, n):
        total += _entry(w, a, x_old, i, update) * x_new[i]
    return total


@numba.njit(cache=True, fastmath=False, nogil=True)
def fixed_order_dot(w, x, acc):
    """dot(w, x) of float64 (N,) vectors in the fixed order above; acc (LANES,) scratch."""
    return axpy_fixed_order_dot(w, 0.0, x, x, acc, False)


# ---------------------------------------------------------------------------------------------
@numba.njit(cache=True, fastmath=False, nogil=True)
def _activate(lam, code, h, gp):
    """h = g(lam), gp = g'(lam) for (K,) pre-activations, g given by its NONLINEARITY_CODES code."""
    for i in range(lam.shape[0]):
        z = lam[i]
        if code == 0:
            h[i] = math.erf(z / math.sqrt(2.0))
            gp[i] = math.sqrt(2.0 / math.pi) * math.exp(-0.5 * z * z)
        elif code == 1:
            h[i] = z if z > 0.0 else 0.0
            gp[i] = 1.0 if z > 0.0 else 0.0
        else:
            h[i] = z
            gp[i] = 1.0


@numba.njit(cache=True, fastmath=False, nogil=True)
def _load_row(inputs, p, x):
    """x (N,) float64 <- inputs[p] (float32 or float64)."""
    row = inputs[p]
    for n in range(x.shape[0]):
        x[n] = row[n]


@numba.njit(cache=True, fastmath=False, nogil=True)
def sgd_pass_kernel(inputs, labels, start, stop, w1, w2, b1, b2, lr1, lr2, momentum,
                    code, train_w2):
    """One pass of online SGD over rows [start, stop), updating w1, w2, b1, b2 in place.

    inputs (P, N) float32 (or float64), labels (P,), w1 and b1 (K, N) float64 C-contiguous,
    w2 and b2 (K,) float64; lr1 = eta / sqrt(N), lr2 = eta / N; code from NONLINEARITY_CODES.
    The momentum buffers are only used when momentum != 0. Each row of w1 is updated and dotted
    with the next sample's input in the same pass (axpy_fixed_order_dot).
    """
    n_hidden, n_in = w1.shape
    if stop <= start:
        return
    sqrt_n = math.sqrt(n_in)
    x = np.empty(n_in, dtype=np.float64)         # (N,) current sample
    x_next = np.empty(n_in, dtype=np.float64)    # (N,) next sample
    lam = np.empty(n_hidden, dtype=np.float64)   # (K,) pre-activations of the current sample
    h = np.empty(n_hidden, dtype=np.float64)     # (K,) g(lam)
    gp = np.empty(n_hidden, dtype=np.float64)    # (K,) g'(lam)
    acc = np.empty(LANES, dtype=np.float64)      # (16,) partial sums of the dot products
    use_momentum = momentum != 0.0
    _load_row(inputs, start, x)
    for i in range(n_hidden):
        lam[i] = fixed_order_dot(w1[i], x, acc) / sqrt_n
    for p in range(start, stop):
        _activate(lam, code, h, gp)
        yhat = 0.0
        for i in range(n_hidden):
            yhat += w2[i] * h[i]
        delta = yhat - np.float64(labels[p])
        has_next = p + 1 < stop
        if has_next:
            _load_row(inputs, p + 1, x_next)
        for i in range(n_hidden):
            coef = delta * w2[i] * gp[i]           # grad_w1_i = coef * x, with the old w2_i
            w_row = w1[i]
            if use_momentum:
                b_row = b1[i]
                for n in range(n_in):
                    b_row[n] = momentum * b_row[n] + coef * x[n]
                    w_row[n] -= lr1 * b_row[n]
                if has_next:
                    lam[i] = fixed_order_dot(w_row, x_next, acc) / sqrt_n
            elif has_next:
                lam[i] = axpy_fixed_order_dot(w_row, lr1 * coef, x, x_next, acc) / sqrt_n
            else:
                a = lr1 * coef
                for n in range(n_in):
                    w_row[n] -= a * x[n]
        if train_w2:
            for i in range(n_hidden):
                grad = delta * h[i]
                if use_momentum:
                    b2[i] = momentum * b2[i] + grad
                    w2[i] -= lr2 * b2[i]
                else:
                    w2[i] -= lr2 * grad
        x, x_next = x_next, x


def as_numpy(array):
    """A numpy view of a CPU torch tensor (no copy) or np.asarray of anything else."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _kernel_inputs(inputs, labels):
    """Inputs (P, N) and labels (P,) as C-contiguous float32/float64 arrays (no copy if already)."""
    inputs, labels = as_numpy(inputs), as_numpy(labels).reshape(-1)
    if inputs.ndim != 2 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"inputs (P, N) and labels (P,) expected, got {inputs.shape} "
                         f"and {labels.shape}")
    if inputs.dtype not in (np.float32, np.float64):
        inputs = inputs.astype(np.float32)
    if labels.dtype not in (np.float32, np.float64):
        labels = labels.astype(np.float32)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(labels)


def online_sgd_arrays(w1, w2, inputs, labels, lr, nonlinearity="sigmoid", train_w2=True,
                      epochs=1, momentum=0.0, chunk=20000, progress=None):
    """Online SGD from weights w1 (K, N), w2 (K,) or (1, K); returns new float64 (w1, w2).

    Each epoch visits the P rows of inputs (P, N) / labels (P,) once, in order, in chunks of
    `chunk` rows; progress(samples_done_so_far) is called after each chunk. Momentum buffers
    persist across chunks and epochs.
    """
    inputs, labels = _kernel_inputs(inputs, labels)
    w1 = np.array(as_numpy(w1), dtype=np.float64, order="C")            # (K, N), own copy
    w2 = np.array(as_numpy(w2), dtype=np.float64).reshape(-1).copy()    # (K,)
    n_hidden, n_in = w1.shape
    if w2.shape != (n_hidden,) or inputs.shape[1] != n_in:
        raise ValueError(f"shapes do not match: w1 {w1.shape}, w2 {w2.shape}, "
                         f"inputs {inputs.shape}")
    code = nonlinearity_code(nonlinearity)
    b1, b2 = np.zeros_like(w1), np.zeros_like(w2)   # (K, N), (K,) momentum buffers
    lr1, lr2 = float(lr) / math.sqrt(n_in), float(lr) / n_in
    n_samples, chunk = inputs.shape[0], max(1, int(chunk))
    done = 0
    for _ in range(int(epochs)):
        for start in range(0, n_samples, chunk):
            stop = min(start + chunk, n_samples)
            sgd_pass_kernel(inputs, labels, start, stop, w1, w2, b1, b2, lr1, lr2,
                            float(momentum), code, bool(train_w2))
            done += stop - start
            if progress is not None:
                progress(done)
    return w1, w2


def online_sgd(student, inputs, labels, lr, epochs=1, momentum=0.0, chunk=20000,
               progress=None):
    """Train a models.Student in place by online SGD on inputs (P, N), labels (P,); returns it.

    Respects student.mode (`soft_committee` keeps w2 frozen) and student.nonlinearity. The
    weights are trained in float64 and written back in the student's own dtype.
    """
    w1, w2 = online_sgd_arrays(student.w1.weight, student.w2.weight, inputs, labels, lr,
                               nonlinearity=student.nonlinearity,
                               train_w2=student.mode != "soft_committee", epochs=epochs,
                               momentum=momentum, chunk=chunk, progress=progress)
    with torch.no_grad():
        student.w1.weight.copy_(torch.from_numpy(w1))
        student.w2.weight.copy_(torch.from_numpy(w2).reshape(student.w2.weight.shape))
    return student


def _activate_torch_(z, nonlinearity):
    """g applied in place to a torch tensor (any shape); returns it."""
    if nonlinearity == "sigmoid":
        return torch.erf_(z.mul_(_SQRT_HALF))
    if nonlinearity == "relu":
        return torch.relu_(z)
    nonlinearity_code(nonlinearity)  # raises for unknown names
    return z


def _rows_per_chunk(columns, n_in, batch):
    """Test rows read at a time: `batch`, fewer when the (rows, columns) activations and the
    (rows, N) inputs would pass 8 M numbers (64 MB in float64)."""
    return max(1, min(int(batch), (8 << 20) // (columns + n_in)))


def _squared_errors(h, w2, y):
    """Σ over rows of (Σ_k h w2 - y)²: h (c, B, K), w2 (B, K), y (c,) -> (B,) float64 (the
    output sums in h's dtype, the squares summed in float64)."""
    err = torch.einsum("cbk,bk->cb", h, w2).sub_(y[:, None])                  # (c, B)
    return err.square_().sum(0, dtype=torch.float64)


def test_loss(w1, w2, inputs, labels, nonlinearity="sigmoid", batch=8192,
              dtype=torch.float64, device="cpu"):
    """Test loss 0.5 * mean((yhat - y)^2).

    One network: w1 (K, N), w2 (K,) or (1, K) -> float. A batch of B networks: w1 (B, K, N),
    w2 (B, K) -> (B,) numpy array. inputs (P, N), labels (P,), numpy or torch. Rows are read
    `batch` at a time (fewer when B * K is large, so that each chunk's (rows, B * K) activations
    stay near 64 MB); each chunk is one matmul with all B * K weight rows, in `dtype` on
    `device`. The squared errors are summed in float64 whatever `dtype` is: float32 (what
    batched testing uses) changes a loss by about 1e-6 relative and runs 2-4x faster.
    """
    w1 = torch.as_tensor(np.asarray(as_numpy(w1), dtype=np.float64))
    single = w1.ndim == 2
    if single:
        w1 = w1.unsqueeze(0)                                                   # (1, K, N)
    n_nets, n_hidden, n_in = w1.shape
    w2 = torch.as_tensor(np.asarray(as_numpy(w2), dtype=np.float64)).reshape(n_nets, n_hidden)
    inputs, labels = as_numpy(inputs), as_numpy(labels).reshape(-1)
    if inputs.ndim != 2 or inputs.shape[1] != n_in or inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"inputs (P, {n_in}) and labels (P,) expected, got {inputs.shape} "
                         f"and {labels.shape}")
    weights = w1.reshape(n_nets * n_hidden, n_in).T.to(device, dtype).contiguous()  # (N, B*K)
    w2 = w2.to(device, dtype)
    scale = 1.0 / math.sqrt(n_in)
    rows = _rows_per_chunk(n_nets * n_hidden, n_in, batch)
    total = torch.zeros(n_nets, dtype=torch.float64, device=device)          # (B,)
    n_samples = inputs.shape[0]
    for start in range(0, n_samples, rows):
        x = torch.from_numpy(inputs[start:start + rows]).to(device, dtype)   # (c, N)
        y = torch.from_numpy(labels[start:start + rows]).to(device, dtype)   # (c,)
        lam = (x @ weights).mul_(scale)                                       # (c, B*K)
        h = _activate_torch_(lam, nonlinearity).view(-1, n_nets, n_hidden)   # (c, B, K)
        total += _squared_errors(h, w2, y)
    losses = (0.5 * total / max(1, n_samples)).cpu().numpy()
    return float(losses[0]) if single else losses


def hidden_activations(w1, inputs, nonlinearity="sigmoid", batch=8192, dtype=torch.float32):
    """g(X Wᵀ / √N) (P, K) of one network w1 (K, N) on inputs (P, N), computed as test_loss
    computes a network's activations (one matmul per chunk of rows, in `dtype`)."""
    w1 = torch.as_tensor(np.asarray(as_numpy(w1), dtype=np.float64))
    n_hidden, n_in = w1.shape
    inputs = as_numpy(inputs)
    weights = w1.T.to(dtype).contiguous()                                    # (N, K)
    scale = 1.0 / math.sqrt(n_in)
    rows = _rows_per_chunk(n_hidden, n_in, batch)
    out = torch.empty(inputs.shape[0], n_hidden, dtype=dtype)
    for start in range(0, inputs.shape[0], rows):
        x = torch.from_numpy(inputs[start:start + rows]).to(dtype)
        out[start:start + rows] = _activate_torch_((x @ weights).mul_(scale), nonlinearity)
    return out


def loss_of_outputs(h, labels, w2, batch=8192):
    """Test loss 0.5 * mean((h w2_b - y)^2) (B,) of B networks that share their hidden units'
    activations h (P, K) (`hidden_activations`: a node mask only selects units, so every
    network a node mask makes from one student shares them) and differ in their outgoing
    weights w2 (B, K) (zero for a removed unit). The sums are those of test_loss."""
    w2 = torch.as_tensor(np.asarray(as_numpy(w2), dtype=np.float64)).to(h.dtype)   # (B, K)
    labels = as_numpy(labels).reshape(-1)
    n_nets, n_hidden = w2.shape
    rows = _rows_per_chunk(n_nets * n_hidden, h.shape[1], batch)
    total = torch.zeros(n_nets, dtype=torch.float64)
    for start in range(0, h.shape[0], rows):
        chunk = h[start:start + rows]                                        # (c, K)
        y = torch.from_numpy(labels[start:start + rows]).to(h.dtype)
        total += _squared_errors(chunk[:, None, :].expand(-1, n_nets, -1), w2, y)
    return (0.5 * total / max(1, h.shape[0])).numpy()


test_loss.__test__ = False  # not a pytest test when imported into a test module
