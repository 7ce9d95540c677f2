"""Train an MLP on digits / MNIST / CIFAR-10 and prune its first layer (the paper's real-data runs).

    python3 real_data.py --dataset digits --procedure training
    python3 real_data.py --dataset digits --procedure pruning --pruning_choice dpp_edge \
        --fraction 0.5 --reweighting 1 --rounds 3
    python3 real_data.py --dataset digits --procedure sweep --rounds 3
    python3 real_data.py --dataset mnist --data_root ./data --download --procedure training

Training flags left out take the dataset's preset (mlp_training.PRESETS): the paper's
settings for mnist and cifar10, a faster-learning one for the offline digits set.
The work is done by image_datasets, mlp_training, first_layer_pruning and real_data_sweep;
see their docstrings for the conventions.
"""
import os
import time

from dpp_pruning.base import cli
from dpp_pruning.base.choices import PRUNING_CHOICES

# the real-data modules (and with them torch) are imported by the functions that use them,
# once the flags are parsed: --help answers at once.

PROCEDURES = ("training", "pruning", "sweep")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", help="digits (offline), mnist or cifar10")
    p.add_argument("--data_root", default="./data",
                   help="folder holding the torchvision datasets (MNIST/raw, cifar-10-batches-py)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download mnist / cifar10 into --data_root")
    p.add_argument("--procedure", default="training", help="training, pruning or sweep")
    # pruning
    p.add_argument("--pruning_choice", default="dpp_edge",
                   help="pruning: one of " + ", ".join(PRUNING_CHOICES))
    p.add_argument("--methods", default=",".join(PRUNING_CHOICES),
                   help="sweep: comma-separated methods (default: all six)")
    p.add_argument("--k", type=int, default=None,
                   help="pruning: nodes kept (node methods) or inputs kept per node (edge methods)")
    p.add_argument("--fraction", type=float, default=None,
                   help="pruning: p, the fraction of the first two weight matrices' parameters "
                   "kept (the x-axis; edges keep ceil(p D) inputs per node, nodes "
                   "floor(H (floor(p D) + H) / (D + H))), instead of --k")
    p.add_argument("--fractions", default=",".join(f"{0.1 * i:.1f}" for i in range(1, 10)),
                   help="sweep: comma-separated values of p, as --fraction")
    p.add_argument("--beta", type=float, default=0.3, help="beta of the Gaussian DPP kernels")
    p.add_argument("--reweighting", type=int, default=0, choices=(0, 1),
                   help="pruning: also refit the kept weights (1); the sweep does both")
    p.add_argument("--rounds", type=int, default=3, help="masks drawn per setting (rounds)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the mask draws")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and numpy (default: 1 for digits, where more only "
                   "add overhead; all cores otherwise)")
    # training (defaults: the dataset's preset)
    p.add_argument("--batch_size", type=int, default=None, help="training batch size")
    p.add_argument("--test_batch_size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate (mnist/cifar10: 0.001)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (0.9)")
    p.add_argument("--epochs", type=int, default=None, help="maximum number of epochs (10)")
    p.add_argument("--dropout", type=float, default=None, help="dropout probability (0)")
    p.add_argument("--target_acc", type=float, default=None,
                   help="stop once train accuracy (%%) reaches this (mnist 99, cifar10 50, "
                        "digits 99)")
    # files
    p.add_argument("--output_dir", default=".",
                   help="folder of the --weights and --results files when those are not given")
    p.add_argument("--weights", default=None,
                   help="weights file (default <output_dir>/<dataset>_mlp.pth)")
    p.add_argument("--results", default=None,
                   help="results CSV (default <output_dir>/real_data_results.csv)")
    return p.parse_args(argv)


def _float_list(flag, text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise cli.UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise cli.UserError(f"{flag} is empty")
    return values


def validate(args):
    import models
    from dpp_pruning.real_data import first_layer_pruning, image_datasets, mlp_training
    if args.dataset not in image_datasets.DATASETS:
        raise cli.UserError(f"--dataset must be one of {', '.join(image_datasets.DATASETS)}, "
                            f"got {args.dataset!r}")
    if args.procedure not in PROCEDURES:
        raise cli.UserError(f"--procedure must be one of {', '.join(PROCEDURES)}, "
                            f"got {args.procedure!r}")
    preset = mlp_training.PRESETS[args.dataset]
    for name in preset:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name in ("batch_size", "test_batch_size", "epochs", "rounds"):
        cli.positive("--" + name, getattr(args, name))
    for name in ("lr", "momentum", "dropout", "target_acc", "beta"):
        cli.finite("--" + name, getattr(args, name))
    cli.seed("--seed", args.seed)
    cli.positive("--lr", args.lr)
    cli.positive("--beta", args.beta, allow_zero=True)
    if not 0 <= args.momentum < 1:
        raise cli.UserError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.dropout < 1:
        raise cli.UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.threads is not None:
        cli.positive("--threads", args.threads)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods + [args.pruning_choice]:
        if m not in first_layer_pruning.METHODS:
            raise cli.UserError(f"unknown pruning method {m!r}; choose from "
                                f"{', '.join(first_layer_pruning.METHODS)}")
    args.fractions = _float_list("--fractions", args.fractions)
    for f in args.fractions + ([args.fraction] if args.fraction is not None else []):
        if not 0 < f <= 1:
            raise cli.UserError(f"fractions of parameters kept must be in (0, 1], got {f}")
    if args.procedure == "pruning":
        if (args.k is None) == (args.fraction is None):
            raise cli.UserError("--procedure pruning needs exactly one of --k and --fraction")
        hidden, inputs = models.MLP_SIZES[args.dataset][1], models.MLP_SIZES[args.dataset][0]
        total = hidden if first_layer_pruning.granularity(args.pruning_choice) == "node" else inputs
        if args.k is not None and not 1 <= args.k <= total:
            unit = "hidden nodes" if total == hidden else "inputs per node"
            raise cli.UserError(f"--k {args.k} is out of range for {args.pruning_choice} on "
                                f"{args.dataset}: it counts {unit}, so it must be in 1..{total}")
    args.weights = args.weights or os.path.join(args.output_dir, f"{args.dataset}_mlp.pth")
    args.results = args.results or os.path.join(args.output_dir, "real_data_results.csv")


def run_training(args, data):
    from dpp_pruning.real_data import mlp_training
    start = time.time()
    _, history = mlp_training.train_and_save(
        args.dataset, data, args.weights, seed=args.seed, device=args.device,
        batch_size=args.batch_size, test_batch_size=args.test_batch_size, lr=args.lr,
        momentum=args.momentum, epochs=args.epochs, target_acc=args.target_acc,
        dropout=args.dropout)
    last = history[-1]
    reached = "reached" if last["train_acc"] >= args.target_acc else "did not reach"
    cli.log.info("trained %d epochs in %.1f s (%s the target %.1f%%): train accuracy %.2f%%, "
                 "test error %.2f%%; weights in %s", len(history), time.time() - start, reached,
                 args.target_acc, last["train_acc"], last["test_error"], args.weights)


def prepared(args, data):
    from dpp_pruning.real_data import first_layer_pruning, mlp_training, real_data_sweep
    model = mlp_training.load_weights(args.weights, args.dataset, args.dropout)
    setup = real_data_sweep.prepare(args.dataset, model, data, beta=args.beta,
                                    device=args.device,
                                    weights_id=mlp_training.weights_id(args.weights),
                                    test_batch_size=args.test_batch_size)
    node_scale, edge_scale = first_layer_pruning.kernel_scale(setup.stats, setup.drawer.w1,
                                                              args.beta)
    cli.log.info("unpruned test error %.2f%%; beta x median squared distance between the "
                 "kernel's columns (its typical exponent: near 0 every column alike, far above "
                 "1 every column distinct): %.3g (node kernel), %.3g (edge kernels)",
                 setup.unpruned_error, node_scale, edge_scale)
    return setup


def run_pruning(args, data):
    from dpp_pruning.real_data import first_layer_pruning, real_data_sweep
    setup = prepared(args, data)
    hidden, inputs = setup.drawer.hidden, setup.drawer.inputs
    k = args.k if args.k is not None else first_layer_pruning.k_for_fraction(
        args.pruning_choice, args.fraction, hidden, inputs)
    rws = (0, 1) if args.reweighting else (0,)
    rows = real_data_sweep.evaluate_cell(setup, args.pruning_choice, k, range(args.rounds),
                                         args.seed, rws, fraction=args.fraction)
    real_data_sweep.merge_results(args.results, rows, replace=True)
    cli.log.info("%d rows written to %s", len(rows), args.results)


def run_sweep(args, data):
    from dpp_pruning.real_data import real_data_sweep
    setup = prepared(args, data)
    start = time.time()
    rows = real_data_sweep.sweep(setup, methods=args.methods, fractions=args.fractions,
                                 rounds=args.rounds, seed=args.seed, results_path=args.results)
    cli.log.info("sweep: %d new rows in %s (%.1f s)", len(rows), args.results, time.time() - start)


def main(argv=None):
    args = parse_args(argv)
    from dpp_pruning.real_data import image_datasets, mlp_training
    validate(args)
    args.device = cli.resolve_device(args.device)
    threads = args.threads or (1 if args.dataset == "digits" else None)
    with mlp_training.cpu_threads(threads):
        data = image_datasets.load_dataset(args.dataset, args.data_root, args.download)
        procedures = {"training": run_training, "pruning": run_pruning, "sweep": run_sweep}
        procedures[args.procedure](args, data)


if __name__ == "__main__":
    cli.run(main)
