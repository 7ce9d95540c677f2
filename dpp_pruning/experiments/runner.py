"""Run a study in a run folder: every unfinished work unit, on the executor asked for, then
the tables and the claims. reproduce.py is the command line over `run`; notebooks call it too.

The promise: a study's tables are the bytes of one clean local `--jobs 1` run of the same
study, whatever the executor, the working directories, the order in which the folder was
grown and the interruptions; anything else ends in one line (UnitFailed, or the errors of
study, sweep and executors) and loses nothing already done.
"""
import collections
import contextlib
import os
import time

from dpp_pruning.base import cli
from dpp_pruning.experiments import study as studies
from dpp_sample_ts import KDPPError

# seconds between two writes of the tables while units finish (the unit files are the record:
# a run killed between two writes loses nothing, the next run rebuilds the tables)
WRITE_EVERY = 1.0


class UnitFailed(ValueError):
    """A work unit that the study's settings make impossible, or a run that cannot go on
    (a worker killed again and again, the scheduler lost); one line."""


def run(study, out, methods=None, jobs=1, keep_data=True, scheduler=None):
    """Run every unfinished unit of the study in `out`; returns its RunTables and the claims
    rows. Holds the folder's lock throughout (one run at a time per folder).

    `out` is made absolute before anything is sent to a worker (a worker's working directory
    is its own). Before any unit runs, the executor checks that it can do the work: memory
    for the data sets it holds at once and, on a Dask cluster, that the scheduler and every
    worker import this checkout's code and see the run folder (executors). Data sets are
    opened (made, then their cells and expectation groups submitted) all at once, or with
    keep_data=False at most `jobs` at a time, each one's teacher file deleted as soon as its
    last unit is done."""
    from dpp_pruning.base import storage
    from dpp_pruning.experiments import executors, sweep
    out = os.path.abspath(out)
    existed = os.path.exists(out)
    try:
        with executors.executor(jobs, scheduler) as pool, \
                storage.folder_lock(out, "reproduce.py run"):
            pool.check(out, executors.unit_memory(study))
            recorded, folder_id = studies.claim_folder(study, out)
            return _run(study, recorded, sweep.Folder(out, folder_id), methods, pool, keep_data)
    finally:
        if not existed:                     # a run refused before its first file leaves none
            with contextlib.suppress(OSError):
                os.rmdir(out)


def _run(study, recorded, folder, methods, pool, keep_data):
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.base.storage import atomic_open
    from dpp_pruning.experiments import claims, executors, sweep
    from dpp_pruning.experiments.run_tables import RunTables, write_csv

    out = folder.path
    simulate = study.theory != "only"
    cells = sweep.grid(study, methods) if simulate else []
    groups = sweep.groups(study) if simulate else []
    theories = sweep.theories(study)
    try:
        tables = RunTables(recorded, out)
    except sweep.RunFolderError as e:
        raise UnitFailed(str(e)) from None
    for path, why in tables.unusable.items():
        cli.log.info(f"{os.path.relpath(path, out)} is not used ({why}); its unit runs again")
    work = collections.defaultdict(list)            # dataset -> unfinished cells and groups
    for unit in groups + cells:
        if not tables.done(unit):
            work[unit.dataset].append(unit)
    free = [unit for unit in theories if not tables.done(unit)]      # need no data set
    unready = [d for d in work if not sweep.dataset_ready(study, out, d)]
    todo = sum(len(units) for units in work.values()) + len(free)
    total = len(cells) + len(groups) + len(theories)
    cli.log.info(f"study '{study.name}', {study.students} student(s): {len(cells)} cells, "
                 f"{len(groups)} expectation groups and {len(theories)} theory units, "
                 f"{total - todo} already done, {todo} to run, {len(unready)} data set(s) to "
                 "make")
    executors.check_disk(study, out, len(unready) if keep_data else min(len(unready),
                                                                          pool.slots))
    cli.log.info(f"work units run in {pool.description}")
    schedule = _Schedule(study, recorded, folder, pool, work, free, unready, keep_data,
                         total - todo, total)
    written = time.monotonic()
    try:                               # the tables of what is done, also when the run stops
        with Bar(len(unready) + todo, f"{study.name} grid", unit="unit") as bar:
            for unit, result in schedule.finished():
                bar.update()
                if isinstance(unit, sweep.Dataset):
                    for line in result:
                        cli.log.info(line)
                    continue
                tables.add(unit)
                if time.monotonic() - written >= WRITE_EVERY:
                    tables.write()
                    written = time.monotonic()
    finally:
        tables.write()
    # claims are judged on the students this run asked for (--students), even where the
    # folder holds more; the tables keep every student
    rows = claims.evaluate(
        [r for r in tables.expectation_rows() if r["student"] < study.students],
        [r for r in tables.result_rows() if r["student"] < study.students],
        theory_rows=[r for r in tables.theory_rows() if r["student"] < study.students])
    write_csv(os.path.join(out, "claims.csv"), claims.CLAIM_COLUMNS, rows)
    with atomic_open(os.path.join(out, "claims.md"), "w") as f:
        f.write(claims.markdown(rows, studies.record(recorded), time.strftime("%Y-%m-%d")))
    return tables, rows


class _Schedule:
    """The unfinished units of a run (work: data set -> its cells and groups; free: the
    theory units, which need no data set; unready: the data sets to make first), submitted to
    the pool: the theory units at once, the others data set by data set: all at once, or with
    keep_data=False at most pool.slots data sets at a time, each one's data file removed once
    its last unit is done."""

    def __init__(self, study, recorded, folder, pool, work, free, unready, keep_data, done,
                 total):
        self.study, self.recorded, self.folder, self.pool = study, recorded, folder, pool
        self.work, self.free, self.unready, self.keep_data = work, free, unready, keep_data
        self.waiting = collections.deque(work)              # data sets not opened yet
        self.left = {d: len(units) for d, units in work.items()}
        self.pending = {}                                   # future -> unit
        self.done, self.total = done, total                 # cells and groups

    def _submit_work(self, dataset):
        from dpp_pruning.experiments import sweep
        for unit in self.work[dataset]:
            fn = sweep.run_group if isinstance(unit, sweep.Group) else sweep.run_cell
            self.pending[self.pool.submit(fn, self.recorded, self.folder, unit)] = unit

    def _open_next(self):
        """Make the next data set, or submit its work if it is already made."""
        from dpp_pruning.experiments import sweep
        dataset = self.waiting.popleft()
        if dataset in self.unready:
            future = self.pool.submit(sweep.prepare_dataset, self.study, self.folder.path,
                                      dataset)
            self.pending[future] = dataset
        else:
            self._submit_work(dataset)

    def _wait(self):
        from dpp_pruning.experiments import executors
        try:
            return self.pool.next_done(self.pending)
        except executors.SchedulerLost as e:
            raise UnitFailed(_resume_line(e, self.folder.path, self.done, self.total)) from None

    def _result(self, future, unit):
        from dpp_pruning.experiments import executors
        try:
            return self.pool.result(future)
        except executors.SchedulerLost as e:
            raise UnitFailed(_resume_line(e, self.folder.path, self.done, self.total)) from None
        except Exception as e:          # noqa: BLE001 - named below, or raised as it is
            raise _unit_failure(e, unit, self.folder.path) from None

    def finished(self):
        """Yield (unit, its result) as units finish, submitting the work that follows."""
        from dpp_pruning.experiments import sweep
        for unit in self.free:
            self.pending[self.pool.submit(sweep.run_theory, self.recorded, self.folder,
                                          unit)] = unit
        for _ in range(len(self.waiting) if self.keep_data else self.pool.slots):
            if self.waiting:
                self._open_next()
        while self.pending:
            for future in self._wait():
                unit = self.pending.pop(future)
                result = self._result(future, unit)
                if isinstance(unit, sweep.Dataset):
                    self._submit_work(unit)
                elif isinstance(unit, sweep.Theory):
                    self.done += 1
                else:
                    self.done += 1
                    self.left[unit.dataset] -= 1
                    if self.left[unit.dataset] == 0 and not self.keep_data:
                        path = sweep.data_path(self.folder.path, unit.dataset)
                        os.remove(path)
                        cli.log.info(f"removed {path} (--keep_data 0)")
                        if self.waiting:
                            self._open_next()
                yield unit, result


def _unit_name(unit):
    if hasattr(unit, "name"):
        return unit.name
    return f"data set {unit.folder} of student {unit.student}"


def _resume_line(lost, out, done, total):
    return (f"{lost}: {done} of {total} units done and kept in {out}; start the scheduler and "
            "its workers again and run the same command to resume")


def _unit_failure(error, unit, out):
    """The one-line error for a unit that raised `error` (or the error itself where it
    already is one line about the folder)."""
    from dpp_pruning.experiments import sweep
    name = _unit_name(unit)
    if isinstance(error, KDPPError):
        return UnitFailed(f"{out}: unit {name} cannot run: {error} Choose budgets within the "
                          "kernel's rank (more data, or fewer nodes kept)")
    if isinstance(error, sweep.TrainingDiverged):
        return UnitFailed(f"{out}: {error}")
    if type(error).__name__ == "IntegrationError":
        return UnitFailed(f"{out}: {error} (or run without the theory: --theory none)")
    if type(error).__name__ == "KilledWorker":
        return UnitFailed(f"{out}: unit {name} killed every Dask worker that ran it, up to the "
                          "scheduler's limit of retries (out of memory?); the units already "
                          "done are kept: give each worker more memory (docs/studies.md) and "
                          "run the same command to resume")
    return error
