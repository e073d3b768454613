"""Table-gather biases (BEiT, Swin v1, MaxViT's RelPosBias, RelPosBiasTf and RelPosMlp, the LeViT family's
attention biases): the table and its index travel instead of the [1, H, N, N] bias; flex gathers per score,
every other backend gets timm's tensor."""

from __future__ import annotations

import copy

import pytest
import torch

import attnswap
from attnswap import forms
from attnswap.structure import builders
from attnswap.structure.table import TableGather
from attnswap.models import ungate
from families import build as build_family, features
from versions import needs_flex_on_cpu

beit = pytest.importorskip("timm.models.beit")
swin = pytest.importorskip("timm.models.swin_transformer")
pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
tiny_vit = pytest.importorskip("timm.models.tiny_vit")
levit = pytest.importorskip("timm.models.levit")

#: family -> (class that builds the bias, its builder method)
BUILDERS = {
    "beit": (beit.Attention, "_get_rel_pos_bias"),
    "swin": (swin.WindowAttention, "_get_rel_pos_bias"),
    "maxvit": (pos_embed_rel.RelPosBias, "get_bias"),
    "vit_relpos": (pos_embed_rel.RelPosMlp, "get_bias"),
    "vit_relpos_swin_cls": (pos_embed_rel.RelPosMlp, "get_bias"),
    "maxvit_tf": (pos_embed_rel.RelPosBiasTf, "get_bias"),
    "tiny_vit": (tiny_vit.Attention, "get_attention_biases"),
    "levit": (levit.Attention, "get_attention_biases"),
}
#: families not in families.py (tiny configurations of the other builders' models)
EXTRA = {
    # RelPosMlp in Swin v2's mode (16·sigmoid) with a class token: zero bias rows and columns
    "vit_relpos_swin_cls": (
        "vit_relpos_base_patch16_clsgap_224",
        dict(img_size=64, depth=2, embed_dim=64, num_heads=2, rel_pos_type="mlp_swin"), (2, 3, 64, 64),
    ),
    "maxvit_tf": ("maxvit_tiny_tf_224", dict(img_size=64, embed_dim=(32, 64, 64, 64), depths=(1, 1, 1, 1)), (1, 3, 64, 64)),
}
#: builders timm only runs per call in training mode (in eval it reuses a gathered tensor)
TRAINING_ONLY = {"tiny_vit", "levit"}


def build(family, dtype=torch.float32):
    if family not in EXTRA:
        return build_family(family, dtype)
    import timm

    name, kwargs, shape = EXTRA[family]
    torch.manual_seed(0)
    model = ungate(timm.create_model(name, pretrained=False, **kwargs)).eval().to(dtype)
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def mode(model, family):
    """The mode the family's builder makes structures in. Training with batch norm on running
    statistics: batch statistics over LeViT's last 2×2 maps at batch 2 amplify float32 rounding
    (1e-4 to 2.6 over four blocks), which would drown any comparison. (Drop rates are all 0.)"""
    if family in TRAINING_ONLY:
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


@pytest.mark.parametrize("family", list(BUILDERS))
def test_pinned_timm_methods_match_their_fingerprints(family):
    cls, method = BUILDERS[family]
    target = f"{cls.__module__}.{cls.__qualname__}"
    assert method in builders.method_replacements_for(cls)  # (loads timm's room)
    known = builders._method_builders[(target, method)].fingerprint
    assert builders.fingerprint(getattr(cls, method)) == known


@pytest.mark.parametrize("family", list(BUILDERS))
def test_structure_materializes_exactly_timms_bias_and_gathers_the_same_values(family):
    cls, method = BUILDERS[family]
    model, _ = build(family)
    mode(model, family)
    attn = next(m for m in model.modules() if type(m) is cls)
    args = (torch.device("cpu"),) if method == "get_attention_biases" else ()
    expected = getattr(cls, method)(attn, *args)
    replacement, kind = builders.method_replacements_for(cls)[method]
    structure = replacement(attn, *args)
    assert kind == "table_gather" and isinstance(structure, TableGather)
    assert structure.shape == expected.shape and structure.requires_grad == expected.requires_grad
    with torch.no_grad():
        assert not replacement(attn, *args).requires_grad and not getattr(cls, method)(attn, *args).requires_grad
    # the rule flex reads it by, table[index[q * N + kv], h] (zero in prefix rows/columns)
    torch.testing.assert_close(structure.gather(), expected, rtol=0, atol=1e-6 if family == "vit_relpos_swin_cls" else 0)
    assert torch.equal(structure.materialize(), expected)
    if family == "vit_relpos_swin_cls":
        assert structure.prefix == 1 and not expected[..., 0, :].any() and not expected[..., :, 0].any()


def test_eval_mode_attention_biases_stay_timms_cached_tensor():
    model, _ = build("levit")
    attn = next(m for m in model.modules() if type(m) is levit.Attention)
    replacement, _ = builders.method_replacements_for(levit.Attention)["get_attention_biases"]
    first = replacement(attn, torch.device("cpu"))
    assert type(first) is torch.Tensor and replacement(attn, torch.device("cpu")) is first, "timm's per-device cache"


def test_relpos_mlp_runs_its_mlp_once_per_call_even_with_dropout():
    """A training RelPosMlp draws dropout in its MLP: a tensor built by calling timm again would
    use another draw than the table a kernel reads."""
    mlp = pos_embed_rel.RelPosMlp((3, 4), num_heads=2, mode="swin", prefix_tokens=1).train()
    calls = []
    mlp.mlp.register_forward_hook(lambda *_: calls.append(1))
    replacement, _ = builders.method_replacements_for(pos_embed_rel.RelPosMlp)["get_bias"]
    torch.manual_seed(3)
    structure = replacement(mlp)
    after = torch.rand(1)
    tensor = structure.materialize()
    assert len(calls) == 1 and tensor.shape == (1, 2, 13, 13)
    torch.testing.assert_close(structure.gather(), tensor, rtol=0, atol=1e-6)
    torch.manual_seed(3)
    assert torch.equal(pos_embed_rel.RelPosMlp.get_bias(mlp), tensor), "timm's own call, same draw"
    assert torch.equal(torch.rand(1), after), "and the random stream advanced as timm's call advances it"


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_forward_and_table_gradients_match_unpatched(family, backend):
    model, x = build(family, torch.float64)
    mode(model, family)
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():  # swin v1 runs its non-fused path unpatched: compare with its fused one
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend=backend, strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    tables = 0
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
        tables += any(part in name for part in ("relative_position_bias_table", "attention_biases", "rel_pos."))
    assert tables
    seen = attnswap.stats(model).structures()
    windows = {("window_segments", backend, forms.FORM_WHOLE)} if family == "swin" else set()  # (test_windows)
    assert set(seen) == {("table_gather", backend, forms.FORM_WHOLE)} | windows


@needs_flex_on_cpu
@pytest.mark.parametrize("family", list(BUILDERS))
def test_flex_gathers_from_the_table(family):
    model, x = build(family)
    mode(model, family)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    parts = {k: n for k, n in attnswap.stats(model).structures().items() if k[2] == forms.FORM_PARTS}
    assert ("table_gather", "flex", forms.FORM_PARTS) in parts
    assert all(k[:2] in {("table_gather", "flex"), ("window_segments", "flex")} for k in parts)
