#!/usr/bin/env python3
"""Paper-scale speed and memory of every workflow step, side by side with the original approach.

    python3 benchmarks/run.py [--scale paper|small] [--ref_samples 3000] [--ref_rows 20000]
                              [--ref_test 2000] [--ref_draws 20] [--device cpu]
                              [--out benchmarks/results.md]

Not part of the test suite. For every step of the teacher-student workflow it times OUR
implementation at the chosen scale (paper: N = 500, P = 800000, K = 6, 100 masks, dpp_node
k = 3, dpp_edge k = 250 and 417, random_edge with edge reweighting at k = 250, evaluate.py)
and, in the same run, the slow reference of the ORIGINAL approach (reference.py: per-sample
loops, autograd one sample at a time, kernels from materialised P x N products, dppy draws,
P x |S| least-squares reweighting) at a scale it can afford, extrapolated to the chosen scale
and labelled as such. Every step runs in a fresh subprocess (`run.py --step NAME`, the worker
mode) so that its peak resident memory (ru_maxrss from os.wait4) is its own; the table reports
it beside the size of the data the step reads, so that "peak <= 2 x data read" can be checked.
Each step also CHECKS that both ways give the same results (weights after training on the same
samples, kernels, losses, reweighted weights, sampler distribution) and prints PASS / FAIL.
Then the end-to-end CLI workflow (teacher_dataset.py, teacher_student.py training, pruning and
testing of dpp_node k = 3 and dpp_edge k = 250 with 100 masks, evaluate.py for both) is timed
as subprocesses, and the teacher pickle's write / read throughput is compared with writing
and reading the same bytes raw. The summary (machine, load average, tables, targets met / not
met) is printed and written as Markdown to --out. Big intermediate files live in --workdir
(default benchmarks/out/<scale>, git-ignored) and are deleted at the end unless --keep.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):          # the project's modules; tests/reference.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference_steps import ref_edge_step  # noqa: E402
from report import Report, fmt_mb, fmt_s  # noqa: E402
from timed_steps import STEPS, Work, check, edge_step, file_bytes  # noqa: E402

# Problem sizes. `ref_*`: the reduced sizes at which the reference (original approach) runs.
SCALES = {
    "paper": dict(input_dim=500, teacher_h_size=2, student_h_size=6, num_data=800000,
                  num_masks=100, k_node=3, k_edges=[250, 417], k_rw=250, sig_w=0.0, v_star=4,
                  lr=0.5, seed=1, ref_samples=3000, ref_rows=20000, ref_test=2000,
                  ref_draws=20, ref_masks=2, ref_rw_masks=1),
    "small": dict(input_dim=100, teacher_h_size=2, student_h_size=6, num_data=40000,
                  num_masks=20, k_node=3, k_edges=[50, 83], k_rw=50, sig_w=0.0, v_star=4,
                  lr=0.5, seed=1, ref_samples=1000, ref_rows=5000, ref_test=500,
                  ref_draws=10, ref_masks=2, ref_rw_masks=1),
}


def worker(args):
    folder = pathlib.Path(args.workdir)
    cfg = json.loads((folder / "config.json").read_text())
    name = args.step
    if name in STEPS:
        fn = STEPS[name]
    elif name.startswith(("prune_dpp_edge_", "test_dpp_edge_")):
        fn = edge_step(name)
    elif name.startswith(("ref_prune_dpp_edge_", "ref_test_dpp_edge_")):
        fn = ref_edge_step(name)
    else:
        raise SystemExit(f"unknown step {name!r}")
    result = fn(cfg, Work(cfg, folder))
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))


# =============================================================================================
# Orchestrator side.

CHILD_ENV = dict(os.environ)


def run_child(cmd, log_path, cwd=ROOT):
    """Run cmd (a list) to completion; returns (exit status, wall s, peak RSS bytes, CPU s).
    os.wait4 gives the rusage of this child alone (RUSAGE_CHILDREN would be the max so far)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def machine_facts():
    from importlib import metadata

    import numba
    import numpy
    import scipy
    import torch
    try:
        dppy_version = metadata.version("dppy")
    except metadata.PackageNotFoundError:
        dppy_version = "not installed"
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                host=platform.node(), cpu=model, cores=os.cpu_count(), memory=mem,
                python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), numpy=numpy.__version__,
                scipy=scipy.__version__, numba=numba.__version__, dppy=dppy_version,
                load_start=os.getloadavg())


class Orchestrator:
    def __init__(self, args, cfg, folder):
        self.args, self.cfg, self.dir = args, cfg, folder
        self.results = {}          # step -> dict (JSON of the worker + rc, wall, peak, cpu)
        self.cli = []              # (label, rc, wall, peak, cpu, data_read, cmd)
        self.failed = []

    def step(self, name):
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--step", name,
               "--workdir", str(self.dir)]
        print(f"  {name} ...", end="", flush=True)
        json_path = self.dir / f"{name}.json"
        if json_path.exists():
            json_path.unlink()
        rc, wall, peak, cpu = run_child(cmd, self.dir / f"{name}.log")
        if rc != 0 or not json_path.exists():
            print(f" FAILED (exit {rc}; see {self.dir / (name + '.log')})")
            tail = (self.dir / f"{name}.log").read_text().splitlines()[-15:]
            print("    " + "\n    ".join(tail))
            self.failed.append(name)
            self.results[name] = dict(rc=rc, wall=wall, peak=peak, cpu=cpu, failed=True,
                                      checks=[check(f"{name} ran", False, f"exit {rc}")])
            return self.results[name]
        result = json.loads(json_path.read_text())
        result.update(rc=rc, wall=wall, peak=peak, cpu=cpu)
        self.results[name] = result
        extra = f", ref extrapolated {fmt_s(result['extrapolated'])} s" if "extrapolated" in \
            result else ""
        print(f" {fmt_s(result.get('time'))} s timed ({fmt_s(wall)} s process, peak "
              f"{fmt_mb(peak)} MB{extra})", flush=True)
        return result

    def cli_step(self, label, script, flags, inputs, cwd):
        cmd = [sys.executable, str(ROOT / script)] + [str(f) for f in flags]
        print(f"  CLI {label} ...", end="", flush=True)
        data = sum(os.path.getsize(cwd / p) for p in inputs if (cwd / p).exists())
        log = cwd / f"{len(self.cli):02d}_{script.replace('.py', '')}.log"
        rc, wall, peak, cpu = run_child(cmd, log, cwd)
        if rc != 0:
            self.failed.append(f"CLI {label}")
            print(f" FAILED (exit {rc}; see {log})")
        else:
            print(f" {fmt_s(wall)} s, peak {fmt_mb(peak)} MB", flush=True)
        self.cli.append(dict(label=label, rc=rc, wall=wall, peak=peak, cpu=cpu, data=data,
                             cmd=" ".join([os.path.basename(sys.executable), script]
                                          + [shlex.quote(str(f)) for f in flags])))
        return rc

    def run_cli(self):
        c, d = self.cfg, self.dir / "cli"
        d.mkdir(parents=True, exist_ok=True)
        n, K = c["input_dim"], c["student_h_size"]
        common = ["--input_dim", n, "--student_h_size", K, "--teacher_path", "teacher.pkl",
                  "--nonlinearity", "sigmoid", "--mode", "normal"]
        student = f"student_{K}.pth"
        self.cli_step("teacher_dataset.py", "teacher_dataset.py",
                      ["--input_dim", n, "--teacher_h_size", c["teacher_h_size"],
                       "--teacher_path", "teacher.pkl", "--num_data", c["num_data"], "--mode",
                       "normal", "--sig_w", c["sig_w"], "--v_star", c["v_star"], "--seed",
                       c["seed"], "--device", c["device"]], [], d)
        self.cli_step("training", "teacher_student.py",
                      common + ["--epoch", 1, "--lr", c["lr"], "--seed", c["seed"]],
                      ["teacher.pkl"], d)
        for choice, k in (("dpp_node", c["k_node"]), ("dpp_edge", c["k_edges"][0])):
            masks = f"student_masks_{choice}_{K}_{k}.pkl"
            self.cli_step(f"pruning {choice} k={k}", "teacher_student.py",
                          common + ["--trained_weights", student, "--procedure", "pruning",
                                    "--pruning_choice", choice, "--num_masks", c["num_masks"],
                                    "--k", k], ["teacher.pkl", student], d)
            self.cli_step(f"testing {choice} k={k}", "teacher_student.py",
                          common + ["--trained_weights", student, "--procedure", "testing",
                                    "--pruning_choice", choice, "--k", k],
                          ["teacher.pkl", masks], d)
        for choice, k in (("dpp_node", c["k_node"]), ("dpp_edge", c["k_edges"][0])):
            masks = f"student_masks_{choice}_{K}_{k}.pkl"
            self.cli_step(f"evaluate.py {choice} k={k}", "evaluate.py",
                          ["--path_to_student_mask", masks, "--path_to_teacher", "teacher.pkl",
                           "--input_dim", n], ["teacher.pkl", masks], d)

    def run_evaluate(self):
        """Our evaluate.py on the dpp_node masks of the step workers, as a fresh process."""
        c, K = self.cfg, self.cfg["student_h_size"]
        masks = self.dir / f"student_masks_dpp_node_{K}_{c['k_node']}.pkl"
        cmd = [sys.executable, str(ROOT / "evaluate.py"), "--path_to_student_mask", str(masks),
               "--path_to_teacher", str(self.dir / "teacher.pkl"), "--input_dim",
               str(c["input_dim"]), "--output_dir", str(self.dir)]
        print("  evaluate (evaluate.py process) ...", end="", flush=True)
        rc, wall, peak, cpu = run_child(cmd, self.dir / "evaluate.log")
        print(f" {fmt_s(wall)} s, peak {fmt_mb(peak)} MB" if rc == 0 else f" FAILED ({rc})")
        if rc:
            self.failed.append("evaluate")
        self.results["evaluate"] = dict(
            time=wall, rc=rc, wall=wall, peak=peak, cpu=cpu,
            data_read=file_bytes(self.dir / "teacher.pkl", masks),
            data_note="teacher.pkl + masks (whole process timed)",
            checks=[check("evaluate.py ran", rc == 0, f"exit {rc}")])


def orchestrate(args):
    cfg = dict(SCALES[args.scale])
    for name in ("ref_samples", "ref_rows", "ref_test", "ref_draws"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    cfg["device"] = args.device
    cfg["scale"] = args.scale
    cfg["threads"] = args.threads
    cfg["blas_threads"] = args.blas_threads
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            CHILD_ENV[var] = str(args.threads)
    if args.blas_threads:
        CHILD_ENV["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    folder = pathlib.Path(args.workdir or ROOT / "benchmarks" / "out" / args.scale).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    facts = machine_facts()
    started = time.time()
    print(f"benchmark at {args.scale} scale in {folder}; load average {facts['load_start']}")
    orch = Orchestrator(args, cfg, folder)
    k1, k2 = cfg["k_edges"]
    names = ["baseline", "gen", "pickle_io", "train", "ref_gen", "ref_train",
             "prune_dpp_node", "ref_prune_dpp_node", "test_dpp_node", "ref_test_dpp_node",
             f"prune_dpp_edge_{k1}", f"ref_prune_dpp_edge_{k1}", f"prune_dpp_edge_{k2}",
             f"ref_prune_dpp_edge_{k2}", f"test_dpp_edge_{k1}", f"ref_test_dpp_edge_{k1}",
             "random_edge_rw", "ref_random_edge_rw", "evaluate", "ref_evaluate"]
    print("steps (each a fresh process):")
    for name in names:
        if name == "evaluate":
            orch.run_evaluate()
        else:
            orch.step(name)
    if not args.skip_cli:
        print("end-to-end CLI workflow:")
        orch.run_cli()
    facts["load_end"] = os.getloadavg()
    text = Report(args.scale, cfg, orch.results, orch.cli, orch.failed).markdown(
        facts, started, time.time())
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print()
    print(text)
    print(f"\nwritten to {out}")
    if not args.keep:
        for path in list(folder.rglob("*.pkl")) + list(folder.rglob("*.npz")):
            path.unlink()
    return 1 if orch.failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper",
                        help="problem size (default: paper)")
    parser.add_argument("--ref_samples", type=int, default=None,
                        help="samples the reference SGD and generation run on "
                             "(default: 3000 paper, 1000 small)")
    parser.add_argument("--ref_rows", type=int, default=None,
                        help="training rows for the reference kernels and least squares "
                             "(default: 20000 paper, 5000 small)")
    parser.add_argument("--ref_test", type=int, default=None,
                        help="test samples for the reference per-sample testing "
                             "(default: 2000 paper, 500 small)")
    parser.add_argument("--ref_draws", type=int, default=None,
                        help="dppy draws timed per k (default: 20 paper, 10 small)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for data generation and batched testing (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP/OPENBLAS/MKL_NUM_THREADS for every step and CLI command "
                             "(ours and reference alike); default: the libraries' own choice")
    parser.add_argument("--blas_threads", type=int, default=None,
                        help="set only OPENBLAS_NUM_THREADS (numpy / scipy linear algebra: eigh, "
                             "solve, lstsq) for every process; torch's MKL / OpenMP threads "
                             "are left alone")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"),
                        help="Markdown results file (default: benchmarks/results.md)")
    parser.add_argument("--workdir", default=None,
                        help="folder for intermediate files (default: benchmarks/out/<scale>)")
    parser.add_argument("--skip_cli", action="store_true",
                        help="skip the end-to-end CLI workflow")
    parser.add_argument("--keep", action="store_true",
                        help="keep the pickles in the work folder afterwards")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)   # worker mode
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.step:
        worker(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
