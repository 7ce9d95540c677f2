"""Order parameters Q, R, T of the unpruned and pruned students, and the theory's test loss.

    python3 evaluate.py --path_to_student_mask student_masks_dpp_node_6_3.pkl \
        --path_to_teacher teacher.pkl --input_dim 500
"""
import os

from dpp_pruning.base import cli

# numpy, torch and matplotlib are imported inside the functions that need them, once the
# flags are read: --help and flag errors come back in a fraction of a second.


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path_to_student_mask", type=str, required=True,
                        help="the student_masks_<choice>_<K>_<k>.pkl written by pruning")
    parser.add_argument("--path_to_teacher", type=str, required=True,
                        help="the teacher pickle written by teacher_dataset.py")
    parser.add_argument("--input_dim", type=int, required=True,
                        help="N, the input dimension (checked against both files)")
    parser.add_argument("--reweighting", type=int, default=0, choices=(0, 1),
                        help="evaluate the pruned students after reweighting (1) or not (0)")
    parser.add_argument("--rescale", type=int, default=1, choices=(0, 1),
                        help="the --rescale the masks were pruned with (default: 1); a masks "
                             "file made with the other value is refused")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="|R| a student node needs to count as aligned to a teacher node")
    parser.add_argument("--output_dir", type=str, default=".",
                        help="folder of the heatmap PNG order_params_<choice>_<K>_<k>.png")
    parser.add_argument("--device", type=str, default="cpu",
                        help="torch device of the batched testing: cpu, cuda or auto")
    return parser.parse_args(argv)


def png_path(args):
    stem = os.path.splitext(os.path.basename(args.path_to_student_mask))[0]
    stem = stem.replace("student_masks_", "")
    return os.path.join(args.output_dir,
                        f"order_params_{stem}{'_rw' if args.reweighting else ''}.png")


def preflight(args):
    """Before any work: flags in range, inputs present, the PNG writable, memory enough."""
    cli.positive("--input_dim", args.input_dim)
    if not 0 < args.threshold <= 1:
        raise cli.UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    from dpp_pruning.base.storage import (
        FileProblem,
        check_folder_writable,
        check_readable,
        check_writable,
    )
    check_readable(args.path_to_teacher, "teacher file")
    try:
        check_readable(args.path_to_student_mask, "masks file")
    except FileProblem:
        if os.path.exists(args.path_to_student_mask):
            raise
        raise cli.UserError(f"masks file {args.path_to_student_mask} does not exist: run "
                            "teacher_student.py --procedure pruning first (its "
                            "--pruning_choice, --student_h_size and --k name the file "
                            "student_masks_<choice>_<K>_<k>.pkl)") from None
    check_folder_writable(args.output_dir, "--output_dir")
    check_writable(png_path(args))
    cli.check_memory(os.path.getsize(args.path_to_teacher)
                     + 10 * os.path.getsize(args.path_to_student_mask),
                     f"evaluating {args.path_to_student_mask}")


def load_inputs(args):
    from dpp_pruning.base.storage import load_pickle
    teacher = cli.check_teacher(load_pickle(args.path_to_teacher, "teacher file"),
                                args.path_to_teacher, args.input_dim)
    content = load_pickle(args.path_to_student_mask, "masks file")
    student, masks = cli.check_masks(content, args.path_to_student_mask, args.input_dim,
                                     teacher, args.path_to_teacher)
    cli.check_rescale(masks, args.path_to_student_mask, args.rescale)
    return teacher, student, masks


def fmt(matrix):
    import numpy as np
    return np.array2string(np.asarray(matrix), precision=3, suppress_small=True, max_line_width=120)


def main(argv=None):
    args = parse_args(argv)
    args.device = cli.resolve_device(args.device)
    preflight(args)
    import numpy as np

    import teacher_student
    from dpp_pruning.base.progress import Bar
    from dpp_pruning.experiments import plots
    from dpp_pruning.pipeline import workflow
    from dpp_pruning.theory.order_params import NotSpecialised, block_order, order_parameters
    from dpp_sample_ts import PRUNERS
    teacher, student, masks = load_inputs(args)
    w1 = student.w1.weight.detach().double().numpy()
    q, r, t = order_parameters(w1, teacher.w1.numpy())
    rw = bool(args.reweighting)
    with Bar(2, f"testing {len(masks)} masks, then their expected loss", unit="stage") as bar:
        # node reweighting needs the hidden-activation Gram, one pass over the training
        # inputs: made once, for the test and for the expectation
        hgram = (workflow.hidden_gram(teacher, student)
                 if rw and PRUNERS[masks.choice].granularity == "node" else None)
        result = workflow.test_masks(teacher, student, masks, masks.choice, rw, hgram,
                                     device=args.device)
        bar.update()
        expected = teacher_student.expectation_line(teacher, student, masks, rw, hgram)
        bar.update()
    eq, er, _ = order_parameters(result.weights, teacher.w1.numpy())
    eq, er = eq.mean(axis=0), er.mean(axis=0)

    try:
        order, note = block_order(r, args.threshold)
        if note:
            cli.log.info(f"note: {note}")
        title = "block-diagonal order (students grouped by teacher node)"
    except NotSpecialised as e:
        cli.log.info(f"note: {e}; showing Q and R in the students' own order")
        order, title = np.arange(len(w1)), "students' own order"
    cli.log.info(f"T (teacher-teacher):\n{fmt(t)}")
    cli.log.info(f"Q (unpruned student), {title}:\n{fmt(q[np.ix_(order, order)])}")
    cli.log.info(f"R (unpruned student-teacher):\n{fmt(r[order])}")
    label = (f"{masks.choice}, k = {masks.k}, {len(masks)} masks"
             + (", reweighted" if args.reweighting else ""))
    cli.log.info(f"expected Q over masks ({label}):\n{fmt(eq[np.ix_(order, order)])}")
    cli.log.info(f"expected R over masks:\n{fmt(er[order])}")

    v = student.w2.weight.detach().double().numpy().ravel()
    theory_unpruned = float(workflow.predicted_loss(teacher, w1, v, student.nonlinearity))
    theory_pruned = workflow.predicted_loss(teacher, result.weights, result.outs,
                                            student.nonlinearity)
    sigma2 = 0.5 * teacher.noise_std ** 2
    cli.log.info(f"generalisation error from theory, unpruned: {theory_unpruned - sigma2:.6g}")
    cli.log.info(f"generalisation error from theory, pruned (avg. over masks): "
                 f"{theory_pruned.mean() - sigma2:.6g}")
    cli.log.info(f"predicted test loss (eps_g + sig_w^2/2) vs measured: unpruned "
                 f"{theory_unpruned:.6g} vs {result.unpruned_loss:.6g}; pruned "
                 f"{theory_pruned.mean():.6g} vs {result.mean:.6g}")
    cli.log.info(expected)

    png = png_path(args)
    plots.save_heatmaps(png, {"Q unpruned": q[np.ix_(order, order)], "R unpruned": r[order],
                              "E[Q] pruned": eq[np.ix_(order, order)], "E[R] pruned": er[order]},
                        suptitle=f"{label}; {title}")
    cli.log.info(f"heatmaps written to {png}")


if __name__ == "__main__":
    cli.run(main)
