"""MONAI imported without transformers' BERT (runtime.lean_monai), transformers importable afterwards."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

from threedino_pipe.runtime.lean_monai import _HideTransformersWhileRunning

CHECK = """
import sys
import threedino_pipe, monai
from monai.networks.nets import UNETR
print("during", "transformers" in sys.modules, sorted(m for m in sys.modules if m.startswith("transformers")))
import transformers
from transformers import Dinov2Config
print("after", Dinov2Config.model_type, type(sys.modules["transformers"]).__name__)
"""


def test_monai_loads_without_transformers_which_imports_afterwards():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "during False []" in done.stdout  # no transformers module was loaded by MONAI's package import
    assert "after dinov2 _LazyModule" in done.stdout  # the real transformers package, not the hiding None


def test_transformers_stays_importable_when_monai_fails_to_import(monkeypatch):
    class Failing:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            assert sys.modules["transformers"] is None  # hidden while MONAI's package runs
            raise ImportError("broken install")

    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    with pytest.raises(ImportError, match="broken install"):
        _HideTransformersWhileRunning(Failing()).exec_module(ModuleType("monai"))
    assert "transformers" not in sys.modules
