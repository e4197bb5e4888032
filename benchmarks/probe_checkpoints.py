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

from threedino_pipe.training.feature_probe import balanced_accuracy, case_predictions, fit_probe, load_cases
from threedino_pipe.training.ssl_trainer import load_ssl_pair

torch.set_num_threads(2)
pre = Path(sys.argv[1])
splits = json.loads((pre / "splits.json").read_text())
train_ids = sorted(set(splits["folds"][0]["train"]) | set(splits["folds"][0]["val"]))
train, test = load_cases(pre / "finetune", train_ids), load_cases(pre / "finetune", sorted(splits["test"]))
out = {}
for path in sys.argv[3:]:
    _, _, teacher = load_ssl_pair(torch.load(path, map_location="cpu", weights_only=True))
    predict = fit_probe(teacher.backbone, *train, torch.device("cpu"))
    out[path] = balanced_accuracy(case_predictions(teacher.backbone, predict, *test, torch.device("cpu")))
    print(path, round(out[path], 4), flush=True)
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
