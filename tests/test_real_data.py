"""real_data.py and its modules: offline, on the bundled digits set and on tiny MNIST and
CIFAR-10 files written here in torchvision's on-disk formats."""
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import threadpoolctl
import torch
from scipy.spatial.distance import cdist

from dpp_pruning.base import cli
from dpp_pruning.real_data import first_layer_pruning as pruning
from dpp_pruning.real_data import image_datasets as datasets
from dpp_pruning.real_data import mlp_training as mlp
from dpp_pruning.real_data import real_data_sweep as experiments
from dpp_sample_ts import draw_masks, gaussian_kernels, reweight_edges_batched, reweight_nodes
from models import MLP, MLP_SIZES
from reference import reference_reweight_edges

# ----------------------------------------------------------------------------------------
# Tiny datasets in torchvision's formats


def write_mnist(root, n_train=48, n_test=24, seed=0):
    """Uncompressed idx-ubyte files in <root>/MNIST/raw, the names torchvision 0.29 reads
    (it only looks for the .gz names when downloading)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + labels.tobytes())


def write_cifar10(root, per_batch=8, seed=0):
    """The python pickle batches in <root>/cifar-10-batches-py: data (n, 3072) uint8 in
    (C, H, W) order, labels a list, and batches.meta with label_names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def cifar_md5_patch(folder):
    """Python source run before real_data.main in the subprocess: it replaces CIFAR10's
    class-level md5 table (train_list, test_list, meta), the attributes torchvision's own
    CIFAR100 subclass overrides, with the md5 sums of our tiny files. torchvision still checks
    every file against the table; only the expected sums change, and only in that process."""
    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()
    train = [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    return ("import torchvision.datasets as d; "
            f"d.CIFAR10.train_list = {train!r}; "
            f"d.CIFAR10.test_list = [['test_batch', {md5('test_batch')!r}]]; "
            f"d.CIFAR10.meta = dict(d.CIFAR10.meta, md5={md5('batches.meta')!r}); ")


def run_cli(root, args, prelude=None, then=()):
    """python3 real_data.py ARGS in the repository root. With a prelude, one Python process
    runs the prelude's statements and then the same entry point through runpy, once for ARGS
    and once for each further argument list in `then`."""
    if prelude is None:
        cmd = [sys.executable, "real_data.py", *args]
    else:
        code = prelude + "import runpy, sys; "
        for argv in (args, *then):
            code += (f"sys.argv = ['real_data.py'] + {list(argv)!r}; "
                     "runpy.run_path('real_data.py', run_name='__main__'); ")
        cmd = [sys.executable, "-c", code]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """numpy's BLAS on one thread: these problems are small, and extra threads only spin."""
    with threadpoolctl.threadpool_limits(1):
        yield


def result_rows(path):
    return experiments.read_results(str(path))


# ----------------------------------------------------------------------------------------
# (1) MNIST and CIFAR-10 code paths through the command line


def test_mnist_cli_trains_and_prunes(tmp_path, root):
    write_mnist(tmp_path / "data")
    common = ["--dataset", "mnist", "--data_root", str(tmp_path / "data"),
              "--output_dir", str(tmp_path), "--device", "cpu", "--threads", "1"]
    out = run_cli(root, common + ["--procedure", "training", "--epochs", "1", "--batch_size", "16"])
    assert out.returncode == 0, out.stderr
    assert "epoch 1: train accuracy" in out.stdout
    assert (tmp_path / "mnist_mlp.pth").exists()
    out = run_cli(root, common + ["--procedure", "pruning", "--pruning_choice", "importance_edge",
                                  "--k", "20", "--reweighting", "1", "--rounds", "2"])
    assert out.returncode == 0, out.stderr
    rows = result_rows(tmp_path / "real_data_results.csv")
    assert len(rows) == 4                                        # 2 rounds x reweighting 0, 1
    assert {(r["method"], r["k"], r["reweighting"]) for r in rows} == \
        {("importance_edge", "20", "0"), ("importance_edge", "20", "1")}
    assert all(r["dataset"] == "mnist"
               and float(r["kept_fraction"]) == pytest.approx(20 / 784, rel=1e-5)
               for r in rows)


def test_cifar10_cli_trains_and_sweeps(tmp_path, root):
    folder = write_cifar10(tmp_path / "data")
    common = ["--dataset", "cifar10", "--data_root", str(tmp_path / "data"),
              "--output_dir", str(tmp_path), "--device", "cpu", "--threads", "1"]
    # without the patch torchvision's md5 check refuses the tiny files, with a clear message
    with pytest.raises(cli.UserError, match="md5"):
        datasets.load_dataset("cifar10", str(tmp_path / "data"))
    patch = cifar_md5_patch(folder)
    out = run_cli(root, common + ["--procedure", "training", "--epochs", "1", "--batch_size", "8"],
                  prelude=patch,
                  then=[common + ["--procedure", "sweep", "--methods", "dpp_node,random_edge",
                                  "--fractions", "0.01", "--rounds", "1"]])
    assert out.returncode == 0, out.stderr
    assert "epoch 1: train accuracy" in out.stdout and "sweep: 4 new rows" in out.stdout
    rows = result_rows(tmp_path / "real_data_results.csv")
    assert sorted((r["method"], r["k"], r["reweighting"]) for r in rows) == [
        ("dpp_node", "252", "0"), ("dpp_node", "252", "1"),
        ("random_edge", "31", "0"), ("random_edge", "31", "1")]
    assert all(0 <= float(r["test_error"]) <= 100 for r in rows)


# (4) a missing dataset: exit status 2 and one line naming --data_root and --download


def test_missing_dataset_is_one_line(tmp_path, root):
    out = run_cli(root, ["--dataset", "mnist", "--data_root", str(tmp_path / "nothing"),
                         "--procedure", "training"])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "--data_root" in lines[0] and "--download" in lines[0]
    assert datasets.dataset_folder("mnist", str(tmp_path / "nothing")) in lines[0]
    # the same message for CIFAR-10 (cli.run turns UserError into that one line, exit 2)
    with pytest.raises(cli.UserError) as e:
        datasets.load_dataset("cifar10", str(tmp_path / "nothing"))
    text = str(e.value)
    assert "\n" not in text and "--data_root" in text and "--download" in text
    assert datasets.dataset_folder("cifar10", str(tmp_path / "nothing")) in text


# ----------------------------------------------------------------------------------------
# (2) every method with reweighting on digits


@pytest.fixture(scope="module")
def digits_setup():
    """A digits MLP trained with the preset (single-threaded: the model is tiny)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = datasets.load_dataset("digits")
        model = mlp.build_model("digits", seed=0)
        p = mlp.PRESETS["digits"]
        mlp.train(model, data, batch_size=p["batch_size"], lr=p["lr"], momentum=p["momentum"],
                  epochs=p["epochs"], target_acc=p["target_acc"], seed=0)
        yield experiments.prepare("digits", model, data, beta=0.3, weights_id="test")
    finally:
        torch.set_num_threads(threads)


def test_digits_split_and_training(digits_setup):
    data = digits_setup.data
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    assert digits_setup.unpruned_error < 8.0


def preactivation_error(w_ref, w_new, gram):
    """Mean over training samples of ||(W_ref - W_new) x||^2 = trace(E G E^T), E = W_ref - W_new:
    how well a pruned first layer reproduces the trained pre-activations (bias unchanged)."""
    e = np.asarray(w_ref, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)
    return float(np.einsum("id,de,ie->", e, gram, e))


@pytest.mark.parametrize("method", pruning.METHODS)
def test_every_method_on_digits(digits_setup, method):
    s = digits_setup
    h, d = s.drawer.hidden, s.drawer.inputs
    w0 = s.model.layers[0].weight.detach().double().numpy()
    for fraction in (0.2, 0.9):
        k = pruning.k_for_fraction(method, fraction, h, d)
        masks = s.drawer.draw(method, [k], range(2), seed=3)
        rows = experiments.evaluate_cell(s, method, k, range(2), 3, (0, 1), masks, fraction)
        assert len(rows) == 4
        assert all(row["fraction"] == fraction and row["k"] == k for row in rows)
        for r in range(2):
            keep = masks[k, r]
            assert keep.shape == (h, d)
            if pruning.granularity(method) == "node":
                assert np.all(keep.all(axis=1) | ~keep.any(axis=1))    # whole rows
                assert keep.any(axis=1).sum() == k
            else:
                assert np.all(keep.sum(axis=1) == k)                   # random_edge too
            if pruning.granularity(method) == "edge":
                plain = pruning.prune_first_layer(s.model, keep, method, False, s.stats)
                fitted = pruning.prune_first_layer(s.model, keep, method, True, s.stats)
                w_plain = plain.layers[0].weight.detach().double().numpy()
                w_fit = fitted.layers[0].weight.detach().double().numpy()
                assert np.all(w_fit[~keep] == 0)
                e_plain = preactivation_error(w0, w_plain, s.stats.gram)
                e_fit = preactivation_error(w0, w_fit, s.stats.gram)
                assert e_fit <= e_plain * (1 + 1e-5) + 1e-9
        if fraction == 0.9:
            for row in rows:
                assert row["test_error"] <= s.unpruned_error + 3.0, row


@pytest.mark.parametrize("dataset, inputs, hidden, edges, nodes", [
    ("mnist", 784, 500, (79, 706), (225, 469)),
    ("cifar10", 3072, 1000, (308, 2765), (320, 924)),
])
def test_budgets_of_the_original(dataset, inputs, hidden, edges, nodes):
    """p = 10%..90% of the remaining parameters: e inputs per node (edge methods), n nodes."""
    e = [pruning.k_for_fraction("dpp_edge", p, hidden, inputs) for p in experiments.FRACTIONS]
    n = [pruning.k_for_fraction("dpp_node", p, hidden, inputs) for p in experiments.FRACTIONS]
    assert (e[0], e[-1]) == edges and (n[0], n[-1]) == nodes
    assert e == sorted(set(e)) and n == sorted(set(n))           # strictly increasing
    for p, e_p, n_p in zip(experiments.FRACTIONS, e, n, strict=True):
        # n nodes (D inputs + H outgoing weights each) hold the parameters of H nodes with
        # floor(p D) inputs each, to within one node
        budget = hidden * (int(p * inputs + 1e-9) + hidden)
        assert n_p * (inputs + hidden) <= budget < (n_p + 1) * (inputs + hidden)
        assert e_p - 1 < p * inputs <= e_p
        assert pruning.nominal_fraction("random_node", n_p, hidden, inputs) == n_p / hidden
    assert MLP_SIZES[dataset][:2] == (inputs, hidden)


def test_random_edge_keeps_a_uniform_subset_per_node():
    rng = np.random.default_rng(0)
    draws = np.stack([pruning.random_edge_masks(3, 10, 4, rng) for _ in range(3000)])
    assert np.all(draws.sum(axis=2) == 4)                         # exactly k per node
    freq = draws.mean(axis=0)                                     # (3, 10), 0.4 expected
    assert np.abs(freq - 0.4).max() < 5 * np.sqrt(0.4 * 0.6 / 3000)
    pairs = draws[:, 0, :, None] & draws[:, 0, None, :]           # P(a, b kept) = 4*3/(10*9)
    off = pairs.mean(axis=0)[~np.eye(10, dtype=bool)]
    assert np.abs(off - 12 / 90).max() < 5 * np.sqrt(12 / 90 * (1 - 12 / 90) / 3000)


def test_importance_node_ranks_by_mean_absolute_outgoing_weight(digits_setup):
    s = digits_setup
    w_out = s.model.layers[1].weight.detach().double().numpy()      # (100, 100)
    k = pruning.k_for_fraction("importance_node", 0.5, s.drawer.hidden, s.drawer.inputs)
    keep = s.drawer.draw("importance_node", [k], [0], seed=0)[k, 0].any(axis=1)
    score = np.abs(w_out).mean(axis=0)
    assert keep.sum() == k and score[keep].min() >= score[~keep].max()


def test_masks_equal_the_registry_draws(digits_setup):
    """The cached k-DPP samplers give the registry's masks for the same kernels and generator."""
    s = digits_setup
    w1 = s.drawer.w1
    kernels = list(gaussian_kernels(torch.from_numpy(s.stats.gram), 0.3, 0.01,
                                    torch.from_numpy(w1)).numpy())
    for method, kern, k in (("dpp_edge", kernels, 20),
                            ("dpp_node", pruning.node_kernel(s.stats, 0.3), 30),
                            ("random_node", None, 30), ("importance_edge", None, 20)):
        masks = s.drawer.draw(method, [k], [0, 2], seed=5)
        for r in (0, 2):
            rng = pruning.round_rngs(5, r + 1)[r]
            ref = draw_masks(method, w1, s.drawer.out_importance, s.stats.gram, k, 1, rng,
                             kernels=kern)
            np.testing.assert_array_equal(masks[k, r], ref[0].T)


def test_dpp_edge_through_torch_eigh(digits_setup):
    """The GPU path (kernels and eigendecompositions by torch, KDPP.from_eig), run on CPU."""
    s = digits_setup
    drawer = pruning.MaskDrawer(s.model, s.stats, 0.3, node_batch=7, cache_bytes=0)
    drawer.eig_on_device = True
    masks = drawer.draw("dpp_edge", [5, 40], [0, 1], seed=2)
    assert set(masks) == {(5, 0), (5, 1), (40, 0), (40, 1)}
    for (k, _r), keep in masks.items():
        assert np.all(keep.sum(axis=1) == k)
    assert not np.array_equal(masks[5, 0], masks[5, 1])


def test_round_generators_do_not_depend_on_the_number_of_rounds():
    a = [g.random(3) for g in pruning.round_rngs(7, 5)]
    b = [g.random(3) for g in pruning.round_rngs(7, 2)]
    np.testing.assert_array_equal(a[:2], b)
    assert not np.array_equal(a[0], a[1])


def test_batched_reweighting_is_least_squares(digits_setup):
    """Edge reweighting of all nodes at once equals per-node least squares on the training
    inputs, with uneven kept counts, a node with no input left, one with all of them, and
    digits' always-zero pixels (left out of the systems: the minimum-norm solution)."""
    s = digits_setup
    rng = np.random.default_rng(0)
    w0 = s.drawer.w1                                             # (100, 64)
    keep = rng.random(w0.shape) < 0.3                            # uneven counts per node
    keep[0] = False                                              # a node with no input left
    keep[1] = True                                               # a node with all of them
    x = s.data.x_train.double().numpy()
    assert np.any(x.max(axis=0) == 0)                            # digits has blank pixels
    ours = reweight_edges_batched(w0, keep, s.stats.gram, max_bytes=64 * 1024)
    np.testing.assert_allclose(ours, reference_reweight_edges(w0, keep.T, x), rtol=1e-6,
                               atol=1e-8)
    nodes = rng.random(w0.shape[0]) < 0.4
    w_out = s.model.layers[1].weight.detach().double().numpy()  # (100, 100)
    ours = reweight_nodes(w_out, nodes, s.stats.act_gram)
    for row in (0, 17):
        np.testing.assert_allclose(ours[row], reweight_nodes(w_out[row], nodes, s.stats.act_gram),
                                   rtol=1e-9, atol=1e-12)


def test_sweep_resumes_and_pruning_replaces(digits_setup, tmp_path):
    csv_path = str(tmp_path / "r.csv")
    new = experiments.sweep(digits_setup, methods=("random_node", "dpp_edge"), fractions=(0.5,),
                    rounds=2, seed=1, results_path=csv_path)
    assert len(new) == 8 and len(experiments.read_results(csv_path)) == 8
    again = experiments.sweep(digits_setup, methods=("random_node", "dpp_edge"), fractions=(0.5,),
                      rounds=3, seed=1, results_path=csv_path)
    assert len(again) == 4                                       # only round 2 is new
    rows = experiments.read_results(csv_path)
    assert len(rows) == 12
    # a rerun of the same cell replaces its rows and reproduces them
    cell = experiments.evaluate_cell(digits_setup, "dpp_edge", 32, range(3), 1, (0, 1))
    experiments.merge_results(csv_path, cell, replace=True)
    after = experiments.read_results(csv_path)
    assert len(after) == 12
    assert {experiments.row_key(r): r["test_error"] for r in after} == \
        {experiments.row_key(r): r["test_error"] for r in rows}


def _row(method, k):
    return dict(dataset="digits", weights_id="w", method=method, reweighting=0, beta=0.3, seed=0,
                k=k, fraction=0.5, kept_fraction=0.5, round=0, test_error=1.0,
                unpruned_test_error=1.0)


def test_no_lock_file_outlives_a_merge(tmp_path):
    csv_path = str(tmp_path / "real_data_results.csv")
    lock = experiments.lock_path(csv_path)
    assert os.path.dirname(lock) == str(tmp_path) and os.path.basename(lock).startswith(".")
    experiments.merge_results(csv_path, [_row("dpp_node", 3)])
    assert sorted(os.listdir(tmp_path)) == ["real_data_results.csv"]
    # a merge that fails inside the lock (a CSV of other columns) removes the lock file too
    (tmp_path / "real_data_results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(cli.UserError):
        experiments.merge_results(csv_path, [_row("dpp_node", 3)])
    assert sorted(os.listdir(tmp_path)) == ["real_data_results.csv"]


def test_concurrent_merges_keep_every_row_and_leave_no_lock(tmp_path):
    csv_path = str(tmp_path / "r.csv")
    barrier = threading.Barrier(6)

    def merge(i):
        barrier.wait()
        for k in range(10):
            experiments.merge_results(csv_path, [_row(f"m{i}", k)])

    threads = [threading.Thread(target=merge, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(experiments.read_results(csv_path)) == 60
    assert sorted(os.listdir(tmp_path)) == ["r.csv"]


# ----------------------------------------------------------------------------------------
# (3) Gaussian kernels through Gram matrices equal the direct pairwise-distance kernels


def test_gaussian_kernels_match_pairwise_distances():
    torch.manual_seed(0)
    model = MLP((12, 7, 5, 3))
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((53, 12)).astype(np.float32))
    stats = pruning.first_layer_stats(model, x, chunk=10)                # several chunks
    X = x.double().numpy()
    W = model.layers[0].weight.detach().double().numpy()
    b = model.layers[0].bias.detach().double().numpy()
    beta, p = 0.7, len(X)
    edge = gaussian_kernels(torch.from_numpy(stats.gram), beta, 0.01, torch.from_numpy(W)).numpy()
    for i in range(W.shape[0]):
        a = X * W[i]                                                 # columns: weighted inputs
        direct = np.exp(-beta * cdist(a.T, a.T, "sqeuclidean") / p) + 0.01 * np.eye(12)
        np.testing.assert_allclose(edge[i], direct, rtol=1e-10, atol=1e-12)
    z = X @ W.T + b                                                  # pre-activations (P, H)
    direct = np.exp(-beta * cdist(z.T, z.T, "sqeuclidean") / p) + 0.01 * np.eye(7)
    np.testing.assert_allclose(pruning.node_kernel(stats, beta), direct, rtol=1e-10, atol=1e-12)
    a = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(stats.act_gram, a.T @ a / p, rtol=1e-10)
    np.testing.assert_allclose(stats.gram, X.T @ X / p, rtol=1e-10)
