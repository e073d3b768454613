"""``sage``: SageAttention's ``sageattn`` (INT8 q·kᵀ, FP8/FP16 p·v): approximate, inference only.

It takes SDPA's own ``[B, H, L, E]`` layout (``tensor_layout="HND"``), so nothing moves. No
mask, no dropout, no backward; causal only with equal lengths (its docstring: "only
applicable when qo_len == kv_len"). Its arch dispatch is an exact list of GPUs (v2.2.0
``core.py``); anything else raises, so it is refused up front. Being approximate, the
router never picks it as a fallback; a site asked for ``sage`` falls back from it to exact
kernels, never the other way round.
"""

from __future__ import annotations

import torch

from ..call import CallFacts
from .base import Limits, head_count_reasons
from .optional import OptionalPackage
from .packaged import PackagedBackend

#: sageattn() dispatches on exactly these (sm80, sm86, sm89, sm90, sm120), v2.2.0
SAGE_ARCHS = frozenset({(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)})


class SageBackend(PackagedBackend):
    name = "sage"
    description = "SageAttention sageattn (8-bit, approximate): fp16/bf16, inference only, no mask"
    exact = False
    package = OptionalPackage(("sageattention",), "sageattention", minimum="2.1", below="3", pip="`pip install sageattention`")
    function = "sageattn"
    cuda_limits = Limits(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        ndims=frozenset({4}),
        max_head_dim=128,
        v_head_dim_differs=False,
        additive_mask=False,
        bool_mask=False,
        causal_unequal_lengths=False,
        kv_batch_broadcast=False,
        dropout=False,
        backward=False,
    )

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if facts.device_type != "cuda":
            return []
        out = head_count_reasons(facts, same_kv_heads=True)
        cap = self.capability(facts)
        if cap not in SAGE_ARCHS:
            known = ", ".join(f"sm{a}{b}" for a, b in sorted(SAGE_ARCHS))
            out.append(f"SageAttention has kernels for {known}; this GPU is sm{cap[0]}{cap[1]}")
        return out

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        out = self.kernel_function(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)
        return out[0] if isinstance(out, tuple) else out
