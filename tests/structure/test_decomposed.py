"""Decomposed relative position (SAM ViT, MViTv2): carried as its factors, materialized exactly.

Issue 13: the bias reaches the router as the small factors it is built from; a backend that
takes tensors gets exactly the tensor timm would have built (whole, or a slice of query rows
at a time); flex reads the factors in its kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnswap
from attnswap import forms
from attnswap.backends import eager_attention
from attnswap.routing import Policy, Router
from attnswap.structure import DecomposedRelPos, StructuredMask, replacement_for
from attnswap.structure import builders
from families import assert_same_grads, build, features
from versions import needs_flex_on_cpu

sam = pytest.importorskip("timm.models.vision_transformer_sam")


def factors_and_tables(dtype=torch.float64, grid=(5, 7), dim=8, batch=3, table=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    qh, qw = grid
    q = torch.randn(batch, qh * qw, dim, generator=g, dtype=dtype)
    th, tw = table or (2 * qh - 1, 2 * qw - 1)
    rel_h = torch.randn(th, dim, generator=g, dtype=dtype)
    rel_w = torch.randn(tw, dim, generator=g, dtype=dtype)
    return q, rel_h, rel_w


@pytest.mark.parametrize("table", [None, (5, 9)], ids=["table fits", "table interpolated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sam_structure_materializes_exactly_timms_bias(table, dtype):
    original = sam.get_decomposed_rel_pos_bias
    replacement, kind = replacement_for(original)
    assert kind == "decomposed_rel_pos"
    q, rel_h, rel_w = factors_and_tables(dtype, table=table)
    expected = original(q, rel_h, rel_w, (5, 7), (5, 7))
    structure = replacement(q, rel_h, rel_w, (5, 7), (5, 7))
    assert isinstance(structure, DecomposedRelPos)
    assert structure.shape == expected.shape and structure.dtype == expected.dtype
    assert torch.equal(structure.materialize(), expected), "bit for bit what timm builds"
    fresh = replacement(q, rel_h, rel_w, (5, 7), (5, 7))
    for start, stop in [(0, 35), (0, 1), (7, 20), (34, 35)]:
        assert torch.equal(fresh.rows(start, stop), expected[..., start:stop, :])
    assert fresh._tensor is None, "rows() never builds the whole bias"


def test_replacement_calls_timm_while_compiling_or_on_other_tensor_types(monkeypatch):
    replacement, _ = replacement_for(sam.get_decomposed_rel_pos_bias)
    q, rel_h, rel_w = factors_and_tables()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    from attnswap.structure import timm as timm_room

    monkeypatch.setattr(timm_room, "_is_compiling", lambda: True)
    out = replacement(q, rel_h, rel_w, (5, 7), (5, 7))
    assert type(out) is torch.Tensor


def test_a_builder_whose_code_differs_keeps_building_its_tensor():
    namespace: dict = {}
    source = sam.__file__
    exec(  # same module and name as timm's builder, other code
        compile("def get_decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, q_size, k_size):\n    return q\n", source, "exec"),
        namespace,
    )
    impostor = namespace["get_decomposed_rel_pos_bias"]
    impostor.__module__ = sam.__name__
    assert replacement_for(impostor) is None
    assert "differs from the code" in builders.skipped[f"{sam.__name__}.get_decomposed_rel_pos_bias"]


def test_the_pinned_timm_builder_matches_the_registered_fingerprint():
    """Moving the timm pin past a change of this builder must be a deliberate commit."""
    assert replacement_for(sam.get_decomposed_rel_pos_bias) is not None  # (loads timm's room)
    known = builders._builders[f"{sam.__name__}.get_decomposed_rel_pos_bias"].fingerprint
    assert builders.fingerprint(sam.get_decomposed_rel_pos_bias) == known


def test_anything_but_the_router_gets_the_tensor():
    q, rel_h, rel_w = factors_and_tables()
    replacement, _ = replacement_for(sam.get_decomposed_rel_pos_bias)
    expected = sam.get_decomposed_rel_pos_bias(q, rel_h, rel_w, (5, 7), (5, 7))
    scores = torch.randn(expected.shape, dtype=expected.dtype)
    for use in (
        lambda s: scores + s,
        lambda s: s + scores,
        lambda s: torch.add(scores, s),
        lambda s: s.to(torch.float32),
        lambda s: torch.cat([s, s]),
        lambda s: s.sum(),
        lambda s: s[0],
    ):
        structure = replacement(q, rel_h, rel_w, (5, 7), (5, 7))
        assert torch.equal(use(structure), use(expected))
        assert "outside the attention call" in structure.materialized_by
    structure = replacement(q, rel_h, rel_w, (5, 7), (5, 7))
    assert structure.shape == expected.shape and structure.dim() == 3 and structure.size(-1) == 35
    assert structure._tensor is None, "shape, dtype and dim() are known without building the tensor"


def _call(dtype=torch.float64, grid=(6, 5), heads=4, dim=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(heads, n, dim, generator=g, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    rel_h = torch.randn(heads, n, grid[0], generator=g, dtype=dtype, requires_grad=requires_grad)
    rel_w = torch.randn(heads, n, grid[1], generator=g, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("rows", [False, True], ids=["whole", "by rows"])
def test_router_gives_tensor_backends_the_exact_bias(backend, rows, monkeypatch):
    if rows:  # a budget of a few rows: every call is served a slice at a time
        monkeypatch.setattr(forms, "MATERIALIZE_BUDGET", 4 * 30 * 8 * 8)
        monkeypatch.setattr(forms, "MIN_ROWS", 8)
    q, k, v, rel_h, rel_w = _call(requires_grad=True)
    if backend == "sdpa_flash":  # its CPU kernel has no gradient for a mask (refused, tested elsewhere)
        rel_h, rel_w = rel_h.detach(), rel_w.detach()
    structure = DecomposedRelPos(rel_h, rel_w)
    router = Router(Policy(backend, (), True), site="t")
    out = router.route(q, k, v, attn_mask=structure)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.flatten(-2))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (tally,) = router.tallies()
    form = forms.FORM_ROWS if rows else forms.FORM_WHOLE
    assert tally.structure == ("decomposed_rel_pos", form)
    assert (structure._tensor is None) is rows, "by rows, the whole bias never exists"
    inputs = [t for t in (q, k, v, rel_h, rel_w) if t.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_row_slices_follow_the_budget():
    from attnswap.call import facts_of

    q, k, v, rel_h, rel_w = _call(dtype=torch.float32, grid=(64, 64), heads=12, dim=4)
    facts = facts_of(q, k, v, DecomposedRelPos(rel_h, rel_w))
    assert facts.structure == ("decomposed_rel_pos", (64, 64), 0)
    rows = forms.row_slice(facts)  # (12, 4096, 4096) float32: 805 MB whole
    assert rows % forms.MIN_ROWS == 0 and 12 * rows * 4096 * 4 <= forms.MATERIALIZE_BUDGET
    small = facts_of(*_call(dtype=torch.float32)[:3], DecomposedRelPos(*_call(dtype=torch.float32)[3:]))
    assert forms.row_slice(small) is None


@needs_flex_on_cpu
def test_flex_reads_the_factors():
    q, k, v, rel_h, rel_w = _call(dtype=torch.float32, grid=(6, 5))
    structure = DecomposedRelPos(rel_h, rel_w)
    router = Router(Policy("flex", (), True), site="t")
    with torch.no_grad():
        out = router.route(q, k, v, attn_mask=structure)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
        expected = eager_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    assert router.tallies()[0].structure == ("decomposed_rel_pos", forms.FORM_PARTS)
    assert structure._tensor is None


@needs_flex_on_cpu
def test_flex_on_cpu_refuses_factors_that_need_grad_and_the_fallback_gets_the_tensor():
    q, k, v, rel_h, rel_w = _call(dtype=torch.float32)
    rel_h.requires_grad_()  # an eval model run without no_grad: its tables require grad
    router = Router(Policy("flex", ("sdpa",), False), site="t")
    out = router.route(q, k, v, attn_mask=DecomposedRelPos(rel_h, rel_w))
    (tally,) = router.tallies()
    assert tally.backend == "sdpa" and any("backward" in r for r in dict(tally.tried)["flex"])
    assert tally.structure == ("decomposed_rel_pos", forms.FORM_WHOLE)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def _samvit(dtype=torch.float64):
    model, x = build("samvit", dtype)
    return model, x


def _builders_called(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ == "Attention" and getattr(m, "use_rel_pos", False))


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math"])
def test_samvit_forward_and_gradients_match_unpatched(backend):
    model, x = _samvit()
    assert any(bool(p.any()) for n, p in model.named_parameters() if "rel_pos" in n), "ungate gives the tables values"
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert {s.structures for s in report.patched} == {("decomposed_rel_pos",)}
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-9, atol=1e-12)
    stats = attnswap.stats(model)
    assert stats.structures() == {("decomposed_rel_pos", backend, forms.FORM_WHOLE): stats.total_calls}
    attnswap.unpatch(model)
    assert torch.equal(features(model, x), ref.detach())


@needs_flex_on_cpu
def test_samvit_on_flex_reads_factors_in_every_layer():
    model, x = _samvit(torch.float32)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    seen = attnswap.stats(model).structures()
    assert seen == {("decomposed_rel_pos", "flex", forms.FORM_PARTS): attnswap.stats(model).total_calls}


def test_samvit_under_compile_builds_its_tensor_and_does_not_recompile():
    import torch._dynamo

    model, x = _samvit(torch.float32)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="sdpa")
        torch._dynamo.reset()
        compiled = torch.compile(model.forward_features, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_samvit_fx_feature_extraction_still_routes():
    from timm.models import create_feature_extractor

    model, x = _samvit(torch.float32)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="sdpa_math")
        extractor = create_feature_extractor(model, return_nodes={"blocks.1": "out"})
        out = extractor(x)["out"]
    attnswap.stats(model, reset=True)
    with torch.no_grad():
        extractor(x)
    assert attnswap.stats(model).by_backend() == {"sdpa_math": 2}
    assert out.shape[0] == x.shape[0]
    del ref


def test_auto_times_structured_calls_without_touching_the_models_gradients(tmp_path):
    model, x = _samvit(torch.float32)
    attnswap.patch(model, backend="auto", candidates=["sdpa", "eager"])
    out = features(model, x)
    assert all(p.grad is None for p in model.parameters()), "tuning ran backward on detached parts only"
    out.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "rel_pos" in n)
    assert set(k[0] for k in attnswap.stats(model).structures()) == {"decomposed_rel_pos"}


def test_structure_repr_and_signature():
    q, k, v, rel_h, rel_w = _call(dtype=torch.float32)
    s = DecomposedRelPos(rel_h, rel_w)
    assert isinstance(s, StructuredMask)
    assert "decomposed_rel_pos" in repr(s) and s.nbytes == 4 * 30 * 30 * 4
    assert s.signature() != DecomposedRelPos(rel_h[..., :3], torch.cat([rel_w, rel_w[..., :2]], -1)).signature()


def _maskless(registered, name, equal_head_dims=False):
    served = []

    def kernel(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        served.append((q.shape[-1], v.shape[-1], scale))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)

    def supports(f):
        out = ["no attn_mask"] if f.has_mask else []
        if equal_head_dims and f.v_head_dim != f.head_dim:
            out.append("v head dim must equal q/k head dim")
        return out

    registered(name, kernel, supports=supports)
    return served


@pytest.mark.parametrize("equal_head_dims", [False, True], ids=["v as is", "v padded"])
def test_a_kernel_without_bias_support_computes_decomposed_rel_pos_exactly(registered, equal_head_dims):
    served = _maskless(registered, "nobias", equal_head_dims)
    q, k, v, rel_h, rel_w = _call(requires_grad=True, grid=(6, 5), dim=8)
    router = Router(Policy("nobias", (), True), site="t")
    out = router.route(q, k, v, attn_mask=DecomposedRelPos(rel_h, rel_w), scale=0.3)
    form = forms.FORM_EXTENDED_PAD_V if equal_head_dims else forms.FORM_EXTENDED
    assert router.tallies()[0].structure == ("decomposed_rel_pos", form)
    e = 8 + 6 + 5
    aligned = -(-e // 8) * 8
    assert served == [(aligned, aligned if equal_head_dims else 8, 1.0)]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rel_h, rel_w))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, rel_h, rel_w))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(attnswap.UnsupportedCall):  # the same bias as a tensor: refused, as before
        router.route(q, k, v, attn_mask=bias)


def test_samvit_on_a_kernel_without_bias_support_matches_unpatched(registered):
    _maskless(registered, "nobias_sam", equal_head_dims=True)
    model, x = _samvit()
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend="nobias_sam", strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-11)
    assert set(attnswap.stats(model).structures()) == {("decomposed_rel_pos", "nobias_sam", forms.FORM_EXTENDED_PAD_V)}


# -- a class token before the grid (MViTv2) ------------------------------------------------------


def _prefixed(prefix=1, grid=(4, 3), heads=2, dim=8, requires_grad=False):
    g = torch.Generator().manual_seed(5)
    n = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(2, heads, n, dim, generator=g, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3))
    rel_h = torch.randn(2, heads, n - prefix, grid[0], generator=g, dtype=torch.float64, requires_grad=requires_grad)
    rel_w = torch.randn(2, heads, n - prefix, grid[1], generator=g, dtype=torch.float64, requires_grad=requires_grad)
    bias = torch.nn.functional.pad((rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2), [prefix, 0, prefix, 0])
    return q, k, v, rel_h, rel_w, bias


def test_a_prefix_has_zero_rows_and_columns_whole_and_by_rows():
    *_, rel_h, rel_w, bias = _prefixed(prefix=2)
    structure = DecomposedRelPos(rel_h, rel_w, prefix=2)
    assert structure.shape == bias.shape and structure.layout() == ("decomposed_rel_pos", (4, 3), 2)
    for start, stop in [(0, 1), (0, 2), (1, 5), (2, 14), (5, 14), (0, 14)]:
        assert torch.equal(structure.rows(start, stop), bias[..., start:stop, :]), (start, stop)
    assert structure._tensor is None
    assert torch.equal(structure.materialize(), bias)


@pytest.mark.parametrize("equal_head_dims", [False, True], ids=["v as is", "v padded"])
def test_a_kernel_without_bias_support_computes_a_prefixed_bias_exactly(registered, equal_head_dims):
    _maskless(registered, "nobias_prefix", equal_head_dims)
    q, k, v, rel_h, rel_w, bias = _prefixed(requires_grad=True)
    router = Router(Policy("nobias_prefix", (), True), site="t")
    out = router.route(q, k, v, attn_mask=DecomposedRelPos(rel_h, rel_w, prefix=1), scale=0.4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rel_h, rel_w))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, rel_h, rel_w))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@needs_flex_on_cpu
def test_flex_reads_prefixed_factors():
    q, k, v, rel_h, rel_w, bias = (t.float() for t in _prefixed(heads=2, grid=(4, 4)))
    router = Router(Policy("flex", (), True), site="t")
    with torch.no_grad():
        out = router.route(q, k, v, attn_mask=DecomposedRelPos(rel_h, rel_w, prefix=1))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert router.tallies()[0].structure == ("decomposed_rel_pos", forms.FORM_PARTS)


mvitv2 = pytest.importorskip("timm.models.mvitv2")


def test_the_pinned_mvitv2_helper_matches_the_registered_fingerprint():
    assert builders.additive_bias_for(mvitv2.cal_rel_pos_type) is not None
    known = builders._additive_builders["timm.models.mvitv2.cal_rel_pos_type"].fingerprint
    assert builders.fingerprint(mvitv2.cal_rel_pos_type) == known


def test_mvitv2_factors_are_the_term_timm_adds():
    g = torch.Generator().manual_seed(0)
    for has_cls, q_size, k_size in [(True, (8, 8), (4, 4)), (False, (4, 4), (8, 8)), (True, (6, 6), (6, 6))]:
        p = int(has_cls)
        q = torch.randn(2, 3, p + q_size[0] * q_size[1], 8, generator=g, dtype=torch.float64)
        size = max(q_size[0], k_size[0])
        tables = [torch.randn(2 * size - 1, 8, generator=g, dtype=torch.float64) for _ in range(2)]
        scores = torch.zeros(2, 3, q.shape[2], p + k_size[0] * k_size[1], dtype=torch.float64)
        expected = mvitv2.cal_rel_pos_type(scores.clone(), q, has_cls, q_size, k_size, *tables)
        structure = builders.additive_bias_for(mvitv2.cal_rel_pos_type)(scores, q, has_cls, q_size, k_size, *tables)
        assert structure.prefix == p and structure.shape == expected.shape
        assert torch.equal(structure.materialize(), expected)


def _grads_match(model, ref_model):
    # (norm_k's bias shifts every key alike: softmax cancels it, its gradient is rounding noise
    # around 1e-17, hence an absolute tolerance)
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math"])
def test_mvitv2_forward_and_gradients_match_unpatched(backend):
    model, x = build("mvitv2", torch.float64)
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend=backend, strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    out.square().sum().backward()
    _grads_match(model, ref_model)
    stats = attnswap.stats(model)
    assert stats.structures() == {("decomposed_rel_pos", backend, forms.FORM_WHOLE): stats.total_calls}


def test_mvitv2_on_a_kernel_without_bias_support_matches_unpatched(registered):
    _maskless(registered, "nobias_mvit", equal_head_dims=True)
    model, x = build("mvitv2", torch.float64)
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend="nobias_mvit", strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    _grads_match(model, ref_model)
    assert set(attnswap.stats(model).structures()) == {("decomposed_rel_pos", "nobias_mvit", forms.FORM_EXTENDED_PAD_V)}


@needs_flex_on_cpu
def test_mvitv2_on_flex_reads_factors():
    model, x = build("mvitv2")
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    stats = attnswap.stats(model)
    assert stats.structures() == {("decomposed_rel_pos", "flex", forms.FORM_PARTS): stats.total_calls}


# -- BoTNet and HaloNet: the logits PosEmbedRel adds ---------------------------------------------

bottleneck_attn = pytest.importorskip("timm.layers.bottleneck_attn")
halo_attn = pytest.importorskip("timm.layers.halo_attn")
POS_EMBEDS = {"botnet": bottleneck_attn.PosEmbedRel, "halonet": halo_attn.PosEmbedRel}


@pytest.mark.parametrize("family", list(POS_EMBEDS))
def test_pos_embed_rel_factors_are_timms_logits(family):
    cls = POS_EMBEDS[family]
    replacement, kind = builders.method_replacements_for(cls)["forward"]  # (loads timm's room)
    known = builders._method_builders[(f"{cls.__module__}.PosEmbedRel", "forward")].fingerprint
    assert builders.fingerprint(cls.forward) == known
    model, _ = build(family, torch.float64)
    captured = []
    for m in model.modules():
        if type(m) is cls:
            m.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0])))
    with torch.no_grad():
        features(model, _)
    assert captured and kind == "decomposed_rel_pos"
    for module, q in captured:
        expected = cls.forward(module, q)
        structure = replacement(module, q)
        assert isinstance(structure, DecomposedRelPos) and structure.shape == expected.shape
        assert torch.equal(structure.materialize(), expected), "bit for bit"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(POS_EMBEDS))
def test_botnet_and_halonet_forward_and_gradients_match_unpatched(family, backend):
    model, x = build(family, torch.float64)
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert report.bias_sources and all(kinds == ("decomposed_rel_pos",) for _, kinds in report.bias_sources)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    out.square().sum().backward()
    _grads_match(model, ref_model)
    stats = attnswap.stats(model)
    assert stats.structures() == {("decomposed_rel_pos", backend, forms.FORM_WHOLE): stats.total_calls}
    attnswap.unpatch(model)
    assert not any(type(m).__module__.startswith("attnswap") for m in model.modules())


@pytest.mark.parametrize("family", list(POS_EMBEDS))
def test_botnet_and_halonet_on_a_kernel_without_bias_support(registered, family):
    _maskless(registered, f"nobias_{family}", equal_head_dims=False)
    model, x = build(family, torch.float64)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend=f"nobias_{family}", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert set(attnswap.stats(model).structures()) == {("decomposed_rel_pos", f"nobias_{family}", forms.FORM_EXTENDED)}


@needs_flex_on_cpu
@pytest.mark.parametrize("family", list(POS_EMBEDS))
def test_botnet_and_halonet_on_flex_read_factors(family):
    model, x = build(family)
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    stats = attnswap.stats(model)
    assert stats.structures() == {("decomposed_rel_pos", "flex", forms.FORM_PARTS): stats.total_calls}
