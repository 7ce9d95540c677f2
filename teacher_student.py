"""Train, prune and test the student network (steps 2, 3 and 5 of the README).

    python3 teacher_student.py --input_dim 500 --student_h_size 6 --teacher_path teacher.pkl \
        --nonlinearity sigmoid --mode normal --epoch 1 --lr 0.5
    python3 teacher_student.py ... --trained_weights student_6.pth --procedure pruning \
        --pruning_choice dpp_node --num_masks 100 --k 3
    python3 teacher_student.py ... --procedure testing --pruning_choice dpp_node --k 3
"""
import os
import time

from dpp_pruning.base import cli
from dpp_pruning.base.choices import (
    IMPORTANCE_RULES,
    MODES,
    NONLINEARITIES,
    PRUNING_CHOICES,
    k_range,
)

# torch, numba and scipy (workflow, storage, models) are imported inside the functions that
# need them, once the flags are read: --help and flag errors come back in a fraction of a second.

PROCEDURES = ("training", "pruning", "testing")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    # network parameter
    parser.add_argument("--input_dim", type=int, required=True,
                        help="The input dimension for each data point.")
    parser.add_argument("--student_h_size", type=int, required=True,
                        help="hidden layer size of the student MLP")
    parser.add_argument("--nonlinearity", type=str, default="sigmoid",
                        help="activation g: sigmoid = erf(z/sqrt(2)), relu or linear")
    parser.add_argument("--mode", type=str, default="normal",
                        help="normal, or soft_committee (second layer frozen at 1)")
    # optimization setup
    parser.add_argument("--lr", type=float, default=0.5, metavar="LR",
                        help="learning rate eta of online SGD, eta/sqrt(N) and eta/N per layer")
    parser.add_argument("--momentum", type=float, default=0, metavar="M",
                        help="SGD momentum")
    parser.add_argument("--ode", type=int, default=0, choices=(0, 1),
                        help="training: 1 also writes <output_dir>/training_curve_<K>.csv, the "
                             "test loss at about 50 log-spaced points of alpha = steps/N beside "
                             "the order-parameter ODEs' prediction (erf, plain SGD only)")
    parser.add_argument("--epoch", type=int, default=1,
                        help="number of epochs (online learning so 1)")
    parser.add_argument("--seed", type=int, default=1, metavar="S",
                        help="seed of the initialisation and of the mask draws")
    # pruning parameters
    parser.add_argument("--pruning_choice", type=str, default="dpp_edge",
                        help="pruning strategy: " + ", ".join(PRUNING_CHOICES))
    parser.add_argument("--beta", type=float, default=0.3,
                        help="beta of the Gaussian DPP kernels of real_data.py; unused here, as "
                             "in the original")
    parser.add_argument("--k", type=int, default=2,
                        help="kept hidden nodes (node choices, 1..K) or kept incoming weights "
                        "per node (edge choices, 1..N)")
    parser.add_argument("--procedure", type=str, default="training",
                        help="training, pruning or testing")
    parser.add_argument("--num_masks", type=int, default=1,
                        help="masks drawn by pruning")
    parser.add_argument("--reweighting", type=int, default=0, choices=(0, 1),
                        help="testing: refit the kept weights after pruning (1) or not (0)")
    parser.add_argument("--rescale", type=int, default=1, choices=(0, 1),
                        help="pruning: 1 rescales every row of w1 to norm sqrt(N) before the "
                             "masks are drawn, as the original; 0 prunes the trained student as "
                             "it is (testing refuses masks made with the other value)")
    parser.add_argument("--importance_rule", type=str, default="magnitude",
                        help="importance_node keeps the k nodes of largest |v| (magnitude) or, "
                             "as the original code, of largest signed v (signed)")
    parser.add_argument("--load_from_pkl", type=int, default=0, choices=(0, 1),
                        help="dpp_edge: reuse the kernels saved in --kernel_path by an earlier "
                             "run (1)")
    parser.add_argument("--kernel_path", type=str, default=None,
                        help="dpp_edge kernel pickle "
                             "(default: <output_dir>/dpp_edge_kernels_<K>.pkl)")
    # data storage
    parser.add_argument("--trained_weights", type=str, default="place_holder",
                        help="the student_<K>.pth that pruning starts from")
    parser.add_argument("--teacher_path", type=str, required=True,
                        help="Path to the teacher network and dataset.")
    parser.add_argument("--output_dir", type=str, default=".",
                        help="folder of the files written (the student, masks, kernels)")
    parser.add_argument("--device", type=str, default="cpu",
                        help="torch device of the batched testing: cpu, cuda or auto")
    return parser.parse_args(argv)


def validate(args):
    """Check the flags before anything is read or written."""
    args.device = cli.resolve_device(args.device)
    if args.procedure not in PROCEDURES:
        raise cli.UserError(f"--procedure must be one of {', '.join(PROCEDURES)}, "
                            f"got {args.procedure!r}")
    if args.nonlinearity not in NONLINEARITIES:
        raise cli.UserError(f"--nonlinearity must be one of {', '.join(NONLINEARITIES)}, "
                            f"got {args.nonlinearity!r}")
    if args.mode not in MODES:
        raise cli.UserError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    cli.positive("--input_dim", args.input_dim)
    cli.positive("--student_h_size", args.student_h_size)
    cli.seed("--seed", args.seed)
    if args.procedure == "training":
        cli.finite("--lr", args.lr)
        cli.positive("--lr", args.lr)
        cli.finite("--momentum", args.momentum)
        if not 0 <= args.momentum < 1:
            raise cli.UserError(f"--momentum must be in [0, 1), got {args.momentum}")
        cli.positive("--epoch", args.epoch)
        if args.ode and args.momentum > 0:
            raise cli.UserError("--ode 1 needs --momentum 0: the order-parameter ODEs describe "
                                "plain SGD")
        if args.ode and args.nonlinearity != "sigmoid":
            raise cli.UserError("--ode 1 needs --nonlinearity sigmoid: the ODEs' averages are "
                                "closed forms for the erf network")
        return
    if args.importance_rule not in IMPORTANCE_RULES:
        raise cli.UserError(f"--importance_rule must be one of {', '.join(IMPORTANCE_RULES)}, "
                            f"got {args.importance_rule!r}")
    if args.pruning_choice not in PRUNING_CHOICES:
        raise cli.UserError(f"--pruning_choice must be one of {', '.join(PRUNING_CHOICES)}, "
                            f"got {args.pruning_choice!r}")
    lo, hi = k_range(args.pruning_choice, args.input_dim, args.student_h_size)
    if not lo <= args.k <= hi:
        if PRUNING_CHOICES[args.pruning_choice] == "node":
            what = f"hidden nodes kept, at most --student_h_size {args.student_h_size}"
        else:
            what = f"weights kept per hidden node, at most --input_dim {args.input_dim}"
        raise cli.UserError(f"--k {args.k} is out of range for {args.pruning_choice}: it counts "
                            f"{what}, so it must be in {lo}..{hi}")
    if args.procedure == "pruning":
        cli.positive("--num_masks", args.num_masks)
        if args.trained_weights == "place_holder":
            raise cli.UserError("--trained_weights is required for pruning: pass the "
                                f"student_{args.student_h_size}.pth that training wrote")


def output_path(args):
    """The file this procedure writes (None for testing)."""
    from dpp_pruning.pipeline import workflow
    if args.procedure == "training":
        return os.path.join(args.output_dir, workflow.student_filename(args.student_h_size))
    if args.procedure == "pruning":
        return masks_path(args)
    return None


def curve_path(args):
    from dpp_pruning.pipeline import workflow
    return os.path.join(args.output_dir, workflow.curve_filename(args.student_h_size))


def masks_path(args):
    from dpp_pruning.pipeline import workflow
    return os.path.join(args.output_dir, workflow.masks_filename(
        args.pruning_choice, args.student_h_size, args.k))


def kernel_path(args):
    from dpp_pruning.pipeline import workflow
    return args.kernel_path or os.path.join(args.output_dir,
                                            workflow.kernels_filename(args.student_h_size))


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def preflight(args):
    """Before any work: every input file is there, every output can be written, and the job
    fits in memory."""
    from dpp_pruning.base.storage import (
        FileProblem,
        check_folder_writable,
        check_readable,
        check_writable,
    )
    check_readable(args.teacher_path, "teacher file")
    inputs = [("--teacher_path", args.teacher_path)]
    outputs = []
    extra = 8 * 6 * args.student_h_size * args.input_dim  # weights, buffers, copies
    if args.procedure == "training":
        outputs.append(output_path(args))
        if args.ode:
            outputs.append(curve_path(args))
    elif args.procedure == "pruning":
        check_readable(args.trained_weights, "weights file")
        inputs.append(("--trained_weights", args.trained_weights))
        outputs.append(output_path(args))
        n, h = args.input_dim, args.student_h_size
        extra += 5 * args.num_masks * n * h           # bool masks, then float32 copies
        if args.pruning_choice == "dpp_edge":
            extra += 8 * (h + 3) * n * n              # kernels, one eigendecomposition
            if args.load_from_pkl:
                check_readable(kernel_path(args), "kernel file")
                extra += os.path.getsize(kernel_path(args))
            else:
                outputs.append(kernel_path(args))
                if args.kernel_path:
                    check_writable(args.kernel_path, flag="--kernel_path")
    else:
        path = masks_path(args)
        try:
            check_readable(path, "masks file")
        except FileProblem:
            if os.path.exists(path):
                raise
            raise cli.UserError(f"masks file {path} does not exist: run --procedure pruning "
                                f"with the same --pruning_choice, --student_h_size, --k and "
                                f"--output_dir first") from None
        extra += 8 * os.path.getsize(path)            # masks as float64 students, batched
    if outputs:
        check_folder_writable(args.output_dir, "--output_dir")
    for out in outputs:
        check_writable(out)
        for flag, path in inputs:
            if _same_file(out, path):
                raise cli.UserError(f"{out} would overwrite the {flag} file; choose another "
                                    "--output_dir or --kernel_path")
    what = (f"{args.procedure} with this teacher file and --input_dim {args.input_dim}, "
            f"--student_h_size {args.student_h_size}"
            + (f", --num_masks {args.num_masks}" if args.procedure == "pruning" else ""))
    cli.check_memory(os.path.getsize(args.teacher_path) + extra, what)
    if args.procedure == "pruning":
        cli.check_disk(4 * args.num_masks * args.input_dim * args.student_h_size,
                       output_path(args), what)


def load_teacher(args):
    from dpp_pruning.base.storage import load_pickle
    teacher = load_pickle(args.teacher_path, "teacher file")
    return cli.check_teacher(teacher, args.teacher_path, args.input_dim)


def load_student(args):
    import torch

    from dpp_pruning.base.storage import load_state_dict
    from models import student_from_weights
    state = load_state_dict(args.trained_weights)
    w1, w2 = state.get("w1.weight"), state.get("w2.weight")
    if w1 is None or w2 is None:
        raise cli.UserError(f"weights file {args.trained_weights} has no w1.weight / w2.weight; "
                            "pass the student_<K>.pth that training wrote")
    if (tuple(w1.shape) != (args.student_h_size, args.input_dim)
            or w2.numel() != args.student_h_size):
        raise cli.UserError(f"weights file {args.trained_weights} holds a student of shape "
                            f"{tuple(w1.shape)} but --student_h_size {args.student_h_size} and "
                            f"--input_dim {args.input_dim} ask for "
                            f"({args.student_h_size}, {args.input_dim})")
    if not (w1.is_floating_point() and w2.is_floating_point()):
        raise cli.UserError(f"weights file {args.trained_weights} holds {w1.dtype} weights, not "
                            "floating point; pass the student_<K>.pth that training wrote")
    if not (torch.isfinite(w1).all() and torch.isfinite(w2).all()):
        raise cli.UserError(f"weights file {args.trained_weights} holds non-finite weights "
                            "(training diverged?); train again with a smaller --lr")
    return student_from_weights(w1.numpy(), w2.numpy(), args.nonlinearity, args.mode)


def run_training(args, teacher):
    import torch

    from dpp_pruning.base.progress import Bar
    from dpp_pruning.base.storage import save_state_dict
    from dpp_pruning.pipeline import workflow
    from dpp_pruning.theory.order_param_odes import IntegrationError
    out = output_path(args)
    start = time.time()
    with Bar(len(teacher) * args.epoch, "online SGD", unit="sample", unit_scale=True) as bar:
        if args.ode:
            try:
                student, curve = workflow.train_with_curve(
                    teacher, args.student_h_size, args.nonlinearity, args.mode, args.lr,
                    args.epoch, args.seed, progress=bar.update_to)
            except IntegrationError as e:
                raise cli.UserError(f"{e} with --lr {args.lr}; nothing was written, use a "
                                    "smaller --lr or --ode 0") from None
        else:
            student = workflow.train(teacher, args.student_h_size, args.nonlinearity, args.mode,
                                     args.lr, args.epoch, args.momentum, args.seed,
                                     progress=bar.update_to)
    w = student.w1.weight
    if not (torch.isfinite(w).all() and torch.isfinite(student.w2.weight).all()):
        raise cli.UserError(f"training diverged (non-finite weights) with --lr {args.lr}; "
                            f"nothing was written, use a smaller --lr")
    cli.log.info(f"training took {time.time() - start:.1f} s; "
                 f"test loss: {workflow.test_loss(teacher, student):.6g}")
    save_state_dict(student.state_dict(), out)
    cli.log.info(f"student written to {out}")
    if args.ode:
        write_curve(curve, curve_path(args))


def write_curve(curve, path):
    """alpha, test_loss (first curve.test_rows test samples), ode_loss: one row per point."""
    from dpp_pruning.base.storage import atomic_open
    with atomic_open(path, "w") as f:
        f.write("alpha,test_loss,ode_loss\n")
        for row in zip(curve.alpha, curve.test_loss, curve.ode_loss, strict=True):
            f.write(",".join(repr(float(x)) for x in row) + "\n")
    cli.log.info(f"at alpha = {curve.alpha[-1]:g}: test loss {curve.test_loss[-1]:.6g} "
                 f"(first {curve.test_rows} test samples), ODE {curve.ode_loss[-1]:.6g}")
    cli.log.info(f"training curve written to {path}")


def dpp_edge_kernels(args, teacher, student):
    """dpp_edge kernels of the rescaled student: read from the kernel pickle with
    --load_from_pkl 1, otherwise built and saved there for the next run."""
    import numpy as np

    from dpp_pruning.base.storage import load_pickle, save_pickle
    from dpp_pruning.pipeline import workflow
    path = kernel_path(args)
    unpruned = workflow.rescaled(student) if args.rescale else student
    wid = workflow.weights_id(unpruned.w1.weight.detach().double().numpy())
    if args.load_from_pkl:
        cache = load_pickle(path, "kernel file")
        if not isinstance(cache, dict) or not {"weights_id", "kernels"} <= cache.keys():
            raise cli.UserError(f"kernel file {path} does not hold dpp_edge kernels; rerun with "
                                "--load_from_pkl 0 to build it")
        if cache["weights_id"] != wid:
            raise cli.UserError(f"kernel file {path} was built for another student; rerun "
                                "with --load_from_pkl 0 to rebuild it")
        kernels, n = cache["kernels"], args.input_dim
        if not (isinstance(kernels, list) and len(kernels) == args.student_h_size and all(
                isinstance(L, np.ndarray) and L.shape == (n, n) and np.isfinite(L).all()
                for L in kernels)):
            raise cli.UserError(f"kernel file {path} holds damaged kernels; rerun with "
                                "--load_from_pkl 0 to rebuild it")
        return kernels
    kernels = workflow.edge_kernels(unpruned, teacher.gram.numpy())
    save_pickle({"weights_id": wid, "kernels": kernels}, path)
    cli.log.info(f"dpp_edge kernels written to {path}")
    return kernels


def run_pruning(args, teacher):
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.base.storage import save_pickle
    from dpp_pruning.pipeline import workflow
    from dpp_sample_ts import KDPPError
    student = load_student(args)
    out = output_path(args)
    kernels = (dpp_edge_kernels(args, teacher, student) if args.pruning_choice == "dpp_edge"
               else None)
    start = time.time()
    try:
        unit = "node" if args.pruning_choice == "dpp_edge" else "step"
        with Bar(None, f"drawing {args.num_masks} {args.pruning_choice} masks", unit=unit) as bar:
            unpruned, masks = workflow.prune(teacher, student, args.pruning_choice, args.k,
                                             args.num_masks, args.seed, kernels,
                                             bool(args.rescale), args.importance_rule,
                                             progress=bar.update_to)
    except KDPPError as e:
        raise cli.UserError(f"--k {args.k} cannot be drawn by {args.pruning_choice} for this "
                            f"student ({str(e).rstrip('.')}); use a smaller --k") from None
    if args.rescale:        # testing reports it beside the rescaled student's loss
        masks.trained_test_loss = workflow.test_loss(teacher, student)
    cli.log.info(f"{args.num_masks} {args.pruning_choice} masks (k = {args.k}) drawn in "
                 f"{time.time() - start:.1f} s")
    save_pickle((unpruned, masks), out)
    cli.log.info(f"unpruned student and masks written to {out}")


def run_testing(args, teacher):
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.pipeline import workflow
    student, masks = load_masks(masks_path(args), args, teacher)
    rw = bool(args.reweighting)
    with Bar(2, f"testing {len(masks)} masks, then their expected loss", unit="stage") as bar:
        hgram = (workflow.hidden_gram(teacher, student)
                 if rw and PRUNING_CHOICES[args.pruning_choice] == "node" else None)
        result = workflow.test_masks(teacher, student, masks, args.pruning_choice, rw, hgram,
                                     device=args.device)
        bar.update()
        expected = expectation_line(teacher, student, masks, rw, hgram)
        bar.update()
    losses = result.losses
    cli.log.info(f"unpruned MLP test loss: {result.unpruned_loss}")
    if args.rescale:                # load_masks checked that the masks were made so
        trained = getattr(masks, "trained_test_loss", None)
        cli.log.info("the rows of w1 were rescaled to norm sqrt(N) before pruning "
                     "(--rescale 1); test loss as trained: "
                     + (f"{trained}" if trained is not None
                        else "not recorded in this masks file (prune again to record it)"))
    cli.log.info(f"pruned MLP avg. test loss: {losses.mean()}")
    cli.log.info(f"over {len(losses)} masks{' with reweighting' if args.reweighting else ''}: "
                 f"std {losses.std():.6g}, min {losses.min():.6g}, max {losses.max():.6g}")
    cli.log.info(expected)


def expectation_line(teacher, student, masks, reweighting, hgram=None):
    """One line: the expected test loss over the mask distribution of this pruning run
    beside what its masks gave (the measured mean has test-set and mask-sampling noise)."""
    from dpp_pruning.pipeline import workflow
    from dpp_sample_ts import KDPPError
    try:
        found = workflow.expected_test_loss(teacher, student, masks.choice, masks.k,
                                            reweighting, hgram,
                                            getattr(masks, "importance_rule", "magnitude"))
    except KDPPError as e:
        raise cli.UserError(f"the expected test loss of {masks.choice} with k = {masks.k} does "
                            f"not exist for this student ({str(e).rstrip('.')}); prune with a "
                            "smaller --k") from None
    if found is None:
        return ("expected test loss over the mask distribution: not derived for dpp_edge and "
                "random_edge with reweighting")
    how = ("exact" if found.kind == "exact"
           else f"delta method; {found.first_order:.6g} at the expected order parameters")
    return (f"expected test loss over the mask distribution: {found.value:.6g} ({how}; "
            f"std over masks {found.sd:.3g})")


def load_masks(path, args, teacher):
    """The (unpruned student, masks) pickle of a pruning run, checked against the flags."""
    from dpp_pruning.base.storage import load_pickle
    content = load_pickle(path, "masks file")
    student, masks = cli.check_masks(content, path)
    flags = ("--pruning_choice", "--student_h_size", "--k", "--input_dim")
    asked = (args.pruning_choice, args.student_h_size, args.k, args.input_dim)
    found = (masks.choice, masks.student_h_size, masks.k, masks.input_dim)
    differ = [(flag, a, f) for flag, a, f in zip(flags, asked, found, strict=True) if a != f]
    if differ:
        made = " ".join(f"{flag} {f}" for flag, _, f in differ)
        said = " ".join(f"{flag} {a}" for flag, a, _ in differ)
        raise cli.UserError(f"masks file {path} was made with {made}, not {said}; use the "
                            "flags of the pruning run or prune again with these")
    cli.check_same_teacher(masks, teacher, path, args.teacher_path,
                           "prune again with this teacher")
    cli.check_rescale(masks, path, args.rescale)
    if (student.nonlinearity, student.mode) != (args.nonlinearity, args.mode):
        raise cli.UserError(f"masks file {path} holds a {student.nonlinearity}/{student.mode} "
                            f"student but the flags say {args.nonlinearity}/{args.mode}")
    return student, masks


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    preflight(args)
    teacher = load_teacher(args)
    if args.procedure == "training":
        run_training(args, teacher)
    elif args.procedure == "pruning":
        run_pruning(args, teacher)
    else:
        run_testing(args, teacher)


if __name__ == "__main__":
    cli.run(main)
