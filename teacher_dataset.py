"""Generate the teacher network and its Gaussian-input data set (step 1 of the README).

    python3 teacher_dataset.py --input_dim 500 --teacher_h_size 2 --teacher_path teacher.pkl \
        --num_data 800000 --mode normal --sig_w 0 --v_star 4
"""
import time

from dpp_pruning.base import cli
from dpp_pruning.base.choices import MODES

# data and storage (and with them torch) are imported once the flags are checked.


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    # network parameter
    parser.add_argument("--input_dim", type=int, required=True,
                        help="N, dimension of the Gaussian inputs")
    parser.add_argument("--teacher_h_size", type=int, default=2,
                        help="M, hidden nodes of the teacher")
    parser.add_argument("--num_data", type=int, required=True,
                        help="P training samples; a test set of P/10 is drawn as well (P >= 10)")
    parser.add_argument("--mode", type=str, default="normal", choices=MODES,
                        help="normal: second layer v* = --v_star; soft_committee: v* = 1")
    parser.add_argument("--sig_w", type=float, default=0.0,
                        help="sigma, standard deviation of the Gaussian output noise")
    parser.add_argument("--v_star", type=float, default=4,
                        help="the teacher's second-layer weight in mode normal")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of every draw (teacher weights, inputs, noise)")
    parser.add_argument("--device", type=str, default="cpu",
                        help="torch device that draws the data: cpu or cuda (a different stream; "
                        "bit-identical only on the CPU)")
    # data storage
    parser.add_argument("--teacher_path", type=str, required=True,
                        help="where the teacher and data pickle goes")
    return parser.parse_args(argv)


def validate(args):
    """Check the flags, the output location, memory and disk before anything is generated."""
    cli.positive("--input_dim", args.input_dim)
    cli.positive("--teacher_h_size", args.teacher_h_size)
    cli.positive("--num_data", args.num_data)
    if args.num_data < 10:
        raise cli.UserError(f"--num_data {args.num_data} leaves no test set (10% of it); "
                            "use at least 10")
    cli.float32("--sig_w", args.sig_w)
    cli.positive("--sig_w", args.sig_w, allow_zero=True)
    cli.float32("--v_star", args.v_star)
    cli.seed("--seed", args.seed)
    args.device = cli.resolve_device(args.device, "--device")
    from dpp_pruning.base.data import CHUNK_ROWS, dataset_nbytes
    from dpp_pruning.base.storage import check_writable
    check_writable(args.teacher_path, flag="--teacher_path")
    nbytes = dataset_nbytes(args.input_dim, args.num_data)
    n, m = args.input_dim, args.teacher_h_size
    working = 4 * (n * m + CHUNK_ROWS * (2 * n + 2 * m + 2))  # teacher weights, one chunk
    sizes = (f"--num_data {args.num_data} with --input_dim {args.input_dim} and "
             f"--teacher_h_size {args.teacher_h_size}")
    cli.check_memory(int(1.1 * nbytes) + working, sizes)
    cli.check_disk(nbytes, args.teacher_path, f"--teacher_path {args.teacher_path} ({sizes})")


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    from dpp_pruning.base.data import generate_teacher
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.base.storage import save_pickle
    start = time.time()
    total = args.num_data + args.num_data // 10
    with Bar(total, "generating", unit="sample", unit_scale=True) as bar:
        teacher = generate_teacher(args.input_dim, args.teacher_h_size, args.num_data,
                                   args.mode, args.sig_w, args.v_star, args.seed,
                                   args.device, progress=bar.update)
    save_pickle(teacher, args.teacher_path)
    cli.log.info(f"teacher ({args.teacher_h_size} hidden nodes, mode {args.mode}) with "
                 f"{len(teacher)} training and {len(teacher.test_labels)} test samples of "
                 f"dimension {args.input_dim} written to {args.teacher_path} "
                 f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
