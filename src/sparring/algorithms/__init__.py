"""The methods: one module (or package) per method under ``algorithms/``, each with a plain ``run(cfg)``.

A method module defines ``run(cfg, *, force=False)`` and ``READS``, the config sections and fields
(dotted prefixes of ``RunConfig``) it reads. Built-in methods are imported on demand by name; a method
defined elsewhere (a test, a user package) joins with ``register(name, module)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BUILTIN = ("spin", "tspin", "tpaw", "lsp", "sft")
_registered: dict[str, ModuleType] = {}


def names() -> tuple[str, ...]:
    return BUILTIN + tuple(n for n in _registered if n not in BUILTIN)


def module(method: str) -> ModuleType:
    """The module of ``method``, imported on demand."""
    if method in _registered:
        return _registered[method]
    if method not in BUILTIN:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(names())}")
    return importlib.import_module(f"sparring.algorithms.{method}")


def get(method: str):
    """The ``run(cfg, force=...)`` of a method."""
    return module(method).run


def reads(method: str) -> tuple[str, ...]:
    """The config sections and fields ``method`` reads (its module's ``READS``)."""
    return tuple(module(method).READS)


def register(name: str, method_module: ModuleType) -> None:
    """Make ``name`` a method: ``method_module`` has ``run(cfg, *, force=False)`` and ``READS``."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in method")
    for attr in ("run", "READS"):
        if not hasattr(method_module, attr):
            raise ValueError(f"a method module needs {attr!r}; {method_module.__name__} has none")
    _registered[name] = method_module


def unregister(name: str) -> None:
    _registered.pop(name, None)
