"""The teacher network and its Gaussian-input data set (what `teacher_dataset.py` writes).

A `TeacherDataset` holds, as torch tensors: the teacher weights `w1` (M, N) and `w2` (1, M),
the training set `inputs` (P, N) / `labels` (P,), the test set `test_inputs` (P/10, N) /
`test_labels`, the input Gram matrix `gram` = X^T X / P (N, N, float64, computed once from
the training inputs) and `settings` (the flags that made it). `len()` and `[i]` -> (x, y)
make it a torch Dataset. It pickles as plain numpy arrays, so a file written here loads in
any script or notebook that can import this module, and through our restricted unpickler.
"""
import hashlib
import math

import numpy as np
import torch

from models import MODES, activation

CHUNK_ROWS = 16384  # rows generated (and Gram-accumulated) per step; part of the seeded stream
_ARRAYS = ("w1", "w2", "inputs", "labels", "test_inputs", "test_labels", "gram")


class TeacherDataset(torch.utils.data.Dataset):
    def __init__(self, w1, w2, inputs, labels, test_inputs, test_labels, gram, settings):
        self.w1, self.w2 = w1, w2                      # (M, N), (1, M)
        self.inputs, self.labels = inputs, labels      # (P, N) float32, (P,) float32
        self.test_inputs, self.test_labels = test_inputs, test_labels
        self.gram = gram                               # (N, N) float64, X^T X / P
        self.settings = dict(settings)

    def __len__(self):
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]

    @property
    def input_dim(self):
        return self.w1.shape[1]

    @property
    def noise_std(self):
        return float(self.settings.get("sig_w", 0.0))

    def __getstate__(self):
        state = {name: getattr(self, name).numpy() for name in _ARRAYS}
        state["settings"] = self.settings
        return state

    def __setstate__(self, state):
        for name in _ARRAYS:
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(state[name])))
        self.settings = dict(state["settings"])


def teacher_weights(input_dim, teacher_h_size, mode, v_star, generator):
    """w1 (M, N) ~ N(0, 1); w2 (1, M) = v_star (`normal`) or 1 (`soft_committee`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    w1 = torch.randn(teacher_h_size, input_dim, generator=generator, device=generator.device)
    value = float(v_star) if mode == "normal" else 1.0
    w2 = torch.full((1, teacher_h_size), value, device=generator.device)
    return w1, w2


def _fill(inputs, labels, w1, w2, sig_w, generator, gram=None, progress=None):
    """Draw x ~ N(0, I) and y = w2 . g(w1 x / sqrt(N)) + sig_w * eps into preallocated CPU
    arrays, chunk by chunk on the generator's device; accumulate X^T X into `gram`
    in float64."""
    g = activation("sigmoid")
    device, n = generator.device, inputs.shape[1]
    for start in range(0, inputs.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, inputs.shape[0])
        if device.type == "cpu":   # draw straight into the output: no chunk copy
            x = torch.randn(stop - start, n, generator=generator, out=inputs[start:stop])
        else:
            x = torch.randn(stop - start, n, generator=generator, device=device)
            inputs[start:stop] = x.cpu()
        y = g(x @ w1.T / math.sqrt(n)) @ w2[0]
        if sig_w:
            y = y + sig_w * torch.randn(stop - start, generator=generator, device=device)
        if gram is not None:   # float64 products: with P < N a float32 sum looks full rank
            x64 = x.to(gram.device, torch.float64)
            gram.addmm_(x64.T, x64)
        labels[start:stop] = y.cpu()
        if progress is not None:
            progress(stop - start)


def generate_teacher(input_dim, teacher_h_size, num_data, mode="normal", sig_w=0.0, v_star=4,
                     seed=1, device="cpu", progress=None, num_test=None):
    """Teacher, `num_data` training samples and `num_test` test samples (default
    `num_data // 10`, as teacher_dataset.py; a study may choose another test size).

    Every draw comes from one torch generator seeded with `seed` (bit-identical on the CPU
    run after run). Memory: the (P, N) float32 inputs plus one chunk.
    """
    default_test = num_test is None or num_test == num_data // 10
    num_test = num_data // 10 if default_test else int(num_test)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    w1, w2 = teacher_weights(input_dim, teacher_h_size, mode, v_star, generator)
    inputs = torch.empty(num_data, input_dim)
    labels = torch.empty(num_data)
    gram = torch.zeros(input_dim, input_dim, dtype=torch.float64, device=device)
    _fill(inputs, labels, w1, w2, sig_w, generator, gram, progress)
    test_inputs = torch.empty(num_test, input_dim)
    test_labels = torch.empty(num_test)
    _fill(test_inputs, test_labels, w1, w2, sig_w, generator, None, progress)
    settings = dict(input_dim=input_dim, teacher_h_size=teacher_h_size, num_data=num_data,
                    mode=mode, sig_w=float(sig_w), v_star=v_star, seed=int(seed))
    if not default_test:             # recorded only where it differs, so older files still match
        settings["num_test"] = num_test
    return TeacherDataset(w1.cpu(), w2.cpu(), inputs, labels, test_inputs, test_labels,
                          (gram / num_data).cpu(), settings)


def dataset_nbytes(input_dim, num_data, num_test=None):
    """Bytes of the arrays `generate_teacher` holds (float32 inputs and labels, train + test
    (default num_data // 10), the float64 Gram matrix)."""
    rows = num_data + (num_data // 10 if num_test is None else num_test)
    return 4 * rows * (input_dim + 1) + 8 * input_dim * input_dim


def teacher_id(teacher):
    """A short fingerprint of a whole teacher data set (weights, Gram matrix, labels and
    settings; the weights alone are the same for every --num_data and --sig_w of one
    --seed), to match the files of one run."""
    digest = hashlib.sha1()
    for name in ("w1", "w2", "gram", "labels", "test_labels"):
        digest.update(getattr(teacher, name).numpy().tobytes())
    digest.update(repr(sorted(teacher.settings.items())).encode())
    return digest.hexdigest()[:16]
