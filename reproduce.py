"""Run the paper's teacher-student grid on independent students and judge the paper's claims.

    python3 reproduce.py --preset paper --students 5 --jobs 2 --out runs/paper

Writes results.csv (one row per cell, reweighting and round), expectations.csv (expected test
loss over the mask distribution of every method and budget, per student), specialisation.csv,
and claims.csv / claims.md (paired differences across students, 95% intervals, verdicts).
Reuses the teachers and trained students already in --out and skips finished work, so an
interrupted run resumes where it stopped, and a later run with more --students adds students.
"""
import collections
import concurrent.futures
import multiprocessing
import os
import time
from dataclasses import replace

import cli
from choices import IMPORTANCE_RULES, PRUNING_CHOICES, SWEEP_PRESETS

# sweep (and with it torch) is imported once the flags are checked: --help answers at once.
RESCALE_CHOICES = {"1": (1,), "0": (0,), "both": (1, 0)}


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=SWEEP_PRESETS,
                        help="smoke (seconds), small (minutes), paper (the paper's sizes)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    parser.add_argument("--students", type=int, default=1,
                        help="independent teacher/data/student sets, each seeded from --seed "
                             "and its index (default: 1)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of " + ",".join(PRUNING_CHOICES)
                             + " (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="mask-drawing rounds per cell (default: the preset's)")
    parser.add_argument("--num_masks", type=int, default=None,
                        help="masks per round (default: the preset's)")
    parser.add_argument("--rescale", default="1", choices=sorted(RESCALE_CHOICES),
                        help="1: rescale rows to norm sqrt(N) before pruning, as the original; "
                             "0: prune the trained student as it is; both (default: 1)")
    parser.add_argument("--importance_rule", default="magnitude", choices=IMPORTANCE_RULES,
                        help="importance_node keeps the largest |v| (magnitude) or, as the "
                             "original code, the largest signed v (default: magnitude)")
    parser.add_argument("--k20_teacher_h_size", type=int, default=None,
                        help="teacher hidden size M of the K = 20 panel (default: the preset's, 2)")
    parser.add_argument("--keep_data", type=int, default=1, choices=(0, 1),
                        help="1 keeps every teacher data set (1.77 GB each at paper scale); 0 "
                             "deletes each one once its work is done, so that at most --jobs "
                             "are on disk at a time (they are regenerated bit-identically from "
                             "their recorded seeds if needed again) (default: 1)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="work units run in parallel processes (default: 1)")
    return parser.parse_args(argv)


def configure(args):
    """The preset with the command line's changes, and the methods asked for (the flags are
    checked before sweep, and with it torch, is imported)."""
    for flag, value in (("--rounds", args.rounds), ("--num_masks", args.num_masks),
                        ("--k20_teacher_h_size", args.k20_teacher_h_size)):
        if value is not None:
            cli.positive(flag, value)
    cli.positive("--jobs", args.jobs)
    cli.positive("--students", args.students)
    cli.seed("--seed", args.seed)
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(PRUNING_CHOICES))
    if unknown:
        raise cli.UserError(f"--methods has unknown method(s) {', '.join(unknown)}; choose from "
                            + ", ".join(PRUNING_CHOICES))
    import sweep
    preset = sweep.PRESETS[args.preset]
    if args.rounds is not None:
        preset = replace(preset, rounds=args.rounds)
    if args.num_masks is not None:
        preset = replace(preset, num_masks=args.num_masks)
    preset = replace(preset, rescale=RESCALE_CHOICES[args.rescale],
                     importance_rule=args.importance_rule)
    if args.k20_teacher_h_size is not None:
        size = (None if args.k20_teacher_h_size == preset.teacher_h_size
                else args.k20_teacher_h_size)
        preset = replace(preset, panels=tuple(
            replace(p, teacher_h_size=size) if p.student_h_size == 20 else p
            for p in preset.panels))
    return preset, methods


def _worker_init():
    """One thread per worker: the parallelism is across work units."""
    import threadpoolctl
    import torch
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)


class _Serial:
    """Runs submitted work in this process, in order, one unit per `next_done`."""

    def __init__(self):
        self._queue = collections.deque()

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        self._queue.append((future, fn, args))
        return future

    def next_done(self, pending):
        future, fn, args = self._queue.popleft()
        future.set_result(fn(*args))
        return [future]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Parallel:
    """Runs submitted work in `jobs` worker processes."""

    def __init__(self, jobs):
        self._pool = concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def next_done(self, pending):
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(cancel_futures=True)
        return False


def run(preset_name, preset, out, seed, methods=None, students=1, jobs=1, keep_data=True):
    """Run every unfinished unit of the run; returns its RunTables and the claims rows.

    Data sets are opened (made, then their cells and expectation groups submitted) all at
    once, or with keep_data=False at most `jobs` at a time, each one's teacher file deleted
    as soon as its last unit is done."""
    import claims
    import sweep
    from progress import Bar
    from run_tables import RunTables, write_csv
    from storage import atomic_open

    sweep.check_record(preset_name, preset, out, seed)
    cells = sweep.grid(preset, methods, students)
    groups = sweep.groups(preset, students)
    tables = RunTables(preset, out)
    work = collections.defaultdict(list)            # dataset -> unfinished cells and groups
    for unit in groups + cells:
        path = (sweep.group_path(out, unit) if isinstance(unit, sweep.Group)
                else sweep.cell_path(out, unit))
        if not os.path.exists(path):
            work[unit.dataset].append(unit)
    unready = [d for d in work if not sweep.dataset_ready(preset, out, d)]
    todo = sum(len(units) for units in work.values())
    cli.log.info(f"{students} student(s): {len(cells)} cells and {len(groups)} expectation "
                 f"groups, {len(cells) + len(groups) - todo} already done, {todo} to run, "
                 f"{len(unready)} data set(s) to make")
    waiting = collections.deque(work)               # data sets not opened yet
    left = {d: len(units) for d, units in work.items()}
    with (_Serial() if jobs == 1 else _Parallel(jobs)) as pool, \
            Bar(len(unready) + todo, f"{preset_name} grid", unit="unit") as bar:
        pending = {}

        def submit_work(dataset):
            for unit in work[dataset]:
                fn = sweep.run_group if isinstance(unit, sweep.Group) else sweep.run_cell
                pending[pool.submit(fn, preset, out, unit, seed)] = unit

        def open_next():
            """Make the next data set, or submit its work if it is already made."""
            dataset = waiting.popleft()
            if dataset in unready:
                pending[pool.submit(sweep.prepare_dataset, preset, out, dataset, seed)] = dataset
            else:
                submit_work(dataset)

        opened = 0                                  # data sets opened and not finished
        while waiting and (keep_data or opened < jobs):
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
    rows = claims.evaluate([r for r in tables.expectation_rows() if r["student"] < students],
                           [r for r in tables.result_rows() if r["student"] < students])
    write_csv(os.path.join(out, "claims.csv"), claims.CLAIM_COLUMNS, rows)
    with atomic_open(os.path.join(out, "claims.md"), "w") as f:
        f.write(claims.markdown(rows))
    return tables, rows


def main(argv=None):
    args = parse_args(argv)
    preset, methods = configure(args)
    out = args.out or os.path.join("runs", args.preset)
    start = time.time()
    import sweep
    try:
        _, rows = run(args.preset, preset, out, args.seed, methods, args.students, args.jobs,
                      bool(args.keep_data))
    except sweep.RunFolderError as e:
        raise cli.UserError(str(e)) from None
    counts = collections.Counter(r["verdict"].split(" at ")[0] for r in rows)
    cli.log.info(f"results written to {os.path.join(out, 'results.csv')}; claims on "
                 f"{args.students} student(s): "
                 + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
                 + f" (table: {os.path.join(out, 'claims.md')}); {time.time() - start:.0f} s")


if __name__ == "__main__":
    cli.run(main)
