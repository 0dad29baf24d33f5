"""Multi-step sampling captured in one CUDA graph: at small batch a K-step sampler is bound by
kernel launches and Python, and a graph replays the whole loop with one launch."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from pyflowmap.interpolants import GaussianBase

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
MAX_GRAPHS_PER_MODEL = 8  # each graph holds a private memory pool: keep the cache bounded (LRU)


class CUDAGraphSampler:
    """A sampling loop ``loop(x, grid, base, c, w)`` of :func:`pyflowmap.sample` for one (shape,
    dtype, grid, kind, base, condition shape, guidance), captured once and replayed. The noise,
    the condition ``c`` and the guidance input ``w`` are copied into static buffers on every
    call (new labels replay the same graph); the result is a copy of the static output (later
    replays overwrite it)."""

    def __init__(self, loop, noise: torch.Tensor, grid: torch.Tensor, base, c=None, w=None):
        self.device = noise.device
        with torch.cuda.device(self.device):
            self.static_in = noise.detach().clone()
            self.static_c = None if c is None else c.detach().clone()
            self.static_w = None if w is None else w.detach().clone()
            self.grid = grid.clone()  # the time grid lives on the device for the whole capture
            if base is not None:  # device-resident constants: no host-to-device copy inside the capture
                base = GaussianBase(std=torch.as_tensor(base.std, dtype=noise.dtype).to(self.device),
                                    mean=torch.as_tensor(base.mean, dtype=noise.dtype).to(self.device))
            self.base = base
            run = lambda: loop(self.static_in, self.grid, self.base, self.static_c, self.static_w)  # noqa: E731
            # the warm-up draws noise eagerly; restore the generator so that seeding before the
            # first call gives the same stream as seeding before any later one
            rng = torch.cuda.get_rng_state(self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy init, autotuning)
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.set_rng_state(rng, self.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = run()

    def __call__(self, noise: torch.Tensor, c=None, w=None) -> torch.Tensor:
        if noise.shape != self.static_in.shape or noise.dtype != self.static_in.dtype or noise.device != self.device:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype} on "
                             f"{self.device}, got {tuple(noise.shape)} {noise.dtype} on {noise.device}")
        for name, static, new in (("c", self.static_c, c), ("w", self.static_w, w)):
            if (static is None) != (new is None) or (new is not None and (new.shape != static.shape
                                                                          or new.dtype != static.dtype)):
                raise ValueError(f"this graph was captured with {name} "
                                 f"{None if static is None else (tuple(static.shape), static.dtype)}, got "
                                 f"{None if new is None else (tuple(new.shape), new.dtype)}")
        with torch.cuda.device(self.device):
            self.static_in.copy_(noise)
            if c is not None:
                self.static_c.copy_(c)
            if w is not None:
                self.static_w.copy_(w)
            self.graph.replay()
            return self.static_out.clone()


def graph_sampler(model, loop, noise: torch.Tensor, grid: torch.Tensor, kind: str, base, generator, c=None, w=None,
                  guidance: float | None = None) -> CUDAGraphSampler:
    """The cached :class:`CUDAGraphSampler` for these arguments (captured on first use)."""
    if noise.device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("graph=True captures a CUDA graph and needs CUDA tensors; use graph=False on the CPU")
    if generator is not None:
        raise ValueError("graph=True draws its noise from the default CUDA generator; pass generator=None "
                         "and seed with torch.cuda.manual_seed")
    # Everything the captured kernels depend on: shapes, the grid, the noise source, and the
    # model's mode, precision and parameter storage (a .to() or load_state_dict(assign=True)
    # reallocates it and would leave a stale graph reading freed memory).
    params = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
    key = (tuple(noise.shape), noise.dtype, noise.device.index, tuple(grid.tolist()), kind,
           None if base is None else (repr(base.std), repr(base.mean)), model.training,
           torch.is_autocast_enabled(), params,
           None if c is None else (tuple(c.shape), c.dtype), None if w is None else tuple(w.shape), guidance)
    per_model = _CACHE.setdefault(model, OrderedDict())
    if key in per_model:
        per_model.move_to_end(key)
    else:
        per_model[key] = CUDAGraphSampler(loop, noise, grid, base, c, w)
        while len(per_model) > MAX_GRAPHS_PER_MODEL:
            per_model.popitem(last=False)
    return per_model[key]
