"""The statistical mechanics: order parameters and the generalisation error, the expected loss
over the mask distribution (expectations, mask_marginals), the pruned student's error as
N → ∞ from the order parameters alone (pruning_limit), and the ODEs of training."""
