"""Conditions and classifier-free guidance (docs/conditioning.md).

A network may take a condition ``c``: class labels ``[B]`` (an integer dtype) in
``[0, num_classes]``, the last value ``num_classes`` being the reserved null class, or a
conditioning tensor ``[B, ...]`` (floating, e.g. a text embedding) whose null is zeros. A
network declares what it takes with ``num_classes`` (class labels) or ``cond_shape`` (the
per-example shape of a tensor condition), and may define ``null_condition(c)``; a network that
also takes the guidance scale as an input declares ``guidance_input = True`` and accepts
``w`` ``[B]``. Conditions carry no tangent.

Guidance combines the conditional and the null outputs, ``out_null + w (out_c - out_null)``
(``torch.lerp``: one kernel), from one network call on the doubled batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _inner(model):
    """The network that declares the condition: a FlowMap's or EDMConsistency's ``net``."""
    seen = 0
    while hasattr(model, "net") and isinstance(getattr(model, "net"), nn.Module) and seen < 8:
        if getattr(model, "num_classes", None) is not None or getattr(model, "cond_shape", None) is not None:
            break
        model, seen = model.net, seen + 1
    return model


def num_classes(model) -> int | None:
    """The number of (non-null) classes ``model``'s network is conditioned on, or None."""
    k = getattr(_inner(model), "num_classes", None)
    return None if k is None else int(k)


def cond_shape(model) -> tuple[int, ...] | None:
    s = getattr(_inner(model), "cond_shape", None)
    return None if s is None else tuple(int(d) for d in s)


def is_conditional(model) -> bool:
    return num_classes(model) is not None or cond_shape(model) is not None


def takes_guidance(model) -> bool:
    """Whether ``model``'s network takes the guidance scale ``w`` as an input."""
    return bool(getattr(_inner(model), "guidance_input", False))


def null_condition(model, c: torch.Tensor) -> torch.Tensor:
    """The null condition shaped like ``c``: the class ``num_classes`` for labels, zeros for a
    tensor condition, or the network's own ``null_condition(c)``."""
    net = _inner(model)
    if hasattr(net, "null_condition"):
        return net.null_condition(c)
    if not c.is_floating_point():
        k = num_classes(model)
        if k is None:
            raise TypeError(f"{type(net).__name__} declares no num_classes, so integer labels have no null class")
        return torch.full_like(c, k)
    return torch.zeros_like(c)


def check_condition(name: str, c, model, batch: int) -> None:
    """Host-side checks of a condition given to an objective or a sampler (one sync: the label
    range), so bad labels fail here with the argument's name rather than as an index error or a
    device-side assert inside the network."""
    if c is None:
        return
    net = type(_inner(model)).__name__
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (class labels [B] or a condition [B, ...]), got {type(c).__name__}")
    k, shape = num_classes(model), cond_shape(model)
    if k is None and shape is None:
        raise TypeError(f"{name} was given but {net} is not conditional (it declares neither num_classes nor "
                        "cond_shape)")
    if c.dim() == 0 or c.shape[0] != batch:
        raise ValueError(f"{name} must have one entry per example (batch {batch}), got shape {tuple(c.shape)}")
    if c.dtype == torch.bool or c.is_complex():
        raise TypeError(f"{name} must be integer class labels or a floating condition, got {c.dtype}")
    if not c.is_floating_point():
        if k is None:
            raise TypeError(f"{name}: {net} takes a tensor condition of shape [B, {', '.join(map(str, shape))}], "
                            f"got integer labels")
        if c.dim() != 1:
            raise ValueError(f"{name}: class labels must be [B], got shape {tuple(c.shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) > k):
            raise ValueError(f"{name}: class labels must lie in [0, {k}] ({k} is the null class), got labels in "
                             f"[{int(c.min())}, {int(c.max())}]")
        return
    if shape is None:
        raise TypeError(f"{name}: {net} is a class-conditional model (num_classes={k}) and takes integer labels, "
                        f"got {c.dtype} values")
    if tuple(c.shape[1:]) != shape:
        raise ValueError(f"{name} must be [B, {', '.join(map(str, shape))}], got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_guidance(name: str, w) -> float | None:
    """A guidance scale: a finite float (1: conditional, 0: unconditional), or None."""
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise ValueError(f"{name} must be a finite number, got {w!r}")
    return float(w)


def drop_conditions(c: torch.Tensor, drop: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """``c`` with the rows where ``drop`` ``[B]`` (bool) is set replaced by ``null``."""
    mask = drop.view(-1, *([1] * (c.dim() - 1)))
    return torch.where(mask, null, c)


def combine(out_c: torch.Tensor, out_null: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guidance ``out_null + w (out_c - out_null)``; ``w`` a float or ``[B]``."""
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        w = w.to(out_c.dtype).view(-1, *([1] * (out_c.dim() - 1)))
    return torch.lerp(out_null, out_c, w)


def doubled(c: torch.Tensor, null: torch.Tensor, *xs):
    """``cat([c, null])`` and each of ``xs`` (None stays None) repeated twice along the batch."""
    return (torch.cat([c, null]),) + tuple(None if x is None else torch.cat([x, x]) for x in xs)


class ConditionEmbedding(nn.Module):
    """The embedding of a condition (and optionally of the guidance scale) that pyflowmap's
    networks add to their time conditioning.

    ``num_classes``: a table of ``num_classes + 1`` rows, the last one the null class (rows of
    dropped labels learn the unconditional model). ``cond_shape``: a tensor condition, flattened
    and projected by a linear layer (its null is zeros). ``guidance_input``: also embed the
    guidance scale w ``[B]`` (sinusoidal on w / ``guidance_max``, then linear), so one model
    serves every w. ``c=None`` means the null condition; ``w=None`` means w = 1.
    """

    def __init__(self, dim: int, num_classes: int | None = None, cond_shape=None, guidance_input: bool = False,
                 guidance_max: float = 8.0):
        super().__init__()
        if (num_classes is None) == (cond_shape is None):
            raise ValueError("ConditionEmbedding: give exactly one of num_classes and cond_shape")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if guidance_max <= 0:
            raise ValueError(f"guidance_max must be positive, got {guidance_max}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.cond_shape = None if cond_shape is None else tuple(int(d) for d in cond_shape)
        self.guidance_input, self.guidance_max = bool(guidance_input), float(guidance_max)
        if self.num_classes is not None:
            self.table = nn.Embedding(self.num_classes + 1, dim)
            nn.init.normal_(self.table.weight, std=0.02)
        else:
            self.proj = nn.Linear(math.prod(self.cond_shape), dim)
        if self.guidance_input:
            from pyflowmap.nn.embeddings import SinusoidalEmbedding

            self.w_emb = SinusoidalEmbedding(dim if dim % 2 == 0 else dim + 1, scale=10.0)
            self.w_proj = nn.Linear(self.w_emb.dim, dim)

    def forward(self, c: torch.Tensor | None, batch: int, w: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``[batch, dim]``."""
        if c is None:
            if self.num_classes is not None:
                c = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            else:
                c = torch.zeros((batch, *self.cond_shape), dtype=dtype, device=device)
        if c.shape[0] != batch:
            raise ValueError(f"condition c has {c.shape[0]} rows for a batch of {batch}")
        if self.num_classes is not None:
            if c.is_floating_point() or c.dtype == torch.bool or c.dim() != 1:
                raise TypeError(f"this network takes class labels c [B] of an integer dtype, got {c.dtype} "
                                f"{tuple(c.shape)}")
            e = self.table(c.long()).to(dtype)  # any integer dtype (uint8 labels too)
        else:
            if not c.is_floating_point() or tuple(c.shape[1:]) != self.cond_shape:
                raise TypeError(f"this network takes a floating condition c [B, {self.cond_shape}], got {c.dtype} "
                                f"{tuple(c.shape)}")
            e = self.proj(c.reshape(batch, -1).to(self.proj.weight.dtype)).to(dtype)
        if self.guidance_input:
            if w is None:
                w = torch.ones(batch, dtype=dtype, device=e.device)
            w = torch.as_tensor(w, dtype=dtype, device=e.device).expand(batch)
            e = e + self.w_proj(self.w_emb(w / self.guidance_max).to(self.w_proj.weight.dtype)).to(dtype)
        elif w is not None:
            raise TypeError("this network does not take the guidance scale w as an input (guidance_input=False)")
        return e


class Conditioned:
    """What pyflowmap's networks share about their condition (a mixin before ``nn.Module``):
    an optional :class:`ConditionEmbedding` in ``cond_emb``, the attributes the contract reads
    (``num_classes``, ``cond_shape``, ``guidance_input``) and the embedding of ``(c, w)``."""

    def _init_condition(self, emb_dim: int, num_classes, cond_shape, guidance_input: bool) -> bool:
        """Builds ``cond_emb`` (None for an unconditional net); returns whether it is conditional."""
        conditional = num_classes is not None or cond_shape is not None
        if guidance_input and not conditional:
            raise ValueError("guidance_input=True needs a conditional network (num_classes or cond_shape)")
        self.cond_emb = ConditionEmbedding(emb_dim, num_classes, cond_shape, guidance_input) if conditional else None
        return conditional

    num_classes = property(lambda self: None if self.cond_emb is None else self.cond_emb.num_classes)
    cond_shape = property(lambda self: None if self.cond_emb is None else self.cond_emb.cond_shape)
    guidance_input = property(lambda self: self.cond_emb is not None and self.cond_emb.guidance_input)

    def _condition(self, x, c, w) -> list:
        """``[embedding [B, emb_dim]]`` of ``(c, w)``, or ``[]`` for an unconditional net."""
        if self.cond_emb is None:
            if c is not None or w is not None:
                raise TypeError(f"this {type(self).__name__} is unconditional: build it with num_classes= or "
                                "cond_shape= to pass c")
            return []
        return [self.cond_emb(c, x.shape[0], w, dtype=x.dtype, device=x.device)]
