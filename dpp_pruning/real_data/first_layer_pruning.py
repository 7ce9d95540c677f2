"""Pruning the first layer of a trained real-data MLP by the six methods, with and without
reweighting, and the statistics of the training inputs that the kernels and fits need.

Pruning touches only the first layer, `layers.0.weight` W (H, D), H hidden nodes fed by D
inputs; in the conventions of `dpp_sample_ts` that is w1 = W (K = H nodes, N = D inputs).
A first-layer mask is an (H, D) bool array `keep`, keep[i, j] keeping W[i, j] (the transpose
of the registry's (N, K) masks).
- The x-axis is p, the fraction of remaining parameters of the first two weight matrices
  (the original code's budgets, `k_for_fraction`): edge methods keep e = ceil(p D) inputs
  per hidden node (random_edge too: a uniform e-subset per node), node methods keep
  n = floor(H (floor(p D) + H) / (D + H)) nodes, a node costing D inputs and H outgoing
  weights.
- Node methods: a removed node's row of W is zeroed. Only W is pruned,
  so without reweighting the node keeps its bias and outgoing weights and sends the constant
  sigmoid(b_i) on (what a mask on the first layer's weights alone amounts to). With
  reweighting its outgoing weights are folded into the kept nodes and zeroed, which removes
  it altogether. importance_node ranks nodes by the mean |outgoing weight| (columns of
  `layers.1.weight`).

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
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from dpp_sample_ts import (
    KDPP,
    PRUNERS,
    draw_masks,
    gaussian_kernel,
    gaussian_kernels,
    reweight_edges_batched,
    reweight_nodes,
)
from models import MLP

METHODS = tuple(PRUNERS)                         # the six pruning strategies
DPP_METHODS = ("dpp_node", "dpp_edge")
EPS = 0.01                                       # the kernels' ridge, as in the original


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


def granularity(method):
    return PRUNERS[method].granularity


def k_for_fraction(method, fraction, hidden, inputs):
    """The x-axis p (fraction of remaining parameters) -> k, the original code's budgets.

    Edge methods keep e = ceil(p D) inputs per hidden node. Node methods keep
    n = floor(H (floor(p D) + H) / (D + H)) nodes: a node costs its D inputs and its H outgoing
    weights, so n nodes hold as many parameters of the first two weight matrices as H nodes
    with floor(p D) inputs each (and all their outgoing weights). MNIST (D = 784, H = 500):
    e = 79..706, n = 225..469 for p = 10%..90%; CIFAR-10 (D = 3072, H = 1000): e = 308..2765,
    n = 320..924. At least 1, at most D or H."""
    scaled = fraction * inputs
    if granularity(method) == "edge":
        return int(min(inputs, max(1, math.ceil(scaled - 1e-9))))
    edges = math.floor(scaled + 1e-9)
    return int(min(hidden, max(1, hidden * (edges + hidden) // (inputs + hidden))))


def nominal_fraction(method, k, hidden, inputs):
    """k -> the fraction of the first two weight matrices' parameters (H D + H H) it keeps:
    (k + H) / (D + H) for edge methods (k inputs per node, all outgoing weights), k / H for
    node methods."""
    if granularity(method) == "edge":
        return (k + hidden) / (inputs + hidden)
    return k / hidden


def random_edge_masks(hidden, inputs, k, rng):
    """random_edge on real data: every hidden node keeps a uniform k-subset of its inputs
    (exactly k, unlike the teacher-student registry's independent keep-with-probability-k/N)
    -> (H, D) bool."""
    keep = np.zeros((hidden, inputs), dtype=bool)
    np.put_along_axis(keep, np.argsort(rng.random((hidden, inputs)), axis=1)[:, :k], True,
                      axis=1)
    return keep


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
        # importance_node's scores: mean |outgoing weight| of every hidden node (H,)
        self.out_importance = model.layers[1].weight.detach().cpu().double().abs().mean(
            dim=0).numpy()
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
            kernels = gaussian_kernels(gram, self.beta, EPS, w[start:start + self.node_batch])
            if self.eig_on_device:
                vals, vecs = torch.linalg.eigh(kernels)
                batch = [KDPP.from_eig(v, u)
                         for v, u in zip(vals.cpu().numpy(), vecs.cpu().numpy(), strict=True)]
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
        elif method == "random_edge":
            for (k, r), rng in rngs.items():
                out[k, r] = random_edge_masks(h, d, k, rng)
        else:
            for (k, r), rng in rngs.items():
                masks = draw_masks(method, self.w1, self.out_importance, self.stats.gram, k, 1,
                                   rng)
                out[k, r] = masks[0].T.copy()                                    # (H, D)
        return out


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
