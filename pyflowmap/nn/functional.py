"""The dual ops the layers call, each a fused kernel of :mod:`pyflowmap.ops` paired with its
reference twin (``.dispatch`` runs the kernel where it covers the input, else the twin; see
:mod:`pyflowmap._dispatch`). Ops without a fused kernel are their twin."""

from __future__ import annotations

from pyflowmap import ops, reference
from pyflowmap._dispatch import reference_ops  # noqa: F401  (re-exported)

dual_act = ops.dual_act.dispatch
dual_linear = ops.dual_linear.dispatch
dual_layer_norm = ops.dual_layer_norm.dispatch
dual_rms_norm = ops.dual_rms_norm.dispatch
dual_group_norm = ops.dual_group_norm.dispatch
dual_attention = ops.dual_attention.dispatch
# cheap elementwise compositions: autograd over the twin is already one pass each way
dual_modulate = reference.dual_modulate
dual_sinusoidal = reference.dual_sinusoidal
dual_fourier = reference.dual_fourier

split = reference.split
stack = reference.stack
