"""transformers models reached through the library's AttentionInterface (attnswap.integrations.hf_transformers)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap.errors import PatchError
from attnswap.integrations import hf_transformers
from attnswap.report import NOT_ROUTABLE, PATCHED

from hf_tiny import MODELS, build, transformers

ATTENTION_SITES = {"vit": 2, "dinov2": 2, "swin": 3, "bert": 2, "llama": 2, "t5": 6, "clip": 4, "siglip_vision": 2,
                   "whisper": 6}


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def _rel_err(out, ref) -> float:
    out, ref = _flat(out), _flat(ref)
    assert len(out) == len(ref) and out
    return max(((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for o, r in zip(out, ref))


def _configs(model: torch.nn.Module) -> dict[int, tuple[object, str]]:
    found = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            found[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_attention_call_is_routed_and_the_output_is_unchanged(name, sdpa_counter):
    model, x = build(name)
    with torch.no_grad():
        ref = model(**x)
    report = attnswap.patch(model, backend="sdpa")
    routed = [s for s in report.sites if s.status == PATCHED and s.how == hf_transformers.HOW]
    assert len(routed) == ATTENTION_SITES[name], report
    count = sdpa_counter()
    with torch.no_grad(), count:
        out = model(**x)
    stats = attnswap.stats(model)
    # every SDPA call torch saw came through a router, and nothing computed attention by hand
    assert stats.total_calls == count.calls == ATTENTION_SITES[name]
    assert count.softmax == 0
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["vit", "bert", "llama", "t5", "whisper"])
def test_float64_through_another_backend_is_exact(name):
    model, x = build(name, torch.float64)
    with torch.no_grad():
        ref = model(**x)
    attnswap.patch(model, backend="eager")  # attnswap's own math: not PyTorch's SDPA
    with torch.no_grad():
        out = model(**x)
    assert attnswap.stats(model).by_backend() == {"eager": ATTENTION_SITES[name]}
    assert _rel_err(out, ref) < 1e-12


def test_padding_reaches_the_backend_as_the_mask_sdpa_gets(registered):
    seen = []

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append((attn_mask, is_causal))
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    registered("hf_recording", recording)
    model, x = build("bert")
    with torch.no_grad():
        ref = model(**x)
    attnswap.patch(model, backend="hf_recording")
    with torch.no_grad():
        out = model(**x)
    assert _rel_err(out, ref) < 1e-6
    assert len(seen) == 2
    mask, causal = seen[0]
    assert mask is not None and mask.dtype == torch.bool and mask.shape == (2, 1, 7, 7) and not causal
    assert not mask[0, 0, :, -3:].any() and mask[1].all()  # the padded keys of the first sequence


def test_gqa_decoder_generates_the_same_tokens():
    model, x = build("llama")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**x, **kwargs)
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        out = model.generate(**x, **kwargs)
    assert torch.equal(out, ref)
    # the prompt, then one call per layer for each new token after the first (KV cache)
    assert attnswap.stats(model).total_calls == 2 * 6


def test_encoder_decoder_generates_the_same_tokens():
    model, x = build("whisper")
    features = x["input_features"]
    with torch.no_grad():
        ref = model.generate(features, max_new_tokens=5, do_sample=False)
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert attnswap.stats(model).total_calls > 6


def test_unpatch_restores_every_config_and_leaves_weights_untouched():
    model, x = build("clip")
    before = {k: v for k, (_, v) in _configs(model).items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {n: set(m.__dict__) for n, m in model.named_modules()}
    classes = {n: type(m) for n, m in model.named_modules()}
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        model(**x)
    # the configs the attention modules read switch; CLIP's top config, which none reads, does not
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "attnswap"
    assert model.config._attn_implementation == "sdpa"
    assert model.state_dict().keys() == state.keys()
    assert attnswap.unpatch(model) == 4
    assert {k: v for k, (_, v) in _configs(model).items()} == before
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attributes
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not attnswap.is_patched(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_that_shares_the_config_is_not_changed(sdpa_counter):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    a, b = transformers.ViTModel(config).eval(), transformers.ViTModel(config).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref_b = b(pixel_values=x).last_hidden_state
    attnswap.patch(a, backend="sdpa_math")
    assert config._attn_implementation == hf_transformers.KEY  # shared: b reads it too
    count = sdpa_counter()
    with torch.no_grad(), count:
        out_b = b(pixel_values=x).last_hidden_state
    assert torch.equal(out_b, ref_b) and count.calls == 2 and not attnswap.is_patched(b)
    attnswap.patch(b, backend="eager")
    attnswap.unpatch(a)
    assert config._attn_implementation == hf_transformers.KEY  # b still needs it
    with torch.no_grad():
        b(pixel_values=x)
    assert attnswap.stats(b).by_backend() == {"eager": 2}
    attnswap.unpatch(b)
    assert config._attn_implementation == "sdpa"


def test_patched_context_and_a_switch_of_backend():
    model, x = build("vit")
    with attnswap.patched(model, backend="sdpa_math"):
        attnswap.patch(model, backend="eager")  # switching keeps one registration per config
        with torch.no_grad():
            model(**x)
        assert attnswap.stats(model).by_backend() == {"eager": 2}
    assert model.config._attn_implementation == "sdpa" and not attnswap.is_patched(model)


def test_a_pickled_patched_model_still_routes_and_unpatches():
    model, x = build("vit")
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        ref = model(**x)
    loaded = pickle.loads(pickle.dumps(model))
    clone = copy.deepcopy(model)
    for m in (loaded, clone):
        with torch.no_grad():
            assert _rel_err(m(**x), ref) == 0
        assert attnswap.stats(m).total_calls >= 2
        attnswap.unpatch(m)
        assert m.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == hf_transformers.KEY  # the original is still patched


@pytest.mark.parametrize(
    "source, refused",
    [
        ('if self.config._attn_implementation == "sdpa":\n    pass\n', True),
        ('if config._attn_implementation in ("eager", "sdpa"):\n    pass\n', True),
        ('if "sdpa" != self.config._attn_implementation:\n    pass\n', True),
        ('using_eager = self.config._attn_implementation == "eager"\n', False),
        ('if self.config._attn_implementation == "flex_attention":\n    pass\n', False),
    ],
)
def test_model_files_that_branch_on_the_name_sdpa_are_refused(source, refused):
    problem = hf_transformers.file_problem(source, "modeling_x.py")
    assert (problem is not None) == refused
    if refused:
        assert "modeling_x.py:1" in problem


def test_a_lookup_by_name_is_refused():
    class ByName(torch.nn.Module):
        def forward(self, q):
            return ALL_ATTENTION_FUNCTIONS["sdpa"](self, q, q, q, None)  # noqa: F821

    ByName.__module__ = "transformers.models.fake.modeling_fake"
    reason = hf_transformers._by_name(hf_transformers._interface_methods(ByName))
    assert reason is not None and "ALL_ATTENTION_FUNCTIONS['sdpa']" in reason


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert", "vit", "t5"])
def test_compiled_fullgraph_routes_and_matches_eager(name):
    model, x = build(name)
    with torch.no_grad():
        ref = model(**x)
    attnswap.patch(model, backend="sdpa_math")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(**x)
        again = compiled(**x)
    assert _rel_err(out, ref) < 1e-5 and _rel_err(again, out) == 0
    # the routers were traced into the graph (compiled calls are not counted one by one)
    traced = [s.traced for s in attnswap.stats(model) if s.traced]
    assert len(traced) == ATTENTION_SITES[name] and all(t == {"sdpa_math": 1} for t in traced), traced


def test_a_transformers_version_outside_the_range_is_reported(monkeypatch):
    from attnswap.backends.optional import OptionalPackage

    monkeypatch.setattr(hf_transformers, "PACKAGE", OptionalPackage(
        modules=("transformers",), dist="transformers", minimum="99.0", below="100",
    ))
    model, _ = build("vit")
    report = attnswap.patch(model, backend="sdpa")
    assert {s.status for s in report.sites} == {NOT_ROUTABLE}
    assert "transformers cannot be reached" in report.sites[0].reason and ">=99.0" in report.sites[0].reason
    assert model.config._attn_implementation == "sdpa"


def test_verify_inspect_and_auto_take_keyword_inputs():
    from attnswap.inspection import inspect
    from attnswap.verify import verify

    model, x = build("llama")
    checked = verify(model, x, "sdpa_math", name="llama")
    assert [s.path for s in checked.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert not checked.flagged and checked.output_err < 1e-5
    seen = inspect(model, x, backend="sdpa", name="llama")
    assert seen.input_shape == (("input_ids", (2, 7)), ("attention_mask", (2, 7)))
    assert [r.how for r in seen.sites] == [hf_transformers.HOW] * 2 and all(r.calls for r in seen.sites)
    assert not attnswap.is_patched(model) and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref = model(**x).logits
    attnswap.patch(model, backend="auto", candidates=["sdpa", "sdpa_math", "eager"])
    with torch.no_grad():
        assert _rel_err(model(**x).logits, ref) < 1e-5
    assert attnswap.stats(model).total_calls == 2


def _roformer():
    torch.manual_seed(0)
    return transformers.RoFormerModel(transformers.RoFormerConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    )).eval()


def test_hand_written_attention_under_deprecate_kwarg_is_routed_and_unasked_weights_are_not_computed(sdpa_counter):
    # RoFormerSelfAttention.forward is decorated with deprecate_kwarg and returns its probabilities
    model, x = _roformer(), {k: v for k, v in MODELS["bert"][1]().items()}
    site = model.encoder.layer[0].attention.self
    cls, original = type(site), type(site).__dict__["forward"]
    with torch.no_grad():
        ref = model(**x)
        ref_weights = model(**x, output_attentions=True).attentions
    report = attnswap.patch(model, backend="sdpa")
    assert [s.how for s in report.sites if s.status == PATCHED] == ["hand-written"] * 2
    count = sdpa_counter()
    with torch.no_grad(), count:
        out = model(**x, cache=None)  # the decorator still renames past_key_values -> cache
    stats = attnswap.stats(model)
    assert stats.total_calls == count.calls == 2 and stats.unrouted_calls == 0 and count.softmax == 0, str(stats)
    assert _rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    # asked for: the module's own code computes them (counted); the first layer's are the same numbers
    with torch.no_grad():
        weights = model(**x, output_attentions=True).attentions
    assert attnswap.stats(model).unrouted_calls == 2 and torch.equal(weights[0], ref_weights[0])
    attnswap.unpatch(model)
    assert type(site) is cls and cls.__dict__["forward"] is original


def test_a_lookup_by_name_taken_only_under_flash_attn_is_not_refused():
    class FlashFallback(torch.nn.Module):  # SAM2, SAM3, EdgeTAM: float masks go to sdpa when flash-attn is configured
        def forward(self, q, similarity=None):
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)  # noqa: F821
            if is_flash_attention_requested(self.config) and similarity is not None:  # noqa: F821
                interface = ALL_ATTENTION_FUNCTIONS["sdpa"]  # noqa: F821
            return interface(self, q, q, q, None)

    FlashFallback.__module__ = "transformers.models.fake.modeling_fake"
    assert hf_transformers._by_name(hf_transformers._interface_methods(FlashFallback)) is None


def test_sam2s_vision_and_mask_decoder_attention_are_routed():
    from attnswap import coverage

    result = coverage.sweep_one("sam2", zoo="transformers", numerics=False)
    assert result.fully_routed and not result.not_routable, result
