"""Run a study (the paper's grid or your own) on independent students and judge the paper's claims.

    python3 reproduce.py --preset paper --students 5 --jobs 2 --out runs/paper
    python3 reproduce.py --preset paper --theory only          # seconds: no data, no SGD
    python3 reproduce.py --study studies/student_width.toml --scheduler tcp://HOST:8786

A study is a TOML file (studies/*.toml; --preset NAME is studies/NAME.toml) that declares
the whole grid; the flags below override it. Writes results.csv (one row per cell,
reweighting and round), expectations.csv (expected test loss over the mask distribution of
every method and budget, per student), theory.csv (the N → ∞ theory of every method and
budget), specialisation.csv, and claims.csv / claims.md (paired differences across students,
95% intervals, verdicts on the expected, measured and N → ∞ losses). Reuses the data sets and
trained students already in --out and skips finished work, so an interrupted run resumes
where it stopped, and a later run that adds students or settings adds only their cells. A
study file with [sizes] runs one study per input dimension (a finite-size study).
"""
import collections
import os
import re
import time
from dataclasses import replace

from dpp_pruning.base import cli
from dpp_pruning.base.choices import IMPORTANCE_RULES, PRUNING_CHOICES, SWEEP_PRESETS
from dpp_pruning.experiments import study as studies

# sweep (and with it torch) is imported once the flags are checked: --help answers at once.
RESCALE_CHOICES = {"1": (1,), "0": (0,), "both": (1, 0)}
# [scheme://]host:port, the host a name, an IPv4 address or a bracketed IPv6 address
SCHEDULER_ADDRESS = re.compile(r"^([a-z][a-z0-9+.-]*://)?([^\s:/\[\]]+|\[[0-9a-fA-F:.]+\]):\d+$")


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
                        help="1 keeps every data set's data.npz (its teacher, test set and "
                             "Gram matrix: 0.16 GB each at paper scale; the training samples "
                             "are never stored); 0 deletes each one once its work is done, so "
                             "that at most --jobs are on disk at a time (they are made again "
                             "bit-identically from their seeds if needed) (default: 1)")
    parser.add_argument("--theory", default=None, choices=("beside", "only", "none"),
                        help="the N → ∞ theory (training ODEs, then the pruning theory) of "
                             "every cell: beside the simulation, only the theory (no data, no "
                             "SGD: seconds), or none (default: the study's; the presets': "
                             "beside)")
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
    if args.scheduler is not None and not SCHEDULER_ADDRESS.match(args.scheduler):
        raise cli.UserError(f"--scheduler must be a Dask scheduler's address such as "
                            f"tcp://HOST:8786, got {args.scheduler!r}")
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
        ("theory", args.theory),
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


def main(argv=None):
    args = parse_args(argv)
    study, methods = configure(args)
    out = os.path.abspath(args.out or os.path.join("runs", study.name))
    if study.input_dims:                     # a finite-size study: one run folder per N
        from dpp_pruning.experiments import finite_size
        for size in studies.sizes(study):
            run_one(args, size, methods, finite_size.size_folder(out, size.input_dim))
        finite_size.write(out, study)
        cli.log.info(f"finite-size tables written in {out} (finite_size.md)")
    else:
        run_one(args, study, methods, out)


def run_one(args, study, methods, out):
    """Run one study into `out` and print its summary line."""
    start = time.time()
    from dpp_pruning.experiments import executors, runner, sweep
    try:
        _, rows = runner.run(study, out, methods, args.jobs, bool(args.keep_data),
                             args.scheduler)
    except (sweep.RunFolderError, studies.StudyError, executors.SchedulerUnreachable,
            executors.WorkerProblem, runner.UnitFailed) as e:
        raise cli.UserError(str(e)) from None
    main = "expected" if any(r["judged_on"] == "expected" for r in rows) else "theory"
    counts = collections.Counter(r["verdict"].split(" at ")[0] for r in rows
                                 if r["judged_on"] == main)
    cli.log.info(f"tables written in {out}; claims on "
                 f"{study.students} student(s), judged on the {main} losses: "
                 + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
                 + f" (table: {os.path.join(out, 'claims.md')}); {time.time() - start:.0f} s")


if __name__ == "__main__":
    cli.run(main)
