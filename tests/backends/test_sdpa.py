"""sdpa and the pinned kernels: CPU numerics, and the declared limits that keep PyTorch's
bare "No available kernel" away from users (CUDA limits checked on synthetic call facts)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap.backends import get_backend
from attnswap.call import facts_of
from attnswap.routing import Policy, Router
from conftest import rand
from versions import PINNED_KERNEL_IN_GRAPH


def route(backend, *args, strict=True, **kwargs):
    router = Router(Policy(backend, ("sdpa",), strict), site="test")
    return router, router(*args, **kwargs)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_match_eager(backend, dtype):
    q, k, v = rand(2, 4, 9, 16, dtype=dtype, seed=1), rand(2, 4, 11, 16, dtype=dtype, seed=2), rand(2, 4, 11, 16, dtype=dtype, seed=3)
    bias = rand(4, 9, 11, dtype=dtype, seed=4)
    for kwargs in (dict(), dict(attn_mask=bias), dict(attn_mask=bias > 0), dict(is_causal=True), dict(scale=0.3)):
        _, out = route(backend, q, k, v, **kwargs)
        torch.testing.assert_close(out, get_backend("eager")(q, k, v, **kwargs))


def test_cpu_flash_reshapes_3d_and_5d_instead_of_refusing():
    for shape in [(6, 5, 8), (2, 2, 3, 5, 8)]:
        q = rand(*shape)
        router, out = route("sdpa_flash", q, q, q, attn_mask=rand(*shape[:-1], 5))
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=rand(*shape[:-1], 5)))
        assert [t.backend for t in router.tallies()] == ["sdpa_flash"]


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(dropout_p=0.1), "dropout_p=0.1"),
        (dict(v=(2, 3, 5, 16)), "value head_dim 16 differs"),
        (dict(mask_grad=True), "attn_mask requires grad"),
        (dict(k=(1, 3, 5, 8), v=(1, 3, 5, 8)), "batch dims differ"),
    ],
)
def test_cpu_flash_refuses_what_pytorch_refuses_with_reasons(kwargs, reason):
    q = rand(2, 3, 5, 8)
    k = rand(*kwargs.pop("k", (2, 3, 5, 8)))
    v = rand(*kwargs.pop("v", k.shape))
    if kwargs.pop("mask_grad", False):
        kwargs["attn_mask"] = rand(3, 5, 5, requires_grad=True)
    with pytest.raises(attnswap.UnsupportedCall) as info:
        route("sdpa_flash", q, k, v, **kwargs)
    assert any(reason in r for r in info.value.reasons["sdpa_flash"]), info.value.reasons
    # non-strict: the call falls back to sdpa, counted, with the same reason
    router, out = route("sdpa_flash", q, k, v, strict=False, **kwargs)
    (tally,) = router.tallies()
    assert tally.backend == "sdpa" and any(reason in r for r in dict(tally.tried)["sdpa_flash"])


def test_layout_refusal_at_run_time_becomes_a_counted_fallback():
    # A query whose last dim is not contiguous passes the declared limits (strides are not
    # facts), but every fused kernel refuses it: the router must fall back, not crash.
    base = rand(2, 3, 8, 5)
    q = base.transpose(-1, -2)
    k = rand(2, 3, 5, 8)
    router, out = route("sdpa_flash", q, k, k, strict=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k))
    (tally,) = router.tallies()
    assert tally.backend == "sdpa"
    assert "need the head dim contiguous" in dict(tally.tried)["sdpa_flash"][0]
    # the refusal is remembered for the signature: no second failed attempt
    router(q, k, k)
    assert tally.calls == 2


def test_pytorch_no_available_kernel_becomes_a_refusal_with_its_reasons():
    # Where a pin goes through sdpa_kernel (a torch or device without a direct recipe), a rule
    # attnswap does not model (here a head dim of 1 with a non-unit stride, which PyTorch's CPU
    # flash selection refuses) comes back as PyTorch's own explanation
    from attnswap.backends.sdpa import _pinned
    from attnswap.errors import BackendRefused

    q = rand(2, 3, 1, 5).transpose(-1, -2)  # head dim 1, stride 5
    with pytest.raises(BackendRefused, match="PyTorch refused the call: .*stride"):
        _pinned("FLASH_ATTENTION", q, q, q, None, 0.0, False, None, False)
    # the direct call runs the kernel itself, which reads such a view right
    router, out = route("sdpa_flash", q, q, q, strict=False)
    assert [t.backend for t in router.tallies()] == ["sdpa_flash"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("backend", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_only_kernels_refuse_cpu_calls_by_device(backend):
    q = rand(1, 2, 4, 8)
    with pytest.raises(attnswap.UnsupportedCall, match="device cpu"):
        route(backend, q, q, q)


# -- CUDA limits on synthetic facts (no GPU needed) ----------------------------------------------

def cuda_facts(**changes):
    f = facts_of(rand(2, 8, 197, 64, dtype=torch.float16), rand(2, 8, 197, 64, dtype=torch.float16),
                 rand(2, 8, 197, 64, dtype=torch.float16))
    return dataclasses.replace(f, device_type="cuda", device_index=0, **changes)


@pytest.fixture
def hopper(monkeypatch):
    import attnswap.backends.base as base
    import attnswap.backends.sdpa as sdpa

    monkeypatch.setattr(base, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(sdpa, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92400)


def reasons(backend, facts):
    return get_backend(backend).reasons(facts)[0]


def test_cuda_flash_limits(hopper):
    assert reasons("sdpa_flash", cuda_facts()) == []
    assert any("dtype float32" in r for r in reasons("sdpa_flash", cuda_facts(dtype=torch.float32)))
    assert any("additive attn_mask" in r for r in reasons("sdpa_flash", cuda_facts(mask_kind="additive", mask_shape=(8, 197, 197), mask_dtype=torch.float16)))
    assert any("boolean attn_mask" in r for r in reasons("sdpa_flash", cuda_facts(mask_kind="bool", mask_shape=(197, 197), mask_dtype=torch.bool)))
    assert any("top-left causal" in r for r in reasons("sdpa_flash", cuda_facts(is_causal=True, k_shape=(2, 8, 300, 64), v_shape=(2, 8, 300, 64))))
    assert any("head_dim 320 > 256" in r for r in reasons("sdpa_flash", cuda_facts(q_shape=(2, 8, 197, 320), k_shape=(2, 8, 197, 320), v_shape=(2, 8, 197, 320))))
    assert any("value head_dim" in r for r in reasons("sdpa_flash", cuda_facts(v_shape=(2, 8, 197, 128))))


def test_cuda_efficient_limits(hopper):
    bias = dict(mask_kind="additive", mask_shape=(8, 197, 197), mask_dtype=torch.float16, mask_requires_grad=True, needs_grad=True)
    assert reasons("sdpa_efficient", cuda_facts(**bias)) == [], "efficient takes a bias with gradient"
    assert reasons("sdpa_efficient", cuda_facts(dtype=torch.float32)) == []
    mism = reasons("sdpa_efficient", cuda_facts(mask_kind="additive", mask_shape=(197, 197), mask_dtype=torch.float32))
    assert any("differs from query dtype" in r for r in mism)
    odd = reasons("sdpa_efficient", cuda_facts(q_shape=(2, 8, 197, 60), k_shape=(2, 8, 197, 60), v_shape=(2, 8, 197, 60)))
    assert any("not a multiple of 8" in r for r in odd)


def test_cuda_cudnn_limits(hopper):
    assert reasons("sdpa_cudnn", cuda_facts()) == []
    grad_mask = reasons("sdpa_cudnn", cuda_facts(mask_kind="additive", mask_shape=(8, 197, 197), mask_dtype=torch.float16, mask_requires_grad=True, needs_grad=True))
    assert any("requires grad" in r for r in grad_mask)
    assert any("kv_len 1" in r for r in reasons("sdpa_cudnn", cuda_facts(k_shape=(2, 8, 1, 64), v_shape=(2, 8, 1, 64))))
    assert any("1/16" in r for r in reasons("sdpa_cudnn", cuda_facts(dropout_p=0.1)))
    assert reasons("sdpa_cudnn", cuda_facts(dropout_p=0.125)) == []
    causal_rect = cuda_facts(is_causal=True, k_shape=(2, 8, 300, 64), v_shape=(2, 8, 300, 64))
    assert any("top-left causal" in r for r in reasons("sdpa_cudnn", causal_rect)), "unverified corner: refused"
    d256 = dict(q_shape=(2, 8, 197, 256), k_shape=(2, 8, 197, 256), v_shape=(2, 8, 197, 256))
    assert reasons("sdpa_cudnn", cuda_facts(**d256)) == [], "d256 forward on sm90 with cuDNN > 9.22"


def test_old_gpu_is_refused_with_capability(monkeypatch):
    import attnswap.backends.base as base

    monkeypatch.setattr(base, "cuda_capability", lambda index: (7, 5))
    assert any("compute capability >= 8.0" in r for r in reasons("sdpa_flash", cuda_facts()))


def test_sdpa_and_math_accept_everything():
    assert get_backend("sdpa").accepts_everything and get_backend("sdpa_math").accepts_everything
    assert reasons("sdpa_math", cuda_facts(dtype=torch.float64, dropout_p=0.3)) == []


@pytest.mark.parametrize("name", ["sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
def test_pinned_kernels_refuse_inside_a_graph_when_dynamo_cannot_trace_sdpa_kernel(name, monkeypatch):
    """torch 2.5's dynamo cannot trace sdpa_kernel: there a pinned kernel steps aside inside a graph."""
    from attnswap.backends import sdpa as sdpa_module

    q = rand(1, 2, 8, 16)
    in_graph = dataclasses.replace(facts_of(q, q, q), in_graph=True)
    backend = get_backend(name)
    refused_here = any("sdpa_kernel" in r for r in backend.extra_reasons(in_graph))
    assert refused_here is not PINNED_KERNEL_IN_GRAPH, "this torch's own answer"
    monkeypatch.setattr(sdpa_module, "dynamo_traces_sdpa_kernel", lambda: False)
    assert any("cannot trace sdpa_kernel" in r for r in backend.extra_reasons(in_graph))
    assert not any("sdpa_kernel" in r for r in backend.extra_reasons(facts_of(q, q, q))), "eager calls are unaffected"
