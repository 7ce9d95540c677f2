"""The paper's teacher-student experiment grid, as data, and the functions that run it.

A preset fixes the sizes (NOTES.md, "The paper's experiment grid"); the grid is every
(noise level, student panel, method, budget) cell. A cell trains nothing: it draws `rounds`
sets of `num_masks` masks from the trained student of its noise level and panel, tests them
with and without reweighting, and stores per-mask measured and predicted test losses and the
expected Q and R in `cells/<cell>.npz`. `results.csv` is rebuilt from the finished cells.
The teacher and student files are the README's own (`sigma_<s>/teacher.pkl`,
`sigma_<s>/student_<K>.pth`), so every file here can be fed to the three scripts as well.
"""
import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

import workflow
from data import generate_teacher
from models import student_from_weights
from order_params import order_parameters
from storage import atomic_open, load_pickle, load_state_dict, save_pickle, save_state_dict

ALL_METHODS = ("dpp_node", "dpp_edge", "random_node", "random_edge", "importance_node",
               "importance_edge")
COLUMNS = ("noise", "student_h_size", "method", "reweighting", "k", "nodes_equivalent",
           "fraction_kept", "round", "test_loss", "predicted_loss", "test_loss_std",
           "unpruned_test_loss", "unpruned_predicted_loss")


@dataclass(frozen=True)
class Panel:
    student_h_size: int
    methods: tuple
    node_budgets: tuple       # hidden nodes kept; edge methods get the same parameter count


@dataclass(frozen=True)
class Preset:
    input_dim: int
    num_data: int
    noise_levels: tuple
    panels: tuple
    rounds: int
    num_masks: int
    teacher_h_size: int = 2
    v_star: float = 4
    lr: float = 0.5
    epochs: int = 1
    reweighting: tuple = (0, 1)
    mode: str = "normal"
    nonlinearity: str = "sigmoid"


PRESETS = {
    # seconds: for the tests and the notebooks' smoke runs
    "smoke": Preset(input_dim=20, num_data=32000, noise_levels=(0.0, 0.25),
                    panels=(Panel(6, ALL_METHODS, (1, 3, 5)),
                            Panel(20, ("random_edge", "dpp_node"), (1, 3, 5))),
                    rounds=2, num_masks=10),
    # a few minutes on two cores; P / N = 1600 as in the paper
    "small": Preset(input_dim=100, num_data=160000, noise_levels=(0.0, 0.25),
                    panels=(Panel(6, ALL_METHODS, (1, 2, 3, 4, 5)),
                            Panel(20, ("random_edge", "dpp_node"), (1, 2, 3, 4, 5))),
                    rounds=3, num_masks=20),
    # the paper's sizes: N = 500, P = 800000, K = 6 at 1..5 nodes, K = 20 at 5%..25%
    "paper": Preset(input_dim=500, num_data=800000, noise_levels=(0.0, 0.25),
                    panels=(Panel(6, ALL_METHODS, (1, 2, 3, 4, 5)),
                            Panel(20, ("random_edge", "dpp_node"), (1, 2, 3, 4, 5))),
                    rounds=5, num_masks=20),
}


@dataclass(frozen=True)
class Cell:
    noise: float
    student_h_size: int
    method: str
    k: int                    # the --k of teacher_student.py
    nodes_equivalent: int     # the node budget this k matches

    @property
    def name(self):
        return f"sigma{self.noise:g}_K{self.student_h_size}_{self.method}_k{self.k}"


def edge_budget(nodes, input_dim, student_h_size):
    """Weights per node e with K e + K = nodes (N + 1), rounded half up, within 1..N."""
    e = math.floor((nodes * (input_dim + 1) - student_h_size) / student_h_size + 0.5)
    return min(max(e, 1), input_dim)


def fraction_kept(method, k, input_dim, student_h_size):
    """Fraction of the student's K (N + 1) parameters that a budget keeps."""
    if method.endswith("_node"):
        return k / student_h_size
    return (k + 1) / (input_dim + 1)


def grid(preset, methods=None):
    """Every cell of a preset, in a stable order (noise, panel, method, budget)."""
    cells = []
    for noise in preset.noise_levels:
        for panel in preset.panels:
            for method in panel.methods:
                if methods and method not in methods:
                    continue
                for nodes in panel.node_budgets:
                    k = nodes if method.endswith("_node") else edge_budget(
                        nodes, preset.input_dim, panel.student_h_size)
                    cells.append(Cell(float(noise), panel.student_h_size, method, k, nodes))
    return cells


def noise_dir(out, noise):
    return os.path.join(out, f"sigma_{noise:g}")


def teacher_path(out, noise):
    return os.path.join(noise_dir(out, noise), "teacher.pkl")


def student_path(out, noise, student_h_size):
    return os.path.join(noise_dir(out, noise), workflow.student_filename(student_h_size))


def _seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def describe(preset_name, preset, seed):
    """The record of what made a run folder (stored as preset.json)."""
    return dict(preset=preset_name, seed=seed, **asdict(preset))


def prepare(preset_name, preset, out, seed, log=print):
    """Make (or reuse) the teacher of every noise level and the trained student of every
    panel. Existing files are checked against the preset and reused."""
    record = json.loads(json.dumps(describe(preset_name, preset, seed)))
    record_path = os.path.join(out, "preset.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            found = json.load(f)
        if found != record:
            raise ValueError(f"{out} holds a run of another preset or seed ({record_path}); "
                             "use another --out")
    else:
        with atomic_open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    for noise in preset.noise_levels:
        path = teacher_path(out, noise)
        wanted = dict(input_dim=preset.input_dim, teacher_h_size=preset.teacher_h_size,
                      num_data=preset.num_data, mode=preset.mode, sig_w=float(noise),
                      v_star=preset.v_star, seed=_seed(seed, 0))
        if os.path.exists(path):
            teacher = load_pickle(path, "teacher file")
            if teacher.settings != wanted:
                raise ValueError(f"{path} was made with {teacher.settings}, not this preset's "
                                 f"{wanted}; use another --out")
            log(f"reusing {path}")
        else:
            log(f"generating {path}")
            teacher = generate_teacher(**wanted)
            save_pickle(teacher, path)
        for panel in preset.panels:
            spath = student_path(out, noise, panel.student_h_size)
            if os.path.exists(spath):
                log(f"reusing {spath}")
                continue
            log(f"training {spath}")
            student = workflow.train(teacher, panel.student_h_size, preset.nonlinearity,
                                     preset.mode, preset.lr, preset.epochs, 0.0,
                                     _seed(seed, 1, panel.student_h_size))
            save_state_dict(student.state_dict(), spath)
        del teacher


_CACHE = {}


def _load(preset, out, noise, student_h_size):
    """Teacher, trained student and its hidden-activation Gram, cached per worker process
    (one teacher at a time, so a worker never holds two data sets)."""
    key = (out, noise, student_h_size)
    if key not in _CACHE:
        tpath = teacher_path(out, noise)
        teacher = next((v[0] for k, v in _CACHE.items() if k[:2] == key[:2]), None)
        _CACHE.clear()
        if teacher is None:
            teacher = load_pickle(tpath, "teacher file")
        state = load_state_dict(student_path(out, noise, student_h_size))
        student = student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy(),
                                       preset.nonlinearity, preset.mode)
        unpruned = workflow.rescaled(student)
        _CACHE[key] = (teacher, unpruned, workflow.hidden_gram(teacher, unpruned))
    return _CACHE[key]


def cell_path(out, cell):
    return os.path.join(out, "cells", cell.name + ".npz")


def run_cell(preset, out, cell, seed):
    """Draw, test and store one cell; returns its path. Rounds share nothing but the student."""
    teacher, unpruned, hgram = _load(preset, out, cell.noise, cell.student_h_size)
    w1 = unpruned.w1.weight.detach().double().numpy()
    v = unpruned.w2.weight.detach().double().numpy().ravel()
    q, r, t = order_parameters(w1, teacher.w1.numpy())
    store = dict(unpruned_q=q, unpruned_r=r, t=t, v=v, v_star=teacher.w2.numpy().ravel(),
                 unpruned_loss=workflow.test_loss(teacher, unpruned),
                 unpruned_predicted=float(workflow.predicted_loss(teacher, w1, v)))
    method_index = ALL_METHODS.index(cell.method)
    for rnd in range(preset.rounds):
        _, masks = workflow.prune(teacher, unpruned, cell.method, cell.k, preset.num_masks,
                                  _seed(seed, 2, cell.noise * 100, cell.student_h_size,
                                        method_index, cell.k, rnd))
        for rw in preset.reweighting:
            result = workflow.test_masks(teacher, unpruned, masks, cell.method, bool(rw), hgram,
                                         with_unpruned=False)
            eq, er, _ = order_parameters(result.weights, teacher.w1.numpy())
            tag = f"rw{rw}_round{rnd}"
            store[f"losses_{tag}"] = result.losses
            store[f"predicted_{tag}"] = workflow.predicted_loss(
                teacher, result.weights, result.outs, preset.nonlinearity)
            store[f"eq_{tag}"], store[f"er_{tag}"] = eq.mean(axis=0), er.mean(axis=0)
    path = cell_path(out, cell)
    with atomic_open(path) as f:
        np.savez(f, **store)
    return path


def rows(preset, out, cell):
    """The results.csv rows (one per reweighting and round) of a finished cell."""
    with np.load(cell_path(out, cell)) as z:
        for rw in preset.reweighting:
            for rnd in range(preset.rounds):
                losses = z[f"losses_rw{rw}_round{rnd}"]
                yield dict(noise=cell.noise, student_h_size=cell.student_h_size,
                           method=cell.method, reweighting=rw, k=cell.k,
                           nodes_equivalent=cell.nodes_equivalent,
                           fraction_kept=fraction_kept(cell.method, cell.k, preset.input_dim,
                                                       cell.student_h_size),
                           round=rnd, test_loss=float(losses.mean()),
                           predicted_loss=float(z[f"predicted_rw{rw}_round{rnd}"].mean()),
                           test_loss_std=float(losses.std()),
                           unpruned_test_loss=float(z["unpruned_loss"]),
                           unpruned_predicted_loss=float(z["unpruned_predicted"]))


def write_results(preset, out, cells):
    """Rebuild results.csv from the finished cells (atomically); returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for cell in cells:
        if os.path.exists(cell_path(out, cell)):
            writer.writerows(rows(preset, out, cell))
    path = os.path.join(out, "results.csv")
    with atomic_open(path, "w") as f:
        f.write(buffer.getvalue())
    return path
