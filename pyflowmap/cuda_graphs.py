"""Multi-step sampling captured in one CUDA graph: at small batch a K-step sampler is bound by
kernel launches and Python, and a graph replays the whole loop with one launch."""

from __future__ import annotations

import weakref

import torch

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class CUDAGraphSampler:
    """The sampling loop of :func:`pyflowmap.sample` for one (shape, dtype, grid, kind, base),
    captured once and replayed. Inputs are copied into a static buffer; the result is a copy of
    the static output (later replays overwrite it)."""

    def __init__(self, model, noise: torch.Tensor, grid: torch.Tensor, kind: str, base):
        from pyflowmap.sampling import _loop

        self.static_in = noise.detach().clone()
        self.grid = grid.clone()  # the time grid lives on the device for the whole capture
        run = lambda: _loop(model, self.static_in, self.grid, kind, base, None, None)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy init, autotuning)
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = run()

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        if noise.shape != self.static_in.shape or noise.dtype != self.static_in.dtype:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype}, "
                             f"got {tuple(noise.shape)} {noise.dtype}")
        self.static_in.copy_(noise)
        self.graph.replay()
        return self.static_out.clone()


def graph_sampler(model, noise: torch.Tensor, grid: torch.Tensor, kind: str, base, generator) -> CUDAGraphSampler:
    """The cached :class:`CUDAGraphSampler` for these arguments (captured on first use)."""
    if noise.device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("graph=True captures a CUDA graph and needs CUDA tensors; use graph=False on the CPU")
    if generator is not None:
        raise ValueError("graph=True draws its noise from the default CUDA generator; pass generator=None "
                         "and seed with torch.cuda.manual_seed")
    key = (tuple(noise.shape), noise.dtype, noise.device.index, tuple(grid.tolist()), kind, id(base))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = CUDAGraphSampler(model, noise, grid, kind, base)
    return per_model[key]
