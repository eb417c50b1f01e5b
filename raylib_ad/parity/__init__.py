"""Parity with anomalib 2.7 (issue #21): our model and anomalib's torch model, given the same weights, the
same batch and the same random draws, must give the same statistics, scores, maps, losses and gradients.

Ray-free and anomalib-free: this package builds our side and compares. anomalib runs in its own virtual
environment (jobs/parity_anomalib_side.py), and the two sides talk through an exchange folder of torch files
(exchange.py). Per-model key maps (our state-dict keys -> anomalib's) live beside each model, in
raylib_ad/models/<name>/anomalib_keys.py.
"""

from .compare import DEFAULT_TOLERANCE, compare_tensors, markdown_table

__all__ = ["DEFAULT_TOLERANCE", "compare_tensors", "markdown_table"]
