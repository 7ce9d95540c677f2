"""The main job at a small size: the paper README's commands in sequence, then a table.

Runs teacher_dataset.py, teacher_student.py (training, then pruning and testing with every
pruning choice, with and without reweighting) and evaluate.py exactly as a user would type
them, in `demo_out/`, at N = 100, P = 160000 (the paper's P/N = 1600), and prints the test
losses side by side; then the real-data path offline (real_data.py on scikit-learn's digits,
first layer pruned to 20% and 50%). Takes a couple of minutes on two cores.
"""
import argparse
import collections
import csv
import os
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("dpp_node", "random_node", "importance_node", "dpp_edge", "random_edge",
           "importance_edge")


def run(args, cwd):
    """Run one of the project's scripts, echoing the command; returns its stdout."""
    print("$ python3 " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(proc.returncode)
    return proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="demo_out", help="working folder (default: demo_out)")
    parser.add_argument("--input_dim", type=int, default=100)
    parser.add_argument("--num_data", type=int, default=160000)
    parser.add_argument("--node_k", type=int, default=3, help="hidden nodes kept by node methods")
    parser.add_argument("--num_masks", type=int, default=100)
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    n, k_student = opts.input_dim, 6
    edge_k = round((opts.node_k * (n + 1) - k_student) / k_student)  # same parameter budget
    common = ["--input_dim", str(n), "--student_h_size", str(k_student), "--teacher_path",
              "teacher.pkl", "--nonlinearity", "sigmoid", "--mode", "normal"]
    start = time.time()
    run(["teacher_dataset.py", "--input_dim", str(n), "--teacher_h_size", "2", "--teacher_path",
         "teacher.pkl", "--num_data", str(opts.num_data), "--mode", "normal", "--sig_w", "0",
         "--v_star", "4"], opts.out)
    out = run(["teacher_student.py", *common, "--epoch", "1", "--lr", "0.5"], opts.out)
    unpruned = re.search(r"test loss: (\S+)", out).group(1)
    rows = []
    for method in METHODS:
        k = opts.node_k if method.endswith("node") else edge_k
        run(["teacher_student.py", *common, "--pruning_choice", method, "--trained_weights",
             f"student_{k_student}.pth", "--procedure", "pruning", "--num_masks",
             str(opts.num_masks), "--k", str(k)], opts.out)
        losses = []
        for rw in (0, 1):
            out = run(["teacher_student.py", *common, "--trained_weights",
                       f"student_{k_student}.pth", "--procedure", "testing", "--pruning_choice",
                       method, "--k", str(k), "--reweighting", str(rw)], opts.out)
            losses.append(float(re.search(r"pruned MLP avg\. test loss: (\S+)", out).group(1)))
        rows.append((method, k, *losses))
    for method, k in (("dpp_node", opts.node_k), ("dpp_edge", edge_k)):
        print(run(["evaluate.py", "--path_to_student_mask",
                   f"student_masks_{method}_{k_student}_{k}.pkl", "--path_to_teacher",
                   "teacher.pkl", "--input_dim", str(n)], opts.out))
    print(f"\nN = {n}, P = {opts.num_data}, student 6 -> {opts.node_k} nodes or {edge_k} weights "
          f"per node ({opts.num_masks} masks); trained student's test loss {unpruned}\n")
    print(f"{'pruning_choice':<16} {'k':>4} {'test loss':>12} {'reweighted':>12}")
    for method, k, plain, rw in rows:
        print(f"{method:<16} {k:>4} {plain:>12.5f} {rw:>12.5f}")
    digits_table(opts.out)
    print(f"\nall files are in {opts.out}/ ({time.time() - start:.0f} s)")


def digits_table(out):
    """The real-data path offline: an MLP on scikit-learn's digits, first layer pruned."""
    folder = os.path.join(out, "digits")
    run(["real_data.py", "--dataset", "digits", "--procedure", "training", "--output_dir",
         "digits"], out)
    run(["real_data.py", "--dataset", "digits", "--procedure", "sweep", "--fractions", "0.2,0.5",
         "--rounds", "3", "--output_dir", "digits"], out)
    with open(os.path.join(folder, "real_data_results.csv")) as f:
        rows = list(csv.DictReader(f))
    errors = collections.defaultdict(list)
    for row in rows:
        key = row["method"], round(float(row["fraction"]), 1), int(row["reweighting"])
        errors[key].append(float(row["test_error"]))
    print(f"\ndigits MLP 64-100-100-10, first layer pruned; unpruned test error "
          f"{float(rows[0]['unpruned_test_error']):.2f}%, mean over 3 rounds")
    print(f"{'pruning_choice':<16} {'20% kept':>9} {'+ rw':>7} {'50% kept':>9} {'+ rw':>7}")
    for method in METHODS:
        cells = [sum(v) / len(v) for f in (0.2, 0.5) for rw in (0, 1)
                 for v in [errors[method, f, rw]]]
        print(f"{method:<16} " + " ".join(f"{c:>{w}.2f}"
                                          for c, w in zip(cells, (9, 7, 9, 7), strict=True)))


if __name__ == "__main__":
    main()
