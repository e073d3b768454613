"""torchvision's attention models beyond nn.MultiheadAttention: MViT v1 (hand-written in its own
method) and MViT v2 (its decomposed rel-pos written into the scores in place by the module-level
``_add_rel_pos``, a known additive helper). MaxViT's einsum attention: tests/surgery/test_einsum.py."""

import copy

import pytest
import torch

import attnswap
from families import assert_same_grads

mvit = pytest.importorskip("torchvision.models.video.mvit")


def small_mvit(v2: bool):
    torch.manual_seed(0)
    blocks = [
        mvit.MSBlockConfig(num_heads=1, input_channels=16, output_channels=16, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                           stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
        mvit.MSBlockConfig(num_heads=2, input_channels=16, output_channels=32, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                           stride_q=[1, 2, 2], stride_kv=[1, 1, 1]),
    ]
    model = mvit.MViT(
        spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=v2, residual_with_cls_embed=not v2,
        rel_pos_embed=v2, proj_after_attn=v2, num_classes=10,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:  # zeros at init: make the bias matter
                p.normal_(std=0.5)
    return model.double().eval()


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "eager"])
@pytest.mark.parametrize("v2", [False, True], ids=["mvit v1", "mvit v2 (_add_rel_pos)"])
def test_mvit_routes_every_call_with_gradients(v2, backend):
    model = small_mvit(v2)
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    ref = ref_model(x)
    ref.square().sum().backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert len(report.patched) == 2 and all(s.how == "hand-written" for s in report.patched)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-9, atol=1e-12)
    stats = attnswap.stats(model)
    assert stats.by_backend() == {backend: 2} and not any(s.unrouted for s in stats)
    attnswap.unpatch(model)
    assert torch.equal(model(x), ref.detach())
