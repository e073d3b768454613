"""Property-based: on any drawn call, every CPU backend either matches float64 eager or refuses
with reasons. Never a wrong answer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnswap
from attnswap.backends import eager_attention
from attnswap.routing import Policy, Router


@st.composite
def calls(draw, max_len=12):
    ndim = draw(st.sampled_from([3, 4, 4, 5]))
    hq = draw(st.sampled_from([1, 2, 4]))
    gqa = ndim >= 4 and draw(st.booleans())
    hkv = draw(st.sampled_from([h for h in (1, 2, 4) if hq % h == 0])) if gqa else hq
    if ndim >= 4 and not gqa and draw(st.integers(0, 5)) == 0:
        hkv = 1  # MQA by broadcasting, without enable_gqa
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim - 3, max_size=ndim - 3)))
    lq, lk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    e = draw(st.sampled_from([1, 4, 8, 16]))
    ev = draw(st.sampled_from([e, e, 8]))
    kv_lead = lead
    if lead and draw(st.integers(0, 6)) == 0:
        kv_lead = (1,) + lead[1:]  # k/v broadcast over the first batch dim
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, lq, e, generator=g, dtype=torch.float64)
    k = torch.randn(*kv_lead, hkv, lk, e, generator=g, dtype=torch.float64)
    v = torch.randn(*kv_lead, hkv, lk, ev, generator=g, dtype=torch.float64)
    kwargs = {}
    kind = draw(st.sampled_from(["none", "bool", "additive", "causal"]))
    full = (*lead, hq, lq, lk)
    if kind in ("bool", "additive"):
        keep = draw(st.lists(st.booleans(), min_size=len(full) - 2, max_size=len(full) - 2))
        shape = [s if keep_dim else 1 for s, keep_dim in zip(full[:-2], keep)] + [lq if draw(st.booleans()) else 1, lk]
        drop = draw(st.integers(0, len(shape) - 2))
        shape = shape[drop:]
        if kind == "bool":
            mask = torch.rand(*shape, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        else:
            mask = torch.randn(*shape, generator=g, dtype=torch.float64)
            if draw(st.booleans()):
                mask = mask.masked_fill(torch.rand(*shape, generator=g) < 0.3, float("-inf"))
        kwargs["attn_mask"] = mask
    elif kind == "causal":
        kwargs["is_causal"] = True
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    if gqa:
        kwargs["enable_gqa"] = True
    return (q, k, v), kwargs


#: max error relative to the output's scale, per dtype the call runs in (float64 reference).
#: Half precision: a few units of its last place after the softmax and the sum over keys.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
#: ``eager`` in half precision computes its scores and softmax in that dtype, as timm's own
#: non-fused path does (SDPA's kernels accumulate in float32): a score's rounding error is
#: relative to the score, so large scores move the weights by a few percent in bfloat16
#: (``attnswap fuzz``: up to ~5%, BENCHMARKS.md). Its bound is that arithmetic's, not a kernel's.
EAGER_HALF_TOLERANCE = {torch.bfloat16: 1e-1, torch.float16: 1.5e-2}


def check(backend, call, dtype):
    (q, k, v), kwargs = call
    expected = eager_attention(q, k, v, **kwargs)
    args = [t.to(dtype) for t in (q, k, v)]
    if dtype != torch.float64 and isinstance(kwargs.get("attn_mask"), torch.Tensor) and kwargs["attn_mask"].is_floating_point():
        kwargs = dict(kwargs, attn_mask=kwargs["attn_mask"].to(dtype))
    router = Router(Policy(backend, (), strict=True), site="fuzz")
    try:
        with torch.no_grad():
            out = router(*args, **kwargs)
    except attnswap.UnsupportedCall as refusal:
        assert refusal.reasons[backend], "a refusal must say why"
        return
    assert out.shape == expected.shape and out.dtype == dtype
    scale = expected.abs().max().clamp_min(1.0)
    tol = EAGER_HALF_TOLERANCE.get(dtype, TOLERANCE[dtype]) if backend == "eager" else TOLERANCE[dtype]
    err = ((out.double() - expected).abs().max() / scale).item()
    assert err < tol, f"{backend} computed something different: relative error {err:.3g}"


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash", "eager"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_backend_matches_eager_or_refuses_float64(backend, call):
    check(backend, call, torch.float64)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash", "eager"])
@settings(max_examples=60, deadline=None)
@given(call=calls())
def test_backend_matches_eager_or_refuses_float32(backend, call):
    check(backend, call, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash", "eager"])
@settings(max_examples=25, deadline=None)
@given(call=calls())
def test_backend_matches_eager_or_refuses_half(backend, dtype, call):
    check(backend, call, dtype)


@st.composite
def calls_with_masked_rows(draw):
    """A call where some query rows see no key at all (bool False, or -inf everywhere)."""
    (q, k, v), kwargs = draw(calls())
    kwargs.pop("is_causal", None)
    lq, lk = q.shape[-2], k.shape[-2]
    rows = draw(st.lists(st.integers(0, lq - 1), min_size=1, max_size=lq, unique=True))
    mask = kwargs.get("attn_mask")
    shape = mask.shape[:-2] + (lq, lk) if mask is not None else (lq, lk)
    if mask is None or mask.dtype == torch.bool:
        mask = (mask if mask is not None else torch.ones(shape, dtype=torch.bool)).expand(shape).clone()
        mask[..., rows, :] = False
    else:
        mask = mask.expand(shape).clone()
        mask[..., rows, :] = float("-inf")
    kwargs["attn_mask"] = mask
    return (q, k, v), kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash", "eager"])
@settings(max_examples=25, deadline=None)
@given(call=calls_with_masked_rows())
def test_fully_masked_rows_are_zero_like_sdpa(backend, dtype, call):
    (q, k, v), kwargs = call
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.isfinite(sdpa).all()  # what SDPA does here is the contract: zeros, no NaN
    check(backend, call, dtype)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)  # each new shape compiles flex (~5 s here)
@given(call=calls(max_len=20))
def test_flex_matches_eager_or_refuses(call):
    check("flex", call, torch.float32)


@pytest.mark.slow
@settings(max_examples=3, deadline=None)  # each new shape compiles flex (~5 s here)
@given(call=calls_with_masked_rows())
def test_flex_fully_masked_rows_are_zero_like_sdpa(call):
    check("flex", call, torch.float32)
