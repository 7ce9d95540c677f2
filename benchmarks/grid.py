"""The whole grid of a study, from scratch, timed side by side for two checkouts in one run.

    python3 benchmarks/grid.py --compare /tmp/prev                # paper, 5 students, --jobs 2
    python3 benchmarks/grid.py --preset smoke --students 2 --compare /tmp/prev

Runs `reproduce.py --preset P --students S --jobs J` into an empty temporary folder under
`/usr/bin/time`, for the checkout at --compare (the baseline, e.g. a worktree of the previous
release: `git worktree add /tmp/prev <commit>`) and then for this one (or --root), each in a
fresh process with only its root on PYTHONPATH. Prints, per checkout: its commit, the wall
time, CPU use (user + system over wall: 200% is both cores busy the whole time), CPU seconds,
peak resident memory of any one process, the disk the run folder took, and the ratio of wall
times (baseline / this). Writes the report as Markdown with --out.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit(root):
    found = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return found.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def run_grid(root, args, work):
    """(wall s, CPU %, CPU s, peak RSS bytes, folder bytes) of one grid run from scratch."""
    out = os.path.join(work, "run")
    timing = os.path.join(work, "time.txt")
    command = ["/usr/bin/time", "-o", timing, "-f", "%e %U %S %M", sys.executable,
               os.path.join(root, "reproduce.py"), "--preset", args.preset, "--students",
               str(args.students), "--jobs", str(args.jobs), "--out", out]
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run(command, cwd=work, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"the grid of {root} failed: {done.stderr.strip().splitlines()[-1]}")
    with open(timing) as f:
        wall, user, system, rss_kb = f.read().split()[-4:]
    wall, cpu = float(wall), float(user) + float(system)
    return wall, 100 * cpu / wall, cpu, int(rss_kb) * 1024, folder_bytes(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=ROOT, help="the checkout timed (default: this one)")
    parser.add_argument("--compare", default=None, help="a baseline checkout, timed first")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--students", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the report (Markdown) here")
    args = parser.parse_args()
    roots = ([("baseline", args.compare)] if args.compare else []) + [("this", args.root)]
    load_before = os.getloadavg()
    results = []
    for label, root in roots:
        with tempfile.TemporaryDirectory() as work:
            print(f"timing {label}: {root} ...", file=sys.stderr, flush=True)
            results.append((label, root, run_grid(root, args, work)))
    load_after = os.getloadavg()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   "unknown CPU")
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    lines = [f"# The grid: `reproduce.py --preset {args.preset} --students {args.students} "
             f"--jobs {args.jobs}` from scratch", "",
             f"- Date {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {cpu}, "
             f"{os.cpu_count()} cores; load average before {before}, after {after}.", "",
             "| checkout | commit | wall | CPU use | CPU seconds | peak memory (one process) "
             "| run folder | wall: baseline / this |", "|---|---|---|---|---|---|---|---|"]
    base = results[0][2][0] if args.compare else None
    for label, root, (wall, use, cpu_s, rss, disk) in results:
        ratio = f"{base / wall:.2f}" if base else ""
        lines.append(f"| {label}: {root} | {commit(root)} | {wall // 60:.0f} min {wall % 60:.0f} s "
                     f"| {use:.0f}% | {cpu_s:.0f} | {rss / 2**30:.2f} GB | {disk / 2**30:.2f} GB "
                     f"| {ratio} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
