"""One case through the model(s): read, preprocess as in training, sliding window, back to the input.

The sliding window here is the only one: ``3dino predict`` and finetune's validation
(:func:`blended_probabilities` on a preprocessed case) both run it.

Sliding window (segmentation): MONAI's window grid and gaussian blending (sigma 0.125 of the
window), windows of the model's ``patch_size``, ``overlap`` between windows and
``window_batch_size`` windows per forward pass, blended by ``inference/blended_rows`` so that a
512 x 512 x 400 CT with 14 classes stays within 4 GiB:

- the preprocessed case stays a float32 array (on the GPU when predicting on one, else on the
  CPU); each window batch is read from it and moved to the device;
- per window, every model (and, with TTA, every flip of the window: the 7 flip combinations of
  the three axes plus the identity) is run, the activation (softmax or sigmoid) applied in place
  and the probabilities averaged, so what is blended are probabilities; softmax models leave the
  background channel out (it is 1 minus the others' sum);
- the blended sum covers one row of windows (``patch[0]`` rows along the first axis) and the
  finished rows not yet read (float32, on the device); the label map is restored from the rows
  as they finish (no array of the whole case's probabilities exists). Saving probabilities needs
  them all at once: then the rows fill a float16 ``K x`` array of the case on the CPU.

Windows that hold only air outside the body are skipped (``InferenceOptions.skip``, on by default;
``inference/air_windows``): a conservative body mask of the preprocessed case with a margin, and
a probe window that must come out background; a skipped window blends as pure background.

Cases smaller than a window are padded with finetuning's pad value (-1, the bottom of the
normalisation range, :data:`threedino_pipe.preprocessing.normalization.PAD_VALUE`).

Classification: the whole preprocessed case resized to the patch size (the centre view of
``threedino_pipe.inference.features``, as the probe saw in finetuning), averaged the same way.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threedino_pipe.artifacts import CasePreprocessing, PreprocessedCase
from threedino_pipe.dicom.volume import SeriesVolume
from threedino_pipe.inference import geometry
from threedino_pipe.inference.air_windows import AirRule, BodyMask, WindowCounts, WindowSkip, all_background, body_mask
from threedino_pipe.inference.blended_rows import BlendedRows, WeightedRows, materialise
from threedino_pipe.inference.case_outputs import CaseOutputs
from threedino_pipe.inference.coarse_windows import (
    FACTOR,
    PROBE_NOTE,
    CombinedSkip,
    coarse_mask,
    downsample,
    foreground_grid,
)
from threedino_pipe.inference.dicom_cases import read_study
from threedino_pipe.inference.input_cases import InputCase
from threedino_pipe.inference.model_loading import LoadedModel
from threedino_pipe.preprocessing.normalization import PAD_VALUE
from threedino_pipe.preprocessing.pipeline import preprocess_case
from threedino_pipe.raw_data.image_io import Geometry, read_image_with_nonfinite
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import autocast

log = logging.getLogger(__name__)

PROBABILITIES = "_probabilities.npz"  # <case>_probabilities.npz


@dataclass(frozen=True)
class InferenceOptions:
    """Options of the per-case pipeline (the CLI's names).

    Attributes:
        overlap: fraction of a window shared with its neighbour, per axis, in [0, 1).
        tta: average over the 8 flip combinations of the three axes.
        window_batch_size: windows per forward pass.
        save_probabilities: also write ``<case>_probabilities.npz``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast of the forward pass), resolved.
        qc: keep what QC measures per case (:class:`QcInputs`: the label image, each label's summed
            probability, a preview of channel 0) in the :class:`CaseResult`.
        skip: skip windows that hold only air outside the body (``inference/air_windows``).
        coarse: run the coarse pass first and skip windows far from anything it found
            (``inference/coarse_windows``).
    """

    overlap: float = 0.5
    tta: bool = False
    window_batch_size: int = 1
    save_probabilities: bool = False
    precision: str = "fp32"
    qc: bool = False
    skip: bool = True
    coarse: bool = False


@dataclass
class PreparedCase:
    """A case read and preprocessed: ``data`` is ``C x X' x Y' x Z'`` float32 (transposed order).

    ``source``: for a DICOM study, channel 0's series as read (``dicom.volume.SeriesVolume``), whose grid
    the outputs are on and whose images the DICOM outputs reference. ``preview``: channel 0 on the input
    grid taken every ``preview_step`` voxels (QC's thumbnails), when asked for.
    """

    case: InputCase
    data: np.ndarray | None  # released (None) once the sliding window no longer needs it
    properties: PreprocessedCase
    geometry: Geometry
    seconds: float
    source: SeriesVolume | None = None
    preview: np.ndarray | None = None
    preview_step: int = 1


@dataclass
class QcInputs:
    """What QC measures of a segmented case (``InferenceOptions.qc``).

    Attributes:
        labels: the label image on the input grid (``X x Y x Z``), as written.
        geometry: the input grid.
        confidence: per output channel, the summed probability over the voxels restored as it.
        preview: channel 0 (``X x Y x Z`` taken every ``preview_step`` voxels), for thumbnails.
    """

    labels: np.ndarray
    geometry: Geometry
    confidence: geometry.ConfidenceSums
    preview: np.ndarray | None
    preview_step: int = 1


@dataclass
class CaseResult:
    """What predicting one case gave: timings, output file and, for classification, probabilities;
    with ``InferenceOptions.qc`` the :class:`QcInputs` of a segmented case (the consumer drops them)."""

    case_id: str
    seconds: dict[str, float] = field(default_factory=dict)
    output: Path | None = None
    probabilities: list[float] | None = None
    qc: QcInputs | None = None
    read_as: InputCase | None = None  # the case as read (its series after a read fallback)
    windows: WindowCounts | None = None


def _failure(problem: str, file: Path, fix: str | None = None) -> UserError:
    return UserError(problem, file=file, fix=fix)


def read_series_case(case: InputCase) -> tuple[list[np.ndarray], Geometry, SeriesVolume, InputCase]:
    """A DICOM study's channel arrays (``X x Y x Z``, float32, CT in HU), channel 0's geometry and series, and
    the case as read (a channel whose chosen series cannot be read falls back to the next usable one:
    ``dicom_cases.read_study``).

    Raises:
        UserError: a channel none of whose usable series can be read (named with study, series and file), or
            channels on other grids.
    """
    volumes, case = read_study(case)
    first = volumes[0]
    for index, volume in enumerate(volumes[1:], start=1):
        if tuple(volume.geometry.size) != tuple(first.geometry.size):
            raise _failure(f"channel {index:04d} (series {volume.series_uid}) has "
                           f"{'x'.join(map(str, volume.geometry.size))} voxels but channel 0000 (series "
                           f"{first.series_uid}) has {'x'.join(map(str, first.geometry.size))}",
                           case.display(volume.instance_paths[0]), "give every channel of a study one grid")
    return [v.array() for v in volumes], first.geometry, first, case


def read_case(case: InputCase) -> tuple[list[np.ndarray], Geometry]:
    """Channel arrays (``X x Y x Z``, NaN/Inf kept) and channel 0's geometry.

    Raises:
        UserError: an unreadable, truncated, non-3D or multi-component file, or channels whose sizes differ.
    """
    if case.is_dicom:
        return read_series_case(case)[:2]
    images, geometry_0 = [], None
    for index, path in enumerate(case.files):
        array, geo = read_image_with_nonfinite(path)
        if geometry_0 is None:
            geometry_0 = geo
        elif tuple(geo.size) != tuple(geometry_0.size):
            raise _failure(f"channel {index:04d} has {'x'.join(map(str, geo.size))} voxels but channel 0000 has "
                           f"{'x'.join(map(str, geometry_0.size))}", path, "give every channel of a case one grid")
        images.append(array)
    return images, geometry_0


PREVIEW_VOXELS = 160  # a QC preview keeps at most about this many voxels per axis


def preview_of(image: np.ndarray) -> tuple[np.ndarray, int]:
    """A copy of ``image`` taken every ``step`` voxels along each axis (at most about ``PREVIEW_VOXELS`` per
    axis; NaN/Inf as 0), and ``step``."""
    step = max(1, -(-max(image.shape) // PREVIEW_VOXELS))
    small = np.array(image[::step, ::step, ::step], dtype=np.float32)
    return np.nan_to_num(small, copy=False, nan=0.0, posinf=0.0, neginf=0.0), step


def prepare_case(case: InputCase, recipe: CasePreprocessing, preview: bool = False) -> PreparedCase:
    """Read a case and preprocess it exactly as finetuning's data was (``preprocess_case``); ``preview``
    keeps a reduced copy of channel 0 (:func:`preview_of`)."""
    start = time.perf_counter()
    source = None
    if case.is_dicom:
        images, geo, source, case = read_series_case(case)
    else:
        images, geo = read_case(case)
    try:
        data, _, properties = preprocess_case(images, geo, recipe)
    except UserError as exc:
        raise _failure(exc.problem, case.label or case.files[0], exc.fix) from None
    small, step = preview_of(images[0]) if preview else (None, 1)
    return PreparedCase(case, data, properties, geo, time.perf_counter() - start, source, small, step)


def flip_sets(tta: bool) -> list[tuple[int, ...]]:
    """Spatial dims (of a ``B x C x X x Y x Z`` tensor) to flip: identity only, or all 8 combinations."""
    if not tta:
        return [()]
    return [dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r)]


class EnsembleProbabilities(nn.Module):
    """``forward(x [B, C, X, Y, Z]) -> [B, K, ...]`` probabilities averaged over networks and flips.

    With ``drop_background`` (softmax) channel 0 is left out of the result (``[B, K - 1, ...]``).
    """

    def __init__(self, networks: Sequence[nn.Module], activation: str, tta: bool, precision: str,
                 drop_background: bool = False) -> None:
        super().__init__()
        self.networks = list(networks)
        self.activation, self.flips, self.precision = activation, flip_sets(tta), precision
        self.drop_background = drop_background

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for network in self.networks:
            for dims in self.flips:
                inputs = torch.flip(x, dims) if dims else x
                with autocast(self.precision, x.device):
                    logits = network(inputs)
                logits = logits.float()
                if dims and logits.ndim == 5:
                    logits = torch.flip(logits, dims)
                probs = _activate_(logits, self.activation)
                total = probs if total is None else total.add_(probs)
        total = total[:, 1:] if self.drop_background else total
        return total.div_(len(self.networks) * len(self.flips))


def _activate_(logits: Tensor, activation: str) -> Tensor:
    """Softmax over dim 1, or sigmoid, in place (no second full-size window tensor)."""
    if activation == "sigmoid":
        return logits.sigmoid_()
    logits.sub_(logits.amax(1, keepdim=True)).exp_()
    return logits.div_(logits.sum(1, keepdim=True))


def _pad_to(data: Tensor, size: Sequence[int]) -> tuple[Tensor, list[slice]]:
    """Pad ``C x X x Y x Z`` (centred, ``PAD_VALUE``) to at least ``size``; returns it and the slices of the case."""
    pads, region = [], []
    for n, s in zip(data.shape[1:], size, strict=True):
        diff = max(int(s) - int(n), 0)
        pads.append((diff // 2, diff - diff // 2))
        region.append(slice(diff // 2, diff // 2 + int(n)))
    if not any(a or b for a, b in pads):
        return data, region
    flat = [v for a, b in reversed(pads) for v in (a, b)]
    return F.pad(data, flat, mode="constant", value=PAD_VALUE), region


@torch.inference_mode()
def blended_probabilities(data: Tensor, networks: Sequence[tuple[nn.Module, Sequence[int]]], activation: str,
                          num_outputs: int, options: InferenceOptions, device: torch.device, *,
                          streamed: bool = False, air: AirRule | None = None,
                          counts: WindowCounts | None = None) -> geometry.Channels:
    """Blended probabilities ``K x X x Y x Z`` of a preprocessed case ``data`` (``C x X x Y x Z`` float32).

    Softmax models keep channels 1..K-1 only (the background is 1 minus their sum, derived when
    read). Networks with different patch sizes run in separate passes whose results are averaged.

    Args:
        data: the case, on the CPU or on ``device``; the returned channels hold it while they need it.
        networks: ``(network, patch size)`` of every model (in eval mode, on ``device``), averaged.
        activation: ``softmax`` or ``sigmoid``; ``num_outputs``: K.
        streamed: return a forward-only :class:`~threedino_pipe.inference.blended_rows.RowSource` whose
            windows run as rows are read (``geometry`` reads them in order); else a float16 CPU tensor
            of the whole case (random access, for saving probabilities).
        air: the case's normalisation schemes and spacing: with ``options.skip``, windows of air outside
            the body are skipped (``inference/air_windows``), and with ``options.coarse`` windows far from
            anything the coarse pass found (``inference/coarse_windows``); None: every window runs.
        counts: filled with the windows' number and the skipped ones (as the windows run).
    """
    implicit = activation == "softmax" and num_outputs > 1
    groups: dict[tuple[int, ...], list[nn.Module]] = {}
    for network, patch in networks:
        groups.setdefault(tuple(int(p) for p in patch), []).append(network)
    counts = counts if counts is not None else WindowCounts()
    mask = body_mask(data, air) if options.skip and air is not None else None
    near = None
    if options.coarse and air is not None:
        near = coarse_pass(data, networks, activation, num_outputs, options, device, air, counts)
    parts = []
    for patch, members in groups.items():
        source, region = _pad_to(data, patch)
        ensemble = EnsembleProbabilities(members, activation, options.tta, options.precision,
                                         drop_background=implicit)
        skip = _window_rule(mask, near, activation, counts)
        rows = BlendedRows(source, region, patch, num_outputs - int(implicit), ensemble, overlap=options.overlap,
                           batch_size=options.window_batch_size, device=device, skip=skip)
        counts.total += len(rows.starts)
        parts.append((rows, len(members) / len(networks)))
    scores = parts[0][0] if len(parts) == 1 else WeightedRows(parts)
    return geometry.Channels(scores if streamed else materialise(scores), implicit_background=implicit)


def _window_rule(air: BodyMask | None, near: BodyMask | None, activation: str,
                 counts: WindowCounts) -> WindowSkip | CombinedSkip | None:
    """Which windows of one window size run: the air rule's body mask and the coarse pass's mask (either None)."""
    def background(p: Tensor) -> bool:
        return all_background(p, activation)

    air_rule = None if air is None else WindowSkip(air, background, counts)
    if near is None:
        return air_rule
    return CombinedSkip(air_rule, WindowSkip(near, background, counts.coarse, probe_note=PROBE_NOTE))


def coarse_pass(data: Tensor, networks: Sequence[tuple[nn.Module, Sequence[int]]], activation: str,
                 num_outputs: int, options: InferenceOptions, device: torch.device, air: AirRule,
                 counts: WindowCounts) -> BodyMask:
    """The coarse pass's dilated could-hold-foreground mask of ``data`` (``C x X x Y x Z``): the same sliding
    window on the case downsampled by ``FACTOR`` (the air rule at the coarse spacing); ``counts.coarse`` gets
    the windows it ran."""
    small = downsample(data, FACTOR)
    inner = WindowCounts()
    coarse_air = AirRule(air.schemes, tuple(s * FACTOR for s in air.spacing))
    scores = blended_probabilities(small, networks, activation, num_outputs, replace(options, coarse=False),
                                   device, streamed=True, air=coarse_air, counts=inner)
    found = foreground_grid(scores.stored, activation == "softmax" and not scores.implicit)
    counts.coarse = WindowCounts(total=inner.total - inner.skipped)
    return coarse_mask(found, air.spacing, FACTOR)


def window_probabilities(prepared: PreparedCase, models: Sequence[LoadedModel], options: InferenceOptions,
                         device: torch.device, *, streamed: bool = False,
                         counts: WindowCounts | None = None) -> geometry.Channels:
    """:func:`blended_probabilities` of a prepared case, whose ``data`` is released (on a GPU the case
    moves to GPU memory); ``counts``: filled with the windows run and skipped."""
    data = torch.from_numpy(prepared.data)
    prepared.data = None
    if device.type == "cuda":
        data = data.to(device)
    card = models[0].card
    return blended_probabilities(data, [(m.network, m.patch_size) for m in models], card.output, card.num_outputs,
                                 options, device, streamed=streamed, air=AirRule.of(prepared.properties),
                                 counts=counts)


@torch.inference_mode()
def classify(data: np.ndarray, models: Sequence[LoadedModel], options: InferenceOptions,
             device: torch.device) -> list[float]:
    """Class probabilities of a preprocessed case (the whole case resized to each model's patch size)."""
    from threedino_pipe.inference.features import centre_view
    total = None
    for model in models:
        view = centre_view(data, model.patch_size)[None].to(device)
        probs = EnsembleProbabilities([model.network], "softmax", options.tta, options.precision)(view)[0].cpu()
        total = probs if total is None else total + probs
    return (total / len(models)).double().tolist()


def predict_case(prepared: PreparedCase, models: Sequence[LoadedModel], options: InferenceOptions,
                 device: torch.device, output_dir: Path, outputs: CaseOutputs | None = None) -> CaseResult:
    """Predict a prepared case; segmentation writes its outputs (``outputs``: formats and provenance; default
    ``<case><ending>`` alone) and probabilities into ``output_dir``."""
    card = models[0].card
    result = CaseResult(prepared.case.case_id, {"read_preprocess": prepared.seconds}, read_as=prepared.case)
    start = time.perf_counter()
    if card.task == "classification":
        result.probabilities = classify(prepared.data, models, options, device)
        result.seconds["inference"] = time.perf_counter() - start
        return result
    # streamed (no probabilities saved): the windows run while the labels are restored row block by row block
    result.windows = WindowCounts()
    probs = window_probabilities(prepared, models, options, device, streamed=not options.save_probabilities,
                                 counts=result.windows)
    output = card.output
    confidence = geometry.ConfidenceSums(card.num_outputs) if options.qc else None
    labels = geometry.restore_labels(probs, prepared.properties, output=output, values=card.output_values(),
                                     confidence=confidence)
    result.seconds["inference"] = time.perf_counter() - start
    _log_windows(prepared.case.case_id, result.windows, options.skip)
    start = time.perf_counter()
    if options.save_probabilities:  # before the label file, whose presence marks the case done
        geometry.write_probabilities(probs, prepared.properties,
                                     Path(output_dir) / f"{prepared.case.case_id}{PROBABILITIES}",
                                     output=output, names=card.output_names())
    del probs
    written = (outputs or CaseOutputs()).write(labels, prepared.case, prepared.geometry, prepared.source, output_dir)
    result.output = written[-1]  # the label file, written last: its presence marks the case done
    if confidence is not None:
        result.qc = QcInputs(labels, prepared.geometry, confidence, prepared.preview, prepared.preview_step)
    del labels
    result.seconds["export"] = time.perf_counter() - start
    return result


def _log_windows(case_id: str, counts: WindowCounts, asked: bool) -> None:
    """One log line: the windows a case skipped, or why it skipped none (and the coarse pass's, when it ran)."""
    if not asked:
        log.debug("%s: %d windows, none skipped (--no-skip)", case_id, counts.total)
    elif counts.note:
        log.info("%s: no window skipped as air (%s)", case_id, counts.note)
    else:
        log.info("%s: %d of %d windows skipped (air outside the body)", case_id, counts.skipped, counts.total)
    coarse = counts.coarse
    if coarse is not None:
        log.info("%s: coarse pass: %d windows run; %s", case_id, coarse.total,
                 f"no window skipped by it ({coarse.note})" if coarse.note else
                 f"{coarse.skipped} of {counts.total} full windows skipped (far from any structure)")
