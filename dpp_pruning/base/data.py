"""The teacher network and its Gaussian-input data set (what `teacher_dataset.py` writes).

A `TeacherDataset` holds, as torch tensors: the teacher weights `w1` (M, N) and `w2` (1, M),
the training set `inputs` (P, N) / `labels` (P,), the test set `test_inputs` (P/10, N) /
`test_labels`, the input Gram matrix `gram` = X^T X / P (N, N, float64, computed once from
the training inputs) and `settings` (the flags that made it). `len()` and `[i]` -> (x, y)
make it a torch Dataset. It pickles as plain numpy arrays, so a file written here loads in
any script or notebook that can import this module, and through our restricted unpickler.
"""
import hashlib
import json
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


def draw_chunks(generator, rows, w1, w2, sig_w, out=None):
    """Draw `rows` samples x ~ N(0, I), y = w2 . g(w1 x / sqrt(N)) + sig_w * eps chunk by chunk
    (CHUNK_ROWS at a time, the order of the seeded stream) on the generator's device; yields
    (x (c, N) float32, y (c,)) for each chunk. With `out` (rows, N) on the CPU, x is drawn
    straight into out's rows (no copy) and the chunk yielded is that view."""
    g = activation("sigmoid")
    device, n = generator.device, w1.shape[1]
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, rows)
        if out is not None and device.type == "cpu":
            x = torch.randn(stop - start, n, generator=generator, out=out[start:stop])
        else:
            x = torch.randn(stop - start, n, generator=generator, device=device)
        y = g(x @ w1.T / math.sqrt(n)) @ w2[0]
        if sig_w:
            y = y + sig_w * torch.randn(stop - start, generator=generator, device=device)
        yield x, y


class GramSum:
    """X^T X summed over chunks of rows, in float64 (with P < N a float32 sum would look
    full rank). On the CPU each chunk goes through BLAS's dsyrk, which forms the upper
    triangle only (half the products of a general matrix product); elsewhere through torch."""

    def __init__(self, n, device="cpu"):
        self.cpu = torch.device(device).type == "cpu"
        self.sum = (np.zeros((n, n), order="F") if self.cpu
                    else torch.zeros(n, n, dtype=torch.float64, device=device))

    def add(self, x):
        """Add x^T x of a chunk x (c, N) (torch, any float dtype)."""
        if self.cpu:
            import scipy.linalg.blas
            rows = np.asarray(x.numpy(), dtype=np.float64)         # (c, N), C order
            self.sum = scipy.linalg.blas.dsyrk(1.0, rows.T, beta=1.0, c=self.sum, trans=0,
                                               lower=0, overwrite_c=1)
        else:
            x64 = x.to(torch.float64)
            self.sum.addmm_(x64.T, x64)

    def mean(self, rows):
        """The (N, N) float64 torch tensor X^T X / rows, symmetric, on the CPU."""
        if self.cpu:
            upper = np.triu(self.sum)
            return torch.from_numpy(upper + np.triu(upper, 1).T) / rows
        return (self.sum / rows).cpu()


def _fill(inputs, labels, w1, w2, sig_w, generator, gram=None, progress=None):
    """draw_chunks into preallocated CPU arrays inputs (P, N), labels (P,); add each chunk's
    Gram to `gram` (a GramSum) when given."""
    start = 0
    for x, y in draw_chunks(generator, inputs.shape[0], w1, w2, sig_w, out=inputs):
        stop = start + x.shape[0]
        if x.device.type != "cpu":
            inputs[start:stop] = x.cpu()
        if gram is not None:
            gram.add(x)
        labels[start:stop] = y.cpu()
        if progress is not None:
            progress(stop - start)
        start = stop


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
    gram = GramSum(input_dim, device)
    _fill(inputs, labels, w1, w2, sig_w, generator, gram, progress)
    test_inputs = torch.empty(num_test, input_dim)
    test_labels = torch.empty(num_test)
    _fill(test_inputs, test_labels, w1, w2, sig_w, generator, None, progress)
    return TeacherDataset(w1.cpu(), w2.cpu(), inputs, labels, test_inputs, test_labels,
                          gram.mean(num_data),
                          settings_of(input_dim, teacher_h_size, num_data, mode, sig_w, v_star,
                                      seed, num_test))


class TeacherStream:
    """The teacher and data of generate_teacher(**settings) on the CPU, drawn chunk by chunk
    instead of held: `w1`, `w2`; `chunks()` one pass over the training samples in order (each
    pass the same draws, so several epochs and later passes are possible); `test_set()` the
    test samples, drawn after the training samples as generate_teacher draws them. Online SGD
    reads each sample once per epoch, so a study needs neither the (P, N) inputs in memory
    nor on disk. With keep=True the chunks of the first pass are kept in memory and later
    passes read them instead of drawing them again (same values)."""

    def __init__(self, input_dim, teacher_h_size, num_data, mode="normal", sig_w=0.0, v_star=4,
                 seed=1, num_test=None, keep=False):
        self.settings = settings_of(input_dim, teacher_h_size, num_data, mode, sig_w, v_star,
                                    seed, num_data // 10 if num_test is None else num_test)
        self.num_data, self.sig_w = num_data, float(sig_w)
        self.num_test = num_data // 10 if num_test is None else int(num_test)
        self._generator = torch.Generator().manual_seed(int(seed))
        self.w1, self.w2 = teacher_weights(input_dim, teacher_h_size, mode, v_star,
                                           self._generator)
        self._start = self._generator.get_state()       # before the first training sample
        self._after = None                               # after the last one
        self._kept = [] if keep else None

    def chunks(self):
        """One pass over the training samples: yields (x (c, N) float32, y (c,)) per chunk."""
        if self._kept and self._after is not None:
            yield from self._kept
            return
        self._generator.set_state(self._start)
        for chunk in draw_chunks(self._generator, self.num_data, self.w1, self.w2, self.sig_w):
            if self._kept is not None:
                self._kept.append(chunk)
            yield chunk
        self._after = self._generator.get_state()

    def test_set(self):
        """(x (T, N) float32, y (T,)): the test samples, drawn after the training samples."""
        if self._after is None:
            for _ in self.chunks():
                pass
        self._generator.set_state(self._after)
        x, y = torch.empty(self.num_test, self.w1.shape[1]), torch.empty(self.num_test)
        _fill(x, y, self.w1, self.w2, self.sig_w, self._generator)
        return x, y


class StudyData:
    """What a study's work units need of a data set: the teacher (w1 (M, N), w2 (1, M)), its
    test set (test_inputs (T, N) float32, test_labels (T,)), the Gram matrix of its training
    inputs (gram (N, N) float64) and its settings; the training samples themselves are
    never stored (TeacherStream draws them again from the seed when needed). It answers what
    the workflow's functions ask of a TeacherDataset, but for the training samples."""

    ARRAYS = ("w1", "w2", "gram", "test_inputs", "test_labels")

    def __init__(self, w1, w2, gram, test_inputs, test_labels, settings):
        self.w1, self.w2, self.gram = w1, w2, gram
        self.test_inputs, self.test_labels = test_inputs, test_labels
        self.settings = dict(settings)

    input_dim = TeacherDataset.input_dim
    noise_std = TeacherDataset.noise_std

    def save(self, f):
        """Write the arrays and settings as .npz to the open binary file f."""
        np.savez(f, settings=json.dumps(self.settings),
                 **{name: getattr(self, name).numpy() for name in self.ARRAYS})

    @classmethod
    def load(cls, path):
        """Read a file written by `save` (raises OSError, ValueError, KeyError or
        zipfile.BadZipFile when it is unreadable, truncated or incomplete)."""
        with np.load(path) as z:
            arrays = {name: torch.from_numpy(np.ascontiguousarray(z[name]))
                      for name in cls.ARRAYS}
            settings = json.loads(str(z["settings"]))
        return cls(settings=settings, **arrays)


def settings_of(input_dim, teacher_h_size, num_data, mode, sig_w, v_star, seed, num_test=None):
    """The settings a data set records (num_test only where it is not num_data // 10, so
    that files of earlier releases still match)."""
    num_test = num_data // 10 if num_test is None else num_test
    settings = dict(input_dim=input_dim, teacher_h_size=teacher_h_size, num_data=num_data,
                    mode=mode, sig_w=float(sig_w), v_star=v_star, seed=int(seed))
    if num_test != num_data // 10:
        settings["num_test"] = int(num_test)
    return settings


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
        if getattr(teacher, name, None) is not None:     # a study's data set has no labels
            digest.update(getattr(teacher, name).numpy().tobytes())
    digest.update(repr(sorted(teacher.settings.items())).encode())
    return digest.hexdigest()[:16]
