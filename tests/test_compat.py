"""Files users already hold keep working: the teacher, student, masks and kernel files in
tests/fixtures/v1 were written by an earlier release (N = 10, P = 200, K = 3) and must still
load through our safe loaders and feed the scripts; files written now must still be readable
with plain pickle, as the original code's get_Q / get_R read them."""
import os
import subprocess
import sys
import textwrap

import numpy as np

from entry_points import call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = os.path.join(ROOT, "tests", "fixtures", "v1")


def test_files_of_an_earlier_release_load():
    from dpp_pruning.base.storage import load_pickle, load_state_dict
    teacher = load_pickle(os.path.join(V1, "teacher.pkl"), "teacher file")
    assert teacher.settings == dict(input_dim=10, teacher_h_size=2, num_data=200, mode="normal",
                                    sig_w=0.0, v_star=4, seed=1)
    assert tuple(teacher.inputs.shape) == (200, 10) and tuple(teacher.w1.shape) == (2, 10)
    state = load_state_dict(os.path.join(V1, "student_3.pth"))
    assert tuple(state["w1.weight"].shape) == (3, 10)
    for name, kept in (("student_masks_dpp_node_3_2.pkl", 2 * 10),
                       ("student_masks_dpp_edge_3_4.pkl", 3 * 4)):
        student, masks = load_pickle(os.path.join(V1, name), "masks file")
        assert len(masks) == 4 and all(m.shape == (10, 3) and m.sum() == kept for m in masks)
        assert tuple(student.w1.weight.shape) == (3, 10)
    kernels = load_pickle(os.path.join(V1, "dpp_edge_kernels_3.pkl"), "kernel file")
    assert len(kernels["kernels"]) == 3


def test_files_of_an_earlier_release_feed_the_scripts(tmp_path):
    code, out, _ = call("evaluate.py", ["--path_to_student_mask",
                                        os.path.join(V1, "student_masks_dpp_node_3_2.pkl"),
                                        "--path_to_teacher", os.path.join(V1, "teacher.pkl"),
                                        "--input_dim", 10, "--output_dir", str(tmp_path)])
    assert code == 0 and "generalisation error" in out.lower()
    code, out, _ = call("teacher_student.py", [
        "--input_dim", 10, "--student_h_size", 3, "--teacher_path", os.path.join(V1, "teacher.pkl"),
        "--nonlinearity", "sigmoid", "--mode", "normal", "--trained_weights",
        os.path.join(V1, "student_3.pth"), "--procedure", "testing", "--pruning_choice",
        "dpp_edge", "--k", 4, "--output_dir", V1])
    assert code == 0 and "pruned MLP avg. test loss:" in out


def test_new_files_read_with_plain_pickle_as_the_original_did(tmp_path):
    d = str(tmp_path)
    assert call("teacher_dataset.py", ["--input_dim", 10, "--num_data", 200, "--teacher_path",
                                       os.path.join(d, "teacher.pkl")])[0] == 0
    assert call("teacher_student.py", ["--input_dim", 10, "--student_h_size", 3, "--teacher_path",
                                       os.path.join(d, "teacher.pkl"), "--output_dir", d])[0] == 0
    assert call("teacher_student.py", [
        "--input_dim", 10, "--student_h_size", 3, "--teacher_path", os.path.join(d, "teacher.pkl"),
        "--output_dir", d, "--procedure", "pruning", "--trained_weights",
        os.path.join(d, "student_3.pth"), "--pruning_choice", "dpp_node", "--k", 2,
        "--num_masks", 3])[0] == 0
    script = textwrap.dedent(f"""
        import pickle
        teacher = pickle.load(open({os.path.join(d, 'teacher.pkl')!r}, "rb"))
        student, masks = pickle.load(
            open({os.path.join(d, 'student_masks_dpp_node_3_2.pkl')!r}, "rb"))
        w = student.w1.weight.detach().numpy(); ws = teacher.w1.numpy(); n = w.shape[1]
        print((w @ w.T / n).tolist()); print((w @ ws.T / n).tolist()); print(len(masks))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    q, r, count = done.stdout.strip().splitlines()
    assert np.array(eval(q)).shape == (3, 3) and np.array(eval(r)).shape == (3, 2)
    assert int(count) == 3
