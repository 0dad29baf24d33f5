"""Network layers and models for flow maps.

Every layer runs in primal mode, ``layer(x)``, and in dual mode, ``layer.dual(xx)`` on the
stacked ``[x; x_dot]``; models built from them return ``(v, v_dot)`` when given tangents.
"""

from pyflowmap.nn.attention import Attention
from pyflowmap.nn.dit import DiTFlowMap, dit_preset
from pyflowmap.nn.embeddings import FourierFeatures, SinusoidalEmbedding
from pyflowmap.nn.functional import reference_ops
from pyflowmap.nn.jvp_mode import FusedJVPMode, fused_jvp
from pyflowmap.nn.layers import (GELU, Activation, Conv2d, DualModule, GroupNorm, LayerNorm, Linear, RMSNorm,
                                 Sequential, SiLU, modulate, stack)
from pyflowmap.nn.mlp import FlowMapMLP
from pyflowmap.nn.unet import AttnBlock, ResBlock, UNetFlowMap

__all__ = [
    "Activation", "Attention", "AttnBlock", "Conv2d", "DiTFlowMap", "DualModule", "FlowMapMLP", "FusedJVPMode", "GELU", "GroupNorm",
    "FourierFeatures", "LayerNorm", "Linear", "RMSNorm", "ResBlock", "Sequential", "SiLU", "SinusoidalEmbedding",
    "UNetFlowMap", "dit_preset", "fused_jvp", "modulate", "reference_ops", "stack",
]
