"""The timed steps of the benchmark: our implementation at the chosen scale, one step per
fresh process (`run.py --step NAME`), and the helpers every step shares.

Each step returns a dict that the worker writes as JSON:
  time (s, the timed work only), parts {name: s}, data_read (bytes), data_note,
  checks [{name, ok, detail}], info {..}; reference steps (reference_steps.py) add measured
  (str), extrapolated (s) and factor.
"""
import os
import pathlib
import time

MB = 1e6

STEPS = {}


def step(name):
    def wrap(fn):
        STEPS[name] = fn
        return fn
    return wrap


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def check(name, ok, detail):
    return dict(name=name, ok=bool(ok), detail=detail)


def file_bytes(*paths):
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


def load_teacher(work):
    from dpp_pruning.base.storage import load_pickle
    return load_pickle(work.teacher, "teacher file")


def load_student(work):
    from dpp_pruning.base.storage import load_state_dict
    from models import student_from_weights
    state = load_state_dict(work.student)
    return student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy())


def load_masks(work, choice, k):
    from dpp_pruning.base.storage import load_pickle
    return load_pickle(work.masks(choice, k), "masks file")


# ---- our implementation, at the chosen scale ------------------------------------------------

@step("baseline")
def step_baseline(cfg, work):
    """Imports what teacher_student.py imports: the resident memory of an idle process."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    from dpp_pruning.base import (
        data,  # noqa: F401
        storage,  # noqa: F401
        training,  # noqa: F401
        workflow,  # noqa: F401
    )
    return dict(time=0.0, data_read=0, checks=[])


@step("gen")
def step_gen(cfg, work):
    import numpy as np

    from dpp_pruning.base.data import dataset_nbytes, generate_teacher
    from dpp_pruning.base.storage import save_pickle
    teacher, seconds = timed(generate_teacher, cfg["input_dim"], cfg["teacher_h_size"],
                             cfg["num_data"], "normal", cfg["sig_w"], cfg["v_star"],
                             cfg["seed"], cfg["device"])
    _, write_s = timed(save_pickle, teacher, work.teacher)
    rows = max(cfg["ref_rows"], cfg["ref_samples"])
    np.savez(work.ref_data, w1=teacher.w1.numpy(), w2=teacher.w2.numpy(),
             inputs=teacher.inputs[:rows].numpy(), labels=teacher.labels[:rows].numpy(),
             test_inputs=teacher.test_inputs[:cfg["ref_test"]].numpy(),
             test_labels=teacher.test_labels[:cfg["ref_test"]].numpy())
    nbytes = dataset_nbytes(cfg["input_dim"], cfg["num_data"])
    return dict(time=seconds, parts={"generate": seconds, "pickle write": write_s},
                data_read=nbytes, data_note="data written (generation reads nothing)",
                checks=[], info=dict(pickle_bytes=file_bytes(work.teacher), samples=
                                     cfg["num_data"] + cfg["num_data"] // 10))


@step("pickle_io")
def step_pickle_io(cfg, work):
    """Teacher pickle write / read throughput vs writing / reading the same bytes raw."""
    import numpy as np

    from dpp_pruning.base.storage import save_pickle
    copy, raw = work.dir / "teacher_copy.pkl", work.dir / "teacher_raw.bin"
    teacher, read_pkl = timed(load_teacher, work)
    arrays = [getattr(teacher, name).numpy() for name in
              ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels", "gram")]

    def raw_write(arrays):
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
    writes_raw.append(timed(raw_write, arrays)[1])
    writes_pkl.append(timed(save_pickle, teacher, copy)[1])
    writes_pkl.append(timed(save_pickle, teacher, copy)[1])
    writes_raw.append(timed(raw_write, arrays)[1])
    nbytes_pkl, nbytes_raw = file_bytes(copy), file_bytes(raw)
    del teacher, arrays
    for _ in range(2):
        out, seconds = timed(raw_read)
        reads_raw.append(seconds)
        del out
        from dpp_pruning.base.storage import load_pickle
        out, seconds = timed(load_pickle, copy)
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
    from dpp_pruning.base.storage import save_state_dict
    from dpp_pruning.pipeline import workflow
    teacher = load_teacher(work)
    student, seconds = timed(workflow.train, teacher, cfg["student_h_size"], "sigmoid",
                             "normal", cfg["lr"], 1, 0.0, cfg["seed"])
    loss = workflow.test_loss(teacher, student)
    save_state_dict(student.state_dict(), work.student)
    return dict(time=seconds, data_read=file_bytes(work.teacher), data_note="teacher.pkl",
                checks=[], info=dict(samples=len(teacher), samples_per_s=len(teacher) / seconds,
                                     test_loss=loss))


@step("prune_dpp_node")
def step_prune_node(cfg, work):
    from dpp_pruning.base.storage import save_pickle
    from dpp_pruning.pipeline import workflow
    teacher, student = load_teacher(work), load_student(work)
    (unpruned, masks), seconds = timed(workflow.prune, teacher, student, "dpp_node",
                                       cfg["k_node"], cfg["num_masks"], cfg["seed"])
    save_pickle((unpruned, masks), work.masks("dpp_node", cfg["k_node"]))
    return dict(time=seconds, data_read=file_bytes(work.teacher, work.student),
                data_note="teacher.pkl + student", checks=[])


def _prune_edge(cfg, work, choice, k):
    from dpp_pruning.base.storage import save_pickle
    from dpp_pruning.pipeline import workflow
    teacher, student = load_teacher(work), load_student(work)
    parts, kernels = {}, None
    if choice == "dpp_edge":
        kernels, parts["kernels (Gram route)"] = timed(
            workflow.edge_kernels, workflow.rescaled(student), teacher.gram.numpy())
    (unpruned, masks), parts["mask draws"] = timed(
        workflow.prune, teacher, student, choice, k, cfg["num_masks"], cfg["seed"], kernels)
    save_pickle((unpruned, masks), work.masks(choice, k))
    return dict(time=sum(parts.values()), parts=parts,
                data_read=file_bytes(work.teacher, work.student), data_note="teacher.pkl + student",
                checks=[])


def _test(cfg, work, choice, k, reweighting):
    import numpy as np

    from dpp_pruning.pipeline import workflow
    teacher = load_teacher(work)
    unpruned, masks = load_masks(work, choice, k)
    result, seconds = timed(workflow.test_masks, teacher, unpruned, masks, choice,
                            reweighting, None, cfg["device"])
    predicted = workflow.predicted_loss(teacher, result.weights, result.outs)
    gap = float(np.abs(result.losses - predicted).max() / max(predicted.max(), 1e-12))
    return dict(time=seconds, data_read=file_bytes(work.teacher, work.masks(choice, k)),
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


def edge_step(name):
    """prune_dpp_edge_<k> and test_dpp_edge_<k>."""
    k = int(name.rsplit("_", 1)[1])
    if name.startswith("prune"):
        return lambda cfg, work: _prune_edge(cfg, work, "dpp_edge", k)
    return lambda cfg, work: _test(cfg, work, "dpp_edge", k, False)
