"""The public API: patch / unpatch / patched / is_patched / stats, selection, switching."""

import pytest
import torch

import attnswap
from families import build


@pytest.fixture
def vit():
    return build("vit")


def routers(model):
    return {n: m.__dict__.get("_attnswap_router") for n, m in model.named_modules() if "_attnswap_router" in m.__dict__}


def test_patch_report_lists_sites_and_prints_a_table(vit):
    model, x = vit
    report = attnswap.patch(model, backend="sdpa_math")
    assert [s.path for s in report.patched] == ["blocks.0.attn", "blocks.1.attn"]
    assert report.backend == "sdpa_math" and report.fallback == ("sdpa",)
    text = str(report)
    assert "blocks.0.attn" in text and "sdpa_math -> sdpa" in text
    assert report.as_dict()["sites"][0]["status"] == "patched"


def test_unknown_backend_leaves_model_untouched(vit):
    model, _ = vit
    with pytest.raises(attnswap.AttnSwapError, match="Did you mean 'sdpa_flash'"):
        attnswap.patch(model, backend="sdpa_flsh")
    with pytest.raises(attnswap.AttnSwapError, match="Unknown attention backend 'nope'"):
        attnswap.patch(model, backend="eager", fallback=["nope"])
    assert not attnswap.is_patched(model)


def test_not_a_module_is_a_clear_error():
    with pytest.raises(attnswap.AttnSwapError, match="expected a torch.nn.Module, got str"):
        attnswap.patch("vit_base_patch16_224")


def test_patching_again_switches_backend(vit):
    model, x = vit
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        model(x)
    attnswap.patch(model, backend="eager")
    with torch.no_grad():
        model(x)
    assert {s.backend for s in attnswap.stats(model)} == {"eager"}
    assert attnswap.stats(model).by_backend() == {"eager": 2}
    attnswap.unpatch(model)
    assert not attnswap.is_patched(model)


def test_include_and_exclude_select_by_path_and_class(vit):
    model, _ = vit
    report = attnswap.patch(model, include="blocks.1.*")
    assert [s.path for s in report.patched] == ["blocks.1.attn"]
    attnswap.unpatch(model)
    attention = type(model.blocks[0].attn)

    assert len(attnswap.patch(model, exclude=[attention])) == 0
    assert len(attnswap.patch(model, include="Attention", exclude="blocks.0.*")) == 1
    with pytest.raises(attnswap.AttnSwapError, match=r"module-path globs .*or classes"):
        attnswap.patch(model, include=[3])


def test_patched_context_restores_previous_patch_exactly(vit):
    model, x = vit
    attnswap.patch(model, backend="eager")
    before = routers(model)
    with attnswap.patched(model, backend="sdpa_math") as report:
        assert len(report) == 2
        assert {r.policy.backend for r in routers(model).values()} == {"sdpa_math"}
        with attnswap.patched(model, backend="flex", include="blocks.0.*"):
            assert routers(model)["blocks.0.attn"].policy.backend == "flex"
            assert routers(model)["blocks.1.attn"].policy.backend == "sdpa_math"
        assert {r.policy.backend for r in routers(model).values()} == {"sdpa_math"}
    after = routers(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_patched_context_is_exception_safe(vit):
    model, x = vit
    with pytest.raises(ValueError, match="inside"):
        with attnswap.patched(model, backend="sdpa_math"):
            assert attnswap.is_patched(model)
            raise ValueError("inside")
    assert not attnswap.is_patched(model)


def test_stats_count_calls_and_fallbacks_with_reasons(vit):
    model, x = vit
    attnswap.patch(model, backend="sdpa_efficient")  # CUDA-only kernel: every CPU call falls back
    with torch.no_grad():
        model(x)
        model(x)
    s = attnswap.stats(model)
    assert s.total_calls == 4 and s.fallback_calls == 4
    (fb,) = s[0].fallbacks
    assert fb.used == "sdpa" and fb.calls == 2
    assert "device cpu (supported: cuda)" in fb.refused["sdpa_efficient"]
    assert "device cpu" in str(s)
    attnswap.stats(model, reset=True)
    assert attnswap.stats(model).total_calls == 0


def test_strict_raises_unsupported_call_at_forward(vit):
    model, x = vit
    attnswap.patch(model, backend="sdpa_efficient", strict=True)
    with pytest.raises(attnswap.UnsupportedCall, match="sdpa_efficient"):
        model(x)


def test_unavailable_backend_patches_with_fallback_or_raises_when_strict(vit, registered):
    from attnswap.backends.base import Backend
    from attnswap.backends.registry import _add

    class Missing(Backend):
        name = "missing_for_test"
        install_hint = "pip install missing"

        def check_available(self):
            return "package 'missing' is not installed"

    _add(Missing())
    try:
        model, x = vit
        report = attnswap.patch(model, backend="missing_for_test")
        assert report.backend_unavailable and "unavailable" in str(report)
        with torch.no_grad():
            model(x)
        (fb,) = attnswap.stats(model)[0].fallbacks
        assert fb.used == "sdpa" and "package 'missing' is not installed" in fb.refused["missing_for_test"][0]
        attnswap.unpatch(model)
        with pytest.raises(attnswap.BackendUnavailable, match="pip install missing"):
            attnswap.patch(model, backend="missing_for_test", strict=True)
        assert not attnswap.is_patched(model)
    finally:
        attnswap.unregister_backend("missing_for_test")


def test_report_lists_manual_attention_it_does_not_route():
    model, _ = build("cait")
    report = attnswap.patch(model)
    manual = [s for s in report.not_routable if s.cls.endswith("TalkingHeadAttn")]
    assert len(manual) == 2 and all(s.status == "not routed" for s in manual)
    assert len(report) == 2  # the class-attention blocks


def test_scoped_to_the_model(vit):
    model, x = vit
    other, _ = build("vit")
    attnswap.patch(model, backend="eager")
    assert not attnswap.is_patched(other)
    with torch.no_grad():
        other(x)
    assert attnswap.stats(other) == []
