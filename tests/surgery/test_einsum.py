"""Hand-written attention written with ``torch.einsum``: the scores einsum becomes symbolic scores
like ``q @ kᵀ``, the einsum with v the router call, in whatever layout the module writes
(spaces, ``...``, channels first, multi-query k/v without a head letter, the list form); any
other einsum is the einsum itself, and the output always equals the module's own."""


import pytest
import torch
from torch import nn

import attnswap
from families import assert_patched_parity

#: (scores einsum, P·v einsum, q shape, k shape, v shape, scale)
FORMS = {
    "bhid": ("bhid,bhjd->bhij", "bhij,bhjd->bhid", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), 8**-0.5),
    "spaces, 5-D (torchvision MaxViT)": (
        "B G H I D, B G H J D -> B G H I J", "B G H I J, B G H J D -> B G H I D",
        (2, 2, 3, 5, 8), (2, 2, 3, 5, 8), (2, 2, 3, 5, 8), 1.0),
    "ellipsis": ("...id,...jd->...ij", "...ij,...jd->...id", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), 0.5),
    "channels first (diffusers AttentionPooling)": ("bct,bcs->bts", "bts,bcs->bct", (2, 8, 5), (2, 8, 7), (2, 6, 7), 8**-0.5),
    "heads after tokens (transformers Funnel)": ("bind,bjnd->bnij", "bnij,bjnd->bind", (2, 5, 3, 8), (2, 7, 3, 8), (2, 7, 3, 4), 0.3),
    "multi-query, k/v without heads (timm MQA v2)": ("bnhk,bmk->bnhm", "bnhm,bmv->bnhv", (2, 5, 3, 8), (2, 7, 8), (2, 7, 4), 1.0),
}


def einsum_attention(scores_eq, probs_eq, scale, as_list=False):
    class EinsumAttention(nn.Module):
        def forward(self, q, k, v):
            attn = torch.einsum(scores_eq, [q, k]) if as_list else torch.einsum(scores_eq, q, k)
            attn = (attn * scale).softmax(dim=-1)
            return torch.einsum(probs_eq, attn, v)

    return EinsumAttention()


@pytest.mark.parametrize("as_list", [False, True], ids=["operands", "list"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "eager"])
def test_einsum_attention_is_routed_and_exact(form, backend, as_list):
    scores_eq, probs_eq, qs, ks, vs, scale = FORMS[form]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in (qs, ks, vs))
    module = einsum_attention(scores_eq, probs_eq, scale, as_list)
    ref = module(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    report = attnswap.patch(module, backend=backend, strict=True)
    assert report.patched and report.patched[0].how == "hand-written"
    out = module(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous() and out.shape == ref.shape
    for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    stats = attnswap.stats(module)
    assert stats.by_backend() == {backend: 1} and not stats[0].unrouted


@pytest.mark.parametrize(
    "scores_eq, probs_eq, routed",
    [
        ("bhid,bhjd->bhji", "bhji,bhid->bhjd", False),  # keys before queries in the output: not q·kᵀ's layout
        ("bhid,bhjd->bhij", "bhij,bhjd->bhdi", True),  # P·v returned transposed: routed, then permuted
        ("bhid,bhjd->bij", "bij,bhjd->bid", False),  # heads summed away with d
    ],
)
def test_other_einsum_layouts_compute_what_the_module_computes(scores_eq, probs_eq, routed):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    module = einsum_attention(scores_eq, probs_eq, 0.3)
    ref = module(q, k, v)
    attnswap.patch(module, backend="sdpa")
    torch.testing.assert_close(module(q, k, v), ref, rtol=1e-12, atol=1e-12)
    (site,) = attnswap.stats(module)
    if routed:
        assert site.calls == {"sdpa": 1} and not site.unrouted
    else:  # computed as written, and counted with the reason
        assert not site.calls and list(site.unrouted) == [f"einsum {scores_eq!r} is not q·kᵀ in a layout attention can take"]


def test_timm_multi_query_attention_v2_routes():
    from timm.layers.attention2d import MultiQueryAttentionV2

    torch.manual_seed(0)
    module = MultiQueryAttentionV2(16, 16, num_heads=2).double().eval()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    ref = module(x)
    report = attnswap.patch(module, backend="sdpa_math", strict=True)
    (site,) = report.sites
    assert site.status == "patched" and site.how == "hand-written"
    torch.testing.assert_close(module(x), ref, rtol=1e-12, atol=1e-12)
    assert attnswap.stats(module).by_backend() == {"sdpa_math": 1}


def small_maxvit():
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    return MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=10,
    )


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_torchvision_maxvit_is_fully_routed_with_gradients(backend):
    pytest.importorskip("torchvision")
    model = small_maxvit().double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_patched_parity(model, x, backend, sites=4, how="hand-written")


def test_torchvision_maxvit_runs_no_softmax_of_its_own_on_sdpa():
    """Counted below attnswap, in ATen: unpatched, one softmax per attention; patched, none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSoftmax(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int)
            return func(*args, **(kwargs or {}))

    pytest.importorskip("torchvision")
    model = small_maxvit().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with CountSoftmax() as unpatched:
            model(x)
        attnswap.patch(model, backend="sdpa")
        with CountSoftmax() as patched:
            model(x)
    assert unpatched.count == 4 and patched.count == 0
