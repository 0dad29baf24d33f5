"""Learned per-(s, t) loss weighting, EDM2-style: L -> exp(-w(s, t)) L + w(s, t)."""

from __future__ import annotations

import torch
from torch import nn

from pyflowmap.nn.embeddings import SinusoidalEmbedding


class LearnedWeighting(nn.Module):
    """w(s, t) from positional embeddings of s and t through a small MLP.

    At the optimum w = log E[L | s, t], so every (s, t) contributes on a comparable scale.
    The last layer starts at zero: training begins unweighted.
    """

    def __init__(self, emb_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.emb_s = SinusoidalEmbedding(emb_dim)
        self.emb_t = SinusoidalEmbedding(emb_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w(s, t), shape ``[B]``."""
        h = torch.cat([self.emb_s(s), self.emb_t(t)], dim=-1)
        return self.mlp(h).squeeze(-1)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp[0].weight.dtype
