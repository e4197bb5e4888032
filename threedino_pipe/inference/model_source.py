"""The backbone ``-m`` names for ``3dino embed`` and ``3dino visualize``, with how scans are prepared for it.

- a finetune run folder or model zip: the backbone of its ``checkpoint_best.pt`` (a zip exported with
  ``--checkpoint final``: of its ``checkpoint_final.pt``) and its model card
  (scans are preprocessed as in finetuning, ``ModelCard.preprocessing()``);
- a pretrain run folder (its ``backbone.pt``) or a backbone checkpoint file (ours, an export or the
  released 3DINO-ViT file): the backbone alone (scans get
  :meth:`~threedino_pipe.artifacts.CasePreprocessing.bare`, the per-volume normalisation of pretraining).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from threedino_pipe.artifacts import ModelCard, ModelSource
from threedino_pipe.inference.model_loading import load_models
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.models.backbones import Backbone
from threedino_pipe.runtime.errors import UserError


def load_backbone_and_card(model: Path, stack: contextlib.ExitStack
                            ) -> tuple[Backbone, ModelCard | None, list[int], ModelSource]:
    """(backbone, model card or None, view size, record) for ``-m`` (also used by ``3dino visualize``).

    A bare checkpoint has no model card (the caller uses :meth:`CasePreprocessing.bare`); ``stack``
    holds an unpacked model zip until the caller is done.
    """
    model = Path(model)
    if (model.is_dir() and ModelCard.in_folder(model).is_file()) or (model.is_file()
                                                                      and model.suffix.lower() == ".zip"):
        loaded = load_models([model], stack, checkpoint=None)[0]  # the best weights, else those a zip holds
        card = loaded.card
        record = ModelSource(kind="finetune run", source=str(model.resolve()), dataset=card.dataset, head=card.head,
                             backbone=card.backbone.model_dump(mode="json"), weights_sha256=loaded.weights_sha256)
        return loaded.network.backbone, card, [int(v) for v in card.patch_size], record
    if not model.exists():
        raise UserError("model not found", file=model, fix="pass a finetune or pretrain run folder, a model zip or "
                        "a backbone checkpoint file")
    choice = resolve_backbone(str(model), model.parent)
    net = choice.model
    if net.in_chans != 1:
        raise UserError(f"the backbone takes {net.in_chans} input channels; embed and visualize run a "
                        "single-channel backbone once per channel", file=model,
                        fix="pass a single-channel backbone")
    record = ModelSource(kind="backbone checkpoint", source=choice.source, sha256=choice.sha256,
                         preset=choice.info.get("preset"))
    return net, None, [net.input_size] * 3, record
