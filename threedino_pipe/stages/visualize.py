"""``3dino visualize``: the PCA view and the CLS attention map of a backbone on one scan.

Steps (docs/visualize.md):

1. ``-m`` is loaded as ``3dino embed`` loads it
   (:func:`threedino_pipe.inference.model_source.load_backbone_and_card`): a finetune run folder or
   model zip gives its backbone and model card (the scan is preprocessed as in finetuning); a
   pretrain/adapt-highres run folder or a backbone file gives the backbone and the per-volume
   percentile normalisation of pretraining (:meth:`~threedino_pipe.artifacts.CasePreprocessing.bare`).
2. The scan is read and preprocessed (``preprocess_case``); a multi-channel model's preprocessing
   is taken for the scan's channel.
3. One forward pass of the whole preprocessed volume resized to ``size``
   (:mod:`.backbone_maps`): last-layer patch tokens and CLS attention.
4. PCA maps on the patch grid (:mod:`.pca`).
5. Maps resized to the preprocessed grid, then restored to the scan's grid (size, spacing,
   origin, direction of the input) and written as NIfTI; PNG figures of three centre planes
   (:mod:`.planes`) and ``visualize.json``.

Nothing is written before every map is computed; each file is written atomically.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from threedino_pipe.artifacts import CasePreprocessing, ModelCard, VisualizeRecord
from threedino_pipe.inference.input_cases import InputCase, list_entries, split_ending
from threedino_pipe.inference.model_source import load_backbone_and_card
from threedino_pipe.inference.predictor import read_case
from threedino_pipe.models.backbones import family_of
from threedino_pipe.preprocessing.pipeline import preprocess_case
from threedino_pipe.raw_data.image_io import Geometry, write_image
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.device import pick_device
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.visualization import backbone_maps, planes
from threedino_pipe.visualization.pca import RGB_FROM, PCAMaps, pca_maps

DEFAULT_SIZE = 192
NIFTI = ".nii.gz"
_CHANNEL_RE = re.compile(r"^.+_(\d{4})$")


@dataclass
class VisualizationResult:
    """What :func:`run` wrote.

    Attributes:
        output: the output folder.
        pngs: figure name -> PNG path (``pca_rgb``, ``attention``, with ``per_head`` ``attention_heads``).
        niftis: volume name -> NIfTI path (``pca_rgb``, ``pca_foreground``, ``attention``, with
            ``per_head`` ``attention_head<h>``).
        record: the contents of ``visualize.json`` (None until it is written).
    """

    output: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    niftis: dict[str, Path] = field(default_factory=dict)
    record: VisualizeRecord | None = None


def default_output(scan: Path) -> Path:
    """``./visualize/<scan stem>`` (relative to the current folder)."""
    return Path("visualize") / split_ending(Path(scan))[0]


def _one_scan(scan: Path) -> Path:
    if not Path(scan).exists():
        raise UserError("scan not found", file=scan, fix="pass one image file (or one DICOM series folder)")
    entries = list_entries(Path(scan))
    if len(entries) != 1:
        raise UserError(f"-i names {len(entries)} scans; visualize reads one", file=scan,
                        fix="pass one image file (or one DICOM series folder)")
    return entries[0]


def _channel_recipe(card: ModelCard, scan: Path, channel: int | None) -> tuple[CasePreprocessing, int]:
    """The model's preprocessing for one channel: ``channel``, else the scan name's ``_XXXX`` suffix, else 0."""
    count = len(card.channel_names)
    if channel is None:
        match = _CHANNEL_RE.match(split_ending(scan)[0])
        channel = int(match.group(1)) if match and int(match.group(1)) < count else 0
    if not 0 <= channel < count:
        raise UserError(f"--channel {channel} but the model has {count} channel(s)",
                        fix=f"pass --channel 0..{count - 1}")
    return card.preprocessing().for_channel(channel), channel


def _write_rgb(rgb: np.ndarray, geometry: Geometry, path: Path) -> None:
    """``3 x X x Y x Z`` in [0, 1] -> a uint8 RGB vector image with ``geometry``."""
    data = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    image = geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(3, 2, 1, 0)), isVector=True))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _foreground_rgb(pca: PCAMaps, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Foreground mask and colours on the preprocessed grid.

    The mask is the resized first-component score above the threshold. Colours are interpolated
    among foreground patches only (resized ``rgb * fg`` divided by resized ``fg``), so background
    patches do not darken the edge of the foreground.
    """
    fg_patches = pca.foreground.astype(np.float32)
    fine = backbone_maps.to_preprocessed_grid(np.concatenate([pca.first[None], fg_patches[None],
                                                              pca.rgb * fg_patches[None]]), shape)
    mask = fine[0] > pca.threshold
    rgb = fine[2:] / np.maximum(fine[1], 1e-6)[None]
    return mask, np.where(mask[None], np.clip(rgb, 0, 1), 0).astype(np.float32)


@dataclass
class _Maps:
    """The maps of one scan, restored to its grid: PCA colours and foreground, CLS attention (mean, heads)."""

    input_shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    preprocessed_shape: list[int]
    pca: PCAMaps
    rgb: np.ndarray
    mask: np.ndarray
    attention: list[np.ndarray]
    scales: list[tuple[float, float]]


def _compute_maps(backbone, data: np.ndarray, properties, *, size: int, threshold: float, rgb_from: str,
                  per_head: bool, device, advance) -> _Maps:
    """Steps 3-5 of the module docstring on a preprocessed ``1 x X' x Y' x Z'`` volume."""
    heads = backbone.num_heads
    input_shape = backbone_maps.network_shape(data.shape[1:], size, backbone.patch_size)
    x = backbone_maps.network_input(data[0], input_shape).to(device)
    grid = backbone.patch_grid(input_shape)
    advance()
    patch_tokens, attention = backbone_maps.last_layer(backbone.float().to(device), x, advance)
    del x
    pca = pca_maps(patch_tokens.numpy(), grid, threshold=threshold, rgb_from=rgb_from)
    advance()
    shape = [int(n) for n in data.shape[1:]]
    mask, rgb = _foreground_rgb(pca, shape)
    attention_maps = attention.reshape(heads, *grid).numpy()
    attention_fine = backbone_maps.to_preprocessed_grid(
        np.concatenate([attention_maps.mean(0, keepdims=True)] + ([attention_maps] if per_head else [])), shape)
    advance()
    restored_rgb = np.stack([backbone_maps.restore_to_input(rgb[c], properties) for c in range(3)])
    advance()
    restored_mask = backbone_maps.restore_to_input(mask.astype(np.float32), properties) >= 0.5
    advance()
    restored_attention = []
    for volume in attention_fine:
        restored_attention.append(backbone_maps.restore_to_input(volume, properties))
        advance()
    scales = [tuple(float(v) for v in np.percentile(volume, [0.5, 99.5])) for volume in attention_fine]
    return _Maps(tuple(input_shape), tuple(grid), shape, pca, restored_rgb, restored_mask, restored_attention, scales)


def _figures(maps: _Maps, scan_array: np.ndarray, scan_geometry: Geometry, title: str, per_head: bool
             ) -> dict[str, bytes]:
    """The PNGs of three centre planes: PCA colours, mean attention and (``per_head``) every head."""
    low, high = maps.scales[0]
    figures = {
        "pca_rgb": planes.planes_png(scan_array, scan_geometry, [
            planes.Overlay("PCA: foreground in colour", maps.rgb, maps.mask)],
            f"{title}: PCA of last-layer patch features"),
        "attention": planes.planes_png(scan_array, scan_geometry, [
            planes.Overlay("CLS attention", maps.attention[0], vmin=low, vmax=high)],
            f"{title}: last-layer CLS attention, mean of heads (colours {low:.3g} .. {high:.3g} x the mean patch)"),
    }
    if per_head:
        figures["attention_heads"] = planes.planes_png(scan_array, scan_geometry, [
            planes.Overlay(f"head {h}", maps.attention[1 + h], vmin=maps.scales[1 + h][0], vmax=maps.scales[1 + h][1])
            for h in range(len(maps.attention) - 1)], f"{title}: last-layer CLS attention per head")
    return figures


def _write_maps(output: Path, figures: dict[str, bytes], maps: _Maps, scan_geometry: Geometry) -> VisualizationResult:
    """Write the PNGs and the NIfTI maps on the scan's grid (each atomically)."""
    output.mkdir(parents=True, exist_ok=True)
    result = VisualizationResult(output)
    for name, png in figures.items():
        path = output / f"{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        result.pngs[name] = path
    result.niftis["pca_rgb"] = output / f"pca_rgb{NIFTI}"
    _write_rgb(maps.rgb, scan_geometry, result.niftis["pca_rgb"])
    result.niftis["pca_foreground"] = output / f"pca_foreground{NIFTI}"
    write_image(maps.mask.astype(np.uint8), scan_geometry, result.niftis["pca_foreground"])
    names = ["attention"] + [f"attention_head{h}" for h in range(len(maps.attention) - 1)]
    for name, volume in zip(names, maps.attention, strict=True):
        result.niftis[name] = output / f"{name}{NIFTI}"
        write_image(volume.astype(np.float32), scan_geometry, result.niftis[name])
    return result


def _scan_recipe(card: ModelCard | None, scan: Path, channel: int | None, model: Path
                 ) -> tuple[CasePreprocessing, int]:
    """The preprocessing of the scan: the model's for its channel, or the bare per-volume normalisation."""
    if card is not None:
        return _channel_recipe(card, scan, channel)
    if channel not in (None, 0):
        raise UserError(f"--channel {channel} but a backbone checkpoint has no channels: the scan is normalised on "
                        "its own", file=model, fix="leave out --channel (it chooses among a finetune model's channels)")
    return CasePreprocessing.bare(1), 0


def run(model: Path, scan: Path, output: Path | None = None, *, size: int = DEFAULT_SIZE, threshold: float = 0.0,
        rgb_from: str = "foreground", channel: int | None = None, per_head: bool = False,
        device: str = "auto") -> VisualizationResult:
    """Write the PCA and CLS-attention maps of ``model``'s backbone on ``scan`` into ``output``.

    Args:
        model: finetune run folder, model zip, pretrain/adapt-highres run folder or backbone file.
        scan: one image file or DICOM series folder.
        output: folder (created); default :func:`default_output`.
        size: longest side (voxels) of the network input; 0 keeps the preprocessed scale.
        threshold: foreground threshold on the first principal component (standard deviations).
        rgb_from: ``foreground`` (second PCA on the foreground patches) or ``all`` (components 2-4).
        channel: the model channel the scan is (default: its ``_XXXX`` suffix, else 0).
        per_head: also one attention map per head.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

    Returns:
        The paths written and the record of ``visualize.json``.
    """
    start = time.perf_counter()
    if rgb_from not in RGB_FROM:
        raise UserError(f"--rgb-pca {rgb_from!r} is not one of {', '.join(RGB_FROM)}",
                        fix=f"pass --rgb-pca {' or '.join(RGB_FROM)}")
    if size < 0:
        raise UserError(f"--size {size} is negative", fix="pass a side in voxels, or 0 for the preprocessed scale")
    scan = _one_scan(Path(scan))
    output = Path(output) if output is not None else default_output(scan)
    dev = pick_device(device)
    with contextlib.ExitStack() as stack:
        backbone, card, _, model_record = load_backbone_and_card(Path(model), stack)
    if backbone.in_chans != 1:
        raise UserError(f"the backbone takes {backbone.in_chans} input channels; visualize runs a single-channel "
                        "backbone on one scan", file=model, fix="pass a model with a single-channel backbone")
    family_of(backbone).require("cls_attention", "3dino visualize draws the CLS attention map", file=model)
    recipe, channel = _scan_recipe(card, scan, channel, Path(model))
    heads = backbone.num_heads
    total = 2 + backbone.depth + 2 + (3 + (heads if per_head else 0)) + 2
    with progress.make_progress() as bar:
        task = bar.add_task("visualize", total=total)

        def advance() -> None:
            bar.advance(task)

        images, scan_geometry = read_case(InputCase(split_ending(scan)[0], (scan,)))
        try:
            data, _, properties = preprocess_case(images, scan_geometry, recipe)
        except UserError as exc:
            raise UserError(exc.problem, file=scan, fix=exc.fix) from None
        advance()
        maps = _compute_maps(backbone, data, properties, size=size, threshold=threshold, rgb_from=rgb_from,
                             per_head=per_head, device=dev, advance=advance)
        del data
        figures = _figures(maps, images[0], scan_geometry, f"{Path(model).name} on {scan.name}", per_head)
        advance()
        result = _write_maps(output, figures, maps, scan_geometry)
        advance()
    pca, fg_fraction = maps.pca, float(maps.mask.mean())
    result.record = VisualizeRecord(
        model=model_record, scan=str(scan.resolve()), channel=channel, configuration=recipe.configuration,
        preprocessing=recipe, transpose=recipe.transpose,
        options={"size": size, "threshold": threshold, "rgb_pca": rgb_from, "per_head": per_head},
        preprocessed_shape=maps.preprocessed_shape, network_input_shape=list(maps.input_shape),
        patch_grid=list(maps.grid), backbone=backbone.dims,
        pca={"explained_variance_component1": pca.explained_first, "explained_variance_rgb": pca.explained_rgb,
             "sign_flipped": pca.flipped, "border_mean_component1": pca.border_mean,
             "foreground_patches": int(pca.foreground.sum()), "patches": int(pca.foreground.size),
             "foreground_voxel_fraction": fg_fraction},
        attention={"heads": heads, "png_scale": [list(v) for v in maps.scales]},
        pngs={k: p.name for k, p in result.pngs.items()}, niftis={k: p.name for k, p in result.niftis.items()},
        device=str(dev), seconds=round(time.perf_counter() - start, 3))
    result.record.write(VisualizeRecord.in_folder(output))
    written = ", ".join(p.name for p in [*result.pngs.values(), *result.niftis.values()])
    progress.stderr_console().print(f"wrote {output}: {written}; foreground {int(pca.foreground.sum())} of "
                                    f"{pca.foreground.size} patches ({fg_fraction:.1%} of the scan's voxels)")
    return result
