"""The names and ranges the command-line flags accept, importable without torch.

The entry points check their flags against these before they import torch, numba or scipy,
so that `--help` and a mistyped flag are answered at once. The strategies themselves live in
dpp_sample_ts (PRUNERS, IMPORTANCE_RULES), the presets in sweep.PRESETS; a test holds the
names here to them.
"""
NONLINEARITIES = ("sigmoid", "relu", "linear")
MODES = ("normal", "soft_committee")
# pruning choice -> what its --k counts: hidden nodes kept or incoming weights kept per node
PRUNING_CHOICES = {"dpp_node": "node", "dpp_edge": "edge", "random_node": "node",
                   "random_edge": "edge", "importance_node": "node", "importance_edge": "edge"}
EDGE_CHOICES = tuple(c for c, what in PRUNING_CHOICES.items() if what == "edge")
SWEEP_PRESETS = ("smoke", "small", "paper")
IMPORTANCE_RULES = ("magnitude", "signed")   # importance_node: largest |v| or largest signed v


def k_range(choice, input_dim, student_h_size):
    """The allowed k for a pruning choice: 1..K for node choices, 1..N for edge choices."""
    return (1, student_h_size) if PRUNING_CHOICES[choice] == "node" else (1, input_dim)
