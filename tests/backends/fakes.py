"""CPU stand-ins for flash-attn 2, FlashAttention-3, FlashAttention-4, xformers and SageAttention.

Each follows its library's documented signature exactly (parameter names, order, defaults and
return value) and re-checks the input rules the real kernel enforces (layout, dtype, head
counts, bias shape and alignment), then computes the attention in float32 with that library's
own semantics: flash-attn's causal mask is bottom-right aligned, xformers' LowerTriangularMask
and SageAttention's are top-left. So an adapter that passes the wrong layout, scale, corner or
bias fails here, not only on a GPU.

Sources: flash-attn v2.8.3 ``flash_attn/flash_attn_interface.py`` / ``csrc/flash_attn/
flash_api.cpp``; ``hopper/flash_attn_interface.py`` at fa4-v4.0.0.beta27; ``flash_attn/cute/
interface.py`` (same tag); xformers v0.0.35 ``ops/fmha/__init__.py``, ``common.py``,
``cutlass.py``, ``attn_bias.py``; SageAttention v2.2.0 ``sageattention/core.py``.
"""

from __future__ import annotations

import math
import types

import torch

HALF = (torch.float16, torch.bfloat16)


class Recorder(list):
    """Every call a fake received: (function name, its bound arguments)."""


def _attend(q, k, v, scale, *, causal_offset=None, bias=None, dropout_p=0.0):
    """[B, Sq, H, D] x [B, Sk, H, D] in float32. ``causal_offset``: key j is kept for query i
    when j <= i + offset (0 is top-left, Sk - Sq bottom-right)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if bias is not None:
        s = s + bias.float()
    if causal_offset is not None:
        sq, sk = s.shape[-2:]
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + causal_offset
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p:
        p = torch.nn.functional.dropout(p, dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float())


def _heads_to_q(t, heads):
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def _check_flash_inputs(q, k, v, *, same_v_dim=True):
    assert q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type"
    assert k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype"
    for t in (q, k, v):
        assert t.dim() == 4, "flash-attn takes [batch, seqlen, nheads, headdim]"
        assert t.stride(-1) == 1, "Input tensor must have contiguous last dimension"
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    assert h % hk == 0, "Number of heads in key/value must divide number of heads in query"
    assert tuple(k.shape) == (b, sk, hk, d), f"key shape {tuple(k.shape)} != {(b, sk, hk, d)}"
    dv = d if same_v_dim else v.shape[-1]
    assert tuple(v.shape) == (b, sk, hk, dv), f"value shape {tuple(v.shape)} != {(b, sk, hk, dv)}"


def _flash_out(q, k, v, softmax_scale, causal, dropout_p=0.0):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    h = q.shape[2]
    offset = k.shape[1] - q.shape[1] if causal else None  # bottom-right
    out = _attend(q, _heads_to_q(k, h), _heads_to_q(v, h), scale, causal_offset=offset, dropout_p=dropout_p)
    return out.to(q.dtype)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, same_v_dim=True):
    """flash-attn's varlen rules: packed ``[total, nheads, headdim]``, int32 ``[B + 1]`` offsets on
    the tensors' device, max lengths as ints."""
    assert q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type"
    assert k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype"
    for t in (q, k, v):
        assert t.dim() == 3, "varlen takes [total, nheads, headdim]"
        assert t.stride(-1) == 1, "Input tensor must have contiguous last dimension"
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32, "cu_seqlens_q must have dtype int32"
        assert cu.is_contiguous() and cu.device == q.device and cu.dim() == 1
    assert cu_seqlens_q.numel() == cu_seqlens_k.numel(), "one offset per sequence, for q and for k"
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[0] == 0 and ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
    assert max_seqlen_q >= max(b - a for a, b in zip(cq, cq[1:]))
    assert max_seqlen_k >= max(b - a for a, b in zip(ck, ck[1:]))
    h, hk = q.shape[1], k.shape[1]
    assert h % hk == 0, "Number of heads in key/value must divide number of heads in query"
    assert k.shape[1:] == (hk, q.shape[2]) and v.shape[:2] == k.shape[:2]
    if same_v_dim:
        assert v.shape[2] == q.shape[2]
    return cq, ck


def _varlen_out(q, k, v, cq, ck, softmax_scale, causal):
    outs = [
        _flash_out(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], softmax_scale, causal)[0]
        for (qa, qb), (ka, kb) in zip(zip(cq, cq[1:]), zip(ck, ck[1:]))
    ]
    return torch.cat(outs).contiguous()


def flash_attn_2(recorder: Recorder, version: str = "2.8.3") -> types.ModuleType:
    module = types.ModuleType("flash_attn")
    module.__version__ = version

    def flash_attn_func(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),  # -1 means infinite context window
        softcap=0.0,  # 0.0 means deactivated
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
    ):
        recorder.append(("flash_attn_func", dict(q=q, k=k, v=v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                                  causal=causal, window_size=window_size, deterministic=deterministic)))
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # maybe_contiguous
        _check_flash_inputs(q, k, v)
        assert q.shape[-1] <= 256, "FlashAttention forward only supports head dimension at most 256"
        result = _flash_out(q, k, v, softmax_scale, causal, dropout_p)
        out = torch.empty_like(q)  # flash_api.cpp: out keeps q's strides
        out.copy_(result)
        if return_attn_probs:
            return out, None, None
        return out

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),  # -1 means infinite context window
        softcap=0.0,  # 0.0 means deactivated
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        recorder.append(("flash_attn_varlen_func", dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                         dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                                         deterministic=deterministic)))
        cq, ck = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out = _varlen_out(q, k, v, cq, ck, softmax_scale, causal)
        return (out, None, None) if return_attn_probs else out

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def flash_attn_3(recorder: Recorder, version: str = "3.0.0", returns_lse: bool = False) -> types.ModuleType:
    """``flash_attn_interface`` at HEAD; ``returns_lse=True`` is the <= v2.8.1 return value."""
    module = types.ModuleType("flash_attn_interface")
    module.__version__ = version

    def flash_attn_func(
        q,
        k,
        v,
        softmax_scale=None,
        causal=False,
        qv=None,
        q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        num_splits=1,
        pack_gqa=None,
        deterministic=False,
        sm_margin=0,
        return_attn_probs=False,
    ):
        recorder.append(("flash_attn_func", dict(q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal,
                                                  deterministic=deterministic)))
        _check_flash_inputs(q, k, v, same_v_dim=False)
        assert q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0, "head_size should be a multiple of 8"
        out = _flash_out(q, k, v, softmax_scale, causal).contiguous()
        if returns_lse or return_attn_probs:
            return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])
        return out

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seqused_q=None,
        seqused_k=None,
        softmax_scale=None,
        causal=False,
        qv=None,
        q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        num_splits=1,
        pack_gqa=None,
        deterministic=False,
        sm_margin=0,
        return_attn_probs=False,
    ):
        recorder.append(("flash_attn_varlen_func", dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                         softmax_scale=softmax_scale, causal=causal, deterministic=deterministic)))
        assert seqused_q is None and seqused_k is None, "a scale or flag was passed positionally"
        cq, ck = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_v_dim=False)
        out = _varlen_out(q, k, v, cq, ck, softmax_scale, causal)
        if returns_lse or return_attn_probs:
            return out, torch.zeros(q.shape[1], q.shape[0])
        return out

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def flash_attn_4(recorder: Recorder) -> types.ModuleType:
    module = types.ModuleType("flash_attn.cute")
    module.__version__ = "0.0.0"  # upstream looks up the wrong distribution name

    def flash_attn_func(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        qv=None,
        gather_kv_indices=None,
        softmax_scale=None,
        causal: bool = False,
        window_size=(None, None),
        learnable_sink=None,
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa=None,
        deterministic: bool = False,
        score_mod=None,
        score_mod_bwd=None,
        mask_mod=None,
        aux_tensors=None,
        aux_scalars=None,
        block_sparse_tensors=None,
        block_sparse_tensors_bwd=None,
        return_lse: bool = False,
    ):
        assert qv is None and gather_kv_indices is None, "a scale or flag was passed positionally"
        recorder.append(("flash_attn_func", dict(q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal,
                                                  deterministic=deterministic)))
        _check_flash_inputs(q, k, v, same_v_dim=False)
        out = _flash_out(q, k, v, softmax_scale, causal).contiguous()
        return out, None  # always a tuple

    def flash_attn_varlen_func(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        qv=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        min_seqlen_k=None,
        seqused_q=None,
        seqused_k=None,
        gather_kv_indices=None,
        page_table=None,
        softmax_scale=None,
        causal: bool = False,
        window_size=(None, None),
        learnable_sink=None,
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa=None,
        deterministic: bool = False,
        score_mod=None,
        score_mod_bwd=None,
        mask_mod=None,
        block_sparse_tensors=None,
        aux_tensors=None,
        aux_scalars=None,
        return_lse: bool = False,
        scheduler_metadata=None,
        seqlen_k_per_split=None,
        disable_scheduler_metadata: bool = False,
    ):
        assert qv is None, "the offsets were passed positionally (qv is FA4's fourth parameter)"
        recorder.append(("flash_attn_varlen_func", dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                         softmax_scale=softmax_scale, causal=causal, deterministic=deterministic)))
        cq, ck = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_v_dim=False)
        return _varlen_out(q, k, v, cq, ck, softmax_scale, causal), None  # always a tuple

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


class LowerTriangularMask:
    """xformers' causal mask: top-left aligned (``_CustomMaskType.CausalFromTopLeft``)."""


class BlockDiagonalMask:
    """xformers' packed-sequences bias (``attn_bias.BlockDiagonalMask``): queries of block ``i``
    attend to keys of block ``i`` only; inputs are one batch of 1."""

    def __init__(self, q_seqstart: list[int], k_seqstart: list[int], device) -> None:
        self.q_seqstart, self.k_seqstart, self.device = q_seqstart, k_seqstart, device

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        assert not isinstance(q_seqlen, torch.Tensor), "seqlens are Python ints"
        kv_seqlen = q_seqlen if kv_seqlen is None else kv_seqlen
        assert len(kv_seqlen) == len(q_seqlen)

        def starts(lengths):
            out = [0]
            for n in lengths:
                out.append(out[-1] + int(n))
            return out

        return cls(starts(q_seqlen), starts(kv_seqlen), device)

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        mask = torch.full(shape[-2:], float("-inf"), dtype=dtype, device=device)
        for (qa, qb), (ka, kb) in zip(zip(self.q_seqstart, self.q_seqstart[1:]), zip(self.k_seqstart, self.k_seqstart[1:])):
            mask[qa:qb, ka:kb] = 0
        return mask


def xformers_ops(recorder: Recorder) -> types.ModuleType:
    module = types.ModuleType("xformers.ops")
    module.LowerTriangularMask = LowerTriangularMask
    module.fmha = types.ModuleType("xformers.ops.fmha")
    module.fmha.BlockDiagonalMask = BlockDiagonalMask

    def memory_efficient_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_bias=None,
        p: float = 0.0,
        scale=None,
        *,
        op=None,
        output_dtype=None,
    ) -> torch.Tensor:
        recorder.append(("memory_efficient_attention", dict(query=query, key=key, value=value, attn_bias=attn_bias,
                                                             p=p, scale=scale)))
        nd = query.dim()
        assert key.dim() == nd and value.dim() == nd, "query, key and value must have the same ndim"
        assert query.dtype in (torch.float32, *HALF) and key.dtype == query.dtype and value.dtype == query.dtype
        for t in (query, key, value):
            assert t.stride(-1) == 1, "we only require the last dimension's stride to be 1"
        if nd == 4:
            b, mq, h, k_ = query.shape
            mk = key.shape[1]
            if tuple(key.shape) != (b, mk, h, k_) or tuple(value.shape[:3]) != (b, mk, h):
                raise ValueError(
                    "Incompatible shapes for attention inputs: HINT: We don't support broadcasting, please use `expand` yourself"
                )
            q5, k5, v5 = (t.unsqueeze(2) for t in (query, key, value))
        else:
            assert nd == 5, "BMGHK"
            b, mq, g, h, k_ = query.shape
            mk = key.shape[1]
            assert tuple(key.shape) == (b, mk, g, h, k_) and tuple(value.shape[:4]) == (b, mk, g, h)
            q5, k5, v5 = query, key, value
        bias_shape = (b, h, mq, mk) if nd == 4 else (b, g, h, mq, mk)
        bias = None
        causal_offset = None
        if isinstance(attn_bias, torch.Tensor):
            if tuple(attn_bias.shape) != bias_shape:
                raise ValueError(f"Invalid shape for attention bias: {tuple(attn_bias.shape)} (expected {bias_shape})")
            if attn_bias.dtype != query.dtype:
                raise ValueError("invalid dtype for bias - should match query's dtype")
            alignment = 128 // torch.finfo(attn_bias.dtype).bits
            bad = [d for d in range(attn_bias.ndim - 1) if attn_bias.stride(d) % alignment != 0]
            if bad or attn_bias.stride(-1) > 1:
                raise NotImplementedError(
                    f"No operator found for `memory_efficient_attention_forward`: attn_bias.stride(-2) % {alignment} != 0 "
                    f"(attn_bias.stride() = {attn_bias.stride()})"
                )
            bias = attn_bias if nd == 5 else attn_bias.unsqueeze(1)
        elif isinstance(attn_bias, LowerTriangularMask):
            causal_offset = 0
        elif isinstance(attn_bias, BlockDiagonalMask):
            assert b == 1 and nd == 4, "a BlockDiagonalMask takes one batch of packed sequences"
            assert attn_bias.q_seqstart[-1] == mq and attn_bias.k_seqstart[-1] == mk
            assert torch.device(attn_bias.device) == query.device
            bias = attn_bias.materialize((mq, mk), dtype=torch.float32)[None, None, None].expand(b, 1, h, mq, mk)
        else:
            assert attn_bias is None, f"unexpected attn_bias {attn_bias!r}"
        s = query.shape[-1] ** -0.5 if scale is None else scale
        # [B, M, G, H, K] -> one attention per (G, H)
        qf, kf, vf = (t.flatten(2, 3) for t in (q5, k5, v5))
        bf = None if bias is None else bias.flatten(1, 2)
        out = _attend(qf, kf, vf, s, causal_offset=causal_offset, bias=bf, dropout_p=p)
        out = out.to(query.dtype)
        return out.unflatten(2, q5.shape[2:4]) if nd == 5 else out

    module.memory_efficient_attention = memory_efficient_attention
    return module


def xformers_top(version: str = "0.0.35", has_cpp: bool = True) -> types.ModuleType:
    module = types.ModuleType("xformers")
    module.__version__ = version
    module._has_cpp_library = has_cpp
    return module


def sageattention(recorder: Recorder, version: str = "2.2.0") -> types.ModuleType:
    module = types.ModuleType("sageattention")
    module.__version__ = version  # the real package has none: attnswap reads it, or the metadata

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        recorder.append(("sageattn", dict(q=q, k=k, v=v, tensor_layout=tensor_layout, is_causal=is_causal,
                                           sm_scale=sm_scale)))
        assert q.dtype in HALF and k.dtype == q.dtype and v.dtype == q.dtype
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "Last dim of qkv must be contiguous."
        assert tensor_layout == "HND", "the adapter passes SDPA's layout"
        d = q.shape[-1]
        if d > 128:
            raise ValueError(f"Unsupported head_dim: {d}")
        h, hk = q.shape[1], k.shape[1]
        assert h % hk == 0, f"num_qo_heads ({h}) must be divisible by num_kv_heads ({hk})"
        assert k.shape == v.shape
        scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
        out = _attend(qb, _heads_to_q(kb, h), _heads_to_q(vb, h), scale, causal_offset=0 if is_causal else None)
        out = out.transpose(1, 2).to(q.dtype)
        return (out, None) if return_lse else out

    module.sageattn = sageattn
    return module
