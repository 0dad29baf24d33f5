"""Python side of the compiled ops: fake (meta) kernels and autograd formulas.

Every op here is the fused kernel itself, paired at its definition with its pure-PyTorch twin
of the same name in :mod:`pyflowmap.reference` (``op.twin``); ``op.dispatch`` runs whichever of
the two applies to its inputs (see :mod:`pyflowmap._dispatch`).
"""

from pyflowmap import _build  # noqa: F401  (loads torch.ops.pyflowmap)
from pyflowmap.ops.dual_act import dual_act
from pyflowmap.ops.dual_attention import dual_attention, jvp_attention
from pyflowmap.ops.dual_linear import dual_linear
from pyflowmap.ops.dual_norm import dual_group_norm, dual_layer_norm, dual_rms_norm
from pyflowmap.ops.losses import flowmap_fd_loss, flowmap_loss
from pyflowmap.ops.sampler import flowmap_step
from pyflowmap.ops._autocast import register_all as _register_autocast

_register_autocast()  # after the fake and autograd kernels above: docs/precision.md

__all__ = ["dual_act", "dual_attention", "dual_group_norm", "dual_layer_norm", "dual_linear", "dual_rms_norm", "flowmap_fd_loss",
           "flowmap_loss", "flowmap_step", "jvp_attention"]
