"""``flash`` (flash-attn 2), ``flash3`` (FlashAttention-3) and ``flash4`` (FlashAttention-4).

All three take ``[B, L, H, E]`` half-precision tensors whose last dim is contiguous; SDPA's
``[B, H, L, E]`` is passed as a transposed view, so nothing is copied. None of them takes an
attention mask or bias, so calls with one are refused (the site falls back). Their causal
mask is aligned bottom-right when ``q_len != kv_len``, SDPA's ``is_causal`` top-left, so a
causal call with unequal lengths is refused too, never computed differently.

Limits below are read from each library's source (flash-attn v2.8.3 ``csrc/flash_attn/
flash_api.cpp``; ``hopper/flash_api.cpp`` for FA3; ``flash_attn/cute/interface.py`` at
fa4-v4.0.0.beta27 for FA4).
"""

from __future__ import annotations

import torch

from ..call import CallFacts
from .base import Limits, head_count_reasons
from .optional import OptionalPackage
from .packaged import PackagedBackend, bshd, deterministic, first, from_bshd

_HALF = frozenset({torch.float16, torch.bfloat16})

_FLASH_COMMON = dict(
    devices=frozenset({"cuda"}),
    dtypes=_HALF,
    ndims=frozenset({4}),
    additive_mask=False,
    bool_mask=False,
    causal_unequal_lengths=False,  # flash-attn's causal is bottom-right; SDPA's is top-left
    kv_batch_broadcast=False,
    min_cuda_capability=(8, 0),
)


def _flash_heads(facts: CallFacts) -> list[str]:
    # flash-attn checks num_heads % num_heads_k and k/v shapes equal: k and v have one head count
    return head_count_reasons(facts, same_kv_heads=True)


class FlashAttn2Backend(PackagedBackend):
    name = "flash"
    description = "flash-attn 2 (flash_attn_func): fp16/bf16, sm80+, dropout, no mask"
    package = OptionalPackage(("flash_attn",), "flash_attn", minimum="2.6", below="3", pip="`pip install flash-attn --no-build-isolation`")
    function = "flash_attn_func"
    varlen_function = "flash_attn_varlen_func"
    # head_dim <= 256; the Python wrapper pads it to a multiple of 8 itself
    cuda_limits = Limits(**_FLASH_COMMON, max_head_dim=256, v_head_dim_differs=False)

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        return _flash_heads(facts) if facts.device_type == "cuda" else []

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = self.kernel_function(
            bshd(query), bshd(key), bshd(value),
            dropout_p=dropout_p, softmax_scale=scale, causal=is_causal, deterministic=deterministic(),
        )
        return from_bshd(out)

    def varlen(self, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lengths_q, lengths_k,
               scale=None, enable_gqa=False):
        return self.varlen_kernel_function(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p=0.0, softmax_scale=scale, causal=False, deterministic=deterministic(),
        )


class _FlashWithoutDropout(PackagedBackend):
    """FA3 and FA4 take the same call: no dropout, everything after v by keyword (FA4's
    positional order changed between betas), and ``out`` or ``(out, lse)`` back depending on
    the version (FA3: a tuple up to v2.8.1, ``out`` since; FA4: always a tuple)."""

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        result = self.kernel_function(
            bshd(query), bshd(key), bshd(value), softmax_scale=scale, causal=is_causal, deterministic=deterministic(),
        )
        return from_bshd(first(result))

    def varlen(self, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lengths_q, lengths_k,
               scale=None, enable_gqa=False):
        # by keyword after v: FA4's varlen takes ``qv`` fourth, FA3's the offsets
        result = self.varlen_kernel_function(
            query, key, value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=False, deterministic=deterministic(),
        )
        return first(result)


class FlashAttn3Backend(_FlashWithoutDropout):
    name = "flash3"
    description = "FlashAttention-3 (flash_attn_interface): Hopper-tuned, fp16/bf16, sm80/sm90, no dropout, no mask"
    package = OptionalPackage(
        ("flash_attn_interface", "flash_attn_3.flash_attn_interface"), "flash_attn_3", minimum="3.0.0b1", below="4",
        pip="`pip install flash_attn_3` from the PyTorch wheel index for your CUDA, or by building flash-attention's hopper/",
    )
    function = "flash_attn_func"
    varlen_function = "flash_attn_varlen_func"
    # kernels are built for sm80 and sm90a only; newer cards pass FA3's own check and then fail
    cuda_limits = Limits(**_FLASH_COMMON, head_dim_multiple=8, dropout=False, max_cuda_capability=(9, 0))

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if facts.device_type != "cuda":
            return []
        out = _flash_heads(facts)
        d, dv = facts.head_dim, facts.v_head_dim
        if d == dv:
            if d > 256:
                out.append(f"head_dim {d} > 256")
        else:
            hopper = self.capability(facts)[0] == 9
            pair = (128 < d <= 192 and 96 < dv <= 128) or (d <= 64 and dv <= 512)
            if not (hopper and pair):
                out.append(
                    f"value head_dim {dv} != head_dim {d}: FA3 takes that only on Hopper, for "
                    "head_dim in (128, 192] with value head_dim in (96, 128], or head_dim <= 64 with value head_dim <= 512"
                )
            elif facts.needs_grad and max(d, dv) > 256:
                out.append(f"backward with head dims ({d}, {dv}) (FA3's backward takes at most 256)")
        if facts.needs_grad and deterministic() and max(d, dv) > 192:
            out.append("deterministic backward with head_dim 256 is not supported by FA3")
        return out


class FlashAttn4Backend(_FlashWithoutDropout):
    name = "flash4"
    description = "FlashAttention-4 (flash_attn.cute, CuTe DSL): Hopper/Blackwell, fp16/bf16, no dropout, no mask"
    # flash_attn.cute.__version__ looks up the wrong distribution and says 0.0.0
    package = OptionalPackage(
        ("flash_attn.cute",), "flash-attn-4", minimum="4.0.0b1", below="5", pip="`pip install flash-attn-4`",
        version_attribute=False,
    )
    function = "flash_attn_func"
    varlen_function = "flash_attn_varlen_func"
    # FA4 registers no torch.library op: dynamo cannot trace its DLPack/JIT path (flex can run FA4 kernels)
    cuda_limits = Limits(**_FLASH_COMMON, head_dim_multiple=8, dropout=False, compile=False, max_cuda_capability=(12, 9))

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if facts.device_type != "cuda":
            return []
        out = _flash_heads(facts)
        major = self.capability(facts)[0]
        d, dv = facts.head_dim, facts.v_head_dim
        if major == 9:
            ok = 8 <= d <= 256 and 8 <= dv <= 256
            allowed = "8..256"
        elif major in (10, 11):
            ok = (d <= 128 and dv <= 128) or (d, dv) in ((192, 128), (256, 256))
            allowed = "up to 128, (192, 128) or (256, 256)"
        else:
            # FA4 validates no head dims on sm8x/sm12x; keep to sizes every arch's kernel implements
            ok = d == dv and d <= 128
            allowed = "equal and up to 128"
        if not ok:
            out.append(f"head dims ({d}, {dv}) on sm{major}x (FA4 takes {allowed})")
        if facts.needs_grad and major < 9:
            out.append(f"backward on sm{major}x (FA4's backward needs sm90+)")
        if facts.needs_grad and major == 12 and deterministic():
            out.append("deterministic backward on sm12x is not supported by FA4")
        return out
