"""diffusers models reached through their attention processors (attnswap.integrations.hf_diffusers)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap.integrations import hf_diffusers
from attnswap.report import PATCHED

from hf_diffusers_tiny import MODELS, build, diffusers


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def _rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _calls_of(processor_cls: type):
    return processor_cls.__dict__.get("__call__")


def _own_processor_class(*models) -> type:
    """A processor class only these models use (others, patched elsewhere, may share diffusers' own)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    own = type("OwnProcessor", (AttnProcessor2_0,), {})
    for model in models:
        for m in model.modules():
            if hasattr(m, "set_processor"):
                m.set_processor(own())
    return own


def _rewritten(processor_cls: type) -> bool:
    fn = _calls_of(processor_cls)
    return fn is not None and "__attnswap_unrouted__" in fn.__code__.co_freevars


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_attention_call_is_routed_and_the_output_is_unchanged(name, sdpa_counter):
    model, x, sites = build(name)
    ref = _out(model, x)
    report = attnswap.patch(model, backend="sdpa")
    routed = [s for s in report.sites if s.status == PATCHED and s.how.startswith("diffusers processor")]
    assert len(routed) == sites, report
    count = sdpa_counter()
    with count:
        out = _out(model, x)
    stats = attnswap.stats(model)
    assert stats.total_calls == count.calls == sites and count.softmax == 0 and stats.unrouted_calls == 0
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float64_through_another_backend_is_exact(name):
    model, x, sites = build(name, torch.float64)
    ref = _out(model, x)
    attnswap.patch(model, backend="eager")
    out = _out(model, x)
    assert attnswap.stats(model).by_backend() == {"eager": sites}
    assert _rel_err(out, ref) < 1e-12


def test_unpatch_restores_processor_classes_hooks_and_weights():
    model, x, _ = build("unet2d_condition")
    own = _own_processor_class(model)
    processors = {n: id(p) for n, p in model.attn_processors.items()}
    hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    attributes = {n: dict(m.__dict__) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attnswap.patch(model, backend="sdpa")
    assert _rewritten(own)
    _out(model, x)
    assert attnswap.unpatch(model) == 8
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == {n: set(a) for n, a in attributes.items()}
    assert "__call__" not in own.__dict__  # inherited again, as before
    assert {n: id(p) for n, p in model.attn_processors.items()} == processors
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not attnswap.is_patched(model)


def test_switching_backend_keeps_one_hook_per_module():
    model, x, sites = build("dit")
    attnswap.patch(model, backend="sdpa")
    attnswap.patch(model, backend="eager")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == sites
    _out(model, x)
    assert attnswap.stats(model).by_backend() == {"eager": sites}
    attnswap.unpatch(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_a_model_that_shares_the_processor_class_is_not_changed(sdpa_counter):
    a, x, _ = build("dit")
    b, _, _ = build("dit")
    own = _own_processor_class(a, b)
    ref_b = _out(b, x)
    attnswap.patch(a, backend="eager")
    count = sdpa_counter()
    with count:
        out_b = _out(b, x)
    assert torch.equal(out_b, ref_b) and count.calls == 2 and not attnswap.is_patched(b)
    attnswap.patch(b, backend="sdpa_math")
    attnswap.unpatch(a)
    assert _rewritten(own)  # b still uses it
    _out(b, x)
    assert attnswap.stats(b).by_backend() == {"sdpa_math": 2}
    attnswap.unpatch(b)
    assert not _rewritten(own)


class _OwnSdpaProcessor:
    """A user's processor: its own projections and SDPA call (no mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (p(t).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                   for p, t in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def test_processors_set_after_patching_are_routed_or_counted():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, x, sites = build("unet2d_condition")
    ref = _out(model, x)
    attnswap.patch(model, backend="eager")
    model.set_attn_processor(AttnProcessor2_0())  # new objects of a routed class (LoRA loading does this)
    assert _rel_err(_out(model, x), ref) < 1e-5
    assert attnswap.stats(model).by_backend() == {"eager": sites}

    model.set_attn_processor(_OwnSdpaProcessor())  # a class the patch never saw: rewritten when first met
    attnswap.stats(model, reset=True)
    out = _out(model, x)
    assert attnswap.stats(model).by_backend() == {"eager": sites} and _rewritten(_OwnSdpaProcessor)

    model.set_attn_processor(AttnProcessor2_0())
    model.set_default_attn_processor()  # diffusers' hand-written AttnProcessor: counted with the reason
    attnswap.stats(model, reset=True)
    assert _rel_err(_out(model, x), ref) < 1e-5
    stats = attnswap.stats(model)
    assert stats.total_calls == 0 and stats.unrouted_calls == sites
    assert any("processor set after patching" in why for s in stats for why in s.unrouted)
    attnswap.unpatch(model)
    assert not _rewritten(_OwnSdpaProcessor)
    model.set_attn_processor(_OwnSdpaProcessor())
    assert _rel_err(_out(model, x), out) < 1e-5  # what the processor computes unpatched (float32)


def test_a_global_diffusers_backend_is_respected_and_counted():
    from diffusers.models.attention_dispatch import attention_backend

    model, x, sites = build("flux")
    ref = _out(model, x)
    attnswap.patch(model, backend="sdpa")
    with attention_backend("_native_math"):
        out = _out(model, x)
    stats = attnswap.stats(model)
    assert stats.total_calls == 0 and stats.unrouted_calls == sites
    assert any("_native_math" in why for s in stats for why in s.unrouted)
    assert _rel_err(out, ref) < 1e-5


def test_a_denoising_loop_is_unchanged():
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(3)
    model, x, _ = build("unet2d_condition")

    def denoise() -> torch.Tensor:
        latents = x["sample"].clone()
        for t in scheduler.timesteps:
            with torch.no_grad():
                noise = model(latents, t, encoder_hidden_states=x["encoder_hidden_states"], return_dict=False)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    ref = denoise()
    with attnswap.patched(model, backend="sdpa"):
        out = denoise()
        assert attnswap.stats(model).total_calls == 3 * 8
    assert torch.equal(out, ref)


def test_gradients_match():
    model, x, _ = build("sd3", torch.float64)
    model.train()
    ref_out = model(**x, return_dict=False)[0]
    ref_out.square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    attnswap.patch(model, backend="eager")
    model(**x, return_dict=False)[0].square().sum().backward()
    for n, p in model.named_parameters():
        if n in ref:
            assert torch.allclose(p.grad, ref[n], rtol=1e-10, atol=1e-12), n


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_fullgraph_routes_and_matches_eager(name):
    model, x, sites = build(name)
    ref = _out(model, x)
    attnswap.patch(model, backend="sdpa_math")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = _out(compiled, x)
    assert _rel_err(out, ref) < 1e-5 and torch.equal(_out(compiled, x), out)
    traced = [s.traced for s in attnswap.stats(model) if s.traced]
    assert len(traced) == sites and all(t == {"sdpa_math": 1} for t in traced), traced


def test_a_patched_model_dropped_without_unpatching_gives_the_class_back():
    from diffusers.models.attention_processor import Attention

    model = Attention(query_dim=16, heads=2, dim_head=8)
    own = _own_processor_class(model)
    attnswap.patch(model, backend="sdpa")
    assert _rewritten(own)
    del model
    gc.collect()
    assert not _rewritten(own) and "__call__" not in own.__dict__


def test_a_diffusers_version_outside_the_range_is_reported(monkeypatch):
    from attnswap.backends.optional import OptionalPackage
    from attnswap.report import NOT_ROUTABLE

    monkeypatch.setattr(hf_diffusers, "PACKAGE", OptionalPackage(
        modules=("diffusers",), dist="diffusers", minimum="99.0", below="100",
    ))
    model, _, _ = build("dit")
    report = attnswap.patch(model, backend="sdpa")
    assert {s.status for s in report.sites} == {NOT_ROUTABLE}
    assert "diffusers cannot be reached" in report.sites[0].reason and ">=99.0" in report.sites[0].reason


def test_verify_and_inspect_take_keyword_inputs():
    from attnswap.inspection import inspect
    from attnswap.verify import verify

    model, x, sites = build("flux")
    checked = verify(model, x, "eager", name="flux")
    assert len(checked.sites) == sites and not checked.flagged
    seen = inspect(model, x, backend="sdpa", name="flux")
    assert [r.how for r in seen.sites] == ["diffusers processor FluxAttnProcessor"] * sites
    assert all(r.calls for r in seen.sites) and not attnswap.is_patched(model)


def test_bench_times_a_model_with_keyword_inputs():
    from attnswap.bench import run

    model, x, sites = build("dit")
    result = run(model, ["sdpa", "eager"], x, name="dit", repeats=2)
    rows = {v.backend: v for v in result.variants}
    assert rows["eager"].calls == sites and rows["eager"].rel_err < 1e-5 and len(rows["eager"].times_ms) == 2
    assert not attnswap.is_patched(model)
