"""The numba online SGD and the batched test loss against the autograd references."""
import math

import numpy as np
import pytest
import torch

from dpp_pruning.base import training
from models import Student
from reference import reference_online_sgd, reference_test_loss


def teacher_data(n_in, n_samples, n_teacher=2, v_star=4.0, seed=0):
    """inputs (P, N) float32 and labels (P,) float32 of a noiseless erf teacher."""
    rng = np.random.default_rng(seed)
    w_star = rng.standard_normal((n_teacher, n_in))                       # (M, N)
    inputs = rng.standard_normal((n_samples, n_in), dtype=np.float32)      # (P, N)
    lam = torch.from_numpy(inputs.astype(np.float64) @ w_star.T / math.sqrt(n_in))  # (P, M)
    labels = (v_star * torch.erf(lam / math.sqrt(2.0))).sum(1)           # (P,)
    return inputs, labels.numpy().astype(np.float32)


def make_student(n_in, n_hidden, nonlinearity="sigmoid", mode="normal", seed=0):
    return Student(n_in, n_hidden, nonlinearity, mode,
                   generator=torch.Generator().manual_seed(seed))


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def small_data():
    return teacher_data(50, 3000, seed=1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["normal", "soft_committee"])
@pytest.mark.parametrize("nonlinearity", ["sigmoid", "relu", "linear"])
def test_matches_autograd_reference(small_data, nonlinearity, mode, momentum):
    inputs, labels = small_data                                 # (3000, 50), (3000,)
    # The autograd reference costs ~0.6 ms a step here: 3000 steps without momentum, 1500 with.
    steps, lr = (3000, 0.5) if momentum == 0.0 else (1500, 0.05)
    inputs, labels = inputs[:steps], labels[:steps]
    fast = make_student(50, 4, nonlinearity, mode).double()
    slow = make_student(50, 4, nonlinearity, mode).double()
    w1_start = fast.w1.weight.detach().clone()
    training.online_sgd(fast, inputs, labels, lr, momentum=momentum, chunk=1000)
    reference_online_sgd(slow, torch.from_numpy(inputs), torch.from_numpy(labels), lr,
                         momentum=momentum)
    assert relative_error(fast.w1.weight, w1_start) > 1e-2     # it did train
    assert relative_error(fast.w1.weight, slow.w1.weight) < 1e-8
    assert relative_error(fast.w2.weight, slow.w2.weight) < 1e-8
    if mode == "soft_committee":
        assert torch.equal(fast.w2.weight, torch.ones_like(fast.w2.weight))


def test_float32_reference_and_student(small_data):
    inputs, labels = small_data[0][:500], small_data[1][:500]
    fast, slow = make_student(50, 4), make_student(50, 4)
    training.online_sgd(fast, torch.from_numpy(inputs), torch.from_numpy(labels), 0.5)
    reference_online_sgd(slow, inputs, labels, 0.5)
    assert fast.w1.weight.dtype == torch.float32
    assert relative_error(fast.w1.weight, slow.w1.weight) < 1e-4
    assert relative_error(fast.w2.weight, slow.w2.weight) < 1e-4


def test_loss_decreases_with_training():
    inputs, labels = teacher_data(100, 44000, seed=2)
    train_x, train_y = inputs[:40000], labels[:40000]                    # (40000, 100)
    test_x, test_y = inputs[40000:], labels[40000:]                      # (4000, 100)
    student = make_student(100, 6, seed=3)
    before = training.test_loss(student.w1.weight, student.w2.weight, test_x, test_y, "sigmoid")
    seen = []
    training.online_sgd(student, train_x, train_y, 0.5, chunk=15000, progress=seen.append)
    after = training.test_loss(student.w1.weight, student.w2.weight, test_x, test_y, "sigmoid")
    assert seen == [15000, 30000, 40000]
    assert after < 0.1 * before


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "relu", "linear"])
def test_batched_test_loss(nonlinearity):
    inputs, labels = teacher_data(50, 400, seed=4)
    students = [make_student(50, 4, nonlinearity, seed=s) for s in range(5)]
    w1 = torch.stack([s.w1.weight.detach() for s in students])            # (5, 4, 50)
    w2 = torch.stack([s.w2.weight.detach()[0] for s in students])         # (5, 4)
    batched = training.test_loss(w1, w2, inputs, labels, nonlinearity, batch=37)
    looped = [training.test_loss(s.w1.weight, s.w2.weight, inputs, labels, nonlinearity)
              for s in students]
    per_sample = [reference_test_loss(s.double(), inputs, labels) for s in students]
    assert batched.shape == (5,)
    np.testing.assert_allclose(batched, looped, rtol=1e-12)
    np.testing.assert_allclose(batched, per_sample, rtol=1e-10)


def test_deterministic_and_chunk_independent(small_data):
    inputs, labels = small_data
    w1 = np.random.default_rng(5).standard_normal((4, 50))
    w2 = np.random.default_rng(6).standard_normal(4)
    for momentum in (0.0, 0.9):
        runs = [training.online_sgd_arrays(w1, w2, inputs, labels, 0.3, momentum=momentum,
                                           epochs=2, chunk=chunk) for chunk in (20000, 20000, 7)]
        for w1_run, w2_run in runs[1:]:
            assert np.array_equal(w1_run, runs[0][0]) and np.array_equal(w2_run, runs[0][1])
    assert np.array_equal(w1, np.random.default_rng(5).standard_normal((4, 50)))  # not mutated


def test_fixed_order_dot_products():
    rng = np.random.default_rng(7)
    acc = np.empty(16)
    for n in (0, 1, 5, 16, 17, 50, 503):
        w, x_old, x_new = rng.standard_normal((3, n))
        dot = training.fixed_order_dot(w, x_new, acc)
        assert math.isclose(dot, float(w @ x_new), rel_tol=1e-12, abs_tol=1e-12)
        updated = w.copy()
        result = training.axpy_fixed_order_dot(updated, 0.3, x_old, x_new, acc)
        assert np.array_equal(updated, w - 0.3 * x_old)
        assert result == training.fixed_order_dot(updated, x_new, acc)   # same summation order
