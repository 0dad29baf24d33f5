"""2D toy distributions, generated in-process from a torch.Generator (nothing is downloaded)."""

from __future__ import annotations

import math
from typing import Callable

import torch


def checker(n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """The paper's checkerboard (RealNVP-style), support in [-4, 4]^2, density 1/32 on it.

    x1 ~ U[-2, 2]; x2 = U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2); then (x1, x2) * 2.
    """
    x1 = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * 4 - 2
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).to(torch.float64)
    x2 = u - 2 * flip + torch.remainder(torch.floor(x1), 2)
    return (torch.stack([x1, x2], dim=1) * 2).to(dtype)


def checker_density(x: torch.Tensor) -> torch.Tensor:
    """The exact checker density at points ``[N, 2]``: 1/32 on the 8 light squares, 0 elsewhere."""
    a, b = torch.floor(x[:, 0] / 2), torch.floor(x[:, 1] / 2)
    inside = (x[:, 0] >= -4) & (x[:, 0] < 4) & (x[:, 1] >= -4) & (x[:, 1] < 4)
    light = torch.remainder(a + b, 2) == 0
    return (inside & light).to(x.dtype) / 32.0


def eight_gaussians(n: int, generator=None, device=None, dtype=torch.float32, radius: float = 4.0,
                    std: float = 0.3) -> torch.Tensor:
    """Eight Gaussians of std ``std`` on a circle of radius ``radius``."""
    k = torch.randint(0, 8, (n,), generator=generator, device=device)
    angle = k.to(torch.float64) * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    noise = torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
    return (centers + std * noise).to(dtype)


def two_moons(n: int, generator=None, device=None, dtype=torch.float32, noise: float = 0.1) -> torch.Tensor:
    """Two interleaved half circles (scikit-learn's make_moons geometry), scaled by 2 and centred."""
    upper = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    theta = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * math.pi
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1)
    pts = pts + noise * torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
    return (2 * pts).to(dtype)


def spiral(n: int, generator=None, device=None, dtype=torch.float32, turns: float = 1.5,
           noise: float = 0.1) -> torch.Tensor:
    """An Archimedean spiral r = theta, theta in [0.5, 2 pi turns], scaled into about [-4, 4]^2."""
    theta = 0.5 + torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (2 * math.pi * turns - 0.5)
    r = theta / (2 * math.pi * turns) * 4
    pts = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    pts = pts + noise * torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
    return pts.to(dtype)


def checker_labels(x: torch.Tensor) -> torch.Tensor:
    """Which of the checker's 8 light 2 x 2 squares each point lies in (0..7, column-major)."""
    a = (torch.floor(x[:, 0].double() / 2) + 2).clamp(0, 3).long()
    b = (torch.floor(x[:, 1].double() / 2) + 2).clamp(0, 3).long()
    return 2 * a + b // 2


def _peek_labels(n: int, classes: int, generator, device) -> torch.Tensor:
    """The component draw that opens the 8-Gaussians and moons samplers, without consuming it."""
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    k = torch.randint(0, classes, (n,), generator=generator, device=device)
    generator.set_state(state) if generator is not None else torch.set_rng_state(state)
    return k


def _labelled(name: str, n: int, generator, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # the same draws as the unlabelled sampler, in the same order, so a labelled sample is the
    # unlabelled one plus its labels
    if name == "8gaussians":
        k = _peek_labels(n, 8, generator, device)
        return eight_gaussians(n, generator=generator, device=device, dtype=dtype), k
    if name == "moons":
        upper = _peek_labels(n, 2, generator, device)
        return two_moons(n, generator=generator, device=device, dtype=dtype), 1 - upper
    x = checker(n, generator=generator, device=device, dtype=dtype)
    return x, checker_labels(x)


DATASETS: dict[str, Callable[..., torch.Tensor]] = {
    "checker": checker,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
    "spiral": spiral,
}


# the labelled toys: the number of classes, each point's label being its mixture component
# (8gaussians), its half circle (moons) or its light square (checker)
LABELLED: dict[str, int] = {"8gaussians": 8, "moons": 2, "checker": 8}


def sample_labelled(name: str, n: int, generator: torch.Generator | None = None, device=None,
                    dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], labels [n])`` of a labelled toy (see ``LABELLED``); ``x`` is exactly
    :func:`sample_data` of the same generator state."""
    if name not in LABELLED:
        raise ValueError(f"dataset {name!r} has no labels; labelled toys: {', '.join(LABELLED)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return _labelled(name, n, generator, device, dtype)


def sample_data(name: str, n: int, generator: torch.Generator | None = None, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """``n`` samples ``[n, 2]`` of a named 2D distribution (see ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return DATASETS[name](n, generator=generator, device=device, dtype=dtype)
