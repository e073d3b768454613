"""timm's attention-bias builders, as structures (imported when a rerouted timm method calls one).

Each replacement computes exactly what timm's function computes, with its own helpers (read
from the original function's globals), up to the point where timm expands the parts into the
full bias; the structure then holds the parts. The fingerprints pin the timm code each
replacement was written against (timm 1.0.31): a timm whose builder differs keeps building
its tensor (``builders.skipped`` says so).
"""

from __future__ import annotations

from typing import Callable

import torch

from .builders import register_builder, register_method_builder
from .decomposed import KIND as DECOMPOSED, DecomposedRelPos
from .padding import KIND as KEY_PADDING, KeyPadding
from .table import KIND as TABLE, TableGather

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling


def _sam_decomposed(original: Callable) -> Callable:
    get_rel_pos = original.__globals__["get_rel_pos"]

    def get_decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, q_size, k_size):
        if type(q) is not _Tensor or _is_compiling():
            return original(q, rel_pos_h, rel_pos_w, q_size, k_size)
        # timm: vision_transformer_sam.get_decomposed_rel_pos_bias, up to its final broadcast add
        q_h, q_w = q_size
        k_h, k_w = k_size
        Rh = get_rel_pos(q_h, k_h, rel_pos_h)
        Rw = get_rel_pos(q_w, k_w, rel_pos_w)
        B, _, dim = q.shape
        r_q = q.reshape(B, q_h, q_w, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
        return DecomposedRelPos(rel_h.reshape(B, q_h * q_w, k_h), rel_w.reshape(B, q_h * q_w, k_w))

    return get_decomposed_rel_pos_bias


register_builder(
    "timm.models.vision_transformer_sam.get_decomposed_rel_pos_bias", "99b3d3e0716990f3", DECOMPOSED, _sam_decomposed
)


def _naflex_padding(original: Callable) -> Callable:
    def create_attention_mask(patch_valid, num_prefix_tokens=0, symmetric=True, q_len=None, dtype=torch.float32):
        if patch_valid is None or type(patch_valid) is not _Tensor or _is_compiling():
            return original(patch_valid, num_prefix_tokens, symmetric, q_len, dtype)
        # timm: naflexvit.create_attention_mask, the validity it builds its mask from
        valid = patch_valid.bool()
        if num_prefix_tokens > 0:
            valid = torch.cat([valid.new_ones((valid.shape[0], num_prefix_tokens)), valid], dim=1)
        length = valid.shape[1]
        return KeyPadding(
            valid,
            symmetric,
            length if symmetric else (q_len or length),
            dtype,
            lambda: original(patch_valid, num_prefix_tokens, symmetric, q_len, dtype),
        )

    return create_attention_mask


register_builder("timm.models.naflexvit.create_attention_mask", "6695476321fec45b", KEY_PADDING, _naflex_padding)


def _table_bias(original: Callable) -> Callable:
    """BEiT's and Swin's ``_get_rel_pos_bias(self)`` and ``RelPosBias.get_bias(self)`` (MaxViT,
    CoAtNet, MaxxViT, GCViT's ``rel_pos_type='bias'``): ``table[index].view(N, N, H).permute(2, 0, 1)
    .unsqueeze(0)``, N the window area plus any prefix tokens (BEiT's cls row and column)."""

    def _get_rel_pos_bias(self):
        table = self.relative_position_bias_table
        if type(table) is not torch.nn.Parameter and type(table) is not _Tensor or _is_compiling():
            return original(self)
        index = self.relative_position_index.view(-1)
        n = int(round(index.numel() ** 0.5))
        return TableGather(table, index, n, n, lambda: original(self))

    return _get_rel_pos_bias


register_method_builder("timm.models.beit.Attention", "_get_rel_pos_bias", "df2d13ed525b1fff", TABLE, _table_bias)
register_method_builder("timm.models.swin_transformer.WindowAttention", "_get_rel_pos_bias", "b08f95a866a73b33", TABLE, _table_bias)
register_method_builder("timm.layers.pos_embed_rel.RelPosBias", "get_bias", "fe4131930fdc3039", TABLE, _table_bias)
