"""``3dino embed``: frozen-backbone features of a folder of cases, one CSV row per case.

``-m`` names the backbone and how cases are prepared:

- a finetune run folder (or model zip): the backbone of its ``checkpoint_best.pt``; every case is
  preprocessed as in finetuning (``preprocess_case`` with the model card's ``preprocessing()``:
  the plans' transpose, crop, resampling and normalisation) and its centre view (the whole
  preprocessed volume resized to the run's ``patch_size``) goes through the backbone: exactly
  what the probe and ``predict`` see;
- a pretrain run folder (its ``backbone.pt``) or a backbone checkpoint file (ours, an export or
  the released 3DINO-ViT file): no plans, so each channel is normalised per volume as in
  pretraining (0.05th/99.95th percentiles -> [-1, 1], clipped; NaN/Inf -> the channel mean),
  cropped to the voxels above -1 in any channel, kept in its own voxel grid and axis order
  (no resampling, no transpose) and resized whole to the backbone's pretraining crop
  (the backbone's ``input_size`` voxels per axis, 96^3 for the released weights). The backbone's
  family must offer CLS tokens (:mod:`threedino_pipe.models.backbones`).

Features (:mod:`threedino_pipe.models.classification`): the CLS tokens of the last ``layers``
blocks, then with ``avgpool`` the last block's mean patch token, each for every channel (the
single-channel backbone runs once per channel). Columns: ``case_id``, then
``cls{block}_c{channel}_{i}`` (block 0-based) and ``avg_c{channel}_{i}``, ``i < dim``, in the
probe's input order, so a probe's ``head`` weights apply to these columns as they are. A JSON
file beside the CSV (same stem) records the model, options and preprocessing.
"""

from __future__ import annotations

import contextlib
import csv
import re
from pathlib import Path

import numpy as np

from threedino_pipe.artifacts import CasePreprocessing, EmbedRecord
from threedino_pipe.inference.features import centre_view, extract
from threedino_pipe.inference.input_cases import InputCase, group_cases, list_entries, split_ending
from threedino_pipe.inference.model_source import load_backbone_and_card
from threedino_pipe.inference.predictor import prepare_case
from threedino_pipe.models.backbones import family_of
from threedino_pipe.models.classification import MAX_LAYERS, FrozenFeatures, probe_input
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.device import pick_device
from threedino_pipe.runtime.errors import UserError

_CHANNEL_RE = re.compile(r"^.+_(\d{4})$")


def _bare_channels(entries: list[Path]) -> int:
    """Channels of the inputs of a bare checkpoint: every name ends in ``_XXXX`` -> the channels found, else 1."""
    found = [_CHANNEL_RE.match(split_ending(e)[0]) for e in entries]
    if entries and all(found):
        return max(int(m.group(1)) for m in found) + 1
    return 1


def column_names(first_block: int, layers: int, avgpool: bool, channels: int, dim: int) -> list[str]:
    """Feature column names in :func:`threedino_pipe.models.classification.probe_input` order."""
    names = [f"cls{first_block + b}_c{c}_{i}" for b in range(layers) for c in range(channels) for i in range(dim)]
    if avgpool:
        names += [f"avg_c{c}_{i}" for c in range(channels) for i in range(dim)]
    return names


def _output_csv(output: Path) -> Path:
    output = Path(output)
    if output.suffix.lower() == ".csv":
        return output
    if output.exists() and not output.is_dir():
        raise UserError("the output is a file that does not end in .csv", file=output,
                        fix="pass a .csv file name or a folder (features.csv is written into it)")
    return output / "features.csv"


def run(model: Path, input_path: Path, output: Path, *, layers: int = MAX_LAYERS, avgpool: bool = True,
        device: str = "auto") -> Path:
    """Write the frozen features of every case of ``input_path`` to a CSV table; returns its path."""
    console = progress.stderr_console()
    if not 1 <= layers <= MAX_LAYERS:
        raise UserError(f"--layers {layers} is not 1 or {MAX_LAYERS}", fix=f"pass --layers 1 or --layers {MAX_LAYERS}")
    csv_path = _output_csv(output)
    dev = pick_device(device)
    with contextlib.ExitStack() as stack:
        backbone, card, view_size, record = load_backbone_and_card(model, stack)
        family_of(backbone).require("cls_token", "3dino embed writes CLS-token features", file=model)
        if layers > backbone.depth:
            raise UserError(f"--layers {layers} but the backbone has {backbone.depth} blocks", file=model,
                            fix="pass --layers 1")
        deepest = min(MAX_LAYERS, backbone.depth)  # the probe's grid: 1 or 4 blocks, 4 clipped to the depth
        if layers not in (1, deepest):
            raise UserError(f"--layers {layers} is not 1 or {deepest}", file=model,
                            fix=f"pass --layers 1 or --layers {deepest}")
        entries = list_entries(Path(input_path))
        num_channels = len(card.channel_names) if card is not None else _bare_channels(entries)
        recipe = card.preprocessing() if card is not None else CasePreprocessing.bare(num_channels)
        cases: list[InputCase] = group_cases(entries, num_channels, Path(input_path))
        extractor = FrozenFeatures(backbone.float(), layers).to(dev)
        names = column_names(backbone.depth - layers, layers, avgpool, num_channels, backbone.embed_dim)
        rows = []
        for case in progress.track(cases, "embed", total=len(cases)):
            prepared = prepare_case(case, recipe)
            tokens = extract(extractor, centre_view(prepared.data, view_size)[None], dev, 1)
            vector = probe_input(tokens["cls"], tokens["patch_mean"], layers, avgpool)[0].numpy()
            rows.append([case.case_id, *(f"{v:.7g}" for v in vector.astype(np.float64))])
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", *names])
        writer.writerows(rows)
    EmbedRecord(model=record, input=str(Path(input_path).resolve()), cases=len(rows), layers=layers,
                avgpool=avgpool, blocks=list(range(backbone.depth - layers, backbone.depth)), channels=num_channels,
                embed_dim=backbone.embed_dim, columns=len(names), configuration=recipe.configuration,
                view_size=view_size, preprocessing=recipe, transpose=recipe.transpose,
                device=str(dev)).write(EmbedRecord.beside(csv_path))
    console.print(f"wrote {csv_path}: {len(rows)} case(s) x {len(names)} features")
    return csv_path
