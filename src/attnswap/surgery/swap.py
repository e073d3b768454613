"""The in-place swap of one module, and its exact restore.

Patching a module: force the flags that gate its SDPA path (timm's per-instance
``fused_attn``), remembering what they were; attach its router; swap in the generated
subclass. Unpatching undoes exactly those three things, so class, flags and ``__dict__``
are as before and nothing is left behind. Parameters, buffers and submodules are never
touched, so ``state_dict`` is identical.
"""

from __future__ import annotations

import torch

from ..errors import PatchError
from ..routing import ROUTER_ATTR, Router
from . import mha
from .reroute import ClassRewrite, original_class, patched_class


#: marks a module patched only so that the bias it builds travels as structure (no router)
SOURCE_ATTR = "_attnswap_bias_source"


def router_of(module: torch.nn.Module) -> Router | None:
    return module.__dict__.get(ROUTER_ATTR)


def is_bias_source(module: torch.nn.Module) -> bool:
    return SOURCE_ATTR in module.__dict__


def install_source(module: torch.nn.Module, rewrite: ClassRewrite) -> None:
    """Swap ``module`` to the class whose bias builders return structures (``rewrite.builds_only``)."""
    module.__dict__[SOURCE_ATTR] = rewrite.structures
    module.__class__ = patched_class(rewrite)


def uninstall_source(module: torch.nn.Module) -> None:
    module.__dict__.pop(SOURCE_ATTR)
    module.__class__ = original_class(module)


def check_installable(module: torch.nn.Module, rewrite: ClassRewrite) -> str | None:
    """Why this instance cannot take the rewrite (an instance-level override would hide it)."""
    shadowed = [name for name in rewrite.methods if name in module.__dict__]
    if shadowed:
        return f"instance attribute {shadowed[0]!r} overrides the class method attnswap would reroute"
    return None


def install(module: torch.nn.Module, rewrite: ClassRewrite, router: Router) -> None:
    """Swap ``module`` to its rerouted class with ``router``; switches the router if already patched."""
    previous = router_of(module)
    if previous is not None:
        router.saved_flags = previous.saved_flags
    else:
        router.saved_flags = {}
        for flag in rewrite.gate_flags:
            current = getattr(module, flag, None)
            if isinstance(current, bool) and current is not True:
                router.saved_flags[flag] = (flag in module.__dict__, module.__dict__.get(flag))
    for flag in router.saved_flags:
        module.__dict__[flag] = True
    if rewrite.mha:
        if previous is not None:
            router.hook_ids = previous.hook_ids
        else:
            router.hook_ids = [module.register_forward_pre_hook(mha.disable_fast_paths).id]
    module.__dict__[ROUTER_ATTR] = router
    if rewrite.integration is not None:
        from .. import integrations

        router.integration = rewrite.integration
        if previous is not None:  # switching backends: the hooks the integration added stay, once
            router.hook_ids = previous.hook_ids
        integrations.attach(rewrite.integration, module)
        return
    module.__class__ = patched_class(rewrite)


def uninstall(module: torch.nn.Module) -> Router:
    """Restore ``module`` exactly as it was before it was first patched; returns the router removed."""
    router = module.__dict__.pop(ROUTER_ATTR, None)
    if router is None:
        raise PatchError(f"{type(module).__qualname__} is not patched")
    module.__class__ = original_class(module)
    if router.integration is not None:
        from .. import integrations

        integrations.detach(router.integration, module)
    for hook_id in router.hook_ids:
        module._forward_pre_hooks.pop(hook_id, None)
    for flag, (was_set, value) in router.saved_flags.items():
        if was_set:
            module.__dict__[flag] = value
        else:
            module.__dict__.pop(flag, None)
    return router
