"""One loop file per method, each a plain ``run(cfg)``."""

import importlib

METHODS = ("spin", "tspin", "tpaw", "lsp")


def get(method: str):
    """The ``run(cfg, force=...)`` of a method, imported on demand."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return importlib.import_module(f"sparring.algorithms.{method}").run
