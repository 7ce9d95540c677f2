"""The paper README's workflow end to end, and theory against measurement."""
import re
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import teacher_student
from dpp_pruning.base.data import generate_teacher
from dpp_pruning.base.storage import load_pickle
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory.order_params import (
    NotSpecialised,
    block_order,
    generalisation_error,
    order_parameters,
    random_edge_expected,
)
from dpp_sample_ts import PRUNERS

N, P, K = 30, 48000, 6          # P / N = 1600 as in the paper
EDGE_K = 15                     # = (3 (N + 1) - K) / K rounded: the budget of 3 nodes


def cli(root, cwd, script, *args):
    """Run one of the scripts exactly as a user would; returns stdout."""
    proc = subprocess.run([sys.executable, str(root / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, root):
    """Teacher and trained student made through the command line, as the README says."""
    d = tmp_path_factory.mktemp("readme")
    cli(root, d, "teacher_dataset.py", "--input_dim", N, "--teacher_h_size", 2, "--teacher_path",
        "teacher.pkl", "--num_data", P, "--mode", "normal", "--sig_w", 0, "--v_star", 4)
    out = cli(root, d, "teacher_student.py", "--input_dim", N, "--student_h_size", K,
              "--teacher_path", "teacher.pkl", "--nonlinearity", "sigmoid", "--mode", "normal",
              "--epoch", 1, "--lr", 0.5)
    assert "student written to" in out
    return d


def common():
    return ["--input_dim", str(N), "--student_h_size", str(K), "--teacher_path", "teacher.pkl",
            "--nonlinearity", "sigmoid", "--mode", "normal"]


def test_readme_commands_dpp_node_and_dpp_edge(run_dir, root):
    """The README's pruning, testing and evaluate commands, as subprocesses."""
    for choice, k in (("dpp_node", 3), ("dpp_edge", EDGE_K)):
        cli(root, run_dir, "teacher_student.py", *common(), "--pruning_choice", choice,
            "--trained_weights", f"student_{K}.pth", "--procedure", "pruning", "--num_masks", 20,
            "--k", k)
        out = cli(root, run_dir, "teacher_student.py", *common(), "--trained_weights",
                  f"student_{K}.pth", "--procedure", "testing", "--pruning_choice", choice,
                  "--k", k)
        loss = float(re.search(r"pruned MLP avg\. test loss: (\S+)", out).group(1))
        assert np.isfinite(loss) and loss > 0
        out = cli(root, run_dir, "evaluate.py", "--path_to_student_mask",
                  f"student_masks_{choice}_{K}_{k}.pkl", "--path_to_teacher", "teacher.pkl",
                  "--input_dim", N)
        assert "expected Q over masks" in out and "generalisation error from theory" in out
        assert (run_dir / f"order_params_{choice}_{K}_{k}.png").stat().st_size > 0


@pytest.mark.parametrize("choice", sorted(PRUNERS))
def test_every_choice_prunes_and_tests(run_dir, choice, capsys, monkeypatch):
    """All six choices through the entry point's main(), with and without reweighting."""
    monkeypatch.chdir(run_dir)
    k = 3 if PRUNERS[choice].granularity == "node" else EDGE_K
    teacher_student.main(common() + ["--pruning_choice", choice, "--trained_weights",
                                     f"student_{K}.pth", "--procedure", "pruning",
                                     "--num_masks", "10", "--k", str(k), "--seed", "3"])
    student, masks = load_pickle(run_dir / f"student_masks_{choice}_{K}_{k}.pkl")
    assert len(masks) == 10 and masks.choice == choice and masks.k == k
    for mask in masks:
        assert mask.shape == (N, K) and set(np.unique(mask)) <= {0.0, 1.0}
        if PRUNERS[choice].granularity == "node":
            assert mask.all(axis=0).sum() == 3 and (mask.all(axis=0) | ~mask.any(axis=0)).all()
        elif choice != "random_edge":
            assert (mask.sum(axis=0) == k).all()
    # the stored student is the rescaled one: Q_ii = 1
    w1 = student.w1.weight.detach().double().numpy()
    np.testing.assert_allclose((w1 ** 2).sum(axis=1) / N, 1.0, rtol=1e-6)
    losses = []
    for rw in ("0", "1"):
        capsys.readouterr()
        teacher_student.main(common() + ["--procedure", "testing", "--pruning_choice", choice,
                                         "--k", str(k), "--reweighting", rw])
        out = capsys.readouterr().out
        losses.append(float(re.search(r"pruned MLP avg\. test loss: (\S+)", out).group(1)))
    assert all(np.isfinite(losses))
    if PRUNERS[choice].granularity == "node":
        # refitting the outgoing weights on the training set can only help on average
        assert losses[1] <= losses[0] * 1.02


def test_evaluate_theory_matches_measured_loss(run_dir, capsys, monkeypatch):
    monkeypatch.chdir(run_dir)
    teacher_student.main(common() + ["--pruning_choice", "random_node", "--trained_weights",
                                     f"student_{K}.pth", "--procedure", "pruning",
                                     "--num_masks", "20", "--k", "4"])
    capsys.readouterr()
    evaluate.main(["--path_to_student_mask", f"student_masks_random_node_{K}_4.pkl",
                   "--path_to_teacher", "teacher.pkl", "--input_dim", str(N)])
    out = capsys.readouterr().out
    m = re.search(r"unpruned (\S+) vs (\S+); pruned (\S+) vs (\S+)", out)
    theory_u, measured_u, theory_p, measured_p = map(float, m.groups())
    assert theory_u == pytest.approx(measured_u, rel=0.1, abs=2e-3)
    assert theory_p == pytest.approx(measured_p, rel=0.05)


@pytest.mark.parametrize("sig_w", [0.0, 0.25])
def test_generalisation_error_predicts_test_loss(sig_w):
    """eps_g + sig_w^2 / 2 from Q, R, T equals the measured test loss of trained and pruned
    students, to within the test set's sampling error."""
    teacher = generate_teacher(40, 2, 64000, "normal", sig_w, 4, seed=5)
    student = workflow.rescaled(workflow.train(teacher, K, seed=6))
    w1 = student.w1.weight.detach().double().numpy()
    v = student.w2.weight.detach().double().numpy().ravel()
    predicted = workflow.predicted_loss(teacher, w1, v)
    measured = workflow.test_loss(teacher, student)
    assert predicted == pytest.approx(measured, rel=0.08, abs=3e-3)
    for choice, k in (("random_edge", 10), ("dpp_node", 2), ("importance_edge", 20)):
        _, masks = workflow.prune(teacher, student, choice, k, 30, seed=7)
        result = workflow.test_masks(teacher, student, masks, choice)
        per_mask = workflow.predicted_loss(teacher, result.weights, result.outs)
        # each pruned student's loss, predicted against measured on 6400 test samples
        np.testing.assert_allclose(per_mask, result.losses, rtol=0.06, atol=3e-3)


def test_random_edge_closed_form():
    """The mean order parameters of random_edge pruning are f Q_ii, f^2 Q_ik and f R."""
    rng = np.random.default_rng(0)
    w, w_star = rng.normal(size=(4, 200)), rng.normal(size=(2, 200))
    q, r, t = order_parameters(w, w_star)
    f = 0.3
    masks = rng.random((4000, 4, 200)) < f
    mq, mr, _ = order_parameters(w[None] * masks, w_star)
    eq, er = random_edge_expected(q, r, f)
    np.testing.assert_allclose(mq.mean(0), eq, atol=0.01)
    np.testing.assert_allclose(mr.mean(0), er, atol=0.01)
    v, v_star = np.ones(4), np.full(2, 4.0)
    assert generalisation_error(eq, er, t, v, v_star) == pytest.approx(
        generalisation_error(mq, mr, t, v, v_star).mean(), rel=0.05)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "relu", "linear"])
def test_generalisation_error_against_monte_carlo(nonlinearity):
    import torch

    from models import activation
    rng = np.random.default_rng(1)
    n = 30
    w, w_star = rng.normal(size=(3, n)), rng.normal(size=(2, n))
    v, v_star = rng.normal(size=3), np.array([4.0, 4.0])
    q, r, t = order_parameters(w, w_star)
    g = activation(nonlinearity)
    x = torch.from_numpy(rng.normal(size=(400000, n)))
    y_s = g(x @ torch.from_numpy(w).T / np.sqrt(n)) @ torch.from_numpy(v)
    y_t = g(x @ torch.from_numpy(w_star).T / np.sqrt(n)) @ torch.from_numpy(v_star)
    mc = 0.5 * float(((y_s - y_t) ** 2).mean())
    assert generalisation_error(q, r, t, v, v_star, nonlinearity) == pytest.approx(mc, rel=0.02)


def test_block_order_and_not_specialised():
    r = np.array([[0.9, 0.1], [0.05, -0.95], [0.8, 0.2], [0.1, 0.9]])
    order, note = block_order(r)
    assert order.tolist() == [0, 2, 1, 3] and note is None
    order, note = block_order(np.array([[0.9, 0.1], [0.8, 0.0], [0.75, 0.1], [0.0, 0.9]]))
    assert "unequal" in note
    with pytest.raises(NotSpecialised, match="student node"):
        block_order(np.array([[0.5, 0.4], [0.1, 0.9]]))
    with pytest.raises(NotSpecialised, match="teacher node"):
        block_order(np.array([[0.9, 0.1], [0.8, 0.1]]))


def test_evaluate_says_when_not_specialised(tmp_path, capsys, monkeypatch):
    """An untrained student: one clear note, matrices in natural order, no crash."""
    import torch

    from dpp_pruning.base.storage import save_state_dict
    from models import Student
    monkeypatch.chdir(tmp_path)
    teacher_dataset_main = __import__("teacher_dataset").main
    teacher_dataset_main(["--input_dim", str(N), "--num_data", "2000", "--teacher_path",
                          "teacher.pkl"])
    save_state_dict(Student(N, K, generator=torch.Generator().manual_seed(0)).state_dict(),
                    tmp_path / "untrained.pth")
    teacher_student.main(common() + ["--pruning_choice", "random_node", "--trained_weights",
                                     "untrained.pth", "--procedure", "pruning", "--k", "2"])
    capsys.readouterr()
    evaluate.main(["--path_to_student_mask", f"student_masks_random_node_{K}_2.pkl",
                   "--path_to_teacher", "teacher.pkl", "--input_dim", str(N)])
    out = capsys.readouterr().out
    assert "has not specialised" in out and "students' own order" in out
