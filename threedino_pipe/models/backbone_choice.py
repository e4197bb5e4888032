"""``finetune --backbone``: which pretrained backbone (or none) a finetune run starts from.

- ``auto``: the newest ``<results>/pretrain/*__highres*`` run that has a ``backbone.pt`` (newest by
  that file's modification time), else the newest pretrain run with one, else an error that says
  to pretrain or to pass ``--backbone none``;
- a run folder: its ``backbone.pt`` (an unfinished run has none: an error);
- a file: our ``backbone.pt``, an export, or the released 3DINO-ViT file
  (its family's loader, strict: :func:`threedino_pipe.models.weight_files.load_backbone` for ``vit3d``);
  a Swin file in Tang et al.'s layout (family ``swin``, :func:`threedino_pipe.models.swin.load_swin`);
- a local Hugging Face folder (``config.json`` + weights of ``Dinov2Model`` or ``DINOv3ViTModel``): the
  ``hf2d`` family, a 2D ViT run slice by slice (:mod:`threedino_pipe.models.natural2d`); tag
  ``hf2d-<method>-<folder name>``;
- ``none``: a randomly initialised backbone trained end to end (the paper's Random baseline).

The tag names the backbone in the run folder name: the run folder's name, the file's stem (a
file called ``backbone.pt`` takes its folder's name, so two runs' files never share a tag), or
``none``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from threedino_pipe.models.backbones import DEFAULT_FAMILY, Backbone, get_family
from threedino_pipe.models.swin import FAMILY as SWIN
from threedino_pipe.models.swin import is_swin_file
from threedino_pipe.runtime.errors import UserError

BACKBONE_FILE = "backbone.pt"
HF_CONFIG = "config.json"  # a folder with it (and no backbone.pt) is a Hugging Face model folder
HF_FAMILY = "hf2d"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class BackboneChoice:
    """The resolved ``--backbone``.

    Attributes:
        tag: name used in the run folder (``none`` for random init).
        source: the weights file's path, or ``none``.
        path: the weights file, or None for random init.
        sha256: first 16 hex digits of the file's SHA-256, or None.
        model: the loaded backbone (strict), or None for random init.
        info: the family loader's info (dims, layout, preset, ...), empty for random init.
        how: one line saying how it was chosen (printed by finetune).
        family: the backbone family (:mod:`threedino_pipe.models.backbones`).
        method: how it was pretrained (``dino``, ``simmim``; :func:`pretraining_method`), None when
            unknown or for random initialisation.
    """

    tag: str
    source: str
    path: Path | None = None
    sha256: str | None = None
    model: Backbone | None = None
    info: dict = field(default_factory=dict)
    how: str = ""
    family: str = DEFAULT_FAMILY
    method: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.model is not None

    @property
    def dims(self) -> dict | None:
        """Architecture dims of the loaded backbone (its family's ``build`` arguments), or None."""
        return None if self.model is None else dict(self.model.dims)


def file_sha256(path: str | Path, digits: int = 16) -> str:
    """First ``digits`` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def pretraining_method(info: dict) -> str | None:
    """The method that pretrained a loaded backbone file (``info`` of its family's loader): the ``method`` of
    its metadata; ``dino`` for the released 3DINO-ViT layout and for our 3DINO files written before
    methods were recorded (metadata ``kind`` ``teacher_backbone``); else None (unknown)."""
    meta = info.get("meta") or {}
    if meta.get("method"):
        return str(meta["method"])
    if meta.get("kind") == "teacher_backbone" or str(info.get("layout", "")).startswith("released"):
        return "dino"
    return None


def safe_tag(name: str) -> str:
    """``name`` with characters other than letters, digits and ``._+-`` replaced by ``-``."""
    return _UNSAFE.sub("-", name).strip("-") or "backbone"


def file_family(path: str | Path) -> str:
    """The backbone family of a weights file by its layout: ``swin`` (Tang et al.'s), else ``vit3d``."""
    return SWIN if is_swin_file(path) else DEFAULT_FAMILY


def newest_pretrained(results_root: Path, family: str | None = None) -> Path | None:
    """``backbone.pt`` of the newest adapt-highres run, else of the newest pretrain run, else None;
    ``family``: only runs whose backbone is of that family."""
    runs = [p for p in (Path(results_root) / "pretrain").glob("*") if (p / BACKBONE_FILE).is_file()
            and (family is None or file_family(p / BACKBONE_FILE) == family)]
    highres = [p for p in runs if "__highres" in p.name]
    for group in (highres, runs):
        if group:
            newest = max(group, key=lambda p: ((p / BACKBONE_FILE).stat().st_mtime_ns, p.name))
            return newest / BACKBONE_FILE
    return None


def _tag_for_file(path: Path) -> str:
    if path.name == BACKBONE_FILE:
        return safe_tag(path.resolve().parent.name)
    return safe_tag(path.stem)


def resolve_backbone(spec: str, results_root: Path, *, expect: str | None = None,
                     family: str | None = None) -> BackboneChoice:
    """Resolve ``--backbone spec`` (see the module docstring) and load the weights.

    Args:
        spec: ``auto``, ``none``, a run folder or a weights file.
        results_root: the results folder (``auto`` looks in its ``pretrain/``).
        expect: a preset the backbone must match (``--preset``), or None.
        family: the backbone family wanted (``vit3d``: the 3D ViT, ``swin``), or None: the file's own
            (:func:`file_family`), ``vit3d`` for ``none`` and ``auto``; ``auto`` looks at runs of that family
            only, and a file of another family is a UserError.

    Raises:
        UserError: no pretrained run for ``auto``, a path that does not exist, a run without
            ``backbone.pt``, an unreadable or mismatched file.
    """
    spec = str(spec).strip()
    if spec == "none":
        return BackboneChoice(tag="none", source="none", how="--backbone none: random initialisation, "
                              "trained end to end", family=family or DEFAULT_FAMILY)
    if spec == "auto":
        path = newest_pretrained(results_root, family or DEFAULT_FAMILY)
        if path is None:
            raise _none_found(results_root, family or DEFAULT_FAMILY)
        kind = "adapt-highres" if "__highres" in path.parent.name else "pretrain"
        how = f"--backbone auto: the newest {kind} run, {path.parent}"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError("--backbone: no such run folder or file", file=path,
                            fix="pass auto, none, a pretrain run folder or a backbone checkpoint file")
        if path.is_dir() and not (path / BACKBONE_FILE).is_file() and (path / HF_CONFIG).is_file():
            return _hugging_face_folder(path, expect)
        if path.is_dir():
            if not (path / BACKBONE_FILE).is_file():
                raise UserError(f"the folder has no {BACKBONE_FILE} (a pretrain run that is unfinished, or not a "
                                f"pretrain run) and no {HF_CONFIG} (not a Hugging Face model folder)", file=path,
                                fix="finish the run (rerun its command), or pass another backbone: a pretrain run, "
                                "a backbone file or a folder written by a Hugging Face model's save_pretrained")
            path = path / BACKBONE_FILE
            how = f"--backbone: the run {path.parent}"
        else:
            how = f"--backbone: the file {path}"
    found = file_family(path)
    if family is not None and found != family:
        raise UserError(f"holds a {found} backbone, where a {family} backbone is needed", file=path,
                        fix=f"pass a {family} backbone file or run folder (docs/finetune.md, 'Backbone kinds')")
    model, info = get_family(found).load(path, expect=expect)
    return BackboneChoice(tag=_tag_for_file(path), source=str(path.resolve()), path=path,
                          sha256=file_sha256(path), model=model, info=info, how=how, family=model.family,
                          method=pretraining_method(info))


def _none_found(results_root: Path, family: str) -> UserError:
    """``--backbone auto`` found no run with a ``family`` backbone."""
    where = Path(results_root) / "pretrain"
    if family == SWIN:
        return UserError(f"--backbone auto found no pretrained Swin encoder (no run with a Swin {BACKBONE_FILE} "
                         f"under {where})", file=where,
                         fix="run `3dino pretrain --method tang --arch swin` first, pass a Swin file (Tang et al.'s "
                         "model_swinvit.pt) with --backbone, or pass --backbone none (Swin Random)")
    return UserError(f"--backbone auto found no pretrained backbone (no run with a {BACKBONE_FILE} under {where})",
                     file=where, fix="run `3dino pretrain` (and `3dino adapt-highres`) first, pass a backbone file or "
                     "run folder with --backbone, or pass --backbone none for random initialisation")


def _hugging_face_folder(folder: Path, expect: str | None) -> BackboneChoice:
    """A local Hugging Face model folder (``config.json`` + weights) as an ``hf2d`` backbone, run slice by slice;
    its tag names the family, the method and the folder (``hf2d-dinov2-<folder>``), its checksum is the weights
    file's."""
    model, info = get_family(HF_FAMILY).load(folder, expect=expect)
    method = pretraining_method(info)
    weights = Path(info["weights_file"])
    how = (f"--backbone: the Hugging Face folder {folder} ({method}, {model.embed_dim} wide, patch "
           f"{model.patch_size}; slices along the last axis, mean/std from {info['normalisation']})")
    return BackboneChoice(tag=safe_tag(f"{HF_FAMILY}-{method}-{folder.resolve().name}"), source=str(folder.resolve()),
                          path=weights, sha256=file_sha256(weights), model=model, info=info, how=how,
                          family=HF_FAMILY, method=method)
