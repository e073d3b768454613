"""Every SDPA-calling timm attention family, patched with every CPU backend: same output,
and every SDPA call went through attnswap (a TorchFunctionMode probe sees none reach PyTorch
unrouted, and the routers' counts equal the unpatched model's SDPA calls)."""

import pytest
import torch

import attnswap
from attnswap.backends import eager_attention
from conftest import SdpaCounter
from families import FAMILIES, SLOW_FAMILIES, build, features
from versions import needs_flex_on_cpu

CPU_BACKENDS = ["sdpa", "sdpa_math", "sdpa_flash", "eager"]
FLEX_FAMILIES = ["vit", "swin", "beit", "samvit", "mobilenetv4_hybrid", "nest"]


def outputs(model, x):
    with torch.no_grad():
        out = [features(model, x)]
        logits = model(x)
        out.append(logits if isinstance(logits, torch.Tensor) else logits[0])
    return out


def sdpa_calls_unpatched(model, x):
    counter = SdpaCounter()
    with counter, torch.no_grad():
        model(x)
    return counter.calls


def relative_error(out, ref):
    """max |out - ref| / max |ref|: the error at the scale of the output (random weights give
    outputs near 1e3 next to outputs near 0, so an elementwise rtol would be meaningless)."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_routing_is_complete(family, registered):
    model, x = build(family)
    registered("probe", lambda q, k, v, **kw: eager_attention(q, k, v, **kw))
    expected_calls = sdpa_calls_unpatched(model, x)
    attnswap.patch(model, backend="probe")
    counter = SdpaCounter()
    with counter:
        outputs(model, x)
    assert counter.calls == 0, f"{counter.calls} SDPA calls escaped the routers"
    routed = attnswap.stats(model).total_calls
    assert routed >= expected_calls and routed > 0, (routed, expected_calls)
    return routed


def check_numerics(family, backend, dtype):
    model, x = build(family, dtype=dtype)
    ref = outputs(model, x)
    attnswap.patch(model, backend=backend)
    out = outputs(model, x)
    limit = 1e-4 if dtype == torch.float32 else 1e-12  # float64 is the exact check; float32 allows rounding
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert relative_error(o, r) < limit, relative_error(o, r)
    s = attnswap.stats(model)
    assert s.total_calls > 0
    return s


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_every_sdpa_call_is_routed(family, registered):
    check_routing_is_complete(family, registered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_patched_equals_unpatched(family, backend, dtype):
    s = check_numerics(family, backend, dtype)
    if backend in ("sdpa", "sdpa_math", "eager"):
        assert s.fallback_calls == 0, str(s)
    else:  # CPU flash refuses dropout and v head dim != qk: each fallback is explained
        for site in s:
            for fb in site.fallbacks:
                assert fb.used == "sdpa" and fb.refused["sdpa_flash"], fb


@needs_flex_on_cpu
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_family_with_flex(family):
    s = check_numerics(family, "flex", torch.float32)
    assert s.by_backend().get("flex", 0) > 0


@pytest.mark.slow
@needs_flex_on_cpu
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FLEX_FAMILIES)))
def test_family_with_flex_slow(family):
    check_numerics(family, "flex", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SLOW_FAMILIES))
def test_big_family(family, registered):
    check_routing_is_complete(family, registered)  # once: it does not depend on the backend
    for backend in CPU_BACKENDS:
        check_numerics(family, backend, torch.float32)


@pytest.mark.parametrize("backend", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_only_kernels_fall_back_on_cpu_with_reasons(backend):
    s = check_numerics("swin", backend, torch.float32)
    assert s.fallback_calls == s.total_calls > 0
    assert all("device cpu" in fb.refused[backend][0] for site in s for fb in site.fallbacks)


#: classes reachable only through kwargs (global_pool='prr', ...): module path, constructor, input shape
_LAYERS_WITHOUT_REGISTERED_MODELS = {
    "Attention2d": ("timm.layers.attention2d", lambda cls: cls(32, num_heads=4), (2, 32, 6, 6)),
    "AttentionPoolPrr": ("timm.layers.attention_pool", lambda cls: cls(32, num_heads=4), (2, 10, 32)),
    "RotAttentionPool2d": ("timm.layers.attention_pool2d", lambda cls: cls(32, ref_feat_size=6, head_dim=8), (2, 32, 6, 6)),
    "SimPool2d": ("timm.layers.other_pool", lambda cls: cls(32, num_heads=2, gamma=2.0), (2, 32, 6, 6)),
    "SimPool1d": ("timm.layers.other_pool", lambda cls: cls(32, num_heads=2), (2, 10, 32)),
}


def _layer(name: str):
    import importlib

    import timm

    module_path, make, shape = _LAYERS_WITHOUT_REGISTERED_MODELS[name]
    try:
        cls = getattr(importlib.import_module(module_path), name, None)
    except ImportError:
        cls = None
    if cls is None:  # CI's timm has them all; an older one (bash .ci/compat) may not
        pytest.skip(f"{module_path}.{name} is not in timm {timm.__version__}")
    return make(cls), shape


@pytest.mark.parametrize("name", list(_LAYERS_WITHOUT_REGISTERED_MODELS))
@pytest.mark.parametrize("backend", ["sdpa_math", "eager"])
def test_layers_no_registered_model_uses(name, backend):
    """Classes reachable only through kwargs (global_pool='prr', ...) are routed too."""
    torch.manual_seed(0)
    module, shape = _layer(name)
    module = module.eval().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
    report = attnswap.patch(module, backend=backend)
    assert len(report) == 1
    counter = SdpaCounter()
    with counter, torch.no_grad():
        out = module(x)
    if backend == "eager":  # eager never calls SDPA itself, so any SDPA call seen escaped
        assert counter.calls == 0
    assert relative_error(out, ref) < 1e-12
    assert attnswap.stats(module).total_calls >= 1
