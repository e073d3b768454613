"""Which patched modules still need a change an integration made outside them (a shared
config switched, a processor class rewritten), so that it is undone exactly once: when the
last of them is unpatched, or collected without being unpatched."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch


class Holders:
    """Modules holding each changed object; ``undo(obj)`` runs when none is left.

    Objects are kept by identity and weakly (configs and classes need not be hashable, and
    a collected one needs no undo)."""

    def __init__(self, undo: Callable[[Any], None]) -> None:
        self._undo = undo
        self._lock = threading.RLock()
        #: id(obj) -> (obj, modules holding it)
        self._held: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}

    def hold(self, obj: Any, module: torch.nn.Module) -> bool:
        """``module`` needs ``obj`` changed; True when nothing held it before (make the change now)."""
        with self._lock:
            entry = self._held.get(id(obj))
            first = entry is None or entry[0]() is not obj
            if first:
                entry = (weakref.ref(obj), weakref.WeakSet())
                self._held[id(obj)] = entry
            if module not in entry[1]:
                entry[1].add(module)
                weakref.finalize(module, self._undo_if_unheld, id(obj))
            return first

    def release(self, obj: Any, module: torch.nn.Module) -> bool:
        """``module`` no longer needs ``obj``; undoes the change if no module does. False when
        ``obj`` was not held at all (a copied or unpickled model's own object)."""
        with self._lock:
            entry = self._held.get(id(obj))
            if entry is None or entry[0]() is not obj:
                return False
            entry[1].discard(module)
            self._undo_if_unheld(id(obj))
            return True

    def _undo_if_unheld(self, key: int) -> None:
        with self._lock:
            entry = self._held.get(key)
            if entry is None or any(True for _ in entry[1]):  # (iterating skips collected modules)
                return
            del self._held[key]
            obj = entry[0]()
            if obj is not None:
                self._undo(obj)
