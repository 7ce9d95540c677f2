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

import expectations
import training
from dpp_sample_ts import (PRUNERS, MaskList, draw_masks, edge_kernel, normalise_rows,
                           pruned_students)
from models import Student, activation, student_from_weights
from order_params import generalisation_error, order_parameters


def student_filename(student_h_size):
    return f"student_{student_h_size}.pth"


def masks_filename(choice, student_h_size, k):
    return f"student_masks_{choice}_{student_h_size}_{k}.pkl"


def kernels_filename(student_h_size):
    return f"dpp_edge_kernels_{student_h_size}.pkl"


def teacher_id(teacher):
    """A short fingerprint of a whole teacher data set (weights, Gram matrix, labels and
    settings; the weights alone are the same for every --num_data and --sig_w of one
    --seed), to match the files of one run."""
    digest = hashlib.sha1()
    for name in ("w1", "w2", "gram", "labels", "test_labels"):
        digest.update(getattr(teacher, name).numpy().tobytes())
    digest.update(repr(sorted(teacher.settings.items())).encode())
    return digest.hexdigest()[:16]


def weights_id(w1):
    return hashlib.sha1(np.ascontiguousarray(w1, dtype=np.float64).tobytes()).hexdigest()[:16]


def train(teacher, student_h_size, nonlinearity="sigmoid", mode="normal", lr=0.5, epochs=1,
          momentum=0.0, seed=1, progress=None):
    """Initialise a student from `seed` and train it by online SGD on the teacher's data."""
    generator = torch.Generator().manual_seed(int(seed))
    student = Student(teacher.input_dim, student_h_size, nonlinearity, mode, generator)
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
    unpruned = rescaled(student) if rescale else student_from_weights(
        student.w1.weight.detach().double().numpy(), student.w2.weight.detach().numpy(),
        student.nonlinearity, student.mode)
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
    losses = training.test_loss(weights, outs, teacher.test_inputs, teacher.test_labels,
                                student.nonlinearity, dtype=torch.float32, device=device)
    unpruned = test_loss(teacher, student, device) if with_unpruned else float("nan")
    return PrunedResult(np.asarray(losses), weights, outs, unpruned)


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
    order, or None where no expectation is derived (edge methods with reweighting)."""
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
