"""DESIGN.md's invariants, each with a test that can fail."""

import copy
import io
import pickle

import pytest
import torch
import torch._dynamo.testing

import attnswap
from attnswap.backends import eager_attention
from families import build, features
from versions import assert_traced_with, needs_flex_on_cpu


def snapshot(model):
    return {
        name: (type(m), dict(m.__dict__)) for name, m in model.named_modules()
    }


# 1. state_dict unchanged ------------------------------------------------------------------------

def test_state_dict_keys_storage_and_parameter_objects_unchanged():
    model, x = build("swin")
    params = dict(model.named_parameters())
    sd = model.state_dict()
    attnswap.patch(model, backend="eager")
    sd2 = model.state_dict()
    assert list(sd2) == list(sd)
    assert all(sd2[k].data_ptr() == sd[k].data_ptr() for k in sd)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(dict(model.named_buffers())) == {n for n, _ in build("swin")[0].named_buffers()}


def test_optimizer_built_before_patch_trains_the_patched_model():
    model, x = build("vit")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attnswap.patch(model, backend="eager")
    w = model.blocks[0].attn.qkv.weight
    before = w.detach().clone()
    features(model, x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, w.detach())


def test_checkpoints_load_both_ways():
    patched_model, x = build("beit")
    attnswap.patch(patched_model, backend="eager")
    plain, _ = build("beit")
    for p in plain.parameters():
        torch.nn.init.normal_(p)
    plain.load_state_dict(patched_model.state_dict())
    fresh, _ = build("beit")
    attnswap.patch(fresh, backend="sdpa_math")
    for p in fresh.parameters():
        torch.nn.init.normal_(p)
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(features(fresh, x), features(plain, x))


# 2. unpatch restores exactly ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["swin", "vit", "xcit", "visformer"])
def test_unpatch_restores_classes_flags_attributes_and_bits(family):
    model, x = build(family)
    with torch.no_grad():
        ref = features(model, x)
    before = snapshot(model)
    attnswap.patch(model, backend="eager")
    assert snapshot(model) != before
    attnswap.unpatch(model)
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][0] is before[name][0], name
        assert after[name][1].keys() == before[name][1].keys(), name
        for key, value in before[name][1].items():
            assert after[name][1][key] is value or after[name][1][key] == value, (name, key)
    with torch.no_grad():
        assert torch.equal(features(model, x), ref)


def test_unpatch_on_unpatched_model_is_a_no_op():
    model, _ = build("vit")
    before = snapshot(model)
    assert attnswap.unpatch(model) == 0
    assert snapshot(model) == before


# 3. idempotent and scoped -------------------------------------------------------------------------

def test_patching_twice_is_the_same_as_once():
    model, x = build("vit_relpos")
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        once = features(model, x)
    attnswap.patch(model, backend="sdpa_math")
    with torch.no_grad():
        assert torch.equal(features(model, x), once)
    assert attnswap.unpatch(model) == 2
    assert not attnswap.is_patched(model)


# 4. never silently different: covered in tests/test_routing.py, tests/backends/*, tests/test_timm_families.py

# 5. live module state -----------------------------------------------------------------------------

def test_dropout_follows_train_eval_and_p_at_call_time(registered):
    seen = []
    registered("probe", lambda q, k, v, attn_mask=None, dropout_p=0.0, **kw: (seen.append(dropout_p), eager_attention(q, k, v, attn_mask))[1])
    model, x = build("vit")
    for block in model.blocks:
        block.attn.attn_drop.p = 0.25
    attnswap.patch(model, backend="probe")
    model.train()
    features(model, x)
    model.eval()
    features(model, x)
    model.blocks[0].attn.attn_drop.p = 0.5
    model.train()
    features(model, x)
    assert seen == [0.25, 0.25, 0.0, 0.0, 0.5, 0.25]


def test_swin_set_input_size_after_patching():
    model, _ = build("swin")
    reference, _ = build("swin")
    attnswap.patch(model, backend="eager")
    for m in (model, reference):
        m.set_input_size(img_size=(256, 256), window_size=8)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out, ref = features(model, x), features(reference, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert attnswap.stats(model).total_calls == 5 and attnswap.stats(model).fallback_calls == 0
    assert not any("_attnswap_router" in m.__dict__ for m in reference.modules())


# 8. plays well with PyTorch -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["swin", "beit"])
def test_gradients_match_unpatched_including_bias_tables(family):
    model, x = build(family, dtype=torch.float64)
    reference, _ = build(family, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    attnswap.patch(model, backend="eager")
    features(model, x).square().mean().backward()
    features(reference, x).square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert any("relative_position" in n for n in grads), "the test must cover a learnable bias table"
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "eager", pytest.param("flex", marks=needs_flex_on_cpu)])
def test_torch_compile_fullgraph_no_graph_break_no_recompile(backend):
    # flex on CPU refuses a bias computed inside a compiled graph (see the slow test below)
    model, x = build("vit" if backend == "flex" else "vit_relpos")
    with torch.no_grad():
        ref = features(model, x)
    attnswap.patch(model, backend=backend)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model.forward_features, fullgraph=True, backend="aot_eager" if backend == "flex" else counter)
    with torch.no_grad():
        out1 = compiled(x)
        out2 = compiled(x)
    torch.testing.assert_close(out1, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out1, out2)
    if backend != "flex":
        assert counter.frame_count == 1, "recompiled on a repeated call"
    assert_traced_with(attnswap.stats(model), backend)
    torch._dynamo.reset()


def test_assume_constant_result_marker_matches_torch():
    # attnswap marks its trace-time decision without importing dynamo; this is what torch sets
    fn = torch.compiler.assume_constant_result(lambda: 1)
    assert fn._dynamo_marked_constant is True


def test_deepcopy_pickle_and_torch_save_round_trip_patched():
    model, x = build("swin")
    attnswap.patch(model, backend="eager")
    with torch.no_grad():
        ref = features(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), _torch_round_trip(model)):
        assert attnswap.is_patched(clone)
        assert clone.layers[0].blocks[0].attn.fused_attn is True
        with torch.no_grad():
            torch.testing.assert_close(features(clone, x), ref)
        assert attnswap.stats(clone).by_backend()["eager"] >= 5
        attnswap.unpatch(clone)
        assert clone.layers[0].blocks[0].attn.fused_attn is False
    assert attnswap.is_patched(model), "copies are independent of the original"


def _torch_round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_to_dtype_and_hooks_keep_working():
    model, x = build("vit")
    fired = []
    model.blocks[0].attn.register_forward_hook(lambda m, i, o: fired.append("before-patch hook"))
    attnswap.patch(model, backend="sdpa_flash")
    model.blocks[1].attn.register_forward_pre_hook(lambda m, i: fired.append("after-patch hook"))
    model.double()
    with torch.no_grad():
        out = features(model, x.double())
    assert out.dtype == torch.float64
    assert fired == ["before-patch hook", "after-patch hook"]
    assert attnswap.stats(model).by_backend() == {"sdpa_flash": 2}
    attnswap.unpatch(model)
    fired.clear()
    features(model, x.double())
    assert fired == ["before-patch hook", "after-patch hook"]


def test_timm_fx_feature_extraction_keeps_routing():
    from timm.models._features_fx import create_feature_extractor

    model, x = build("vit")
    attnswap.patch(model, backend="sdpa_math")
    extractor = create_feature_extractor(model, return_nodes=["blocks.1"])
    assert "call_router" in extractor.code and "scaled_dot_product_attention" not in extractor.code
    with torch.no_grad():
        out = extractor(x)["blocks.1"]
    assert attnswap.stats(model).by_backend() == {"sdpa_math": 2}
    with torch.no_grad():
        torch.testing.assert_close(out, model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x)))))


@pytest.mark.slow
@pytest.mark.parametrize("family, backend", [
    ("vit_relpos", "sdpa"),
    pytest.param("vit_relpos", "flex", marks=needs_flex_on_cpu),
    # q/k/v from one fused qkv buffer: inductor's CPU flex lowering rejected that before 2.13
    pytest.param("vit", "flex", marks=needs_flex_on_cpu),
])
def test_torch_compile_inductor_end_to_end(family, backend):
    model, x = build(family)
    with torch.no_grad():
        ref = features(model, x)
    attnswap.patch(model, backend=backend)
    compiled = torch.compile(model.forward_features, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    traced = attnswap.stats(model)[0].traced
    if family == "vit":
        assert_traced_with(attnswap.stats(model), backend)
    elif backend == "flex":
        # the rel-pos bias is computed in the graph: inductor cannot lower that for CPU flex,
        # so the call falls back to sdpa inside the graph, with the reason
        assert list(traced) == ["sdpa"]
        (fallback,) = attnswap.stats(model)[0].fallbacks
        assert fallback.traced == 1 and "inside a torch.compile graph on CPU" in fallback.refused["flex"][-1]
    else:
        assert list(traced) == [backend]
    torch._dynamo.reset()
