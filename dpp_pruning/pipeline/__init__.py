"""The paper's workflow as functions (workflow): teacher and data, training, pruning, testing
and the expected losses, over base/ (data, training, files) and theory/."""
