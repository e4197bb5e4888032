"""Loading the model(s) ``-m`` names: finetune run folders or model zips, weights only.

Each model is rebuilt from its ``model.json`` alone: segmentation networks with
``threedino_pipe.models.segmentation.build_segmentation_model(**model_args)``, classification
probes with ``threedino_pipe.models.classification.build_probe(**model_args)``; the weights come
from the run's ``checkpoint_best.pt`` (``{"model": state_dict}``), loaded with
``torch.load(weights_only=True)`` and strictly. Several models (folds) must agree on everything
that fixes the input and output: the plans' transpose and preprocessing, channels, task, output
activation and labels; their probabilities are averaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from threedino_pipe.inference.model_zip import read_model_json, unpack_model_zip, weights_name
from threedino_pipe.runtime.checkpoints import load_checkpoint
from threedino_pipe.runtime.errors import UserError

TASKS = ("segmentation", "classification")
OUTPUTS = ("softmax", "sigmoid")
_RERUN = "3dino finetune"
# configuration fields that change the preprocessed array (must agree between ensembled models)
PREPROCESSING_FIELDS = ("resample", "spacing", "normalization", "crop", "image_interpolation")
# model.json fields that must agree between ensembled models
SHARED_FIELDS = ("task", "output", "num_outputs", "labels", "regions_class_order", "class_names", "configuration")


@dataclass
class LoadedModel:
    """One model ready for inference.

    Attributes:
        source: the path given with ``-m`` (run folder or zip).
        model_json: the parsed ``model.json``.
        network: the rebuilt network in eval mode, on the CPU.
        model_json_sha256, weights_sha256: checksums of the two files (hex).
    """

    source: Path
    model_json: dict
    network: nn.Module
    model_json_sha256: str
    weights_sha256: str

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.model_json["patch_size"])

    def record(self) -> dict:
        """What ``predict_args.json`` records of this model."""
        mj = self.model_json
        return {"source": str(Path(self.source).resolve()), "model_json_sha256": self.model_json_sha256,
                "weights_sha256": self.weights_sha256, "dataset": mj.get("dataset"), "task": mj.get("task"),
                "head": mj.get("head"), "fold": mj.get("fold"), "pct": mj.get("pct"), "seed": mj.get("seed")}


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _need(model_json: dict, key: str, where: Path):
    if key not in model_json or model_json[key] is None:
        raise UserError(f"model.json has no '{key}'", file=where, fix=f"rerun `{_RERUN}` with this version")
    return model_json[key]


def check_model_json(model_json: dict, where: Path) -> None:
    """Refuse a model.json that lacks what predict needs (task, plans, model_args, outputs, patch size)."""
    task = _need(model_json, "task", where)
    if task not in TASKS:
        raise UserError(f"model.json task {task!r} is not one predict supports ({', '.join(TASKS)})", file=where,
                        fix="pass a finetune run of a segmentation or classification dataset")
    plans = _need(model_json, "plans", where)
    configuration = model_json.get("configuration") or "finetune"
    if configuration not in (plans.get("configurations") or {}):
        raise UserError(f"model.json's plans have no configuration '{configuration}'", file=where,
                        fix=f"rerun `{_RERUN}`")
    if not isinstance(_need(model_json, "model_args", where), dict):
        raise UserError("model.json's model_args is not an object", file=where, fix=f"rerun `{_RERUN}`")
    patch = _need(model_json, "patch_size", where)
    if len(patch) != 3 or any(int(v) < 1 for v in patch):
        raise UserError(f"model.json's patch_size {patch} is not 3 positive sizes", file=where, fix=f"rerun `{_RERUN}`")
    num_outputs = int(_need(model_json, "num_outputs", where))
    if task == "segmentation":
        output = _need(model_json, "output", where)
        if output not in OUTPUTS:
            raise UserError(f"model.json output {output!r} is neither softmax nor sigmoid", file=where,
                            fix=f"rerun `{_RERUN}`")
        if output == "sigmoid" and len(model_json.get("regions_class_order") or []) != num_outputs:
            raise UserError(f"a sigmoid (region) model needs regions_class_order with {num_outputs} values",
                            file=where, fix=f"rerun `{_RERUN}`")
        if output == "softmax" and len(softmax_values(model_json)) != num_outputs:
            raise UserError(f"the model has {num_outputs} outputs but model.json declares "
                            f"{len(softmax_values(model_json))} labels", file=where, fix=f"rerun `{_RERUN}`")
    elif len(model_json.get("class_names") or []) != num_outputs:
        raise UserError(f"a classification model needs {num_outputs} class_names", file=where, fix=f"rerun `{_RERUN}`")
    if not channel_names(model_json):
        raise UserError("model.json has no channel_names", file=where, fix=f"rerun `{_RERUN}`")


def channel_names(model_json: dict) -> dict[str, str]:
    """Channel index (string) -> name, from model.json (else its plans)."""
    names = model_json.get("channel_names") or model_json.get("plans", {}).get("channel_names") or {}
    return {str(k): str(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}


def softmax_values(model_json: dict) -> list[int]:
    """Label value of each softmax output channel: the declared label values, sorted (0 first)."""
    values = {int(v) for v in (model_json.get("labels") or {}).values() if not isinstance(v, list)}
    return sorted(values | {0})


def output_values(model_json: dict) -> list[int]:
    """The label value written for each output channel (softmax: label values; sigmoid: regions_class_order)."""
    if model_json.get("output") == "sigmoid":
        return [int(v) for v in model_json["regions_class_order"]]
    return softmax_values(model_json)


def output_names(model_json: dict) -> list[str]:
    """A name per output channel (label or region names from ``labels``; class names for classification)."""
    if model_json.get("task") == "classification":
        return [str(c) for c in model_json["class_names"]]
    labels = model_json.get("labels") or {}
    if model_json.get("output") == "sigmoid":
        regions = [name for name, value in labels.items() if name != "background"]
        return regions if len(regions) == int(model_json["num_outputs"]) else \
            [f"region_{r}" for r in range(int(model_json["num_outputs"]))]
    by_value = {int(v): name for name, v in labels.items() if not isinstance(v, list)}
    return [by_value.get(v, f"label_{v}") for v in softmax_values(model_json)]


def build_network(model_json: dict, where: Path) -> nn.Module:
    """The untrained network ``model.json``'s ``model_args`` describe."""
    args = dict(model_json["model_args"])
    try:
        if model_json["task"] == "classification":
            from threedino_pipe.models.classification import build_probe
            return build_probe(**args)
        from threedino_pipe.models.segmentation import build_segmentation_model
        return build_segmentation_model(**args)
    except ImportError as exc:
        raise UserError(f"this threedino-pipe cannot build the model ({exc})", file=where,
                        fix="update threedino-pipe to the version that trained the model") from None
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(f"model.json's model_args do not describe a network this version builds ({exc})",
                        file=where, fix="update threedino-pipe, or rerun `3dino finetune`") from None


def load_run(run_dir: Path, source: Path | None = None) -> LoadedModel:
    """Rebuild the network of a finetune run folder and load its best weights (weights only, strictly)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.json").is_file():
        raise UserError("not a finetune run folder or model zip (no model.json)", file=source or run_dir,
                        fix="pass a finetune run folder (results/DatasetNNN_Name/finetune__...) or a model zip")
    where = run_dir / "model.json"
    model_json = read_model_json(run_dir)
    check_model_json(model_json, where)
    weights = run_dir / weights_name(model_json, where)
    state = load_checkpoint(weights, rerun=f"`{_RERUN}`")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError("the weights file holds no 'model' state dict", file=weights,
                        fix=f"pass the run's checkpoint_best.pt as `{_RERUN}` writes it")
    network = build_network(model_json, where)
    try:
        network.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"the weights do not match the network model.json describes ({first})", file=weights,
                        fix="the run folder mixes files of different runs; rerun `3dino finetune`") from None
    network.eval()
    return LoadedModel(source=Path(source or run_dir), model_json=model_json, network=network,
                       model_json_sha256=sha256_of(where), weights_sha256=sha256_of(weights))


def load_models(paths: list[Path], stack: contextlib.ExitStack) -> list[LoadedModel]:
    """Load every ``-m`` path (run folder or ``.zip``); zips unpack into temporary folders ``stack`` removes.

    Raises:
        UserError: a path that is neither, a model that cannot be loaded, or models that disagree.
    """
    if not paths:
        raise UserError("no model given", fix="pass a finetune run folder or model zip with -m")
    models = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".zip":
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="threedino-model-")))
            models.append(load_run(unpack_model_zip(path, target), source=path))
        elif path.is_dir():
            models.append(load_run(path))
        else:
            raise UserError("model not found: not a run folder or a .zip file", file=path,
                            fix="pass a finetune run folder or a model zip "
                            "(`3dino export RUN -o model.zip --format zip`)")
    check_compatible(models)
    return models


def _preprocessing(model_json: dict) -> dict:
    plans = model_json["plans"]
    config = plans["configurations"][model_json.get("configuration") or "finetune"]
    return {"transpose": list(plans.get("transpose", [0, 1, 2])),
            **{key: config.get(key) for key in PREPROCESSING_FIELDS}}


def check_compatible(models: list[LoadedModel]) -> None:
    """Refuse models that cannot be averaged: different preprocessing, channels, task, outputs or labels."""
    first = models[0]
    for other in models[1:]:
        for key in SHARED_FIELDS:
            if first.model_json.get(key) != other.model_json.get(key):
                raise UserError(f"the models differ in '{key}' ({first.model_json.get(key)!r} in {first.source}, "
                                f"{other.model_json.get(key)!r} in {other.source}), so their outputs cannot be "
                                "averaged",
                                file=other.source, fix="ensemble only folds of one finetune setting")
        if channel_names(first.model_json) != channel_names(other.model_json):
            raise UserError("the models take different input channels", file=other.source,
                            fix="ensemble only models of one dataset")
        if _preprocessing(first.model_json) != _preprocessing(other.model_json):
            raise UserError(f"the models were trained on differently preprocessed data (plans differ from "
                            f"{first.source})", file=other.source,
                            fix="ensemble only models trained with the same plans.json")
