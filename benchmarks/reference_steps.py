"""The reference steps of the benchmark: the original approach (tests/reference.py: per-sample
loops, autograd one sample at a time, kernels from materialised P x N products, dppy draws,
P x |S| least-squares reweighting) at a scale it can afford, extrapolated to the chosen scale,
each with checks that it and ours give the same results.
"""
import math

from timed_steps import check, file_bytes, load_masks, load_student, step, timed


def max_rel(a, b):
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def import_dppy():
    """Import dppy before any clock starts (the original imported it with its modules)."""
    import dppy.finite_dpps  # noqa: F401


def load_ref_data(work):
    import numpy as np
    with np.load(work.ref_data) as f:
        return {name: f[name] for name in f.files}


def sub_teacher(ref, rows):
    """A TeacherDataset on the first `rows` rows of the reference subset (and its test
    samples), with the exact float64 Gram matrix of those rows."""
    import numpy as np
    import torch

    from dpp_pruning.base.data import TeacherDataset
    arrays = {name: np.ascontiguousarray(ref[name]) for name in
              ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels")}
    arrays["inputs"], arrays["labels"] = arrays["inputs"][:rows], arrays["labels"][:rows]
    x = arrays["inputs"].astype(np.float64)
    return TeacherDataset(*(torch.from_numpy(arrays[name]) for name in
                            ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels")),
                          torch.from_numpy(x.T @ x / len(x)), dict(sig_w=0.0))


@step("ref_gen")
def step_ref_gen(cfg, work):
    import torch
    from scipy import stats

    from reference import reference_generate, reference_labels
    ref, n = load_ref_data(work), cfg["ref_samples"]
    out, seconds = timed(reference_generate, cfg["input_dim"], cfg["teacher_h_size"], n,
                         "normal", cfg["sig_w"], cfg["v_star"], 12345,
                         torch.from_numpy(ref["w1"]), torch.from_numpy(ref["w2"]))
    done = n + n // 10
    total = cfg["num_data"] + cfg["num_data"] // 10
    same = reference_labels(torch.from_numpy(ref["w1"]), torch.from_numpy(ref["w2"]),
                            torch.from_numpy(ref["inputs"][:n]), cfg["sig_w"]).numpy()
    err = max_rel(same, ref["labels"][:n])
    ks = stats.ks_2samp(out["labels"].numpy(), ref["labels"][:n]).pvalue
    x = out["inputs"].numpy()
    return dict(time=seconds, measured=f"{done} samples", extrapolated=seconds * total / done,
                factor=f"x{total / done:.0f} samples", data_read=file_bytes(work.ref_data),
                data_note="reference subset", checks=[
                    check("generation: labels of the same inputs, per-sample loop vs data.py",
                          err < 1e-5 if cfg["sig_w"] == 0 else True,
                          f"max rel err {err:.1e}" if cfg["sig_w"] == 0 else "noisy teacher"),
                    check("generation: fresh per-sample draws vs data.py, same distribution",
                          ks > 1e-3 and abs(x.mean()) < 5 / math.sqrt(x.size)
                          and abs(x.var() - 1) < 5 * math.sqrt(2 / x.size),
                          f"labels KS p = {ks:.2f}; inputs mean {x.mean():.1e}, var "
                          f"{x.var():.4f}")],
                info=dict(samples_per_s=done / seconds))


@step("ref_train")
def step_ref_train(cfg, work):
    import torch

    from dpp_pruning.base import training
    from models import Student
    from reference import reference_online_sgd
    ref, n = load_ref_data(work), cfg["ref_samples"]
    inputs, labels = torch.from_numpy(ref["inputs"][:n]), torch.from_numpy(ref["labels"][:n])

    def student():   # the initialisation workflow.train uses
        return Student(cfg["input_dim"], cfg["student_h_size"], "sigmoid", "normal",
                       torch.Generator().manual_seed(cfg["seed"]))

    slow, seconds = timed(reference_online_sgd, student(), inputs, labels, cfg["lr"])
    fast, fast_s = timed(training.online_sgd, student(), inputs, labels, cfg["lr"])
    err32 = max(max_rel(fast.w1.weight.detach(), slow.w1.weight.detach()),
                max_rel(fast.w2.weight.detach(), slow.w2.weight.detach()))
    m = min(n, 1000)
    slow64 = reference_online_sgd(student().double(), inputs[:m], labels[:m], cfg["lr"])
    fast64 = training.online_sgd(student().double(), inputs[:m], labels[:m], cfg["lr"])
    err64 = max(max_rel(fast64.w1.weight.detach(), slow64.w1.weight.detach()),
                max_rel(fast64.w2.weight.detach(), slow64.w2.weight.detach()))
    moved = max_rel(fast.w1.weight.detach(), student().w1.weight.detach())
    return dict(time=seconds, measured=f"{n} samples",
                extrapolated=seconds * cfg["num_data"] / n, factor=f"x{cfg['num_data'] / n:.0f}"
                " samples", data_read=file_bytes(work.ref_data), data_note="reference subset",
                checks=[check(f"training: weights after {n} samples, float32 autograd "
                              "reference vs ours", err32 < 1e-4 and moved > 1e-2,
                              f"max rel err {err32:.1e} (weights moved {moved:.2f})"),
                        check(f"training: weights after {m} samples, float64 autograd "
                              "reference vs ours", err64 < 1e-8, f"max rel err {err64:.1e}")],
                info=dict(samples_per_s=n / seconds, ours_same_samples_s=fast_s))


@step("ref_prune_dpp_node")
def step_ref_prune_node(cfg, work):
    import numpy as np

    from dpp_pruning.pipeline import workflow
    from dpp_sample_ts import node_kernel
    from reference import reference_kdpp_draws, reference_node_kernel
    import_dppy()
    ref = load_ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    w1 = workflow.rescaled(load_student(work)).w1.weight.detach().double().numpy()
    kernel, kernel_s = timed(reference_node_kernel, w1, x)
    (draws, failures), draw_s = timed(reference_kdpp_draws, kernel, cfg["k_node"],
                                      cfg["num_masks"], cfg["seed"])
    x64 = x.astype(np.float64)
    err = max_rel(node_kernel(w1, x64.T @ x64 / len(x)), kernel)
    scale = cfg["num_data"] / len(x)
    return dict(time=kernel_s + draw_s, parts={"kernel": kernel_s, "dppy draws": draw_s},
                measured=f"kernel on {len(x)} rows + {cfg['num_masks']} dppy draws",
                extrapolated=kernel_s * scale + draw_s, factor=f"kernel x{scale:.0f} rows",
                data_read=file_bytes(work.ref_data, work.student), data_note="reference subset",
                checks=[check("dpp_node kernel: W G W^T vs (1/P)(XW^T)^T(XW^T), same rows",
                              err < 1e-10, f"max rel err {err:.1e}")],
                info=dict(dppy_failures=failures, dppy_draws=cfg["num_masks"]))


def _per_sample_test(cfg, work, choice, k):
    """Reference per-mask, per-sample testing of `ref_masks` masks on `ref_test` samples."""
    import numpy as np
    import torch

    from dpp_pruning.pipeline import workflow
    from reference import reference_test_masks
    ref = load_ref_data(work)
    unpruned, masks = load_masks(work, choice, k)
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy()
    some = np.stack(masks[:cfg["ref_masks"]])
    granularity = "node" if choice.endswith("node") else "edge"
    losses, seconds = timed(reference_test_masks, w1, w2, some, torch.from_numpy(
        ref["test_inputs"]), torch.from_numpy(ref["test_labels"]), "sigmoid", "normal",
        granularity)
    ours = workflow.test_masks(sub_teacher(ref, cfg["ref_rows"]), unpruned, some,
                               choice).losses
    err = max_rel(ours, losses)
    num_test = cfg["num_data"] // 10
    scale = (num_test / len(ref["test_labels"])) * (cfg["num_masks"] / len(some))
    return dict(time=seconds, measured=f"{len(some)} masks x {len(ref['test_labels'])} samples",
                extrapolated=seconds * scale, factor=f"x{scale:.0f} mask-samples",
                data_read=file_bytes(work.ref_data, work.masks(choice, k)),
                data_note="reference subset + masks",
                checks=[check(f"testing {choice}: batched test_masks vs per-mask per-sample "
                              "reference, same masks and samples", err < 1e-4,
                              f"max rel err {err:.1e}")])


@step("ref_test_dpp_node")
def step_ref_test_node(cfg, work):
    return _per_sample_test(cfg, work, "dpp_node", cfg["k_node"])


def _ref_prune_edge(cfg, work, k):
    import numpy as np

    from dpp_pruning.pipeline import workflow
    from dpp_sample_ts import KDPP, edge_kernel, exact_inclusion_probabilities
    from reference import reference_edge_kernels, reference_kdpp_draws
    import_dppy()
    ref = load_ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    w1 = workflow.rescaled(load_student(work)).w1.weight.detach().double().numpy()
    kernels, kernel_s = timed(reference_edge_kernels, w1, x)
    x64 = x.astype(np.float64)
    gram = x64.T @ x64 / len(x)
    err = max(max_rel(edge_kernel(w1[i], gram), kernels[i]) for i in range(len(w1)))
    del x64
    # dppy on node 0's kernel: one FiniteDPP set-up (eigh, polynomials) and per-draw cost.
    (_, fail1), first_s = timed(reference_kdpp_draws, kernels[0], k, 1, 0)
    (_, fails), many_s = timed(reference_kdpp_draws, kernels[0], k, 1 + cfg["ref_draws"], 1)
    per_draw = max(many_s - first_s, 0.0) / cfg["ref_draws"]
    setup = max(first_s - per_draw, 0.0)
    num_nodes = len(w1)
    draws_extrap = num_nodes * setup + num_nodes * cfg["num_masks"] * per_draw
    scale = cfg["num_data"] / len(x)
    # The original built its kernels in float32: dppy refuses rounding-negative eigenvalues.
    x32 = x.astype(np.float32)
    fails32 = 0
    for i in range(num_nodes):
        a = x32 * w1[i].astype(np.float32)
        _, f = reference_kdpp_draws(a.T @ a / np.float32(len(x)), k, 2, i)
        fails32 += f
    # The sampler, by distribution, on a small well-conditioned kernel.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    small = (q * np.geomspace(0.2, 5.0, 8)) @ q.T
    exact = exact_inclusion_probabilities(small, 3)
    num = 3000
    ours = KDPP(small).sample_many(3, num, rng)
    theirs, small_fail = reference_kdpp_draws(small, 3, num, 0)
    se = np.sqrt(exact * (1 - exact) / num)
    dev = [float(np.max(np.abs(np.bincount(d.ravel(), minlength=8) / len(d) - exact) / se))
           for d in (ours, theirs)]
    return dict(time=kernel_s + many_s, parts={"kernels": kernel_s, "dppy set-up": setup,
                                               "dppy per draw": per_draw},
                measured=f"kernels on {len(x)} rows; dppy 1 set-up + {cfg['ref_draws']} draws",
                extrapolated=kernel_s * scale + draws_extrap,
                factor=f"kernels x{scale:.0f} rows; draws to {num_nodes}x{cfg['num_masks']}",
                data_read=file_bytes(work.ref_data, work.student), data_note="reference subset",
                checks=[check("dpp_edge kernels: diag(w) G diag(w) vs materialised "
                              "(1/P)(X diag w)^T(X diag w), same rows", err < 1e-10,
                              f"max rel err {err:.1e} over {num_nodes} nodes"),
                        check("k-DPP sampler: ours and dppy vs exact inclusion probabilities "
                              "(n = 8, k = 3)", max(dev) < 5 and small_fail == 0,
                              f"max deviation ours {dev[0]:.1f} SE, dppy {dev[1]:.1f} SE "
                              f"({num} draws each)")],
                info=dict(dppy_failures_float64=fail1 + fails,
                          dppy_float32_kernel_failures=f"{fails32}/{2 * num_nodes}",
                          original_kernel_tensor_GB=num_nodes * cfg["num_data"]
                          * cfg["input_dim"] * 4 / 1e9))


@step("ref_random_edge_rw")
def step_ref_random_edge_rw(cfg, work):
    import numpy as np
    import torch

    from dpp_pruning.pipeline import workflow
    from dpp_sample_ts import reweight_edges, reweight_nodes
    from reference import (
        reference_hidden_activations,
        reference_reweight_edges,
        reference_reweight_nodes,
        reference_test_masks,
    )
    ref = load_ref_data(work)
    x = ref["inputs"][:cfg["ref_rows"]]
    unpruned, masks = load_masks(work, "random_edge", cfg["k_rw"])
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy().ravel()
    some = np.stack(masks[:cfg["ref_rw_masks"]])
    fits, fit_s = timed(lambda: [reference_reweight_edges(w1, m, x) for m in some])
    test_inputs, test_labels = (torch.from_numpy(ref["test_inputs"]),
                                torch.from_numpy(ref["test_labels"]))
    # per-sample testing of the first reweighted student (its mask is already applied)
    losses, test_s = timed(reference_test_masks, fits[0], w2, np.ones_like(some[:1]),
                           test_inputs, test_labels)
    x64 = x.astype(np.float64)
    gram = x64.T @ x64 / len(x)
    err_edge = max(max_rel(reweight_edges(w1, m.astype(bool), gram), f)
                   for m, f in zip(some, fits, strict=True))
    sub = sub_teacher(ref, len(x))
    ours = workflow.test_masks(sub, unpruned, some[:1], "random_edge", True).losses
    err_loss = max_rel(ours, losses)
    keep = np.zeros(len(w2), dtype=bool)
    keep[: cfg["k_node"]] = True
    a = reference_hidden_activations(w1, x)
    err_node = max_rel(reweight_nodes(w2, keep, a.T @ a / len(x)),
                       reference_reweight_nodes(w1, w2, keep, x))
    num_test = cfg["num_data"] // 10
    fit_scale = cfg["num_data"] / len(x) * cfg["num_masks"] / len(some)
    test_scale = num_test / len(test_labels) * cfg["num_masks"]
    return dict(time=fit_s + test_s, parts={"lstsq reweighting": fit_s,
                                            "per-sample test": test_s},
                measured=f"lstsq on {len(x)} rows x {len(some)} mask; test {len(test_labels)}"
                " samples x 1 mask", extrapolated=fit_s * fit_scale + test_s * test_scale,
                factor=f"lstsq x{fit_scale:.0f}; test x{test_scale:.0f}",
                data_read=file_bytes(work.ref_data, work.masks("random_edge", cfg["k_rw"])),
                data_note="reference subset + masks",
                checks=[check("edge reweighting: G_SS^-1 G_SR w_R vs direct lstsq on the same "
                              "rows", err_edge < 1e-8, f"max rel err {err_edge:.1e}"),
                        check("node reweighting: H_SS^-1 H_SR vs direct lstsq on activations",
                              err_node < 1e-8, f"max rel err {err_node:.1e}"),
                        check("testing with edge reweighting: batched vs per-sample reference",
                              err_loss < 1e-4, f"max rel err {err_loss:.1e}")],
                info=dict(original_lstsq_matrix_GB=cfg["num_data"] * cfg["k_rw"] * 8 / 1e9))


@step("ref_evaluate")
def step_ref_evaluate(cfg, work):
    import numpy as np
    import torch

    from dpp_pruning.theory.order_params import order_parameters
    from reference import reference_order_parameters, reference_test_masks
    ref = load_ref_data(work)
    unpruned, masks = load_masks(work, "dpp_node", cfg["k_node"])
    w1 = unpruned.w1.weight.detach().double().numpy()
    w2 = unpruned.w2.weight.detach().double().numpy()
    stacked = np.stack(masks)
    (eq, er), order_s = timed(reference_order_parameters, w1, stacked, ref["w1"])
    some = stacked[:cfg["ref_masks"]]
    _, test_s = timed(reference_test_masks, w1, w2, some, torch.from_numpy(ref["test_inputs"]),
                      torch.from_numpy(ref["test_labels"]), "sigmoid", "normal", "node")
    q, r, _ = order_parameters(w1[None] * np.swapaxes(stacked, 1, 2), ref["w1"])
    err = max(max_rel(q.mean(0), eq), max_rel(r.mean(0), er))
    num_test = cfg["num_data"] // 10
    test_scale = num_test / len(ref["test_labels"]) * cfg["num_masks"] / len(some)
    return dict(time=order_s + test_s, parts={"per-mask Q, R": order_s,
                                              "per-sample test": test_s},
                measured=f"Q, R of {len(stacked)} masks; test {len(some)} masks x "
                f"{len(ref['test_labels'])} samples", extrapolated=order_s + test_s * test_scale,
                factor=f"test x{test_scale:.0f}", data_read=file_bytes(work.ref_data,
                                                                       work.masks("dpp_node",
                                                                                  cfg["k_node"])),
                data_note="reference subset + masks",
                checks=[check("expected Q, R over masks: batched vs per-mask loop",
                              err < 1e-12, f"max rel err {err:.1e}")])


def ref_edge_step(name):
    k = int(name.rsplit("_", 1)[1])
    if name.startswith("ref_prune"):
        return lambda cfg, work: _ref_prune_edge(cfg, work, k)
    return lambda cfg, work: _per_sample_test(cfg, work, "dpp_edge", k)
