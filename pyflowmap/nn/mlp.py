"""The 2D flow-map MLP of the paper's checkerboard experiments."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap.nn.embeddings import SinusoidalEmbedding

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class FlowMapMLP(nn.Module):
    """v_{s,t}(x) = sigma_d * MLP([x / sigma_d, emb(s), emb(t - s)]).

    The paper's conditioning: positional embeddings of s and of the jump t - s, input and
    output scaled by the data std ``data_std`` (sigma_d). ``depth`` hidden layers of width
    ``hidden`` (the paper's checker model: 4 x 512, GELU). The output layer starts at zero, so
    an untrained map is the identity and its velocity zero.
    """

    def __init__(self, dim: int = 2, hidden: int = 512, depth: int = 4, emb_dim: int = 64,
                 activation: str = "gelu", data_std: float | torch.Tensor = 1.0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.dim = dim
        self.emb_s = SinusoidalEmbedding(emb_dim)
        self.emb_dt = SinusoidalEmbedding(emb_dim)
        layers: list[nn.Module] = []
        width = dim + 2 * emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("data_std", torch.as_tensor(data_std, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, dim]``, ``s``, ``t`` ``[B]`` -> ``[B, dim]``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FlowMapMLP expects x of shape [B, {self.dim}], got {tuple(x.shape)}")
        sd = self.data_std.to(x.dtype)
        h = torch.cat([x / sd, self.emb_s(s), self.emb_dt(t - s)], dim=-1)
        return sd * self.head(self.body(h))
