"""The work units of a study (study.py: the grid, read from a TOML file) and their seeds.

A run has S independent students: student s has its own teachers, data sets and trained
networks, all seeded from the study's seed and s (recorded in
`student_<s>/sigma_<σ>/seeds.json`). Three kinds of work unit:
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
Every unit reads and writes only files under the run folder, so it may run in any process
or on any machine that sees the folder.
"""
import functools
import json
import math
import os
import struct
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpp_pruning.base.data import GramSum, StudyData, TeacherStream, settings_of
from dpp_pruning.base.storage import atomic_open, load_state_dict, save_state_dict
from dpp_pruning.base.training import online_sgd_arrays
from dpp_pruning.experiments.study import edge_weights_exact, noise_name
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory.order_params import order_parameters
from dpp_sample_ts import KDPP, PRUNERS, edge_kernel
from models import activation, student_from_weights

ALL_METHODS = ("dpp_node", "dpp_edge", "random_node", "random_edge", "importance_node",
               "importance_edge")
# methods whose expectations every panel gets (cheap); dpp_edge only where the panel has it
EXPECTED_ALWAYS = ("dpp_node", "random_node", "importance_node", "random_edge",
                   "importance_edge")


class RunFolderError(ValueError):
    """The run folder holds files of another study, seed or teacher."""


class TrainingDiverged(ValueError):
    """Online SGD of a data set's student ended with non-finite weights; one line."""


@dataclass(frozen=True)
class Folder:
    """A run folder as the work units see it: its absolute path, and its identity (the
    token of its study.json), which keys what a worker caches for it."""
    path: str
    id: str


@dataclass(frozen=True)
class Dataset:
    """One teacher and its data: student set s, noise level, teacher size (None: the study's
    own M)."""
    student: int
    noise: float
    teacher_h_size: int = None

    @property
    def folder(self):
        return f"sigma_{noise_name(self.noise)}" + ("" if self.teacher_h_size is None
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
        """Everything that tells this cell from another of its group: method, k and, for
        edge methods (whose k may serve two node budgets), the node budget."""
        nodes = f"_n{self.nodes_equivalent}" if PRUNERS[self.method].granularity == "edge" else ""
        return f"{self.group.name}_{self.method}_k{self.k}{nodes}"


@dataclass(frozen=True)
class Group:
    """The expectation group of one trained student: dataset, panel size, rescaling."""
    dataset: Dataset
    student_h_size: int
    rescale: int = 1

    @property
    def name(self):
        d = self.dataset
        return (f"sigma{noise_name(d.noise)}_K{self.student_h_size}"
                + ("" if d.teacher_h_size is None else f"_M{d.teacher_h_size}")
                + ("" if self.rescale else "_rescale0"))


@dataclass(frozen=True)
class Theory:
    """The N → ∞ theory of one trained student, from seeds alone (theory_rows): data set and
    panel size; its rows cover every rescaling, method, budget and reweighting."""
    dataset: Dataset
    student_h_size: int

    @property
    def name(self):
        return Group(self.dataset, self.student_h_size).name


def edge_budget(nodes, input_dim, student_h_size):
    """Weights per node e with K e + K = nodes (N + 1), rounded half up, within 1..N (a study
    refuses budgets whose e would round to zero: study._check_edge_budget)."""
    e = math.floor(edge_weights_exact(nodes, input_dim, student_h_size) + 0.5)
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


def teacher_size(study, dataset):
    """The teacher size M of a data set (its key holds None for the study's own M)."""
    return study.teacher_h_size if dataset.teacher_h_size is None else dataset.teacher_h_size


def _key_size(study, m):
    return None if m == study.teacher_h_size else m


def datasets(study, students=None):
    """Every dataset of a run, student by student (students: default the study's)."""
    found = []
    for s in range(study.students if students is None else students):
        for noise in study.noise_levels:
            for panel in study.panels:
                for m in study.panel_teachers(panel):
                    d = Dataset(s, float(noise), _key_size(study, m))
                    if d not in found:
                        found.append(d)
    return found


def panels_of(study, dataset):
    m = teacher_size(study, dataset)
    return [p for p in study.panels if m in study.panel_teachers(p)]


def grid(study, methods=None, students=None):
    """Every cell of a run, in a stable order (student, noise, panel, rescaling, method,
    budget), so that a worker's consecutive cells share their student."""
    cells = []
    for d in datasets(study, students):
        for panel in panels_of(study, d):
            for rescale in study.rescale:
                for method in panel.methods:
                    if methods and method not in methods:
                        continue
                    for nodes in panel.node_budgets:
                        k = budget(method, nodes, study.input_dim, panel.student_h_size)
                        cells.append(Cell(d.noise, panel.student_h_size, method, k, nodes,
                                          d.student, rescale, d.teacher_h_size))
    return cells


def theories(study, students=None):
    """Every theory unit of a run (none where the study's theory mode is none)."""
    if study.theory == "none":
        return []
    return [Theory(d, panel.student_h_size) for d in datasets(study, students)
            for panel in panels_of(study, d)]


def groups(study, students=None):
    """Every expectation group of a run."""
    return [Group(d, panel.student_h_size, rescale) for d in datasets(study, students)
            for panel in panels_of(study, d) for rescale in study.rescale]


# ----------------------------------------------------------------------------------------
# Paths and seeds

def student_dir(out, student):
    return os.path.join(out, f"student_{student}")


def student_path(out, dataset, student_h_size):
    return os.path.join(student_dir(out, dataset.student), dataset.folder,
                        workflow.student_filename(student_h_size))


def cell_path(out, cell):
    return os.path.join(student_dir(out, cell.student), "cells", cell.name + ".npz")


def theory_path(out, unit):
    return os.path.join(student_dir(out, unit.dataset.student), "theory", unit.name + ".npz")


def group_path(out, group):
    return os.path.join(student_dir(out, group.dataset.student), "expectations",
                        group.name + ".npz")


# Seeds. Every unit's seeds are a function of its whole setting. The teacher and its inputs
# (key: student, M) and a student's initialisation (student, M, K) are shared by the noise
# levels of one student on purpose: σ is then a paired comparison (only the label noise
# differs). Mask draws are keyed by (student, M, σ, K, method, k, rescaling, round).
#
# Earlier releases drew 32-bit seeds from shorter keys, which collided (student 0's teacher
# of size M had the seeds of student M's own teacher; σ was truncated to int(100 σ)). Their
# seeds are kept where they were sound, so that the presets' results stay as they were:
# for students 0..LEGACY_STUDENTS-1 of the presets' own grids (the study's M, rows
# rescaled, the presets' N, σ, K, methods, budgets and rounds), except units whose 32-bit
# seeds collided with another unit's under the run's seed. Every other unit gets a 64-bit
# seed of its full key, tagged so that it never coincides with a key of the older scheme.

LEGACY_STUDENTS = 100
# N -> (nodes kept, rounds) of the presets as they were; K = 6 had every method, K = 20
# random_edge and dpp_node, both at σ = 0 and 0.25
_LEGACY_GRIDS = {20: ((1, 3, 5), 2), 100: ((1, 2, 3, 4, 5), 3), 500: ((1, 2, 3, 4, 5), 5)}
_LEGACY_PANELS = ((6, ALL_METHODS), (20, ("dpp_node", "random_edge")))
_LEGACY_NOISE = (0.0, 0.25)
_TAG = 0x5EED5EED                    # first word of every key of the current scheme


def _legacy_seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _seed64(seed, kind, *parts):
    """A 64-bit seed from a fixed-length key of 32-bit words; the last part is never 0."""
    words = [_TAG, seed & 0xFFFFFFFF, seed >> 32, kind] + [int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def _noise_words(noise):
    bits = struct.unpack("<Q", struct.pack("<d", float(noise)))[0]
    return bits & 0xFFFFFFFF, bits >> 32


def _legacy_tail(student):
    return [student] if student else []


def _legacy_keys(input_dim):
    """Every key of the older scheme's domain at this N: ("teacher", s), ("init", s, K) and
    ("mask", s, σ, K, method, k, round)."""
    if input_dim not in _LEGACY_GRIDS:
        return []
    nodes, rounds = _LEGACY_GRIDS[input_dim]
    keys = []
    for s in range(LEGACY_STUDENTS):
        keys.append(("teacher", s))
        for size, methods in _LEGACY_PANELS:
            keys.append(("init", s, size))
            for noise in _LEGACY_NOISE:
                for method in methods:
                    for n in nodes:
                        k = budget(method, n, input_dim, size)
                        keys += [("mask", s, noise, size, method, k, r) for r in range(rounds)]
    return keys


def _legacy_value(seed, key):
    kind, s = key[0], key[1]
    if kind == "teacher":
        return _legacy_seed(seed, 0, *_legacy_tail(s))
    if kind == "init":
        return _legacy_seed(seed, 1, key[2], *_legacy_tail(s))
    _, _, noise, size, method, k, rnd = key
    return _legacy_seed(seed, 2, noise * 100, size, ALL_METHODS.index(method), k, rnd,
                        *_legacy_tail(s))


@functools.lru_cache(maxsize=8)
def _legacy_seeds(seed, input_dim):
    """key -> seed of the older scheme, for the keys of its domain whose seed no other key
    of the domain shares."""
    values = {key: _legacy_value(seed, key) for key in _legacy_keys(input_dim)}
    counts = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return {key: v for key, v in values.items() if counts[v] == 1}


def _legacy(study, key, dataset, rescale=1):
    """The older scheme's seed of a key, or None where the current scheme applies."""
    if dataset.teacher_h_size is not None or rescale != 1:
        return None
    return _legacy_seeds(study.seed, study.input_dim).get(key)


def teacher_seed(study, dataset):
    """Seed of a data set's teacher and inputs (shared by its student's noise levels)."""
    found = _legacy(study, ("teacher", dataset.student), dataset)
    return found if found is not None else _seed64(
        study.seed, 0, dataset.student, teacher_size(study, dataset))


def init_seed(study, dataset, student_h_size):
    """Seed of the initial student of K hidden nodes on a data set's teacher."""
    found = _legacy(study, ("init", dataset.student, student_h_size), dataset)
    return found if found is not None else _seed64(
        study.seed, 1, dataset.student, student_h_size, teacher_size(study, dataset))


def mask_seed(study, cell, rnd):
    """Seed of round `rnd` of a cell's mask draws."""
    key = ("mask", cell.student, cell.noise, cell.student_h_size, cell.method, cell.k, rnd)
    found = _legacy(study, key, cell.dataset, cell.rescale)
    return found if found is not None else _seed64(
        study.seed, 2, cell.student, *_noise_words(cell.noise), cell.student_h_size,
        ALL_METHODS.index(cell.method), cell.k, cell.rescale, rnd,
        teacher_size(study, cell.dataset))


def cell_from_meta(meta):
    return Cell(**json.loads(str(meta)))


def theory_from_meta(meta):
    fields = json.loads(str(meta))
    return Theory(Dataset(**fields.pop("dataset")), **fields)


def group_from_meta(meta):
    fields = json.loads(str(meta))
    return Group(Dataset(**fields.pop("dataset")), **fields)


# ----------------------------------------------------------------------------------------
# Work units (each runs in a worker process; all return what they wrote)
#
# A data set's files: data.npz (StudyData: the teacher, the test set and the Gram matrix of
# the training inputs; the training samples are never stored, they stream from the seed),
# student_<K>.pth (the README's weights file of each panel's trained student) and
# hidden_<K>.npz (its hidden-activation Gram matrix on the training inputs, rows rescaled and
# not, which node reweighting fits on).

KEEP_BYTES = 2 << 30   # a data set's training inputs up to this size stay in memory between
#                        its passes instead of being drawn again


def data_path(out, dataset):
    return os.path.join(student_dir(out, dataset.student), dataset.folder, "data.npz")


def hidden_path(out, dataset, student_h_size):
    return os.path.join(student_dir(out, dataset.student), dataset.folder,
                        f"hidden_{student_h_size}.npz")


HIDDEN_ARRAYS = ("rescale1", "rescale0")


def _usable(path, arrays):
    """Whether `path` is a readable .npz (or torch zip) file holding `arrays` (names, for
    .npz files): present, not truncated, its archive's checksums sound."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            return archive.testzip() is None and {f"{a}.npy" for a in arrays} <= names
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def dataset_ready(study, out, dataset):
    """Whether a data set's files are all there and readable."""
    sizes = [p.student_h_size for p in panels_of(study, dataset)]
    return (_usable(data_path(out, dataset), StudyData.ARRAYS)
            and all(_usable(student_path(out, dataset, k), ()) for k in sizes)
            and all(_usable(hidden_path(out, dataset, k), HIDDEN_ARRAYS) for k in sizes))


def teacher_settings(study, dataset):
    """The generate_teacher (and TeacherStream) arguments of a data set; as recorded in its
    settings, they say what made the data set."""
    wanted = dict(input_dim=study.input_dim, teacher_h_size=teacher_size(study, dataset),
                  num_data=study.num_data, mode=study.mode, sig_w=float(dataset.noise),
                  v_star=study.v_star, seed=teacher_seed(study, dataset))
    if study.test_size is not None:
        wanted["num_test"] = study.test_size
    return wanted


def _stream(study, dataset):
    keep = 4 * study.num_data * study.input_dim <= KEEP_BYTES
    return TeacherStream(**teacher_settings(study, dataset), keep=keep)


def _read_data(study, out, dataset):
    """The data set's StudyData, or None when its file is missing or unreadable (then it is
    made again). RunFolderError when it was made with other settings."""
    path = data_path(out, dataset)
    try:
        data = StudyData.load(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    wanted = settings_of(**teacher_settings(study, dataset))
    if data.settings != wanted:
        raise RunFolderError(f"{path} was made with {data.settings}, not this study's "
                             f"{wanted}; use another --out")
    return data


def _make_data(stream, gram, rows):
    x, y = stream.test_set()
    return StudyData(stream.w1, stream.w2, gram.mean(rows), x, y, stream.settings)


def hidden_grams(stream, students):
    """{K: {rescale: H (K, K)}}: H = AᵀA / P, A = g(X Wᵀ / √N) the hidden activations of each
    student of `students` ({K: models.Student}) on the stream's training inputs, all in one
    pass, summed in float64: with the student's rows rescaled to norm √N as pruning stores
    them (workflow.rescaled) for rescale 1, as trained for 0 (workflow.hidden_gram of each,
    chunk by chunk)."""
    weights, sums = {}, {}
    for size, student in students.items():
        for rescale, pruned in ((1, workflow.rescaled(student)), (0, student)):
            weights[size, rescale] = (activation(student.nonlinearity),
                                      pruned.w1.weight.detach().double())
            sums[size, rescale] = torch.zeros(size, size, dtype=torch.float64)
    for x, _ in stream.chunks():
        x64 = x.double()
        for key, (g, w) in weights.items():
            a = g(x64 @ w.T / math.sqrt(w.shape[1]))
            sums[key] += a.T @ a
    found = {size: {} for size in students}
    for (size, rescale), total in sums.items():
        found[size][rescale] = (total / stream.num_data).numpy()
    return found


def prepare_dataset(study, out, dataset):
    """Make (or reuse) a data set's data.npz, the trained student of each of its panels and
    their hidden Gram matrices, in as few passes over the streamed training samples as
    possible (one per epoch, all students trained side by side chunk by chunk, then one for
    all their hidden Gram matrices); record their seeds (seeds.json lists every student the folder
    holds for this data set, also those of panels added later). Returns log lines. Raises
    RunFolderError for data of other settings, TrainingDiverged for a training that
    diverged."""
    _CACHE.clear()           # a worker holds one data set at a time, also while making one
    lines = []
    folder = os.path.dirname(data_path(out, dataset))

    def usable(path, arrays=()):
        """Whether a file can be used; a line saying so where it is there but cannot."""
        if _usable(path, arrays):
            return True
        if os.path.exists(path):
            lines.append(f"{path} is not used (it cannot be read: truncated or damaged); it "
                         "is made again")
        return False
    data = (_read_data(study, out, dataset) if usable(data_path(out, dataset), StudyData.ARRAYS)
            else None)
    stream = _stream(study, dataset)
    seeds = {"teacher": stream.settings["seed"]}
    train = {}                                            # K -> [w1, w2] being trained
    for panel in panels_of(study, dataset):
        size = panel.student_h_size
        seeds[f"student_{size}"] = init_seed(study, dataset, size)
        if not usable(student_path(out, dataset, size)):
            start = workflow.initial_student(study.input_dim, size, study.nonlinearity,
                                             study.mode, seeds[f"student_{size}"])
            train[size] = [start.w1.weight.detach().double().numpy(),
                           start.w2.weight.detach().double().numpy().ravel()]
    gram = GramSum(study.input_dim) if data is None else None
    if data is None:
        lines.append(f"generating {data_path(out, dataset)}")
    lines += [f"training {student_path(out, dataset, size)}" for size in train]
    for epoch in range(study.epochs if train else (1 if data is None else 0)):
        for x, y in stream.chunks():
            if epoch == 0 and gram is not None:
                gram.add(x)
            for weights in train.values():
                weights[:] = online_sgd_arrays(*weights, x, y, study.lr,
                                               nonlinearity=study.nonlinearity,
                                               train_w2=study.mode != "soft_committee")
    for size, (w1, w2) in train.items():
        if not (np.isfinite(w1).all() and np.isfinite(w2).all()):
            raise TrainingDiverged(
                f"training diverged (non-finite weights) for the student of K = {size} on "
                f"data set {folder} (lr {study.lr:g}, v_star {study.v_star:g}, noise "
                f"{dataset.noise:g}); use a smaller lr or v_star")
    if data is None:
        with atomic_open(data_path(out, dataset)) as f:
            _make_data(stream, gram, study.num_data).save(f)
    for size, (w1, w2) in train.items():
        student = student_from_weights(w1, w2, study.nonlinearity, study.mode)
        save_state_dict(student.state_dict(), student_path(out, dataset, size))
    missing = {p.student_h_size: _trained(study, out, dataset, p.student_h_size)
               for p in panels_of(study, dataset) if p.student_h_size in train
               or not usable(hidden_path(out, dataset, p.student_h_size), HIDDEN_ARRAYS)}
    for size, grams in hidden_grams(stream, missing).items() if missing else ():
        with atomic_open(hidden_path(out, dataset, size)) as f:
            np.savez(f, **{name: grams[int(name[-1])] for name in HIDDEN_ARRAYS})
    _record_seeds(os.path.join(folder, "seeds.json"), seeds)
    return lines


def _trained(study, out, dataset, student_h_size):
    state = load_state_dict(student_path(out, dataset, student_h_size))
    return student_from_weights(state["w1.weight"].numpy(), state["w2.weight"].numpy(),
                                study.nonlinearity, study.mode)


def _record_seeds(path, seeds):
    """Add `seeds` to the data set's seeds.json (one record per data set, so that workers
    preparing data sets at once never share one); rewritten only when something is new."""
    recorded = {}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    if any(recorded.get(k) != v for k, v in seeds.items()):
        with atomic_open(path, "w") as f:
            json.dump(dict(recorded, **seeds), f, indent=1, sort_keys=True)


@dataclass
class _Pruned:
    """What a worker keeps of one group: its data set, the student as pruned (rescaled or
    not), that student's hidden-activation Gram on the training inputs, and, once needed,
    its dpp_edge samplers, its hidden activations on the test set (T, K) and its test loss."""
    teacher: StudyData
    unpruned: object
    hgram: np.ndarray
    edge_samplers: list = None
    test_activations: torch.Tensor = None
    unpruned_loss: float = None


_CACHE = {}   # (run folder's identity, group) -> _Pruned


def _load(study, folder, group):
    """The group's _Pruned, cached per worker process and keyed by the run folder's identity
    and the group (a folder made again at the same path has another identity): one data set
    at a time (a worker never holds two), with the students of every group of that data
    set. A data file that is not there (another machine's disk, or removed by --keep_data 0)
    is made again from its seeds, bit-identically, in this process only."""
    out = folder.path
    key = (folder.id, group)
    if key not in _CACHE:
        data = next((v.teacher for (f, g), v in _CACHE.items()
                     if (f, g.dataset) == (folder.id, group.dataset)), None)
        if data is None:
            _CACHE.clear()
            data = _read_data(study, out, group.dataset)
        if data is None:
            stream, gram = _stream(study, group.dataset), GramSum(study.input_dim)
            for x, _ in stream.chunks():
                gram.add(x)
            data = _make_data(stream, gram, study.num_data)
        student = _trained(study, out, group.dataset, group.student_h_size)
        unpruned = workflow.rescaled(student) if group.rescale else student
        with np.load(hidden_path(out, group.dataset, group.student_h_size)) as z:
            hgram = z[f"rescale{group.rescale}"]
        _CACHE[key] = _Pruned(data, unpruned, hgram)
    return _CACHE[key]


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


def _test_losses(loaded, method, keep, weights, outs):
    """The test loss (B,) of every pruned student (weights (B, K, N), outs (B, K) from
    workflow.apply_masks): node masks only select hidden units (keep (B, K)), so their
    losses come from the unpruned student's hidden activations on the test set, computed
    once per student; edge masks test every masked network (a cell's masks in one batch)."""
    data = loaded.teacher
    if PRUNERS[method].granularity == "node":
        if loaded.test_activations is None:
            loaded.test_activations = workflow.test_activations(data, loaded.unpruned)
        return workflow.loss_of_outputs(loaded.test_activations, data.test_labels,
                                        outs * keep)
    return workflow.test_weights(data, weights, outs, loaded.unpruned.nonlinearity)


def run_cell(study, folder, cell):
    """Draw, test and store one cell; returns its path. Rounds share nothing but the student.
    Each round's masks come from its own seed; all rounds are then tested together."""
    loaded = _load(study, folder, cell.group)
    data, unpruned, hgram = loaded.teacher, loaded.unpruned, loaded.hgram
    w1 = unpruned.w1.weight.detach().double().numpy()
    v = unpruned.w2.weight.detach().double().numpy().ravel()
    if loaded.unpruned_loss is None:
        loaded.unpruned_loss = workflow.test_loss(data, unpruned)
    q, r, t = order_parameters(w1, data.w1.numpy())
    store = dict(unpruned_q=q, unpruned_r=r, t=t, v=v, v_star=data.w2.numpy().ravel(),
                 unpruned_loss=loaded.unpruned_loss,
                 unpruned_predicted=float(workflow.predicted_loss(data, w1, v)))
    masks = []
    for rnd in range(study.rounds):
        _, drawn = workflow.prune(data, unpruned, cell.method, cell.k, study.num_masks,
                                  mask_seed(study, cell, rnd), _kernels(loaded, cell.method),
                                  rescale=False, importance_rule=study.importance_rule)
        masks += drawn
    keep = np.stack(masks).any(axis=1)                                      # (B, K)
    for rw in study.reweighting:
        weights, outs = workflow.apply_masks(data, unpruned, masks, cell.method, bool(rw),
                                             hgram)
        losses = _test_losses(loaded, cell.method, keep, weights, outs)
        predicted = workflow.predicted_loss(data, weights, outs, study.nonlinearity)
        eq, er, _ = order_parameters(weights, data.w1.numpy())
        for rnd in range(study.rounds):
            tag, part = f"rw{rw}_round{rnd}", slice(rnd * study.num_masks,
                                                    (rnd + 1) * study.num_masks)
            store[f"losses_{tag}"], store[f"predicted_{tag}"] = losses[part], predicted[part]
            store[f"eq_{tag}"], store[f"er_{tag}"] = eq[part].mean(axis=0), er[part].mean(axis=0)
    path = cell_path(folder.path, cell)
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


def expectation_methods(panel):
    """The methods whose expectations a panel's group computes: the panel's own, and every
    method but dpp_edge (cheap: exact sums and marginals), whatever the panel simulates, so
    that claims can compare methods at budgets the panel does not sample (docs/studies.md)."""
    return [m for m in ALL_METHODS if m in EXPECTED_ALWAYS or m in panel.methods]


def group_panel(study, group):
    return next(p for p in panels_of(study, group.dataset)
                if p.student_h_size == group.student_h_size)


def group_rows(study, group):
    """The (method index, k, nodes kept, reweighting) rows a group's file must hold."""
    panel = group_panel(study, group)
    return [(ALL_METHODS.index(method), budget(method, nodes, study.input_dim,
                                              panel.student_h_size), nodes, rw)
            for method in expectation_methods(panel) for nodes in panel.node_budgets
            for rw in study.reweighting]


def run_group(study, folder, group):
    """Expected test loss of every method at every budget of the group's panel, with and
    without reweighting (NaN where none is derived), the N → ∞ pruning theory at the
    student's own order parameters beside it, and the student's specialisation. The study
    is the run folder's record, so that a grown panel's group covers all its cells."""
    from dpp_pruning.experiments import theory_rows
    loaded = _load(study, folder, group)
    teacher, unpruned, hgram = loaded.teacher, loaded.unpruned, loaded.hgram
    w1 = unpruned.w1.weight.detach().double().numpy()
    v = unpruned.w2.weight.detach().double().numpy().ravel()
    # the pruning theory at N → ∞ at this student's own order parameters (no training ODE)
    theory = theory_rows.theory_at(study, group_panel(study, group), w1, v,
                                   teacher.w1.numpy(), teacher.w2.numpy().ravel(),
                                   group.dataset.noise, rescale=0)
    rows = []
    for m, k, nodes, rw in group_rows(study, group):
        method = ALL_METHODS[m]
        found = workflow.expected_test_loss(teacher, unpruned, method, k, bool(rw), hgram,
                                            study.importance_rule, _kernels(loaded, method))
        rows.append((m, k, nodes, rw) + ((np.nan,) * 3 if found is None
                                         else (found.value, found.first_order, found.sd))
                    + (theory[(method, nodes, rw)],))
    _, r, _ = order_parameters(w1, teacher.w1.numpy())
    counts, summed, effective = specialisation(r, v)
    path = group_path(folder.path, group)
    with atomic_open(path) as f:
        np.savez(f, meta=json.dumps(asdict(group)), rows=np.array(rows, dtype=np.float64),
                 counts=counts, summed=summed,
                 effective=effective,
                 unpruned_expected=float(workflow.predicted_loss(teacher, w1, v)))
    return path


def theory_wanted(study, unit):
    """The (rescale, method index, nodes kept, reweighting) rows a theory unit's file must
    hold: every method of sweep.ALL_METHODS (the theory is cheap for all of them)."""
    panel = group_panel(study, Group(unit.dataset, unit.student_h_size))
    return [(rescale, m, nodes, rw) for rescale in study.rescale
            for m in range(len(ALL_METHODS)) for nodes in panel.node_budgets
            for rw in study.reweighting]


def run_theory(study, folder, unit):
    """The N → ∞ theory of one data set and panel: the training ODEs from the seeded start to
    α_end, then the pruning theory of every method, budget, reweighting and rescaling
    (theory_rows); stores the rows, the unpruned student's loss and the ODEs' final order
    parameters. Needs no data set."""
    from dpp_pruning.experiments import theory_rows
    trajectory = theory_rows.trained_order_parameters(study, unit.dataset, unit.student_h_size)
    panel = group_panel(study, Group(unit.dataset, unit.student_h_size))
    losses = {rescale: theory_rows.theory_losses(study, panel, trajectory.q[-1],
                                                 trajectory.r[-1], trajectory.t,
                                                 trajectory.v[-1], trajectory.v_star,
                                                 unit.dataset.noise, rescale)
              for rescale in study.rescale}
    rows = [(rescale, m, nodes, rw, losses[rescale][(ALL_METHODS[m], nodes, rw)])
            for rescale, m, nodes, rw in theory_wanted(study, unit)]
    path = theory_path(folder.path, unit)
    with atomic_open(path) as f:
        np.savez(f, meta=json.dumps(asdict(unit)), rows=np.array(rows, dtype=np.float64),
                 unpruned_theory=float(trajectory.test_loss[-1]), q=trajectory.q[-1],
                 r=trajectory.r[-1], t=trajectory.t, v=trajectory.v[-1],
                 v_star=trajectory.v_star, alpha=trajectory.alpha[-1])
    return path
