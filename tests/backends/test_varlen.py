"""Packed sequences (a padded batch's valid tokens end to end) through each backend's variable-length
kernel: flash-attn 2/3/4's ``flash_attn_varlen_func``, xformers' ``BlockDiagonalMask`` and PyTorch's
``varlen_attn``, on CPU against fakes with each library's exact signature."""

import dataclasses

import pytest
import torch

from attnswap import forms
from attnswap.backends import get_backend
from attnswap.backends import sdpa as sdpa_module
from attnswap.routing import Policy, Router
from attnswap.structure import replacement_for
from fakes import flash_attn_2, xformers_ops, xformers_top
from kernel_fixtures import (  # noqa: F401 (fixtures)
    as_if_on_cuda,
    assert_matches,
    cuda_facts,
    flash_fakes,
    gpu,
    install,
    recorder,
    sdpa_reference,
)

naflex = pytest.importorskip("timm.models.naflexvit")
padding_mask = replacement_for(naflex.create_attention_mask)[0]


@pytest.fixture
def kernels(flash_fakes, install, recorder):
    return {**flash_fakes, "xformers": install("xformers", {"xformers": xformers_top(), "xformers.ops": xformers_ops(recorder)})}


def padded_call(lengths, length=12, heads=4, dim=16, symmetric=True, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(lengths), heads, length, dim, generator=g).to(dtype) for _ in range(3))
    valid = torch.zeros(len(lengths), length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    mask = naflex.create_attention_mask(valid, 0, symmetric, None, torch.float32)
    return q, k, v, padding_mask(valid, 0, symmetric, None, dtype), mask


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "key only"])
@pytest.mark.parametrize("name", ["flash", "flash3", "flash4", "xformers"])
def test_a_padded_batch_is_one_varlen_call(kernels, as_if_on_cuda, recorder, name, symmetric):
    as_if_on_cuda(kernels[name])
    q, k, v, padding, mask = padded_call([12, 5, 3], symmetric=symmetric)
    router = Router(Policy(name, (), True), site="t")
    with torch.no_grad():
        out = router.route(q, k, v, attn_mask=padding)
    assert router.tallies()[0].structure == ("key_padding", forms.FORM_PACKED)
    (function, args), = recorder
    if name == "xformers":
        assert function == "memory_efficient_attention" and args["query"].shape == (1, 20 if symmetric else 36, 4, 16)
        assert args["attn_bias"].k_seqstart == [0, 12, 17, 20]
    else:
        assert function == "flash_attn_varlen_func" and args["q"].shape == (20 if symmetric else 36, 4, 16)
        assert args["cu_seqlens_k"].tolist() == [0, 12, 17, 20] and args["softmax_scale"] is None and not args["causal"]
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=mask), torch.bfloat16)


def test_grouped_heads_reach_flash_varlen_and_xformers_runs_them_per_sequence(kernels, as_if_on_cuda, recorder):
    for name in ("flash", "xformers"):
        as_if_on_cuda(kernels[name])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 8, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 8, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    valid = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    mask = naflex.create_attention_mask(valid, 0, True, None, torch.float32)
    expected = sdpa_reference(q, k, v, attn_mask=mask, enable_gqa=True)
    for name, form in (("flash", forms.FORM_PACKED), ("xformers", forms.FORM_SEQUENCES)):
        router = Router(Policy(name, (), True), site="t")
        with torch.no_grad():
            out = router.route(q, k, v, attn_mask=padding_mask(valid, 0, True, None, torch.bfloat16), enable_gqa=True)
        assert router.tallies()[0].structure == ("key_padding", form), name
        assert_matches(out, expected, torch.bfloat16)


def test_a_package_without_the_varlen_function_runs_per_sequence(install, as_if_on_cuda, recorder):
    flash_pkg = flash_attn_2(recorder)
    del flash_pkg.flash_attn_varlen_func  # (an older flash-attn)
    backend = as_if_on_cuda(install("flash", {"flash_attn": flash_pkg}))
    assert backend.varlen_reasons(cuda_facts()) == ["this flash_attn has no flash_attn_varlen_func"]
    q, k, v, padding, mask = padded_call([12, 5, 3])
    router = Router(Policy("flash", (), True), site="t")
    with torch.no_grad():
        out = router.route(q, k, v, attn_mask=padding)
    assert router.tallies()[0].structure == ("key_padding", forms.FORM_SEQUENCES)
    assert [f for f, _ in recorder] == ["flash_attn_func"] * 3
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=mask), torch.bfloat16)


def torch_varlen_fake(calls, takes_gqa=True):
    """``torch.nn.attention.varlen.varlen_attn``'s signature (torch 2.14; 2.11 has no ``enable_gqa``)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append(dict(query=query, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k, max_q=max_q, max_k=max_k, scale=scale,
                          enable_gqa=enable_gqa))
        assert cu_seq_q.dtype == torch.int32 and query.dim() == 3 and window_size == (-1, -1) and return_aux is None
        assert enable_gqa or key.shape[1] == query.shape[1]
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        outs = []
        for (qa, qb), (ka, kb) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
            seq = [t.transpose(0, 1)[None].float() for t in (query[qa:qb], key[ka:kb], value[ka:kb])]
            out = torch.nn.functional.scaled_dot_product_attention(*seq, scale=scale, enable_gqa=enable_gqa)
            outs.append(out[0].transpose(0, 1).to(query.dtype))
        return torch.cat(outs)

    if not takes_gqa:
        def varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1)):
            return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)
        return varlen_attn_211
    return varlen_attn


@pytest.mark.parametrize("takes_gqa", [True, False], ids=["torch 2.14", "torch 2.11"])
def test_sdpa_packs_into_torchs_varlen_attn(monkeypatch, takes_gqa):
    import inspect

    calls = []
    fake = torch_varlen_fake(calls, takes_gqa)
    monkeypatch.setattr(sdpa_module, "torch_varlen", lambda: (fake, "enable_gqa" in inspect.signature(fake).parameters))
    capability = [(9, 0)]
    monkeypatch.setattr(sdpa_module, "cuda_capability", lambda index: capability[0])
    sdpa = get_backend("sdpa")
    assert sdpa.varlen_reasons(cuda_facts(q=(1, 4, 12, 64), dtype=torch.bfloat16)) == []
    gqa = cuda_facts(q=(1, 4, 12, 64), k=(1, 2, 12, 64), dtype=torch.bfloat16)
    assert bool(sdpa.varlen_reasons(gqa)) is not takes_gqa
    refused = {
        "float32": cuda_facts(q=(1, 4, 12, 64), dtype=torch.float32),
        "v head dim": cuda_facts(q=(1, 4, 12, 64), v=(1, 4, 12, 32), dtype=torch.bfloat16),
        "head dim 264": cuda_facts(q=(1, 4, 12, 264), dtype=torch.bfloat16),
    }
    for label, facts in refused.items():
        assert sdpa.varlen_reasons(facts), label
    on_cpu = dataclasses.replace(cuda_facts(dtype=torch.bfloat16), device_type="cpu", device_index=None)
    assert sdpa.varlen_reasons(on_cpu) == ["torch's varlen_attn runs on CUDA only"]
    capability[0] = (7, 5)
    assert any("compute capability" in r for r in sdpa.varlen_reasons(cuda_facts(dtype=torch.bfloat16)))

    q, k, v, padding, mask = padded_call([12, 5, 3])
    out = padding.run_packed(sdpa.varlen, None, q, k, v, scale=0.3)
    (call,) = calls
    assert call["query"].shape == (20, 4, 16) and call["cu_seq_k"].tolist() == [0, 12, 17, 20] and call["max_k"] == 12
    assert call["scale"] == 0.3
    assert_matches(out, sdpa_reference(q, k, v, attn_mask=mask, scale=0.3), torch.bfloat16)


def test_torchs_own_varlen_attn_is_found_here():
    fn, takes_gqa = sdpa_module.torch_varlen()
    if torch.__version__ >= "2.10":
        assert fn is not None and fn.__name__ == "varlen_attn"


def test_a_float32_padded_batch_down_cast_for_the_varlen_kernel(kernels, as_if_on_cuda, recorder):
    as_if_on_cuda(kernels["flash"])
    q, k, v, padding, mask = padded_call([12, 5, 3], dtype=torch.float32)
    router = Router(Policy("flash", (), True, cast=torch.bfloat16), site="t")
    with torch.no_grad():
        out = router.route(q, k, v, attn_mask=padding)
    (tally,) = router.tallies()
    assert tally.structure == ("key_padding", forms.FORM_PACKED) and tally.cast == torch.bfloat16
    (_, args), = recorder
    assert args["q"].dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sdpa_reference(q, k, v, attn_mask=mask), atol=3e-2, rtol=3e-2)


def test_register_backend_checks_its_varlen(registered):
    import attnswap

    with pytest.raises(attnswap.AttnSwapError, match="`varlen` must be callable"):
        registered("bad_varlen", lambda q, k, v, **kw: q, varlen=3)
