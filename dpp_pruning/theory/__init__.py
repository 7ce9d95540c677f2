"""The statistical mechanics: order parameters and the generalisation error, the expected loss
over the mask distribution (expectations, mask_marginals), and the ODEs of training."""
