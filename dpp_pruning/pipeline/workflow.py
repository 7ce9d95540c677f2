"""The three steps of the teacher-student workflow as functions on objects.

`teacher_student.py` is a thin command-line layer over these, and `reproduce.py` and the
notebooks call the same functions, so a figure and the README commands cannot disagree.
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from dpp_pruning.base import training
from dpp_pruning.base.data import teacher_id
from dpp_pruning.theory import expectations, order_param_odes
from dpp_pruning.theory.order_params import generalisation_error, order_parameters
from dpp_sample_ts import (
    PRUNERS,
    MaskList,
    draw_masks,
    edge_kernel,
    normalise_rows,
    pruned_students,
)
from models import Student, activation, student_from_weights


def student_filename(student_h_size):
    return f"student_{student_h_size}.pth"


def masks_filename(choice, student_h_size, k):
    return f"student_masks_{choice}_{student_h_size}_{k}.pkl"


def kernels_filename(student_h_size):
    return f"dpp_edge_kernels_{student_h_size}.pkl"


def weights_id(w1):
    return hashlib.sha1(np.ascontiguousarray(w1, dtype=np.float64).tobytes()).hexdigest()[:16]


def initial_student(input_dim, student_h_size, nonlinearity="sigmoid", mode="normal", seed=1):
    """The untrained student that `seed` gives (training with and without a curve start here)."""
    generator = torch.Generator().manual_seed(int(seed))
    return Student(input_dim, student_h_size, nonlinearity, mode, generator)


def train(teacher, student_h_size, nonlinearity="sigmoid", mode="normal", lr=0.5, epochs=1,
          momentum=0.0, seed=1, progress=None):
    """Initialise a student from `seed` and train it by online SGD on the teacher's data."""
    student = initial_student(teacher.input_dim, student_h_size, nonlinearity, mode, seed)
    return training.online_sgd(student, teacher.inputs, teacher.labels, lr, epochs=epochs,
                               momentum=momentum, progress=progress)


def test_loss(teacher, student, device="cpu"):
    """1/2 mean over the test set of (y_hat - y)^2 (float32 products, float64 sums)."""
    return float(training.test_loss(student.w1.weight.detach().numpy(),
                                    student.w2.weight.detach().numpy(), teacher.test_inputs,
                                    teacher.test_labels, student.nonlinearity,
                                    dtype=torch.float32, device=device))


def edge_kernels(student, gram):
    """The dpp_edge kernels of every hidden node, as the list the kernel cache stores."""
    w1 = student.w1.weight.detach().double().numpy()
    return [edge_kernel(w1[i], gram) for i in range(w1.shape[0])]


def rescaled(student):
    """The "unpruned student": every row of w1 rescaled to norm sqrt(N), so Q_ii = 1."""
    w1 = normalise_rows(student.w1.weight.detach().double().numpy())
    return student_from_weights(w1, student.w2.weight.detach().numpy(), student.nonlinearity,
                                student.mode)


def prune(teacher, student, choice, k, num_masks, seed=1, kernels=None, rescale=True,
          importance_rule="magnitude", progress=None):
    """Draw `num_masks` masks for the student, after rescaling its rows to norm sqrt(N) when
    `rescale` (the original code's step; with rescale=False it is pruned as trained).

    Returns (unpruned student, MaskList of (N, K) float32 0/1 arrays): the unpruned student
    is the one the masks apply to. `kernels`: optional precomputed dpp_edge kernels of that
    student (see `edge_kernels`); progress(done, total) as in dpp_sample_ts.draw_masks.
    """
    unpruned = rescaled(student) if rescale else student
    w1 = unpruned.w1.weight.detach().double().numpy()     # (K, N), exactly as stored
    w2 = unpruned.w2.weight.detach().double().numpy()
    rng = np.random.default_rng(seed)
    masks = draw_masks(choice, w1, w2, teacher.gram.numpy(), k, num_masks, rng, kernels,
                       importance_rule, progress)
    meta = dict(choice=choice, k=k, input_dim=w1.shape[1], student_h_size=w1.shape[0],
                seed=seed, teacher_id=teacher_id(teacher), rescale=int(bool(rescale)),
                importance_rule=importance_rule)
    return unpruned, MaskList([m.astype(np.float32) for m in masks], **meta)


def hidden_gram(teacher, student, chunk=65536):
    """H = A^T A / P with A = g(X W^T / sqrt(N)) the hidden activations on the training set."""
    g = activation(student.nonlinearity)
    w1 = student.w1.weight.detach().double()
    gram = torch.zeros(w1.shape[0], w1.shape[0], dtype=torch.float64)
    for start in range(0, len(teacher), chunk):
        a = g(teacher.inputs[start:start + chunk].double() @ w1.T / math.sqrt(w1.shape[1]))
        gram += a.T @ a
    return (gram / len(teacher)).numpy()


@dataclass
class PrunedResult:
    losses: np.ndarray       # (B,) measured test loss of every pruned student
    weights: np.ndarray      # (B, K, N) pruned (and reweighted) first layers
    outs: np.ndarray         # (B, K) second layers
    unpruned_loss: float     # NaN unless asked for

    @property
    def mean(self):
        return float(self.losses.mean())


def apply_masks(teacher, student, masks, choice, reweighting=False, hgram=None):
    """Pruned (and optionally reweighted) students of every mask: W (B, K, N), v (B, K).
    `hgram`: the student's `hidden_gram`, if already computed (node reweighting needs it)."""
    granularity = PRUNERS[choice].granularity
    w1 = student.w1.weight.detach().double().numpy()
    w2 = student.w2.weight.detach().double().numpy()
    if reweighting and granularity == "node" and hgram is None:
        hgram = hidden_gram(teacher, student)
    return pruned_students(w1, w2, np.stack(masks), granularity, reweighting,
                           teacher.gram.numpy(), hgram)


def test_masks(teacher, student, masks, choice, reweighting=False, hgram=None, device="cpu",
               with_unpruned=True):
    """Test loss of the student pruned by every mask, all masks evaluated in one batch
    (float32 matmuls on `device`, float64 sums); `with_unpruned` adds the unpruned loss."""
    weights, outs = apply_masks(teacher, student, masks, choice, reweighting, hgram)
    losses = test_weights(teacher, weights, outs, student.nonlinearity, device)
    unpruned = test_loss(teacher, student, device) if with_unpruned else float("nan")
    return PrunedResult(losses, weights, outs, unpruned)


def test_weights(teacher, weights, outs, nonlinearity="sigmoid", device="cpu"):
    """Test loss (B,) of B networks weights (B, K, N), outs (B, K) on the teacher's test set,
    in one batch (float32 matmuls, float64 sums); networks that repeat (importance_edge
    draws one mask, every time) are tested once and get the same loss."""
    weights, outs = np.asarray(weights), np.asarray(outs)
    flat = np.concatenate([weights.reshape(len(weights), -1), outs.reshape(len(outs), -1)],
                          axis=1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)                   # the distinct networks in their first order
    losses = training.test_loss(weights[first[order]], outs[first[order]],
                                teacher.test_inputs, teacher.test_labels, nonlinearity,
                                dtype=torch.float32, device=device)
    return np.asarray(losses)[np.argsort(order)][inverse.ravel()]


def test_activations(teacher, student):
    """The student's hidden activations on the teacher's test set (T, K), float32, as
    test_weights computes them: what every node mask of the student selects from."""
    return training.hidden_activations(student.w1.weight.detach().double().numpy(),
                                       teacher.test_inputs, student.nonlinearity)


def loss_of_outputs(activations, labels, outs):
    """Test loss (B,) of the networks that keep a student's hidden units `activations` (T, K)
    and weigh them by outs (B, K) (zero for a removed unit); networks with the same outs
    (a node method's masks often repeat) are tested once and get the same loss."""
    unique, inverse = np.unique(np.asarray(outs, dtype=np.float64), axis=0, return_inverse=True)
    return training.loss_of_outputs(activations, labels, unique)[inverse.ravel()]


def predicted_loss(teacher, weights, outs, nonlinearity="sigmoid"):
    """Test loss predicted from the order parameters: eps_g + sig_w^2 / 2, per network."""
    q, r, t = order_parameters(weights, teacher.w1.numpy())
    eps = generalisation_error(q, r, t, outs, teacher.w2.numpy().ravel(), nonlinearity)
    return eps + 0.5 * teacher.noise_std ** 2


def expected_test_loss(teacher, student, choice, k, reweighting=False, hgram=None,
                       importance_rule="magnitude", kernels=None):
    """The exact (node methods) or delta-method (edge methods) expected test loss over the
    masks that `choice` draws with budget k from `student` as pruned (already rescaled if
    pruning rescales): an expectations.Expectation with σ²/2 added to its value and first
    order, or None where no expectation is derived (dpp_edge and random_edge with
    reweighting)."""
    w1 = student.w1.weight.detach().double().numpy()
    w2 = student.w2.weight.detach().double().numpy().ravel()
    if reweighting and PRUNERS[choice].granularity == "node" and hgram is None:
        hgram = hidden_gram(teacher, student)
    found = expectations.expectation(choice, k, w1, w2, teacher.w1.numpy(),
                                     teacher.w2.numpy().ravel(), teacher.gram.numpy(),
                                     reweighting, hgram, importance_rule, student.nonlinearity,
                                     kernels)
    if found is None:
        return None
    noise = 0.5 * teacher.noise_std ** 2
    return dataclasses.replace(found, value=found.value + noise,
                               first_order=found.first_order + noise)


def curve_filename(student_h_size):
    return f"training_curve_{student_h_size}.csv"


def segment_bounds(total, points):
    """Step counts 0 = b_0 < b_1 < ... < b_S = total at which a training curve is recorded:
    0, then about `points` geometrically spaced from total / 10^4 to total, so that the fast
    start, the plateau and the specialisation are all resolved on a log axis: (S + 1,) int64."""
    ends = np.geomspace(max(1.0, total / 1e4), total, int(points)).round()
    return np.unique(np.concatenate([[0.0], ends]).astype(np.int64))


@dataclass
class TrainingCurve:
    alpha: np.ndarray        # (S + 1,) steps / N at the start and after every segment
    test_loss: np.ndarray    # (S + 1,) measured on the first `test_rows` test samples
    q: np.ndarray            # (S + 1, K, K) the simulated student's order parameters
    r: np.ndarray            # (S + 1, K, M)
    v: np.ndarray            # (S + 1, K) its second layer
    test_rows: int
    ode: object = None       # order_param_odes.Trajectory at the same alphas, or None

    @property
    def ode_loss(self):
        """The ODEs' eps_g + sigma^2 / 2 at every alpha (S + 1,)."""
        return self.ode.test_loss


def train_with_curve(teacher, student_h_size, nonlinearity="sigmoid", mode="normal", lr=0.5,
                     epochs=1, seed=1, points=50, test_rows=10000, with_ode=True,
                     progress=None):
    """`train` (plain SGD, same seed, bit-identical weights) cut into about `points` segments
    of consecutive training samples (`segment_bounds`); at the start and after each segment,
    the test loss on the first `test_rows` test samples and the order parameters. With
    `with_ode`, the order-parameter ODEs started from the student's initial Q, R, T, v and
    integrated to the same alphas = steps / N (not when SGD diverged: then curve.ode is None).

    Returns (trained student, TrainingCurve).
    """
    student = initial_student(teacher.input_dim, student_h_size, nonlinearity, mode, seed)
    w1 = student.w1.weight.detach().double().numpy().copy()       # (K, N)
    w2 = student.w2.weight.detach().double().numpy().ravel()      # (K,)
    w_star = teacher.w1.numpy()                                   # (M, N)
    test_x, test_y = teacher.test_inputs[:test_rows], teacher.test_labels[:test_rows]
    p, n = len(teacher), teacher.input_dim
    bounds = segment_bounds(p * int(epochs), points)
    losses, qs, rs, vs = [], [], [], []

    def record():
        losses.append(training.test_loss(w1, w2, test_x, test_y, nonlinearity))
        q, r, _ = order_parameters(w1, w_star)
        qs.append(q), rs.append(r), vs.append(w2.copy())

    record()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        while a < b:                             # a segment may cross an epoch's end
            start, stop = a % p, min(b - a, p - a % p) + a % p
            w1, w2 = training.online_sgd_arrays(
                w1, w2, teacher.inputs[start:stop], teacher.labels[start:stop], lr,
                nonlinearity=nonlinearity, train_w2=mode != "soft_committee",
                progress=None if progress is None else (lambda done, at=a: progress(at + done)))
            a += stop - start
        record()
    with torch.no_grad():
        student.w1.weight.copy_(torch.from_numpy(w1))
        student.w2.weight.copy_(torch.from_numpy(w2).reshape(student.w2.weight.shape))
    alpha = bounds / n
    curve = TrainingCurve(alpha, np.array(losses), np.stack(qs), np.stack(rs), np.stack(vs),
                          len(test_y))
    if with_ode and np.isfinite(w1).all() and np.isfinite(w2).all():   # else SGD diverged
        q0, r0, t, v0 = curve.q[0], curve.r[0], order_parameters(w1, w_star)[2], curve.v[0]
        curve.ode = order_param_odes.integrate(
            q0, r0, t, v0, teacher.w2.numpy().ravel(), lr, alpha, teacher.noise_std,
            train_v=mode != "soft_committee")
    return student, curve
