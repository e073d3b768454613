"""Issue 16: pinned SDPA kernels call the kernel's own operator, with exactly what SDPA does
around it, and touch no process-global switch.

On CPU the result (and every gradient) is bitwise what ``F.scaled_dot_product_attention``
gives under ``sdpa_kernel([that kernel])``. The CUDA recipes (head-dim padding for flash, bias
alignment for efficient, the boolean mask value for cuDNN) are checked here against fakes of
the operators with their exact schemas; ``benchmarks/gpu_check.py`` compares them bitwise with
``sdpa_kernel`` on a GPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnswap
from attnswap.backends import eager_attention, get_backend
from attnswap.backends import sdpa as sdpa_module
from attnswap.call import facts_of
from attnswap.routing import Policy, Router

pytestmark = pytest.mark.skipif(not sdpa_module.DIRECT_OPS, reason=f"no direct recipe for torch {torch.__version__}")

PIN = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}


def _t(*shape, dtype, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


def _cases(dtype):
    """(name, (q, k, v), kwargs): the calls timm and friends make, and the awkward ones."""
    def qkv(hq=4, hk=4, lq=9, lk=11, e=16, ev=None, lead=(2,), seed=0):
        return (
            _t(*lead, hq, lq, e, dtype=dtype, seed=seed),
            _t(*lead, hk, lk, e, dtype=dtype, seed=seed + 1),
            _t(*lead, hk, lk, ev or e, dtype=dtype, seed=seed + 2),
        )

    rows = torch.ones(9, 11, dtype=torch.bool)
    rows[3] = False
    yield "plain", qkv(), {}
    yield "scale", qkv(), dict(scale=0.37)
    yield "bias (H, L, S) broadcast", qkv(), dict(attn_mask=_t(1, 4, 9, 11, dtype=dtype, seed=9))
    yield "bias (L, S)", qkv(), dict(attn_mask=_t(9, 11, dtype=dtype, seed=9))
    yield "bias (B, 1, 1, S)", qkv(), dict(attn_mask=_t(2, 1, 1, 11, dtype=dtype, seed=9))
    yield "float32 bias", qkv(), dict(attn_mask=_t(2, 4, 9, 11, dtype=torch.float32, seed=9))
    yield "bool mask with a fully masked row", qkv(), dict(attn_mask=rows)
    yield "bool (B, 1, L, S)", qkv(), dict(attn_mask=_t(2, 1, 9, 11, dtype=torch.float32, seed=8) > 0)
    yield "causal q_len < kv_len", qkv(lq=5, lk=11), dict(is_causal=True)
    yield "causal q_len > kv_len", qkv(lq=11, lk=5), dict(is_causal=True)
    yield "gqa", qkv(hq=6, hk=2), dict(enable_gqa=True)
    yield "mqa broadcast", qkv(hq=4, hk=1), {}
    yield "3-D", qkv(lead=()), dict(attn_mask=_t(9, 11, dtype=dtype, seed=9))
    yield "fused qkv views", tuple(_t(2, 9, 3, 4, 16, dtype=dtype, seed=5).permute(2, 0, 3, 1, 4).unbind(0)), {}


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def pinned_sdpa(backend, q, k, v, **kwargs):
    """SDPA under ``sdpa_kernel([backend])``. An older torch's selector refuses some calls the
    kernel computes (3-D inputs and one key/value head without ``enable_gqa`` before 2.14): there
    the same call in the form that torch accepts (4-D, ``enable_gqa``), which is the same math."""
    with sdpa_kernel([PIN[backend]]):
        try:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        except RuntimeError as exc:
            if "No available kernel" not in str(exc):
                raise
        if q.dim() == 3:
            mask = kwargs.get("attn_mask")
            four = dict(kwargs, attn_mask=None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + mask.shape))
            return F.scaled_dot_product_attention(q[None], k[None], v[None], **four)[0]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math"])
def test_pinned_cpu_kernels_are_bitwise_sdpa_under_sdpa_kernel(backend, dtype):
    for name, (q, k, v), kwargs in _cases(dtype):
        expected = pinned_sdpa(backend, q, k, v, **kwargs)
        router = Router(Policy(backend, (), strict=True))
        out = router.route(q, k, v, **kwargs)
        assert [t.backend for t in router.tallies()] == [backend], name
        assert torch.equal(out, expected), f"{backend} {name}: max diff {(out - expected).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_math"])
def test_pinned_cpu_kernels_gradients_are_bitwise_sdpa_under_sdpa_kernel(backend, dtype):
    for name, (q, k, v), kwargs in _cases(dtype):
        g = _t(*F.scaled_dot_product_attention(q, k, v, **kwargs).shape, dtype=dtype, seed=99)
        grads = []
        for pinned in (True, False):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            if pinned:
                out = pinned_sdpa(backend, *leaves, **kwargs)
            else:
                out = Router(Policy(backend, (), strict=True)).route(*leaves, **kwargs)
            out.backward(g)
            grads.append([t.grad for t in leaves])
        for which, a, b in zip("qkv", *grads):
            assert torch.equal(a, b), f"{backend} {name}: d{which} differs by {(a - b).abs().max()}"


def test_math_mask_gradient_and_dropout_are_sdpa_math_exactly():
    q, k, v = (_t(2, 3, 7, 8, dtype=torch.float64, seed=s) for s in (1, 2, 3))
    results = []
    for pinned in (True, False):
        bias = _t(3, 7, 7, dtype=torch.float64, seed=4, grad=True)
        torch.manual_seed(0)
        if pinned:
            with sdpa_kernel([SDPBackend.MATH]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.3)
        else:
            out = Router(Policy("sdpa_math")).route(q, k, v, attn_mask=bias, dropout_p=0.3)
        out.sum().backward()
        results.append((out, bias.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_no_global_switch_is_touched(monkeypatch):
    import torch.nn.attention as attention

    def forbidden(*args, **kwargs):
        raise AssertionError("a pinned backend used sdpa_kernel (process-global)")

    monkeypatch.setattr(attention, "sdpa_kernel", forbidden)
    q = _t(2, 3, 8, 16, dtype=torch.float32, seed=0)
    for backend in ("sdpa_flash", "sdpa_math"):
        Router(Policy(backend, (), strict=True)).route(q, q, q, attn_mask=q[0, 0, :, :8] > 0)
        get_backend(backend)(q, q, q, is_causal=True)  # a direct call, not through a router


def test_empty_sequences_are_refused_not_handed_to_the_kernel():
    # the CPU flash operator dies with SIGFPE on an empty query or key sequence
    q = torch.zeros(1, 2, 0, 8)
    k = torch.zeros(1, 2, 5, 8)
    reasons = get_backend("sdpa_flash").reasons(facts_of(q, k, k))[0]
    assert any("empty" in r for r in reasons)
    reasons = get_backend("sdpa_flash").reasons(facts_of(k, q, q))[0]
    assert any("empty" in r for r in reasons)
    router = Router(Policy("sdpa_flash", ("sdpa",)))
    assert router.route(k, q, q).shape == (1, 2, 5, 8)


# -- CUDA recipes, against fakes with the operators' schemas ---------------------------------------

def _cuda_facts(q, k, v, mask=None, **kw):
    return dataclasses.replace(facts_of(q, k, v, mask, **kw), device_type="cuda", device_index=0)


def test_cuda_flash_pads_the_head_dim_to_8_with_the_unpadded_scale(monkeypatch):
    seen = {}

    def fake(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        # aten::_scaled_dot_product_flash_attention -> (output, logsumexp, cum_seq_q, cum_seq_k,
        # max_q, max_k, rng_state, unused, debug_attn_mask)
        seen.update(head_dim=query.size(-1), scale=scale, causal=is_causal, dropout=dropout_p)
        out = eager_attention(query, key, value, is_causal=is_causal, scale=scale)
        return (out, None, None, None, 0, 0, None, None, None)

    monkeypatch.setattr(torch, "_scaled_dot_product_flash_attention", fake)
    q, k, v = (_t(2, 3, 9, 60, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    run = sdpa_module._cuda_flash_kernel(_cuda_facts(q, k, v))
    out = run(q, k, v, None, 0.0, True)
    assert seen == dict(head_dim=64, scale=1 / math.sqrt(60), causal=True, dropout=0.0)
    assert out.shape == (2, 3, 9, 60)
    torch.testing.assert_close(out, eager_attention(q, k, v, is_causal=True))
    run(q, k, v, None, 0.0, False, scale=0.2)
    assert seen["scale"] == 0.2
    q8 = q[..., :56]
    sdpa_module._cuda_flash_kernel(_cuda_facts(q8, q8, q8))(q8, q8, q8)
    assert seen["head_dim"] == 56, "no padding when the head dim is a multiple of 8"


def test_cuda_efficient_aligns_and_expands_the_bias_and_asks_for_lse_only_for_backward(monkeypatch):
    seen = {}

    def fake(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
        # aten::_scaled_dot_product_efficient_attention -> (output, log_sumexp, philox_seed, philox_offset)
        seen.update(bias_shape=tuple(attn_bias.shape) if attn_bias is not None else None, lse=compute_log_sumexp,
                    row_stride=attn_bias.stride(-2) if attn_bias is not None else None,
                    bias_dtype=None if attn_bias is None else attn_bias.dtype)
        return (eager_attention(query, key, value, attn_mask=attn_bias, is_causal=is_causal, scale=scale), None, None, None)

    monkeypatch.setattr(torch, "_scaled_dot_product_efficient_attention", fake)
    q, k, v = (_t(2, 3, 9, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    bias = _t(3, 9, 9, dtype=torch.float32, seed=4)
    run = sdpa_module._cuda_efficient_kernel(_cuda_facts(q, k, v, bias))
    out = run(q, k, v, bias)
    assert seen["bias_shape"] == (2, 3, 9, 9) and seen["row_stride"] % 8 == 0 and seen["lse"] is False
    torch.testing.assert_close(out, eager_attention(q, k, v, attn_mask=bias))
    mask = bias > 0
    run = sdpa_module._cuda_efficient_kernel(_cuda_facts(q, k, v, mask))
    out = run(q.requires_grad_(), k, v, mask)
    assert seen["lse"] is True and seen["bias_dtype"] == torch.float32
    torch.testing.assert_close(out, eager_attention(q, k, v, attn_mask=mask))
    monkeypatch.setattr(sdpa_module, "cuda_capability", lambda index: (9, 0))
    gqa = _cuda_facts(q, k[:, :1], v[:, :1], enable_gqa=True)
    assert any("equal counts" in r for r in get_backend("sdpa_efficient").extra_reasons(gqa))


def test_cuda_cudnn_gets_the_boolean_mask_value_of_this_torch(monkeypatch):
    seen = {}

    def fake(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
             return_debug_mask=False, *, scale=None):
        seen.update(bias=attn_bias)
        return (eager_attention(query, key, value, attn_mask=attn_bias, scale=scale),) + (None,) * 8

    monkeypatch.setattr(torch, "_scaled_dot_product_cudnn_attention", fake)
    q = _t(1, 2, 6, 16, dtype=torch.float32, seed=1)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    sdpa_module._cuda_cudnn_kernel(_cuda_facts(q, q, q, mask))(q, q, q, mask)
    masked = seen["bias"][~mask].unique().tolist()
    assert masked == [sdpa_module._CUDNN_MASKED] and seen["bias"][mask].eq(0).all()
    assert sdpa_module._CUDNN_MASKED == (float("-inf") if sdpa_module._TORCH >= sdpa_module.Version("2.14") else -65504.0)


def test_refusals_still_fall_back_with_reasons():
    q = _t(2, 3, 5, 8, dtype=torch.float32, seed=1)
    with pytest.raises(attnswap.UnsupportedCall, match="dropout"):
        Router(Policy("sdpa_flash", (), strict=True)).route(q, q, q, dropout_p=0.1)
