"""Real-data experiments: train sigmoid MLPs, prune their first layer, measure test error.

The library behind `real_data.py`; notebooks and tests call the same functions.

Datasets (`load_dataset`):
- `digits`: scikit-learn's bundled 8x8 digits (1797 images, offline), pixels scaled to
  [0, 1], a fixed stratified split of 1347 training / 450 test images; MLP 64-100-100-10.
- `mnist`, `cifar10`: torchvision's MNIST / CIFAR10 read from `data_root` (downloaded there
  with `download=True`), pixels scaled to [0, 1] (what `transforms.ToTensor` gives, no
  further normalisation), flattened in (C, H, W) order; MLPs 784-500-500-10 and
  3072-1000-1000-1000-10.
Everything is held in memory as float32 tensors and batched by index, not by a DataLoader.

Pruning touches only the first layer, `layers.0.weight` W (H, D), H hidden nodes fed by D
inputs; in the conventions of `dpp_sample_ts` that is w1 = W (K = H nodes, N = D inputs).
A first-layer mask is an (H, D) bool array `keep`, keep[i, j] keeping W[i, j] (the transpose
of the registry's (N, K) masks).
- Edge methods keep k inputs per hidden node (random_edge: each weight with probability k/D).
- Node methods keep k hidden nodes: a removed node's row of W is zeroed. Only W is pruned,
  so without reweighting the node keeps its bias and outgoing weights and sends the constant
  sigmoid(b_i) on (what a mask on the first layer's weights alone amounts to). With
  reweighting its outgoing weights are folded into the kept nodes and zeroed, which removes
  it altogether. importance_node ranks nodes by the L2 norm of their outgoing weights
  (columns of `layers.1.weight`).

DPP kernels are Gaussian, L = exp(-beta d(p, q)) + eps I with eps = 0.01, and the squared
distances d are per-sample means, ||a_p - a_q||^2 / P over the P training samples, so that
beta does not depend on the size of the training set. They come from Gram matrices built in
one chunked pass over the training inputs X (P, D) (`first_layer_stats`):
- dpp_edge, node i: columns a_p = w_ip x_p of X diag(w_i), d = w_p^2 G_pp + w_q^2 G_qq
  - 2 w_p w_q G_pq with G = X^T X / P, i.e. gaussian_kernel(G * outer(w_i, w_i), beta).
- dpp_node: columns of the pre-activations Z = X W^T + b (P, H): gaussian_kernel(Z^T Z / P).
No P x D x D or H x P x D tensor is ever formed.

Randomness: round r of a (method, k) cell draws its single mask from its own generator,
np.random.default_rng(np.random.SeedSequence(seed).spawn(r + 1)[r]) (`round_rngs`), so a
result row depends only on (seed, method, k, round): more rounds, another fraction list or a
resumed sweep reproduce the rows already there. Masks are shared by reweighting 0 and 1.
DPP draws are exact in distribution but bitwise reproducible only with the same
eigendecomposition: Gaussian kernels close to J + eps I have nearly degenerate eigenspaces
whose basis can change with the BLAS thread count or the device.

Results are rows of a CSV (RESULT_FIELDS); writes replace the whole file atomically under an
advisory lock, so a killed run leaves the old or the new file and concurrent runs do not lose
each other's rows.
"""
import contextlib
import csv
import fcntl
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from cli import UserError
from dpp_sample_ts import KDPP, PRUNERS, draw_masks, gaussian_kernel, reweight_nodes
from models import MLP, MLP_SIZES
from storage import atomic_open, load_state_dict, save_state_dict

log = logging.getLogger("dpp_pruning.real_data")

DATASETS = tuple(MLP_SIZES)                      # digits, mnist, cifar10
METHODS = tuple(PRUNERS)                         # the six pruning strategies
DPP_METHODS = ("dpp_node", "dpp_edge")
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))
EPS = 0.01                                       # the kernels' ridge, as in the original

# Training presets. mnist and cifar10 follow the paper (SGD lr 0.001, momentum 0.9, batch
# 1000 / 128, stop at 99% / 50% train accuracy, at most 10 epochs). digits is our offline
# default: with lr 0.001 a sigmoid MLP barely moves in 10 epochs on 1347 images, so it uses
# lr 0.1, batch 16 and up to 30 epochs, which reach 99% train accuracy (~97% test) in ~2 s.
PRESETS = {
    "digits": dict(batch_size=16, test_batch_size=1000, lr=0.1, momentum=0.9, epochs=30,
                   target_acc=99.0, dropout=0.0),
    "mnist": dict(batch_size=1000, test_batch_size=1000, lr=0.001, momentum=0.9, epochs=10,
                  target_acc=99.0, dropout=0.0),
    "cifar10": dict(batch_size=128, test_batch_size=1000, lr=0.001, momentum=0.9, epochs=10,
                    target_acc=50.0, dropout=0.0),
}

DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0

# ----------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    """A dataset in memory: x (P, D) float32 in [0, 1], y (P,) int64 class labels."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_dim(self):
        return self.x_train.shape[1]


# The files torchvision reads (without download) and the folder it expects them in.
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta")


def dataset_folder(name, data_root):
    """The folder under data_root where torchvision looks for the dataset's files."""
    if name == "mnist":
        return os.path.join(data_root, "MNIST", "raw")
    if name == "cifar10":
        return os.path.join(data_root, "cifar-10-batches-py")
    raise ValueError(f"{name} is not read from files")


def load_dataset(name, data_root="./data", download=False):
    """Load `name` (digits, mnist or cifar10) -> Data. Raises UserError for missing files."""
    if name not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if name == "digits":
        return _load_digits()
    return _load_torchvision(name, data_root, download)


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)                                   # (1797, 64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target)
    return Data("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def _where_to_put(name, data_root):
    folder = dataset_folder(name, data_root)
    files = MNIST_FILES if name == "mnist" else CIFAR10_FILES
    what = "MNIST idx-ubyte files (uncompressed)" if name == "mnist" else \
        "CIFAR-10 python batches"
    return (f"put the {what} {', '.join(files)} in {folder} (the folder torchvision expects "
            f"under --data_root {data_root})")


def _missing_message(name, data_root):
    return (f"{name} was not found: {_where_to_put(name, data_root)}, or add --download to "
            "fetch them")


def _load_torchvision(name, data_root, download):
    from torchvision import datasets
    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    folder = dataset_folder(name, data_root)
    files = MNIST_FILES if name == "mnist" else CIFAR10_FILES
    present = [f for f in files if os.path.isfile(os.path.join(folder, f))]
    if not download and len(present) < len(files):
        message = _missing_message(name, data_root)
        gz = [f for f in files if os.path.isfile(os.path.join(folder, f + ".gz"))]
        if name == "mnist" and gz:
            message += f" (found {gz[0]}.gz there: gunzip the .gz files in place)"
        raise UserError(message)
    try:
        train = cls(data_root, train=True, download=download)
        test = cls(data_root, train=False, download=download)
    except RuntimeError as e:
        if download and len(present) < len(files):
            raise UserError(f"downloading {name} into {data_root} failed ({_short(e)}); "
                            f"{_where_to_put(name, data_root)} by hand") from None
        if name == "cifar10":
            raise UserError(f"the CIFAR-10 files in {folder} fail torchvision's md5 check (not "
                            "the official batches, or corrupted); replace them with the "
                            "official cifar-10-batches-py or delete them and use --download") from None
        raise UserError(f"torchvision cannot read {name} from {folder} ({_short(e)}); "
                        "replace the files or use --download") from None
    except OSError as e:  # URLError and friends: no network
        raise UserError(f"downloading {name} failed ({_short(e)}); "
                        f"{_where_to_put(name, data_root)} by hand") from None
    except (ValueError, TypeError, AssertionError, EOFError) as e:
        raise UserError(f"the {name} files in {folder} cannot be read ({type(e).__name__}); "
                        "replace them or use --download") from None
    return Data(name, *_tensors(name, train), *_tensors(name, test))


def _short(error):
    """One line of at most 100 characters describing an exception."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:100]}" if text else type(error).__name__


def _tensors(name, ds):
    """torchvision dataset -> x (P, D) float32 in [0, 1] (C, H, W order), y (P,) int64."""
    if name == "mnist":
        x = torch.as_tensor(ds.data).reshape(len(ds.data), -1)                   # (P, 784)
    else:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        x = x.reshape(x.shape[0], -1)                                            # (P, 3072)
    return x.float().div_(255.0), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Models, training, evaluation


def build_model(dataset, dropout=0.0, seed=None):
    """The dataset's MLP (MLP_SIZES) with torch's default initialisation, seeded if asked."""
    if seed is not None:
        torch.manual_seed(seed)
    return MLP(MLP_SIZES[dataset], dropout)


@torch.no_grad()
def predictions(model, x, batch_size=1000, device="cpu"):
    """Predicted classes (P,) of model on x (P, D), evaluated in eval mode."""
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def error_percent(model, x, y, batch_size=1000, device="cpu"):
    """Classification error in % of model on (x, y)."""
    return 100.0 * (predictions(model, x, batch_size, device) != y).double().mean().item()


def train(model, data, *, batch_size, lr, momentum, epochs, target_acc, seed=0,
          test_batch_size=1000, device="cpu"):
    """Mini-batch SGD on cross-entropy; after every epoch the full training set is scored in
    eval mode and training stops once its accuracy (%) reaches target_acc, or after `epochs`.
    Returns one dict per epoch: epoch, train_acc (%), test_error (%), seconds."""
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.x_train.to(device), data.y_train.to(device)       # once, not per batch
    history = []
    for epoch in range(1, epochs + 1):
        start = time.time()
        model.train()
        for idx in torch.randperm(len(x), generator=gen).to(device).split(batch_size):
            xb, yb = x[idx], y[idx]
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not math.isfinite(loss.item()):
            raise UserError(f"training diverged (loss {loss.item()}) in epoch {epoch}; "
                            "use a smaller --lr")
        train_acc = 100.0 - error_percent(model, x, y.cpu(), test_batch_size, device)
        test_err = error_percent(model, data.x_test, data.y_test, test_batch_size, device)
        history.append(dict(epoch=epoch, train_acc=train_acc, test_error=test_err,
                            seconds=time.time() - start))
        log.info("epoch %d: train accuracy %.2f%%, test error %.2f%% (%.1f s)",
                 epoch, train_acc, test_err, time.time() - start)
        if train_acc >= target_acc:
            break
    return history


def save_weights(model, path):
    """Write the model's state_dict atomically (CPU tensors)."""
    save_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_weights(path, dataset, dropout=0.0):
    """The dataset's MLP with the weights in `path`; UserError when missing or mismatched."""
    if not os.path.exists(path):
        raise UserError(f"weights file {path} does not exist; train first with "
                        f"--procedure training --dataset {dataset} (or pass --weights)")
    state = load_state_dict(path)
    model = MLP(MLP_SIZES[dataset], dropout)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise UserError(f"weights file {path} does not hold a {dataset} MLP "
                        f"{'-'.join(map(str, MLP_SIZES[dataset]))}; pass the file that "
                        f"--procedure training --dataset {dataset} wrote")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise UserError(f"weights file {path} holds non-finite weights; train again")
    model.load_state_dict(state)
    return model


def weights_id(path):
    """First 12 hex digits of the SHA-256 of a weights file: ties result rows to weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------
# First-layer statistics (Gram matrices), kernels


@dataclass
class FirstLayerStats:
    """Per-sample means over the training inputs, float64 numpy:
    gram = X^T X / P (D, D), x_mean (D,), pre_gram = Z^T Z / P (H, H) with Z = X W^T + b,
    act_gram = A^T A / P (H, H) and act_mean (H,) with A = sigmoid(Z)."""
    gram: np.ndarray
    x_mean: np.ndarray
    pre_gram: np.ndarray
    act_gram: np.ndarray
    act_mean: np.ndarray
    num_samples: int


@torch.no_grad()
def first_layer_stats(model, x, device="cpu", chunk=4096):
    """One pass over x (P, D) in float64 chunks of `chunk` rows on `device`."""
    w = model.layers[0].weight.detach().to(device, torch.float64)               # (H, D)
    b = model.layers[0].bias.detach().to(device, torch.float64)                 # (H,)
    d, h = w.shape[1], w.shape[0]
    acc = dict(gram=torch.zeros(d, d), x_sum=torch.zeros(d), pre=torch.zeros(h, h),
               act=torch.zeros(h, h), act_sum=torch.zeros(h))
    acc = {k: v.to(device, torch.float64) for k, v in acc.items()}
    for start in range(0, len(x), chunk):
        xc = x[start:start + chunk].to(device, torch.float64)                   # (c, D)
        z = torch.addmm(b, xc, w.T)                                             # (c, H)
        a = torch.sigmoid(z)
        acc["gram"].addmm_(xc.T, xc)
        acc["x_sum"] += xc.sum(0)
        acc["pre"].addmm_(z.T, z)
        acc["act"].addmm_(a.T, a)
        acc["act_sum"] += a.sum(0)
    p = len(x)
    out = {k: (v / p).cpu().numpy() for k, v in acc.items()}
    sym = lambda m: (m + m.T) / 2                                               # noqa: E731
    return FirstLayerStats(sym(out["gram"]), out["x_sum"], sym(out["pre"]), sym(out["act"]),
                           out["act_sum"], p)


def edge_kernels(w_rows, gram, beta, eps=EPS):
    """Gaussian dpp_edge kernels of several nodes at once: w_rows (B, D), gram (D, D) torch
    float64 on one device -> (B, D, D), L_i = exp(-beta d_i) + eps I with
    d_i(p, q) = w_p^2 G_pp + w_q^2 G_qq - 2 w_p w_q G_pq (clipped at 0); equals
    dpp_sample_ts.gaussian_kernel(G * outer(w_i, w_i), beta, eps)."""
    diag = torch.diagonal(gram)                                                 # (D,)
    sq = w_rows ** 2 * diag                                                     # (B, D)
    dist2 = sq[:, :, None] + sq[:, None, :] - 2.0 * w_rows[:, :, None] * w_rows[:, None, :] * gram
    kernel = torch.exp(-beta * dist2.clamp_(min=0.0))
    kernel.diagonal(dim1=1, dim2=2).add_(eps)
    return kernel


def node_kernel(stats, beta, eps=EPS):
    """Gaussian dpp_node kernel over the columns of the pre-activations Z: (H, H)."""
    return gaussian_kernel(stats.pre_gram, beta, eps)


def kernel_scale(stats, w1, beta):
    """beta times the median off-diagonal squared distance, for the node kernel and for the
    edge kernels (up to 256 columns of up to 16 nodes): how far the Gaussian kernels are
    from 'all alike' (~0, L ~ J + eps I) or 'all distinct' (>>1, L ~ (1 + eps) I)."""
    def median_offdiag(gram):
        sub = np.linspace(0, len(gram) - 1, min(256, len(gram))).astype(int)
        gram = gram[np.ix_(sub, sub)]
        diag = np.diag(gram)
        d2 = diag[:, None] + diag[None, :] - 2 * gram
        return float(np.median(d2[~np.eye(len(gram), dtype=bool)])) if len(gram) > 1 else 0.0
    nodes = np.linspace(0, w1.shape[0] - 1, min(16, w1.shape[0])).astype(int)
    edge = np.median([median_offdiag(stats.gram * np.outer(w1[i], w1[i])) for i in nodes])
    return beta * median_offdiag(stats.pre_gram), beta * float(edge)


# ----------------------------------------------------------------------------------------
# Masks


def granularity(method):
    return PRUNERS[method].granularity


def k_for_fraction(method, fraction, hidden, inputs):
    """Fraction of first-layer weights kept -> k: round(fraction * H) nodes for node methods,
    round(fraction * D) inputs per node for edge methods (halves round up), at least 1."""
    total = hidden if granularity(method) == "node" else inputs
    return int(min(total, max(1, math.floor(fraction * total + 0.5))))


def nominal_fraction(method, k, hidden, inputs):
    """k -> the fraction of first-layer weights it keeps (in expectation for random_edge)."""
    return k / (hidden if granularity(method) == "node" else inputs)


def round_rngs(seed, rounds):
    """Generators of rounds 0..rounds-1: round r's depends only on (seed, r)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(rounds)]


class MaskDrawer:
    """Draws first-layer masks (H, D) bool for a trained model; DPP kernels are computed once
    per node and their k-DPP samplers (eigendecompositions) reused across k and rounds.

    dpp_edge samplers are kept in memory when they fit in `cache_bytes`; otherwise every
    call streams over the nodes, building each kernel once and serving all requested
    (k, round) pairs from it. On CPU the eigendecomposition is numpy's (as in KDPP, so the
    draws equal `draw_masks` with the same kernels and generator); on a GPU kernels and
    eigendecompositions are computed there in batches of nodes."""

    def __init__(self, model, stats, beta=0.3, device="cpu", cache_bytes=1 << 30,
                 node_batch=None):
        self.w1 = model.layers[0].weight.detach().cpu().double().numpy()          # (H, D)
        self.out_norms = model.layers[1].weight.detach().cpu().double().norm(dim=0).numpy()
        self.stats, self.beta, self.device = stats, float(beta), device
        self.hidden, self.inputs = self.w1.shape
        d = self.inputs
        self.node_batch = node_batch or max(1, min(64, (256 << 20) // (8 * 3 * d * d)))
        self.cache_edges = self.hidden * d * d * 8 <= cache_bytes
        self.eig_on_device = str(device).startswith("cuda")
        self._node_kdpp = None
        self._edge_kdpps = None

    def node_kdpp(self):
        if self._node_kdpp is None:
            self._node_kdpp = KDPP(node_kernel(self.stats, self.beta))
        return self._node_kdpp

    def _edge_kdpp_stream(self):
        """Yield (node, KDPP) over all hidden nodes."""
        if self._edge_kdpps is not None:
            yield from enumerate(self._edge_kdpps)
            return
        kdpps = [] if self.cache_edges else None
        gram = torch.as_tensor(self.stats.gram, device=self.device)
        w = torch.as_tensor(self.w1, device=self.device)
        for start in range(0, self.hidden, self.node_batch):
            kernels = edge_kernels(w[start:start + self.node_batch], gram, self.beta)
            if self.eig_on_device:
                vals, vecs = torch.linalg.eigh(kernels)
                batch = [KDPP.from_eig(v, u) for v, u in zip(vals.cpu().numpy(), vecs.cpu().numpy())]
            else:
                batch = [KDPP(kernel) for kernel in kernels.numpy()]
            for offset, kdpp in enumerate(batch):
                if kdpps is not None:
                    kdpps.append(kdpp)
                yield start + offset, kdpp
        if kdpps is not None:
            self._edge_kdpps = kdpps

    def draw(self, method, ks, rounds, seed):
        """Masks for every k in ks and every round in `rounds` (an iterable of round numbers)
        -> {(k, r): (H, D) bool}; round r uses round_rngs(seed, r + 1)[r]."""
        rounds = sorted(set(int(r) for r in rounds))
        ks = sorted(set(int(k) for k in ks))
        if not rounds or not ks:
            return {}
        # a fresh generator per (k, r), so that every cell starts anew
        rngs = {(k, r): round_rngs(seed, r + 1)[r] for k in ks for r in rounds}
        h, d = self.hidden, self.inputs
        out = {}
        if method == "dpp_node":
            kdpp = self.node_kdpp()
            for (k, r), rng in rngs.items():
                keep = np.zeros((h, d), dtype=bool)
                keep[kdpp.sample(k, rng)] = True
                out[k, r] = keep
        elif method == "dpp_edge":
            for key in rngs:
                out[key] = np.zeros((h, d), dtype=bool)
            for i, kdpp in self._edge_kdpp_stream():
                for key, rng in rngs.items():
                    out[key][i, kdpp.sample(key[0], rng)] = True
        else:
            for (k, r), rng in rngs.items():
                masks = draw_masks(method, self.w1, self.out_norms, self.stats.gram, k, 1, rng)
                out[k, r] = masks[0].T.copy()                                    # (H, D)
        return out


# ----------------------------------------------------------------------------------------
# Pruning and reweighting


@torch.no_grad()
def reweight_edges_batched(w1, keep, gram, device="cpu", max_bytes=256 << 20):
    """Edge reweighting of every node, batched: w1 (H, D), keep (H, D) bool, gram (D, D)
    -> (H, D) float64 numpy. For node i with kept inputs S and removed R,
    w_iS += G_SS^{-1} G_SR w_iR (the least-squares fit X_S delta ~ X_R w_iR on the training
    inputs), w_iR = 0: dpp_sample_ts.reweight_edges, with nodes solved together as padded
    (B, kmax, kmax) systems by Cholesky. Inputs that are zero in every training sample
    (G_jj = 0, e.g. MNIST's border pixels) have zero rows and columns in G: they are left out
    of the systems and keep their weights, which is the minimum-norm least-squares solution
    that reweight_edges falls back to for them. Any other singular G_SS (fewer samples than
    kept inputs) gets the minimum-norm solution through a pseudo-inverse (slow, but rare).

    The first layer's bias is not part of the fit: the kept inputs alone absorb the removed
    ones' contribution X_R w_iR, the bias stays as trained."""
    w = torch.as_tensor(np.asarray(w1, dtype=np.float64), device=device)
    keep_t = torch.as_tensor(np.asarray(keep, dtype=bool), device=device)
    g = torch.as_tensor(np.asarray(gram, dtype=np.float64), device=device)
    h, d = w.shape
    out = w * keep_t
    removed_w = w * ~keep_t                                                     # (H, D)
    solvable = keep_t & (torch.diagonal(g) > 0)[None, :]                        # (H, D)
    counts = solvable.sum(1)
    todo = torch.nonzero((counts > 0) & (keep_t.sum(1) < d)).flatten().tolist()
    kmax_all = int(counts.max()) if h else 0
    batch = max(1, max_bytes // max(1, 8 * kmax_all * kmax_all))
    for start in range(0, len(todo), batch):
        nodes = torch.tensor(todo[start:start + batch], device=device)
        kk = counts[nodes]
        kmax = int(kk.max())
        # padded kept-input indices: (B, kmax), pads point at input 0 and are masked out
        order = torch.argsort((~solvable[nodes]).to(torch.int8), dim=1, stable=True)
        idx = order[:, :kmax]
        valid = torch.arange(kmax, device=device)[None, :] < kk[:, None]         # (B, kmax)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        a = g[idx[:, :, None], idx[:, None, :]]                                 # (B, kmax, kmax)
        both = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(kmax, device=device, dtype=torch.float64).expand_as(a)
        a = torch.where(both, a, eye * (~valid[:, :, None]))
        rhs = torch.gather(removed_w[nodes] @ g, 1, idx) * valid                # (B, kmax)
        chol, info = torch.linalg.cholesky_ex(a)
        delta = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
        bad = torch.nonzero(info != 0).flatten()
        if len(bad):
            pinv = torch.linalg.pinv(a[bad], hermitian=True)
            delta[bad] = (pinv @ rhs[bad][:, :, None])[:, :, 0]
        delta = delta * valid
        rows = nodes[:, None].expand_as(idx)
        out.index_put_((rows[valid], idx[valid]), delta[valid], accumulate=True)
    return out.cpu().numpy()


def prune_first_layer(model, keep, method, reweighting=False, stats=None, device="cpu"):
    """A pruned copy of `model`: keep (H, D) bool first-layer mask drawn by `method`.

    edge methods: W <- W * keep, refit by reweight_edges_batched if reweighting.
    node methods: kept nodes keep[i].any(); a removed node's row of W is zeroed (its bias
    and outgoing weights stay: only the first layer's weights are pruned); with reweighting
    its outgoing weights are folded into the kept nodes by reweight_nodes and zeroed."""
    pruned = MLP(model.sizes, model.dropout.p)
    pruned.load_state_dict(model.state_dict())
    keep = np.asarray(keep, dtype=bool)
    state = {k: v.detach().cpu().double().numpy() for k, v in pruned.state_dict().items()}
    w0, w1 = state["layers.0.weight"], state["layers.1.weight"]
    if granularity(method) == "edge":
        w0 = reweight_edges_batched(w0, keep, stats.gram, device) if reweighting else w0 * keep
    else:
        nodes = keep.any(axis=1)
        w0 = w0 * nodes[:, None]
        if reweighting:
            w1 = reweight_nodes(w1, nodes, stats.act_gram)
    with torch.no_grad():
        pruned.layers[0].weight.copy_(torch.from_numpy(w0))
        pruned.layers[1].weight.copy_(torch.from_numpy(w1))
    return pruned.to(device)


def kept_fraction(keep):
    """Fraction of first-layer weights kept by an (H, D) mask."""
    return float(np.mean(keep))


def preactivation_error(w_ref, w_new, gram):
    """Mean over training samples of ||(W_ref - W_new) x||^2 = trace(E G E^T), E = W_ref - W_new:
    how well a pruned first layer reproduces the trained pre-activations (bias unchanged)."""
    e = np.asarray(w_ref, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)
    return float(np.einsum("id,de,ie->", e, gram, e))


# ----------------------------------------------------------------------------------------
# Results CSV

RESULT_FIELDS = ("dataset", "weights_id", "method", "reweighting", "beta", "seed", "k",
                 "fraction", "kept_fraction", "round", "test_error", "unpruned_test_error")
KEY_FIELDS = ("dataset", "weights_id", "method", "reweighting", "beta", "seed", "k", "round")


def row_key(row):
    return tuple(str(row[f]) for f in KEY_FIELDS)


def read_results(path):
    """Rows of a results CSV as dicts of strings ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if tuple(reader.fieldnames) != RESULT_FIELDS:
            raise UserError(f"results file {path} has columns {','.join(reader.fieldnames)}, "
                            f"not those real_data.py writes; pass another --results")
        return list(reader)


@contextlib.contextmanager
def _locked(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "." + os.path.basename(path) + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_results(path, rows, replace=True):
    """Add `rows` to the CSV at `path`, rewriting it atomically under a lock. A row whose key
    (KEY_FIELDS) is already there replaces it (replace=True) or is dropped (replace=False).
    Returns the number of rows written."""
    rows = [{f: _fmt(row[f]) for f in RESULT_FIELDS} for row in rows]
    with _locked(path):
        existing = read_results(path)
        index = {row_key(r): i for i, r in enumerate(existing)}
        added = 0
        for row in rows:
            i = index.get(row_key(row))
            if i is None:
                index[row_key(row)] = len(existing)
                existing.append(row)
                added += 1
            elif replace:
                existing[i] = row
                added += 1
        with atomic_open(path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(existing)
    return added


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------------------
# Experiments


@dataclass
class Setup:
    """A trained model with everything pruning needs, computed once."""
    dataset: str
    model: MLP
    data: Data
    stats: FirstLayerStats
    drawer: MaskDrawer
    unpruned_error: float
    weights_id: str
    beta: float
    device: str
    test_batch_size: int = 1000


def prepare(dataset, model, data, *, beta=0.3, device="cpu", weights_id="", test_batch_size=1000):
    """Gram matrices, unpruned test error and the mask drawer for a trained model."""
    model = model.to(device).eval()
    stats = first_layer_stats(model, data.x_train, device)
    unpruned = error_percent(model, data.x_test, data.y_test, test_batch_size, device)
    drawer = MaskDrawer(model, stats, beta, device)
    return Setup(dataset, model, data, stats, drawer, unpruned, weights_id, float(beta),
                 device, test_batch_size)


def evaluate_cell(setup, method, k, rounds, seed, reweightings=(0, 1), masks=None):
    """Rows for one (method, k): every round in `rounds` x every reweighting in
    `reweightings`; also logs the errors. masks: precomputed {(k, r): mask} or None."""
    if masks is None:
        masks = setup.drawer.draw(method, [k], rounds, seed)
    h, d = setup.drawer.hidden, setup.drawer.inputs
    rows = []
    for r in sorted(set(rounds)):
        keep = masks[k, r]
        errors = {}
        for rw in sorted(set(reweightings)):
            pruned = prune_first_layer(setup.model, keep, method, bool(rw), setup.stats,
                                       setup.device)
            errors[rw] = error_percent(pruned, setup.data.x_test, setup.data.y_test,
                                       setup.test_batch_size, setup.device)
            rows.append(dict(
                dataset=setup.dataset, weights_id=setup.weights_id, method=method,
                reweighting=int(rw), beta=setup.beta if method in DPP_METHODS else None,
                seed=seed, k=k, fraction=nominal_fraction(method, k, h, d),
                kept_fraction=kept_fraction(keep), round=r, test_error=errors[rw],
                unpruned_test_error=setup.unpruned_error))
        unit = "nodes" if granularity(method) == "node" else "inputs per node"
        text = ", ".join(f"{'reweighted' if rw else 'pruned'} {e:.2f}%" for rw, e in errors.items())
        log.info("%s k=%d %s (%.1f%% of first-layer weights kept) round %d: test error "
                 "unpruned %.2f%%, %s", method, k, unit, 100 * kept_fraction(keep), r,
                 setup.unpruned_error, text)
    return rows


def sweep(setup, *, methods=METHODS, fractions=FRACTIONS, rounds=3, seed=0,
          reweightings=(0, 1), results_path=None):
    """Every method x fraction x reweighting x round. With results_path, rows already in
    that CSV (same key, see KEY_FIELDS) are skipped and new rows are written after every
    (method, k) cell, so an interrupted sweep resumes where it stopped. Returns the new rows."""
    h, d = setup.drawer.hidden, setup.drawer.inputs
    done = {row_key(r) for r in read_results(results_path)} if results_path else set()
    new_rows = []
    for method in methods:
        ks = sorted({k_for_fraction(method, f, h, d) for f in fractions})
        todo = {}
        for k in ks:
            for r in range(rounds):
                missing = [rw for rw in reweightings if _key(setup, method, rw, seed, k, r) not in done]
                if missing:
                    todo.setdefault(k, {})[r] = missing
        if not todo:
            continue
        start = time.time()
        masks = setup.drawer.draw(method, todo, {r for v in todo.values() for r in v}, seed)
        for k, by_round in todo.items():
            rows = []
            for r, rws in by_round.items():
                rows += evaluate_cell(setup, method, k, [r], seed, rws, masks)
            if results_path:
                merge_results(results_path, rows, replace=False)
            new_rows += rows
        log.info("%s: %d k values in %.1f s", method, len(todo), time.time() - start)
    return new_rows


def _key(setup, method, rw, seed, k, r):
    return row_key(dict(dataset=setup.dataset, weights_id=setup.weights_id, method=method,
                        reweighting=int(rw),
                        beta=_fmt(setup.beta) if method in DPP_METHODS else "",
                        seed=seed, k=k, round=r))


def train_and_save(dataset, data, weights_path, *, seed=0, device="cpu", **hyper):
    """Build, train (PRESETS[dataset] overridden by `hyper`) and save a model.
    Returns (model, history)."""
    options = dict(PRESETS[dataset], **{k: v for k, v in hyper.items() if v is not None})
    model = build_model(dataset, options["dropout"], seed)
    history = train(model, data, batch_size=options["batch_size"], lr=options["lr"],
                    momentum=options["momentum"], epochs=options["epochs"],
                    target_acc=options["target_acc"], seed=seed,
                    test_batch_size=options["test_batch_size"], device=device)
    save_weights(model, weights_path)
    return model, history


@contextlib.contextmanager
def cpu_threads(threads):
    """Limit torch's and numpy's BLAS CPU threads inside the block (None: no limit)."""
    if not threads:
        yield
        return
    import threadpoolctl
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpoolctl.threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def digits_default_run(output_dir, *, rounds=3, seed=0, beta=0.3, device="cpu", threads=1):
    """The offline default, what `real_data.py --dataset digits` does with its defaults:
    train the digits MLP if <output_dir>/digits_mlp.pth is missing, then sweep all methods x
    FRACTIONS x reweighting {0, 1} x rounds into <output_dir>/real_data_results.csv (rows
    already there are kept). One CPU thread by default: the model is tiny and more threads
    only add overhead. Returns the CSV path."""
    weights = os.path.join(output_dir, "digits_mlp.pth")
    results = os.path.join(output_dir, "real_data_results.csv")
    with cpu_threads(threads if device == "cpu" else None):
        data = load_dataset("digits")
        if not os.path.exists(weights):
            train_and_save("digits", data, weights, seed=seed, device=device)
        model = load_weights(weights, "digits")
        setup = prepare("digits", model, data, beta=beta, device=device,
                        weights_id=weights_id(weights))
        sweep(setup, rounds=rounds, seed=seed, results_path=results)
    return results
