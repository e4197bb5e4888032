"""Loading the model(s) ``-m`` names: finetune run folders or model zips, weights only.

Each model is rebuilt from its ``model.json`` (:class:`~threedino_pipe.artifacts.ModelCard`)
alone: segmentation networks with
``threedino_pipe.models.segmentation.build_segmentation_model(**model_args)``, classification
probes with ``threedino_pipe.models.classification.build_probe(**model_args)``; the weights come
from the run's ``checkpoint_best.pt`` (``{"model": state_dict}``), loaded with
``torch.load(weights_only=True)`` and strictly (``--checkpoint final``: ``checkpoint_final.pt``,
the weights after the last iteration). Several models (folds) must agree on everything
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

from threedino_pipe.artifacts import ModelCard, ModelIdentity
from threedino_pipe.inference.model_zip import unpack_model_zip
from threedino_pipe.runtime.checkpoints import load_checkpoint
from threedino_pipe.runtime.errors import UserError

_RERUN = "3dino finetune"
# model.json fields that must agree between ensembled models
SHARED_FIELDS = ("task", "output", "num_outputs", "labels", "regions_class_order", "class_names", "configuration")


@dataclass
class LoadedModel:
    """One model ready for inference.

    Attributes:
        source: the path given with ``-m`` (run folder or zip).
        card: its ``model.json``.
        network: the rebuilt network in eval mode, on the CPU.
        model_json_sha256, weights_sha256: checksums of the two files (hex).
    """

    source: Path
    card: ModelCard
    network: nn.Module
    model_json_sha256: str
    weights_sha256: str

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.card.patch_size)

    def identity(self) -> ModelIdentity:
        """What ``predict_args.json`` records of this model."""
        card = self.card
        return ModelIdentity(source=str(Path(self.source).resolve()), model_json_sha256=self.model_json_sha256,
                             weights_sha256=self.weights_sha256, dataset=card.dataset, task=card.task,
                             head=card.head, fold=card.fold, pct=card.pct, seed=card.seed)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def build_network(card: ModelCard, where: Path) -> nn.Module:
    """The untrained network ``model.json``'s ``model_args`` describe."""
    try:
        if card.task == "classification":
            from threedino_pipe.models.classification import build_probe
            return build_probe(**card.model_args)
        from threedino_pipe.models.segmentation import build_segmentation_model
        return build_segmentation_model(**card.model_args)
    except ImportError as exc:
        raise UserError(f"this threedino-pipe cannot build the model ({exc})", file=where,
                        fix="update threedino-pipe to the version that trained the model") from None
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(f"model.json's model_args do not describe a network this version builds ({exc})",
                        file=where, fix="update threedino-pipe, or rerun `3dino finetune`") from None
    except UserError as exc:  # e.g. a backbone family this version does not know
        raise UserError(exc.problem, file=where, fix=exc.fix) from None


def load_run(run_dir: Path, source: Path | None = None, checkpoint: str | None = "best") -> LoadedModel:
    """Rebuild the network of a finetune run folder and load its ``checkpoint`` (``best`` or ``final``)
    weights (weights only, strictly); None: the best weights, else the final ones (a model zip exported with
    ``--checkpoint final``: embed and visualize take the weights a zip holds)."""
    run_dir = Path(run_dir)
    where = ModelCard.in_folder(run_dir)
    if not where.is_file():
        raise UserError("not a finetune run folder or model zip (no model.json)", file=source or run_dir,
                        fix="pass a finetune run folder (results/DatasetNNN_Name/finetune__...) or a model zip")
    card = ModelCard.read(where)
    if checkpoint is None:
        checkpoint = "final" if not (run_dir / card.weights_file("best")).is_file() and \
            (run_dir / card.weights_file("final")).is_file() else "best"
    weights = run_dir / card.weights_file(checkpoint)
    if not weights.is_file():
        problem, fix = _missing_weights(weights.name, checkpoint, zipped=source is not None and source != run_dir)
        raise UserError(problem, file=source or weights, fix=fix)
    state = load_checkpoint(weights, rerun=f"`{_RERUN}`")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError("the weights file holds no 'model' state dict", file=weights,
                        fix=f"pass the run's checkpoint_best.pt as `{_RERUN}` writes it")
    network = build_network(card, where)
    try:
        network.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"the weights do not match the network model.json describes ({first})", file=weights,
                        fix="the run folder mixes files of different runs; rerun `3dino finetune`") from None
    network.eval()
    return LoadedModel(source=Path(source or run_dir), card=card, network=network,
                       model_json_sha256=sha256_of(where), weights_sha256=sha256_of(weights))


def _missing_weights(name: str, checkpoint: str, *, zipped: bool) -> tuple[str, str]:
    """(problem, fix) for a run folder or model zip without the ``--checkpoint`` weights file ``name``."""
    other = "final" if checkpoint == "best" else "best"
    if zipped:
        return (f"the model zip holds no {name} (--checkpoint {checkpoint})",
                f"pass --checkpoint {other}, or export the run again with `3dino export RUN -o FILE.zip "
                f"--checkpoint {checkpoint}`")
    if checkpoint == "final":
        return (f"the run has no {name}: finetuning has not reached its last iteration",
                f"rerun the same `{_RERUN}` command to finish it, or pass --checkpoint best")
    return (f"the run has no {name}: finetuning has not validated yet",
            f"let `{_RERUN}` reach its first validation, then predict again")


def load_models(paths: list[Path], stack: contextlib.ExitStack, checkpoint: str | None = "best"
                ) -> list[LoadedModel]:
    """Load every ``-m`` path (run folder or ``.zip``) with its ``checkpoint`` (``best``, ``final``, or None:
    see :func:`load_run`) weights; zips unpack into temporary folders ``stack`` removes.

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
            models.append(load_run(unpack_model_zip(path, target), source=path, checkpoint=checkpoint))
        elif path.is_dir():
            models.append(load_run(path, checkpoint=checkpoint))
        else:
            raise UserError("model not found: not a run folder or a .zip file", file=path,
                            fix="pass a finetune run folder or a model zip "
                            "(`3dino export RUN -o model.zip`)")
    check_compatible(models)
    return models


def check_compatible(models: list[LoadedModel]) -> None:
    """Refuse models that cannot be averaged: different preprocessing, channels, task, outputs or labels."""
    first = models[0]
    for other in models[1:]:
        for key in SHARED_FIELDS:
            mine, theirs = getattr(first.card, key), getattr(other.card, key)
            if mine != theirs:
                raise UserError(f"the models differ in '{key}' ({mine!r} in {first.source}, {theirs!r} in "
                                f"{other.source}), so their outputs cannot be averaged",
                                file=other.source, fix="ensemble only folds of one finetune setting")
        if first.card.ordered_channel_names() != other.card.ordered_channel_names():
            raise UserError("the models take different input channels", file=other.source,
                            fix="ensemble only models of one dataset")
        if first.card.preprocessing() != other.card.preprocessing():
            raise UserError(f"the models were trained on differently preprocessed data (plans differ from "
                            f"{first.source})", file=other.source,
                            fix="ensemble only models trained with the same plans.json")
