"""transformers models configured for ``eager``: their own eager function, its scores deferred to the router."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.integrations import hf_transformers
from attnswap.report import NOT_ROUTABLE, PATCHED

from hf_tiny import EAGER_MODELS, EAGER_NOT_EXPRESSIBLE, build, transformers

#: attention modules reached through the interface, per model
SITES = {"splinter": 2, "gemma2": 2, "speech_to_text": 3, "gemma2_softcap": 2, "gpt_oss": 2}


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]


def _implementations(model) -> set[str]:
    return {m.config._attn_implementation for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}


def _patch(model) -> list:
    report = attnswap.patch(model, backend="sdpa")
    return [s for s in report.sites if s.status == PATCHED and s.how.startswith(hf_transformers.HOW)]


@pytest.mark.parametrize("name", sorted(EAGER_MODELS))
def test_every_call_is_routed_and_the_output_is_unchanged(name, sdpa_counter):
    model, x = build(name)
    assert _implementations(model) == {"eager"}
    with torch.no_grad():
        ref = model(**x)
    sites = _patch(model)
    assert len(sites) == SITES[name] and all("eager" in s.how for s in sites)
    assert _implementations(model) == {hf_transformers.EAGER_KEY}
    count = sdpa_counter()
    with torch.no_grad(), count:
        out = model(**x)
    stats = attnswap.stats(model)
    # the SDPA calls torch saw all came through a router, and no softmax ran: no call escaped
    assert stats.total_calls == count.calls >= SITES[name] and stats.unrouted_calls == 0, str(stats)
    assert count.softmax == 0
    torch.testing.assert_close(_first(out), _first(ref), rtol=1e-5, atol=1e-5)
    attnswap.unpatch(model)
    assert _implementations(model) == {"eager"}


@pytest.mark.parametrize("name", ["speech_to_text"])
def test_float64_through_another_backend_is_exact(name):
    # (splinter's and Gemma 2's eager functions take their softmax in float32: in a float64 model those
    # calls run the module's own code, see test_manual)
    model, x = build(name, torch.float64)
    with torch.no_grad():
        ref = model(**x)
    attnswap.patch(model, backend="eager")
    with torch.no_grad():
        out = model(**x)
    assert attnswap.stats(model).unrouted_calls == 0
    torch.testing.assert_close(_first(out), _first(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EAGER_NOT_EXPRESSIBLE))
def test_what_sdpa_cannot_express_runs_the_models_own_code_counted(name, sdpa_counter):
    model, x = build(name)
    reason = EAGER_NOT_EXPRESSIBLE[name][2]
    with torch.no_grad():
        ref = model(**x)
    assert len(_patch(model)) == SITES[name]
    count = sdpa_counter()
    with torch.no_grad(), count:
        out = model(**x)
    stats = attnswap.stats(model)
    assert torch.equal(_first(out), _first(ref))  # the module's own operations, replayed
    assert stats.total_calls == count.calls == 0
    assert stats.unrouted_calls == SITES[name] and all(reason in why for s in stats for why in s.unrouted), str(stats)


def test_the_float32_softmax_of_a_bfloat16_model_is_routed():
    model, x = build("gemma2", torch.bfloat16)
    with torch.no_grad():
        ref = model(**x).logits.float()
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        out = model(**x).logits.float()
    stats = attnswap.stats(model)
    assert stats.total_calls == 2 and stats.unrouted_calls == 0, str(stats)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-2  # one bfloat16 rounding of P, not two


def test_captured_attention_weights_come_from_the_models_own_code():
    model, x = build("splinter")
    with torch.no_grad():
        ref = model(**x, output_attentions=True)
        plain = model(**x)
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        out = model(**x, output_attentions=True)
    assert len(out.attentions) == 2 and all(torch.equal(a, r) for a, r in zip(out.attentions, ref.attentions))
    stats = attnswap.stats(model)
    assert stats.total_calls == 0 and stats.unrouted_calls == 2
    assert all(hf_transformers.WEIGHTS_WANTED in s.unrouted for s in stats)
    with torch.no_grad():
        again = model(**x)  # and routed again when nobody captures them
    assert attnswap.stats(model).total_calls == 2 and out.attentions is not None
    torch.testing.assert_close(again.last_hidden_state, plain.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_gemma2_generates_the_same_tokens():
    model, x = build("gemma2")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**x, **kwargs)
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        out = model.generate(**x, **kwargs)
    assert torch.equal(out, ref)
    stats = attnswap.stats(model)
    assert stats.total_calls == 2 * 6 and stats.unrouted_calls == 0, str(stats)


def test_a_model_that_shares_an_eager_config_is_not_changed(sdpa_counter):
    config = transformers.SplinterConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, question_token_id=5)
    torch.manual_seed(0)
    a, b = transformers.SplinterModel(config).eval(), transformers.SplinterModel(config).eval()
    ids = torch.randint(3, 99, (1, 6))
    with torch.no_grad():
        ref_b = b(input_ids=ids).last_hidden_state
    attnswap.patch(a, backend="sdpa_math")
    assert b.config._attn_implementation == hf_transformers.EAGER_KEY  # shared: b reads it too
    count = sdpa_counter()
    with torch.no_grad(), count:
        out_b = b(input_ids=ids).last_hidden_state
    assert torch.equal(out_b, ref_b) and count.calls == 0 and count.softmax == 2  # b's own eager code
    attnswap.unpatch(a)
    assert config._attn_implementation == "eager"


def test_a_model_on_an_implementation_attnswap_does_not_switch_is_reported():
    model, _ = build("vit")
    model.config._attn_implementation_internal = "flex_attention"
    report = attnswap.patch(model, backend="sdpa")
    assert [s.status for s in report.sites] == [NOT_ROUTABLE, NOT_ROUTABLE]
    assert "attn_implementation='flex_attention'" in report.sites[0].reason
    assert model.config._attn_implementation == "flex_attention"


def test_model_files_that_branch_on_the_name_eager_are_refused_when_switched_from_eager():
    source = 'if self.config._attn_implementation in ("eager", "sdpa"):\n    pass\n'
    assert "'eager'" in hf_transformers.file_problem(source, "modeling_x.py", "eager")
    assert hf_transformers.file_problem('x = config._attn_implementation == "sdpa"\n', "m.py", "eager") is None


@pytest.mark.slow
def test_compiled_fullgraph_routes_and_matches_eager():
    model, x = build("gemma2")
    with torch.no_grad():
        ref = model(**x).logits
    attnswap.patch(model, backend="sdpa")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_pickled_patched_eager_model_still_routes_and_unpatches_to_eager():
    import pickle

    model, x = build("splinter")
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    loaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, ref)
    assert attnswap.stats(loaded).total_calls == 2 + 2  # the counts travel with the model
    attnswap.unpatch(loaded)
    assert _implementations(loaded) == {"eager"}
    assert _implementations(model) == {hf_transformers.EAGER_KEY}  # the original is still patched
