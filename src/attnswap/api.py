"""patch / unpatch / patched / stats: thin orchestration of discovery, surgery and routing."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator, Sequence

import torch

from .auto import AUTO, CACHE_ENV, TUNER
from .backends import registry
from .errors import AttnSwapError, BackendUnavailable, PatchError
from .report import MANUAL, NOT_ATTENTION, NOT_ROUTABLE, PATCHED, Fallback, ModelStats, PatchReport, SiteReport, SiteStats
from .routing import ROUTER_ATTR, Policy, Router
from .surgery.discover import Selector, class_label
from .surgery.discover import candidates as find_sites
from .surgery.reroute import analyze, original_class
from .surgery.swap import (
    check_installable,
    install,
    install_source,
    is_bias_source,
    router_of,
    uninstall,
    uninstall_source,
)

logger = logging.getLogger("attnswap")

DEFAULT_FALLBACK = ("sdpa",)
_surgery_lock = threading.RLock()
_SOFTMAX_NOTE = "computes a softmax, but not over q·kᵀ scores that feed a product with v: not an attention site"


def _check_model(model: object) -> torch.nn.Module:
    if isinstance(model, type) and issubclass(model, torch.nn.Module):
        raise AttnSwapError(f"expected a torch.nn.Module instance, got the class {model.__name__}; build the model first")
    if not isinstance(model, torch.nn.Module):
        raise AttnSwapError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def _names(value: str | Sequence[str], what: str) -> list[str]:
    """A backend name or a sequence of them, canonical (aliases resolved)."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise AttnSwapError(f"`{what}` takes a backend name or a list of names, got {type(value).__name__}: {value!r}")
    return [registry.resolve_name(n) for n in value]


_CASTS = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, torch.float16: torch.float16,
}


def _cast_dtype(cast: str | torch.dtype | None) -> torch.dtype | None:
    if cast is None:
        return None
    try:
        return _CASTS[cast]
    except (KeyError, TypeError):
        raise AttnSwapError(f"cast={cast!r} is not supported: use 'bf16' or 'fp16' (or None to never down-cast)") from None


def _policy(
    backend: str, fallback: str | Sequence[str] | None, strict: bool, cast: str | torch.dtype | None = None,
    candidates: str | Sequence[str] | None = None,
) -> tuple[Policy, str]:
    if backend == AUTO:
        # auto's "fallback" is its own ranking of every backend it timed (then sdpa)
        names = None
        if candidates is not None:
            names = tuple(dict.fromkeys(_names(candidates, "candidates")))
        return Policy(AUTO, (), bool(strict), _cast_dtype(cast), names), ""
    if candidates is not None:
        raise AttnSwapError(f"`candidates` applies only to backend='auto' (got backend={backend!r}); use `fallback` "
                            "for the backends a fixed backend falls back to")
    name = registry.resolve_name(backend)
    if fallback is None:
        chain = tuple(n for n in DEFAULT_FALLBACK if n != name)
    else:
        chain = tuple(dict.fromkeys(n for n in _names(fallback, "fallback") if n != name))
    unavailable = registry.get_backend(name).unavailable_reason or ""
    if unavailable and strict:
        raise BackendUnavailable(name, unavailable + _install_hint(name))
    return Policy(name, chain, bool(strict), _cast_dtype(cast)), unavailable


def _install_hint(name: str) -> str:
    hint = registry.get_backend(name).install_hint
    return f" ({hint})" if hint else ""


def patch(
    model: torch.nn.Module,
    backend: str = "sdpa",
    *,
    fallback: str | Sequence[str] | None = None,
    strict: bool = False,
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
    cast: str | torch.dtype | None = None,
    auto_cache: str | os.PathLike | None = None,
    candidates: str | Sequence[str] | None = None,
) -> PatchReport:
    """Route every attention computation of ``model`` through ``backend``, in place.

    Each module that calls ``scaled_dot_product_attention`` gets a router; its own code keeps
    running (projections, norms, rope, biases) and only the attention call moves. Parameters,
    buffers and ``state_dict`` are untouched. Patching a patched model switches its backend.

    Args:
        model: any ``torch.nn.Module`` (timm models above all).
        backend: a name from :func:`list_backends`, e.g. ``"sdpa"``, ``"flex"``, ``"sdpa_math"``;
            or ``"auto"``: for each call signature, the first call checks every available
            exact backend against a float64 reference and times the ones within tolerance on
            that call's inputs; the fastest serves that signature from then on (see
            :func:`attnswap.auto_decisions`).
        fallback: backends to try, in order, for a call ``backend`` cannot take (bias on a
            kernel without bias, dropout on flex, ...). Default: ``("sdpa",)``. Every fallback
            is counted in :func:`stats` with its reasons.
        strict: raise :class:`UnsupportedCall` (with every reason) instead of falling back;
            also raise :class:`BackendUnavailable` now if ``backend`` cannot run here, and
            :class:`PatchError` if a selected attention module cannot be routed.
        include: only sites whose module path or class matches one of these globs or classes.
        exclude: skip sites whose module path or class matches one of these.
        cast: ``"bf16"`` or ``"fp16"``: a backend that takes only half precision (flash-attn,
            SageAttention, ...) serves the float32 calls it would refuse on q/k/v (and an
            additive mask) cast to this dtype, the output cast back. This trades accuracy for
            speed: bf16 keeps 8 significant bits (relative error around 4e-3 per element),
            fp16 11 bits but overflows past 65504. Off by default: float32 calls then fall back.
            Calls the backend takes as they are are never cast; the down-cast calls show in
            :func:`stats` as e.g. ``flash (bfloat16)``.
        auto_cache: with ``backend="auto"``, a JSON file to load earlier decisions from and
            save new ones to (default: ``$ATTNSWAP_AUTO_CACHE`` if set). Decisions are keyed
            by device name, torch version and kernel package versions, so a file made
            elsewhere is never misapplied.
        candidates: with ``backend="auto"``, the only backends it may choose from (default:
            every available exact backend).

    Returns:
        A :class:`PatchReport` listing every site, what was done and what could not be.

    Raises:
        AttnSwapError: unknown backend name (the message lists valid names and the closest one).
            The model is left untouched on every error.

    Example::

        model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
        report = attnswap.patch(model, backend="flex")
        print(report)
    """
    _check_model(model)
    policy, unavailable = _policy(backend, fallback, strict, cast, candidates)
    if policy.backend == AUTO:
        path = auto_cache if auto_cache is not None else os.environ.get(CACHE_ENV)
        if path:
            TUNER.use_file(path)
    with _surgery_lock:
        found = list(find_sites(model, include, exclude))
        plan: list[tuple] = []
        sites: list[SiteReport] = []
        sources: list = []
        for c in found:
            label = class_label(c.cls)
            if c.rewrite is not None and c.rewrite.builds_only:
                if c.rewrite.problem is None and check_installable(c.module, c.rewrite) is None:
                    sources.append(c)  # (else its bias stays a tensor: nothing is lost)
                continue
            if c.rewrite is None or c.rewrite.not_attention:
                note = c.rewrite.left_alone if c.rewrite is not None else _SOFTMAX_NOTE
                sites.append(SiteReport(c.path, label, NOT_ATTENTION, reason=note))
                continue
            if c.rewrite.left_alone:
                sites.append(SiteReport(c.path, label, MANUAL, reason=c.rewrite.left_alone))
                continue
            problem = c.rewrite.problem or check_installable(c.module, c.rewrite)
            if problem:
                sites.append(SiteReport(c.path, label, NOT_ROUTABLE, reason=problem))
                continue
            plan.append(c)
        blocked = [s for s in sites if s.status == NOT_ROUTABLE]
        if strict and blocked:
            raise PatchError(
                "strict=True and these attention modules cannot be routed (nothing was patched):\n"
                + "\n".join(f"  {s.name} ({s.cls}): {s.reason}" for s in blocked)
                + "\n  HINT: pass strict=False to patch every other site and report these, or leave them out "
                "with exclude=[...]"
            )
        for c in sources:
            if not is_bias_source(c.module):
                install_source(c.module, c.rewrite)
        for c in plan:
            router = Router(policy, site=c.path, site_class=class_label(c.cls))
            install(c.module, c.rewrite, router)
            flags = tuple(router.saved_flags)
            sites.append(
                SiteReport(
                    c.path, class_label(c.cls), PATCHED, c.rewrite.calls, flags, how=c.rewrite.how,
                    products=c.rewrite.products, structures=c.rewrite.structures,
                )
            )
    order = {c.path: i for i, c in enumerate(found)}
    sites.sort(key=lambda s: order.get(s.path, 0))
    if unavailable and plan:
        logger.warning(
            "attnswap: backend %r is unavailable (%s); every call will use the fallback %s",
            policy.backend, unavailable, policy.fallback,
        )
    return PatchReport(
        policy.backend, policy.fallback, policy.strict, tuple(sites), unavailable, policy.cast,
        tuple((c.path, c.rewrite.structures) for c in sources),
    )


def unpatch(model: torch.nn.Module) -> int:
    """Restore every patched module of ``model`` exactly (class, flags, attributes); returns how many.

    A no-op (returning 0) on a model that is not patched.
    """
    _check_model(model)
    with _surgery_lock:
        restored = 0
        for module in model.modules():
            if ROUTER_ATTR in module.__dict__:
                uninstall(module)
                restored += 1
            elif is_bias_source(module):
                uninstall_source(module)
    return restored


def is_patched(model: torch.nn.Module) -> bool:
    """True when at least one module of ``model`` is routed by attnswap."""
    _check_model(model)
    return any(ROUTER_ATTR in m.__dict__ or is_bias_source(m) for m in model.modules())


@contextlib.contextmanager
def patched(
    model: torch.nn.Module,
    backend: str = "sdpa",
    **options,
) -> Iterator[PatchReport]:
    """Patch ``model`` for the duration of a ``with`` block (same options as :func:`patch`).

    On exit, also when the body raises, the model is exactly as it was on entry, including
    an earlier patch with another backend (its routers and their counts come back).
    Contexts nest.

    Example::

        with attnswap.patched(model, backend="sdpa_math") as report:
            out = model(x)
    """
    _check_model(model)
    with _surgery_lock:
        before = [(m, m.__dict__.get(ROUTER_ATTR), is_bias_source(m)) for m in model.modules()]
    try:
        yield patch(model, backend, **options)
    finally:
        with _surgery_lock:
            for m in model.modules():
                if ROUTER_ATTR in m.__dict__:
                    uninstall(m)
                elif is_bias_source(m):
                    uninstall_source(m)
            for m, router, source in before:
                if router is not None:
                    rewrite = analyze(original_class(m))
                    install(m, rewrite, router)
                elif source:
                    install_source(m, analyze(original_class(m)))


def stats(model: torch.nn.Module, *, reset: bool = False) -> ModelStats:
    """Per patched site: calls served by each backend, fallbacks with their reasons.

    Calls made inside a ``torch.compile``\\ d graph are not counted one by one (the graph has
    no counters); the backend chosen while tracing is listed under ``traced``.
    ``reset=True`` zeroes the counts after reading them.
    """
    _check_model(model)
    out = ModelStats()
    for path, module in model.named_modules():
        router = router_of(module)
        if router is None:
            continue
        out.append(site_stats(path, router))
        if reset:
            router.reset_stats()
    return out


def site_stats(path: str, router: Router) -> SiteStats:
    """One site's counts, as :func:`stats` lists them."""
    calls: dict[str, int] = {}
    traced: dict[str, int] = {}
    fallbacks = []
    structures: dict[tuple[str, str, str], int] = {}
    for t in router.tallies():
        if t.calls:
            calls[t.label] = calls.get(t.label, 0) + t.calls
            if t.structure is not None:
                key = (t.structure[0], t.label, t.structure[1])
                structures[key] = structures.get(key, 0) + t.calls
        if t.traced:
            traced[t.label] = traced.get(t.label, 0) + t.traced
        if t.is_fallback and (t.calls or t.traced):
            fallbacks.append(Fallback(t.label, {name: tuple(r) for name, r in t.tried}, t.calls, t.traced))
    return SiteStats(
        path, router.site_class, router.policy.backend, calls, tuple(fallbacks), traced, dict(router.unrouted),
        router.tuning_seconds, structures,
    )
