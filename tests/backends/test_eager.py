"""eager is the reference: it must equal PyTorch's own math kernel on every documented case."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnswap.backends import eager_attention
from conftest import rand


def math_sdpa(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


CASES = {
    "plain": dict(q=(2, 3, 5, 8), kv=(2, 3, 5, 8)),
    "q_len != kv_len": dict(q=(2, 3, 4, 8), kv=(2, 3, 9, 8)),
    "v head dim differs": dict(q=(2, 3, 5, 8), kv=(2, 3, 6, 8), v_dim=16),
    "3-D": dict(q=(6, 5, 8), kv=(6, 7, 8)),
    "5-D": dict(q=(2, 2, 3, 5, 8), kv=(2, 2, 3, 5, 8)),
    "bool mask 2-D": dict(q=(2, 3, 5, 8), kv=(2, 3, 6, 8), mask=("bool", (5, 6))),
    "bool mask padding (B,1,1,S)": dict(q=(2, 3, 5, 8), kv=(2, 3, 6, 8), mask=("bool", (2, 1, 1, 6))),
    "additive bias (H,L,S)": dict(q=(2, 3, 5, 8), kv=(2, 3, 6, 8), mask=("float", (3, 5, 6))),
    "additive bias full": dict(q=(2, 3, 5, 8), kv=(2, 3, 6, 8), mask=("float", (2, 3, 5, 6))),
    "causal square": dict(q=(2, 3, 5, 8), kv=(2, 3, 5, 8), causal=True),
    "causal q<kv (top-left)": dict(q=(2, 3, 3, 8), kv=(2, 3, 7, 8), causal=True),
    "causal q>kv (top-left)": dict(q=(2, 3, 7, 8), kv=(2, 3, 3, 8), causal=True),
    "scale": dict(q=(2, 3, 5, 8), kv=(2, 3, 5, 8), scale=0.37),
    "gqa": dict(q=(2, 6, 5, 8), kv=(2, 2, 5, 8), gqa=True),
    "mqa broadcast without enable_gqa": dict(q=(2, 6, 5, 8), kv=(2, 1, 5, 8)),
    "batch broadcast": dict(q=(2, 3, 5, 8), kv=(1, 3, 5, 8)),
}


def make(case, requires_grad=False):
    q = rand(*case["q"], seed=1, requires_grad=requires_grad)
    k = rand(*case["kv"], seed=2, requires_grad=requires_grad)
    v_shape = case["kv"][:-1] + (case.get("v_dim", case["kv"][-1]),)
    v = rand(*v_shape, seed=3, requires_grad=requires_grad)
    mask = None
    if "mask" in case:
        kind, shape = case["mask"]
        if kind == "bool":
            mask = rand(*shape, seed=4) > -0.5
        else:
            mask = rand(*shape, seed=4, requires_grad=requires_grad)
    kwargs = dict(attn_mask=mask, is_causal=case.get("causal", False), scale=case.get("scale"))
    if case.get("gqa"):
        kwargs["enable_gqa"] = True
    return (q, k, v), kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_eager_equals_sdpa_math_forward_and_backward(name):
    (q, k, v), kwargs = make(CASES[name], requires_grad=True)
    out = eager_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), [t for t in (q, k, v, kwargs["attn_mask"]) if t is not None and t.requires_grad])
    (q2, k2, v2), kwargs2 = make(CASES[name], requires_grad=True)
    ref = math_sdpa(q2, k2, v2, **kwargs2)
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in (q2, k2, v2, kwargs2["attn_mask"]) if t is not None and t.requires_grad])
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros_like_sdpa(kind):
    q, k, v = rand(1, 2, 4, 8, requires_grad=True), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    if kind == "bool":
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[1] = False
    else:
        mask = torch.zeros(4, 6, dtype=torch.float64)
        mask[1] = float("-inf")
    out = eager_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, math_sdpa(q, k, v, attn_mask=mask))
    assert torch.all(out[:, :, 1] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all(), "a fully masked row must not put NaN into the gradient"


def test_dropout_drops_the_expected_fraction_and_rescales():
    torch.manual_seed(0)
    n = 64
    q, k = rand(1, 1, n, 8), rand(1, 1, n, 8)
    v = torch.eye(n, dtype=torch.float64).expand(1, 1, n, n)  # output = attention probabilities
    probs = eager_attention(q, k, v)
    dropped = eager_attention(q, k, v, dropout_p=0.25)
    kept = dropped != 0
    assert 0.2 < 1 - kept.double().mean().item() < 0.3
    torch.testing.assert_close(dropped[kept], probs[kept] / 0.75)
    assert torch.all(eager_attention(q, k, v, dropout_p=1.0) == 0)


def test_mask_with_causal_is_rejected_like_sdpa():
    q = rand(1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="should not be set when is_causal=True"):
        eager_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype):
    q = rand(1, 2, 5, 8, dtype=dtype)
    bias = rand(2, 5, 5, dtype=torch.float32)
    out = eager_attention(q, q, q, attn_mask=bias)
    assert out.dtype == dtype
    ref = math_sdpa(q.double(), q.double(), q.double(), attn_mask=bias.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
