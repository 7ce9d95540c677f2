"""The real-data experiments: test error of pruned MLPs per (method, k, round, reweighting),
and the results CSV they fill.

Results are rows of a CSV (RESULT_FIELDS); writes replace the whole file atomically under an
advisory lock, so a killed run leaves the old or the new file and concurrent runs do not lose
each other's rows. A sweep skips the rows already there, so an interrupted one resumes.
"""
import csv
import logging
import os
import time
from dataclasses import dataclass

from dpp_pruning.base.cli import UserError
from dpp_pruning.base.storage import atomic_open, lock_file
from dpp_pruning.real_data.first_layer_pruning import (
    DPP_METHODS,
    METHODS,
    FirstLayerStats,
    MaskDrawer,
    first_layer_stats,
    granularity,
    k_for_fraction,
    kept_fraction,
    nominal_fraction,
    prune_first_layer,
)
from dpp_pruning.real_data.image_datasets import Data, load_dataset
from dpp_pruning.real_data.mlp_training import (
    cpu_threads,
    error_percent,
    load_weights,
    train_and_save,
    weights_id,
)
from models import MLP

log = logging.getLogger("dpp_pruning.real_data")

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))


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


def lock_path(path):
    """The lock file that guards the results CSV at `path` while a run merges into it."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, "." + name + ".lock")


def merge_results(path, rows, replace=True):
    """Add `rows` to the CSV at `path`, rewriting it atomically under a lock. A row whose key
    (KEY_FIELDS) is already there replaces it (replace=True) or is dropped (replace=False).
    Returns the number of rows written."""
    rows = [{f: _fmt(row[f]) for f in RESULT_FIELDS} for row in rows]
    with lock_file(lock_path(path)):
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


def evaluate_cell(setup, method, k, rounds, seed, reweightings=(0, 1), masks=None,
                  fraction=None):
    """Rows for one (method, k): every round in `rounds` x every reweighting in
    `reweightings`; also logs the errors. masks: precomputed {(k, r): mask} or None.
    fraction: the p that gave k (k_for_fraction), recorded in the rows; None records the
    fraction of the first two weight matrices' parameters that k keeps (nominal_fraction)."""
    if fraction is None:
        fraction = nominal_fraction(method, k, setup.drawer.hidden, setup.drawer.inputs)
    if masks is None:
        masks = setup.drawer.draw(method, [k], rounds, seed)
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
                seed=seed, k=k, fraction=fraction,
                kept_fraction=kept_fraction(keep), round=r, test_error=errors[rw],
                unpruned_test_error=setup.unpruned_error))
        unit = "nodes" if granularity(method) == "node" else "inputs per node"
        text = ", ".join(f"{'reweighted' if rw else 'pruned'} {e:.2f}%" for rw, e in errors.items())
        log.info("%s p=%.0f%% k=%d %s (%.1f%% of first-layer weights kept) round %d: test "
                 "error unpruned %.2f%%, %s", method, 100 * fraction, k, unit,
                 100 * kept_fraction(keep), r, setup.unpruned_error, text)
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
        fraction_of_k = {k_for_fraction(method, f, h, d): f for f in fractions}
        ks = sorted(fraction_of_k)
        todo = {}
        for k in ks:
            for r in range(rounds):
                missing = [rw for rw in reweightings
                           if _key(setup, method, rw, seed, k, r) not in done]
                if missing:
                    todo.setdefault(k, {})[r] = missing
        if not todo:
            continue
        start = time.time()
        masks = setup.drawer.draw(method, todo, {r for v in todo.values() for r in v}, seed)
        for k, by_round in todo.items():
            rows = []
            for r, rws in by_round.items():
                rows += evaluate_cell(setup, method, k, [r], seed, rws, masks,
                                      fraction_of_k[k])
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
