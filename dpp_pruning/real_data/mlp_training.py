"""The real-data MLPs: build, train by mini-batch SGD, score, save and load their weights.

Training presets (PRESETS) per data set; `train_and_save` is what `real_data.py --procedure
training` runs. Weights files are state_dicts written atomically; `weights_id` ties result
rows to the weights they came from.
"""
import contextlib
import hashlib
import logging
import math
import os
import time

import torch

from dpp_pruning.base.cli import UserError
from dpp_pruning.base.storage import load_state_dict, save_state_dict
from models import MLP, MLP_SIZES

log = logging.getLogger("dpp_pruning.real_data")

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
