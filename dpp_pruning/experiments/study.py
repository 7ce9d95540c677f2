"""A study: the whole grid of a reproduce.py run, declared in a TOML file.

    [study]     name, description
    [data]      input_dim (N), num_data (P), test_size, mode, teacher_h_sizes (M), v_star,
                noise_levels (σ)
    [training]  lr, epochs, nonlinearity
    [masks]     rounds, num_masks, reweighting
    [variants]  rescale, importance_rule
    [run]       students, seed
    [theory]    mode: beside (the N → ∞ theory beside the simulation), only, none
    [sizes]     input_dims, samples_per_dim: one study per N with P = samples_per_dim · N
                (a finite-size study: [data] then names neither input_dim nor num_data)
    [[panels]]  student_h_size (K), methods, nodes_kept or fractions_kept, teacher_h_sizes

studies/smoke.toml, small.toml and paper.toml are the presets (`--preset NAME`). A file is
checked whole before anything is written: an unknown key, a wrong type, a value out of
range or an empty list is one StudyError naming the file, the key and what is allowed.
The run folder keeps the study, normalised (study.json); a later run on the folder may
only add cells to it (see `merge`).
"""
import json
import math
import os
import re
import tomllib
import uuid
from dataclasses import asdict, dataclass, replace

from dpp_pruning import ROOT
from dpp_pruning.base.choices import EDGE_CHOICES, IMPORTANCE_RULES, MODES, PRUNING_CHOICES
from dpp_pruning.base.cli import FLOAT32_MAX

STUDIES_DIR = os.path.join(ROOT, "studies")
RECORD = "study.json"
THEORY_MODES = ("beside", "only", "none")
# a study's name is one path component (its default folder is runs/<name>)
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def canonical_noise(value):
    """The one form of a noise level σ used everywhere (file names, seeds, merges, tables):
    the exact float, with -0.0 read as 0.0."""
    return float(value) + 0.0


def noise_name(noise):
    """σ as it appears in file and folder names: the shortest of `{σ:g}` and repr(σ) that
    reads back as the same float, so that two levels never share a name."""
    noise = canonical_noise(noise)
    short = f"{noise:g}"
    return short if float(short) == noise else repr(noise)


def edge_weights_exact(nodes, input_dim, student_h_size):
    """e with K e + K = nodes (N + 1): the weights per node that keep the parameters of
    `nodes` hidden nodes (before rounding)."""
    return (nodes * (input_dim + 1) - student_h_size) / student_h_size


class StudyError(ValueError):
    """A study file (or a run folder's study record) that cannot be run; one line."""


@dataclass(frozen=True)
class Panel:
    """Students of K hidden nodes, pruned by `methods` at `node_budgets` (hidden nodes kept;
    edge methods keep the same parameter count), on the teachers of `teacher_h_sizes`
    (None: every teacher size of the study)."""
    student_h_size: int
    methods: tuple
    node_budgets: tuple
    teacher_h_sizes: tuple = None


@dataclass(frozen=True)
class Study:
    input_dim: int
    num_data: int
    noise_levels: tuple
    panels: tuple
    rounds: int = 5
    num_masks: int = 20
    teacher_h_sizes: tuple = (2,)    # the first is the study's own teacher size
    test_size: int = None            # None: num_data // 10, as teacher_dataset.py
    v_star: float = 4
    lr: float = 0.5
    epochs: int = 1
    reweighting: tuple = (0, 1)
    mode: str = "normal"
    nonlinearity: str = "sigmoid"
    rescale: tuple = (1,)            # 1: rows rescaled to norm sqrt(N) before pruning; 0: not
    importance_rule: str = "magnitude"
    students: int = 1
    seed: int = 1
    theory: str = "beside"           # THEORY_MODES: the N → ∞ theory beside the simulation,
    #                                  only the theory (no data, no SGD), or none
    input_dims: tuple = ()           # a finite-size study: one study per N (`sizes`), with
    samples_per_dim: int = None      # P = samples_per_dim · N; input_dim is the first N
    name: str = "study"
    description: str = ""

    @property
    def teacher_h_size(self):
        """The study's own teacher size M (data sets of other sizes are named by theirs)."""
        return self.teacher_h_sizes[0]

    @property
    def num_test(self):
        return self.num_data // 10 if self.test_size is None else self.test_size

    def panel_teachers(self, panel):
        return self.teacher_h_sizes if panel.teacher_h_sizes is None else panel.teacher_h_sizes


# ----------------------------------------------------------------------------------------
# Reading and checking a file

class _Checker:
    """Checks one value of a study file; every failure names the file and the key."""

    def __init__(self, source):
        self.source = source

    def fail(self, key, message):
        raise StudyError(f"{self.source}: {key} {message}")

    def integer(self, key, value, low=None, high=None):
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = (f"in {low}..{high}" if high is not None else f"at least {low}")
            self.fail(key, f"must be {allowed}, got {value}")
        return value

    def number(self, key, value, low=None, strict=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value!r}")
        if low is not None and (value < low or (strict and value == low)):
            self.fail(key, f"must be {'positive' if strict else 'non-negative'}, got {value}")
        return float(value)

    def float32(self, key, value):
        """A finite number that float32 holds (the teacher's weights are float32)."""
        value = self.number(key, value)
        if abs(value) > FLOAT32_MAX:
            self.fail(key, f"must be at most {FLOAT32_MAX:.3g} in magnitude (float32), got "
                           f"{value:g}")
        return value

    def choice(self, key, value, allowed):
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value

    def text(self, key, value):
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {value!r}")
        return value

    def name(self, key, value):
        self.text(key, value)
        if not NAME.fullmatch(value) or value in (".", ".."):
            self.fail(key, f"must be one folder name (letters, digits, '-', '_', '.'; not "
                           f"'.' or '..'), got {value!r}")
        return value

    def items(self, key, value, check):
        """A non-empty list without repeats, each item checked by check(item_key, item)."""
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {value!r}")
        if not value:
            self.fail(key, "must not be empty")
        found = [check(f"{key}[{i}]", item) for i, item in enumerate(value)]
        if len(set(found)) < len(found):
            self.fail(key, f"repeats a value: {value}")
        return found


def _flag(c, key, value):
    return c.integer(key, value, 0, 1)


# section -> key -> (Study field, check(checker, key, value) -> value); [[panels]] apart
SCHEMA = {
    "study": {"name": ("name", lambda c, k, v: c.name(k, v)),
              "description": ("description", lambda c, k, v: c.text(k, v))},
    "data": {"input_dim": ("input_dim", lambda c, k, v: c.integer(k, v, 2)),
             "num_data": ("num_data", lambda c, k, v: c.integer(k, v, 10)),
             "test_size": ("test_size", lambda c, k, v: c.integer(k, v, 1)),
             "mode": ("mode", lambda c, k, v: c.choice(k, v, MODES)),
             "teacher_h_sizes": ("teacher_h_sizes", lambda c, k, v: tuple(
                 c.items(k, v, lambda kk, x: c.integer(kk, x, 1, 1000)))),
             "v_star": ("v_star", lambda c, k, v: c.float32(k, v)),
             "noise_levels": ("noise_levels", lambda c, k, v: tuple(sorted(
                 c.items(k, v, lambda kk, x: canonical_noise(c.number(kk, c.float32(kk, x),
                                                                       0.0))))))},
    "training": {"lr": ("lr", lambda c, k, v: c.number(k, v, 0.0, strict=True)),
                 "epochs": ("epochs", lambda c, k, v: c.integer(k, v, 1)),
                 # the order-parameter theory (expectations, predicted losses) is for erf
                 "nonlinearity": ("nonlinearity", lambda c, k, v: c.choice(k, v, ("sigmoid",)))},
    "masks": {"rounds": ("rounds", lambda c, k, v: c.integer(k, v, 1)),
              "num_masks": ("num_masks", lambda c, k, v: c.integer(k, v, 1)),
              "reweighting": ("reweighting", lambda c, k, v: tuple(sorted(
                  c.items(k, v, lambda kk, x: _flag(c, kk, x)))))},
    "variants": {"rescale": ("rescale", lambda c, k, v: tuple(sorted(
                     c.items(k, v, lambda kk, x: _flag(c, kk, x)), reverse=True))),
                 "importance_rule": ("importance_rule",
                                     lambda c, k, v: c.choice(k, v, IMPORTANCE_RULES))},
    "run": {"students": ("students", lambda c, k, v: c.integer(k, v, 1)),
            "seed": ("seed", lambda c, k, v: c.integer(k, v, 0, 2**63 - 1))},
    "theory": {"mode": ("theory", lambda c, k, v: c.choice(k, v, THEORY_MODES))},
    "sizes": {"input_dims": ("input_dims", lambda c, k, v: tuple(sorted(
                  c.items(k, v, lambda kk, x: c.integer(kk, x, 2))))),
              "samples_per_dim": ("samples_per_dim", lambda c, k, v: c.integer(k, v, 1))},
}
REQUIRED = (("data", "input_dim"), ("data", "num_data"), ("data", "noise_levels"))
PANEL_KEYS = ("student_h_size", "methods", "nodes_kept", "fractions_kept", "teacher_h_sizes")


def _panel(c, key, table, input_dim):
    if not isinstance(table, dict):
        c.fail(key, f"must be a table ([[panels]]), got {table!r}")
    unknown = sorted(set(table) - set(PANEL_KEYS))
    if unknown:
        c.fail(f"{key}.{unknown[0]}", f"is not a panel key; allowed: {', '.join(PANEL_KEYS)}")
    if "student_h_size" not in table:
        c.fail(f"{key}.student_h_size", "is required")
    size = c.integer(f"{key}.student_h_size", table["student_h_size"], 2, 1000)
    methods = table.get("methods", "all")
    if methods == "all":
        methods = list(PRUNING_CHOICES)
    chosen = set(c.items(f"{key}.methods", methods,
                         lambda kk, m: c.choice(kk, m, tuple(PRUNING_CHOICES) + ("all",))))
    if "all" in chosen:
        c.fail(f"{key}.methods", "is either \"all\" or a list of methods, not both")
    if ("nodes_kept" in table) == ("fractions_kept" in table):
        c.fail(key, "needs one of nodes_kept (hidden nodes kept) or fractions_kept (fraction of "
                    "the student's parameters kept)")
    budget_key = "nodes_kept" if "nodes_kept" in table else "fractions_kept"
    if "nodes_kept" in table:
        nodes = c.items(f"{key}.nodes_kept", table["nodes_kept"],
                        lambda kk, x: c.integer(kk, x, 1, size))
    else:
        nodes = c.items(f"{key}.fractions_kept", table["fractions_kept"],
                        lambda kk, f: _nodes_of_fraction(c, kk, f, size))
    if chosen & set(EDGE_CHOICES):
        for j, n in enumerate(nodes):
            _check_edge_budget(c, f"{key}.{budget_key}[{j}]", n, input_dim, size)
    teachers = None
    if "teacher_h_sizes" in table:
        teachers = tuple(c.items(f"{key}.teacher_h_sizes", table["teacher_h_sizes"],
                                 lambda kk, x: c.integer(kk, x, 1, 1000)))
    return Panel(size, tuple(m for m in PRUNING_CHOICES if m in chosen), tuple(sorted(nodes)),
                 teachers)


def _check_edge_budget(c, key, nodes, input_dim, size):
    """Edge methods keep e weights per node, e the nearest whole number to
    edge_weights_exact; a budget whose e would round to zero cannot be met."""
    exact = edge_weights_exact(nodes, input_dim, size)
    if exact < 0.5:
        c.fail(key, f"keeps {nodes} of the {size} hidden nodes ({nodes * (input_dim + 1)} "
                    f"parameters), which edge methods would match with {exact:.3g} weights per "
                    f"node (K e + K = nodes (N + 1)), fewer than one; drop this budget, list "
                    "only node methods in this panel, or use a larger input_dim")


def _nodes_of_fraction(c, key, fraction, size):
    """The whole number of hidden nodes whose parameters are `fraction` of the student's."""
    fraction = c.number(key, fraction, 0.0, strict=True)
    nodes = round(fraction * size)
    if not 1 <= nodes <= size or abs(fraction * size - nodes) > 1e-9:
        c.fail(key, f"must keep a whole number of the {size} hidden nodes (a multiple of "
                    f"1/{size} in (0, 1]), got {fraction}")
    return nodes


def parse(text, source):
    """The Study a TOML text declares (source names it in errors)."""
    c = _Checker(source)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{source}: not valid TOML ({e})") from None
    values = {}
    for section, content in table.items():
        if section == "panels":
            continue
        if section not in SCHEMA:
            c.fail(section, "is not a section; allowed: " + ", ".join(list(SCHEMA) + ["panels"]))
        if not isinstance(content, dict):
            c.fail(section, f"must be a table ([{section}]), got {content!r}")
        for key, value in content.items():
            if key not in SCHEMA[section]:
                c.fail(f"{section}.{key}", f"is not a key of [{section}]; allowed: "
                                           + ", ".join(SCHEMA[section]))
            field, check = SCHEMA[section][key]
            values[field] = check(c, f"{section}.{key}", value)
    if "sizes" in table:
        _sizes(c, table, values)
    for section, key in REQUIRED:
        if key not in table.get(section, {}) and not ("sizes" in table
                                                     and (section, key) in SIZED):
            c.fail(f"{section}.{key}", "is required")
    panels = table.get("panels")
    if panels is None:
        c.fail("panels", "is required: at least one [[panels]] table")
    if not isinstance(panels, list) or not panels:
        c.fail("panels", "must be one or more [[panels]] tables")
    for n in values.get("input_dims") or (values["input_dim"],):
        values["panels"] = tuple(_panel(c, f"panels[{i}]", p, n) for i, p in enumerate(panels))
    if values.get("test_size") == values["num_data"] // 10 and "sizes" not in table:
        values["test_size"] = None
    return normalise(Study(**values), source)


SIZED = (("data", "input_dim"), ("data", "num_data"))     # set by [sizes] when it is given


def _sizes(c, table, values):
    """A finite-size study's [sizes]: both keys, and [data] without input_dim or num_data;
    the study's own input_dim and num_data are those of its first size."""
    for key in ("input_dims", "samples_per_dim"):
        if key not in table["sizes"]:
            c.fail(f"sizes.{key}", "is required")
    for section, key in SIZED:
        if key in table.get(section, {}):
            c.fail(f"{section}.{key}", "must not be given with [sizes] (each size sets it: "
                                       "P = samples_per_dim · N)")
    values["input_dim"] = values["input_dims"][0]
    values["num_data"] = values["samples_per_dim"] * values["input_dim"]
    if values["num_data"] < 10:
        c.fail("sizes.samples_per_dim", f"gives {values['num_data']} samples at N = "
                                        f"{values['input_dim']}; at least 10 are needed")


def sizes(study):
    """The studies of a finite-size study, one per input dimension N (named <name>_N<N>,
    with P = samples_per_dim · N), or [study] itself for a study of one size."""
    if not study.input_dims:
        return [study]
    found = []
    for n in study.input_dims:
        num_data = study.samples_per_dim * n
        test_size = None if study.test_size == num_data // 10 else study.test_size
        found.append(replace(study, input_dim=n, num_data=num_data, test_size=test_size,
                             input_dims=(), samples_per_dim=None, name=f"{study.name}_N{n}"))
    return found


def normalise(study, source="the study"):
    """The study with each panel's teacher sizes None where they are all of the study's,
    checked: no two panels with the same K on one teacher size."""
    study = replace(study, panels=tuple(
        replace(p, teacher_h_sizes=None) if p.teacher_h_sizes is not None
        and set(p.teacher_h_sizes) == set(study.teacher_h_sizes) else p for p in study.panels))
    _check_panels(_Checker(source), study)
    return study


def _check_panels(c, study):
    """No two panels with the same K share a teacher size (their cells would coincide), and
    a panel's teacher sizes are among the study's."""
    seen = set()
    for i, panel in enumerate(study.panels):
        for m in study.panel_teachers(panel):
            if m not in study.teacher_h_sizes:
                c.fail(f"panels[{i}].teacher_h_sizes", f"lists {m}, which is not one of "
                       f"data.teacher_h_sizes {list(study.teacher_h_sizes)}")
            if (panel.student_h_size, m) in seen:
                c.fail(f"panels[{i}]", f"repeats student_h_size {panel.student_h_size} on the "
                                       f"teacher of size {m}; merge the two panels")
            seen.add((panel.student_h_size, m))


def load(path):
    """The Study in a TOML file; its name defaults to the file's stem."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise StudyError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: is not UTF-8 text") from None
    study = parse(text, path)
    if study.name == "study":
        stem = os.path.splitext(os.path.basename(path))[0]
        if not NAME.fullmatch(stem):
            raise StudyError(f"{path}: the file's name gives the study no valid name ({stem!r}"
                             "); set [study] name to one folder name (letters, digits, '-', "
                             "'_', '.')")
        study = replace(study, name=stem)
    return study


def preset(name):
    """The preset `name`: studies/<name>.toml."""
    return load(os.path.join(STUDIES_DIR, f"{name}.toml"))


# ----------------------------------------------------------------------------------------
# The run folder's record

# what the folder's cells mean: a later run must agree on all of these
FOLDER_ID = "folder_id"     # study.json's key of the folder's identity
CORE = ("input_dim", "num_data", "test_size", "mode", "v_star", "lr", "epochs", "nonlinearity",
        "rounds", "num_masks", "reweighting", "importance_rule", "seed", "teacher_h_size")


def record(study):
    """The study as plain JSON data, normalised (sorted lists, fractions as nodes)."""
    data = asdict(study)
    data["teacher_h_size"] = study.teacher_h_size
    return json.loads(json.dumps(data))


def from_record(data):
    data = {k: v for k, v in data.items() if k not in ("teacher_h_size", FOLDER_ID)}
    panels = tuple(Panel(p["student_h_size"], tuple(p["methods"]), tuple(p["node_budgets"]),
                         None if p["teacher_h_sizes"] is None else tuple(p["teacher_h_sizes"]))
                   for p in data.pop("panels"))
    data["noise_levels"] = tuple(canonical_noise(x) for x in data["noise_levels"])
    return Study(panels=panels, **{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in data.items()})


def union(old, new):
    return tuple(old) + tuple(x for x in new if x not in old)


def merge(old, new, where):
    """The study of a folder that held `old` and is now run with `new`: `new` may only add
    (or leave out) cells: more students, noise levels, teacher sizes, panels, methods,
    budgets or rescalings. Anything that changes the meaning of cells already there raises
    StudyError naming the keys."""
    a, b = record(old), record(new)
    differ = [k for k in CORE if a[k] != b[k]]
    if differ:
        raise StudyError(f"{where} holds a run of another study or seed (it differs in "
                         f"{', '.join(differ)}); use another --out")
    single = {}                          # (K, M) -> panel on that one teacher size
    for st in (old, new):
        for p in st.panels:
            for m in st.panel_teachers(p):
                q = single.get((p.student_h_size, m))
                if q is not None:
                    p = replace(q, methods=tuple(x for x in PRUNING_CHOICES
                                                 if x in q.methods or x in p.methods),
                                node_budgets=tuple(sorted(set(q.node_budgets)
                                                          | set(p.node_budgets))))
                single[(p.student_h_size, m)] = replace(p, teacher_h_sizes=(m,))
    panels = {}                          # regroup the teacher sizes of equal panels
    for (size, m), p in single.items():
        key = (size, p.methods, p.node_budgets)
        panels[key] = replace(p, teacher_h_sizes=(panels[key].teacher_h_sizes + (m,)
                                                  if key in panels else (m,)))
    merged = replace(old, students=max(old.students, new.students), theory=new.theory,
                     noise_levels=tuple(sorted(set(old.noise_levels) | set(new.noise_levels))),
                     teacher_h_sizes=union(old.teacher_h_sizes, new.teacher_h_sizes),
                     rescale=tuple(sorted(set(old.rescale) | set(new.rescale), reverse=True)),
                     panels=tuple(panels.values()))
    return normalise(merged, f"{where} with this run's study")


def claim_folder(study, out):
    """(study, folder id) of run folder `out` once `study` runs there: the study `merge`d
    with what the folder held, and the folder's identity, a random token made with the
    folder's record and kept for its life (a folder removed and made again at the same path
    gets another, so that nothing cached for the old one is used for it). Both are written
    to its study.json. A folder of an earlier release (preset.json) is read as the preset it
    names."""
    old, folder_id = _read_folder(out)
    if old is None:
        old = _read_preset_record(out)
    merged = study if old is None else merge(old, study, out)
    if merged != old or folder_id is None:
        folder_id = folder_id or uuid.uuid4().hex
        from dpp_pruning.base.storage import atomic_open
        with atomic_open(os.path.join(out, RECORD), "w") as f:
            json.dump(dict(record(merged), **{FOLDER_ID: folder_id}), f, indent=1)
    return merged, folder_id


def _read_preset_record(out):
    """The study of an earlier release's preset.json (None if there is none)."""
    path = os.path.join(out, "preset.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        panels = tuple(Panel(p["student_h_size"],
                             tuple(m for m in PRUNING_CHOICES if m in p["methods"]),
                             tuple(p["node_budgets"])) for p in data["panels"])
        return Study(input_dim=data["input_dim"], num_data=data["num_data"],
                     noise_levels=tuple(data["noise_levels"]), panels=panels,
                     rounds=data["rounds"], num_masks=data["num_masks"],
                     teacher_h_sizes=(data["teacher_h_size"],), v_star=data["v_star"],
                     lr=data["lr"], epochs=data["epochs"],
                     reweighting=tuple(data["reweighting"]), mode=data["mode"],
                     nonlinearity=data["nonlinearity"],
                     importance_rule=data.get("importance_rule", "magnitude"),
                     seed=data["seed"], name=data["preset"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path} is not a preset record ({e}); use another --out") from None


def _read_folder(out):
    """(study, folder id) recorded in a run folder; (None, None) if it has no record, and
    folder id None for a record written before folders had one."""
    path = os.path.join(out, RECORD)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            data = json.load(f)
        return from_record(data), data.get(FOLDER_ID)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path} is not a study record ({e}); use another --out") from None


def read_record(out):
    """The study recorded in a run folder (None if it has none)."""
    return _read_folder(out)[0]
