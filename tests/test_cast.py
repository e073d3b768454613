"""patch(cast=...): half-precision-only kernels serve float32 calls down-cast, only when asked."""

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap.routing import Policy, Router
from conftest import rand

HALF_ONLY = attnswap.Limits(dtypes=frozenset({torch.float16, torch.bfloat16}))


@pytest.fixture
def half_only(registered):
    seen = []

    def kernel(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append((q.dtype, k.dtype, v.dtype, None if attn_mask is None else attn_mask.dtype))
        assert q.dtype in (torch.float16, torch.bfloat16), "the router must never pass float32 here"
        # compute in float32 like a real kernel's accumulator; return in the input dtype
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(),
            attn_mask=attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float(),
            is_causal=is_causal, scale=scale,
        )
        return out.to(q.dtype)

    registered("half_only", kernel, limits=HALF_ONLY)
    return seen


def test_float32_calls_fall_back_without_cast(half_only):
    router = Router(Policy("half_only", ("sdpa",)))
    q = rand(1, 2, 5, 8, dtype=torch.float32)
    router(q, q, q)
    (tally,) = router.tallies()
    assert tally.backend == "sdpa" and dict(tally.tried)["half_only"] == ("dtype float32 (supported: bfloat16, float16)",)
    assert not half_only


@pytest.mark.parametrize("cast, dtype, tol", [("bf16", torch.bfloat16, 2e-2), ("fp16", torch.float16, 3e-3)])
def test_cast_runs_the_kernel_down_cast_and_returns_float32(half_only, cast, dtype, tol):
    policy = Policy("half_only", ("sdpa",), cast=attnswap.api._cast_dtype(cast))
    router = Router(policy)
    q, k, v = (rand(2, 3, 7, 16, dtype=torch.float32, seed=s) for s in range(3))
    bias = rand(3, 7, 7, dtype=torch.float32, seed=3)
    out = router(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert half_only == [(dtype, dtype, dtype, dtype)], "q, k, v and the additive mask are cast"
    (tally,) = router.tallies()
    assert tally.cast == dtype and not tally.is_fallback and tally.label == f"half_only ({str(dtype)[6:]})"


def test_boolean_masks_are_not_cast(half_only):
    router = Router(Policy("half_only", cast=torch.bfloat16))
    q = rand(1, 2, 5, 8, dtype=torch.float32)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)
    router(q, q, q, attn_mask=mask)
    assert half_only == [(torch.bfloat16,) * 3 + (torch.bool,)]


def test_calls_the_backend_takes_as_they_are_are_never_cast(half_only):
    router = Router(Policy("half_only", cast=torch.bfloat16))
    q = rand(1, 2, 5, 8, dtype=torch.float16)
    out = router(q, q, q)
    assert out.dtype == torch.float16 and half_only == [(torch.float16,) * 3 + (None,)]
    (tally,) = router.tallies()
    assert tally.cast is None and tally.label == "half_only"


def test_float64_is_never_down_cast(half_only):
    # cast is for float32 models; a float64 call asks for more precision, not less
    router = Router(Policy("half_only", ("sdpa",), cast=torch.bfloat16))
    q = rand(1, 2, 5, 8)
    router(q, q, q)
    (tally,) = router.tallies()
    assert tally.backend == "sdpa" and not half_only


def test_other_reasons_still_refuse_a_cast_call(registered):
    limits = attnswap.Limits(dtypes=frozenset({torch.bfloat16}), additive_mask=False)
    registered("half_no_bias", lambda q, k, v, **kw: q, limits=limits)
    router = Router(Policy("half_no_bias", ("sdpa",), cast=torch.bfloat16))
    q = rand(1, 2, 5, 8, dtype=torch.float32)
    router(q, q, q, attn_mask=rand(5, 5, dtype=torch.float32))
    (tally,) = router.tallies()
    # the reasons shown are those of the uncast call: the dtype and the bias
    assert tally.backend == "sdpa" and len(dict(tally.tried)["half_no_bias"]) == 2


def test_gradients_flow_through_both_casts(half_only):
    router = Router(Policy("half_only", cast=torch.bfloat16))
    q = rand(1, 2, 5, 8, dtype=torch.float32).requires_grad_()
    router(q, q, q).sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


def test_patch_cast_option_end_to_end(half_only):
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        report = attnswap.patch(model, backend="half_only", cast="bf16")
        out = model.forward_features(x)
    assert "bfloat16" in str(report)
    site = attnswap.stats(model)[0]
    assert site.calls == {"half_only (bfloat16)": 1}
    assert (out - ref).abs().max() / ref.abs().max() < 3e-2


@pytest.mark.parametrize("bad", ["fp8", "float32", torch.float32, 16])
def test_invalid_cast_is_an_error_naming_the_choices(bad):
    model = torch.nn.MultiheadAttention(8, 2)
    with pytest.raises(attnswap.AttnSwapError, match="'bf16' or 'fp16'"):
        attnswap.patch(model, cast=bad)
    assert not attnswap.is_patched(model)


@pytest.mark.slow
def test_cast_decision_made_while_compiling_is_kept_in_the_graph(half_only):
    router = Router(Policy("half_only", cast=torch.bfloat16))
    q = rand(1, 2, 5, 8, dtype=torch.float32)
    compiled = torch.compile(lambda a: router(a, a, a), backend="eager", fullgraph=True)
    out = compiled(q)
    assert out.dtype == torch.float32
    (tally,) = router.tallies()
    assert tally.traced == 1 and tally.cast == torch.bfloat16
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), atol=2e-2, rtol=2e-2)
