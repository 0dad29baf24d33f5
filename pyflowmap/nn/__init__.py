"""Network layers and models for flow maps."""

from pyflowmap.nn.embeddings import SinusoidalEmbedding
from pyflowmap.nn.mlp import FlowMapMLP

__all__ = ["SinusoidalEmbedding", "FlowMapMLP"]
