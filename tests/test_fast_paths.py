"""The grid's fast paths against the slower ones they replace: a data set streamed from its
seed against generate_teacher's arrays, students trained chunk by chunk against one training
call, the Gram matrix through dsyrk against a float64 product, the hidden Gram of a stream
against workflow.hidden_gram, node masks tested on activations computed once against testing
every masked network, and a cell's rounds tested in one batch against round by round."""
import numpy as np
import pytest
import torch

from dpp_pruning.base import training
from dpp_pruning.base.data import GramSum, TeacherStream, generate_teacher
from dpp_pruning.experiments import sweep
from dpp_pruning.pipeline import workflow
from dpp_sample_ts import draw_masks

N, M, P, K = 24, 2, 40000, 4          # P > CHUNK_ROWS: several chunks


@pytest.fixture(scope="module")
def teacher():
    return generate_teacher(N, M, P, sig_w=0.3, seed=11, num_test=3000)


def test_a_stream_draws_generate_teachers_samples_bit_for_bit(teacher):
    for keep in (False, True):
        stream = TeacherStream(N, M, P, sig_w=0.3, seed=11, num_test=3000, keep=keep)
        for _ in range(2):                                  # every pass: the same draws
            x, y = (torch.cat(part) for part in zip(*stream.chunks(), strict=True))
            assert torch.equal(x, teacher.inputs) and torch.equal(y, teacher.labels)
        test_x, test_y = stream.test_set()
        assert torch.equal(test_x, teacher.test_inputs)
        assert torch.equal(test_y, teacher.test_labels)
        assert torch.equal(stream.w1, teacher.w1) and stream.settings == teacher.settings


def test_students_trained_chunk_by_chunk_are_those_of_one_training(teacher):
    stream = TeacherStream(N, M, P, sig_w=0.3, seed=11, num_test=3000)
    start = workflow.initial_student(N, K, seed=5)
    w1 = start.w1.weight.detach().double().numpy()
    w2 = start.w2.weight.detach().double().numpy().ravel()
    for x, y in stream.chunks():
        w1, w2 = training.online_sgd_arrays(w1, w2, x, y, 0.5)
    whole = workflow.train(teacher, K, seed=5)             # stored as float32, as a .pth
    assert np.array_equal(w1.astype(np.float32), whole.w1.weight.detach().numpy())
    assert np.array_equal(w2.astype(np.float32), whole.w2.weight.detach().numpy().ravel())


def test_the_gram_matrix_through_dsyrk_is_the_float64_product(teacher):
    x = teacher.inputs.double()
    product = (x.T @ x / P).numpy()
    assert np.allclose(teacher.gram.numpy(), product, rtol=0, atol=1e-12)   # 5e-14 seen
    gram = GramSum(N)
    gram.add(teacher.inputs[:100])
    symmetric = gram.mean(100).numpy()
    assert np.array_equal(symmetric, symmetric.T)


def test_the_hidden_gram_of_a_stream_is_workflow_hidden_gram(teacher):
    students = {K: workflow.train(teacher, K, seed=5), K + 2: workflow.train(teacher, K + 2,
                                                                             seed=6)}
    grams = sweep.hidden_grams(TeacherStream(N, M, P, sig_w=0.3, seed=11, num_test=3000),
                               students)                      # both students in one pass
    for size, student in students.items():
        for rescale, pruned in ((1, workflow.rescaled(student)), (0, student)):
            assert np.allclose(grams[size][rescale], workflow.hidden_gram(teacher, pruned),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["dpp_node", "random_node", "importance_node"])
@pytest.mark.parametrize("reweighting", [False, True])
def test_node_masks_tested_on_activations_equal_testing_every_masked_network(teacher, method,
                                                                           reweighting):
    student = workflow.rescaled(workflow.train(teacher, K, seed=5))
    _, masks = workflow.prune(teacher, student, method, 2, 12, seed=3, rescale=False)
    weights, outs = workflow.apply_masks(teacher, student, masks, method, reweighting)
    slow = training.test_loss(weights, outs, teacher.test_inputs, teacher.test_labels,
                              dtype=torch.float32)                       # every network
    keep = np.stack(masks).any(axis=1)
    fast = workflow.loss_of_outputs(workflow.test_activations(teacher, student),
                                    teacher.test_labels, outs * keep)
    assert np.allclose(fast, slow, rtol=1e-6, atol=0)
    repeated = {}
    for row, loss in zip(map(tuple, outs * keep), fast, strict=True):   # a repeated mask:
        assert repeated.setdefault(row, loss) == loss                    # one loss


def test_networks_that_repeat_are_tested_once_with_the_same_loss(teacher):
    student = workflow.rescaled(workflow.train(teacher, K, seed=5))
    _, masks = workflow.prune(teacher, student, "importance_edge", 9, 6, seed=3, rescale=False)
    _, other = workflow.prune(teacher, student, "random_edge", 9, 3, seed=3, rescale=False)
    weights, outs = workflow.apply_masks(teacher, student, masks + other, "random_edge")
    fast = workflow.test_weights(teacher, weights, outs)
    slow = training.test_loss(weights, outs, teacher.test_inputs, teacher.test_labels,
                              dtype=torch.float32)
    assert np.allclose(fast, slow, rtol=1e-6, atol=0)
    assert len(set(fast[:6])) == 1 and len(set(fast[6:])) == 3


def test_a_cells_rounds_tested_in_one_batch_equal_round_by_round(teacher):
    student = workflow.rescaled(workflow.train(teacher, K, seed=5))
    w1 = student.w1.weight.detach().double().numpy()
    w2 = student.w2.weight.detach().double().numpy().ravel()
    rounds = [draw_masks("random_edge", w1, w2, teacher.gram.numpy(), 9, 7,
                         np.random.default_rng(seed)) for seed in range(3)]
    weights, outs = workflow.apply_masks(teacher, student, [m for r in rounds for m in r],
                                         "random_edge")
    together = workflow.test_weights(teacher, weights, outs)
    apart = np.concatenate([workflow.test_weights(teacher, weights[7 * i:7 * i + 7],
                                                  outs[7 * i:7 * i + 7]) for i in range(3)])
    assert np.allclose(together, apart, rtol=1e-6, atol=0)
