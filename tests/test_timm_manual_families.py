"""Hand-written attention in timm (map category B, and ConViT's GPSA), patched: same output
as unpatched, and every q·kᵀ softmax became a router call (none computed by the module itself)."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import attnswap
from families import MANUAL_FAMILIES, build, features
from versions import needs_flex_on_cpu, unpatched_or_skip
from test_timm_families import relative_error

_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class SoftmaxCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # a softmax of deferred scores (attnswap's own object) is not computed here: not counted
        if func in _SOFTMAX and isinstance(args[0], torch.Tensor):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def softmax_calls(model, x) -> int:
    counter = SoftmaxCounter()
    with counter, torch.no_grad():
        features(model, x)
    return counter.calls


@pytest.mark.parametrize("family", list(MANUAL_FAMILIES))
def test_manual_family_every_attention_softmax_is_routed(family):
    model, x = build(family)
    before = softmax_calls(model, x)
    report = attnswap.patch(model, backend="sdpa_math")  # runs no softmax at the Python level
    manual_sites = {site.path for site in report.patched if site.how == "hand-written"}
    assert manual_sites, str(report)
    after = softmax_calls(model, x)
    s = attnswap.stats(model)
    assert s.unrouted_calls == 0, str(s)
    # each routed hand-written call replaced exactly one softmax; what is left is not q·kᵀ
    # attention (ConViT's positional softmax, talking-head or outlook attention left alone)
    routed = sum(site.total_calls for site in s if site.path in manual_sites)
    assert routed > 0 and before - after == routed, (before, after, routed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(MANUAL_FAMILIES))
def test_manual_family_patched_equals_unpatched(family, backend, dtype):
    model, x = build(family, dtype=dtype)
    with torch.no_grad():
        ref = unpatched_or_skip(lambda: features(model, x))
        attnswap.patch(model, backend=backend)
        out = features(model, x)
    limit = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert relative_error(out, ref) < limit
    s = attnswap.stats(model)
    assert s.total_calls > 0 and s.unrouted_calls == 0 and s.fallback_calls == 0, str(s)
    attnswap.unpatch(model)
    with torch.no_grad():
        assert torch.equal(features(model, x), ref)


@pytest.mark.slow
@needs_flex_on_cpu
@pytest.mark.parametrize("family", list(MANUAL_FAMILIES))
def test_manual_family_with_flex(family):
    model, x = build(family)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex")
        out = features(model, x)
    assert relative_error(out, ref) < 1e-5
    assert attnswap.stats(model).unrouted_calls == 0
