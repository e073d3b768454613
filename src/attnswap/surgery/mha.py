"""``torch.nn.MultiheadAttention`` sites: the module's own projections around the router.

Its ``forward`` is PyTorch's (``F.multi_head_attention_forward``, or the fused fast path in
eval), not source we can reroute, so patched instances get :func:`forward` below: q/k/v from
the module's own ``in_proj_weight`` (or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ)
and ``in_proj_bias``, the router, then ``out_proj``. Masks keep PyTorch's meaning exactly:
a boolean ``attn_mask`` or ``key_padding_mask`` marks positions *not* to attend (the opposite
of SDPA's boolean convention), so both become additive ``-inf`` masks as PyTorch itself does,
and are summed; ``is_causal`` is a hint that ``attn_mask`` is causal, used like PyTorch
does (only without a padding mask).

Calls this path does not cover run PyTorch's own ``forward`` unchanged, and each is counted
with its reason in :func:`attnswap.stats`: ``need_weights=True`` (the default of
``nn.MultiheadAttention``: the averaged weights are returned, which no fused kernel
computes; pass ``need_weights=False`` as ``nn.TransformerEncoderLayer`` and torchvision's
ViT do), ``add_bias_kv``, ``add_zero_attn``, and non-tensor inputs (under ``torch.fx``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import ROUTER_ATTR

_Tensor = torch.Tensor


def _why_not(module: nn.MultiheadAttention, query, key, value, need_weights: bool) -> str | None:
    if need_weights:
        return "need_weights=True: the attention weights are returned, which no attention kernel computes"
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True (a learned key/value appended to the sequence)"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor):
        return "inputs are not plain tensors (nested tensors, or tracing)"
    if query.dim() not in (2, 3):
        return f"query has {query.dim()} dims (MultiheadAttention takes 2 or 3)"
    return None


def _additive(mask: _Tensor | None, dtype: torch.dtype, name: str) -> _Tensor | None:
    """PyTorch's meaning of an MHA mask, as an additive float mask (``-inf`` = do not attend)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask.to(dtype)


def forward(
    self: nn.MultiheadAttention,
    query: _Tensor,
    key: _Tensor,
    value: _Tensor,
    key_padding_mask: _Tensor | None = None,
    need_weights: bool = True,
    attn_mask: _Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[_Tensor, _Tensor | None]:
    router = self.__dict__.get(ROUTER_ATTR)  # None: unpatched by another thread while in flight
    why = "unpatched while the call was in flight" if router is None else _why_not(self, query, key, value, need_weights)
    if why is not None:
        if router is not None:
            router.note_settled(why)
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # now (L, B, E), PyTorch's own layout for the projections
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    heads, head_dim = self.num_heads, self.head_dim
    if embed_dim != self.embed_dim:
        raise RuntimeError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
    if self._qkv_same_embed_dim:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q = b_k = b_v = None
    if self.in_proj_bias is not None:
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    k = F.linear(key, w_k, b_k).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    v = F.linear(value, w_v, b_v).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)

    causal = False
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None:
        attn_mask, causal = None, True  # PyTorch's rule: the hint replaces the causal mask it describes
    mask = _additive(attn_mask, q.dtype, "attn_mask")
    if mask is not None:
        if mask.dim() == 3:  # (B·H, L, S)
            mask = mask.view(bsz, heads, tgt_len, src_len)
        elif mask.dim() != 2:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
    padding = _additive(key_padding_mask, q.dtype, "key_padding_mask")
    if padding is not None:
        padding = padding.view(bsz, 1, 1, src_len)
        mask = padding if mask is None else mask + padding
    out = router.route(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, embed_dim)
    if not batched:
        out = out.squeeze(1)
    elif self.batch_first:
        out = out.transpose(0, 1)
    return out, None


def disable_fast_paths(module: nn.MultiheadAttention, args: tuple) -> None:
    """A forward pre-hook that does nothing. Its presence is what matters: PyTorch's fused
    ``TransformerEncoderLayer`` path (eval, no grad) calls ``torch._transformer_encoder_layer_fwd``
    with the attention's weights and never calls ``self_attn``; it stands down when any
    submodule has forward hooks, so a patched attention is always called."""
    return None


def is_plain_mha(cls: type) -> bool:
    """``cls`` is ``nn.MultiheadAttention`` or a subclass that keeps its ``forward``."""
    return isinstance(cls, type) and issubclass(cls, nn.MultiheadAttention) and cls.forward is nn.MultiheadAttention.forward
