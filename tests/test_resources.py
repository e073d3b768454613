"""Resources: repeated patching leaks nothing, and patching keeps no model alive.

Issue: "1,000 patch/unpatch cycles on a ViT leave no growth in memory or in the number of
live objects attnswap holds; a patched model holds no reference that keeps a deleted model
alive."
"""

from __future__ import annotations

import gc
import tracemalloc
import types
import weakref
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap import auto, routing
from attnswap.routing import Decision, Plan, Policy, Router, Tally
from attnswap.surgery import reroute
from families import build, features

#: attnswap's own per-patch object types: a leak of any of them shows up as a count that grows
ATTNSWAP_TYPES = (Router, Plan, Tally, Policy, Decision)

CYCLES = 1000
WARMUP = 50
#: every cycle, one of these (with a forward now and then, except for flex, which would compile)
BACKENDS = ("sdpa", "sdpa_math", "eager", "flex", "auto")
FORWARD_EVERY = 47  # coprime with len(BACKENDS): the forwards rotate over the backends

#: Memory still allocated after the 950 measured cycles (traced only from the end of the
#: warm-up, so only what those cycles allocated and kept counts). The smallest Python object
#: tracemalloc can see is 28 bytes (an int), so leaking even one object per cycle keeps
#: 950 x 28 B = 26.6 KB; anything attnswap keeps per cycle (a router is a dozen objects,
#: several KB) is far above. Measured here: ~2-3 KB, all of it torch's own
#: (torch/nn/attention/__init__.py enum bookkeeping in sdpa_kernel), none in attnswap's files.
TOTAL_SLACK = 24 * 1024
#: Blocks still allocated by attnswap's own source lines: one object kept per cycle (950) or
#: per forward (~20) would exceed the count; a few one-off blocks (a lazily made cache entry,
#: an import inside a function while a profiler runs) stay under both.
ATTNSWAP_OBJECTS = 16
ATTNSWAP_SLACK = 4096


@pytest.fixture(autouse=True)
def _fresh_tuner():
    auto.TUNER.forget()
    yield
    auto.TUNER.forget()


def attnswap_objects() -> Counter:
    """gc-tracked objects of attnswap's own types, by type name (after a full collection)."""
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects() if type(o) in ATTNSWAP_TYPES)


def live_routers() -> int:
    gc.collect()
    return len(routing._live_routers)


def _cycle(model, x, i: int, classes: set, forwards: Counter) -> None:
    """One patch/unpatch cycle, varied by ``i``: backend, plain patch or context, a switch,
    stats read (and reset), a forward now and then."""
    backend = BACKENDS[i % len(BACKENDS)]
    options = dict(candidates=("sdpa", "eager")) if backend == "auto" else {}
    # the first cycles run a forward on every backend, so the warm-up has made every one-off
    # cache entry (auto's decision, optional kernels' import checks, torch's own) already
    forward = (i < len(BACKENDS) or i % FORWARD_EVERY == 0) and backend != "flex"
    forwards[backend] += forward
    if i % 3 == 0:
        with attnswap.patched(model, backend=backend, **options):
            classes.update(type(m) for m in model.modules())
            if forward:
                with torch.no_grad():
                    model(x)
            attnswap.stats(model)
    else:
        if i % 3 == 1:
            attnswap.patch(model, backend="sdpa_math")  # then switched while patched
        attnswap.patch(model, backend=backend, **options)
        classes.update(type(m) for m in model.modules())
        if forward:
            with torch.no_grad():
                model(x)
        attnswap.stats(model, reset=i % 2 == 0)
        assert attnswap.unpatch(model) == 2
    assert not attnswap.is_patched(model)


def test_1000_patch_unpatch_cycles_leave_no_growth():
    model, x = build("vit")
    x = x[:1]
    original_classes = {type(m) for m in model.modules()}
    with torch.no_grad():
        expected = features(model, x)
    routers_at_start = live_routers()

    classes: set[type] = set()
    forwards: Counter = Counter()
    for i in range(WARMUP):
        _cycle(model, x, i, classes, forwards)
    objects_after_warmup = attnswap_objects()
    routers_after_warmup = live_routers()
    generated_after_warmup = len(reroute._generated)
    rewrites_after_warmup = len(reroute._cache)
    classes_after_warmup = set(classes)

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(WARMUP, CYCLES):
            _cycle(model, x, i, classes, forwards)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    in_attnswap = snapshot.filter_traces([tracemalloc.Filter(True, "*/attnswap/*")])
    kept_by_attnswap = sum(s.size for s in in_attnswap.statistics("lineno"))
    kept_count = sum(s.count for s in in_attnswap.statistics("lineno"))
    top = "\n".join(str(s) for s in snapshot.statistics("lineno")[:10])

    assert kept_by_attnswap < ATTNSWAP_SLACK and kept_count < ATTNSWAP_OBJECTS, (
        f"attnswap's code kept {kept_count} blocks, {kept_by_attnswap} B over {CYCLES - WARMUP} cycles:\n{top}"
    )
    assert grown < TOTAL_SLACK, f"memory grew by {grown} B over {CYCLES - WARMUP} cycles:\n{top}"
    assert {b for b, n in forwards.items() if n} == set(BACKENDS) - {"flex"}
    # the objects attnswap makes per patch are all gone again
    assert live_routers() == routers_after_warmup == routers_at_start
    assert attnswap_objects() == objects_after_warmup, "Router/Plan/Tally/Policy/Decision objects accumulate"
    # one generated subclass per original class, made once and reused by every cycle
    assert len(reroute._generated) == generated_after_warmup
    assert len(reroute._cache) == rewrites_after_warmup
    generated = classes - original_classes
    assert classes == classes_after_warmup
    assert len(generated) == 1 and all(c.__dict__["_attnswap_original_class"] in original_classes for c in generated)
    # and the model is exactly the model it was
    assert {type(m) for m in model.modules()} == original_classes
    with torch.no_grad():
        assert torch.equal(features(model, x), expected)


def test_register_unregister_cycles_leave_the_registry_as_it_was():
    from attnswap.backends import registry

    names = dict(registry._backends)
    listeners = len(registry._listeners)
    objects = attnswap_objects()
    model, x = build("vit")
    for i in range(200):
        attnswap.register_backend("resource_probe", lambda q, k, v, **kw: F.scaled_dot_product_attention(q, k, v, **kw))
        attnswap.patch(model, backend="resource_probe")
        attnswap.unpatch(model)
        attnswap.unregister_backend("resource_probe")
    assert registry._backends == names
    assert len(registry._listeners) == listeners
    assert attnswap_objects() == objects


def _patched_and_used(backend: str, **options):
    model, x = build("vit")
    attnswap.patch(model, backend=backend, **options)
    with torch.no_grad():
        model(x)
        model(x)
    s = attnswap.stats(model)
    assert s.total_calls == 4
    str(s)
    attnswap.stats(model, reset=True)
    return model


@pytest.mark.parametrize(
    "backend, options",
    [
        ("sdpa", {}),
        ("eager", {}),
        ("sdpa_efficient", {}),  # CUDA-only kernel: every call is a counted fallback with reasons
        ("auto", dict(candidates=("sdpa", "eager"))),
    ],
    ids=["sdpa", "eager", "fallback", "auto"],
)
@pytest.mark.parametrize("unpatch_first", [True, False], ids=["unpatched", "still_patched"])
def test_deleted_model_is_collected(backend, options, unpatch_first):
    routers_before = live_routers()
    model = _patched_and_used(backend, **options)
    model_ref = weakref.ref(model)
    router_refs = [weakref.ref(m.__dict__["_attnswap_router"]) for m in model.modules() if "_attnswap_router" in m.__dict__]
    assert len(router_refs) == 2
    if unpatch_first:
        attnswap.unpatch(model)
    del model
    gc.collect()
    assert model_ref() is None, f"a deleted model is kept alive by: {[type(r) for r in gc.get_referrers(model_ref())]}"
    assert all(r() is None for r in router_refs), "a deleted model's routers are kept alive"
    assert live_routers() == routers_before


def _dynamic_attention_class() -> type:
    """A fresh attention class per call, like a factory that builds classes per model."""

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)

    return Attn


@pytest.mark.parametrize("capacity", [8])
def test_classes_created_per_model_are_not_kept_alive(monkeypatch, capacity):
    # the per-class caches are bounded (least recently used dropped); shrunk here so the test
    # needs few classes: past the bound, classes of deleted models are collected
    for cache in (reroute._cache, reroute._generated, reroute._rewrapped_classes):
        monkeypatch.setattr(cache, "capacity", capacity)
    cls_refs = []
    for _ in range(capacity + 12):
        cls = _dynamic_attention_class()
        model = cls()
        assert len(attnswap.patch(model)) == 1
        model(torch.randn(1, 5, 8))
        attnswap.unpatch(model)
        cls_refs.append(weakref.ref(cls))
        del model, cls
    gc.collect()
    assert all(r() is None for r in cls_refs[:12]), "classes of deleted models are kept alive"
    assert len(reroute._cache) <= capacity and len(reroute._generated) <= capacity


def test_attnswap_objects_hold_no_reference_to_the_model():
    # routers, plans, tallies and their closures never refer back to a module they route
    model, x = build("vit")
    attnswap.patch(model, backend="eager")
    with torch.no_grad():
        model(x)
    modules = {id(m) for m in model.modules()}
    for obj in gc.get_objects():
        if type(obj) in ATTNSWAP_TYPES:
            for ref in gc.get_referents(obj):
                assert id(ref) not in modules, f"{type(obj).__name__} refers to a module of the model"
                if isinstance(ref, (dict, list, tuple)):
                    assert not any(id(r) in modules for r in gc.get_referents(ref))
                if isinstance(ref, types.FunctionType) and ref.__closure__:
                    assert not any(id(c.cell_contents) in modules for c in ref.__closure__)
