"""The N → ∞ theory of a whole study, from its seeds alone: no data, no SGD, no masks.

For every data set and panel of a study the simulation draws a teacher (seed
`sweep.teacher_seed`), initialises a student (`sweep.init_seed`), trains it by online SGD for
α_end = epochs · P / N, and prunes it, rows rescaled to norm √N first when rescale = 1. Here
each step is replaced by its theory:
- the start: the order parameters Q0 = W0 W0ᵀ / N, R0 = W0 W*ᵀ / N, T = W* W*ᵀ / N and v0 of
  the seeded teacher and initial student, at the study's finite N, exactly the simulation's
  starting point (only the M × N and K × N weights are drawn, never the P × N inputs);
- training: the order-parameter ODEs (theory/order_param_odes.py) from there to α_end, with
  the study's η, the data set's σ, and v trained (mode normal) or frozen (soft_committee);
- pruning: theory/pruning_limit.pruned_losses at the ODE's end point (Q, R rescaled by
  expectations.rescale_order_parameters when rescale = 1), every method at every budget of
  the panel (edge methods keep the fraction e / N, e = sweep.budget(method, nodes, N, K)),
  with and without reweighting; the test loss is ε_g + σ²/2.
`theory_at` applies the same pruning theory to a trained student's own order parameters.
"""
import concurrent.futures
import multiprocessing

import numpy as np
import torch

from dpp_pruning.base.data import teacher_weights
from dpp_pruning.experiments import sweep
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory import order_param_odes
from dpp_pruning.theory.expectations import rescale_order_parameters
from dpp_pruning.theory.order_params import order_parameters
from dpp_pruning.theory.pruning_limit import pruned_losses
from dpp_sample_ts import PRUNERS


def _teacher_first_layer(study, dataset):
    """(w* (M, N) float32 array, v* (M,)): the first draw of generate_teacher's generator,
    seeded as generate_teacher seeds it for this data set (data.generate_teacher, device cpu)."""
    settings = sweep.teacher_settings(study, dataset)
    generator = torch.Generator(device="cpu").manual_seed(int(settings["seed"]))
    w1, w2 = teacher_weights(settings["input_dim"], settings["teacher_h_size"],
                             settings["mode"], settings["v_star"], generator)
    return w1.numpy(), w2.numpy().ravel()


def initial_order_parameters(study, dataset, student_h_size):
    """(q0 (K, K), r0 (K, M), t (M, M), v0 (K,), v_star (M,)) of the data set's seeded teacher
    and the seeded initial student of K = student_h_size nodes (workflow.initial_student), at
    the study's N: Q0 = W0 W0ᵀ / N, R0 = W0 W*ᵀ / N, T = W* W*ᵀ / N in float64 from the
    float32 weights, as the simulation computes them."""
    w_star, v_star = _teacher_first_layer(study, dataset)
    student = workflow.initial_student(study.input_dim, student_h_size, study.nonlinearity,
                                       study.mode,
                                       sweep.init_seed(study, dataset, student_h_size))
    w1 = student.w1.weight.detach().double().numpy()                          # (K, N)
    v0 = student.w2.weight.detach().double().numpy().ravel()                  # (K,)
    q0, r0, t = order_parameters(w1, w_star)
    return q0, r0, t, v0, v_star.astype(np.float64)


def training_alpha(study):
    """α_end = epochs · P / N: the SGD steps of training per input dimension."""
    return study.epochs * study.num_data / study.input_dim


def trained_order_parameters(study, dataset, student_h_size):
    """The ODEs integrated from the seeded start (`initial_order_parameters`) to α_end =
    epochs · P / N: an order_param_odes.Trajectory at α = (0, α_end). Raises
    order_param_odes.IntegrationError, naming the data set, K and the settings, when the
    integration fails or ends with non-finite order parameters."""
    start = initial_order_parameters(study, dataset, student_h_size)
    return _integrate(study, dataset, student_h_size, start)


def _integrate(study, dataset, student_h_size, start):
    """`trained_order_parameters` from its start (q0, r0, t, v0, v_star)."""
    q0, r0, t, v0, v_star = start
    alpha_end = training_alpha(study)
    where = (f"the training ODEs of student {dataset.student}, noise {dataset.noise:g}, "
             f"M = {sweep.teacher_size(study, dataset)}, K = {student_h_size} (lr {study.lr:g}, "
             f"v_star {study.v_star:g}, alpha_end {alpha_end:g})")
    try:
        trajectory = order_param_odes.integrate(q0, r0, t, v0, v_star, study.lr,
                                                [0.0, alpha_end], dataset.noise,
                                                train_v=study.mode != "soft_committee")
    except order_param_odes.IntegrationError as e:
        raise order_param_odes.IntegrationError(
            f"{where} could not be integrated ({e}); use a smaller lr or v_star") from None
    final = (trajectory.q[-1], trajectory.r[-1], trajectory.v[-1])
    if not all(np.isfinite(a).all() for a in final):
        raise order_param_odes.IntegrationError(
            f"{where} ended with non-finite order parameters; use a smaller lr or v_star")
    return trajectory


def edge_fraction(method, nodes, input_dim, student_h_size):
    """The fraction e / N of each node's incoming weights that an edge method keeps for a
    node budget: e = sweep.budget(method, nodes, N, K)."""
    return sweep.budget(method, nodes, input_dim, student_h_size) / input_dim


def theory_losses(study, panel, q, r, t, v, v_star, noise, rescale):
    """{(method, nodes kept, reweighting): ε_g + σ²/2 at N → ∞} for all six methods
    (sweep.ALL_METHODS), every node budget of the panel and every reweighting of the study,
    for the student q (K, K), r (K, M), t (M, M), v (K,), v_star (M,) as trained; with
    rescale = 1 it is pruned with its rows rescaled to norm √N (Q_ii = 1). Node methods keep
    `nodes` nodes; edge methods the fraction e / N (`edge_fraction`). pruning_limit.pruned_losses
    gives ε_g; σ = noise."""
    if rescale:
        q, r = rescale_order_parameters(q, r)
    n, size = study.input_dim, panel.student_h_size
    budgets = {}                                          # method -> {nodes: budget}
    for method in sweep.ALL_METHODS:
        edge = PRUNERS[method].granularity == "edge"
        budgets[method] = {nodes: edge_fraction(method, nodes, n, size) if edge else nodes
                           for nodes in panel.node_budgets}
    flags = tuple(bool(rw) for rw in study.reweighting)
    eps = pruned_losses({m: sorted(set(b.values())) for m, b in budgets.items()}, q, r, t, v,
                        v_star, flags, study.importance_rule, study.nonlinearity)
    noise_term = 0.5 * float(noise) ** 2
    return {(method, nodes, rw): eps[(method, value, bool(rw))] + noise_term
            for method, chosen in budgets.items() for nodes, value in chosen.items()
            for rw in study.reweighting}


def theory_at(study, panel, w1, w2, w_star, v_star, noise, rescale):
    """theory_losses at a trained student's own order parameters: w1 (K, N), w2 (K,) or
    (1, K) as trained (before any rescaling), w_star (M, N), v_star (M,): the pruning
    theory's prediction for that student, without the training ODEs."""
    q, r, t = order_parameters(w1, w_star)
    v = np.ravel(np.asarray(w2, dtype=np.float64))
    return theory_losses(study, panel, q, r, t, v, np.ravel(v_star), noise, rescale)


def _rows(study, group, trajectory):
    """The rows of one group from its data set and panel's trajectory (`group_theory`)."""
    d, panel = group.dataset, sweep.group_panel(study, group)
    n, size = study.input_dim, panel.student_h_size
    losses = theory_losses(study, panel, trajectory.q[-1], trajectory.r[-1], trajectory.t,
                           trajectory.v[-1], trajectory.v_star, d.noise, group.rescale)
    fields = dict(student=d.student, noise=d.noise,
                  teacher_h_size=sweep.teacher_size(study, d), student_h_size=size,
                  rescale=group.rescale)
    unpruned = float(trajectory.test_loss[-1])
    rows = []
    for (method, nodes, rw), loss in losses.items():
        k = sweep.budget(method, nodes, n, size)
        rows.append(dict(fields, method=method, reweighting=rw, k=k, nodes_equivalent=nodes,
                         fraction_kept=sweep.fraction_kept(method, k, n, size), theory=loss,
                         unpruned_theory=unpruned))
    return rows


def group_theory(study, group):
    """The rows of one expectation group (sweep.Group: data set, panel K, rescaling) from the
    ODEs alone: one dict per method (all six), node budget and reweighting, with student,
    noise, teacher_h_size (M), student_h_size, rescale, method, reweighting, k (the --k of
    that method, sweep.budget), nodes_equivalent, fraction_kept (sweep.fraction_kept),
    theory (ε_g + σ²/2 of the pruned student at N → ∞) and unpruned_theory (the ODEs' final
    ε_g + σ²/2 of the trained student, before rescaling)."""
    trajectory = trained_order_parameters(study, group.dataset, group.student_h_size)
    return _rows(study, group, trajectory)


def _pair_rows(study, dataset, student_h_size, groups, start):
    """The rows of each of `groups` (one data set and K) from one integration from `start`."""
    trajectory = _integrate(study, dataset, student_h_size, start)
    return [_rows(study, group, trajectory) for group in groups]


def study_theory(study, jobs=1):
    """Every group_theory row of a study (all students, data sets, panels, rescalings), in
    the order of sweep.groups(study). The ODEs run once per (data set, K), their rescalings
    sharing the trajectory; with jobs > 1 those pairs are spread over `jobs` processes, the
    widest panels first (an ODE evaluation costs O(K² (K + M)²)), each given its start,
    drawn here, so that the workers never use torch. They are forked from multiprocessing's
    fork server, which imports this module once per process (about 2 s, on the first such
    call only), not from the caller, whose other threads a fork would not carry; where there
    is no fork server (Windows) they are spawned, each importing the module."""
    groups = sweep.groups(study)
    pairs = {}                                       # (data set, K) -> its groups
    for group in groups:
        pairs.setdefault((group.dataset, group.student_h_size), []).append(group)
    work = {pair: (study, *pair, chosen, initial_order_parameters(study, *pair))
            for pair, chosen in pairs.items()}
    if jobs > 1 and len(pairs) > 1:
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
        else:
            context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(pairs)),
                                                    mp_context=context) as pool:
            futures = {pair: pool.submit(_pair_rows, *work[pair])
                       for pair in sorted(pairs, key=lambda pair: -pair[1])}
            results = {pair: future.result() for pair, future in futures.items()}
    else:
        results = {pair: _pair_rows(*args) for pair, args in work.items()}
    found = {}
    for pair, rows in results.items():
        found.update(zip(pairs[pair], rows, strict=True))
    return [row for group in groups for row in found[group]]
