#!/usr/bin/env python3
"""Paper-scale speed and memory of every workflow step, side by side with the original approach.

    python3 benchmarks/run.py [--scale paper|small] [--ref_samples 3000] [--ref_rows 20000]
                              [--ref_test 2000] [--ref_draws 20] [--device cpu]
                              [--out benchmarks/results.md]

Not part of the test suite. For every step of the teacher-student workflow it times OUR
implementation at the chosen scale (paper: N = 500, P = 800000, K = 6, 100 masks, dpp_node
k = 3, dpp_edge k = 250 and 417, random_edge with edge reweighting at k = 250, evaluate.py)
and, in the same run, the slow reference of the ORIGINAL approach (reference.py: per-sample
loops, autograd one sample at a time, kernels from materialised P x N products, dppy draws,
P x |S| least-squares reweighting) at a scale it can afford, extrapolated to the chosen scale
and labelled as such. Every step runs in a fresh subprocess (`run.py --step NAME`, the worker
mode) so that its peak resident memory (ru_maxrss from os.wait4) is its own; the table reports
it beside the size of the data the step reads, so that "peak <= 2 x data read" can be checked.
Each step also CHECKS that both ways give the same results (weights after training on the same
samples, kernels, losses, reweighted weights, sampler distribution) and prints PASS / FAIL.
Then the end-to-end CLI workflow (teacher_dataset.py, teacher_student.py training, pruning and
testing of dpp_node k = 3 and dpp_edge k = 250 with 100 masks, evaluate.py for both) is timed
as subprocesses, and the teacher pickle's write / read throughput is compared with writing
and reading the same bytes raw. The summary (machine, load average, tables, targets met / not
met) is printed and written as Markdown to --out. Big intermediate files live in --workdir
(default benchmarks/out/<scale>, git-ignored) and are deleted at the end unless --keep.
"""
import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):          # the project's modules; tests/reference.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

MB = 1e6

# Problem sizes. `ref_*`: the reduced sizes at which the reference (original approach) runs.
SCALES = {
    "paper": dict(input_dim=500, teacher_h_size=2, student_h_size=6, num_data=800000,
                  num_masks=100, k_node=3, k_edges=[250, 417], k_rw=250, sig_w=0.0, v_star=4,
                  lr=0.5, seed=1, ref_samples=3000, ref_rows=20000, ref_test=2000,
                  ref_draws=20, ref_masks=2, ref_rw_masks=1),
    "small": dict(input_dim=100, teacher_h_size=2, student_h_size=6, num_data=40000,
                  num_masks=20, k_node=3, k_edges=[50, 83], k_rw=50, sig_w=0.0, v_star=4,
                  lr=0.5, seed=1, ref_samples=1000, ref_rows=5000, ref_test=500,
                  ref_draws=10, ref_masks=2, ref_rw_masks=1),
}

# What the issue reports for the original code at paper scale (not measured here).
ISSUE = {
    "gen": "68 s", "train": "589 s", "prune_dpp_node": "22 s",
    "test_dpp_node": "79 s (5 masks)", "prune_dpp_edge": "fails in dppy, 11.6 GB peak",
    "random_edge_rw": "498 s", "evaluate": "24 s",
}

# Targets of the issue (paper scale).
SGD_SPEEDUP_TARGET = 100.0       # our online-SGD samples/s over the original's, at N=500, K=6
WORKFLOW_TARGET_S = 90.0         # whole CLI workflow
DPP_EDGE_417_TARGET_S = 20.0     # dpp_edge pruning k=417 with 100 masks
RW_TEST_TARGET_S = 5.0           # testing with edge reweighting at k=250
MEMORY_FACTOR = 2.0              # peak RSS <= 2 x data read
DISK_SPEED_FRACTION = 0.8        # pickle throughput >= 80% of raw file I/O counts as disk speed


# =============================================================================================
# Worker side: one step per fresh process. Each step returns a dict that is written as JSON:
#   time (s, the timed work only), parts {name: s}, data_read (bytes), data_note,
#   checks [{name, ok, detail}], info {..}; reference steps add measured (str), extrapolated (s).

STEPS = {}


def step(name):
    def wrap(fn):
        STEPS[name] = fn
        return fn
    return wrap


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _check(name, ok, detail):
    return dict(name=name, ok=bool(ok), detail=detail)


def _max_rel(a, b):
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _import_dppy():
    """Import dppy before any clock starts (the original imported it with its modules)."""
    import dppy.finite_dpps  # noqa: F401


def _size(*paths):
    return sum(os.path.getsize(p) for p in paths)


class Work:
    """Paths of the files the steps pass to each other inside the work folder."""

    def __init__(self, cfg, folder):
        self.cfg, self.dir = cfg, pathlib.Path(folder)
        self.teacher = self.dir / "teacher.pkl"
        self.ref_data = self.dir / "ref_data.npz"
        self.student = self.dir / f"student_{cfg['student_h_size']}.pth"

    def masks(self, choice, k):
        return self.dir / f"student_masks_{choice}_{self.cfg['student_h_size']}_{k}.pkl"


def _load_teacher(work):
    from storage import load_pickle
    return load_pickle(work.teacher, "teacher file")


def _load_student(work):
    from models import student_from_weights
    from storage import load_state_dict
    state = load_state_dict(work.student)
    return student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy())


def _load_masks(work, choice, k):
    from storage import load_pickle
    return load_pickle(work.masks(choice, k), "masks file")


def _ref_data(work):
    import numpy as np
    with np.load(work.ref_data) as f:
        return {name: f[name] for name in f.files}


def _sub_teacher(ref, rows):
    """A TeacherDataset on the first `rows` rows of the reference subset (and its test
    samples), with the exact float64 Gram matrix of those rows."""
    import numpy as np
    import torch
    from data import TeacherDataset
    arrays = {name: np.ascontiguousarray(ref[name]) for name in
              ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels")}
    arrays["inputs"], arrays["labels"] = arrays["inputs"][:rows], arrays["labels"][:rows]
    x = arrays["inputs"].astype(np.float64)
    return TeacherDataset(*(torch.from_numpy(arrays[name]) for name in
                            ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels")),
                          torch.from_numpy(x.T @ x / len(x)), dict(sig_w=0.0))


# ---- our implementation, at the chosen scale ------------------------------------------------

@step("baseline")
def step_baseline(cfg, work):
    """Imports what teacher_student.py imports: the resident memory of an idle process."""
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import data  # noqa: F401
    import storage  # noqa: F401
    import training  # noqa: F401
    import workflow  # noqa: F401
    return dict(time=0.0, data_read=0, checks=[])


@step("gen")
def step_gen(cfg, work):
    import numpy as np
    from data import dataset_nbytes, generate_teacher
    from storage import save_pickle
    teacher, seconds = _timed(generate_teacher, cfg["input_dim"], cfg["teacher_h_size"],
                              cfg["num_data"], "normal", cfg["sig_w"], cfg["v_star"],
                              cfg["seed"], cfg["device"])
    _, write_s = _timed(save_pickle, teacher, work.teacher)
    rows = max(cfg["ref_rows"], cfg["ref_samples"])
    np.savez(work.ref_data, w1=teacher.w1.numpy(), w2=teacher.w2.numpy(),
             inputs=teacher.inputs[:rows].numpy(), labels=teacher.labels[:rows].numpy(),
             test_inputs=teacher.test_inputs[:cfg["ref_test"]].numpy(),
             test_labels=teacher.test_labels[:cfg["ref_test"]].numpy())
    nbytes = dataset_nbytes(cfg["input_dim"], cfg["num_data"])
    return dict(time=seconds, parts={"generate": seconds, "pickle write": write_s},
                data_read=nbytes, data_note="data written (generation reads nothing)",
                checks=[], info=dict(pickle_bytes=_size(work.teacher), samples=
                                     cfg["num_data"] + cfg["num_data"] // 10))


@step("pickle_io")
def step_pickle_io(cfg, work):
    """Teacher pickle write / read throughput vs writing / reading the same bytes raw."""
    import numpy as np
    from storage import save_pickle
    copy, raw = work.dir / "teacher_copy.pkl", work.dir / "teacher_raw.bin"
    teacher, read_pkl = _timed(_load_teacher, work)
    arrays = [getattr(teacher, name).numpy() for name in
              ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels", "gram")]

    def raw_write():
        with open(raw, "wb") as f:
            for a in arrays:
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            f.flush()
            os.fsync(f.fileno())

    layout = [(a.shape, a.dtype) for a in arrays]

    def raw_read():
        out = [np.empty(shape, dtype) for shape, dtype in layout]
        with open(raw, "rb") as f:
            for a in out:
                f.readinto(memoryview(a).cast("B"))
        return out

    writes_raw, writes_pkl, reads_raw, reads_pkl = [], [], [], [read_pkl]
    writes_raw.append(_timed(raw_write)[1])
    writes_pkl.append(_timed(save_pickle, teacher, copy)[1])
    writes_pkl.append(_timed(save_pickle, teacher, copy)[1])
    writes_raw.append(_timed(raw_write)[1])
    nbytes_pkl, nbytes_raw = _size(copy), _size(raw)
    del teacher, arrays
    for _ in range(2):
        out, seconds = _timed(raw_read)
        reads_raw.append(seconds)
        del out
        from storage import load_pickle
        out, seconds = _timed(load_pickle, copy)
        reads_pkl.append(seconds)
        del out
    copy.unlink()
    raw.unlink()
    info = dict(pickle_bytes=nbytes_pkl, raw_bytes=nbytes_raw,
                write_pkl_MBps=nbytes_pkl / min(writes_pkl) / MB,
                write_raw_MBps=nbytes_raw / min(writes_raw) / MB,
                read_pkl_MBps=nbytes_pkl / min(reads_pkl) / MB,
                read_raw_MBps=nbytes_raw / min(reads_raw) / MB,
                writes_pkl=writes_pkl, writes_raw=writes_raw, reads_pkl=reads_pkl,
                reads_raw=reads_raw)
    return dict(time=min(reads_pkl), parts={"pickle read": min(reads_pkl),
                                            "pickle write": min(writes_pkl),
                                            "raw read": min(reads_raw),
                                            "raw write": min(writes_raw)},
                data_read=nbytes_pkl, data_note="teacher.pkl", checks=[], info=info)


@step("train")
def step_train(cfg, work):
    import workflow
    from storage import save_state_dict
    teacher = _load_teacher(work)
    student, seconds = _timed(workflow.train, teacher, cfg["student_h_size"], "sigmoid",
                              "normal", cfg["lr"], 1, 0.0, cfg["seed"])
    loss = workflow.test_loss(teacher, student)
    save_state_dict(student.state_dict(), work.student)
    return dict(time=seconds, data_read=_size(work.teacher), data_note="teacher.pkl",
                checks=[], info=dict(samples=len(teacher), samples_per_s=len(teacher) / seconds,
                                     test_loss=loss))


@step("prune_dpp_node")
def step_prune_node(cfg, work):
    import workflow
    from storage import save_pickle
    teacher, student = _load_teacher(work), _load_student(work)
    (unpruned, masks), seconds = _timed(workflow.prune, teacher, student, "dpp_node",
                                        cfg["k_node"], cfg["num_masks"], cfg["seed"])
    save_pickle((unpruned, masks), work.masks("dpp_node", cfg["k_node"]))
    return dict(time=seconds, data_read=_size(work.teacher, work.student),
                data_note="teacher.pkl + student", checks=[])


def _prune_edge(cfg, work, choice, k):
    import workflow
    from storage import save_pickle
    teacher, student = _load_teacher(work), _load_student(work)
    parts, kernels = {}, None
    if choice == "dpp_edge":
        kernels, parts["kernels (Gram route)"] = _timed(
            workflow.edge_kernels, workflow.rescaled(student), teacher.gram.numpy())
    (unpruned, masks), parts["mask draws"] = _timed(
        workflow.prune, teacher, student, choice, k, cfg["num_masks"], cfg["seed"], kernels)
    save_pickle((unpruned, masks), work.masks(choice, k))
    return dict(time=sum(parts.values()), parts=parts,
                data_read=_size(work.teacher, work.student), data_note="teacher.pkl + student",
                checks=[])


def _test(cfg, work, choice, k, reweighting):
    import numpy as np
    import workflow
    teacher = _load_teacher(work)
    unpruned, masks = _load_masks(work, choice, k)
    result, seconds = _timed(workflow.test_masks, teacher, unpruned, masks, choice,
                             reweighting, None, cfg["device"])
    predicted = workflow.predicted_loss(teacher, result.weights, result.outs)
    gap = float(np.abs(result.losses - predicted).max() / max(predicted.max(), 1e-12))
    return dict(time=seconds, data_read=_size(work.teacher, work.masks(choice, k)),
                data_note="teacher.pkl + masks", checks=[],
                info=dict(mean_loss=result.mean, unpruned_loss=result.unpruned_loss,
                          masks=len(masks), theory_gap=gap))


@step("test_dpp_node")
def step_test_node(cfg, work):
    return _test(cfg, work, "dpp_node", cfg["k_node"], False)


@step("random_edge_rw")
def step_random_edge_rw(cfg, work):
    out = _prune_edge(cfg, work, "random_edge", cfg["k_rw"])
    prune_s = out["time"]
    out = _test(cfg, work, "random_edge", cfg["k_rw"], True)
    out["parts"] = {"prune (random_edge)": prune_s, "test with edge reweighting": out["time"]}
    return out


def _edge_step(name):
    """prune_dpp_edge_<k> and test_dpp_edge_<k>."""
    k = int(name.rsplit("_", 1)[1])
    if name.startswith("prune"):
        return lambda cfg, work: _prune_edge(cfg, work, "dpp_edge", k)
    return lambda cfg, work: _test(cfg, work, "dpp_edge", k, False)


# ---- references of the original approach, at a reduced scale, extrapolated -----------------

@step("ref_gen")
def step_ref_gen(cfg, work):
    import numpy as np
    import torch
    from scipy import stats
    from reference import reference_generate, reference_labels
    ref, n = _ref_data(work), cfg["ref_samples"]
    out, seconds = _timed(reference_generate, cfg["input_dim"], cfg["teacher_h_size"], n,
                          "normal", cfg["sig_w"], cfg["v_star"], 12345,
                          torch.from_numpy(ref["w1"]), torch.from_numpy(ref["w2"]))
    done = n + n // 10
    total = cfg["num_data"] + cfg["num_data"] // 10
    same = reference_labels(torch.from_numpy(ref["w1"]), torch.from_numpy(ref["w2"]),
                            torch.from_numpy(ref["inputs"][:n]), cfg["sig_w"]).numpy()
    err = _max_rel(same, ref["labels"][:n])
    ks = stats.ks_2samp(out["labels"].numpy(), ref["labels"][:n]).pvalue
    x = out["inputs"].numpy()
    return dict(time=seconds, measured=f"{done} samples", extrapolated=seconds * total / done,
                factor=f"x{total / done:.0f} samples", data_read=_size(work.ref_data),
                data_note="reference subset", checks=[
                    _check("generation: labels of the same inputs, per-sample loop vs data.py",
                           err < 1e-5 if cfg["sig_w"] == 0 else True,
                           f"max rel err {err:.1e}" if cfg["sig_w"] == 0 else "noisy teacher"),
                    _check("generation: fresh per-sample draws vs data.py, same distribution",
                           ks > 1e-3 and abs(x.mean()) < 5 / math.sqrt(x.size)
                           and abs(x.var() - 1) < 5 * math.sqrt(2 / x.size),
                           f"labels KS p = {ks:.2f}; inputs mean {x.mean():.1e}, var "
                           f"{x.var():.4f}")],
                info=dict(samples_per_s=done / seconds))


@step("ref_train")
def step_ref_train(cfg, work):
    import torch
    import training
    from models import Student
    from reference import reference_online_sgd
    ref, n = _ref_data(work), cfg["ref_samples"]
    inputs, labels = torch.from_numpy(ref["inputs"][:n]), torch.from_numpy(ref["labels"][:n])

    def student():   # the initialisation workflow.train uses
        return Student(cfg["input_dim"], cfg["student_h_size"], "sigmoid", "normal",
                       torch.Generator().manual_seed(cfg["seed"]))

    slow, seconds = _timed(reference_online_sgd, student(), inputs, labels, cfg["lr"])
    fast, fast_s = _timed(training.online_sgd, student(), inputs, labels, cfg["lr"])
    err32 = max(_max_rel(fast.w1.weight.detach(), slow.w1.weight.detach()),
                _max_rel(fast.w2.weight.detach(), slow.w2.weight.detach()))
    m = min(n, 1000)
    slow64 = reference_online_sgd(student().double(), inputs[:m], labels[:m], cfg["lr"])
    fast64 = training.online_sgd(student().double(), inputs[:m], labels[:m], cfg["lr"])
    err64 = max(_max_rel(fast64.w1.weight.detach(), slow64.w1.weight.detach()),
                _max_rel(fast64.w2.weight.detach(), slow64.w2.weight.detach()))
    moved = _max_rel(fast.w1.weight.detach(), student().w1.weight.detach())
    return dict(time=seconds, measured=f"{n} samples",
                extrapolated=seconds * cfg["num_data"] / n, factor=f"x{cfg['num_data'] / n:.0f}"
                " samples", data_read=_size(work.ref_data), data_note="reference subset",
                checks=[_check(f"training: weights after {n} samples, float32 autograd "
                               "reference vs ours", err32 < 1e-4 and moved > 1e-2,
                               f"max rel err {err32:.1e} (weights moved {moved:.2f})"),
                        _check(f"training: weights after {m} samples, float64 autograd "
                               "reference vs ours", err64 < 1e-8, f"max rel err {err64:.1e}")],
                info=dict(samples_per_s=n / seconds, ours_same_samples_s=fast_s))


@step("ref_prune_dpp_node")
def step_ref_prune_node(cfg, work):
    import numpy as np
    import workflow
    from dpp_sample_ts import node_kernel
    from reference import reference_kdpp_draws, reference_node_kernel
    _import_dppy()
    ref = _ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    w1 = workflow.rescaled(_load_student(work)).w1.weight.detach().double().numpy()
    kernel, kernel_s = _timed(reference_node_kernel, w1, x)
    (draws, failures), draw_s = _timed(reference_kdpp_draws, kernel, cfg["k_node"],
                                       cfg["num_masks"], cfg["seed"])
    x64 = x.astype(np.float64)
    err = _max_rel(node_kernel(w1, x64.T @ x64 / len(x)), kernel)
    scale = cfg["num_data"] / len(x)
    return dict(time=kernel_s + draw_s, parts={"kernel": kernel_s, "dppy draws": draw_s},
                measured=f"kernel on {len(x)} rows + {cfg['num_masks']} dppy draws",
                extrapolated=kernel_s * scale + draw_s, factor=f"kernel x{scale:.0f} rows",
                data_read=_size(work.ref_data, work.student), data_note="reference subset",
                checks=[_check("dpp_node kernel: W G W^T vs (1/P)(XW^T)^T(XW^T), same rows",
                               err < 1e-10, f"max rel err {err:.1e}")],
                info=dict(dppy_failures=failures, dppy_draws=cfg["num_masks"]))


def _per_sample_test(cfg, work, choice, k):
    """Reference per-mask, per-sample testing of `ref_masks` masks on `ref_test` samples."""
    import numpy as np
    import torch
    import workflow
    from reference import reference_test_masks
    ref = _ref_data(work)
    unpruned, masks = _load_masks(work, choice, k)
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy()
    some = np.stack(masks[:cfg["ref_masks"]])
    granularity = "node" if choice.endswith("node") else "edge"
    losses, seconds = _timed(reference_test_masks, w1, w2, some, torch.from_numpy(
        ref["test_inputs"]), torch.from_numpy(ref["test_labels"]), "sigmoid", "normal",
        granularity)
    ours = workflow.test_masks(_sub_teacher(ref, cfg["ref_rows"]), unpruned, some,
                               choice).losses
    err = _max_rel(ours, losses)
    num_test = cfg["num_data"] // 10
    scale = (num_test / len(ref["test_labels"])) * (cfg["num_masks"] / len(some))
    return dict(time=seconds, measured=f"{len(some)} masks x {len(ref['test_labels'])} samples",
                extrapolated=seconds * scale, factor=f"x{scale:.0f} mask-samples",
                data_read=_size(work.ref_data, work.masks(choice, k)),
                data_note="reference subset + masks",
                checks=[_check(f"testing {choice}: batched test_masks vs per-mask per-sample "
                               "reference, same masks and samples", err < 1e-4,
                               f"max rel err {err:.1e}")])


@step("ref_test_dpp_node")
def step_ref_test_node(cfg, work):
    return _per_sample_test(cfg, work, "dpp_node", cfg["k_node"])


def _ref_prune_edge(cfg, work, k):
    import numpy as np
    import workflow
    from dpp_sample_ts import KDPP, edge_kernel, exact_inclusion_probabilities
    from reference import reference_edge_kernels, reference_kdpp_draws
    _import_dppy()
    ref = _ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    w1 = workflow.rescaled(_load_student(work)).w1.weight.detach().double().numpy()
    kernels, kernel_s = _timed(reference_edge_kernels, w1, x)
    x64 = x.astype(np.float64)
    gram = x64.T @ x64 / len(x)
    err = max(_max_rel(edge_kernel(w1[i], gram), kernels[i]) for i in range(len(w1)))
    del x64
    # dppy on node 0's kernel: one FiniteDPP set-up (eigh, polynomials) and per-draw cost.
    (_, fail1), first_s = _timed(reference_kdpp_draws, kernels[0], k, 1, 0)
    (_, fails), many_s = _timed(reference_kdpp_draws, kernels[0], k, 1 + cfg["ref_draws"], 1)
    per_draw = max(many_s - first_s, 0.0) / cfg["ref_draws"]
    setup = max(first_s - per_draw, 0.0)
    num_nodes = len(w1)
    draws_extrap = num_nodes * setup + num_nodes * cfg["num_masks"] * per_draw
    scale = cfg["num_data"] / len(x)
    # The original built its kernels in float32: dppy refuses rounding-negative eigenvalues.
    x32 = x.astype(np.float32)
    fails32 = 0
    for i in range(num_nodes):
        a = x32 * w1[i].astype(np.float32)
        _, f = reference_kdpp_draws(a.T @ a / np.float32(len(x)), k, 2, i)
        fails32 += f
    # The sampler, by distribution, on a small well-conditioned kernel.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    small = (q * np.geomspace(0.2, 5.0, 8)) @ q.T
    exact = exact_inclusion_probabilities(small, 3)
    num = 3000
    ours = KDPP(small).sample_many(3, num, rng)
    theirs, small_fail = reference_kdpp_draws(small, 3, num, 0)
    se = np.sqrt(exact * (1 - exact) / num)
    dev = [float(np.max(np.abs(np.bincount(d.ravel(), minlength=8) / len(d) - exact) / se))
           for d in (ours, theirs)]
    return dict(time=kernel_s + many_s, parts={"kernels": kernel_s, "dppy set-up": setup,
                                               "dppy per draw": per_draw},
                measured=f"kernels on {len(x)} rows; dppy 1 set-up + {cfg['ref_draws']} draws",
                extrapolated=kernel_s * scale + draws_extrap,
                factor=f"kernels x{scale:.0f} rows; draws to {num_nodes}x{cfg['num_masks']}",
                data_read=_size(work.ref_data, work.student), data_note="reference subset",
                checks=[_check("dpp_edge kernels: diag(w) G diag(w) vs materialised "
                               "(1/P)(X diag w)^T(X diag w), same rows", err < 1e-10,
                               f"max rel err {err:.1e} over {num_nodes} nodes"),
                        _check("k-DPP sampler: ours and dppy vs exact inclusion probabilities "
                               "(n = 8, k = 3)", max(dev) < 5 and small_fail == 0,
                               f"max deviation ours {dev[0]:.1f} SE, dppy {dev[1]:.1f} SE "
                               f"({num} draws each)")],
                info=dict(dppy_failures_float64=fail1 + fails,
                          dppy_float32_kernel_failures=f"{fails32}/{2 * num_nodes}",
                          original_kernel_tensor_GB=num_nodes * cfg["num_data"]
                          * cfg["input_dim"] * 4 / 1e9))


@step("ref_random_edge_rw")
def step_ref_random_edge_rw(cfg, work):
    import numpy as np
    import torch
    import workflow
    from dpp_sample_ts import reweight_edges, reweight_nodes
    from reference import (reference_hidden_activations, reference_reweight_edges,
                           reference_reweight_nodes, reference_test_masks)
    ref = _ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    unpruned, masks = _load_masks(work, "random_edge", cfg["k_rw"])
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy().ravel()
    some = np.stack(masks[:cfg["ref_rw_masks"]])
    fits, fit_s = _timed(lambda: [reference_reweight_edges(w1, m, x) for m in some])
    test_inputs, test_labels = (torch.from_numpy(ref["test_inputs"]),
                                torch.from_numpy(ref["test_labels"]))
    # per-sample testing of the first reweighted student (its mask is already applied)
    losses, test_s = _timed(reference_test_masks, fits[0], w2, np.ones_like(some[:1]),
                            test_inputs, test_labels)
    x64 = x.astype(np.float64)
    gram = x64.T @ x64 / len(x)
    err_edge = max(_max_rel(reweight_edges(w1, m.astype(bool), gram), f)
                   for m, f in zip(some, fits))
    sub = _sub_teacher(ref, len(x))
    ours = workflow.test_masks(sub, unpruned, some[:1], "random_edge", True).losses
    err_loss = _max_rel(ours, losses)
    keep = np.zeros(len(w2), dtype=bool)
    keep[: cfg["k_node"]] = True
    a = reference_hidden_activations(w1, x)
    err_node = _max_rel(reweight_nodes(w2, keep, a.T @ a / len(x)),
                        reference_reweight_nodes(w1, w2, keep, x))
    num_test = cfg["num_data"] // 10
    fit_scale = cfg["num_data"] / len(x) * cfg["num_masks"] / len(some)
    test_scale = num_test / len(test_labels) * cfg["num_masks"]
    return dict(time=fit_s + test_s, parts={"lstsq reweighting": fit_s,
                                            "per-sample test": test_s},
                measured=f"lstsq on {len(x)} rows x {len(some)} mask; test {len(test_labels)}"
                " samples x 1 mask", extrapolated=fit_s * fit_scale + test_s * test_scale,
                factor=f"lstsq x{fit_scale:.0f}; test x{test_scale:.0f}",
                data_read=_size(work.ref_data, work.masks("random_edge", cfg["k_rw"])),
                data_note="reference subset + masks",
                checks=[_check("edge reweighting: G_SS^-1 G_SR w_R vs direct lstsq on the same "
                               "rows", err_edge < 1e-8, f"max rel err {err_edge:.1e}"),
                        _check("node reweighting: H_SS^-1 H_SR vs direct lstsq on activations",
                               err_node < 1e-8, f"max rel err {err_node:.1e}"),
                        _check("testing with edge reweighting: batched vs per-sample reference",
                               err_loss < 1e-4, f"max rel err {err_loss:.1e}")],
                info=dict(original_lstsq_matrix_GB=cfg["num_data"] * cfg["k_rw"] * 8 / 1e9))


@step("ref_evaluate")
def step_ref_evaluate(cfg, work):
    import numpy as np
    import torch
    from order_params import order_parameters
    from reference import reference_order_parameters, reference_test_masks
    ref = _ref_data(work)
    unpruned, masks = _load_masks(work, "dpp_node", cfg["k_node"])
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy()
    stacked = np.stack(masks)
    (eq, er), order_s = _timed(reference_order_parameters, w1, stacked, ref["w1"])
    some = stacked[:cfg["ref_masks"]]
    _, test_s = _timed(reference_test_masks, w1, w2, some, torch.from_numpy(ref["test_inputs"]),
                       torch.from_numpy(ref["test_labels"]), "sigmoid", "normal", "node")
    q, r, _ = order_parameters(w1[None] * np.swapaxes(stacked, 1, 2), ref["w1"])
    err = max(_max_rel(q.mean(0), eq), _max_rel(r.mean(0), er))
    num_test = cfg["num_data"] // 10
    test_scale = num_test / len(ref["test_labels"]) * cfg["num_masks"] / len(some)
    return dict(time=order_s + test_s, parts={"per-mask Q, R": order_s,
                                              "per-sample test": test_s},
                measured=f"Q, R of {len(stacked)} masks; test {len(some)} masks x "
                f"{len(ref['test_labels'])} samples", extrapolated=order_s + test_s * test_scale,
                factor=f"test x{test_scale:.0f}", data_read=_size(work.ref_data,
                                                                 work.masks("dpp_node",
                                                                            cfg["k_node"])),
                data_note="reference subset + masks",
                checks=[_check("expected Q, R over masks: batched vs per-mask loop",
                               err < 1e-12, f"max rel err {err:.1e}")])


def _ref_edge_step(name):
    k = int(name.rsplit("_", 1)[1])
    if name.startswith("ref_prune"):
        return lambda cfg, work: _ref_prune_edge(cfg, work, k)
    return lambda cfg, work: _per_sample_test(cfg, work, "dpp_edge", k)


def worker(args):
    folder = pathlib.Path(args.workdir)
    cfg = json.loads((folder / "config.json").read_text())
    name = args.step
    if name in STEPS:
        fn = STEPS[name]
    elif name.startswith(("prune_dpp_edge_", "test_dpp_edge_")):
        fn = _edge_step(name)
    elif name.startswith(("ref_prune_dpp_edge_", "ref_test_dpp_edge_")):
        fn = _ref_edge_step(name)
    else:
        raise SystemExit(f"unknown step {name!r}")
    result = fn(cfg, Work(cfg, folder))
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))


# =============================================================================================
# Orchestrator side.

CHILD_ENV = dict(os.environ)


def run_child(cmd, log_path, cwd=ROOT):
    """Run cmd (a list) to completion; returns (exit status, wall s, peak RSS bytes, CPU s).
    os.wait4 gives the rusage of this child alone (RUSAGE_CHILDREN would be the max so far)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def machine_facts():
    import numba
    import numpy
    import scipy
    import torch
    from importlib import metadata
    try:
        dppy_version = metadata.version("dppy")
    except metadata.PackageNotFoundError:
        dppy_version = "not installed"
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                host=platform.node(), cpu=model, cores=os.cpu_count(), memory=mem,
                python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), numpy=numpy.__version__,
                scipy=scipy.__version__, numba=numba.__version__, dppy=dppy_version,
                load_start=os.getloadavg())


def fmt_s(seconds):
    if seconds is None:
        return "–"
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 1:
        return f"{seconds:.1f}"
    return f"{seconds:.3f}"


def fmt_mb(nbytes):
    return "–" if nbytes is None else f"{nbytes / MB:,.0f}"


class Orchestrator:
    def __init__(self, args, cfg, folder):
        self.args, self.cfg, self.dir = args, cfg, folder
        self.results = {}          # step -> dict (JSON of the worker + rc, wall, peak, cpu)
        self.cli = []              # (label, rc, wall, peak, cpu, data_read, cmd)
        self.failed = []

    def step(self, name):
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--step", name,
               "--workdir", str(self.dir)]
        print(f"  {name} ...", end="", flush=True)
        json_path = self.dir / f"{name}.json"
        if json_path.exists():
            json_path.unlink()
        rc, wall, peak, cpu = run_child(cmd, self.dir / f"{name}.log")
        if rc != 0 or not json_path.exists():
            print(f" FAILED (exit {rc}; see {self.dir / (name + '.log')})")
            tail = (self.dir / f"{name}.log").read_text().splitlines()[-15:]
            print("    " + "\n    ".join(tail))
            self.failed.append(name)
            self.results[name] = dict(rc=rc, wall=wall, peak=peak, cpu=cpu, failed=True,
                                      checks=[_check(f"{name} ran", False, f"exit {rc}")])
            return self.results[name]
        result = json.loads(json_path.read_text())
        result.update(rc=rc, wall=wall, peak=peak, cpu=cpu)
        self.results[name] = result
        extra = f", ref extrapolated {fmt_s(result['extrapolated'])} s" if "extrapolated" in \
            result else ""
        print(f" {fmt_s(result.get('time'))} s timed ({fmt_s(wall)} s process, peak "
              f"{fmt_mb(peak)} MB{extra})", flush=True)
        return result

    def cli_step(self, label, script, flags, inputs, cwd):
        cmd = [sys.executable, str(ROOT / script)] + [str(f) for f in flags]
        print(f"  CLI {label} ...", end="", flush=True)
        data = sum(os.path.getsize(cwd / p) for p in inputs if (cwd / p).exists())
        log = cwd / f"{len(self.cli):02d}_{script.replace('.py', '')}.log"
        rc, wall, peak, cpu = run_child(cmd, log, cwd)
        if rc != 0:
            self.failed.append(f"CLI {label}")
            print(f" FAILED (exit {rc}; see {log})")
        else:
            print(f" {fmt_s(wall)} s, peak {fmt_mb(peak)} MB", flush=True)
        self.cli.append(dict(label=label, rc=rc, wall=wall, peak=peak, cpu=cpu, data=data,
                             cmd=" ".join([os.path.basename(sys.executable), script]
                                          + [shlex.quote(str(f)) for f in flags])))
        return rc

    def run_cli(self):
        c, d = self.cfg, self.dir / "cli"
        d.mkdir(parents=True, exist_ok=True)
        n, K = c["input_dim"], c["student_h_size"]
        common = ["--input_dim", n, "--student_h_size", K, "--teacher_path", "teacher.pkl",
                  "--nonlinearity", "sigmoid", "--mode", "normal"]
        student = f"student_{K}.pth"
        self.cli_step("teacher_dataset.py", "teacher_dataset.py",
                      ["--input_dim", n, "--teacher_h_size", c["teacher_h_size"],
                       "--teacher_path", "teacher.pkl", "--num_data", c["num_data"], "--mode",
                       "normal", "--sig_w", c["sig_w"], "--v_star", c["v_star"], "--seed",
                       c["seed"], "--device", c["device"]], [], d)
        self.cli_step("training", "teacher_student.py",
                      common + ["--epoch", 1, "--lr", c["lr"], "--seed", c["seed"]],
                      ["teacher.pkl"], d)
        for choice, k in (("dpp_node", c["k_node"]), ("dpp_edge", c["k_edges"][0])):
            masks = f"student_masks_{choice}_{K}_{k}.pkl"
            self.cli_step(f"pruning {choice} k={k}", "teacher_student.py",
                          common + ["--trained_weights", student, "--procedure", "pruning",
                                    "--pruning_choice", choice, "--num_masks", c["num_masks"],
                                    "--k", k], ["teacher.pkl", student], d)
            self.cli_step(f"testing {choice} k={k}", "teacher_student.py",
                          common + ["--trained_weights", student, "--procedure", "testing",
                                    "--pruning_choice", choice, "--k", k],
                          ["teacher.pkl", masks], d)
        for choice, k in (("dpp_node", c["k_node"]), ("dpp_edge", c["k_edges"][0])):
            masks = f"student_masks_{choice}_{K}_{k}.pkl"
            self.cli_step(f"evaluate.py {choice} k={k}", "evaluate.py",
                          ["--path_to_student_mask", masks, "--path_to_teacher", "teacher.pkl",
                           "--input_dim", n], ["teacher.pkl", masks], d)

    def run_evaluate(self):
        """Our evaluate.py on the dpp_node masks of the step workers, as a fresh process."""
        c, K = self.cfg, self.cfg["student_h_size"]
        masks = self.dir / f"student_masks_dpp_node_{K}_{c['k_node']}.pkl"
        cmd = [sys.executable, str(ROOT / "evaluate.py"), "--path_to_student_mask", str(masks),
               "--path_to_teacher", str(self.dir / "teacher.pkl"), "--input_dim",
               str(c["input_dim"]), "--output_dir", str(self.dir)]
        print("  evaluate (evaluate.py process) ...", end="", flush=True)
        rc, wall, peak, cpu = run_child(cmd, self.dir / "evaluate.log")
        print(f" {fmt_s(wall)} s, peak {fmt_mb(peak)} MB" if rc == 0 else f" FAILED ({rc})")
        if rc:
            self.failed.append("evaluate")
        self.results["evaluate"] = dict(
            time=wall, rc=rc, wall=wall, peak=peak, cpu=cpu,
            data_read=_size(self.dir / "teacher.pkl", masks),
            data_note="teacher.pkl + masks (whole process timed)",
            checks=[_check("evaluate.py ran", rc == 0, f"exit {rc}")])

    # ---- report -----------------------------------------------------------------------------

    def rows(self):
        c = self.cfg
        k1, k2 = c["k_edges"]
        M = c["num_masks"]
        return [
            (f"Data generation ({c['num_data']} + {c['num_data'] // 10} samples)",
             "gen", "ref_gen", ISSUE["gen"]),
            ("Online SGD, 1 epoch", "train", "ref_train", ISSUE["train"]),
            (f"Prune dpp_node k={c['k_node']}, {M} masks", "prune_dpp_node",
             "ref_prune_dpp_node", ISSUE["prune_dpp_node"]),
            (f"Test dpp_node k={c['k_node']}, {M} masks", "test_dpp_node", "ref_test_dpp_node",
             ISSUE["test_dpp_node"]),
            (f"Prune dpp_edge k={k1} (kernels + {M} masks)", f"prune_dpp_edge_{k1}",
             f"ref_prune_dpp_edge_{k1}", ISSUE["prune_dpp_edge"]),
            (f"Prune dpp_edge k={k2} (kernels + {M} masks)", f"prune_dpp_edge_{k2}",
             f"ref_prune_dpp_edge_{k2}", ISSUE["prune_dpp_edge"]),
            (f"Test dpp_edge k={k1}, {M} masks", f"test_dpp_edge_{k1}",
             f"ref_test_dpp_edge_{k1}", "–"),
            (f"Test random_edge k={c['k_rw']} with edge reweighting, {M} masks",
             "random_edge_rw", "ref_random_edge_rw", ISSUE["random_edge_rw"] + " (5 masks)"),
            (f"evaluate.py, dpp_node k={c['k_node']} ({M} masks)", "evaluate", "ref_evaluate",
             ISSUE["evaluate"]),
        ]

    def step_time(self, name):
        r = self.results.get(name, {})
        if name == "random_edge_rw" and "parts" in r:
            return r["parts"].get("test with edge reweighting", r.get("time"))
        return r.get("time")

    def targets(self):
        c, res = self.cfg, self.results
        out = []
        ours = res.get("train", {}).get("info", {}).get("samples_per_s")
        theirs = res.get("ref_train", {}).get("info", {}).get("samples_per_s")
        if ours and theirs:
            out.append(("Online SGD >= 100x the original's samples/s (N=500, K=6)",
                        ours / theirs >= SGD_SPEEDUP_TARGET,
                        f"{ours:,.0f} vs {theirs:,.0f} samples/s: {ours / theirs:,.0f}x"))
        if self.cli:
            total = sum(s["wall"] for s in self.cli)
            ok = total < WORKFLOW_TARGET_S and all(s["rc"] == 0 for s in self.cli)
            out.append((f"Whole workflow (CLI, {len(self.cli)} commands) < "
                        f"{WORKFLOW_TARGET_S:.0f} s", ok, f"{total:.1f} s"))
        k2 = c["k_edges"][1]
        t = res.get(f"prune_dpp_edge_{k2}", {}).get("time")
        if t is not None:
            out.append((f"dpp_edge pruning k={k2}, {c['num_masks']} masks < "
                        f"{DPP_EDGE_417_TARGET_S:.0f} s", t < DPP_EDGE_417_TARGET_S,
                        f"{t:.2f} s (kernels + draws)"))
        t = self.step_time("random_edge_rw")
        if t is not None:
            out.append((f"Testing with edge reweighting k={c['k_rw']}, {c['num_masks']} masks"
                        f" < {RW_TEST_TARGET_S:.0f} s", t < RW_TEST_TARGET_S, f"{t:.2f} s"))
        over = [(name, r) for name, r in res.items() if not name.startswith(("ref_", "baseline",
                                                                              "pickle_io"))
                and r.get("data_read") and r.get("peak", 0) > MEMORY_FACTOR * r["data_read"]]
        over += [(f"CLI {s['label']}", dict(peak=s["peak"], data_read=s["data"]))
                 for s in self.cli if s["data"] and s["peak"] > MEMORY_FACTOR * s["data"]]
        out.append(("No step's peak memory above 2x the data it reads", not over,
                    "all within" if not over else "over: " + ", ".join(
                        f"{n} ({fmt_mb(r['peak'])} MB vs {fmt_mb(r['data_read'])} MB)"
                        for n, r in over)))
        io = res.get("pickle_io", {}).get("info")
        if io:
            w = io["write_pkl_MBps"] / io["write_raw_MBps"]
            r = io["read_pkl_MBps"] / io["read_raw_MBps"]
            out.append(("Teacher pickle written and read at disk speed (>= "
                        f"{DISK_SPEED_FRACTION:.0%} of raw file I/O)",
                        min(w, r) >= DISK_SPEED_FRACTION,
                        f"write {io['write_pkl_MBps']:,.0f} vs raw {io['write_raw_MBps']:,.0f} MB/s"
                        f" ({w:.0%}); read {io['read_pkl_MBps']:,.0f} vs raw "
                        f"{io['read_raw_MBps']:,.0f} MB/s ({r:.0%})"))
        return out

    def markdown(self, facts, started, finished):
        c, res = self.cfg, self.results
        lines = []
        add = lines.append
        add(f"# Benchmark: our implementation vs the original approach ({self.args.scale} scale)")
        add("")
        add("Produced by `python3 " + " ".join(shlex.quote(a) for a in sys.argv) + "` "
            "(see benchmarks/README.md). Not part of the test suite.")
        add("")
        add("## Machine")
        add("")
        add(f"- date: {facts['date']}; wall time of the whole benchmark: "
            f"{finished - started:.0f} s")
        add(f"- CPU: {facts['cpu']}, {facts['cores']} cores (torch uses "
            f"{facts['torch_threads']} threads); memory {facts['memory']}")
        la0, la1 = facts["load_start"], facts["load_end"]
        add(f"- load average (1, 5, 15 min) at start: {la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f};"
            f" at end: {la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f} (shared machine: other "
            "sessions were running; wall times include their interference)")
        add(f"- Python {facts['python']}, torch {facts['torch']}, numpy {facts['numpy']}, "
            f"scipy {facts['scipy']}, numba {facts['numba']}, dppy {facts['dppy']}; "
            f"device `{c['device']}`")
        add("- BLAS / OpenMP threads: " + (f"{c['threads']} (OMP/OPENBLAS/MKL_NUM_THREADS set "
                                            "for every process)" if c.get("threads") else
                                            f"OPENBLAS_NUM_THREADS={c['blas_threads']} for "
                                            "numpy / scipy in every process, torch's own "
                                            "default" if c.get("blas_threads") else
                                            "library defaults (one per core)"))
        base = res.get("baseline", {}).get("peak")
        add(f"- resident memory of a process that only imports what teacher_student.py imports "
            f"(torch, numpy, numba, our modules): {fmt_mb(base)} MB (included in every peak "
            "below)")
        add("")
        add("## Scale")
        add("")
        add(f"- ours: N = {c['input_dim']}, M = {c['teacher_h_size']}, K = "
            f"{c['student_h_size']}, P = {c['num_data']} (+ {c['num_data'] // 10} test), "
            f"{c['num_masks']} masks, dpp_node k = {c['k_node']}, dpp_edge k = "
            f"{', '.join(map(str, c['k_edges']))}, random_edge + reweighting k = {c['k_rw']}")
        add(f"- reference (original approach, reference.py): SGD and generation on "
            f"{c['ref_samples']} samples; kernels and least squares on {c['ref_rows']} rows; "
            f"per-sample testing on {c['ref_test']} test samples x {c['ref_masks']} masks; "
            f"dppy: 1 set-up + {c['ref_draws']} draws on one node's kernel. Extrapolated "
            "linearly in samples / rows / masks / draws to our scale (marked *extrap.*).")
        add("")
        add("## Steps")
        add("")
        add("Each step ran in a fresh process. *ours s*: the timed work only (files loaded "
            "before the clock starts), except evaluate.py (whole process). *peak MB*: peak "
            "resident memory of the process (ru_maxrss); in brackets, above the import "
            "baseline. *data MB*: the files the step reads "
            "(for generation: the data it writes). *ratio*: reference extrapolated / ours.")
        add("")
        add("| step | ours s | ours peak MB (above imports) | data MB | peak <= 2x data | reference measured "
            "| ref s (measured) | ref s *extrap.* to our scale | ref peak MB (measured scale) "
            "| ratio | original, as reported in the issue | checks |")
        add("|---|---:|---:|---:|:-:|---|---:|---:|---:|---:|---|:-:|")
        for label, ours_name, ref_name, issue in self.rows():
            o, r = res.get(ours_name, {}), res.get(ref_name, {})
            t = self.step_time(ours_name)
            within = "–" if not o.get("data_read") else (
                "yes" if o.get("peak", 0) <= MEMORY_FACTOR * o["data_read"] else "**no**")
            ratio = (f"{r['extrapolated'] / t:,.0f}x" if t and r.get("extrapolated") else "–")
            checks = o.get("checks", []) + r.get("checks", [])
            verdict = ("–" if not checks else
                       "PASS" if all(ch["ok"] for ch in checks) else "**FAIL**")
            above = ("" if not (base and o.get("peak")) else
                     f" ({fmt_mb(o['peak'] - base)})")
            add(f"| {label} | {fmt_s(t)} | {fmt_mb(o.get('peak'))}{above} | "
                f"{fmt_mb(o.get('data_read'))} | {within} | {r.get('measured', '–')} | "
                f"{fmt_s(r.get('time'))} | {fmt_s(r.get('extrapolated'))} ({r.get('factor', '')})"
                f" | {fmt_mb(r.get('peak'))} | {ratio} | {issue} | {verdict} |")
        add("")
        add("Breakdown of the timed work (s):")
        add("")
        for name, r in res.items():
            if r.get("parts"):
                parts = ", ".join(f"{k} {fmt_s(v)}" for k, v in r["parts"].items())
                add(f"- `{name}`: {parts}")
        add("")
        add("## Checks (same results both ways)")
        add("")
        add("| step | check | result | detail |")
        add("|---|---|:-:|---|")
        for name, r in res.items():
            for ch in r.get("checks", []):
                add(f"| `{name}` | {ch['name']} | {'PASS' if ch['ok'] else '**FAIL**'} | "
                    f"{ch['detail']} |")
        add("")
        notes = self.notes()
        if notes:
            add("## Notes")
            add("")
            lines.extend(f"- {n}" for n in notes)
            add("")
        if self.cli:
            add("## End-to-end CLI workflow")
            add("")
            add("Each command as a subprocess, in order, in a fresh folder (times include "
                "interpreter start-up, imports and loading the teacher pickle).")
            add("")
            add("| command | wall s | CPU s | peak MB | data read MB | peak <= 2x data |")
            add("|---|---:|---:|---:|---:|:-:|")
            for s in self.cli:
                within = "–" if not s["data"] else ("yes" if s["peak"] <= MEMORY_FACTOR *
                                                    s["data"] else "**no**")
                status = "" if s["rc"] == 0 else f" **(exit {s['rc']})**"
                add(f"| `{s['cmd']}`{status} | {fmt_s(s['wall'])} | {fmt_s(s['cpu'])} | "
                    f"{fmt_mb(s['peak'])} | {fmt_mb(s['data'])} | {within} |")
            total = sum(s["wall"] for s in self.cli)
            add(f"| **total** | **{total:.1f}** | {sum(s['cpu'] for s in self.cli):.1f} | | | |")
            add("")
        io = res.get("pickle_io", {}).get("info")
        if io:
            add("## Teacher pickle I/O vs raw file I/O of the same bytes")
            add("")
            add("Write: `storage.save_pickle` (temporary file, fsync, rename) vs writing the "
                "same arrays with `file.write` + fsync. Read: `storage.load_pickle` vs "
                "`file.readinto` fresh numpy arrays. Best of two each; reads come from the page "
                "cache when the file was just written (both sides alike).")
            add("")
            add("| | pickle MB/s | raw MB/s | pickle / raw |")
            add("|---|---:|---:|---:|")
            for what in ("write", "read"):
                p, q = io[f"{what}_pkl_MBps"], io[f"{what}_raw_MBps"]
                add(f"| {what} ({io['pickle_bytes'] / MB:,.0f} MB) | {p:,.0f} | {q:,.0f} | "
                    f"{p / q:.0%} |")
            add("")
        add("## Targets")
        add("")
        if self.args.scale != "paper":
            add("(The targets are stated for the paper scale; at this scale they are "
                "indicative only.)")
            add("")
        add("| target | status | measured |")
        add("|---|:-:|---|")
        for name, ok, detail in self.targets():
            add(f"| {name} | {'met' if ok else '**not met**'} | {detail} |")
        add("")
        if self.failed:
            add("Failed steps: " + ", ".join(self.failed) + " (see their .log in the work folder).")
            add("")
        return "\n".join(lines)

    def notes(self):
        res, out = self.results, []
        r = res.get("ref_prune_dpp_edge_" + str(self.cfg["k_edges"][0]), {}).get("info")
        if r:
            out.append(f"dpp_edge, original approach: the K x P x N tensor it materialised is "
                       f"{r['original_kernel_tensor_GB']:.1f} GB in float32 at this scale; "
                       f"dppy failed on {r['dppy_float32_kernel_failures']} draws from kernels "
                       f"built in float32 (as the original did), and {r['dppy_failures_float64']}"
                       " times on the float64 reference kernels.")
        r = res.get("ref_prune_dpp_node", {}).get("info")
        if r:
            out.append(f"dpp_node: dppy failed {r['dppy_failures']} of {r['dppy_draws']} draws.")
        r = res.get("ref_random_edge_rw", {}).get("info")
        if r:
            out.append(f"Edge reweighting, original approach: each per-node lstsq works on a "
                       f"P x k float64 matrix, {r['original_lstsq_matrix_GB']:.1f} GB at this "
                       "scale, per node and mask.")
        r = res.get("train", {}).get("info")
        if r:
            out.append(f"Training: test loss of the trained student {r['test_loss']:.4g}; "
                       f"{r['samples_per_s']:,.0f} samples/s.")
        t = res.get("ref_train", {}).get("info", {}).get("ours_same_samples_s")
        if t:
            out.append(f"Our online SGD on the reference's {self.cfg['ref_samples']} samples "
                       f"took {fmt_s(t)} s (includes numba dispatch; compiled code is cached).")
        for name in ("test_dpp_node", "test_dpp_edge_" + str(self.cfg["k_edges"][0]),
                     "random_edge_rw"):
            r = res.get(name, {}).get("info")
            if r:
                out.append(f"`{name}`: mean test loss over {r['masks']} masks {r['mean_loss']:.4g}"
                           f" (unpruned {r['unpruned_loss']:.4g}); largest relative gap to the "
                           f"order-parameter theory {r['theory_gap']:.1e}.")
        return out


def orchestrate(args):
    cfg = dict(SCALES[args.scale])
    for name in ("ref_samples", "ref_rows", "ref_test", "ref_draws"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    cfg["device"] = args.device
    cfg["scale"] = args.scale
    cfg["threads"] = args.threads
    cfg["blas_threads"] = args.blas_threads
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            CHILD_ENV[var] = str(args.threads)
    if args.blas_threads:
        CHILD_ENV["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    folder = pathlib.Path(args.workdir or ROOT / "benchmarks" / "out" / args.scale).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    facts = machine_facts()
    started = time.time()
    print(f"benchmark at {args.scale} scale in {folder}; load average {facts['load_start']}")
    orch = Orchestrator(args, cfg, folder)
    k1, k2 = cfg["k_edges"]
    names = ["baseline", "gen", "pickle_io", "train", "ref_gen", "ref_train",
             "prune_dpp_node", "ref_prune_dpp_node", "test_dpp_node", "ref_test_dpp_node",
             f"prune_dpp_edge_{k1}", f"ref_prune_dpp_edge_{k1}", f"prune_dpp_edge_{k2}",
             f"ref_prune_dpp_edge_{k2}", f"test_dpp_edge_{k1}", f"ref_test_dpp_edge_{k1}",
             "random_edge_rw", "ref_random_edge_rw", "evaluate", "ref_evaluate"]
    print("steps (each a fresh process):")
    for name in names:
        if name == "evaluate":
            orch.run_evaluate()
        else:
            orch.step(name)
    if not args.skip_cli:
        print("end-to-end CLI workflow:")
        orch.run_cli()
    facts["load_end"] = os.getloadavg()
    text = orch.markdown(facts, started, time.time())
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print()
    print(text)
    print(f"\nwritten to {out}")
    if not args.keep:
        for path in list(folder.rglob("*.pkl")) + list(folder.rglob("*.npz")):
            path.unlink()
    return 1 if orch.failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper",
                        help="problem size (default: paper)")
    parser.add_argument("--ref_samples", type=int, default=None,
                        help="samples the reference SGD and generation run on "
                             "(default: 3000 paper, 1000 small)")
    parser.add_argument("--ref_rows", type=int, default=None,
                        help="training rows for the reference kernels and least squares "
                             "(default: 20000 paper, 5000 small)")
    parser.add_argument("--ref_test", type=int, default=None,
                        help="test samples for the reference per-sample testing "
                             "(default: 2000 paper, 500 small)")
    parser.add_argument("--ref_draws", type=int, default=None,
                        help="dppy draws timed per k (default: 20 paper, 10 small)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for data generation and batched testing (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP/OPENBLAS/MKL_NUM_THREADS for every step and CLI command "
                             "(ours and reference alike); default: the libraries' own choice")
    parser.add_argument("--blas_threads", type=int, default=None,
                        help="set only OPENBLAS_NUM_THREADS (numpy / scipy linear algebra: eigh, "
                             "solve, lstsq) for every process; torch's MKL / OpenMP threads "
                             "are left alone")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"),
                        help="Markdown results file (default: benchmarks/results.md)")
    parser.add_argument("--workdir", default=None,
                        help="folder for intermediate files (default: benchmarks/out/<scale>)")
    parser.add_argument("--skip_cli", action="store_true",
                        help="skip the end-to-end CLI workflow")
    parser.add_argument("--keep", action="store_true",
                        help="keep the pickles in the work folder afterwards")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)   # worker mode
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.step:
        worker(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
