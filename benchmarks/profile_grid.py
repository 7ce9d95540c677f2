#!/usr/bin/env python3
"""Where the paper's grid spends its time: the work units of one student, per phase and per
method, timed and profiled on one thread, for this checkout or another (an earlier release).

    python3 benchmarks/profile_grid.py [--root PATH] [--scale paper|small|smoke]
                                       [--out FILE.md] [--compare OTHER_ROOT]

Not part of the test suite. The profile study: one student, σ = 0, teacher M = 2; the K = 6
panel with every method at 3 nodes kept and the K = 20 panel with dpp_node and random_edge
at 15% (3 nodes); 5 rounds of 20 masks, reweighting 0 and 1, rows rescaled (STUDY below).
--scale paper: N = 500, P = 800,000 (a few minutes; the teacher data set is 1.8 GB in memory
and on disk); small: N = 100, P = 160,000; smoke: N = 20, P = 32,000.

The project at --root (default: this checkout; `git worktree add /tmp/prev <commit>` gives
an earlier release) runs in a subprocess with only that root on PYTHONPATH, in a temporary
folder (under $TMPDIR), with torch and every BLAS on one thread as the project's units run
(executors.one_thread). Its units run in a run's order (runner.py): the data set, the
expectation groups, the cells; then the tables (run_tables.RunTables(...).write(), once on
the finished folder) and the claims. Each is one phase, timed (wall seconds, cProfile on)
and profiled with cProfile; the data set is split from its profile into drawing the data,
the Gram matrix, the training of each student and the writing of its files.

For each phase the table gives its seconds and its top 3 functions by cumulative time: the
project's own functions other than the phase's entry point, skipping those that pass 80% or
more of their time on to other project functions (run_cell, prune, draw_masks, _load: the
functions they call stand for them) and those called by or calling one already listed, so
that the three name where the time goes (e.g. "6.20 s dpp_sample_ts.sample_projection_dpp
(600 calls)"); library calls count in the project function that makes them.

Before profiling, each root runs the smoke-scale study once in a subprocess of its own, with
the same numba cache folder (NUMBA_CACHE_DIR, a temporary one per root), so that no phase
includes numba's compilation: every root loads its compiled kernels from the cache, as a
worker does once a run has compiled them.

The unit functions' signatures differ between releases: 4cae933 and before take the run
folder's path (`run_cell(study, out, cell)`), later ones `sweep.Folder(path, id)`; the
profiled code is called accordingly (by the presence of sweep.Folder).

--compare OTHER_ROOT profiles OTHER_ROOT (the baseline of every ratio), then --root, on the
same study in one invocation, and prints one table with both times per phase and their
ratio (baseline / this), the machine (CPU model), the load average before and after, the
date and the commit of each root. --out writes the report as Markdown (default: print only).
"""
import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(SCRIPT))

SCALES = {"paper": (500, 800000), "small": (100, 160000), "smoke": (20, 32000)}   # N, P

STUDY = """\
[study]
name = "profile"
description = "One student of the paper's grid at one budget per panel, for profiling."

[data]
input_dim = {input_dim}
num_data = {num_data}
mode = "normal"
teacher_h_sizes = [2]
v_star = 4
noise_levels = [0.0]

[training]
lr = 0.5
epochs = 1
nonlinearity = "sigmoid"

[masks]
rounds = 5
num_masks = 20
reweighting = [0, 1]

[variants]
rescale = [1]
importance_rule = "magnitude"

[run]
students = 1
seed = 1

[[panels]]
student_h_size = 6
methods = "all"
nodes_kept = [3]

[[panels]]
student_h_size = 20
methods = ["random_edge", "dpp_node"]
fractions_kept = [0.15]
"""

PASS_ON = 0.8      # a function with this share of its time in other project functions is skipped
TOP = 3            # functions listed per phase


# =============================================================================================
# The profiled process (--child): runs the units of the profile study of one root.

class CallGraph:
    """One phase's cProfile statistics as a call graph: pstats' {function: (primitive calls,
    calls, own s, cumulative s, {caller: (.., .., .., cumulative s of that caller's calls)})},
    functions keyed (file, line, name); the profiled root's files are the project's."""

    def __init__(self, stats, root):
        self.stats = stats
        self.prefixes = tuple({os.path.abspath(root) + os.sep, os.path.realpath(root) + os.sep})
        self.children = collections.defaultdict(dict)       # caller -> {callee: cumulative s}
        for function, (_, _, _, _, callers) in stats.items():
            for caller, edge in callers.items():
                self.children[caller][function] = edge[3]

    def project(self, function):
        return function[0].startswith(self.prefixes) and function[0] != SCRIPT

    def cumulative(self, function):
        return self.stats[function][3]

    def passes_on(self, function):
        """Whether `function` spends PASS_ON or more of its time in other project functions
        (or this script's): an orchestrator such as run_cell, prune, draw_masks or _load."""
        inner = sum(s for callee, s in self.children[function].items()
                    if callee != function and (self.project(callee) or callee[0] == SCRIPT))
        return inner >= PASS_ON * self.cumulative(function)

    def reach(self, function, links):
        """Every function reachable from `function` through `links` (function -> iterable)."""
        seen, todo = set(), [function]
        while todo:
            for other in links(todo.pop()):
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
        return seen

    def top(self, entry, count=TOP):
        """[(name, cumulative s, calls)] of the `count` functions that say where the phase's
        time goes (module docstring): project functions other than `entry`, by cumulative
        time, skipping orchestrators and functions related by calls to one already listed."""
        candidates = sorted((f for f in self.stats if self.project(f) and f != entry
                             and self.cumulative(f) > 0 and not self.passes_on(f)),
                            key=self.cumulative, reverse=True)
        chosen, related = [], set()
        for function in candidates:
            if function in related:
                continue
            chosen.append(function)
            related |= self.reach(function, lambda f: self.children[f])
            related |= self.reach(function, lambda f: self.stats[f][4] if f in self.stats else ())
            if len(chosen) == count:
                break
        return [(display(f), self.cumulative(f), self.stats[f][1]) for f in chosen]

    def numba_dispatch(self):
        """Seconds numba spent readying kernels on their first call in this process (compiling,
        or loading them from its cache)."""
        return sum(self.cumulative(f) for f in self.stats
                   if f[2] == "_compile_for_args" and f"{os.sep}numba{os.sep}" in f[0])

    def find(self, module, name):
        """The project functions `name` of file `module`.py."""
        return [f for f in self.stats if self.project(f) and f[2] == name
                and os.path.basename(f[0]) == module + ".py"]

    def total(self, module, name):
        """Cumulative seconds of the project functions `name` of `module`.py; None if none ran."""
        found = self.find(module, name)
        return sum(self.cumulative(f) for f in found) if found else None

    def builtin_time(self, module, caller, methods):
        """Seconds of the builtin functions or methods named in `methods` when called by the
        project function `caller` of `module`.py; None if that caller did not run."""
        callers = self.find(module, caller)
        if not callers:
            return None
        return sum(s for c in callers for callee, s in self.children[c].items()
                   if callee[0] == "~" and builtin_name(callee[2]) in methods)


def builtin_name(text):
    """The bare name of a builtin in cProfile's notation: "<method 'addmm_' of ...>" ->
    addmm_, "<built-in method torch.matmul>" -> matmul."""
    found = re.match(r"<method '([^']+)' of|<built-in method ([\w.]+)>", text)
    return (found.group(1) or found.group(2)).rsplit(".", 1)[-1] if found else text


def display(function):
    """module.function of a project function (file stem and name)."""
    return f"{os.path.splitext(os.path.basename(function[0]))[0]}.{function[2]}"


def dataset_parts(graph, trained, total):
    """The data set unit split: [(label, seconds or None, what was counted)], the rest last.
    Releases up to 5fb7826 draw the whole data set (data.generate_teacher, its Gram by
    torch's addmm in data._fill), train each student on it (workflow.train) and write the
    teacher pickle; later ones stream it (data.draw_chunks, data.GramSum.add), train every
    student side by side (training.online_sgd_arrays), make the hidden Gram matrices in a
    second pass (sweep.hidden_grams) and write data.npz (data.StudyData.save)."""
    streamed = graph.total("data", "draw_chunks") is not None and trained == []
    if streamed:
        parts = [("drawing the data", graph.total("data", "draw_chunks"),
                  "data.draw_chunks (inputs and labels, every pass)"),
                 ("Gram matrix", graph.total("data", "add"), "data.GramSum.add (dsyrk)"),
                 ("training every student", graph.total("training", "online_sgd_arrays"),
                  "training.online_sgd_arrays, the panels' students side by side"),
                 ("hidden Gram matrices", graph.total("sweep", "hidden_grams"),
                  "sweep.hidden_grams: one more pass (its inputs kept in memory up to "
                  "sweep.KEEP_BYTES, else drawn again: then that drawing counts here too)")]
        writing = [graph.total("data", "save"), graph.total("storage", "save_state_dict")]
        what = "data.StudyData.save (data.npz) and save_state_dict (students)"
    else:
        teacher = graph.total("data", "generate_teacher")
        gram = graph.builtin_time("data", "_fill", ("addmm_", "to"))
        drawing = None if teacher is None or gram is None else teacher - gram
        parts = [("drawing the data", drawing, "data.generate_teacher less the Gram matrix"),
                 ("Gram matrix", gram, "TensorBase.addmm_ and .to(float64) in data._fill")]
        parts += [(f"training K = {k}", s, "workflow.train: online SGD, one epoch")
                  for k, s in trained]
        writing = [graph.total("storage", "save_pickle"),
                   graph.total("storage", "save_state_dict")]
        what = "storage.save_pickle (teacher) and save_state_dict (students)"
    writing = [s for s in writing if s is not None]
    parts.append(("writing the files", sum(writing) if writing else None, what))
    known = [s for _, s, _ in parts if s is not None]
    parts.append(("the rest", total - sum(known), "seeds, checks, what the above miss"))
    return parts


def profile_units(root, scale):
    """Run and profile every unit of the profile study at `scale` in ./run; returns the
    result as JSON data (phases in the order they ran)."""
    import cProfile
    import pstats

    import dpp_pruning
    import dpp_sample_ts
    import models
    from dpp_pruning.base.storage import atomic_open
    from dpp_pruning.experiments import claims, run_tables, sweep
    from dpp_pruning.experiments import study as studies
    if os.path.exists(os.path.join(root, "dpp_pruning", "pipeline", "workflow.py")):
        from dpp_pruning.pipeline import workflow
    else:                                   # releases before the move keep it in base/
        from dpp_pruning.base import workflow

    for module in (dpp_pruning, dpp_sample_ts, models, workflow):
        if not os.path.realpath(module.__file__).startswith(os.path.realpath(root) + os.sep):
            raise SystemExit(f"imported {module.__name__} from {module.__file__}, not from {root}")
    package = os.path.dirname(os.path.realpath(dpp_pruning.__file__))

    input_dim, num_data = SCALES[scale]
    study = studies.parse(STUDY.format(input_dim=input_dim, num_data=num_data),
                          f"the profile study ({scale})")
    out = os.path.abspath("run")
    os.makedirs(out)
    claimed = studies.claim_folder(study, out)
    takes_folder = hasattr(sweep, "Folder")
    if takes_folder:            # run_cell(study, sweep.Folder(path, id), cell)
        recorded, folder_id = claimed
        folder = sweep.Folder(out, folder_id)
    else:                       # 4cae933 and before: run_cell(study, out, cell)
        recorded, folder = claimed, out
    phases = []

    def phase(key, label, fn, *args, parts=None):
        profiler = cProfile.Profile()
        wall, cpu = time.perf_counter(), time.process_time()
        profiler.enable()
        try:
            result = fn(*args)
        finally:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        graph = CallGraph(pstats.Stats(profiler).stats, root)
        code = fn.__code__
        entry = (code.co_filename, code.co_firstlineno, code.co_name)
        found = dict(key=key, label=label, seconds=wall, cpu_seconds=cpu,
                     top=graph.top(entry), numba_seconds=graph.numba_dispatch())
        if parts is not None:
            found["parts"] = parts(graph, wall)
        phases.append(found)
        print(f"  {label}: {wall:.2f} s", file=sys.stderr, flush=True)
        return result

    dataset, = sweep.datasets(study)
    trained = []                                   # (K, seconds) of every workflow.train
    train = workflow.train

    def timed_train(teacher, student_h_size, *args, **kwargs):
        start = time.perf_counter()
        try:
            return train(teacher, student_h_size, *args, **kwargs)
        finally:
            trained.append((student_h_size, time.perf_counter() - start))

    workflow.train = timed_train
    try:
        phase("dataset", f"data set (teacher, {num_data:,} + {study.num_test:,} samples, Gram, "
              f"{len(study.panels)} students)", sweep.prepare_dataset, study, out, dataset,
              parts=lambda graph, wall: dataset_parts(graph, trained, wall))
    finally:
        workflow.train = train
    data_file = (sweep.teacher_path(out, dataset) if hasattr(sweep, "teacher_path")
                 else sweep.data_path(out, dataset))
    teacher_bytes = os.path.getsize(data_file)
    for group in sweep.groups(study):
        phase(f"group K{group.student_h_size}", f"expectation group K = {group.student_h_size}",
              sweep.run_group, recorded, folder, group)
    for unit in (sweep.theories(study) if hasattr(sweep, "theories") else []):
        phase(f"theory K{unit.student_h_size}", f"theory unit K = {unit.student_h_size}",
              sweep.run_theory, recorded, folder, unit)
    for cell in sweep.grid(study):
        phase(f"cell K{cell.student_h_size} {cell.method} k{cell.k}",
              f"cell K = {cell.student_h_size} {cell.method} k = {cell.k}",
              sweep.run_cell, recorded, folder, cell)

    def write_tables():
        tables = run_tables.RunTables(recorded, out)
        tables.write()
        return tables

    def write_claims(tables):
        rows = claims.evaluate(tables.expectation_rows(), tables.result_rows())
        run_tables.write_csv(os.path.join(out, "claims.csv"), claims.CLAIM_COLUMNS, rows)
        with atomic_open(os.path.join(out, "claims.md"), "w") as f:
            f.write(claims.markdown(rows, studies.record(recorded), time.strftime("%Y-%m-%d")))

    tables = phase("tables", "tables (RunTables(...).write() on the finished folder)",
                   write_tables)
    phase("claims", "claims (evaluate, claims.csv, claims.md)", write_claims, tables)
    return dict(input_dim=input_dim, num_data=num_data, num_test=study.num_test,
                teacher_bytes=teacher_bytes, package=package,
                units_take="sweep.Folder(path, id)" if takes_folder else "the folder's path",
                phases=phases)


def child(args):
    """The profiled process: the root's project on sys.path (PYTHONPATH), one thread."""
    here = os.path.dirname(SCRIPT)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]
    import threadpoolctl
    import torch

    import dpp_pruning.experiments.sweep  # noqa: F401 - load numpy, scipy, torch's BLAS first
    torch.set_num_threads(1)
    started = time.perf_counter()
    with threadpoolctl.threadpool_limits(1):
        blas = max((lib["num_threads"] for lib in threadpoolctl.threadpool_info()), default=1)
        result = profile_units(args.root, args.scale)
    result.update(torch_threads=torch.get_num_threads(), blas_threads=blas,
                  wall=time.perf_counter() - started)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


# =============================================================================================
# The parent: one child per root, then the report.

def run_child(root, scale, work, numba_cache):
    """Profile `root` at `scale` in a subprocess (a fresh folder under `work`); its JSON."""
    folder = tempfile.mkdtemp(prefix="child_", dir=work)
    path = os.path.join(folder, "profile.json")
    env = dict(os.environ, PYTHONPATH=root, NUMBA_CACHE_DIR=numba_cache, OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, SCRIPT, "--child", "--root", root, "--scale",
                               scale, "--json", path], cwd=folder, env=env,
                              stdout=sys.stderr, check=False)
        if done.returncode != 0:
            raise SystemExit(f"profiling {root} at scale {scale} failed (exit "
                             f"{done.returncode}); its output is above")
        with open(path) as f:
            return json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def git_commit(root):
    """Short commit of `root`'s HEAD, marked where tracked files differ from it."""
    def git(*args):
        found = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                               check=False)
        return found.stdout.strip() if found.returncode == 0 else None
    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "not a git checkout"
    return commit + (" with uncommitted changes" if git("status", "--porcelain",
                                                        "--untracked-files=no") else "")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def seconds(value):
    return "—" if value is None else f"{value:.2f}"


def where(phase):
    """The top functions of a phase, or the rule of a data set part."""
    found = "; ".join(f"{s:.2f} s {name}" + (f" ({calls} calls)" if calls > 1 else "")
                      for name, s, calls in phase["top"])
    if phase.get("numba_seconds", 0) >= 0.01:
        found += f"; numba readying kernels (first calls): {phase['numba_seconds']:.2f} s"
    return found


def rows_of(result):
    """{row key: (label, seconds, where)} of one root, in the order the phases ran, the
    data set's parts after it, and the total of every phase last."""
    rows = {}
    for phase in result["phases"]:
        rows[phase["key"]] = (phase["label"], phase["seconds"], where(phase))
        for label, s, how in phase.get("parts", ()):
            rows[f"{phase['key']}: {label}"] = (f"data set: {label}", s, how)
    rows["total"] = ("total of the phases", sum(p["seconds"] for p in result["phases"]), "")
    return rows


def report(args, results, facts):
    """The Markdown report: `results` is [(root, result)], the baseline first with --compare."""
    scale = args.scale
    first = results[-1][1]
    lines = [f"# Profile of the paper's grid per phase, scale {scale} (N = "
             f"{first['input_dim']}, P = {first['num_data']:,})", "",
             f"- Date {facts['date']}; machine: {facts['cpu']}, {os.cpu_count()} cores; load "
             f"average before {facts['load_before']}, after {facts['load_after']}.",
             "- Study: one student, σ = 0, M = 2; K = 6 with every method at 3 nodes kept, "
             "K = 20 with dpp_node and random_edge at 15% (3 nodes); 5 rounds × 20 masks, "
             "reweighting 0 and 1; test set "
             f"{first['num_test']:,} samples; teacher file "
             f"{first['teacher_bytes'] / 1e6:,.0f} MB.",
             "- Each phase: wall seconds on one thread (torch and BLAS), cProfile on, the units "
             "in a run's order (the data set, the expectation groups, the cells) in one "
             "process, numba's kernels loaded from a cache filled by a smoke-scale run first. "
             "Top functions: by cumulative time, the project's own, past the orchestrators "
             "(benchmarks/profile_grid.py)."]
    for role, (root, result) in zip(("baseline" if len(results) > 1 else "profiled", "this"),
                                    results, strict=False):
        cpu = sum(p["cpu_seconds"] for p in result["phases"])
        wall = sum(p["seconds"] for p in result["phases"])
        lines.append(f"- {role}: {root} (commit {facts['commits'][root]}; units take "
                     f"{result['units_take']}); threads: torch {result['torch_threads']}, BLAS "
                     f"{result['blas_threads']}; CPU / wall over the phases {cpu / wall:.2f}; "
                     f"whole process {result['wall']:.1f} s.")
    lines.append("")
    if len(results) == 1:
        lines += ["| phase | s | where (top functions by cumulative time) |", "|---|---|---|"]
        for label, s, how in rows_of(first).values():
            lines.append(f"| {label} | {seconds(s)} | {how} |")
        return "\n".join(lines) + "\n"
    (base_root, base), (_, this) = results
    ours, theirs = rows_of(this), rows_of(base)
    keys = list(theirs) + [k for k in ours if k not in theirs]
    lines += [f"Ratio: baseline / this, the baseline being {base_root}.", "",
              "| phase | baseline s | this s | baseline / this | where (this) | "
              "where (baseline) |", "|---|---|---|---|---|---|"]
    for key in keys:
        label, b, how_b = theirs.get(key, (None, None, ""))
        label_t, t, how_t = ours.get(key, (label, None, ""))
        ratio = f"{b / t:.2f}" if b is not None and t else "—"
        lines.append(f"| {label or label_t} | {seconds(b)} | {seconds(t)} | {ratio} | {how_t} "
                     f"| {how_b} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--root", default=ROOT,
                        help="the project checkout to profile (default: this one)")
    parser.add_argument("--scale", choices=("paper", "small", "smoke"), default="paper",
                        help="paper: N = 500, P = 800000; small: N = 100, P = 160000; "
                             "smoke: N = 20, P = 32000 (default: paper)")
    parser.add_argument("--out", default=None, help="write the report as Markdown here")
    parser.add_argument("--compare", default=None, metavar="OTHER_ROOT",
                        help="also profile this checkout, the baseline of every ratio")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    if args.child:
        child(args)
        return 0
    roots = [os.path.abspath(args.compare)] if args.compare else []
    roots.append(args.root)
    for root in roots:
        if not os.path.exists(os.path.join(root, "dpp_pruning", "experiments", "sweep.py")):
            parser.error(f"{root} is not a checkout of this project (no "
                         "dpp_pruning/experiments/sweep.py)")
    facts = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 cpu=cpu_model(), commits={root: git_commit(root) for root in roots},
                 load_before=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = []
    with tempfile.TemporaryDirectory(prefix="profile_grid_") as work:
        caches = {root: os.path.join(work, f"numba_cache_{i}") for i, root in enumerate(roots)}
        for root in roots:
            print(f"{root}: smoke-scale run (fills the numba cache)", file=sys.stderr)
            run_child(root, "smoke", work, caches[root])
        for root in roots:
            print(f"{root}: profiling at scale {args.scale}", file=sys.stderr)
            results.append((root, run_child(root, args.scale, work, caches[root])))
    facts["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(args, results, facts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
