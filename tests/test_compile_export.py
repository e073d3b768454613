"""Patched models under torch.compile (whole model, fullgraph), torch.export, torch.jit.script and
torchvision's fx feature extraction (issue 6). timm's fx extraction: tests/test_invariants.py."""

import pytest
import torch
import torch._dynamo.testing

import attnswap
from families import build
from versions import FLEX_ON_CPU_IN_GRAPH, assert_traced_with, needs_flex_on_cpu


def _compiled_twice(model, x, backend):
    """``torch.compile(model, fullgraph=True)``, called on x, again, and once more after a train/eval
    round trip; returns the outputs and the counter of compiled frames."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        first = compiled(x)
        second = compiled(x)
        model.train()
        model.eval()
        third = compiled(x)
    return (first, second, third), counter


@pytest.mark.parametrize(
    "family, backend",
    [
        ("vit", "sdpa"), ("vit", "eager"),
        ("swin", "sdpa"), ("swin", "eager"),  # rel-pos bias + shift mask passed as attn_mask
        ("beit", "sdpa_math"),  # rel-pos bias; a pinned kernel inside the graph
        ("eva02", "sdpa"),  # rope
    ],
)
def test_whole_model_compiles_fullgraph_once_and_matches(family, backend):
    torch._dynamo.reset()
    model, x = build(family)
    with torch.no_grad():
        ref = model(x)
    attnswap.patch(model, backend=backend)
    outs, counter = _compiled_twice(model, x, "eager")
    for out in outs:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for one input signature"
    assert_traced_with(attnswap.stats(model), backend)
    torch._dynamo.reset()


@pytest.mark.slow
@needs_flex_on_cpu
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_whole_model_compiles_fullgraph_with_flex(family):
    # flex needs AOT autograd to lower its higher-order op; swin's bias is a graph input here
    torch._dynamo.reset()
    model, x = build(family)
    with torch.no_grad():
        ref = model(x)
    attnswap.patch(model, backend="flex")
    outs, counter = _compiled_twice(model, x, "aot_eager")
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1
    traced = {name for site in attnswap.stats(model) for name in site.traced}
    if not FLEX_ON_CPU_IN_GRAPH:
        assert_traced_with(attnswap.stats(model), "flex")
    elif family == "vit":
        assert traced == {"flex"}
    else:
        # Swin's bias is computed inside the graph: CPU flex cannot take a bias made there, so
        # those calls fall back to sdpa in the graph, each with the reason
        assert traced == {"flex", "sdpa"} or traced == {"sdpa"}, traced
        reasons = [r for site in attnswap.stats(model) for f in site.fallbacks for r in f.refused["flex"]]
        assert reasons and all("inside a torch.compile graph on CPU" in r for r in reasons)
    torch._dynamo.reset()


def test_hand_written_attention_compiles_fullgraph_and_recompiles_no_more_than_unpatched():
    # documented limit: inside a compiled graph a hand-written site runs the module's own math.
    # LeViT's train() clears its bias cache, which recompiles the unpatched model too: the
    # guarantee is that patching adds no recompilation of its own.
    torch._dynamo.reset()
    model, x = build("levit")
    reference, _ = build("levit")
    with torch.no_grad():
        ref = model(x)
    _, unpatched_counter = _compiled_twice(reference, x, "eager")
    torch._dynamo.reset()
    attnswap.patch(model, backend="eager")
    outs, counter = _compiled_twice(model, x, "eager")
    for out in outs:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert counter.frame_count == unpatched_counter.frame_count
    torch._dynamo.reset()


@pytest.mark.parametrize("family, backend, op", [
    ("vit", "sdpa", "aten.scaled_dot_product_attention.default"),
    ("swin", "sdpa", "aten.scaled_dot_product_attention.default"),
    ("beit", "eager", "aten.softmax.int"),
    # a pinned kernel exports as its own operator: the pin survives export (it did not with sdpa_kernel)
    ("vit", "sdpa_flash", "aten._scaled_dot_product_flash_attention_for_cpu.default"),
    ("swin", "sdpa_math", "aten._scaled_dot_product_attention_math.default"),
])
def test_export_records_the_chosen_backend(family, backend, op):
    model, x = build(family)
    with torch.no_grad():
        ref = model(x)
    attnswap.patch(model, backend=backend)
    program = torch.export.export(model, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert op in ops
    if backend == "eager":
        assert not any("scaled_dot_product" in o for o in ops), "the eager backend must not export SDPA"
    if backend.startswith("sdpa_"):
        assert "aten.scaled_dot_product_attention.default" not in ops, "a pinned kernel must not export as plain SDPA"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref, atol=2e-5, rtol=1e-4)
    assert attnswap.stats(model)[0].traced == {backend: 1}


def test_jit_script_of_a_patched_model_raises_and_unpatched_scripts():
    model, x = build("vit")
    torch.jit.script(model)  # timm's ViT scripts when unpatched
    attnswap.patch(model, backend="sdpa_math")
    with pytest.raises(attnswap.NotScriptable, match=r"unpatch\(model\)") as caught:
        torch.jit.script(model)
    assert "Attention" in str(caught.value) and "'sdpa_math'" in str(caught.value)
    with pytest.raises(attnswap.NotScriptable):
        torch.jit.script(model.blocks[0])
    assert attnswap.is_patched(model), "a refused scripting leaves the patch in place"
    attnswap.unpatch(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_torchvision_fx_feature_extraction_keeps_routing():
    # torchvision's extractor cannot trace timm models even unpatched (control flow on shapes;
    # timm's own extractor handles them, tests/test_invariants.py). On torchvision's own ViT the
    # patched nn.MultiheadAttention stays a leaf of the trace and routes when the graph runs.
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the unpatched encoder's output, as torchvision's forward computes it
        ref = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1))
    attnswap.patch(model, backend="sdpa_math")
    extractor = create_feature_extractor(model, return_nodes={"encoder.ln": "out"})
    assert "scaled_dot_product_attention" not in extractor.code
    attnswap.stats(model, reset=True)
    with torch.no_grad():
        out = extractor(x)["out"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attnswap.stats(model).by_backend() == {"sdpa_math": 2}
