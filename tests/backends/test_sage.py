"""sage on CPU against a fake sageattn (HND layout, top-left causal, no mask, forward only)."""

import pytest
import torch

import attnswap
from attnswap.routing import Policy, Router
from fakes import sageattention
from kernel_fixtures import (  # noqa: F401 (fixtures)
    assert_matches,
    cuda_facts,
    gpu,
    install,
    reasons,
    recorder,
    sdpa_reference,
)


@pytest.fixture
def sage(install, recorder):
    return install("sage", {"sageattention": sageattention(recorder)})


def half(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


def test_sdpa_layout_passes_through_untouched(sage, recorder):
    q, k, v = half(2, 4, 9, 64, seed=1), half(2, 2, 9, 64, seed=2), half(2, 2, 9, 64, seed=3)
    out = sage(q, k, v, is_causal=True, scale=0.1, enable_gqa=True)
    assert_matches(out, sdpa_reference(q, k, v, is_causal=True, scale=0.1, enable_gqa=True), torch.float16)
    (_, args), = recorder
    assert args["q"] is q and args["tensor_layout"] == "HND" and args["sm_scale"] == 0.1 and args["is_causal"]


def test_non_contiguous_head_dim_is_made_contiguous(sage, recorder):
    q = half(1, 2, 64, 9).transpose(-2, -1)  # XCiT-style: head dim stride != 1
    out = sage(q, q, q)
    assert_matches(out, sdpa_reference(q, q, q), torch.float16)
    assert recorder[0][1]["q"].stride(-1) == 1


def test_limits(gpu):
    gpu((9, 0))
    assert reasons("sage", cuda_facts()) == []
    assert "needs backward (this backend is forward-only here)" in reasons("sage", cuda_facts(needs_grad=True))
    assert "head_dim 256 > 128" in reasons("sage", cuda_facts(q=(2, 4, 197, 256)))
    assert "additive attn_mask (bias) not supported" in reasons(
        "sage", cuda_facts(mask_kind="additive", mask_shape=(197, 197), mask_dtype=torch.float16)
    )
    assert "dropout_p=0.1 (no dropout support)" in reasons("sage", cuda_facts(dropout_p=0.1))
    gpu((10, 0))
    assert any("this GPU is sm100" in r for r in reasons("sage", cuda_facts()))


def test_approximate_sage_is_never_a_fallback(sage, gpu):
    gpu((9, 0))
    sage.__dict__["unavailable_reason"] = None
    router = Router(Policy("sdpa_flash", ("sage", "sdpa")))
    decision = router.decide(cuda_facts(mask_kind="additive", mask_shape=(197, 197), mask_dtype=torch.float16))
    assert decision.backend.name == "sdpa"
    assert dict(decision.tried)["sage"] == ("approximate backends are never used as a fallback",)
    assert not attnswap.get_backend("sage").exact
