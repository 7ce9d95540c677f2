"""The variants of the original's runs: pruning without rescaling (--rescale 0) and the
original's signed importance_node rule, through the command line, with theory against
measurement in both rescaling variants."""
import re

import numpy as np
import pytest

from dpp_pruning.base.data import generate_teacher
from dpp_pruning.base.storage import load_pickle, load_state_dict
from dpp_pruning.pipeline import workflow
from dpp_sample_ts import importance_node_keep
from entry_points import call
from models import student_from_weights

N, P, K = 30, 48000, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    assert call("teacher_dataset.py", ["--input_dim", N, "--teacher_path", d / "teacher.pkl",
                                       "--num_data", P, "--sig_w", 0.25])[0] == 0
    assert call("teacher_student.py", ["--input_dim", N, "--student_h_size", K, "--teacher_path",
                                       d / "teacher.pkl", "--output_dir", d])[0] == 0
    return d


def ts(folder, *args):
    return call("teacher_student.py", ["--input_dim", N, "--student_h_size", K, "--teacher_path",
                                       folder / "teacher.pkl", "--output_dir", folder,
                                       "--trained_weights", folder / f"student_{K}.pth", *args])


def test_rescale_0_prunes_the_trained_weights_themselves(folder):
    code, _, err = ts(folder, "--procedure", "pruning", "--pruning_choice", "dpp_node", "--k", 3,
                      "--num_masks", 5, "--rescale", 0)
    assert code == 0, err
    student, masks = load_pickle(folder / f"student_masks_dpp_node_{K}_3.pkl", "masks")
    trained = load_state_dict(folder / f"student_{K}.pth")
    np.testing.assert_array_equal(student.w1.weight.detach().numpy(), trained["w1.weight"].numpy())
    np.testing.assert_array_equal(student.w2.weight.detach().numpy(), trained["w2.weight"].numpy())
    assert masks.rescale == 0
    norms = np.linalg.norm(trained["w1.weight"].numpy(), axis=1)
    assert np.abs(norms - np.sqrt(N)).max() > 0.05 * np.sqrt(N)   # so rescaling would differ


def test_testing_refuses_masks_of_the_other_rescaling(folder):
    assert ts(folder, "--procedure", "pruning", "--pruning_choice", "random_node", "--k", 2,
              "--num_masks", 3, "--rescale", 0)[0] == 0
    code, _, err = ts(folder, "--procedure", "testing", "--pruning_choice", "random_node",
                      "--k", 2)
    assert code == 2
    assert "was made with --rescale 0, not --rescale 1" in err and len(err.splitlines()) == 1
    code, _, err = call("evaluate.py", ["--path_to_student_mask",
                                        folder / f"student_masks_random_node_{K}_2.pkl",
                                        "--path_to_teacher", folder / "teacher.pkl",
                                        "--input_dim", N, "--output_dir", folder])
    assert code == 2 and "--rescale 0" in err


@pytest.mark.parametrize("rescale", [1, 0])
@pytest.mark.parametrize("choice,k", [("dpp_node", 3), ("random_edge", 15), ("dpp_edge", 15)])
def test_theory_matches_measurement_in_both_variants(folder, rescale, choice, k):
    """The measured mean over masks against the expectation over the mask distribution:
    the gap is mask sampling (std over masks / sqrt(masks)) plus test-set noise."""
    num = 60
    assert ts(folder, "--procedure", "pruning", "--pruning_choice", choice, "--k", k,
              "--num_masks", num, "--rescale", rescale)[0] == 0
    code, out, err = ts(folder, "--procedure", "testing", "--pruning_choice", choice, "--k", k,
                        "--rescale", rescale)
    assert code == 0, err
    measured = float(re.search(r"pruned MLP avg. test loss: (\S+)", out).group(1))
    expected, spread = map(float, re.search(r"distribution: (\S+) \(.*std over masks (\S+)\)",
                                            out).groups())
    test_noise = 3 * expected / np.sqrt(P // 10)       # relative sd of a mean of squares ~ 1/sqrt
    assert abs(measured - expected) < 4.5 * spread / np.sqrt(num) + test_noise


def test_rescaling_changes_the_pruned_network(folder):
    """The unpruned students of the two variants differ, and so do their losses."""
    teacher = load_pickle(folder / "teacher.pkl", "teacher")
    trained = load_state_dict(folder / f"student_{K}.pth")
    student = student_from_weights(trained["w1.weight"].numpy(), trained["w2.weight"].numpy())
    results = {}
    for rescale in (True, False):
        unpruned, _ = workflow.prune(teacher, student, "random_node", 3, 1, rescale=rescale)
        results[rescale] = workflow.test_loss(teacher, unpruned)
    assert results[True] != pytest.approx(results[False], rel=1e-3)


@pytest.mark.parametrize("rule", ["magnitude", "signed"])
def test_importance_rule_flag_keeps_the_rule_nodes(folder, rule):
    assert ts(folder, "--procedure", "pruning", "--pruning_choice", "importance_node", "--k", 3,
              "--num_masks", 1, "--importance_rule", rule)[0] == 0
    student, masks = load_pickle(folder / f"student_masks_importance_node_{K}_3.pkl", "masks")
    v = student.w2.weight.detach().numpy().ravel()
    np.testing.assert_array_equal(masks[0].any(axis=0), importance_node_keep(v, 3, rule))
    assert masks.importance_rule == rule


def test_unknown_importance_rule_is_one_sentence(folder):
    code, _, err = ts(folder, "--procedure", "pruning", "--pruning_choice", "importance_node",
                      "--k", 3, "--importance_rule", "largest")
    assert code == 2 and "--importance_rule must be one of magnitude, signed" in err


def test_generated_students_differ_from_rescaled_ones():
    teacher = generate_teacher(N, 2, 3200, seed=4)
    trained = workflow.train(teacher, K, seed=2)
    w = trained.w1.weight.detach().double().numpy()
    r = workflow.rescaled(trained).w1.weight.detach().double().numpy()
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.sqrt(N))
    np.testing.assert_allclose(r / np.linalg.norm(r, axis=1, keepdims=True),
                               w / np.linalg.norm(w, axis=1, keepdims=True),
                               rtol=1e-6)  # stored in float32
