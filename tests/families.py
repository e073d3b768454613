"""One small timm model per attention class family that calls SDPA (map categories A and A*).

Each entry: (timm model name, kwargs that shrink it, input shape). Sizes are chosen so a
forward runs in well under a second on 2 CPU cores while every attention code path
(bias, mask, q_len != kv_len, GQA/MQA, 3-D/5-D, v head dim != qk) is still exercised.
"""

from __future__ import annotations

import torch

from attnswap.models import ungate
from versions import skip_unless_in_timm

FAMILIES: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    # L.attention.Attention (+ AttentionPoolLatent via global_pool='map')
    "vit": ("test_vit", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    "vit_map_pool": ("test_vit3", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    # M.vision_transformer.ParallelScalingBlock / DiffParallelScalingBlock (attention inline in the block)
    "vit_parallel_scaling": (
        "vit_base_patch16_xp_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), (2, 3, 64, 64)),
    "vit_diff_parallel": (
        "vit_dpwee_patch16_reg1_gap_256", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), (2, 3, 64, 64)),
    # L.diff_attention.DiffAttention: two SDPA calls, v head dim = 2x qk
    "vit_diff_attention": (
        "vit_dwee_patch16_reg1_gap_256", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), (2, 3, 64, 64)),
    # M.vision_transformer_relpos.RelPosAttention: additive rel-pos bias
    "vit_relpos": ("test_vit_relpos", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    # M.eva.EvaAttention: rope forward arg
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), (2, 3, 56, 56)),
    # L.attention.AttentionRope (eva.py's rope ViTs)
    "vit_rope": (
        "vit_base_patch16_rope_reg1_gap_256", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), (2, 3, 64, 64)),
    # M.beit.Attention: per-layer rel-pos bias as attn_mask
    "beit": ("beit_base_patch16_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), (2, 3, 64, 64)),
    # M.pvt_v2.Attention: spatial-reduction kv (q_len != kv_len)
    "pvt_v2": ("pvt_v2_b0", dict(), (1, 3, 64, 64)),
    # M.maxxvit.Attention2d / AttentionCl: rel-pos bias (H, N, N)
    "maxvit": ("test_maxvit", dict(), (1, 3, 160, 160)),
    # M.hiera.MaskUnitAttention: 5-D tensors, pooled q
    "hiera": ("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 1, 1, 1)), (1, 3, 224, 224)),
    # M.hieradet_sam2.MultiScaleAttention: q pooling
    "hieradet_sam2": ("sam2_hiera_tiny", dict(embed_dim=32, stages=(1, 1, 2, 1), global_att_blocks=(3,)), (1, 3, 128, 128)),
    # M.davit.WindowAttention (ChannelAttention is manual: reported, not routed)
    "davit": ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), (1, 3, 64, 64)),
    # M.swin_transformer.WindowAttention (A*: SDPA path off by default): rel-pos bias + shift mask
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8)), (1, 3, 224, 224)),
    # M.vision_transformer_sam.Attention: 3-D (B*H, N, d) with decomposed rel-pos bias from q
    "samvit": (
        "samvit_base_patch16",
        dict(img_size=64, depth=2, embed_dim=64, num_heads=2, global_attn_indexes=(1,), window_size=2),
        (1, 3, 64, 64),
    ),
    # M.twins.LocallyGroupedAttn (5-D) and GlobalSubSampleAttn (q_len != kv_len)
    "twins_svt": ("twins_svt_small", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), (1, 3, 64, 64)),
    "twins_pcpvt": ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), (1, 3, 64, 64)),
    # M.nest.Attention: 5-D (B, H, T, N, d)
    "nest": ("nest_tiny", dict(img_size=64), (1, 3, 64, 64)),
    # L.attention2d.MultiQueryAttention2d: MQA, k/v with one head that broadcasts
    "mobilenetv4_hybrid": ("mobilenetv4_hybrid_medium", dict(), (1, 3, 64, 64)),
    # L.attention2d.MultiQueryAttention2d in MobileNetV5 (MQA with kv stride), at a quarter of the width
    "mobilenetv5": ("mobilenetv5_300m_enc", dict(channel_multiplier=0.25), (1, 3, 64, 64)),
    # M.xcit.XCA (A*: channel attention, scale=1) + M.cait.ClassAttn
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    # M.cait.ClassAttn (q_len 1); its TalkingHeadAttn is manual (reported, not routed)
    "cait": ("cait_xxs24_224", dict(img_size=64, depth=2), (2, 3, 64, 64)),
    # L.attention_pool2d.AttentionPool2d (q over N+1 tokens)
    "attention_pool2d": ("resnet50_clip", dict(img_size=64), (1, 3, 64, 64)),
    # M.tiny_vit.Attention: learned bias, v head dim != qk
    "tiny_vit": ("tiny_vit_5m_224", dict(embed_dims=(32, 64, 80, 96), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3)), (1, 3, 224, 224)),
    # M.iformer.SHMA: single head, v dim != qk dim
    "iformer": ("iformer_t", dict(), (1, 3, 64, 64)),
    # M.fastvit.Attention
    "fastvit_mci": ("fastvit_mci0", dict(), (1, 3, 64, 64)),
    # M.volo.Attention (A); ClassAttention is manual; OutlookAttention not expressible
    "volo": ("volo_d1_224", dict(img_size=64), (1, 3, 64, 64)),
    # M.cpubone.ConvAttention, M.lowformer.ConvAttention, M.metaformer.Attention, M.nextvit.EfficientAttention
    "cpubone": ("cpubone_b0_bfrobust", dict(), (1, 3, 64, 64)),
    "lowformer": ("lowformer_b0", dict(), (1, 3, 64, 64)),
    "caformer": ("caformer_s18", dict(), (1, 3, 64, 64)),
    "nextvit": ("nextvit_small", dict(), (1, 3, 64, 64)),
    # M.visformer.Attention (A*)
    "visformer": ("visformer_tiny", dict(img_size=64), (1, 3, 64, 64)),
    # M.gemma4_vit.Gemma4Attention: scale=1.0, rope_cos/rope_sin args, GQA via repeat
    "gemma4": ("gemma4_vit_167m", dict(depth=2, embed_dim=64, num_heads=2), (1, 3, 64, 64)),
}


#: one small model per hand-written attention class (map category B, and C's GPSA): their
#: ``q @ kᵀ`` products are deferred and routed (see attnswap.surgery.scores)
MANUAL_FAMILIES: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    # M.levit.Attention / AttentionDownsample: learned bias, v dim != qk, subsampled q
    "levit": ("levit_128s", dict(img_size=64), (2, 3, 64, 64)),
    # the same in conv mode: q.T @ k, then v @ attn.T
    "levit_conv": ("levit_conv_128s", dict(img_size=64), (2, 3, 64, 64)),
    # M.efficientformer.Attention: bias, v dim = 4x key dim
    "efficientformer": ("efficientformer_l1", dict(), (1, 3, 224, 224)),
    # M.efficientformer_v2.Attention2dDownsample (routed); Attention2d is talking-head (left alone)
    "efficientformerv2": ("efficientformerv2_s0", dict(img_size=64), (1, 3, 64, 64)),
    # M.efficientvit_msra.CascadedGroupAttention: one single-head call per head, in a loop
    "efficientvit_msra": ("efficientvit_m0", dict(img_size=64), (1, 3, 64, 64)),
    # M.mvitv2.MultiScaleAttention: pooled q/k/v, decomposed rel-pos written in place (additive helper)
    "mvitv2": ("mvitv2_tiny", dict(), (1, 3, 224, 224)),
    # M.swin_transformer_v2.WindowAttention: cosine attention, per-head logit scale, CPB bias, shift mask in a view
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8)),
        (1, 3, 64, 64),
    ),
    "swinv2_cr": (
        "swinv2_cr_tiny_ns_224",
        dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8)),
        (1, 3, 64, 64),
    ),
    # M.davit.ChannelAttention: attention over channels (transposed q/k/v)
    "davit_channel": ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), (1, 3, 64, 64)),
    # M.edgenext.CrossCovarianceAttn: normalized q/k, per-head temperature
    "edgenext": ("edgenext_xx_small", dict(), (1, 3, 64, 64)),
    # M.gcvit.WindowAttentionGlobal: rel-pos bias module applied to the scores, global query
    "gcvit": ("gcvit_xxtiny", dict(), (1, 3, 224, 224)),
    # M.crossvit.CrossAttention: q_len 1
    "crossvit": ("crossvit_tiny_240", dict(), (1, 3, 240, 240)),
    # M.tnt.Attention: v head dim != qk
    "tnt": ("tnt_s_patch16_224", dict(img_size=64, depth=2), (1, 3, 64, 64)),
    # M.volo.ClassAttention (q_len 1); OutlookAttention left alone
    "volo_class": ("volo_d1_224", dict(img_size=64), (1, 3, 64, 64)),
    # M.convit.MHSA and GPSA (gated mix of content and positional attention, renormalized)
    "convit": ("convit_tiny", dict(img_size=64, depth=3, local_up_to_layer=2), (1, 3, 64, 64)),
    # M.shvit.SHSA: single head on part of the channels, q.T @ k
    "shvit": ("shvit_s1", dict(), (1, 3, 64, 64)),
    # L.halo_attn.HaloAttn: blocked local attention, q-dependent rel-pos bias
    "halonet": ("halonet26t", dict(), (1, 3, 256, 256)),
    # L.bottleneck_attn.BottleneckAttn: q-dependent rel-pos logits as bias
    "botnet": ("botnet26t_256", dict(img_size=64), (1, 3, 64, 64)),
}


#: too big to build in the fast suite (294M parameters); run with -m slow
SLOW_FAMILIES: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    # the full-width MobileNetV5 encoder
    "mobilenetv5_full": ("mobilenetv5_300m_enc", dict(), (1, 3, 64, 64)),
}


def features(model, x):
    """The model's features: timm heads are often zero-initialized, which would hide differences."""
    out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def build(family: str, dtype: torch.dtype = torch.float32):
    import timm

    name, kwargs, shape = {**FAMILIES, **MANUAL_FAMILIES, **SLOW_FAMILIES}[family]
    skip_unless_in_timm(name)
    torch.manual_seed(0)
    # constant-initialized gates (zero-init BN, 1e-5 layer scales) would hide attention errors
    model = ungate(timm.create_model(name, pretrained=False, **kwargs)).eval().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model, x


def assert_same_grads(model, ref_model, rtol=1e-9, atol=1e-12):
    """Every parameter's gradient equals the reference model's (the parameter is named on failure)."""
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol, msg=name)


def assert_patched_parity(model, x, backend: str, *, sites: int, how: str):
    """Patches ``model`` (strict) and checks that its output and every parameter's gradient equal
    an unpatched copy's (float64 tolerances), that ``sites`` sites were patched as ``how`` and
    each served one call on ``backend``. Returns the unpatched output."""
    import copy

    import attnswap

    ref_model = copy.deepcopy(model)
    ref = ref_model(x)
    ref.square().sum().backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert len(report.patched) == sites and all(s.how == how for s in report.patched), str(report)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-9, atol=1e-12)
    stats = attnswap.stats(model)
    assert stats.by_backend() == {backend: sites} and not any(s.unrouted for s in stats), str(stats)
    return ref.detach()
