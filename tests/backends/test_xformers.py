"""xformers on CPU against a fake memory_efficient_attention that checks xformers' rules (BMHK,
exact bias shape and dtype, 16-byte bias strides, no 4-D head broadcasting): bias padding and
slicing, boolean masks, top-left causal, GQA through BMGHK, gradients to the bias."""

import pytest
import torch

import attnswap
from attnswap.backends.xformers import aligned_bias
from fakes import xformers_ops, xformers_top
from kernel_fixtures import (  # noqa: F401 (fixtures)
    as_if_on_cuda,
    assert_matches,
    cuda_facts,
    gpu,
    install,
    reasons,
    recorder,
    sdpa_reference,
)


def t(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def xformers(install, recorder):
    return install("xformers", {"xformers": xformers_top(), "xformers.ops": xformers_ops(recorder)})


def qkv(b=2, h=4, lq=197, lk=197, e=16, hk=None, dtype=torch.float16):
    hk = h if hk is None else hk
    return t(b, h, lq, e, dtype=dtype, seed=1), t(b, hk, lk, e, dtype=dtype, seed=2), t(b, hk, lk, e, dtype=dtype, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_plain_call_matches_sdpa_through_views(xformers, recorder, dtype):
    q, k, v = qkv(dtype=dtype)
    out = xformers(q, k, v, scale=0.2)
    assert_matches(out, sdpa_reference(q, k, v, scale=0.2), dtype)
    (_, args), = recorder
    assert args["query"].data_ptr() == q.data_ptr() and args["query"].shape == (2, 197, 4, 16)
    assert args["attn_bias"] is None and args["scale"] == 0.2 and args["p"] == 0.0


@pytest.mark.parametrize("shape", [(197, 197), (4, 197, 197), (2, 1, 197, 197), (2, 4, 1, 197)])
def test_bias_of_odd_length_is_padded_sliced_and_broadcast_without_materializing(xformers, recorder, shape):
    q, k, v = qkv()
    bias = t(*shape, dtype=torch.float32, seed=4)  # float32 bias, fp16 query: converted once
    out = xformers(q, k, v, attn_mask=bias)
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=bias), torch.float16)
    passed = recorder[0][1]["attn_bias"]
    assert passed.shape == (2, 4, 197, 197) and passed.dtype == torch.float16
    assert all(passed.stride(d) % 8 == 0 for d in range(3)) and passed.stride(-1) == 1
    # broadcast dims stay stride-0 views: the buffer holds only what the mask holds
    assert passed.untyped_storage().nbytes() <= torch.Size(shape).numel() * 2 * 200 / 197 + 64


def test_aligned_bias_is_the_mask_itself_when_it_already_fits():
    mask = torch.zeros(4, 197, 200, dtype=torch.float16)[..., :197]
    bias = aligned_bias(mask, (2, 4, 197, 197), torch.float16)
    assert bias.data_ptr() == mask.data_ptr() and bias.stride() == (0, *mask.stride())


def test_boolean_mask_becomes_minus_infinity(xformers, recorder):
    q, k, v = qkv(lq=9, lk=13)
    keep = torch.rand(9, 13, generator=torch.Generator().manual_seed(0)) > 0.4
    keep[:, 0] = True
    out = xformers(q, k, v, attn_mask=keep)
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=keep), torch.float16)
    passed = recorder[0][1]["attn_bias"]
    assert torch.isinf(passed[0, 0][~keep]).all() and (passed[0, 0][keep] == 0).all()


def test_causal_is_top_left_even_with_unequal_lengths(xformers, recorder, gpu):
    q, k, v = qkv(lq=5, lk=9)
    out = xformers(q, k, v, is_causal=True)
    assert_matches(out, sdpa_reference(q, k, v, is_causal=True), torch.float16)
    assert type(recorder[0][1]["attn_bias"]).__name__ == "LowerTriangularMask"
    gpu((9, 0))
    assert reasons("xformers", cuda_facts(q=(2, 4, 5, 16), k=(2, 4, 9, 16), is_causal=True)) == []


@pytest.mark.parametrize("hk, gqa", [(1, False), (2, True), (1, True)])
def test_grouped_heads_go_through_bmghk_with_expanded_views(xformers, recorder, hk, gqa):
    q, k, v = qkv(h=4, hk=hk, lq=7, lk=11)
    bias = t(4, 7, 11, seed=5)
    out = xformers(q, k, v, attn_mask=bias, enable_gqa=gqa)
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=bias, enable_gqa=gqa), torch.float16)
    args = recorder[0][1]
    assert args["query"].shape == (2, 7, hk, 4 // hk, 16) and args["key"].stride(3) == 0
    assert args["attn_bias"].shape == (2, hk, 4 // hk, 7, 11)


def test_bias_gradient_flows_through_the_materialized_copy(xformers, recorder):
    q, k, v = qkv(lq=6, lk=6, dtype=torch.float32)
    bias = t(4, 6, 6, dtype=torch.float32, seed=7).requires_grad_()
    xformers(q, k, v, attn_mask=bias).sum().backward()
    assert recorder[0][1]["attn_bias"].stride(0) != 0, "a bias with gradient is materialized at full size"
    ref_bias = bias.detach().clone().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref_bias).sum().backward()
    torch.testing.assert_close(bias.grad, ref_bias.grad, atol=1e-5, rtol=1e-5)


def test_xformers_errors_become_refusals_with_its_message(install, recorder):
    ops = xformers_ops(recorder)

    def refusing(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")

    ops.memory_efficient_attention = refusing
    backend = install("xformers", {"xformers": xformers_top(), "xformers.ops": ops})
    q, k, v = qkv()
    with pytest.raises(attnswap.errors.BackendRefused, match="xformers refused the call: No operator found"):
        backend(q, k, v)


def test_broken_compiled_extension_makes_it_unavailable(install, recorder, monkeypatch):
    import types

    cpp = types.ModuleType("xformers._cpp_lib")
    cpp._cpp_library_load_exception = OSError("xFormers was built for: PyTorch 2.10.0+cu128 (you have 2.11.0)")
    monkeypatch.setitem(__import__("sys").modules, "xformers._cpp_lib", cpp)
    backend = install("xformers", {"xformers": xformers_top(has_cpp=False), "xformers.ops": xformers_ops(recorder)})
    reason = backend.unavailable_reason
    assert "compiled extension did not load" in reason and "PyTorch 2.10.0" in reason


def test_limits(gpu):
    gpu((9, 0))
    bias = dict(mask_kind="additive", mask_shape=(4, 197, 197), mask_dtype=torch.float32)
    assert reasons("xformers", cuda_facts(dtype=torch.float32, mask_dtype=torch.float32, **{k: v for k, v in bias.items() if k != "mask_dtype"})) == []
    assert reasons("xformers", cuda_facts(dropout_p=0.1, needs_grad=True, **bias)) == []
    assert "head_dim 36 is not a multiple of 8 for float16" in reasons("xformers", cuda_facts(q=(2, 4, 197, 36)))
    assert reasons("xformers", cuda_facts(q=(2, 4, 197, 36), dtype=torch.float32)) == []
    assert any("forward only" in r for r in reasons("xformers", cuda_facts(k=(2, 1, 197, 64), needs_grad=True)))
    gpu((10, 0))
    assert reasons("xformers", cuda_facts()) == []
    assert any("built up to sm90" in r for r in reasons("xformers", cuda_facts(**bias)))
    gpu((7, 5))
    assert "bfloat16 needs compute capability >= 8.0" in reasons("xformers", cuda_facts(dtype=torch.bfloat16))


def test_swin_with_relative_bias_and_shift_mask_through_the_fake(xformers, as_if_on_cuda, recorder):
    import timm

    as_if_on_cuda(xformers)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8)
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.forward_features(x)
        attnswap.patch(model, backend="xformers", strict=True)
        out = model.forward_features(x)
    stats = attnswap.stats(model)
    assert stats.total_calls == 5 and stats.fallback_calls == 0 and len(recorder) == 5
    biases = [a["attn_bias"] for _, a in recorder]
    assert all(b.shape[-1] == 49 and b.stride(-2) % 4 == 0 for b in biases), "N=49 padded for alignment"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
