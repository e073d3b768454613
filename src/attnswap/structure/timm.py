"""timm's attention-bias builders, as structures (imported when a rerouted timm method calls one).

Each replacement computes exactly what timm's function computes, with its own helpers (read
from the original function's globals), up to the point where timm expands the parts into the
full bias; the structure then holds the parts. The fingerprints pin the timm code each
replacement was written against (timm 1.0.31): a timm whose builder differs keeps building
its tensor (``builders.skipped`` says so).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F

from .builders import register_additive_builder, register_builder, register_method_builder, register_method_wrapper
from .decomposed import KIND as DECOMPOSED, DecomposedRelPos
from .padding import KIND as KEY_PADDING, KeyPadding
from .table import KIND as TABLE, TableGather
from .windows import KIND as WINDOWS, WindowedBias

_Tensor = torch.Tensor


def _is_compiling() -> bool:
    """A graph is being traced (dynamo, fx, jit): replacements run timm's own builder then, so the
    graph holds its tensor and nothing computed at trace time is baked into it."""
    return torch.compiler.is_compiling() or _fx_tracing() or torch.jit.is_tracing()


_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or torch.fx._symbolic_trace.is_fx_tracing


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
        n = math.isqrt(index.numel())
        return TableGather(table, index, n, n, lambda: original(self))

    return _get_rel_pos_bias


register_method_builder("timm.models.beit.Attention", "_get_rel_pos_bias", "df2d13ed525b1fff", TABLE, _table_bias)
register_method_builder("timm.models.swin_transformer.WindowAttention", "_get_rel_pos_bias", "b08f95a866a73b33", TABLE, _table_bias)
register_method_builder("timm.layers.pos_embed_rel.RelPosBias", "get_bias", "fe4131930fdc3039", TABLE, _table_bias)


def _mlp_table_bias(original: Callable) -> Callable:
    """``RelPosMlp.get_bias(self)`` (vit_relpos, MaxViT/CoAtNet ``rel_pos_type='mlp'``): an MLP
    maps the log-spaced relative coordinates to a ``[T, H]`` table (live parameters, dropout in
    training), gathered by the index, then ``bias_act`` (Swin v2's ``16·sigmoid``) and zero
    rows/columns for prefix tokens. The MLP runs once per call: the tensor, when a backend needs
    it, is timm's arithmetic on that same table (calling timm again would draw its dropout twice)."""

    def get_bias(self):
        coords, index = self.rel_coords_log, self.relative_position_index
        if index is None or type(coords) is not _Tensor or _is_compiling():
            return original(self)
        raw = self.mlp(coords).view(-1, self.num_heads)

        def build():
            # timm: pos_embed_rel.RelPosMlp.get_bias, on the table computed above
            bias = raw[index].view(self.bias_shape).permute(2, 0, 1)
            bias = self.bias_act(bias)
            if self.bias_gain is not None:
                bias = self.bias_gain * bias
            if self.prefix_tokens:
                bias = F.pad(bias, [self.prefix_tokens, 0, self.prefix_tokens, 0])
            return bias.unsqueeze(0).contiguous()

        # the activation is elementwise, so applied to the table it gives the gathered values
        # (to the last bit of the activation's SIMD and scalar paths: only a kernel reading the
        # table sees that)
        table = self.bias_act(raw)
        if self.bias_gain is not None:
            table = self.bias_gain * table
        n = self.window_area + self.prefix_tokens
        return TableGather(table, index, n, n, build, prefix=self.prefix_tokens)

    return get_bias


register_method_builder("timm.layers.pos_embed_rel.RelPosMlp", "get_bias", "2b9a6f191421ac64", TABLE, _mlp_table_bias)


@functools.lru_cache(maxsize=64)
def _tf_index(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Where ``reindex_2d_einsum_lookup`` reads each (query, key) bias from in a ``[2h-1, 2w-1]``
    table: query cell (i, j), key cell (x, y) -> ``(x - i + h - 1, y - j + w - 1)``, flattened."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    dy = rows.view(1, -1) - rows.view(-1, 1) + height - 1  # [i, x]
    dx = cols.view(1, -1) - cols.view(-1, 1) + width - 1  # [j, y]
    index = dy.view(height, 1, height, 1) * (2 * width - 1) + dx.view(1, width, 1, width)
    return index.reshape(-1)


def _tf_table_bias(original: Callable) -> Callable:
    """``RelPosBiasTf.get_bias(self)`` (MaxViT's TF ports): timm reindexes its ``[H, 2h-1, 2w-1]``
    table with one-hot einsums into ``[H, N, N]``; the same values are a gather."""

    def get_bias(self):
        table = self.relative_position_bias_table
        if type(table) is not torch.nn.Parameter and type(table) is not _Tensor or _is_compiling():
            return original(self)
        height, width = self.window_size
        index = _tf_index(height, width, table.device)
        n = height * width
        return TableGather(table.view(table.shape[0], -1).t(), index, n, n, lambda: original(self), batched=False)

    return get_bias


register_method_builder("timm.layers.pos_embed_rel.RelPosBiasTf", "get_bias", "4e570ee6f39cac88", TABLE, _tf_table_bias)


def _attention_biases(original: Callable) -> Callable:
    """``get_attention_biases(self, device)`` of LeViT, EfficientFormer (v1, v2), EfficientViT
    (MSRA) and TinyViT: ``attention_biases[:, attention_bias_idxs]`` (``[H, Nq, Nk]``). In eval
    mode timm gathers once per device and reuses that tensor (no work per call, and a cache
    attnswap must not bypass: it is what the unpatched model computes with), so only training
    calls, which gather from the live table, carry the table."""

    def get_attention_biases(self, device):
        table = self.attention_biases
        if not self.training or _is_compiling():
            return original(self, device)
        if type(table) is not torch.nn.Parameter and type(table) is not _Tensor:
            return original(self, device)
        idxs = self.attention_bias_idxs
        return TableGather(
            table.t(), idxs.reshape(-1), idxs.shape[0], idxs.shape[1], lambda: original(self, device), batched=False
        )

    return get_attention_biases


for _cls in (
    "timm.models.levit.Attention",
    "timm.models.levit.AttentionDownsample",
    "timm.models.efficientformer.Attention",
    "timm.models.efficientformer_v2.Attention2d",
    "timm.models.efficientformer_v2.Attention2dDownsample",
    "timm.models.efficientvit_msra.CascadedGroupAttention",
    "timm.models.tiny_vit.Attention",
):
    register_method_builder(_cls, "get_attention_biases", "952e591ecd1a62d0", TABLE, _attention_biases)


def _swin_windows(rerouted: Callable) -> Callable:
    """``swin_transformer.WindowAttention.forward`` in a shifted block: timm's fused branch builds
    ``rel-pos bias + mask`` expanded to every image and head (``[B·nW, H, N, N]``); here the call
    gets that sum as a :class:`~.windows.WindowedBias` of the window's bias and the
    ``[nW, N, N]`` mask. Every other call (no mask, the non-fused branch, while compiling) is
    the rerouted method itself."""
    from ..routing import ROUTER_ATTR, UNROUTED

    def forward(self, x, mask=None):
        if mask is None or not self.fused_attn or type(x) is not _Tensor or type(mask) is not _Tensor or _is_compiling():
            return rerouted(self, x, mask)
        # timm: swin_transformer.WindowAttention.forward, its fused branch
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = WindowedBias(self._get_rel_pos_bias(), mask, B_, self.num_heads)
        x = self.__dict__.get(ROUTER_ATTR, UNROUTED).route(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
        )
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    return forward


register_method_wrapper("timm.models.swin_transformer.WindowAttention", "forward", "3796f1c54f42f857", WINDOWS, _swin_windows)


def _mvit_decomposed(original: Callable) -> Callable:
    """``mvitv2.cal_rel_pos_type(attn, q, ...)`` adds a decomposed rel-pos bias, computed from the
    unscaled ``q``, to the scores' grid block (after the class token) in place; this returns that
    term as factors, ``[B, H, q_h·q_w, k_h]`` and ``[B, H, q_h·q_w, k_w]``, with the class token
    as a prefix (zero row and column)."""

    def bias_of(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w):
        if type(q) is not _Tensor or _is_compiling():
            return None
        # timm: mvitv2.cal_rel_pos_type, up to its in-place add
        sp_idx = 1 if has_cls_token else 0
        q_h, q_w = q_size
        k_h, k_w = k_size
        q_h_ratio = max(k_h / q_h, 1.0)
        k_h_ratio = max(q_h / k_h, 1.0)
        dist_h = (
            torch.arange(q_h, device=q.device, dtype=torch.long).unsqueeze(-1) * q_h_ratio -
            torch.arange(k_h, device=q.device, dtype=torch.long).unsqueeze(0) * k_h_ratio
        )
        dist_h += (k_h - 1) * k_h_ratio
        q_w_ratio = max(k_w / q_w, 1.0)
        k_w_ratio = max(q_w / k_w, 1.0)
        dist_w = (
            torch.arange(q_w, device=q.device, dtype=torch.long).unsqueeze(-1) * q_w_ratio -
            torch.arange(k_w, device=q.device, dtype=torch.long).unsqueeze(0) * k_w_ratio
        )
        dist_w += (k_w - 1) * k_w_ratio
        rel_h = rel_pos_h[dist_h.long()]
        rel_w = rel_pos_w[dist_w.long()]
        B, n_head, q_N, dim = q.shape
        r_q = q[:, :, sp_idx:].reshape(B, n_head, q_h, q_w, dim)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rel_h)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rel_w)
        return DecomposedRelPos(
            rel_h.reshape(B, n_head, q_h * q_w, k_h), rel_w.reshape(B, n_head, q_h * q_w, k_w), prefix=sp_idx
        )

    return bias_of


register_additive_builder("timm.models.mvitv2.cal_rel_pos_type", "608298008f649bb2", DECOMPOSED, _mvit_decomposed)


def _bot_decomposed(original: Callable) -> Callable:
    """``PosEmbedRel.forward(q)`` of BoTNet (``bottleneck_attn``) and HaloNet (``halo_attn``):
    ``rel_logits_h + rel_logits_w``, each made by ``rel_logits_1d`` as a view that broadcasts one
    ``[..., q, k_row]`` (or ``k_col``) factor over the other key axis, then reshaped into the
    ``[..., Nq, kh·kw]`` logits. The factors are those views at index 0 of their broadcast axis:
    the same values, added in the same order when the bias is built."""
    rel_logits_1d = original.__globals__["rel_logits_1d"]

    def forward(self, q):
        if type(q) is not _Tensor or _is_compiling():
            return original(self, q)
        if q.dim() == 3:  # timm: bottleneck_attn.PosEmbedRel.forward
            B, HW, _ = q.shape
            lead = (B,)
            q = q.reshape(B, self.height, self.width, -1)
        else:  # timm: halo_attn.PosEmbedRel.forward
            B, BB, HW, _ = q.shape
            lead = (B, BB)
            q = q.reshape(-1, self.block_size, self.block_size, self.dim_head)
        rel_w = rel_logits_1d(q, self.width_rel, permute_mask=(0, 1, 3, 2, 4))[:, :, :, 0, :]
        q = q.transpose(1, 2)
        rel_h = rel_logits_1d(q, self.height_rel, permute_mask=(0, 3, 1, 4, 2))[..., 0]
        return DecomposedRelPos(rel_h.reshape(*lead, HW, -1), rel_w.reshape(*lead, HW, -1))

    return forward


register_method_builder("timm.layers.bottleneck_attn.PosEmbedRel", "forward", "1f2f3c6093bba56d", DECOMPOSED, _bot_decomposed)
register_method_builder("timm.layers.halo_attn.PosEmbedRel", "forward", "09211bcd80510ad9", DECOMPOSED, _bot_decomposed)


def _gemma4_padding(original: Callable) -> Callable:
    """``Gemma4VitEncoder._encode``: timm builds a key-only ``[B, 1, 1, N]`` mask (−inf at padded
    patches) inline and hands it to every block; here the blocks get it as the tokens' validity.
    A batch with a sequence of padding only keeps timm's tensor: its rows are −inf everywhere,
    which SDPA's kernels answer differently (NaN or 0), so there is no one answer to reproduce."""
    checkpoint = original.__globals__["checkpoint"]

    def _encode(self, x, position_ids, padding_positions, block_callback=None, max_block_index=None):
        if padding_positions is None or type(x) is not _Tensor or type(padding_positions) is not _Tensor or _is_compiling():
            return original(self, x, position_ids, padding_positions, block_callback, max_block_index)
        valid = ~padding_positions
        if bool(valid.all()) or not bool(valid.any(dim=1).all()):
            return original(self, x, position_ids, padding_positions, block_callback, max_block_index)
        # timm: gemma4_vit.Gemma4VitEncoder._encode
        B, N = x.shape[:2]
        rope_cos, rope_sin = self.rotary_emb(x, position_ids)

        def build():
            mask = torch.zeros(B, 1, 1, N, device=x.device, dtype=x.dtype)
            mask.masked_fill_(padding_positions[:, None, None, :], float("-inf"))
            return mask

        attn_mask = KeyPadding(valid, False, 1, x.dtype, build)
        if max_block_index is None:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_block_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope_cos, rope_sin, attn_mask)
            else:
                x = blk(x, rope_cos, rope_sin, attn_mask=attn_mask)
            if block_callback is not None:
                block_callback(i, x)
        return x

    return _encode


register_method_builder("timm.models.gemma4_vit.Gemma4VitEncoder", "_encode", "c7b0e81ac17bd52b", KEY_PADDING, _gemma4_padding)
