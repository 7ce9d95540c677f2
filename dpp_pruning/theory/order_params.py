"""Order parameters Q, R, T and the generalisation error they predict (Saad & Solla 1995).

With local fields lambda_i = w_i . x / sqrt(N) of the student and rho_n = w*_n . x / sqrt(N)
of the teacher, for x ~ N(0, I) the fields are jointly Gaussian with covariances
Q = W W^T / N, R = W W*^T / N and T = W* W*^T / N, so the generalisation error
eps_g = 1/2 E[(sum_i v_i g(lambda_i) - sum_n v*_n g(rho_n))^2] is a closed form in them.
Every function accepts leading batch dimensions (e.g. one entry per pruning mask).
"""
import numpy as np


class NotSpecialised(ValueError):
    """The student's nodes do not each align with one teacher node."""


def order_parameters(w, w_star):
    """Q (..., K, K), R (..., K, M), T (M, M) from w (..., K, N) and w_star (M, N)."""
    w = np.asarray(w, dtype=np.float64)
    w_star = np.asarray(w_star, dtype=np.float64)
    n = w.shape[-1]
    q = w @ np.swapaxes(w, -1, -2) / n
    r = w @ w_star.T / n
    t = w_star @ w_star.T / n
    return q, r, t


def gaussian_moment(c_uv, c_uu, c_vv, nonlinearity="sigmoid"):
    """E[g(u) g(v)] for zero-mean Gaussian (u, v) with the given (co)variances."""
    if nonlinearity == "sigmoid":  # g(z) = erf(z / sqrt 2)
        return (2.0 / np.pi) * np.arcsin(c_uv / np.sqrt((1.0 + c_uu) * (1.0 + c_vv)))
    if nonlinearity == "linear":
        return np.asarray(c_uv, dtype=np.float64)
    if nonlinearity == "relu":  # arc-cosine kernel of degree 1
        scale = np.sqrt(c_uu * c_vv)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.clip(np.where(scale > 0, c_uv / scale, 0.0), -1.0, 1.0)
        theta = np.arccos(cos)
        return scale * (np.sin(theta) + (np.pi - theta) * cos) / (2.0 * np.pi)
    raise ValueError(f"no closed form for nonlinearity {nonlinearity!r}")


def generalisation_error(q, r, t, v, v_star, nonlinearity="sigmoid"):
    """eps_g = 1/2 E[(y_student - y_teacher)^2] without output noise.

    q (..., K, K), r (..., K, M), t (M, M), v (..., K), v_star (M,) -> (...). The expected
    test loss 1/2 E[(y_hat - y)^2] of a noisy teacher is eps_g + sig_w^2 / 2.
    """
    q, r, t = (np.asarray(a, dtype=np.float64) for a in (q, r, t))
    v = np.asarray(v, dtype=np.float64)
    v_star = np.asarray(v_star, dtype=np.float64).reshape(-1)
    dq = np.diagonal(q, axis1=-2, axis2=-1)      # (..., K)
    dt = np.diagonal(t)                          # (M,)
    ss = gaussian_moment(q, dq[..., :, None], dq[..., None, :], nonlinearity)
    st = gaussian_moment(r, dq[..., :, None], dt[None, :], nonlinearity)
    tt = gaussian_moment(t, dt[:, None], dt[None, :], nonlinearity)
    return 0.5 * (np.einsum("...i,...ij,...j->...", v, ss, v)
                  + v_star @ tt @ v_star
                  - 2.0 * np.einsum("...i,...in,n->...", v, st, v_star))


def block_order(r, threshold=0.7):
    """Order student nodes so that each teacher node's students are contiguous.

    Student i belongs to teacher argmax_n |R_in| when that overlap is >= threshold (the
    original code's rule). Returns (order (K,), note): note is None when the groups are
    even, else a sentence saying how they are uneven. Raises NotSpecialised when a student
    node overlaps no teacher node or a teacher node has no student.
    """
    r = np.abs(np.asarray(r, dtype=np.float64))
    assign = r.argmax(axis=1)
    weak = np.flatnonzero(r.max(axis=1) < threshold)
    if weak.size:
        raise NotSpecialised(
            f"the student has not specialised: student node(s) {weak.tolist()} overlap no "
            f"teacher node by |R| >= {threshold} "
            f"(largest |R| {r.max(axis=1)[weak].round(2).tolist()}); "
            "train longer or with the paper's hyper-parameters")
    counts = np.bincount(assign, minlength=r.shape[1])
    if (counts == 0).any():
        raise NotSpecialised(
            f"the student has not specialised: teacher node(s) "
            f"{np.flatnonzero(counts == 0).tolist()} have no student node aligned to them; "
            "train longer or with the paper's hyper-parameters")
    order = np.argsort(assign, kind="stable")
    note = None
    if len(set(counts.tolist())) > 1:
        note = f"the teacher nodes have unequal numbers of student nodes {counts.tolist()}"
    return order, note


def random_edge_expected(q, r, fraction):
    """Expected order parameters after random_edge pruning that keeps each weight with
    probability f: E[Q'_ii] = f Q_ii, E[Q'_ik] = f^2 Q_ik (i != k), E[R'] = f R. For large N
    the pruned Q', R' concentrate on these, so eps_g(E[Q'], E[R']) is the closed form of
    the pruned student's generalisation error as a function of f."""
    q = np.asarray(q, dtype=np.float64)
    f = float(fraction)
    pruned = f * f * q
    np.fill_diagonal(pruned, f * np.diag(q))
    return pruned, f * np.asarray(r, dtype=np.float64)
