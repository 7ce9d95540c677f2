"""Run a study in a run folder: every unfinished work unit, on the executor asked for, then
the tables and the claims. reproduce.py is the command line over `run`; notebooks call it too.
"""
import collections
import os
import time

from dpp_pruning.base import cli
from dpp_pruning.experiments import study as studies
from dpp_sample_ts import KDPPError


class UnitFailed(ValueError):
    """A work unit that the study's settings make impossible; one line."""


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
                try:
                    result = future.result()
                except KDPPError as e:
                    name = unit.name if hasattr(unit, "name") else unit.folder
                    raise UnitFailed(f"{out}: unit {name} cannot run: {e} Choose budgets "
                                     "within the kernel's rank (more data, or fewer nodes "
                                     "kept)") from None
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
