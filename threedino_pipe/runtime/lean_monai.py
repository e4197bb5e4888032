"""MONAI imported without the transformers models it would load at once.

``import monai`` runs every MONAI module; one of them (``monai.networks.nets.transchex``) imports transformers'
BERT whenever transformers is installed (the ``natural`` extra, and the test extra), which made every command
that imports MONAI about 6 s slower on 2 cores (torch + MONAI + SimpleITK: 14.5 s with transformers
installed, 8.5 s without; ``benchmarks/import_time.py``). No part of threedino-pipe uses those MONAI networks,
so :func:`install` (called by ``threedino_pipe/__init__.py``) makes transformers read as not installed while
MONAI's own package runs its imports, and only then: afterwards ``import transformers`` works as usual
(``models.natural2d``). MONAI's transformers-based networks then raise MONAI's "optional import" error if
called. Where MONAI or transformers was imported before threedino_pipe, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType

_HIDDEN = "transformers"


class _HideTransformersWhileRunning(importlib.abc.Loader):
    """Wraps MONAI's package loader: while its ``__init__`` runs, ``sys.modules["transformers"]`` is None
    (importing it raises ImportError, which MONAI's optional imports expect)."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hide = _HIDDEN not in sys.modules
        if hide:
            sys.modules[_HIDDEN] = None  # type: ignore[assignment]
        try:
            self._inner.exec_module(module)
        finally:
            if hide and sys.modules.get(_HIDDEN, ModuleType(_HIDDEN)) is None:
                del sys.modules[_HIDDEN]

    def __getattr__(self, name: str):  # is_package, get_resource_reader, ... of the wrapped loader
        return getattr(self._inner, name)


class _MonaiFinder(importlib.abc.MetaPathFinder):
    """Finds ``monai`` with the other finders and wraps its loader (every other name: not ours)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "monai":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HideTransformersWhileRunning(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the MONAI finder first on ``sys.meta_path`` (once; a no-op when MONAI is imported already)."""
    if "monai" in sys.modules or any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MonaiFinder())
