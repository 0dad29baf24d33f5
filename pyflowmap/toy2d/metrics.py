"""Sample-quality metrics for 2D distributions.

* :func:`checker_kl`: histogram estimate of KL(p || q) between the exact checker density p and
  the model's sample distribution q.
* :func:`energy_distance`, :func:`mmd`: two-sample distances for any data.
"""

from __future__ import annotations

import torch

from pyflowmap.toy2d.data import checker, checker_density


def checker_kl(samples: torch.Tensor, bins_per_unit: int = 4, alpha: float = 0.5) -> float:
    """Histogram KL(p || q_hat) between the checker density p and samples of q.

    The estimator (the paper does not publish theirs): cells of width 1 / ``bins_per_unit``
    tile [-4, 4]^2 and align with the 2 x 2 checker squares, so p is constant on each cell;
    one more cell collects every sample outside [-4, 4]^2. With counts n_j of N samples over
    the M + 1 cells, q_hat_j = (n_j + alpha) / (N + alpha (M + 1)) (Krichevsky-Trofimov
    smoothing, alpha = 1/2, keeps empty cells finite), and KL = sum_j P_j log(P_j / q_hat_j)
    over cells with mass P_j > 0. Mass outside the support or in dark squares lowers q_hat on
    the light squares and so raises KL. Exact samples do not score 0: the histogram's variance
    adds about (K - 1) / (2N) and the smoothing about alpha (M + 1 - K) / N for K support
    cells, 0.008 in all for N = 64k at the default 4 cells per unit (K = 512, M = 1024); see
    :func:`checker_kl_floor`.
    """
    x = _check_points(samples).double()
    n = x.shape[0]
    if n == 0:
        raise ValueError("checker_kl needs at least one sample")
    cells = 8 * bins_per_unit
    idx = torch.floor((x + 4) * bins_per_unit).long()
    inside = ((idx >= 0) & (idx < cells)).all(dim=1)
    flat = idx[inside, 0] * cells + idx[inside, 1]
    counts = torch.bincount(flat, minlength=cells * cells).double()
    q = (counts + alpha) / (n + alpha * (cells * cells + 1))
    centers = (torch.arange(cells, dtype=torch.float64) + 0.5) / bins_per_unit - 4
    grid = torch.stack(torch.meshgrid(centers, centers, indexing="ij"), dim=-1).reshape(-1, 2)
    p = checker_density(grid) / bins_per_unit**2
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask])).sum())


def checker_kl_floor(n: int = 65536, seed: int = 0, **kwargs) -> float:
    """:func:`checker_kl` of ``n`` exact checker samples: what a perfect model would score."""
    g = torch.Generator().manual_seed(seed)
    return checker_kl(checker(n, generator=g), **kwargs)


def _check_points(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"expected samples of shape [N, d], got {getattr(x, 'shape', type(x))}")
    if not torch.all(torch.isfinite(x)):
        raise ValueError("samples contain NaN or Inf")
    return x


def _subsample(x: torch.Tensor, max_n: int, generator: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= max_n:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:max_n].to(x.device)]


def _mean_pairwise(a: torch.Tensor, b: torch.Tensor, fn, same: bool, chunk: int = 2048) -> torch.Tensor:
    """Mean of fn(|a_i - b_j|) over pairs (i != j when ``same``), in chunks to bound memory."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], chunk):
        total = total + fn(torch.cdist(a[i:i + chunk], b)).sum()
    if same:  # the diagonal holds fn(0)
        total = total - a.shape[0] * fn(torch.zeros((), dtype=a.dtype, device=a.device))
        return total / (a.shape[0] * (a.shape[0] - 1))
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor, max_n: int = 4096, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within each set).

    Zero iff the distributions agree (up to estimator noise). Each set is subsampled to
    ``max_n`` points (seeded) to keep the O(N^2) cost bounded.
    """
    g = torch.Generator().manual_seed(seed)
    x = _subsample(_check_points(x), max_n, g).double()
    y = _subsample(_check_points(y), max_n, g).double()
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy_distance needs at least two samples in each set")
    ident = lambda d: d  # noqa: E731
    xy = _mean_pairwise(x, y, ident, same=False)
    xx = _mean_pairwise(x, x, ident, same=True)
    yy = _mean_pairwise(y, y, ident, same=True)
    return float(2 * xy - xx - yy)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0), max_n: int = 4096,
        seed: int = 0) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels exp(-d^2 / (2 h^2)) over ``bandwidths``."""
    g = torch.Generator().manual_seed(seed)
    x = _subsample(_check_points(x), max_n, g).double()
    y = _subsample(_check_points(y), max_n, g).double()
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("mmd needs at least two samples in each set")

    def kernel(d):
        return sum(torch.exp(-d**2 / (2 * h**2)) for h in bandwidths)

    return float(_mean_pairwise(x, x, kernel, True) + _mean_pairwise(y, y, kernel, True)
                 - 2 * _mean_pairwise(x, y, kernel, False))
