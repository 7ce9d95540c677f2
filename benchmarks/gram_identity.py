"""How much G ≠ I moves dpp_edge: the exact expected loss of each trained student's dpp_edge
masks with its data set's Gram matrix G = XᵀX/P, against the same with G = I (the N → ∞
theory's assumption), for every size of a finite-size study.

    python3 benchmarks/gram_identity.py runs/finite_size \
        [--sizes 125 250] [--out docs/runs/finite_size/gram_identity.csv]

Needs the study's data sets (data.npz: G and the teacher) and students; a run with
--keep_data 0 has removed them. Rows rescaled as the study prunes them (rescale 1); for each
size, noise level, student and node budget of the study's edge cells: the expected loss
(delta method, `expectations.edge_expectation`) over the kernels diag(w_i) G diag(w_i) and over
diag(w_i)², both + σ²/2, and their relative difference. At α = P/N fixed, G's off-diagonal
entries are O(1/√P) and the sums that reach the kernels' spectra O(1/√α): a difference that
does not shrink with N. Prints a summary per size and noise level (mean, its 95% interval
across students, and the largest |difference|) and writes one row per student and budget.
"""
import argparse
import csv
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ("input_dim", "noise", "student", "nodes_equivalent", "k", "expected_gram",
           "expected_identity", "relative")


def student_rows(folder, study, dataset, panel):
    """Rows of one data set's student: each edge budget's two expectations."""
    from dpp_pruning.base.storage import load_state_dict
    from dpp_pruning.experiments import sweep
    from dpp_pruning.theory.expectations import edge_expectation
    from dpp_pruning.theory.mask_marginals import DiagonalKDPPMarginals, KDPPMarginals
    from dpp_sample_ts import KDPP, edge_kernel, normalise_rows

    data = np.load(sweep.data_path(folder, dataset))
    gram, w_star, v_star = data["gram"], data["w1"], data["w2"]
    state = load_state_dict(sweep.student_path(folder, dataset, panel.student_h_size))
    w1 = normalise_rows(state["w1.weight"].double().numpy())                 # (K, N)
    w2 = state["w2.weight"].double().numpy()
    samplers = [KDPP(edge_kernel(w, gram)) for w in w1]
    rows = []
    for nodes in panel.node_budgets:
        k = sweep.edge_budget(nodes, study.input_dim, panel.student_h_size)
        with_gram = edge_expectation("dpp_edge", k, w1, w2, w_star, v_star,
                                     marginals=[KDPPMarginals(s, k) for s in samplers])
        identity = edge_expectation("dpp_edge", k, w1, w2, w_star, v_star,
                                    marginals=[DiagonalKDPPMarginals(w * w, k) for w in w1])
        noise = dataset.noise ** 2 / 2
        a, b = with_gram.value + noise, identity.value + noise
        rows.append(dict(input_dim=study.input_dim, noise=dataset.noise,
                         student=dataset.student, nodes_equivalent=nodes, k=k,
                         expected_gram=a, expected_identity=b, relative=a / b - 1))
    return rows


def main(argv=None):
    from dpp_pruning.experiments import finite_size, sweep
    from dpp_pruning.experiments import study as studies
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a finite-size study's folder (with its data sets)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="only these input dimensions (default: every size of the study)")
    parser.add_argument("--out", dest="csv", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    study = studies.read_record(args.out)
    rows = []
    for size in studies.sizes(study):
        if args.sizes and size.input_dim not in args.sizes:
            continue
        folder = finite_size.size_folder(args.out, size.input_dim)
        for dataset in sweep.datasets(size):
            for panel in sweep.panels_of(size, dataset):
                if "dpp_edge" in panel.methods:
                    rows += student_rows(folder, size, dataset, panel)
        for noise in size.noise_levels:
            mine = [r for r in rows if r["input_dim"] == size.input_dim and r["noise"] == noise]
            found = np.array([r["relative"] for r in mine])
            half = 1.96 * found.std(ddof=1) / np.sqrt(found.size) if found.size > 1 else 0.0
            print(f"N = {size.input_dim:5d}, σ = {noise:g}: G against I {100 * found.mean():+.3f}% "
                  f"± {100 * half:.3f}% (mean over {len({r['student'] for r in mine})} students x "
                  f"{len({r['k'] for r in mine})} budgets), largest "
                  f"|difference| {100 * np.abs(found).max():.3f}%", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
