"""Rerouting SDPA calls: every spelling reached, what cannot be reached reported, exact restore."""

import pytest
import torch
import torch.nn as nn

import attnswap
from attnswap.backends import eager_attention
from attnswap.routing import ROUTER_ATTR
from attnswap.surgery.reroute import analyze
from surgery import spellings as S

ROUTABLE = [
    (S.ViaF, 1), (S.ViaTorchNNFunctional, 1), (S.ViaNNFunctional, 1), (S.ViaImportedName, 1), (S.ViaAlias, 1),
    (S.ViaHelperMethod, 1), (S.ViaNestedFunction, 1), (S.WithSuperAndFlag, 1), (S.WithNegatedFlag, 1),
    (S.Child, 1), (S.TwoCalls, 2),
]


@pytest.mark.parametrize("cls,sites", ROUTABLE, ids=[c.__name__ for c, _ in ROUTABLE])
def test_every_spelling_is_routed_and_output_is_unchanged(cls, sites, sdpa_counter, registered):
    seen = []

    def probe(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append((tuple(q.shape), attn_mask is not None, is_causal, scale))
        return eager_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)

    registered("probe", probe)
    torch.manual_seed(0)
    module = cls().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    module.fused_attn = getattr(module, "fused_attn", True)
    ref_module = cls().double()
    ref_module.load_state_dict(module.state_dict())
    if hasattr(ref_module, "fused_attn"):
        ref_module.fused_attn = False  # the reference runs the manual path where there is one
    ref = ref_module(x)

    report = attnswap.patch(module, backend="probe")
    assert len(report) == 1 and report.patched[0].sdpa_calls == sites
    counter = sdpa_counter()
    with counter:
        out = module(x)
    assert counter.calls == 0, "an SDPA call escaped the router"
    assert len(seen) >= 1
    torch.testing.assert_close(out, ref)


def test_call_arguments_arrive_unchanged(registered):
    seen = []
    registered("probe", lambda q, k, v, **kw: (seen.append(kw), torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw))[1])
    for cls, expected in [
        (S.ViaTorchNNFunctional, dict(scale=0.5)),
        (S.ViaNNFunctional, dict()),
        (S.ViaImportedName, dict(is_causal=True)),
    ]:
        module = cls()
        attnswap.patch(module, backend="probe")
        seen.clear()
        module(torch.randn(1, 3, 8))
        (kw,) = seen
        for name, value in expected.items():
            assert kw[name] == value


def test_gate_flags_are_forced_on_and_restored_exactly():
    module = S.WithSuperAndFlag()
    assert "fused_attn" not in module.__dict__
    report = attnswap.patch(module)
    assert report.patched[0].flags == ("fused_attn",)
    assert module.fused_attn is True
    attnswap.unpatch(module)
    assert "fused_attn" not in module.__dict__ and module.fused_attn is False

    negated = S.WithNegatedFlag()
    attnswap.patch(negated)
    assert negated.fused_attn is True and negated.not_fused is False
    attnswap.unpatch(negated)
    assert negated.__dict__["fused_attn"] is False


@pytest.mark.parametrize(
    "cls,problem",
    [
        (S.StaticSdpa, "outside an instance method"),
        (S.StoresSdpa, "other than by calling it"),
        (S.Decorated, "wrapped by a decorator"),
    ],
)
def test_unroutable_classes_are_reported_not_patched(cls, problem):
    module = cls()
    report = attnswap.patch(module)
    assert len(report) == 0
    (site,) = report.not_routable
    assert site.status == "not routable" and problem in site.reason
    assert not attnswap.is_patched(module)
    with pytest.raises(attnswap.PatchError, match=problem):
        attnswap.patch(module, strict=True)


def test_a_method_named_like_sdpa_is_not_mistaken_for_it():
    # its own method is hand-written attention: found as such (deferred product), not as an SDPA call
    rewrite = analyze(S.SameNameNotSdpa)
    assert rewrite.calls == 0 and rewrite.products == 1 and rewrite.how == "hand-written"


def test_instance_level_forward_override_is_reported():
    module = S.ViaF()
    module.forward = lambda x: x
    report = attnswap.patch(module)
    assert len(report) == 0 and "overrides the class method" in report.not_routable[0].reason


def test_rewritten_code_keeps_file_and_line_numbers():
    rewrite = analyze(S.ViaF)
    new = rewrite.methods["forward"]
    old = S.ViaF.forward
    assert new.__code__.co_filename == old.__code__.co_filename
    assert new.__code__.co_firstlineno == old.__code__.co_firstlineno
    assert new.__qualname__ == old.__qualname__


def test_patched_class_looks_like_the_original():
    module = S.ViaF()
    before = repr(module)
    attnswap.patch(module)
    assert isinstance(module, S.ViaF) and type(module) is not S.ViaF
    assert type(module).__name__ == "ViaF" and repr(module) == before
    attnswap.unpatch(module)
    assert type(module) is S.ViaF and ROUTER_ATTR not in module.__dict__


def test_modules_without_attention_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = attnswap.patch(model)
    assert len(report) == 0 and report.sites == () and "no attention sites" in str(report)
    assert attnswap.unpatch(model) == 0


class _TorchMixin:
    """Stands in for FSDP2's FSDPModule: a torch class that re-classes modules as
    ``type(f"FSDP{cls.__name__}", (FSDPModule, cls), {...})``."""

    def unshard(self):
        return "mixin"


_TorchMixin.__module__ = "torch.distributed.fsdp._fake"


def _rewrap(module):
    cls = type(module)
    wrapper = type(f"FSDP{cls.__name__}", (_TorchMixin, cls), {"__module__": "torch.distributed.fsdp._fake"})
    module.__class__ = wrapper
    return wrapper


@pytest.mark.parametrize("order", ["wrap_then_patch", "patch_then_wrap"])
def test_torch_wrappers_that_reclass_modules_keep_routing_and_unpatch_exactly(order, sdpa_counter):
    # FSDP2 fully_shard(attn) re-classes the module from torch code; discovery must see through it
    torch.manual_seed(0)
    module = S.ViaF().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = module(x)
    if order == "wrap_then_patch":
        wrapper = _rewrap(module)
        assert len(attnswap.patch(module, backend="eager", strict=True).patched) == 1
    else:
        attnswap.patch(module, backend="eager")
        _rewrap(module)
    assert isinstance(module, _TorchMixin) and module.unshard() == "mixin"
    with sdpa_counter() as counter:
        torch.testing.assert_close(module(x), expected)
    assert counter.calls == 0 and attnswap.stats(module).by_backend() == {"eager": 1}
    attnswap.patch(module, backend="sdpa_math")  # switching backend finds the site again
    assert attnswap.stats(module)[0].backend == "sdpa_math"
    assert attnswap.unpatch(module) == 1
    cls = type(module)
    assert not any("_attnswap_original_class" in vars(k) for k in cls.__mro__), "a generated class stayed in the MRO"
    assert cls.__mro__[1:3] == (_TorchMixin, S.ViaF)
    if order == "wrap_then_patch":
        assert cls is wrapper
    assert module.unshard() == "mixin" and torch.equal(module(x), expected)
    attnswap.patch(module, backend="eager")  # and once more, after the round trip
    attnswap.unpatch(module)
    assert type(module) is cls, "repeated cycles reuse one rebuilt wrapper class"


def renamed(old: str, new: str):
    """A wrapping decorator (functools.wraps) that renames a keyword, like transformers' deprecate_kwarg."""
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


class DecoratedHandWritten(nn.Module):
    @renamed("scale_by", "factor")
    def forward(self, q, k, v, factor=1.0):
        attn = (q @ k.transpose(-2, -1)) * (0.125 * factor)
        return attn.softmax(dim=-1) @ v


@pytest.fixture
def wrapping_decorator():
    from attnswap.surgery import source

    label = f"{renamed.__module__}.{renamed.__qualname__}"
    source.WRAPPING_DECORATORS.add(label)
    yield label
    source.WRAPPING_DECORATORS.discard(label)


def test_a_method_under_a_known_wrapping_decorator_is_rewritten_and_decorated_again(wrapping_decorator, sdpa_counter):
    m = DecoratedHandWritten()
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    ref = m(q, k, v, scale_by=2.0)
    original = DecoratedHandWritten.__dict__["forward"]
    attnswap.patch(m, backend="sdpa")
    count = sdpa_counter()
    with count:
        out = m(q, k, v, scale_by=2.0)  # the decorator still renames the keyword
    assert count.calls == 1 and count.softmax == 0 and attnswap.stats(m).total_calls == 1
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert type(m).forward.__wrapped__ is not original.__wrapped__  # decorating the rewritten method
    attnswap.unpatch(m)
    assert type(m) is DecoratedHandWritten and DecoratedHandWritten.__dict__["forward"] is original


def test_a_method_under_an_unknown_decorator_is_reported():
    # a class of its own: what attnswap finds in a class is worked out once
    cls = type("DecoratedToo", (nn.Module,), {"forward": DecoratedHandWritten.__dict__["forward"]})
    (site,) = attnswap.patch(cls(), backend="sdpa").sites
    assert site.status == "not routable" and "renamed('scale_by', 'factor')" in site.reason
