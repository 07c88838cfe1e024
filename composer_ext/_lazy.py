"""Lazy package exports: ``from composer_ext.data import X`` imports only the module that defines X."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for a package whose public names live in submodules.

    ``exports`` maps a public name to the module that defines it: a submodule name relative to ``package``
    (``'corpus'``), or an absolute module path (``'composer_ext.fairness.bias'``) for a package that re-exports
    names defined elsewhere (the compatibility paths ``composer_ext.algorithms``, ``callbacks``, ``metrics``).
    A re-export is not an import: nothing is imported until the name is used.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = exports[name]
            return getattr(importlib.import_module(module if '.' in module else f'{package}.{module}'), name)
        raise AttributeError(f'module {package!r} has no attribute {name!r}')

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
