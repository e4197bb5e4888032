"""MONAI imported without the optional libraries of MONAI modules threedino-pipe never uses.

``import monai`` runs every MONAI module, and some of them import large optional libraries at once:
``monai.networks.nets.transchex`` transformers' BERT (when transformers is installed: the ``natural`` extra,
and the test extra), ``monai.transforms.signal`` and ``monai.data.ultrasound_confidence_map``
``scipy.signal``, ``monai.visualize`` and ``monai.optimizers.lr_finder`` ``matplotlib.pyplot``,
``monai.transforms.utils`` ``skimage.morphology``. Together they made every command that imports MONAI 6-8 s
slower to start on 2 cores (``benchmarks/import_time.py``). threedino-pipe uses none of those MONAI parts (its
MONAI imports: the intensity and flip transforms, losses, Dice, UNETR blocks, SwinUNETR, the sliding-window
helpers), so :func:`install` (called by ``threedino_pipe/__init__.py``) makes those libraries read as not
installed while MONAI's own package runs its imports, and only then: afterwards they import as usual
(``models.natural2d`` imports transformers, the plots matplotlib.pyplot). The MONAI parts that needed them
raise MONAI's "optional import" error if called. A library imported before MONAI is left as it is, and where
MONAI was imported before threedino_pipe nothing changes.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType

#: optional libraries of MONAI modules threedino-pipe does not use, hidden while MONAI's package imports
HIDDEN = ("transformers", "scipy.signal", "matplotlib.pyplot", "skimage.morphology")


class _HideWhileRunning(importlib.abc.Loader):
    """Wraps MONAI's package loader: while its ``__init__`` runs, ``sys.modules[name]`` is None for each name of
    HIDDEN not imported yet (importing it raises ImportError, which MONAI's optional imports expect)."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hidden = [name for name in HIDDEN if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            self._inner.exec_module(module)
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]

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
                    spec.loader = _HideWhileRunning(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the MONAI finder first on ``sys.meta_path`` (once; a no-op when MONAI is imported already)."""
    if "monai" in sys.modules or any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MonaiFinder())
