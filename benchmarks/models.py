"""Benchmark baselines: the plain-PyTorch twin of pyflowmap's 2D MLP (nn.Linear + nn.GELU, what
a user without pyflowmap has), so torch.func.jvp is measured on stock PyTorch layers."""

import torch
from torch import nn

import pyflowmap as pf


class PlainMLP(nn.Module):
    """Same function and weights as a :class:`pyflowmap.nn.FlowMapMLP`, stock layers only."""

    def __init__(self, src: pf.nn.FlowMapMLP):
        super().__init__()
        self.emb_s, self.emb_dt = src.emb_s, src.emb_dt
        layers = []
        for m in src.body:
            if isinstance(m, nn.Linear):
                lin = nn.Linear(m.in_features, m.out_features)
                lin.load_state_dict(m.state_dict())
                layers.append(lin)
            else:
                layers.append(nn.GELU() if m.kind == "gelu" else nn.SiLU())
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(src.head.in_features, src.head.out_features)
        self.head.load_state_dict(src.head.state_dict())
        self.register_buffer("data_std", src.data_std.clone())

    def forward(self, x, s, t):
        sd = self.data_std
        return sd * self.head(self.body(torch.cat([x / sd, self.emb_s(s), self.emb_dt(t - s)], -1)))


def paper_mlp(hidden=512, depth=4, seed=0):
    """The paper's checker network (4 x 512, GELU) with a non-zero head."""
    torch.manual_seed(seed)
    net = pf.nn.FlowMapMLP(hidden=hidden, depth=depth)
    torch.nn.init.normal_(net.head.weight, std=0.01)
    return net


def train_step(objective, flowmap, x1, generator: torch.Generator, lr: float = 1e-4):
    """One optimizer step of ``objective`` on the fixed batch ``x1``, re-seeding ``generator``
    each call so every timed step does the same work."""
    opt = torch.optim.RAdam(flowmap.parameters(), lr=lr)

    def step():
        generator.manual_seed(1)
        out = objective(flowmap, x1, generator=generator)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step
