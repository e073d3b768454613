"""``xformers``: ``xformers.ops.memory_efficient_attention`` (BMHK layout).

What xformers needs and SDPA does not (read from xformers v0.0.35, ``ops/fmha/common.py``,
``cutlass.py``, ``attn_bias.py``):

- A tensor bias of exactly ``[B, H, Mq, Mkv]`` in the query's dtype, every stride but the
  last a multiple of 8 elements for fp16/bf16 (4 for fp32). Broadcast dims may be stride-0
  views; the rest is copied once into a buffer whose last dim is padded to the alignment and
  sliced back, so timm's ``N = 197`` works.
- No boolean masks: they become additive ``-inf`` biases in the same buffer.
- No head broadcasting in 4-D: grouped k/v heads go through the 5-D ``[B, M, G, H, K]``
  form, k/v expanded as views. xformers supports that forward only.
- ``is_causal`` is ``LowerTriangularMask``, top-left aligned like SDPA's.

A bias that requires grad is materialized at full size: xformers' backward refuses a
broadcast bias.
"""

from __future__ import annotations

import sys

import torch

from ..call import MASK_NONE, CallFacts
from ..errors import BackendRefused
from .base import Limits, head_count_reasons
from .optional import OptionalPackage
from .packaged import PackagedBackend, bshd, from_bshd

_CUTLASS_MAX_CAPABILITY = (9, 0)


def bias_alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the stride multiple xformers' cutlass kernel needs for a bias."""
    return 128 // torch.finfo(dtype).bits


def aligned_bias(mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """``mask`` (SDPA's: bool or additive, broadcastable to ``shape``) as the tensor bias
    xformers takes: ``dtype``, shape exactly ``shape``, strides aligned. A view of ``mask``
    when it already is one; otherwise one copy into a padded buffer, broadcast dims kept
    stride-0 unless the bias needs a gradient."""
    align = bias_alignment(dtype)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    needs_grad = m.requires_grad and torch.is_grad_enabled()
    if (
        m.dtype == dtype
        and not needs_grad
        and (m.size(-1) == 1 or m.stride(-1) == 1)
        and all(m.stride(d) % align == 0 for d in range(3))
    ):
        return m.expand(shape)
    keep = shape[:3] if needs_grad else tuple(1 if m.size(d) == 1 else shape[d] for d in range(3))
    padded = -(-shape[3] // align) * align
    buffer = torch.empty(*keep, padded, dtype=dtype, device=mask.device)[..., : shape[3]]
    if m.dtype == torch.bool:
        buffer.zero_().masked_fill_(m.logical_not().expand(*keep, shape[3]), float("-inf"))
    else:
        buffer.copy_(m.expand(*keep, shape[3]))
    return buffer.expand(shape)


class XformersBackend(PackagedBackend):
    name = "xformers"
    description = "xformers memory_efficient_attention: fp32/fp16/bf16, additive bias and bool masks, dropout"
    package = OptionalPackage(("xformers.ops",), "xformers", minimum="0.0.28", below="0.1", pip="`pip install xformers` (a wheel built for your torch)")
    function = "memory_efficient_attention"
    cuda_limits = Limits(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        ndims=frozenset({4}),
        kv_batch_broadcast=False,
        min_cuda_capability=(5, 0),
    )

    def package_problem(self, module) -> str | None:
        top = sys.modules.get("xformers")
        if top is not None and getattr(top, "_has_cpp_library", True) is False:
            cpp = sys.modules.get("xformers._cpp_lib")
            why = getattr(cpp, "_cpp_library_load_exception", None)
            detail = f" ({str(why).strip().splitlines()[0]})" if why else ""
            return (
                f"xformers' compiled extension did not load{detail}; xformers then runs none of its CUDA "
                f"operators. Install an xformers built for torch {torch.__version__}"
            )
        return None

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if facts.device_type != "cuda":
            return []
        out = head_count_reasons(facts, same_kv_heads=True)
        if facts.grouped_heads and facts.needs_grad:
            out.append("grouped or broadcast key/value heads with backward (xformers' 5-D form is forward only)")
        cap = self.capability(facts)
        if facts.dtype == torch.bfloat16 and cap < (8, 0):
            out.append("bfloat16 needs compute capability >= 8.0")
        align = 4 if facts.dtype == torch.float32 else 8
        for label, d in (("head_dim", facts.head_dim), ("value head_dim", facts.v_head_dim)):
            if d % align:
                out.append(f"{label} {d} is not a multiple of {align} for {str(facts.dtype)[6:]}")
        needs_cutlass = facts.mask_kind != MASK_NONE or facts.dtype == torch.float32
        if needs_cutlass and cap > _CUTLASS_MAX_CAPABILITY:
            out.append(
                f"a mask or float32 needs xformers' cutlass kernel, built up to sm90; this GPU is sm{cap[0]}{cap[1]}"
            )
        return out

    def varlen_reasons(self, facts: CallFacts) -> list[str]:
        if self.unavailable_reason is None and getattr(getattr(self.package.load(), "fmha", None), "BlockDiagonalMask", None) is None:
            return ["this xformers has no fmha.BlockDiagonalMask"]
        if facts.grouped_heads:
            return ["grouped or broadcast key/value heads in packed sequences (xformers' 5-D form is not taken here)"]
        return []

    def varlen(self, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lengths_q, lengths_k,
               scale=None, enable_gqa=False):
        # packed sequences are one batch of 1 with a block-diagonal bias (xformers' own varlen form)
        bias = self.package.load().fmha.BlockDiagonalMask.from_seqlens(lengths_q, lengths_k, device=query.device)
        return self.kernel_function(query[None], key[None], value[None], attn_bias=bias, p=0.0, scale=scale)[0]

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        ops = self.package.load()
        batch, heads, q_len, _ = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        q, k, v = bshd(query), bshd(key), bshd(value)
        bias = None
        if attn_mask is not None:
            bias = aligned_bias(attn_mask, (batch, heads, q_len, kv_len), query.dtype)
        elif is_causal:
            bias = ops.LowerTriangularMask()
        grouped = kv_heads != heads
        if grouped:
            group = heads // kv_heads
            q = q.unflatten(2, (kv_heads, group))
            k = k.unsqueeze(3).expand(batch, kv_len, kv_heads, group, k.shape[-1])
            v = v.unsqueeze(3).expand(batch, kv_len, kv_heads, group, v.shape[-1])
            if isinstance(bias, torch.Tensor):
                bias = bias.unflatten(1, (kv_heads, group))
        try:
            out = self.kernel_function(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
        except (NotImplementedError, ValueError) as exc:
            # xformers' dispatcher lists why no operator fits (alignment, arch, build)
            raise BackendRefused(f"xformers refused the call: {' '.join(str(exc).split())[:600]}") from None
        if grouped:
            out = out.flatten(2, 3)
        return from_bshd(out)
