"""Our fast paths against the slow references of the original approach (reference.py).

Gram-route kernels vs kernels from materialised X diag(w_i); normal-equation reweighting vs
direct P x |S| least squares; the batched test loss vs one mask and one sample at a time;
data generation vs a per-sample loop; our k-DPP sampler vs dppy, by distribution.
Small sizes (N = 20, P = 3000): the whole module runs in a few seconds.
"""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dpp_pruning.base.data import generate_teacher
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory.order_params import order_parameters
from dpp_sample_ts import (
    KDPP,
    draw_masks,
    edge_kernel,
    exact_inclusion_probabilities,
    node_kernel,
    reweight_edges,
    reweight_nodes,
)
from reference import (
    reference_edge_kernels,
    reference_generate,
    reference_kdpp_draws,
    reference_labels,
    reference_node_kernel,
    reference_order_parameters,
    reference_reweight_edges,
    reference_reweight_nodes,
    reference_test_masks,
)

N_IN, N_TEACHER, N_HIDDEN, N_DATA = 20, 2, 4, 3000


def max_rel(a, b):
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def setup():
    """A data.py teacher, its exact float64 Gram matrix, and a trained, rescaled student."""
    teacher = generate_teacher(N_IN, N_TEACHER, N_DATA, sig_w=0.1, seed=3)
    x = teacher.inputs.numpy().astype(np.float64)                          # (P, N)
    gram64 = x.T @ x / len(x)                                               # (N, N)
    student = workflow.rescaled(workflow.train(teacher, N_HIDDEN, seed=4))
    w1 = student.w1.weight.detach().double().numpy()                        # (K, N)
    w2 = student.w2.weight.detach().double().numpy().ravel()                # (K,)
    return teacher, x, gram64, student, w1, w2


# ----------------------------------------------------------------------------------------
# Data generation

def test_labels_match_per_sample_loop(setup):
    teacher = generate_teacher(N_IN, N_TEACHER, 2000, sig_w=0.0, seed=5)
    labels = reference_labels(teacher.w1, teacher.w2, teacher.inputs)
    np.testing.assert_allclose(labels.numpy(), teacher.labels.numpy(), rtol=1e-5, atol=1e-5)
    test_labels = reference_labels(teacher.w1, teacher.w2, teacher.test_inputs)
    np.testing.assert_allclose(test_labels.numpy(), teacher.test_labels.numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("sig_w", [0.0, 0.5])
def test_generation_matches_per_sample_loop_in_distribution(sig_w):
    fast = generate_teacher(N_IN, N_TEACHER, 4000, sig_w=sig_w, seed=6)
    slow = reference_generate(N_IN, N_TEACHER, 4000, sig_w=sig_w, seed=7, w1=fast.w1,
                              w2=fast.w2)
    assert slow["inputs"].shape == (4000, N_IN) and slow["test_inputs"].shape == (400, N_IN)
    assert slow["labels"].shape == (4000,) and slow["test_labels"].shape == (400,)
    x = slow["inputs"].numpy()
    assert abs(x.mean()) < 5 / np.sqrt(x.size) and abs(x.var() - 1) < 5 * np.sqrt(2 / x.size)
    assert stats.ks_2samp(fast.labels.numpy(), slow["labels"].numpy()).pvalue > 1e-3
    assert stats.ks_2samp(fast.inputs.numpy().ravel(), x.ravel()).pvalue > 1e-3


def test_reference_teacher_modes():
    normal = reference_generate(N_IN, 3, 20, mode="normal", v_star=4, seed=0)
    committee = reference_generate(N_IN, 3, 20, mode="soft_committee", seed=0)
    assert torch.equal(normal["w2"], torch.full((1, 3), 4.0))
    assert torch.equal(committee["w2"], torch.ones(1, 3))


# ----------------------------------------------------------------------------------------
# Kernels: from the Gram matrix vs from the materialised products

def test_node_kernel_gram_route_equals_materialised(setup):
    teacher, x, gram64, _, w1, _ = setup
    reference = reference_node_kernel(w1, teacher.inputs)                  # (K, K)
    assert max_rel(node_kernel(w1, gram64), reference) < 1e-12
    # data.py accumulates X^T X with float32 matmuls (one per 16384-row chunk), then float64
    assert max_rel(node_kernel(w1, teacher.gram.numpy()), reference) < 1e-5


def test_edge_kernels_gram_route_equal_materialised(setup):
    teacher, x, gram64, student, w1, _ = setup
    reference = reference_edge_kernels(w1, x)                               # K x (N, N)
    ours = workflow.edge_kernels(student, gram64)
    assert len(ours) == len(reference) == N_HIDDEN
    for i in range(N_HIDDEN):
        assert max_rel(edge_kernel(w1[i], gram64), reference[i]) < 1e-12
        assert max_rel(ours[i], reference[i]) < 1e-12
        assert max_rel(edge_kernel(w1[i], teacher.gram.numpy()), reference[i]) < 1e-5


# ----------------------------------------------------------------------------------------
# Reweighting: normal equations on Gram matrices vs direct least squares on the data

def edge_masks(w1, gram, k, seed):
    rng = np.random.default_rng(seed)
    masks = list(draw_masks("random_edge", w1, np.ones(len(w1)), gram, k, 2, rng))
    masks += list(draw_masks("dpp_edge", w1, np.ones(len(w1)), gram, k, 2, rng))
    special = masks[0].copy()
    special[:, 0] = True           # node 0 keeps everything: nothing to refit
    special[:, 1] = False          # node 1 keeps nothing: all zero
    special[:, 2] = False
    special[3, 2] = True           # node 2 keeps a single input
    return masks + [special]


@pytest.mark.parametrize("k", [5, 15])
def test_reweight_edges_equals_lstsq(setup, k):
    _, x, gram64, _, w1, _ = setup
    for mask in edge_masks(w1, gram64, k, seed=k):
        reference = reference_reweight_edges(w1, mask, x)                  # (K, N)
        ours = reweight_edges(w1, mask, gram64)
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9 * np.abs(reference).max())
        assert np.all(ours[~mask.T] == 0)
        # the refit can only bring the pruned fields closer to the unpruned ones
        full = x @ w1.T
        assert (np.linalg.norm(x @ ours.T - full, axis=0)
                <= np.linalg.norm(x @ (w1 * mask.T).T - full, axis=0) + 1e-9).all()


def test_reweight_nodes_equals_lstsq(setup):
    teacher, x, _, student, w1, w2 = setup
    hgram = workflow.hidden_gram(teacher, student)
    for size in range(1, N_HIDDEN + 1):
        for kept in itertools.combinations(range(N_HIDDEN), size):
            keep = np.zeros(N_HIDDEN, dtype=bool)
            keep[list(kept)] = True
            reference = reference_reweight_nodes(w1, w2, keep, x, "sigmoid")   # (K,)
            ours = reweight_nodes(w2, keep, hgram)
            np.testing.assert_allclose(ours, reference, rtol=0,
                                       atol=1e-9 * np.abs(reference).max())
            assert np.all(ours[~keep] == 0)


# ----------------------------------------------------------------------------------------
# Testing: all masks in one batch vs one mask and one test sample at a time

@pytest.mark.parametrize("choice, k, reweighting", [
    ("dpp_node", 2, False), ("dpp_node", 2, True), ("random_node", 3, True),
    ("random_edge", 8, False), ("random_edge", 8, True), ("dpp_edge", 8, True)])
def test_batched_test_loss_equals_per_mask_reference(setup, choice, k, reweighting):
    teacher, _, _, student, w1, w2 = setup
    _, masks = workflow.prune(teacher, student, choice, k, 5, seed=k)
    result = workflow.test_masks(teacher, student, masks, choice, reweighting, device="cpu")
    granularity = "node" if choice.endswith("node") else "edge"
    reference = reference_test_masks(w1, w2, np.stack(masks), teacher.test_inputs,
                                     teacher.test_labels, "sigmoid", "normal", granularity,
                                     reweighting, inputs=teacher.inputs, dtype=torch.float64)
    assert result.losses.shape == (5,)
    # float32 batched matmuls (and, for edge reweighting, data.py's float32-accumulated Gram)
    np.testing.assert_allclose(result.losses, reference, rtol=1e-4)


def test_expected_order_parameters_equal_per_mask_loop(setup):
    teacher, _, _, student, w1, _ = setup
    _, masks = workflow.prune(teacher, student, "random_edge", 7, 6, seed=0)
    eq, er = reference_order_parameters(w1, np.stack(masks), teacher.w1.numpy())
    q, r, _ = order_parameters(w1[None] * np.swapaxes(np.stack(masks), 1, 2), teacher.w1.numpy())
    np.testing.assert_allclose(q.mean(0), eq, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.mean(0), er, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Sampling: our exact k-DPP vs dppy, both against the exact inclusion probabilities

NUM_DRAWS = 3000


def spectral_kernel(eigvals, seed):
    n = len(eigvals)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.asarray(eigvals)) @ q.T


@pytest.mark.parametrize("n, k", [(6, 2), (6, 3), (7, 5)])
def test_kdpp_and_dppy_have_the_same_distribution(n, k):
    L = spectral_kernel(np.geomspace(0.2, 5.0, n), seed=n + k)
    exact = exact_inclusion_probabilities(L, k)                              # (n,)
    ours = KDPP(L).sample_many(k, NUM_DRAWS, np.random.default_rng(k))       # (num, k)
    theirs, failures = reference_kdpp_draws(L, k, NUM_DRAWS, seed=k)
    assert failures == 0 and theirs.shape == (NUM_DRAWS, k)
    se = np.sqrt(exact * (1 - exact) / NUM_DRAWS)
    for draws in (ours, theirs):
        freq = np.bincount(draws.ravel(), minlength=n) / NUM_DRAWS
        assert np.all(np.abs(freq - exact) <= 5 * se + 1e-12)
    # and against each other: a two-sample chi-square on the subset counts
    subsets = sorted(set(map(tuple, ours.tolist())) | set(map(tuple, theirs.tolist())))
    table = np.array([[sum(1 for d in map(tuple, draws.tolist()) if d == s) for s in subsets]
                      for draws in (ours, theirs)])
    table = table[:, table.sum(0) >= 10]
    assert stats.chi2_contingency(table).pvalue > 1e-4


def test_reference_draws_count_dppy_failures():
    """A kernel with a clearly negative eigenvalue: dppy refuses every draw; counted."""
    L = spectral_kernel([-1e-3, 0.5, 1.0, 2.0, 3.0], seed=0)
    draws, failures = reference_kdpp_draws(L, 2, 4, seed=0)
    assert failures == 4 and draws.shape == (0, 2)
