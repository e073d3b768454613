"""The backend registry: names users see, registration, lookup and listing.

Built-in backends register here at import; none of them imports an optional package
until it is first asked whether it is available.
"""

from __future__ import annotations

import difflib
import inspect
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import AttnSwapError
from .base import AttentionFn, Backend, FunctionBackend, Limits, SupportsFn

_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

ALIASES = {
    "torch": "sdpa",
    "math": "sdpa_math",
    "reference": "eager",
    "flash_sdpa": "sdpa_flash",
    "efficient": "sdpa_efficient",
    "mem_efficient": "sdpa_efficient",
    "cudnn": "sdpa_cudnn",
    "flex_attention": "flex",
    "flash2": "flash",
    "flash_attn": "flash",
    "fa2": "flash",
    "fa3": "flash3",
    "fa4": "flash4",
    "xformers_mea": "xformers",
    "sageattention": "sage",
    "sageattn": "sage",
}

_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_builtin_names: list[str] = []
#: built-ins a register_backend call replaced, restored by unregister_backend
_replaced_builtins: dict[str, Backend] = {}


_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every registration change (routers drop cached decisions)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in list(_listeners):
        listener()


def _add(backend: Backend, *, builtin: bool = False) -> None:
    with _lock:
        _backends[backend.name] = backend
        if builtin:
            _builtin_names.append(backend.name)
    _changed()


def resolve_name(name: str) -> str:
    """The canonical name for ``name`` (aliases resolved); raises with the closest match if unknown."""
    if not isinstance(name, str):
        raise AttnSwapError(f"a backend name must be a string, got {type(name).__name__}: {name!r}")
    key = ALIASES.get(name, name)
    if key in _backends:
        return key
    names = sorted(_backends)
    hint = _closest_hint(name, names + sorted(ALIASES))
    raise AttnSwapError(f"Unknown attention backend {name!r}.{hint} Valid names: {', '.join(names)}.")


def _closest_hint(name: str, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (case-insensitive), or ''."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    if not close:
        return ""
    found = lowered[close[0]]
    return f" Did you mean {ALIASES.get(found, found)!r}?"


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (or an alias of it)."""
    return _backends[resolve_name(name)]


def _accepted_params(fn: Callable) -> set[str] | None:
    """The SDPA keyword parameters ``fn`` takes, or None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise AttnSwapError(
            f"backend function {getattr(fn, '__qualname__', fn)!r} must take (query, key, value, ...) like "
            f"scaled_dot_product_attention; its signature is {sig}"
        )
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} & set(_SDPA_PARAMS)


def _missing_param_reasons(accepted: set[str]) -> Callable[[Any], list[str]]:
    """A backend function without, say, ``dropout_p`` cannot take a call with dropout."""

    def reasons(facts: Any) -> list[str]:
        out = []
        if "attn_mask" not in accepted and facts.has_mask:
            out.append(f"{facts.mask_kind} attn_mask (the function takes no attn_mask)")
        if "dropout_p" not in accepted and facts.dropout_p > 0:
            out.append(f"dropout_p={facts.dropout_p} (the function takes no dropout_p)")
        if "is_causal" not in accepted and facts.is_causal:
            out.append("is_causal (the function takes no is_causal)")
        if "scale" not in accepted and facts.scale is not None:
            out.append(f"custom scale {facts.scale:g} (the function takes no scale)")
        if "enable_gqa" not in accepted and facts.enable_gqa:
            out.append("enable_gqa (the function takes no enable_gqa)")
        return out

    return reasons


class _PartialSignatureBackend(FunctionBackend):
    """A user function that takes only some of SDPA's keyword arguments."""

    def __init__(self, name: str, fn: AttentionFn, accepted: set[str], **kwargs: Any) -> None:
        super().__init__(name, fn, **kwargs)
        self.accepted = accepted
        self._param_reasons = _missing_param_reasons(accepted)
        self.accepts_everything = False

    def extra_reasons(self, facts):
        return self._param_reasons(facts) + super().extra_reasons(facts)

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        given = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return self.fn(query, key, value, **{k: v for k, v in given.items() if k in self.accepted})


def register_backend(
    name: str,
    fn: AttentionFn | None = None,
    *,
    supports: SupportsFn | None = None,
    limits: Limits | dict[str, Limits] | None = None,
    description: str = "",
    exact: bool = True,
    varlen: Callable[..., Any] | None = None,
) -> Any:
    """Register an attention function as a backend users can name in :func:`attnswap.patch`.

    Args:
        name: the name to register (re-registering a name replaces it, with a warning).
        fn: a function with ``scaled_dot_product_attention``'s signature
            ``(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False)``. It may leave out keyword parameters it does not implement;
            calls that need them are then refused. Without ``fn``, returns a decorator.
        supports: ``supports(facts) -> list[str]``: every reason the function cannot take the
            call described by ``facts`` (:class:`attnswap.CallFacts`); an empty list means yes.
        limits: declared limits as data (:class:`attnswap.Limits`), or a dict of them per
            device type (``"*"`` for any other). Without ``supports`` and ``limits`` the backend
            is assumed to accept every call.
        description: one line for :func:`list_backends`.
        exact: False for approximate kernels; the router never falls back to those.
        varlen: optionally, the same attention over variable-length sequences packed along dim 0,
            flash-attn's ``flash_attn_varlen_func`` convention: ``varlen(query, key, value,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None,
            enable_gqa=False)`` with ``[T, H, E]`` tensors and int32 ``[B + 1]`` offsets, returning
            ``[Tq, H, Ev]``, no attention across sequences. A padded batch whose padding travels as
            structure (NaFlexViT) then runs in one call on its valid tokens (``fn``'s limits and
            ``supports`` apply to one sequence's unmasked call).

    Returns:
        ``fn`` unchanged (or a decorator that returns its function unchanged).

    Example::

        @attnswap.register_backend("mine")
        def mine(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise AttnSwapError(f"invalid backend name {name!r}: use a non-empty string other than 'auto'")
    if name in ALIASES:
        raise AttnSwapError(f"{name!r} is an alias of built-in backend {ALIASES[name]!r}; choose another name")

    def register(f: AttentionFn) -> AttentionFn:
        if not callable(f):
            raise AttnSwapError(f"backend {name!r}: expected a callable, got {type(f).__name__}")
        if supports is not None and not callable(supports):
            raise AttnSwapError(f"backend {name!r}: `supports` must be callable, got {type(supports).__name__}")
        if supports is not None:
            _check_supports_signature(name, supports)
        _check_limits(name, limits)
        accepted = _accepted_params(f)
        if varlen is not None and not callable(varlen):
            raise AttnSwapError(f"backend {name!r}: `varlen` must be callable, got {type(varlen).__name__}")
        kwargs = dict(supports=supports, limits=limits, description=description, exact=exact, varlen=varlen)
        if accepted is None or accepted == set(_SDPA_PARAMS):
            backend: Backend = FunctionBackend(name, f, **kwargs)
        else:
            backend = _PartialSignatureBackend(name, f, accepted, **kwargs)
        if name in _backends:
            kind = "built-in" if name in _builtin_names else "registered"
            warnings.warn(f"attnswap: replacing the {kind} backend {name!r}", stacklevel=3)
            if name in _builtin_names:
                _replaced_builtins.setdefault(name, _backends[name])
        _add(backend)
        return f

    if fn is None:
        return register
    return register(fn)


def _check_supports_signature(name: str, supports: Callable) -> None:
    try:
        inspect.signature(supports).bind(object())
    except TypeError as exc:
        raise AttnSwapError(
            f"backend {name!r}: `supports` must take one argument (the call's CallFacts) and return the "
            f"reasons it cannot serve it; {getattr(supports, '__qualname__', supports)!r} cannot: {exc}"
        ) from None
    except ValueError:  # a builtin without a signature: trust it
        pass


def _check_limits(name: str, limits: Any) -> None:
    if limits is None or isinstance(limits, Limits):
        return
    if isinstance(limits, dict) and all(isinstance(k, str) and isinstance(v, Limits) for k, v in limits.items()):
        return
    raise AttnSwapError(
        f"backend {name!r}: `limits` must be an attnswap.Limits, or a dict of device type ('cpu', 'cuda', "
        f"or '*' for any) to Limits; got {type(limits).__name__}: {limits!r}"
    )


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`.

    Built-ins cannot be removed; unregistering a function that replaced a built-in's name
    brings the built-in back."""
    if not isinstance(name, str):
        raise AttnSwapError(f"a backend name must be a string, got {type(name).__name__}: {name!r}")
    with _lock:
        if name in _builtin_names:
            original = _replaced_builtins.pop(name, None)
            if original is None:
                raise AttnSwapError(f"{name!r} is a built-in backend and cannot be unregistered")
            _backends[name] = original  # unregistering a replacement brings the built-in back
        elif name in ALIASES:
            raise AttnSwapError(
                f"{name!r} is an alias of the built-in backend {ALIASES[name]!r}; built-ins cannot be unregistered"
            )
        elif name not in _backends:
            mine = sorted(set(_backends) - set(_builtin_names))
            hint = _closest_hint(name, mine)
            listed = f"registered with register_backend: {', '.join(mine)}" if mine else "none is registered with register_backend"
            raise AttnSwapError(f"no backend named {name!r} is registered.{hint} ({listed})")
        else:
            del _backends[name]
    _changed()


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`list_backends`."""

    name: str
    available: bool
    reason: str
    description: str
    install_hint: str
    builtin: bool
    exact: bool
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BackendList(list):
    """The result of :func:`list_backends`: a list of :class:`BackendInfo` that prints as a table."""

    def __str__(self) -> str:
        from ..reporting import render_table

        rows = [
            (b.name, "yes" if b.available else "no", b.description if b.available else f"{b.reason}. {b.install_hint}".strip())
            for b in self
        ]
        return render_table("attention backends", ("backend", "available", "what / why not"), rows)


def list_backends(devices: Sequence[str] = ("cpu", "cuda")) -> BackendList:
    """Every backend, available or not, with the reason and its declared limits per device."""
    with _lock:
        backends = list(_backends.values())
    order = {n: i for i, n in enumerate(_builtin_names)}
    backends.sort(key=lambda b: (order.get(b.name, len(order)), b.name))
    out = BackendList()
    for b in backends:
        reason = b.unavailable_reason
        limits = {}
        for dev in devices:
            lim = b.limits(dev)
            limits[dev] = {} if lim is None else lim.summary()
        out.append(
            BackendInfo(
                name=b.name,
                available=reason is None,
                reason=reason or "",
                description=b.description,
                install_hint=b.install_hint,
                builtin=b.name in _builtin_names,
                exact=b.exact,
                limits=limits,
            )
        )
    return out
