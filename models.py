"""Networks of the paper: the two-layer teacher/student and the real-data MLPs.

Notation (NOTES.md): N = input_dim, K = student hidden size, M = teacher hidden size.
The student computes  y_hat = sum_i v_i g(w_i . x / sqrt(N))  with no biases;
g(z) = erf(z / sqrt(2)) for `sigmoid` (Saad & Solla's erf "sigmoid"), max(0, z) for
`relu` and z for `linear`.
"""
import math

import numpy as np
import torch
from torch import nn

from dpp_pruning.base.choices import MODES, NONLINEARITIES  # noqa: F401  (re-exported: models.MODES, ...)


def activation(name):
    """The torch function g for a `--nonlinearity` name."""
    if name == "sigmoid":
        return lambda z: torch.erf(z / math.sqrt(2.0))
    if name == "relu":
        return torch.relu
    if name == "linear":
        return lambda z: z
    raise ValueError(f"unknown nonlinearity {name!r}; choose one of {', '.join(NONLINEARITIES)}")


class Student(nn.Module):
    """Two-layer student: w1 (K, N) and w2 (1, K), state_dict keys `w1.weight`, `w2.weight`.

    Initialisation as in the original code: for `sigmoid` both layers ~ N(0, 1), otherwise
    std 1/sqrt(N). In `soft_committee` mode the second layer is fixed to ones and frozen.
    """

    def __init__(self, input_dim, hidden_size, nonlinearity="sigmoid", mode="normal",
                 generator=None):
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.input_dim, self.hidden_size = int(input_dim), int(hidden_size)
        self.nonlinearity, self.mode = nonlinearity, mode
        self.w1 = nn.Linear(input_dim, hidden_size, bias=False)
        self.w2 = nn.Linear(hidden_size, 1, bias=False)
        std = 1.0 if nonlinearity == "sigmoid" else 1.0 / math.sqrt(input_dim)
        with torch.no_grad():
            self.w1.weight.normal_(0.0, std, generator=generator)
            if mode == "soft_committee":
                self.w2.weight.fill_(1.0)
            else:
                self.w2.weight.normal_(0.0, std, generator=generator)
        self.w2.weight.requires_grad_(mode != "soft_committee")
        self._g = activation(nonlinearity)

    def hidden(self, x):
        """Hidden activations g(w_i . x / sqrt(N)): (B, N) -> (B, K)."""
        return self._g(self.w1(x) / math.sqrt(self.input_dim))

    def forward(self, x):
        """Output y_hat: (B, N) -> (B,)."""
        return self.w2(self.hidden(x)).squeeze(-1)

    def __reduce__(self):
        # Pickled as plain numpy state so that our safe unpickler needs no torch internals.
        return (_rebuild_student, (self.input_dim, self.hidden_size, self.nonlinearity,
                                   self.mode, self.w1.weight.detach().cpu().numpy().copy(),
                                   self.w2.weight.detach().cpu().numpy().copy()))


def _rebuild_student(input_dim, hidden_size, nonlinearity, mode, w1, w2):
    student = Student(input_dim, hidden_size, nonlinearity, mode)
    with torch.no_grad():
        student.w1.weight.copy_(torch.as_tensor(np.asarray(w1)))
        student.w2.weight.copy_(torch.as_tensor(np.asarray(w2)))
    return student


def student_from_weights(w1, w2, nonlinearity="sigmoid", mode="normal"):
    """A Student holding the given weights: w1 (K, N), w2 (1, K) or (K,)."""
    w1 = np.asarray(w1, dtype=np.float32)
    return _rebuild_student(w1.shape[1], w1.shape[0], nonlinearity, mode, w1,
                            np.asarray(w2, dtype=np.float32).reshape(1, -1))


class MLP(nn.Module):
    """Fully connected classifier with sigmoid hidden units (the paper's real-data nets).

    `sizes` lists every layer width, e.g. (784, 500, 500, 10) for MNIST. Layers are
    `layers.0`, `layers.1`, ...; `layers.0.weight` (H1, D) is the first layer, the one
    the paper prunes.
    """

    def __init__(self, sizes, dropout=0.0):
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b)
                                    for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """Logits: (B, D) or (B, C, H, W) -> (B, classes)."""
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.dropout(torch.sigmoid(layer(h)))
        return self.layers[-1](h)


MLP_SIZES = {
    "digits": (64, 100, 100, 10),
    "mnist": (784, 500, 500, 10),
    "cifar10": (3072, 1000, 1000, 1000, 10),
}
