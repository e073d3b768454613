"""flash (flash-attn 2), flash3 and flash4 on CPU, against fakes with each library's exact
signature and semantics: argument mapping, layout (views, no copies), scale, causal corner,
dropout, GQA, return values, and every declared limit on synthetic CUDA facts."""

import pytest
import torch

import attnswap
from attnswap.routing import Policy, Router
from fakes import flash_attn_2, flash_attn_3, flash_attn_4
from kernel_fixtures import (  # noqa: F401 (fixtures)
    as_if_on_cuda,
    assert_matches,
    cuda_facts,
    flash_fakes,
    gpu,
    install,
    reasons,
    recorder,
    sdpa_reference,
)

FLASH = ["flash", "flash3", "flash4"]


def half(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", FLASH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_matches_sdpa_through_transposed_views(flash_fakes, recorder, name, dtype):
    q, k, v = half(2, 4, 9, 16, dtype=dtype, seed=1), half(2, 4, 11, 16, dtype=dtype, seed=2), half(2, 4, 11, 16, dtype=dtype, seed=3)
    out = flash_fakes[name](q, k, v)
    assert out.shape == (2, 4, 9, 16)
    assert_matches(out, sdpa_reference(q, k, v), dtype)
    (_, args), = recorder
    for given, passed in ((q, args["q"]), (k, args["k"]), (v, args["v"])):
        assert passed.shape == (given.shape[0], given.shape[2], given.shape[1], given.shape[3]), "[B, L, H, E]"
        assert passed.data_ptr() == given.data_ptr() and passed.stride(-1) == 1, "a view, not a copy"


@pytest.mark.parametrize("name", FLASH)
def test_scale_and_causal_map_to_softmax_scale_and_causal(flash_fakes, recorder, name):
    q, k, v = half(1, 2, 8, 16, seed=1), half(1, 2, 8, 16, seed=2), half(1, 2, 8, 16, seed=3)
    assert_matches(flash_fakes[name](q, k, v, scale=0.3), sdpa_reference(q, k, v, scale=0.3), torch.float16)
    assert_matches(flash_fakes[name](q, k, v, is_causal=True), sdpa_reference(q, k, v, is_causal=True), torch.float16)
    assert [(a["softmax_scale"], a["causal"]) for _, a in recorder] == [(0.3, False), (None, True)]


def test_flash_attn_causal_corner_differs_so_unequal_lengths_are_refused(flash_fakes, gpu):
    # flash-attn aligns causal bottom-right; SDPA's is_causal is top-left. The kernel would
    # compute something else, so the backend must refuse those calls instead.
    q, k = half(1, 2, 4, 16, seed=1), half(1, 2, 7, 16, seed=2)
    out = flash_fakes["flash"](q, k, k, is_causal=True)
    assert not torch.allclose(out.double(), sdpa_reference(q, k, k, is_causal=True), atol=1e-2)
    gpu((9, 0))
    for name in FLASH:
        facts = cuda_facts(q=(1, 2, 4, 16), k=(1, 2, 7, 16), is_causal=True)
        assert "is_causal with q_len 4 != kv_len 7 (top-left causal not supported)" in reasons(name, facts)


@pytest.mark.parametrize("name", FLASH)
@pytest.mark.parametrize("kv_heads, gqa", [(1, False), (2, True)])
def test_grouped_and_broadcast_kv_heads_match_sdpa(flash_fakes, name, kv_heads, gqa):
    q, k, v = half(2, 4, 6, 16, seed=1), half(2, kv_heads, 6, 16, seed=2), half(2, kv_heads, 6, 16, seed=3)
    out = flash_fakes[name](q, k, v, enable_gqa=gqa)
    assert_matches(out, sdpa_reference(q, k, v, enable_gqa=gqa), torch.float16)


def test_flash2_passes_dropout_and_deterministic(flash_fakes, recorder):
    q = half(1, 2, 5, 16)
    torch.manual_seed(0)
    flash_fakes["flash"](q, q, q, dropout_p=0.25)
    prior = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        flash_fakes["flash"](q, q, q)
    finally:
        torch.use_deterministic_algorithms(prior)
    assert [(a["dropout_p"], a["deterministic"]) for _, a in recorder] == [(0.25, False), (0.0, True)]


@pytest.mark.parametrize("returns_lse", [False, True])
def test_flash3_takes_both_return_conventions(install, recorder, returns_lse):
    backend = install("flash3", {"flash_attn_interface": flash_attn_3(recorder, returns_lse=returns_lse)})
    q = half(1, 2, 5, 16)
    assert_matches(backend(q, q, q), sdpa_reference(q, q, q), torch.float16)


def test_flash4_version_comes_from_the_distribution_not_the_module(install, recorder, monkeypatch):
    import importlib.metadata

    flash_pkg = flash_attn_2(recorder)
    flash_pkg.cute = flash_attn_4(recorder)  # its __version__ says 0.0.0, as upstream's does
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "3.9" if dist == "flash-attn-4" else "0")
    backend = install("flash4", {"flash_attn": flash_pkg, "flash_attn.cute": flash_pkg.cute})
    assert backend.package.reason() == "flash-attn-4 3.9 is installed; attnswap supports >=4.0.0b1,<5"


# -- limits, on synthetic CUDA facts ------------------------------------------------------------

@pytest.mark.parametrize("name", FLASH)
def test_common_refusals(gpu, name):
    gpu((9, 0))
    assert reasons(name, cuda_facts()) == []
    assert "dtype float32 (supported: bfloat16, float16)" in reasons(name, cuda_facts(dtype=torch.float32))
    assert "additive attn_mask (bias) not supported" in reasons(
        name, cuda_facts(mask_kind="additive", mask_shape=(4, 197, 197), mask_dtype=torch.float16)
    )
    assert "boolean attn_mask not supported" in reasons(
        name, cuda_facts(mask_kind="bool", mask_shape=(197, 197), mask_dtype=torch.bool)
    )
    assert "query and key/value batch dims differ (broadcasting)" in reasons(name, cuda_facts(k=(1, 4, 197, 64)))
    assert any("not divisible" in r for r in reasons(name, cuda_facts(k=(2, 3, 197, 64), enable_gqa=True)))
    assert any("device cpu" in r for r in get_reasons_cpu(name))
    gpu((7, 5))
    assert "requires a GPU with compute capability >= 8.0, this one has 7.5" in reasons(name, cuda_facts())


def get_reasons_cpu(name):
    from attnswap.backends import get_backend
    from attnswap.call import CallFacts

    facts = CallFacts("cpu", None, torch.float16, (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), True)
    return get_backend(name).reasons(facts)[0]


def test_flash2_limits(gpu):
    gpu((12, 0))
    assert reasons("flash", cuda_facts(q=(2, 4, 197, 72), dropout_p=0.1, needs_grad=True)) == []  # pads 72 itself
    assert "head_dim 320 > 256" in reasons("flash", cuda_facts(q=(2, 4, 197, 320)))
    assert "value head_dim 32 differs from query/key head_dim 64" in reasons(
        "flash", cuda_facts(q=(2, 4, 197, 64), v=(2, 4, 197, 32))
    )


def test_flash3_limits(gpu):
    gpu((9, 0))
    assert "dropout_p=0.1 (no dropout support)" in reasons("flash3", cuda_facts(dropout_p=0.1))
    assert "head_dim 72 is not a multiple of 8" not in reasons("flash3", cuda_facts(q=(2, 4, 197, 72)))
    assert "head_dim 36 is not a multiple of 8" in reasons("flash3", cuda_facts(q=(2, 4, 197, 36)))
    # LeViT-like qk 16 / v 64 is one of FA3's Hopper-only pairs; (128, 64) is not
    assert reasons("flash3", cuda_facts(q=(2, 4, 197, 16), v=(2, 4, 197, 64))) == []
    assert any("FA3 takes that only on Hopper" in r for r in reasons("flash3", cuda_facts(q=(2, 4, 197, 128), v=(2, 4, 197, 64))))
    gpu((8, 0))
    assert any("only on Hopper" in r for r in reasons("flash3", cuda_facts(q=(2, 4, 197, 16), v=(2, 4, 197, 64))))
    gpu((10, 0))
    assert "requires a GPU with compute capability <= 9.0, this one has 10.0" in reasons("flash3", cuda_facts())


def test_flash4_limits(gpu):
    gpu((9, 0))
    assert reasons("flash4", cuda_facts(q=(2, 4, 197, 256), needs_grad=True)) == []
    assert "inside torch.compile (the kernel cannot be traced)" in reasons("flash4", cuda_facts(in_graph=True))
    gpu((10, 0))
    assert reasons("flash4", cuda_facts(q=(2, 4, 197, 192), v=(2, 4, 197, 128))) == []
    assert any("head dims (160, 160) on sm10x" in r for r in reasons("flash4", cuda_facts(q=(2, 4, 197, 160))))
    gpu((8, 0))
    assert reasons("flash4", cuda_facts()) == []
    assert "backward on sm8x (FA4's backward needs sm90+)" in reasons("flash4", cuda_facts(needs_grad=True))


def test_float32_call_is_taken_down_cast_when_asked(gpu, flash_fakes):
    gpu((9, 0))
    for backend in ("flash", "flash3", "flash4"):
        flash_fakes[backend].__dict__["unavailable_reason"] = None  # as if CUDA were there
        plain = Router(Policy(backend, ("sdpa",))).decide(cuda_facts(dtype=torch.float32))
        cast = Router(Policy(backend, ("sdpa",), cast=torch.bfloat16)).decide(cuda_facts(dtype=torch.float32))
        assert plain.backend.name == "sdpa" and cast.backend.name == backend and cast.cast == torch.bfloat16


# -- a whole timm model through the adapter and its fake ------------------------------------------

@pytest.mark.parametrize("name", FLASH)
def test_timm_vit_routed_through_fake_kernel(flash_fakes, as_if_on_cuda, recorder, name):
    import timm

    as_if_on_cuda(flash_fakes[name])
    model = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, depth=2).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16)
    with torch.no_grad():
        ref = model.forward_features(x)
        attnswap.patch(model, backend=name, strict=True)
        out = model.forward_features(x)
    assert attnswap.stats(model).total_calls == 2 and attnswap.stats(model).fallback_calls == 0
    assert len(recorder) == 2
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 3e-2


def test_fp32_timm_vit_with_cast_runs_the_kernel_in_bf16(flash_fakes, as_if_on_cuda, recorder):
    import timm

    as_if_on_cuda(flash_fakes["flash"])
    model = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        attnswap.patch(model, backend="flash", cast="bf16")
        out = model.forward_features(x)
    assert out.dtype == torch.float32 and all(a["q"].dtype == torch.bfloat16 for _, a in recorder)
    assert attnswap.stats(model)[0].calls == {"flash (bfloat16)": 1}
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 3e-2
