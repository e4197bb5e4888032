"""MONAI imported without the optional libraries of its parts we never use (runtime.lean_monai), each importable
afterwards."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

from threedino_pipe.runtime.lean_monai import HIDDEN, _HideWhileRunning

CHECK = """
import sys
import threedino_pipe, monai
from monai.networks.nets import UNETR
from monai.transforms import RandHistogramShift
print("loaded", sorted(m for m in sys.modules if m.startswith(HIDDEN)))
import matplotlib.pyplot, scipy.signal, skimage.morphology
from transformers import Dinov2Config
print("after", Dinov2Config.model_type, type(sys.modules["transformers"]).__name__, scipy.signal.hilbert.__name__)
"""


def test_monai_loads_without_the_hidden_libraries_which_import_afterwards():
    done = subprocess.run([sys.executable, "-c", f"HIDDEN = {HIDDEN!r}" + CHECK], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loaded []" in done.stdout  # none of them (nor a submodule) was loaded by MONAI's package import
    assert "after dinov2 _LazyModule hilbert" in done.stdout  # the real packages, not the hiding None


def test_the_hidden_libraries_stay_importable_when_monai_fails_to_import(monkeypatch):
    class Failing:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            assert all(sys.modules[name] is None for name in HIDDEN)  # hidden while MONAI's package runs
            raise ImportError("broken install")

    for name in HIDDEN:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match="broken install"):
        _HideWhileRunning(Failing()).exec_module(ModuleType("monai"))
    assert not set(HIDDEN) & set(sys.modules)
