"""Reversible patching: every change a method makes to a model is recorded here and undone in reverse order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class Undo:
    """A log of reversible changes. `remove()` restores every attribute and hook, last change first.

    A method's `apply()` returns one; it may also set `cache_factory` (a callable `(model) -> Cache`) when the
    method needs its own KV cache during chunked prefill and `generate()`.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.cache_factory: Callable[[Any], Any] | None = None
        self.removed = False

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name = value`, remembering the old value (or its absence) for `remove()`."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        # nn.Module keeps buffers/params/submodules outside __dict__; fall back to getattr for those.
        if old is _MISSING and hasattr(obj, name):
            old = getattr(obj, name)
            restore_by_delete = False
        else:
            restore_by_delete = old is _MISSING
        setattr(obj, name, value)

        def restore() -> None:
            if restore_by_delete:
                if name in getattr(obj, "__dict__", {}):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(restore)

    def shadow(self, obj: Any, name: str, function: Callable) -> None:
        """Shadow a method of `obj` with an instance attribute; `remove()` deletes it again, restoring the class's
        method exactly (where `setattr` would leave a bound copy behind in the instance). The one way lengthwise
        overrides a method on an instance; a second override of the same name is refused."""
        if name in obj.__dict__:
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance")
        obj.__dict__[name] = function
        self._undo.append(lambda: obj.__dict__.pop(name, None))

    def add(self, restore: Callable[[], None]) -> None:
        """Register an arbitrary restore action (e.g. a hook handle's `remove`)."""
        self._undo.append(restore)

    def extend(self, other: Undo) -> None:
        self._undo.extend(other._undo)
        other._undo = []
        if other.cache_factory is not None:
            self.cache_factory = other.cache_factory

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.removed = True
