"""diffusers: ``Attention`` modules reached through the processor that computes their attention.

A diffusers attention module (the legacy ``Attention``, or a class with ``AttentionModuleMixin``
such as Flux's) projects nothing itself: it calls ``self.processor(self, hidden_states, ...)``,
and the processor either calls SDPA (``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``) or
``dispatch_attention_fn`` (Flux and the newer models), always with the module as the argument
``attn``. attnswap rewrites the processor class's ``__call__`` once: its SDPA calls go to the
router of ``attn``, and its ``dispatch_attention_fn`` calls go to :func:`routed_dispatch`,
which runs diffusers' own native backend with the SDPA call routed. A module without a router
(another model using the same processor class) gets exactly diffusers' own calls.

Why the class, in place, and not diffusers' own switches: its attention backends are a closed
enum selected globally or per processor without the module, and do not reach the legacy
processors at all; a processor of a generated class would fail diffusers' own
``type(processor) in CROSS_ATTENTION_PROCESSORS`` checks (``set_default_attn_processor``).
Rewriting ``__call__`` on the class keeps every processor object, its class, its weights (IP-Adapter
processors are modules) and the module's ``state_dict``; the original ``__call__`` is put back
when the last patched module using that class is unpatched.

A processor set after patching (``set_processor``, LoRA or IP-Adapter loading,
``set_default_attn_processor``) is met by a forward pre-hook on each patched module: its class
is rewritten then, or, when it cannot be (attention computed by hand, xformers), each call is
counted as computed by the module itself, with the reason, in :func:`attnswap.stats`.
"""

from __future__ import annotations

import ast
import inspect
import threading
import types
import weakref
from typing import Any, Callable

import torch

from ..backends.optional import OptionalPackage
from ..routing import ROUTER_ATTR
from ..surgery import helpers, reroute
from ..surgery.reroute import ClassRewrite
from ..surgery.source import NotRewritable, compile_like, local_names, parse_method, resolve
from . import why_unreachable
from .holders import Holders

PACKAGE = OptionalPackage(modules=("diffusers",), dist="diffusers", minimum="0.35", below="1")

DISPATCH_NAME = "__attnswap_dispatch__"
#: on a patched module: the processor class rewritten for it (the hook's check, one attribute read)
PROCESSOR_ATTR = "_attnswap_processor_class"

_lock = threading.RLock()
#: processor class -> its rewritten ``__call__`` and how many attention calls it routes, or why not
_rewrites: dict[type, tuple[Callable, int] | str] = {}
#: rewritten processor class -> (whether ``__call__`` was its own attribute, the original)
_originals: dict[type, tuple[bool, Any]] = {}
#: patched module -> the processor classes it made attnswap rewrite
_classes_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_native_copy: Callable | None = None


def ensure_registered() -> None:
    """Nothing is registered with diffusers: the rewrites are made when a module is met."""
    PACKAGE.load()


# -- the dispatch path ---------------------------------------------------------------------
def _native() -> Callable:
    """diffusers' native backend, its SDPA call routed to the module given as ``_attnswap_module``."""
    global _native_copy
    if _native_copy is not None:  # (read without the lock: this runs at every call, also inside torch.compile)
        return _native_copy
    with _lock:
        if _native_copy is None:
            try:
                from diffusers.models.attention_dispatch import _native_attention
            except ImportError as exc:
                raise NotRewritable(f"diffusers has no native attention backend to route ({exc})") from None
            made = helpers.helper_copy(_native_attention)
            if not isinstance(made, helpers.HelperCopy):
                raise NotRewritable(f"diffusers' native attention cannot be rewritten: {made}")
            _native_copy = made.call
        return _native_copy


def routed_dispatch(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False, attention_kwargs: dict[str, Any] | None = None, *,
    backend: Any = None, parallel_config: Any = None,
) -> torch.Tensor:
    """``dispatch_attention_fn`` for ``module``: the calls diffusers would run with its native
    (SDPA) backend go to the module's router through diffusers' own native code; the others
    (a backend the processor names, context parallelism, a global backend other than native)
    run as diffusers runs them, counted with the reason."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn,
    )

    router = module.__dict__.get(ROUTER_ATTR)
    if router is not None:
        if backend is not None:
            why = f"the processor asks diffusers for its {getattr(backend, 'value', backend)!r} attention backend"
        elif parallel_config is not None:
            why = "context parallelism (parallel_config) runs in diffusers"
        elif attention_kwargs:
            why = f"diffusers attention_kwargs {sorted(attention_kwargs)} are not SDPA's"
        else:
            name = _AttentionBackendRegistry._active_backend
            if name == AttentionBackendName.NATIVE:
                if _AttentionBackendRegistry._checks_enabled:
                    for check in _AttentionBackendRegistry._constraints.get(name, ()):
                        check(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
                return _native()(
                    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _attnswap_module=module
                )
            why = f"diffusers' active attention backend is {getattr(name, 'value', name)!r}"
        router.note_settled(why)
    return dispatch_attention_fn(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
        backend=backend, parallel_config=parallel_config,
    )


# -- rewriting a processor class -------------------------------------------------------------
def _original_call(proc_cls: type) -> Callable | None:
    with _lock:
        original = _originals.get(proc_cls)
    if original is not None:
        return original[1] if original[0] else None
    fn = getattr(proc_cls, "__call__", None)
    return fn if isinstance(fn, types.FunctionType) else None


def rewrite_processor(proc_cls: type) -> tuple[Callable, int] | str:
    """``proc_cls.__call__`` with its attention routed to its ``attn`` argument's router, and the
    number of attention calls in it; or why not. Made once per class."""
    with _lock:
        if proc_cls in _rewrites:
            return _rewrites[proc_cls]
        fn = _original_call(proc_cls) or getattr(proc_cls, "__call__", None)
        fn = getattr(fn, "__attnswap_original__", fn)  # inherited from a class rewritten now: its original
        try:
            made: tuple[Callable, int] | str = _rewrite(proc_cls, fn)
        except NotRewritable as exc:
            made = f"{proc_cls.__qualname__}.__call__: {exc}"
        _rewrites[proc_cls] = made
        return made


def _rewrite(proc_cls: type, fn: Any) -> tuple[Callable, int]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if not isinstance(fn, types.FunctionType):
        raise NotRewritable("it is not a Python function")
    params = list(inspect.signature(fn).parameters)
    if len(params) < 2:
        raise NotRewritable("it does not take the attention module as its first argument")
    attn = params[1]
    funcdef = parse_method(fn, is_method=True)
    names = local_names(funcdef)
    sdpa = reroute._Rewriter(fn, attn, names)
    funcdef = sdpa.visit(funcdef)
    if sdpa.stray:
        raise NotRewritable(f"it uses {sdpa.stray[0]} other than by calling it")
    dispatches = 0
    for node in ast.walk(funcdef):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            if resolve(node.func, fn, names) is dispatch_attention_fn:
                node.func = ast.copy_location(ast.Name(id=DISPATCH_NAME, ctx=ast.Load()), node.func)
                node.args.insert(0, ast.Name(id=attn, ctx=ast.Load()))
                dispatches += 1
    if not (sdpa.calls or dispatches):
        raise NotRewritable(
            "it calls neither scaled_dot_product_attention nor dispatch_attention_fn (attention computed by hand, "
            "or by another library such as xformers)"
        )
    cells = {reroute.UNROUTED_NAME: reroute.UNROUTED, DISPATCH_NAME: routed_dispatch, **sdpa.builders}
    return compile_like(fn, funcdef, cells), sdpa.calls + dispatches


def _give_back(proc_cls: type) -> None:
    own, original = _originals.pop(proc_cls)
    if own:
        proc_cls.__call__ = original
    else:
        del proc_cls.__call__


#: the processor classes whose ``__call__`` is rewritten, and the patched modules using each
_holders = Holders(_give_back)


def _install_class(proc_cls: type, module: torch.nn.Module) -> str | None:
    """Rewrite ``proc_cls.__call__`` in place (once) for ``module``; why not, if it cannot be."""
    made = rewrite_processor(proc_cls)
    if isinstance(made, str):
        return made
    with _lock:
        if _holders.hold(proc_cls, module):
            _originals[proc_cls] = ("__call__" in proc_cls.__dict__, proc_cls.__dict__.get("__call__"))
            proc_cls.__call__ = made[0]
        _classes_of.setdefault(module, set()).add(proc_cls)
    return None


def _release(module: torch.nn.Module) -> None:
    with _lock:
        for proc_cls in _classes_of.pop(module, set()):
            _holders.release(proc_cls, module)


# -- which modules -----------------------------------------------------------------------------
def _is_attention_module(module: torch.nn.Module) -> bool:
    return hasattr(module, "processor") and callable(getattr(module, "set_processor", None))


def site_for(module: torch.nn.Module, cls: type) -> ClassRewrite | None:
    if not _is_attention_module(module):
        return None
    processor = module.processor
    if processor is None:
        return None
    problem = why_unreachable(PACKAGE, _native, "diffusers")
    calls = 0
    if problem is None:
        made = rewrite_processor(type(processor))
        if isinstance(made, str):
            problem = f"its processor cannot be routed: {made}"
        else:
            calls = made[1]
    return ClassRewrite(
        cls, calls=calls, problem=problem, integration=__name__.rsplit(".", 1)[-1],
        integration_how=f"diffusers processor {type(processor).__name__}",
    )


def _check_processor(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a patched module: a processor set after patching is rewritten too, or
    its calls are counted as not routed, with the reason."""
    # two attribute reads when nothing changed: inside torch.compile they become guards on the
    # module, where a look into attnswap's global bookkeeping would guard on mutable sets
    proc_cls = type(module.processor)
    if module.__dict__.get(PROCESSOR_ATTR) is proc_cls or torch.compiler.is_compiling():
        return
    router = module.__dict__.get(ROUTER_ATTR)
    if router is None:
        return
    why = _install_class(proc_cls, module)
    if why is not None:
        router.note_settled(f"processor set after patching computes attention itself: {why}")
    else:
        module.__dict__[PROCESSOR_ATTR] = proc_cls


def attach(module: torch.nn.Module) -> None:
    router = module.__dict__[ROUTER_ATTR]
    proc_cls = type(module.processor)
    why = _install_class(proc_cls, module)
    if why is not None:  # site_for reported it: install refuses such sites before attach
        raise NotRewritable(why)
    module.__dict__[PROCESSOR_ATTR] = proc_cls
    if not router.hook_ids:
        router.hook_ids = [module.register_forward_pre_hook(_check_processor).id]


def detach(module: torch.nn.Module) -> None:
    module.__dict__.pop(PROCESSOR_ATTR, None)
    _release(module)
