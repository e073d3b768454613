"""The router: one per attention site, between the module's code and the backends.

A rerouted module calls its router's ``route(q, k, v, ...)`` where it used to call
``F.scaled_dot_product_attention``. The router decides once per call signature (shapes,
dtype, device, mask kind, causal, dropout, scale, GQA, grad) which backend serves it:
the chosen one, or the first of the fallback chain that can, and remembers why. Steady
state is one dict lookup and a counter increment.

Three ways a call can arrive, each handled so the site stays routed:
- eagerly: the cached plan for the signature runs (counted);
- while ``torch.compile`` traces: the decision is made in plain Python at trace time
  (:func:`torch.compiler.assume_constant_result`) and the graph holds only the chosen
  backend's code, with no counters in it;
- while ``torch.fx`` traces (timm's feature extraction): the router becomes one leaf
  node, so the traced graph keeps calling it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from . import forms
from .auto import AUTO, TUNER, UNTUNED_DEFAULT
from .backends import registry
from .backends.base import Backend, FunctionBackend, dtype_name
from .call import DTYPE_NAMES, DTYPES, CallFacts, broadcast, facts_from_key, facts_key, facts_of, to_4d
from .errors import AttnSwapError, BackendRefused, UnsupportedCall
from .structure.base import StructuredMask

logger = logging.getLogger("attnswap")

ROUTER_ATTR = "_attnswap_router"
ROUTE_METHOD = "route"
_PLAN_CACHE_LIMIT = 4096
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_tokens = itertools.count(1)
_live_routers: weakref.WeakValueDictionary[int, Router] = weakref.WeakValueDictionary()
_warned: set[tuple] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class Policy:
    """What a site was asked to do: the backend, its fallback chain, strictness."""

    backend: str
    fallback: tuple[str, ...] = ()
    strict: bool = False
    #: float16/bfloat16: a backend that refuses a float32 call only for its dtype runs it down-cast
    cast: torch.dtype | None = None
    #: with backend "auto": the backends it may time (None: every available exact one)
    candidates: tuple[str, ...] | None = None

    @property
    def chain(self) -> tuple[str, ...]:
        return (self.backend,) if self.strict else (self.backend, *self.fallback)


@dataclass
class Tally:
    """Calls served by one backend, after the same refusals (empty ``tried``: no fallback)."""

    backend: str
    tried: tuple[tuple[str, tuple[str, ...]], ...] = ()
    calls: int = 0
    traced: int = 0
    #: the dtype q/k/v were cast to for this backend (``patch(cast=...)``), or None
    cast: torch.dtype | None = None
    #: for a structured bias (``attnswap.structure``): its kind and the form the backend got it in
    structure: tuple[str, str] | None = None

    @property
    def is_fallback(self) -> bool:
        return bool(self.tried)

    @property
    def label(self) -> str:
        """The backend's name, with the dtype it ran in when the call was down-cast."""
        return self.backend if self.cast is None else f"{self.backend} ({dtype_name(self.cast)})"


@dataclass(frozen=True)
class Decision:
    """What :meth:`Router.decide` chose for one call."""

    backend: Backend
    #: the router reshapes the call to 4-D for this backend
    reshape_4d: bool
    #: the backends refused before it, each with its reasons
    tried: tuple[tuple[str, tuple[str, ...]], ...]
    #: q/k/v are cast to this dtype for the backend (``patch(cast=...)``), or None
    cast: torch.dtype | None = None
    #: the form a structured bias reaches the backend in (``attnswap.forms``), None without one
    form: str | None = None


class Plan:
    """The decision for one call signature: what to run, and where to count it."""

    __slots__ = ("run", "tally", "facts")

    def __init__(self, run: Callable[..., torch.Tensor], tally: Tally, facts: CallFacts | None = None) -> None:
        self.run = run
        self.tally = tally
        #: the facts the decision was made on (None for the signature-free shortcut)
        self.facts = facts


def _runner(
    backend: Backend,
    reshape_4d: bool,
    site: str,
    cast: torch.dtype | None = None,
    facts: CallFacts | None = None,
    form: str | None = None,
) -> Callable[..., torch.Tensor]:
    """What a plan calls, as ``run(q, k, v, attn_mask, dropout_p, is_causal, scale=, enable_gqa=)``
    (SDPA's own calling convention, so for ``sdpa`` it is the builtin itself). With the call's
    ``facts`` the backend's :meth:`~Backend.kernel_for` them (as the kernel will see them). A
    structured bias reaches it in ``form`` (:mod:`attnswap.forms`)."""
    if facts is None:
        run: Callable[..., torch.Tensor] = backend.kernel
    else:
        seen = forms.kernel_facts(facts, form)  # the call the kernel itself gets
        seen = seen.as_4d() if reshape_4d else seen
        run = backend.kernel_for(seen.cast_to(cast) if cast is not None else seen)
    if isinstance(backend, FunctionBackend):
        run = _checked(run, backend.name, site)
    if reshape_4d:
        inner = run

        def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
            q4, k4, v4, m4, restore = to_4d(q, k, v, m)
            return restore(inner(q4, k4, v4, m4, d, c, scale=scale, enable_gqa=enable_gqa))

    if cast is not None:
        run = _cast_runner(run, cast)
    if facts is not None:
        varlen = None
        if form == forms.FORM_PACKED:
            varlen = backend.varlen if cast is None else _cast_varlen(backend.varlen, cast)
        run = forms.wrap(run, facts, form, varlen)
    return run


def _cast_varlen(inner: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """:func:`_cast_runner` for a backend's variable-length kernel (packed ``[T, H, E]`` tensors)."""

    def run(q, k, v, *offsets, scale=None, enable_gqa=False):
        return inner(q.to(dtype), k.to(dtype), v.to(dtype), *offsets, scale=scale, enable_gqa=enable_gqa).to(q.dtype)

    return run


def _cast_runner(inner: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Run ``inner`` on q/k/v (and an additive mask) cast to ``dtype``; the output comes back in
    the caller's dtype. Gradients flow through both casts. ``scale=None`` still means
    1/sqrt(head_dim), which the cast does not change."""

    def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        if type(m) is _Tensor and m.dtype != torch.bool:  # (a structured bias: the backend casts its parts)
            m = m.to(dtype)
        out = inner(q.to(dtype), k.to(dtype), v.to(dtype), m, d, c, scale=scale, enable_gqa=enable_gqa)
        return out.to(q.dtype)

    return run


def _checked(inner: Callable[..., torch.Tensor], name: str, site: str) -> Callable[..., torch.Tensor]:
    """A user backend's failures name the site and backend; a wrong result is an error."""

    def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        try:
            out = inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)
        except (AttnSwapError, BackendRefused, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            raise AttnSwapError(
                f"backend {name!r} raised at site {site or '<root>'}: {type(exc).__name__}: {exc}. Fix the backend; "
                "for calls it cannot serve, give register_backend `supports=` or `limits=` so the router falls back"
            ) from exc
        q_shape = q.shape
        if type(out) is _Tensor and out.dtype == q.dtype:
            # the usual call (no batch dim broadcast), checked without building the expected shape
            out_shape, v_shape = out.shape, v.shape
            if (
                out_shape[:-1] == q_shape[:-1] and out_shape[-1] == v_shape[-1]
                and k.shape[:-3] == q_shape[:-3] and v_shape[:-3] == q_shape[:-3]
            ):
                return out
        if q.dim() >= 3:
            lead = broadcast(q.shape[:-3], k.shape[:-3], v.shape[:-3]) or ()
            expected = (*lead, q.shape[-3], q.shape[-2], v.shape[-1])
        else:
            expected = (q.shape[-2], v.shape[-1])
        if not isinstance(out, torch.Tensor):
            raise AttnSwapError(f"backend {name!r} returned {type(out).__name__} at site {site or '<root>'}, expected a Tensor")
        if tuple(out.shape) != expected or out.dtype != q.dtype:
            raise AttnSwapError(
                f"backend {name!r} returned shape {tuple(out.shape)} {out.dtype} at site {site or '<root>'}, "
                f"expected {expected} {q.dtype}"
            )
        return out

    return run


def _signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple:
    """Everything a decision depends on, cheap to build and hash (the plan cache key)."""
    if attn_mask is None:
        return (
            query.shape, key.shape, value.shape, query.dtype, query.device, None, dropout_p, is_causal, scale,
            enable_gqa, _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
        )
    if isinstance(attn_mask, StructuredMask):
        mask = attn_mask.signature()
    else:
        mask = (attn_mask.shape, attn_mask.dtype, attn_mask.requires_grad)
    return (
        query.shape, key.shape, value.shape, query.dtype, query.device, mask, dropout_p, is_causal, scale, enable_gqa,
        _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or attn_mask.requires_grad),
    )


def _call_errors(facts: CallFacts) -> list[str]:
    """Calls SDPA itself rejects (or, on some kernels, silently computes wrong)."""
    out = []
    if facts.ndim < 2 or len(facts.k_shape) < 2 or len(facts.v_shape) < 2:
        out.append("query, key and value need at least 2 dims")
        return out
    if facts.k_shape[-2] != facts.v_shape[-2]:
        out.append(f"key and value sequence lengths differ ({facts.k_shape[-2]} vs {facts.v_shape[-2]})")
    if facts.head_dim != facts.k_shape[-1]:
        out.append(f"query and key head dims differ ({facts.head_dim} vs {facts.k_shape[-1]})")
    if not facts.kv_dtypes_match:
        out.append("query, key and value dtypes differ")
    if facts.is_causal and facts.has_mask:
        out.append("attn_mask and is_causal=True together (SDPA forbids this)")
    return out


class Router:
    """Routes one site's attention calls. Created by :func:`attnswap.patch`; not built by users."""

    def __init__(self, policy: Policy, site: str = "", site_class: str = "") -> None:
        self.policy = policy
        self.site = site
        self.site_class = site_class
        #: instance attributes patching changed, for unpatch: name -> (was in __dict__, old value)
        self.saved_flags: dict[str, tuple[bool, Any]] = {}
        #: forward hooks patching added, for unpatch
        self.hook_ids: list[int] = []
        #: the model library whose own extension point reaches this site (attnswap.integrations), or None
        self.integration: str | None = None
        self._tallies: dict[tuple, Tally] = {}
        #: hand-written attention the module computed itself, by why (see surgery.scores)
        self.unrouted: dict[str, int] = {}
        #: seconds ``auto`` spent tuning signatures this site met first
        self.tuning_seconds = 0.0
        self._lock = threading.Lock()
        self._register_token()
        self._reset()

    def _register_token(self) -> None:
        self._token = next(_tokens)
        _live_routers[self._token] = self

    # -- state -------------------------------------------------------------------------
    def _reset(self) -> None:
        self._plans: dict[tuple, Plan] = {}
        self._refused: dict[tuple, dict[str, str]] = {}
        self._fixed: Plan | None = None
        backend = registry._backends.get(self.policy.backend)
        if backend is not None and backend.accepts_everything and backend.unavailable_reason is None:
            self._fixed = Plan(_runner(backend, False, self.site), self._tally(backend.name, ()))

    def __getstate__(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "site": self.site,
            "site_class": self.site_class,
            "saved_flags": self.saved_flags,
            "hook_ids": self.hook_ids,
            "integration": self.integration,
            "tallies": list(self._tallies.values()),
            "unrouted": dict(self.unrouted),
            "tuning_seconds": self.tuning_seconds,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.policy = state["policy"]
        self.site = state["site"]
        self.site_class = state["site_class"]
        self.saved_flags = state["saved_flags"]
        self.hook_ids = list(state.get("hook_ids", []))
        self.integration = state.get("integration")
        if self.integration is not None:  # a copy or an unpickled model: the library must know attnswap's key
            from . import integrations

            integrations.reattach(self.integration)
        self._tallies = {(t.backend, t.tried, t.cast, t.structure): t for t in state["tallies"]}
        self.unrouted = dict(state.get("unrouted", {}))
        self.tuning_seconds = state.get("tuning_seconds", 0.0)
        self._lock = threading.Lock()
        self._register_token()
        self._reset()

    def __repr__(self) -> str:
        return f"<attnswap router {self.site or '<root>'} -> {self.policy.backend}>"

    def _tally(
        self, backend: str, tried: tuple, cast: torch.dtype | None = None, structure: tuple[str, str] | None = None
    ) -> Tally:
        key = (backend, tried, cast, structure)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(backend, tried, cast=cast, structure=structure)
        return tally

    def tallies(self) -> list[Tally]:
        return [t for t in self._tallies.values() if t.calls or t.traced]

    def reset_stats(self) -> None:
        for t in self._tallies.values():
            t.calls = 0
            t.traced = 0
        self.unrouted.clear()
        self.tuning_seconds = 0.0

    def plans(self) -> list[Plan]:
        """One plan per call signature this site met (a backend that takes every call keeps
        none: see :meth:`keep_plans`)."""
        return list(self._plans.values())

    def keep_plans(self) -> None:
        """Decide per signature even for backends that take every call, so :meth:`plans`
        lists every signature met (``attnswap inspect``; costs a dict lookup per call)."""
        with self._lock:
            self._fixed = None

    def note_settled(self, why: str) -> None:
        """A hand-written attention's scores were computed by the module's own code (counted;
        not inside a compiled graph, which holds no counters)."""
        if not _is_compiling():
            self.unrouted[why] = self.unrouted.get(why, 0) + 1

    # -- the hot path ----------------------------------------------------------------------
    def route(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if type(query) is not _Tensor or _is_compiling():
            return self._unusual(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        plan = self._fixed
        if plan is None or (attn_mask is not None and type(attn_mask) is not _Tensor):
            # _signature(), inlined for the common no-mask call: a Python frame costs ~0.1 us here
            if attn_mask is None:
                sig = (
                    query.shape, key.shape, value.shape, query.dtype, query.device, None, dropout_p, is_causal,
                    scale, enable_gqa,
                    _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
                )
            else:
                sig = _signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            plan = self._plans.get(sig)
            if plan is None:
                plan = self._new_plan(sig, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        plan.tally.calls += 1
        try:
            if attn_mask is None and not dropout_p and not is_causal and scale is None and not enable_gqa:
                # The plain call, passed as (q, k, v): every argument a builtin kernel has to
                # parse costs ~0.1 us, more than these checks (benchmarks/routing_overhead.py)
                return plan.run(query, key, value)
            return plan.run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        except BackendRefused as refusal:
            plan.tally.calls -= 1
            return self._after_refusal(plan, refusal, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        except BaseException:
            plan.tally.calls -= 1  # a call that failed was not served
            raise

    # Calling an instance goes through the type's __call__ slot, several hundred ns slower on
    # CPython than a method lookup; rerouted code calls ``router.route(...)``.
    __call__ = route

    # -- decisions ------------------------------------------------------------------------
    def _new_plan(self, sig, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Plan:
        facts = facts_of(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        plan = self._plan_for(facts, self._refused.get(sig), args)
        with self._lock:
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            self._plans[sig] = plan
        return plan

    def _plan_for(self, facts: CallFacts, refused: dict[str, str] | None = None, args: tuple | None = None) -> Plan:
        d = self.decide(facts, refused, args)
        return Plan(
            _runner(d.backend, d.reshape_4d, self.site, d.cast, facts, d.form),
            self._tally(d.backend.name, d.tried, d.cast, None if d.form is None else (facts.structure[0], d.form)),
            facts,
        )

    def decide(self, facts: CallFacts, refused: dict[str, str] | None = None, args: tuple | None = None) -> Decision:
        """Which backend serves ``facts``, how, and every refusal before it.

        ``args`` are the call's own tensors and options; ``auto`` tunes on them when the
        signature is new (without them it only looks up an earlier decision)."""
        errors = _call_errors(facts)
        if errors:
            raise AttnSwapError(f"invalid attention call at site {self.site or '<root>'}: {'; '.join(errors)} ({facts.describe()})")
        if self.policy.backend == AUTO:
            return self._decide_auto(facts, refused, args)
        tried: list[tuple[str, tuple[str, ...]]] = []
        for name in self.policy.chain:
            backend = registry._backends.get(name)
            if backend is None:
                tried.append((name, ("not registered (unregistered after patching?)",)))
                continue
            if refused and name in refused:
                tried.append((name, (refused[name],)))
                continue
            if backend.unavailable_reason is not None:
                tried.append((name, (f"unavailable: {backend.unavailable_reason}",)))
                continue
            if name != self.policy.backend and not backend.exact:
                tried.append((name, ("approximate backends are never used as a fallback",)))
                continue
            reasons, reshape_4d, form = forms.choose(backend, facts, self._reasons)
            cast = None
            if reasons and self.policy.cast is not None and facts.dtype == torch.float32:
                cast_reasons, cast_reshape, cast_form = forms.choose(backend, facts.cast_to(self.policy.cast), self._reasons)
                if not cast_reasons:
                    reasons, reshape_4d, cast, form = cast_reasons, cast_reshape, self.policy.cast, cast_form
            if reasons:
                tried.append((name, tuple(reasons)))
                continue
            if tried:
                self._warn_fallback(name, tried)
            return Decision(backend, reshape_4d, tuple(tried), cast, form)
        hint = (
            "pass strict=False to let the site fall back"
            if self.policy.strict
            else "add a backend that can serve it to `fallback` (the default chain ends in 'sdpa')"
        )
        raise UnsupportedCall(self.site, facts, {n: list(r) for n, r in tried}, hint=hint)

    def _decide_auto(self, facts: CallFacts, refused: dict[str, str] | None, args: tuple | None) -> Decision:
        names = self.policy.candidates
        choice = TUNER.lookup(facts, names)
        if choice is None and args is not None:
            choice = TUNER.choose(
                facts,
                args,
                lambda backend, reshape_4d: _runner(
                    backend, reshape_4d, self.site, facts=facts, form=forms.choose(backend, facts, self._reasons)[2]
                ),
                names,
            )
            self.tuning_seconds += choice.seconds
        tried: list[tuple[str, tuple[str, ...]]] = []
        if choice is None:
            ranked = [UNTUNED_DEFAULT]
            tried.append((AUTO, ("not tuned: first met inside torch.compile (or on a tensor subclass); "
                                 "run one eager call first, or load a tuning file",)))
        else:
            ranked = [choice.backend, *(n for n in choice.ranked() if n != choice.backend)]
        for name in dict.fromkeys([*ranked, UNTUNED_DEFAULT]):
            backend = registry._backends.get(name)
            if refused and name in refused:
                tried.append((name, (refused[name],)))
                continue
            if backend is None or backend.unavailable_reason is not None:
                continue
            reasons, reshape_4d, form = forms.choose(backend, facts, self._reasons)
            if reasons:  # a decision made eagerly, met again inside a compiled graph
                tried.append((name, tuple(reasons)))
                continue
            return Decision(backend, reshape_4d, tuple(tried), form=form)
        raise UnsupportedCall(self.site, facts, {n: list(r) for n, r in tried}, hint="auto found no backend")

    def _reasons(self, backend: Backend, facts: CallFacts) -> tuple[list[str], bool]:
        """``backend.reasons(facts)``; a user's ``supports`` that raises names the site and backend."""
        try:
            return backend.reasons(facts)
        except AttnSwapError:
            raise
        except Exception as exc:
            raise AttnSwapError(
                f"backend {backend.name!r}: deciding whether it can serve the call at site {self.site or '<root>'} "
                f"raised {type(exc).__name__}: {exc} ({facts.describe()}). Fix its `supports` function: it takes "
                "the call's CallFacts and returns a list of reasons (empty when it can serve the call)."
            ) from exc

    def _warn_fallback(self, used: str, tried: list[tuple[str, tuple[str, ...]]]) -> None:
        key = (self.site_class, tuple(tried))
        with _warned_lock:
            if key in _warned:
                return
            _warned.add(key)
        why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in tried)
        logger.warning("attnswap: %s falls back to %r (%s)", self.site_class or self.site, used, why)

    def _after_refusal(self, plan, refusal, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        """A backend found at run time that it cannot serve this signature: remember, fall back."""
        facts = facts_of(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        sig = _signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        refused = dict(self._refused.get(sig, {}))
        refused[plan.tally.backend] = refusal.reason
        with self._lock:
            self._refused[sig] = refused
            self._fixed = None  # the signature-free shortcut cannot hold refusals
        new = self._plan_for(facts, refused)
        with self._lock:
            self._plans[sig] = new
        new.tally.calls += 1
        return new.run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    # -- tracing ---------------------------------------------------------------------------
    def _unusual(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if isinstance(query, torch.fx.Proxy):
            return self._trace_fx(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if _is_compiling():
            fixed = self._fixed
            if fixed is not None and (attn_mask is None or type(attn_mask) is _Tensor):
                # a backend that takes every call: no facts, so no sizes to specialize on, and a
                # graph traced with dynamic shapes (a second batch size) holds it for every size
                _note_fixed_traced(self._token)
                return fixed.run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
            facts = replace(facts_of(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa), in_graph=True)
            # a decision may depend on sizes (a kernel's limits): under dynamic shapes each size is
            # pinned, so this graph is guarded to the sizes the decision was made for
            name, reshape_4d, cast = _decide_while_tracing(self._token, _pinned(facts_key(facts)))
            run = _runner(registry._backends[name], reshape_4d, self.site, None if cast is None else DTYPES[cast], facts)
            return run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        # a tensor subclass (FakeTensor under export, DTensor, ...): same decision, not cached
        facts = facts_of(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        plan = self._plan_for(facts)
        plan.tally.calls += 1
        return plan.run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    def _trace_fx(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        tracer = query.tracer
        root = getattr(tracer, "root", None)
        path = None
        if isinstance(root, torch.nn.Module):
            for name, module in root.named_modules(remove_duplicate=False):
                if module.__dict__.get(ROUTER_ATTR) is self:
                    path = name
                    break
        if path is None:
            raise AttnSwapError(
                f"torch.fx is tracing attention site {self.site or '<root>'} outside the model it was patched in; "
                "trace the patched model itself, or unpatch before tracing"
            )
        target = f"{path}.{ROUTER_ATTR}" if path else ROUTER_ATTR
        router_node = tracer.create_proxy("get_attr", target, (), {})
        return tracer.create_proxy(
            "call_function",
            call_router,
            (router_node, query, key, value),
            {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa},
        )


class _Unrouted:
    """Stands in for a router that is gone: rerouted code whose module another thread unpatched
    while this call was in flight makes the call the module's original code makes."""

    __slots__ = ()
    route = staticmethod(torch.nn.functional.scaled_dot_product_attention)

    def __repr__(self) -> str:
        return "<attnswap: unpatched while in flight; plain SDPA>"


#: what rerouted code calls when its module has no router any more (see :class:`_Unrouted`)
UNROUTED = _Unrouted()


def _registry_changed() -> None:
    for router in list(_live_routers.values()):
        with router._lock:
            router._reset()


registry.on_change(_registry_changed)


def call_router(router: Router, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The node a torch.fx trace of a patched site holds: calls the site's router."""
    return router.route(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


call_router.__module__ = "attnswap.routing"

def _assume_constant_result(fn: Callable) -> Callable:
    # torch.compiler.assume_constant_result imports torch._dynamo (about a second, and triton)
    # only to set this attribute; setting it here keeps `import attnswap` light. A test checks
    # that the public decorator still sets exactly this attribute.
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def _pin(size: int) -> int:
    """``size`` as a constant. Dynamo traces a symbolic size as an ``int`` whose ``int()`` stays
    symbolic, so the value is found by comparisons, each of which dynamo turns into a guard: the
    graph is then specialized to it (a plain int just runs the loop)."""
    if size < 0:
        return -_pin(-size)
    hi = 1
    while size >= hi:
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size >= mid:
            lo = mid
        else:
            hi = mid
    return lo


def _pinned(value: Any) -> Any:
    """``value`` (the facts of a traced call) with every size pinned (see :func:`_pin`)."""
    if isinstance(value, (tuple, list)):
        return tuple(_pinned(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _pin(value)
    return value


@_assume_constant_result
def _note_fixed_traced(token: int) -> int:
    """Runs eagerly while dynamo traces a call of a backend that takes every call: counted."""
    router = _live_routers[token]
    if router._fixed is not None:
        router._fixed.tally.traced += 1
    return 0


@_assume_constant_result
def _decide_while_tracing(token: int, key: tuple) -> tuple[str, bool, str | None]:
    """Runs eagerly while dynamo traces: the decision (and its bookkeeping) never enters the graph."""
    router = _live_routers[token]
    d = router.decide(facts_from_key(key))
    router._tally(d.backend.name, d.tried, d.cast).traced += 1
    return d.backend.name, d.reshape_4d, None if d.cast is None else DTYPE_NAMES[d.cast]
