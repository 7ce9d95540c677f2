"""Run a study (the paper's grid or your own) on independent students and judge the paper's claims.

    python3 reproduce.py --preset paper --students 5 --jobs 2 --out runs/paper
    python3 reproduce.py --study studies/student_width.toml --scheduler tcp://HOST:8786

A study is a TOML file (studies/*.toml; --preset NAME is studies/NAME.toml) that declares
the whole grid; the flags below override it. Writes results.csv (one row per cell,
reweighting and round), expectations.csv (expected test loss over the mask distribution of
every method and budget, per student), specialisation.csv, and claims.csv / claims.md
(paired differences across students, 95% intervals, verdicts). Reuses the teachers and
trained students already in --out and skips finished work, so an interrupted run resumes
where it stopped, and a later run that adds students or settings adds only their cells.
"""
import collections
import os
import time
from dataclasses import replace

from dpp_pruning.base import cli
from dpp_pruning.base.choices import IMPORTANCE_RULES, PRUNING_CHOICES, SWEEP_PRESETS
from dpp_pruning.experiments import study as studies

# sweep (and with it torch) is imported once the flags are checked: --help answers at once.
RESCALE_CHOICES = {"1": (1,), "0": (0,), "both": (1, 0)}


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, choices=SWEEP_PRESETS,
                        help="smoke (seconds), small (minutes), paper (the paper's sizes): "
                             "studies/<preset>.toml (default: small)")
    source.add_argument("--study", default=None, metavar="FILE.toml",
                        help="a study file declaring the grid (see studies/)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/<study name>)")
    parser.add_argument("--students", type=int, default=None,
                        help="independent teacher/data/student sets, each seeded from --seed "
                             "and its index (default: the study's)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of " + ",".join(PRUNING_CHOICES)
                             + " (default: the study's)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="mask-drawing rounds per cell (default: the study's)")
    parser.add_argument("--num_masks", type=int, default=None,
                        help="masks per round (default: the study's)")
    parser.add_argument("--rescale", default=None, choices=sorted(RESCALE_CHOICES),
                        help="1: rescale rows to norm sqrt(N) before pruning, as the original; "
                             "0: prune the trained student as it is; both (default: the "
                             "study's; the presets': 1)")
    parser.add_argument("--importance_rule", default=None, choices=IMPORTANCE_RULES,
                        help="importance_node keeps the largest |v| (magnitude) or, as the "
                             "original code, the largest signed v (default: the study's; the "
                             "presets': magnitude)")
    parser.add_argument("--k20_teacher_h_size", type=int, default=None,
                        help="teacher hidden size M of the K = 20 panel (default: the study's)")
    parser.add_argument("--keep_data", type=int, default=1, choices=(0, 1),
                        help="1 keeps every teacher data set (1.77 GB each at paper scale); 0 "
                             "deletes each one once its work is done, so that at most --jobs "
                             "are on disk at a time (they are regenerated bit-identically from "
                             "their recorded seeds if needed again) (default: 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: the study's; the presets': 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="work units run in parallel local processes (default: 1)")
    parser.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                        help="run the work units on the workers of this running Dask "
                             "scheduler instead of local processes (see docs/studies.md)")
    return parser.parse_args(argv)


def configure(args):
    """The study with the command line's changes, and the methods asked for (the flags and
    the study file are checked before sweep, and with it torch, is imported)."""
    for flag, value in (("--rounds", args.rounds), ("--num_masks", args.num_masks),
                        ("--k20_teacher_h_size", args.k20_teacher_h_size),
                        ("--students", args.students)):
        if value is not None:
            cli.positive(flag, value)
    cli.positive("--jobs", args.jobs)
    if args.seed is not None:
        cli.seed("--seed", args.seed)
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(PRUNING_CHOICES))
    if unknown:
        raise cli.UserError(f"--methods has unknown method(s) {', '.join(unknown)}; choose from "
                            + ", ".join(PRUNING_CHOICES))
    if args.scheduler is not None and args.jobs != 1:
        raise cli.UserError("--jobs and --scheduler exclude each other: the scheduler's "
                            "workers are the parallel processes")
    try:
        study = (studies.load(args.study) if args.study
                 else studies.preset(args.preset or "small"))
    except studies.StudyError as e:
        raise cli.UserError(str(e)) from None
    overrides = {name: value for name, value in (
        ("rounds", args.rounds), ("num_masks", args.num_masks), ("students", args.students),
        ("seed", args.seed), ("importance_rule", args.importance_rule),
        ("rescale", RESCALE_CHOICES.get(args.rescale))) if value is not None}
    study = replace(study, **overrides)
    if args.k20_teacher_h_size is not None:
        m = args.k20_teacher_h_size
        study = replace(study, teacher_h_sizes=studies.union(study.teacher_h_sizes, (m,)),
                        panels=tuple(replace(p, teacher_h_sizes=(m,) if p.student_h_size == 20
                                             else study.panel_teachers(p))
                                     for p in study.panels))
    try:
        return studies.normalise(study, "the study with the command line's changes"), methods
    except studies.StudyError as e:
        raise cli.UserError(str(e)) from None


def run(study, out, methods=None, jobs=1, keep_data=True, scheduler=None):
    """Run every unfinished unit of the study in `out`; returns its RunTables and the claims
    rows. Holds the folder's lock throughout (one run at a time per folder).

    Data sets are opened (made, then their cells and expectation groups submitted) all at
    once, or with keep_data=False at most `jobs` at a time, each one's teacher file deleted
    as soon as its last unit is done."""
    from dpp_pruning.base import storage
    from dpp_pruning.experiments import executors
    with executors.executor(jobs, scheduler) as pool, \
            storage.folder_lock(out, "reproduce.py run"):
        recorded = studies.claim_folder(study, out)
        return _run(study, recorded, out, methods, pool, keep_data)


def _run(study, recorded, out, methods, pool, keep_data):
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.base.storage import atomic_open
    from dpp_pruning.experiments import claims, sweep
    from dpp_pruning.experiments.run_tables import RunTables, write_csv

    cells = sweep.grid(study, methods)
    groups = sweep.groups(study)
    tables = RunTables(recorded, out)
    work = collections.defaultdict(list)            # dataset -> unfinished cells and groups
    for unit in groups + cells:
        path = (sweep.group_path(out, unit) if isinstance(unit, sweep.Group)
                else sweep.cell_path(out, unit))
        if not os.path.exists(path):
            work[unit.dataset].append(unit)
    unready = [d for d in work if not sweep.dataset_ready(study, out, d)]
    todo = sum(len(units) for units in work.values())
    cli.log.info(f"study '{study.name}', {study.students} student(s): {len(cells)} cells and "
                 f"{len(groups)} expectation groups, {len(cells) + len(groups) - todo} already "
                 f"done, {todo} to run, {len(unready)} data set(s) to make")
    waiting = collections.deque(work)               # data sets not opened yet
    left = {d: len(units) for d, units in work.items()}
    cli.log.info(f"work units run in {pool.description}")
    with Bar(len(unready) + todo, f"{study.name} grid", unit="unit") as bar:
        pending = {}

        def submit_work(dataset):
            for unit in work[dataset]:
                fn = sweep.run_group if isinstance(unit, sweep.Group) else sweep.run_cell
                pending[pool.submit(fn, study, out, unit)] = unit

        def open_next():
            """Make the next data set, or submit its work if it is already made."""
            dataset = waiting.popleft()
            if dataset in unready:
                pending[pool.submit(sweep.prepare_dataset, study, out, dataset)] = dataset
            else:
                submit_work(dataset)

        opened = 0                                  # data sets opened and not finished
        while waiting and (keep_data or opened < pool.slots):
            open_next()
            opened += 1
        while pending:
            for future in pool.next_done(pending):
                unit = pending.pop(future)
                result = future.result()
                bar.update()
                if isinstance(unit, sweep.Dataset):
                    for line in result:
                        cli.log.info(line)
                    submit_work(unit)
                    continue
                tables.add(unit)
                tables.write()
                left[unit.dataset] -= 1
                if left[unit.dataset] == 0 and not keep_data:
                    os.remove(sweep.teacher_path(out, unit.dataset))
                    cli.log.info(f"removed {sweep.teacher_path(out, unit.dataset)} (--keep_data 0)")
                    if waiting:
                        open_next()
    tables.write()
    # claims are judged on the students this run asked for (--students), even where the
    # folder holds more; the tables keep every student
    rows = claims.evaluate(
        [r for r in tables.expectation_rows() if r["student"] < study.students],
        [r for r in tables.result_rows() if r["student"] < study.students])
    write_csv(os.path.join(out, "claims.csv"), claims.CLAIM_COLUMNS, rows)
    with atomic_open(os.path.join(out, "claims.md"), "w") as f:
        f.write(claims.markdown(rows, studies.record(recorded), time.strftime("%Y-%m-%d")))
    return tables, rows


def main(argv=None):
    args = parse_args(argv)
    study, methods = configure(args)
    out = args.out or os.path.join("runs", study.name)
    start = time.time()
    from dpp_pruning.experiments import executors, sweep
    try:
        _, rows = run(study, out, methods, args.jobs, bool(args.keep_data), args.scheduler)
    except (sweep.RunFolderError, studies.StudyError, executors.SchedulerUnreachable) as e:
        raise cli.UserError(str(e)) from None
    counts = collections.Counter(r["verdict"].split(" at ")[0] for r in rows)
    cli.log.info(f"results written to {os.path.join(out, 'results.csv')}; claims on "
                 f"{study.students} student(s): "
                 + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
                 + f" (table: {os.path.join(out, 'claims.md')}); {time.time() - start:.0f} s")


if __name__ == "__main__":
    cli.run(main)
