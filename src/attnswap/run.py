"""Run an unmodified script with every model it builds patched: ``attnswap run``.

The way ``python -m cProfile`` wraps a script: the script runs as ``__main__`` with its own
``sys.argv``, and a global forward pre-hook patches each module the first time it is called
from outside any model already patched. That is every model the script builds (timm,
torchvision, transformers, diffusers or plain ``nn.Module``), whatever built it, before its
first forward; its submodules are marked with it, so the hook costs one set lookup per module
call afterwards. When the script ends (or raises, or calls ``sys.exit``), the per-site
statistics of every patched model are printed to stderr, and the models still alive are
unpatched.

A model that is itself an attention module, called directly, has its first call already
bound to its unpatched ``forward`` when a pre-hook runs: that one call computes as before and
is counted as not routed, with the reason. Models only ever run through ``model.forward(...)``
(never ``model(...)``) are not seen.
"""

from __future__ import annotations

import runpy
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .api import patch, site_stats, unpatch
from .report import ModelStats
from .routing import ROUTER_ATTR, Router


@dataclass
class _Patched:
    label: str
    #: (site path, router): kept to print the counts at the end, also of models collected by then
    routers: list[tuple[str, Router]] = field(default_factory=list)


class ScriptPatcher:
    """Patches every model on its first call while installed (a context manager)."""

    def __init__(self, backend: str, **patch_kwargs: Any) -> None:
        self.backend = backend
        self.patch_kwargs = patch_kwargs
        self.patched: list[_Patched] = []
        self.errors: list[str] = []
        self._seen: weakref.WeakSet = weakref.WeakSet()
        #: the models patched, weakly: those still alive at the end are unpatched
        self._roots: list[weakref.ref] = []
        self._lock = threading.RLock()
        self._handle: Any = None

    def __enter__(self) -> ScriptPatcher:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._first_call)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for ref in self._roots:  # what patching changed outside the models (configs, classes) goes back too
            model = ref()
            if model is not None:
                unpatch(model)

    def _first_call(self, module: torch.nn.Module, args: tuple) -> None:
        if module in self._seen or torch.compiler.is_compiling():
            return
        with self._lock:
            if module in self._seen:
                return
            for m in module.modules():
                self._seen.add(m)
            try:
                patch(module, backend=self.backend, **self.patch_kwargs)
            except Exception as exc:  # the script runs on; the reason is printed at the end
                self.errors.append(f"{type(module).__name__}: {type(exc).__name__}: {exc}")
                if self.patch_kwargs.get("strict"):
                    raise
                return
            routers = [(p, m.__dict__[ROUTER_ATTR]) for p, m in module.named_modules() if ROUTER_ATTR in m.__dict__]
            if not routers:
                return
            root = module.__dict__.get(ROUTER_ATTR)
            if root is not None:
                root.note_settled("the first call of an attention module called directly, made before it was patched")
            self.patched.append(_Patched(f"{type(module).__name__} #{len(self.patched) + 1}", routers))
            self._roots.append(weakref.ref(module))

    def summary(self) -> str:
        lines = []
        for p in self.patched:
            stats = ModelStats(site_stats(path, router) for path, router in p.routers)
            lines.append(f"attnswap run: {p.label}, backend {self.backend}")
            lines.append(str(stats))
        if not self.patched:
            lines.append(f"attnswap run: the script called no model with attention (backend {self.backend})")
        lines += [f"attnswap run: could not patch {e}" for e in self.errors]
        return "\n".join(lines)


def run_script(
    target: str, args: Sequence[str], *, module: bool = False, backend: str = "sdpa",
    print_to: Callable[[str], None] | None = None, **patch_kwargs: Any,
) -> int:
    """Run ``target`` (a script path, or a module name with ``module=True``) as ``__main__``
    with ``args`` as its arguments, every model it calls patched with ``backend``; returns its
    exit status and prints the per-site statistics when it ends."""
    print_to = print_to or (lambda text: print(text, file=sys.stderr))
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    sys.argv = [target, *args]
    status = 0
    patcher = ScriptPatcher(backend, **patch_kwargs)
    try:
        with patcher:
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                import os

                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)
    finally:
        sys.argv = saved_argv
        if not module and saved_path0 is not None and sys.path and sys.path[0] != saved_path0:
            sys.path.pop(0)
        print_to(patcher.summary())
    return status
