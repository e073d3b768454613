"""``eager``: the reference math, written out with matmul and softmax.

Matches ``torch.nn.functional.scaled_dot_product_attention``'s documented semantics on
every point: boolean masks (True = attend) and additive masks, both broadcastable;
``is_causal`` aligned to the top-left corner; ``scale``; dropout; GQA through
``enable_gqa``; q_len != kv_len; value head dim != query/key head dim; rows whose every
key is masked give zeros (as SDPA's safe softmax does). Differentiable everywhere.
"""

from __future__ import annotations

import math

import torch

from .base import Backend


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if key.size(-2) != value.size(-2):
        raise RuntimeError(
            f"key and value must have the same sequence length, got {key.size(-2)} and {value.size(-2)}"
        )
    q_len, kv_len = query.size(-2), key.size(-2)
    scale_factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and query.dim() >= 3:
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hq % hk or hq % hv:
            raise RuntimeError(f"enable_gqa needs query heads ({hq}) divisible by key ({hk}) and value ({hv}) heads")
        key = key.repeat_interleave(hq // hk, dim=-3)
        value = value.repeat_interleave(hq // hv, dim=-3)

    scores = torch.matmul(query, key.transpose(-2, -1)) * scale_factor
    masked = None
    if is_causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
        masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    if masked is not None:
        # Rows with no key left: SDPA returns zeros there (safe softmax), not NaN. Zeroing the
        # scores first keeps NaN out of the backward too.
        scores = scores.masked_fill(masked, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(masked, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, value)


class EagerBackend(Backend):
    name = "eager"
    description = "reference math (matmul + softmax); every feature, O(L*S) memory"
    accepts_everything = True

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return eager_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
