"""Pure-PyTorch twins of :mod:`pyflowmap.ops`: same names, same signatures, same semantics.

They define what the fused kernels must compute; tests compare the two, and users can swap
one for the other to debug.
"""

from pyflowmap.reference.dual import (dual_act, dual_act_backward, dual_attention, dual_group_norm, dual_layer_norm,
                                      dual_fourier, dual_linear, dual_modulate, dual_rms_norm, dual_sinusoidal, jvp_attention,
                                      math_attention, split, stack)
from pyflowmap.reference.losses import flowmap_fd_loss, flowmap_loss
from pyflowmap.reference.sampler import flowmap_step

__all__ = ["flowmap_step", "flowmap_loss", "flowmap_fd_loss", "dual_act", "dual_act_backward", "dual_attention", "dual_group_norm",
           "dual_fourier", "dual_layer_norm", "dual_linear", "dual_modulate", "dual_rms_norm", "dual_sinusoidal", "jvp_attention",
           "math_attention", "split", "stack"]
