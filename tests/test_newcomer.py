"""What a new user meets first: a rank-deficient data set, fast --help, progress in logs."""
import os

import numpy as np

from data import generate_teacher
from entry_points import call


# ----------------------------------------------------------------------------------------
# Fewer samples than input dimensions: the Gram matrix is singular and must look it.

def test_gram_of_fewer_samples_than_dimensions_has_their_rank():
    n, p = 50, 30
    teacher = generate_teacher(n, 2, p, seed=3)
    eigvals = np.linalg.eigvalsh(teacher.gram.numpy())              # ascending, (N,)
    # N - P eigenvalues are zero up to float64 rounding of a P-term sum, the rest are not.
    assert np.abs(eigvals[:n - p]).max() < 1e-12 * eigvals[-1]
    assert eigvals[n - p] > 1e-3 * eigvals[-1]
    x = teacher.inputs.double().numpy()                              # (P, N)
    np.testing.assert_allclose(teacher.gram.numpy(), x.T @ x / p, rtol=0, atol=1e-12)


def test_dpp_edge_k_above_the_rank_is_one_sentence(tmp_path):
    d = str(tmp_path)
    teacher = os.path.join(d, "teacher.pkl")
    assert call("teacher_dataset.py", ["--input_dim", 50, "--num_data", 30,
                                       "--teacher_path", teacher])[0] == 0
    common = ["--input_dim", 50, "--student_h_size", 3, "--teacher_path", teacher,
              "--output_dir", d]
    assert call("teacher_student.py", common)[0] == 0
    code, out, err = call("teacher_student.py", common + [
        "--trained_weights", os.path.join(d, "student_3.pth"), "--procedure", "pruning",
        "--pruning_choice", "dpp_edge", "--k", 40, "--num_masks", 2])
    assert code == 2, (out, err)
    assert "--k 40 cannot be drawn by dpp_edge" in err, err
    assert not os.path.exists(os.path.join(d, "student_masks_dpp_edge_3_40.pkl"))
