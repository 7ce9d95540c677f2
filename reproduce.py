"""Run the paper's teacher-student grid and write results.csv (one row per cell and round).

    python3 reproduce.py --preset paper --out runs/paper --jobs 2

Reuses the teacher and trained students already in --out, skips finished cells (an
interrupted sweep resumes where it stopped), and rebuilds results.csv after every cell.
"""
import concurrent.futures
import multiprocessing
import os
import time
from dataclasses import replace

import cli
from choices import PRUNING_CHOICES, SWEEP_PRESETS

# sweep (and with it torch) is imported once the flags are read: --help answers at once.


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=SWEEP_PRESETS,
                        help="smoke (seconds), small (minutes), paper (the paper's sizes)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of " + ",".join(PRUNING_CHOICES)
                        + " (default: all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="mask-drawing rounds per cell (default: the preset's)")
    parser.add_argument("--num_masks", type=int, default=None,
                        help="masks per round (default: the preset's)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of every teacher, student and mask draw")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel")
    return parser.parse_args(argv)


def _worker_init():
    """One thread per worker: the parallelism is across cells."""
    import threadpoolctl
    import torch
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)


def main(argv=None):
    args = parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--num_masks", args.num_masks)):
        if value is not None:
            cli.positive(flag, value)
    cli.positive("--jobs", args.jobs)
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(PRUNING_CHOICES))
    if unknown:
        raise cli.UserError(f"--methods has unknown method(s) {', '.join(unknown)}; choose from "
                            + ", ".join(PRUNING_CHOICES))
    import sweep
    from progress import Bar
    preset = sweep.PRESETS[args.preset]
    if args.rounds is not None:
        preset = replace(preset, rounds=args.rounds)
    if args.num_masks is not None:
        preset = replace(preset, num_masks=args.num_masks)
    out = args.out or os.path.join("runs", args.preset)
    start = time.time()
    try:
        sweep.prepare(args.preset, preset, out, args.seed, log=cli.log.info)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    cells = sweep.grid(preset, methods)
    todo = [c for c in cells if not os.path.exists(sweep.cell_path(out, c))]
    cli.log.info(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    with Bar(len(todo), f"{args.preset} grid", unit="cell") as bar:
        if args.jobs == 1:
            for cell in todo:
                sweep.run_cell(preset, out, cell, args.seed)
                sweep.write_results(preset, out, cells)
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context,
                                                        initializer=_worker_init) as pool:
                futures = [pool.submit(sweep.run_cell, preset, out, c, args.seed) for c in todo]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    sweep.write_results(preset, out, cells)
                    bar.update()
    path = sweep.write_results(preset, out, cells)
    cli.log.info(f"results written to {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
