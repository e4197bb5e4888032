"""Patch probe of given SSL checkpoints' teachers, as ``pretrain_value.py`` scores them (item (c) of its record).

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/probe_checkpoints.py PREPROCESSED_DATASET OUT.json CHECKPOINT [CHECKPOINT ...]

The probe (``training.feature_probe``: logistic regression on last-layer patch tokens) is fitted on
the cases of fold 0's training and validation lists and scored (balanced accuracy) on the
dataset's test list; the figures go to ``OUT.json`` keyed by checkpoint path.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_value import probe_cases, probe_pairs  # noqa: E402

from threedino_pipe.training.feature_probe import balanced_accuracy  # noqa: E402
from threedino_pipe.training.ssl_trainer import load_ssl_pair  # noqa: E402

torch.set_num_threads(2)
train, test = probe_cases(Path(sys.argv[1]))
out = {}
for path in sys.argv[3:]:
    _, _, teacher = load_ssl_pair(torch.load(path, map_location="cpu", weights_only=True))
    out[path] = balanced_accuracy(probe_pairs(teacher.backbone, train, test))
    print(path, round(out[path], 4), flush=True)
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
