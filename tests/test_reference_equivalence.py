"""Exact equivalence with the 3DINO authors' model on the shared reference checkpoint and outputs.

The files live in ``<workspace>/shared/reference`` beside the repository (see its README):
a depth-4, 96-wide, 3-head ViT in the released layout, and the outputs the authors' model
computes from it in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from threedino_pipe.models.weight_files import export_3dino, load_backbone, load_heads

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CHECKPOINT = REFERENCE / "ref3dino_small_teacher_checkpoint.pth"
OUTPUTS = REFERENCE / "ref3dino_small_io.pt"
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (CHECKPOINT.is_file() and OUTPUTS.is_file()),
                                reason=f"reference files not found in {REFERENCE} (shared/ is not beside the repo)")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model, info = load_backbone(CHECKPOINT)
    heads = load_heads(CHECKPOINT)
    io = torch.load(OUTPUTS, map_location="cpu", weights_only=True)
    return model, heads, info, io


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_dims_inferred_from_released_layout(reference):
    _, heads, info, io = reference
    dims = io["dims"]
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "grid"):
        assert info["pos_grid" if key == "grid" else key] == dims[key]
    assert info["layout"] == "released (4 chunks)"
    assert info["ignored"] == ["dino_head", "ibot_head"]
    assert heads["dino_head"].dims == {"in_dim": 96, "out_dim": dims["head"]["out_dim"],
                                       "hidden_dim": dims["head"]["hidden_dim"],
                                       "bottleneck_dim": dims["head"]["bottleneck_dim"],
                                       "nlayers": dims["head"]["nlayers"]}


@torch.no_grad()
def test_cube_matches(reference):
    model, _, _, io = reference
    ref = io["cube"]
    x = ref["input_int8"].float() / 50
    out = model.forward_features(x)
    assert _maxdiff(out["cls"], ref["cls"]) <= TOL
    assert _maxdiff(out["patch"], ref["patch"]) <= TOL
    assert _maxdiff(model(x), ref["cls"]) <= TOL
    last4 = model.get_intermediate_layers(x, 4)
    assert len(last4) == len(ref["last4"]) == 4
    for ours, theirs in zip(last4, ref["last4"], strict=True):
        assert _maxdiff(ours, theirs) <= TOL


@torch.no_grad()
def test_masked_matches_and_mask_goes_in_before_position(reference):
    model, _, _, io = reference
    x = io["cube"]["input_int8"].float() / 50
    ref = io["masked"]
    out = model.forward_features(x, masks=ref["masks"])
    assert _maxdiff(out["cls"], ref["cls"]) <= TOL
    assert _maxdiff(out["patch"], ref["patch"]) <= TOL
    # the masks do change the output (the check above is not vacuous)
    assert _maxdiff(out["patch"], io["cube"]["patch"]) > 1e-2


@torch.no_grad()
def test_non_cubic_input_with_interpolated_position_embedding(reference):
    model, _, _, io = reference
    ref = io["rect"]
    x = ref["input_int8"].float() / 50
    assert tuple(x.shape[2:]) == (80, 112, 64)
    out = model.forward_features(x)
    assert out["patch"].shape == (1, 5 * 7 * 4, 96)
    assert _maxdiff(out["cls"], ref["cls"]) <= TOL
    assert _maxdiff(out["patch"], ref["patch"]) <= TOL
    for ours, theirs in zip(model.get_intermediate_layers(x, 4), ref["last4"], strict=True):
        assert _maxdiff(ours, theirs) <= TOL


@torch.no_grad()
def test_dino_head_matches(reference):
    _, heads, _, io = reference
    assert _maxdiff(heads["dino_head"](io["cube"]["cls"]), io["dino_head_on_cube_cls"]) <= TOL


def test_export_reproduces_the_released_layout(reference, tmp_path):
    """Our export of the loaded reference weights has exactly the released file's keys and tensors."""
    model, heads, _, _ = reference
    path = tmp_path / "teacher_checkpoint.pth"
    export_3dino(model, heads, path)
    ours = torch.load(path, map_location="cpu", weights_only=True)["teacher"]
    theirs = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["teacher"]
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key
