"""Fused JVP rules for models pyflowmap did not build: a ``TorchFunctionMode`` that routes
``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.gelu`` and ``F.silu`` (and so the
modules built on them: ``nn.LayerNorm``, ``nn.GELU``, ``nn.SiLU``) to the autograd.Functions of
:mod:`pyflowmap.nn.forward_ad`, whose ``jvp`` is the fused dual kernel. ``nn.MultiheadAttention``
(and so ``nn.TransformerEncoderLayer`` / ``DecoderLayer``) goes through
``F.multi_head_attention_forward``, whose internal SDPA call a mode cannot see; it is routed too
(``need_weights=False``, the layers' own setting: its projections, then the fused attention).
Under it ``torch.func.jvp`` passes through SDPA (which has no forward-AD rule) in O(N) memory,
and reverse mode through the tangent gets correct LayerNorm gradients.

    with pf.nn.fused_jvp():
        out, tangent = torch.func.jvp(model, (x,), (x_dot,))

``pf.JVP`` (``derivative="jvp"``) enters it around every jvp, so every objective's jvp mode
uses it on a user's model. Outside forward AD the routed functions compute what the native
ones do (SDPA still runs forward; the backward recomputes it), so a model may run under the
mode for its whole training step.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pyflowmap.nn.forward_ad import ActivationFn, AttentionFn, LayerNormFn


def _error(msg: str) -> ValueError:
    return ValueError(f"pf.nn.fused_jvp: scaled_dot_product_attention {msg}")


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None:
        raise _error("with attn_mask is not supported by the JVP attention (only is_causal); "
                     "leave the call outside the mode or drop the mask")
    if dropout_p != 0.0:
        raise _error(f"with dropout_p={dropout_p} is not supported (the JVP attention has no dropout "
                     "mask shared by primal and tangent); pass dropout_p=0 in training too")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise _error(f"`{name}` must be a tensor [..., L, E], got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise _error(f"needs one head dim for query, key and value, got {query.shape[-1]}, "
                     f"{key.shape[-1]}, {value.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise _error(f"`key` {tuple(key.shape)} and `value` {tuple(value.shape)} must agree but for the head dim")
    nq, nk = query.shape[-2], key.shape[-2]
    if is_causal and nq != nk:
        # SDPA aligns is_causal top-left, the JVP kernel bottom-right: equal only for Nq == Nk
        raise _error(f"with is_causal and Nq {nq} != Nk {nk} is not supported (alignment differs)")
    lead = query.shape[:-2]
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        hq, hk = query.shape[-3], key.shape[-3]
        if hq % hk:
            raise _error(f"with enable_gqa needs query heads {hq} divisible by key heads {hk}")
        key, value = (t.repeat_interleave(hq // hk, dim=-3) for t in (key, value))
    if key.shape[:-2] != lead:
        raise _error(f"batch / head dims of `query` {tuple(lead)} and `key` {tuple(key.shape[:-2])} differ"
                     + ("" if enable_gqa else " (pass enable_gqa=True for grouped-query attention)"))
    d = query.shape[-1]
    if scale is not None and d:
        # softmax(scale q k^T) = softmax((q scale sqrt(d)) k^T / sqrt(d)): linear in q, so exact for the tangent too
        query = query * (float(scale) * math.sqrt(d))
    b = math.prod(lead)
    q, k, v = (t.reshape(b, 1, *t.shape[-2:]) for t in (query, key, value))
    return AttentionFn.apply(q, k, v, bool(is_causal)).reshape(*lead, nq, d)


def _multi_head_attention(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                          bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                          key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                          q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                          average_attn_weights=True, is_causal=False):
    args = (query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias)
    kwargs = dict(training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                  attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight,
                  q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight,
                  static_k=static_k, static_v=static_v, average_attn_weights=average_attn_weights,
                  is_causal=is_causal)
    if need_weights or (is_causal and attn_mask is None):
        # need_weights: PyTorch forms softmax(QK^T) explicitly, which has forward AD (N x N
        # memory, as the weights asked for); the causal case without a mask is its own error
        return F.multi_head_attention_forward(*args, **kwargs)
    if is_causal and key_padding_mask is None:
        attn_mask = None  # PyTorch's rule: the mask is then the causal one, passed to SDPA as is_causal
    unsupported = [name for name, v in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask),
                                        ("bias_k", bias_k), ("bias_v", bias_v), ("static_k", static_k),
                                        ("static_v", static_v)) if v is not None] + (["add_zero_attn"] * add_zero_attn)
    if unsupported:
        raise ValueError(f"pf.nn.fused_jvp: multi_head_attention_forward with {', '.join(unsupported)} is not "
                         "supported by the JVP attention (only is_causal); leave the call outside the mode")
    batched = query.dim() == 3
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
    tgt_len, bsz, embed_dim = query.shape
    if embed_dim != embed_dim_to_check or embed_dim % num_heads:
        return F.multi_head_attention_forward(*args, **kwargs)  # PyTorch's own shape errors
    if use_separate_proj_weight:
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    hd = embed_dim // num_heads
    q, k, v = (t.reshape(t.shape[0], bsz, num_heads, hd).permute(1, 2, 0, 3) for t in (q, k, v))
    o = _sdpa(q, k, v, dropout_p=dropout_p if training else 0.0, is_causal=is_causal)
    o = F.linear(o.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim), out_proj_weight, out_proj_bias)
    o = o.view(tgt_len, bsz, embed_dim)
    return (o if batched else o.squeeze(1)), None


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return LayerNormFn.apply(input, shape, weight, bias, eps)


def _gelu(input, approximate="none"):
    if approximate != "none":  # the tanh form has no fused rule; its native forward-AD is right
        return F.gelu(input, approximate=approximate)
    return ActivationFn.apply(input, "gelu")


def _silu(input, inplace=False):
    if inplace:  # an in-place activation keeps its native semantics
        return F.silu(input, inplace=True)
    return ActivationFn.apply(input, "silu")


ROUTES = {
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _multi_head_attention,
    F.layer_norm: _layer_norm,
    F.gelu: _gelu,
    F.silu: _silu,
}


class FusedJVPMode(TorchFunctionMode):
    """Routes the functions of :data:`ROUTES` to their fused-jvp twins (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = ROUTES.get(func)
        return (route or func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def fused_jvp():
    """Enter :class:`FusedJVPMode` (re-entrant: a nested call adds nothing)."""
    from torch.overrides import _get_current_function_mode_stack

    if any(isinstance(m, FusedJVPMode) for m in _get_current_function_mode_stack()):
        yield
        return
    with FusedJVPMode():
        yield
