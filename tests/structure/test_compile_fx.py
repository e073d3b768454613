"""Every structure kind under torch.compile(fullgraph=True) and timm's fx feature extraction: while a
graph is traced, the builders run timm's own code, so graphs hold the tensor they always held, nothing
computed at trace time is baked in, nothing recompiles, and the routers still route."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import attnswap
from families import build, features

#: family -> (structure kinds its eager forward carries, training mode)
FAMILIES = {
    "swin": ({"table_gather", "window_segments"}, False),
    "beit": ({"table_gather"}, False),
    "maxvit": ({"table_gather"}, False),
    "vit_relpos": ({"table_gather"}, False),
    "levit": ({"table_gather"}, True),
    "samvit": ({"decomposed_rel_pos"}, False),
    "mvitv2": ({"decomposed_rel_pos"}, False),
    "botnet": ({"decomposed_rel_pos"}, False),
    "halonet": ({"decomposed_rel_pos"}, False),
    "swinv2": ({"window_segments"}, False),
}


def _model(family):
    model, x = build(family)
    if FAMILIES[family][1]:  # builders that carry a structure in training only; no batch statistics
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model, x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_structures_in_eager_and_compiled_once_in_a_graph(family):
    kinds, _ = FAMILIES[family]
    model, x = _model(family)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="sdpa")
        eager = features(model, x)
        assert {k[0] for k in attnswap.stats(model).structures()} == kinds
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
        compiled = torch.compile(model.forward_features, fullgraph=True, backend=counter)
        outs = [compiled(x), compiled(x)]
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} frames for one input signature"
    torch._dynamo.reset()


@pytest.mark.parametrize("family, routed", [
    ("swin", True), ("vit_relpos", True), ("maxvit", True),
    # hand-written attention in a traced graph runs the module's own math (README, Limitations)
    ("mvitv2", False), ("botnet", False), ("swinv2", False),
])
def test_fx_feature_extraction_holds_the_tensor_and_routes(family, routed):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model, x = _model(family)
    node = get_graph_node_names(model)[1][-1]
    with torch.no_grad():
        ref = create_feature_extractor(model, return_nodes=[node])(x)[node]
    attnswap.patch(model, backend="sdpa_math")
    extractor = create_feature_extractor(model, return_nodes=[node])
    assert "scaled_dot_product_attention" not in extractor.code
    attnswap.stats(model, reset=True)
    with torch.no_grad():
        out = extractor(x)[node]
        again = extractor(x)[node]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again)
    stats = attnswap.stats(model)
    if routed:
        assert stats.total_calls and stats.by_backend().keys() == {"sdpa_math"}
    assert not stats.structures(), "a traced graph holds the tensor, never a structure made at trace time"
