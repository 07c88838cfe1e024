"""Lazy package exports: ``from composer_ext.data import X`` imports only the module that defines X."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for a package whose public names live in submodules.

    ``exports`` maps a public name to the submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f'{package}.{exports[name]}'), name)
        raise AttributeError(f'module {package!r} has no attribute {name!r}')

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
