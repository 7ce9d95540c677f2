"""The paper's teacher-student experiment grid, as data, and the work units that run it.

A preset fixes the sizes (NOTES.md, "The paper's experiment grid"). A run has S independent
students: student s has its own teachers, data sets and trained networks, all seeded from
--seed and s (recorded in `student_<s>/sigma_<σ>/seeds.json`). Three kinds of work unit:
- a *dataset* (student, noise level, teacher size): generate the teacher and its data, and
  train every panel's student on them (the README's own files, `teacher.pkl` and
  `student_<K>.pth` in `student_<s>/sigma_<σ>/`, so any of them can be fed to the scripts);
- a *cell* (dataset, panel, method, budget, rescaling): draw `rounds` sets of `num_masks`
  masks, test them with and without reweighting, and store per-mask measured and predicted
  test losses and the expected Q and R in `student_<s>/cells/<cell>.npz`;
- an *expectation group* (dataset, panel, rescaling): the expected test loss over the mask
  distribution of every method at every budget of the panel, with and without reweighting,
  computed without sampling (expectations.py), and how the student specialised, in
  `student_<s>/expectations/<group>.npz`.
results.csv (one row per cell, reweighting and round), expectations.csv (one row per
student, method, budget and reweighting) and specialisation.csv are rebuilt from those files.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np

import workflow
from data import generate_teacher
from dpp_sample_ts import KDPP, PRUNERS, edge_kernel
from models import student_from_weights
from order_params import order_parameters
from storage import atomic_open, load_pickle, load_state_dict, save_pickle, save_state_dict

ALL_METHODS = ("dpp_node", "dpp_edge", "random_node", "random_edge", "importance_node",
               "importance_edge")
# methods whose expectations every panel gets (cheap); dpp_edge only where the panel has it
EXPECTED_ALWAYS = ("dpp_node", "random_node", "importance_node", "random_edge",
                   "importance_edge")


class RunFolderError(ValueError):
    """The run folder holds files of another preset, seed or teacher."""


@dataclass(frozen=True)
class Panel:
    student_h_size: int
    methods: tuple
    node_budgets: tuple       # hidden nodes kept; edge methods get the same parameter count
    teacher_h_size: int = None  # M of this panel's teacher; None: the preset's


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
    rescale: tuple = (1,)            # 1: rows rescaled to norm sqrt(N) before pruning; 0: not
    importance_rule: str = "magnitude"


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
class Dataset:
    """One teacher and its data: student set s, noise level, teacher size (None: preset's)."""
    student: int
    noise: float
    teacher_h_size: int = None

    @property
    def folder(self):
        return f"sigma_{self.noise:g}" + ("" if self.teacher_h_size is None
                                          else f"_M{self.teacher_h_size}")


@dataclass(frozen=True)
class Cell:
    noise: float
    student_h_size: int
    method: str
    k: int                    # the --k of teacher_student.py
    nodes_equivalent: int     # the node budget this k matches
    student: int = 0
    rescale: int = 1
    teacher_h_size: int = None

    @property
    def dataset(self):
        return Dataset(self.student, self.noise, self.teacher_h_size)

    @property
    def group(self):
        return Group(self.dataset, self.student_h_size, self.rescale)

    @property
    def name(self):
        return f"{self.group.name}_{self.method}_k{self.k}"


@dataclass(frozen=True)
class Group:
    """The expectation group of one trained student: dataset, panel size, rescaling."""
    dataset: Dataset
    student_h_size: int
    rescale: int = 1

    @property
    def name(self):
        d = self.dataset
        return (f"sigma{d.noise:g}_K{self.student_h_size}"
                + ("" if d.teacher_h_size is None else f"_M{d.teacher_h_size}")
                + ("" if self.rescale else "_rescale0"))


def edge_budget(nodes, input_dim, student_h_size):
    """Weights per node e with K e + K = nodes (N + 1), rounded half up, within 1..N."""
    e = math.floor((nodes * (input_dim + 1) - student_h_size) / student_h_size + 0.5)
    return min(max(e, 1), input_dim)


def budget(method, nodes, input_dim, student_h_size):
    """The --k of `method` that keeps the parameters of `nodes` hidden nodes."""
    if PRUNERS[method].granularity == "node":
        return nodes
    return edge_budget(nodes, input_dim, student_h_size)


def fraction_kept(method, k, input_dim, student_h_size):
    """Fraction of the student's K (N + 1) parameters that a budget keeps."""
    if PRUNERS[method].granularity == "node":
        return k / student_h_size
    return (k + 1) / (input_dim + 1)


def teacher_size(preset, dataset):
    return preset.teacher_h_size if dataset.teacher_h_size is None else dataset.teacher_h_size


def datasets(preset, students=1):
    """Every dataset of a run, student by student."""
    found = []
    for s in range(students):
        for noise in preset.noise_levels:
            for panel in preset.panels:
                d = Dataset(s, float(noise), panel.teacher_h_size)
                if d not in found:
                    found.append(d)
    return found


def panels_of(preset, dataset):
    return [p for p in preset.panels if p.teacher_h_size == dataset.teacher_h_size]


def grid(preset, methods=None, students=1):
    """Every cell of a run, in a stable order (student, noise, panel, rescaling, method,
    budget), so that a worker's consecutive cells share their student."""
    cells = []
    for d in datasets(preset, students):
        for panel in panels_of(preset, d):
            for rescale in preset.rescale:
                for method in panel.methods:
                    if methods and method not in methods:
                        continue
                    for nodes in panel.node_budgets:
                        k = budget(method, nodes, preset.input_dim, panel.student_h_size)
                        cells.append(Cell(d.noise, panel.student_h_size, method, k, nodes,
                                          d.student, rescale, d.teacher_h_size))
    return cells


def groups(preset, students=1):
    """Every expectation group of a run."""
    return [Group(d, panel.student_h_size, rescale) for d in datasets(preset, students)
            for panel in panels_of(preset, d) for rescale in preset.rescale]


# ----------------------------------------------------------------------------------------
# Paths and seeds

def student_dir(out, student):
    return os.path.join(out, f"student_{student}")


def teacher_path(out, dataset):
    return os.path.join(student_dir(out, dataset.student), dataset.folder, "teacher.pkl")


def student_path(out, dataset, student_h_size):
    return os.path.join(student_dir(out, dataset.student), dataset.folder,
                        workflow.student_filename(student_h_size))


def cell_path(out, cell):
    return os.path.join(student_dir(out, cell.student), "cells", cell.name + ".npz")


def group_path(out, group):
    return os.path.join(student_dir(out, group.dataset.student), "expectations",
                        group.name + ".npz")


def _seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _tail(student, teacher_h_size):
    """Seed parts that tell students and teacher sizes apart; empty for student 0 with the
    preset's teacher, whose seeds are those of a single-student run."""
    return ([student] if student else []) + ([teacher_h_size] if teacher_h_size else [])


def teacher_seed(seed, dataset):
    return _seed(seed, 0, *_tail(dataset.student, dataset.teacher_h_size))


def init_seed(seed, dataset, student_h_size):
    return _seed(seed, 1, student_h_size, *_tail(dataset.student, dataset.teacher_h_size))


def mask_seed(seed, cell, rnd):
    return _seed(seed, 2, cell.noise * 100, cell.student_h_size, ALL_METHODS.index(cell.method),
                 cell.k, rnd, *_tail(cell.student, cell.teacher_h_size))


def describe(preset_name, preset, seed):
    """The record of what made a run folder (stored as preset.json). What only adds cells
    under other names (students, rescaling, another teacher size for a panel) is left out,
    so one folder can hold all of them."""
    record = asdict(replace(preset, panels=tuple(replace(p, teacher_h_size=None)
                                                 for p in preset.panels)))
    del record["rescale"]
    return dict(preset=preset_name, seed=seed, **record)


def cell_from_meta(meta):
    return Cell(**json.loads(str(meta)))


def group_from_meta(meta):
    fields = json.loads(str(meta))
    return Group(Dataset(**fields.pop("dataset")), **fields)


def check_record(preset_name, preset, out, seed):
    """Write preset.json in a new folder; refuse a folder made by another preset or seed."""
    record = json.loads(json.dumps(describe(preset_name, preset, seed)))
    path = os.path.join(out, "preset.json")
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        if found != record:
            differ = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
            raise RunFolderError(f"{out} holds a run of another preset or seed ({path} differs in "
                             f"{', '.join(differ)}); use another --out")
    else:
        os.makedirs(out, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------------------
# Work units (each runs in a worker process; all return what they wrote)

def dataset_ready(preset, out, dataset):
    return all(os.path.exists(p) for p in
               [teacher_path(out, dataset)] + [student_path(out, dataset, p.student_h_size)
                                               for p in panels_of(preset, dataset)])


def prepare_dataset(preset, out, dataset, seed):
    """Make (or reuse) the teacher of a dataset and the trained student of each of its
    panels; record their seeds. Returns log lines."""
    _CACHE.clear()           # a worker holds one teacher at a time, also while making one
    lines = []
    path = teacher_path(out, dataset)
    wanted = dict(input_dim=preset.input_dim, teacher_h_size=teacher_size(preset, dataset),
                  num_data=preset.num_data, mode=preset.mode, sig_w=float(dataset.noise),
                  v_star=preset.v_star, seed=teacher_seed(seed, dataset))
    if os.path.exists(path):
        teacher = load_pickle(path, "teacher file")
        if teacher.settings != wanted:
            raise RunFolderError(f"{path} was made with {teacher.settings}, not this preset's "
                                 f"{wanted}; use another --out")
    else:
        lines.append(f"generating {path}")
        teacher = generate_teacher(**wanted)
        save_pickle(teacher, path)
    seeds = {"teacher": wanted["seed"]}
    for panel in panels_of(preset, dataset):
        seeds[f"student_{panel.student_h_size}"] = init_seed(seed, dataset, panel.student_h_size)
        spath = student_path(out, dataset, panel.student_h_size)
        if os.path.exists(spath):
            continue
        lines.append(f"training {spath}")
        student = workflow.train(teacher, panel.student_h_size, preset.nonlinearity, preset.mode,
                                 preset.lr, preset.epochs, 0.0,
                                 seeds[f"student_{panel.student_h_size}"])
        save_state_dict(student.state_dict(), spath)
    # one record per data set, so that workers preparing data sets at once never share one
    record = os.path.join(os.path.dirname(path), "seeds.json")
    if not os.path.exists(record):
        with atomic_open(record, "w") as f:
            json.dump(seeds, f, indent=1, sort_keys=True)
    return lines


@dataclass
class _Pruned:
    """What a worker keeps of one group: its teacher, the student as pruned (rescaled or
    not), that student's hidden-activation Gram, and its dpp_edge samplers once needed."""
    teacher: object
    unpruned: object
    hgram: np.ndarray
    edge_samplers: list = None


_CACHE = {}


def _load(preset, out, group):
    """The group's _Pruned, cached per worker process: one teacher at a time (a worker
    never holds two data sets), with the students of every group of that teacher's dataset."""
    if group not in _CACHE:
        teacher = next((v.teacher for g, v in _CACHE.items() if g.dataset == group.dataset),
                       None)
        if teacher is None:
            _CACHE.clear()
            teacher = load_pickle(teacher_path(out, group.dataset), "teacher file")
        state = load_state_dict(student_path(out, group.dataset, group.student_h_size))
        student = student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy(),
                                       preset.nonlinearity, preset.mode)
        unpruned = workflow.rescaled(student) if group.rescale else student
        _CACHE[group] = _Pruned(teacher, unpruned, workflow.hidden_gram(teacher, unpruned))
    return _CACHE[group]


def _kernels(loaded, method):
    """dpp_edge: the k-DPP sampler of every hidden node, made once per student (one
    eigendecomposition per node serves every round and every budget); other methods: None,
    their strategies build what they need."""
    if method != "dpp_edge":
        return None
    if loaded.edge_samplers is None:
        w1 = loaded.unpruned.w1.weight.detach().double().numpy()
        loaded.edge_samplers = [KDPP(edge_kernel(w, loaded.teacher.gram.numpy())) for w in w1]
    return loaded.edge_samplers


def run_cell(preset, out, cell, seed):
    """Draw, test and store one cell; returns its path. Rounds share nothing but the student."""
    loaded = _load(preset, out, cell.group)
    teacher, unpruned, hgram = loaded.teacher, loaded.unpruned, loaded.hgram
    w1 = unpruned.w1.weight.detach().double().numpy()
    v = unpruned.w2.weight.detach().double().numpy().ravel()
    q, r, t = order_parameters(w1, teacher.w1.numpy())
    store = dict(unpruned_q=q, unpruned_r=r, t=t, v=v, v_star=teacher.w2.numpy().ravel(),
                 unpruned_loss=workflow.test_loss(teacher, unpruned),
                 unpruned_predicted=float(workflow.predicted_loss(teacher, w1, v)))
    for rnd in range(preset.rounds):
        _, masks = workflow.prune(teacher, unpruned, cell.method, cell.k, preset.num_masks,
                                  mask_seed(seed, cell, rnd), _kernels(loaded, cell.method),
                                  rescale=False,
                                  importance_rule=preset.importance_rule)
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
        np.savez(f, meta=json.dumps(asdict(cell)), **store)
    return path


def specialisation(r, v):
    """How a student specialised: r (K, M) student-teacher overlaps, v (K,) outgoing weights.
    Node i serves teacher node argmax_n |R_in|; returns per teacher node the number of
    student nodes (M,), their summed outgoing weight (M,) and the effective weight
    Σ_i v_i sign(R_in) (M,) (a node with w ~ -w*_n and v < 0 serves n as -v)."""
    r = np.asarray(r, dtype=np.float64)
    v = np.ravel(np.asarray(v, dtype=np.float64))
    assign = np.abs(r).argmax(axis=1)                                        # (K,)
    sign = np.sign(r[np.arange(len(v)), assign])
    m = r.shape[1]
    counts = np.bincount(assign, minlength=m)
    summed = np.bincount(assign, weights=v, minlength=m)
    effective = np.bincount(assign, weights=v * sign, minlength=m)
    return counts, summed, effective


def run_group(preset, out, group, seed):
    """Expected test loss of every method at every budget of the group's panel, with and
    without reweighting (NaN where none is derived), and the student's specialisation."""
    loaded = _load(preset, out, group)
    teacher, unpruned, hgram = loaded.teacher, loaded.unpruned, loaded.hgram
    panel = next(p for p in panels_of(preset, group.dataset)
                 if p.student_h_size == group.student_h_size)
    methods = [m for m in ALL_METHODS if m in EXPECTED_ALWAYS or m in panel.methods]
    rows = []
    for method in methods:
        for nodes in panel.node_budgets:
            k = budget(method, nodes, preset.input_dim, panel.student_h_size)
            for rw in preset.reweighting:
                found = workflow.expected_test_loss(teacher, unpruned, method, k, bool(rw), hgram,
                                                    preset.importance_rule,
                                                    _kernels(loaded, method))
                rows.append((ALL_METHODS.index(method), k, nodes, rw)
                            + ((np.nan,) * 3 if found is None
                               else (found.value, found.first_order, found.sd)))
    w1 = unpruned.w1.weight.detach().double().numpy()
    v = unpruned.w2.weight.detach().double().numpy().ravel()
    _, r, _ = order_parameters(w1, teacher.w1.numpy())
    counts, summed, effective = specialisation(r, v)
    path = group_path(out, group)
    with atomic_open(path) as f:
        np.savez(f, meta=json.dumps(asdict(group)), rows=np.array(rows, dtype=np.float64),
                 counts=counts, summed=summed,
                 effective=effective,
                 unpruned_expected=float(workflow.predicted_loss(teacher, w1, v)))
    return path
