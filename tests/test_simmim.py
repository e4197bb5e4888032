"""`3dino pretrain --method simmim` (the paper's MIM-ViT baseline): the loss, the masks, and the real command."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SIMMIM, finetune_and_predict_from, run_3dino
from typer.testing import CliRunner

from threedino_pipe.artifacts import RunRecord, open_run_folder
from threedino_pipe.cli import app
from threedino_pipe.models.backbone_choice import pretraining_method
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.weight_files import export_3dino, load_backbone, load_backbone_state, save_backbone
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.ssl.simmim import masked_l1, patchify, random_token_masks
from threedino_pipe.stages import embed, visualize
from threedino_pipe.training.simmim_trainer import MASK_RATIO


# ----- unit: the loss, the masks, the patch order ------------------------------------------------------------
def test_masked_l1_equals_the_value_computed_by_hand():
    """Two crops of 3 patches of 2 voxels; masked: crop 0 patch 1, crop 1 patches 0 and 2.

    |errors| of the masked patches: crop 0 patch 1: |1 - 0|, |2 - 4| -> 1, 2; crop 1 patch 0: |0.5 - 0|,
    |0 - 0| -> 0.5, 0; crop 1 patch 2: |-1 - 1|, |3 - 3| -> 2, 0. Mean over the 3 x 2 = 6 masked voxels:
    (1 + 2 + 0.5 + 0 + 2 + 0) / 6 = 5.5 / 6. The unmasked patches' errors (100 each) do not count.
    """
    prediction = torch.tensor([[[100.0, 100.0], [1.0, 2.0], [100.0, 100.0]],
                               [[0.5, 0.0], [100.0, 100.0], [-1.0, 3.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 4.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0], [1.0, 3.0]]])
    masks = torch.tensor([[False, True, False], [True, False, True]])
    assert masked_l1(prediction, target, masks).item() == pytest.approx(5.5 / 6, abs=1e-7)
    assert masked_l1(prediction, target, torch.zeros_like(masks)).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        masked_l1(prediction, target[:, :2], masks)


def test_token_masks_hold_the_ratio_and_repeat_by_seed():
    """Exactly round(ratio * n) masked patches per crop; the same seed gives the same masks, another seed others."""
    def draw(seed: int, ratio: float = MASK_RATIO) -> torch.Tensor:
        return random_token_masks(6, 216, ratio, generator=torch.Generator().manual_seed(seed))

    masks = draw(3)
    assert masks.shape == (6, 216) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [round(0.6 * 216)] * 6  # 130 of 216
    assert torch.equal(masks, draw(3)) and not torch.equal(masks, draw(4))
    assert len({tuple(row.nonzero().flatten().tolist()) for row in masks}) == 6  # each crop its own patches
    assert draw(0, 0.01).sum(1).tolist() == [2] * 6 and draw(0, 0.999).sum(1).tolist() == [215] * 6
    # uniform over positions: over many draws every patch is masked about 60 % of the time
    frequency = random_token_masks(4000, 27, 0.6, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert frequency.min() > 0.55 and frequency.max() < 0.65
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between"):
            random_token_masks(2, 27, bad)


def test_patchify_orders_patches_and_voxels_as_the_patch_embedding():
    """The head's target for token i is the voxels the ViT's patch embedding of token i sees, in its kernel's
    order: the Conv3d patch embedding equals a linear map of :func:`patchify`'s rows (non-cubic grid)."""
    backbone = build_backbone("tiny", in_chans=2)
    x = torch.randn(2, 2, 32, 48, 16)
    weight = backbone.patch_embed.proj.weight.reshape(backbone.embed_dim, -1)
    as_linear = patchify(x, 16) @ weight.T + backbone.patch_embed.proj.bias
    torch.testing.assert_close(as_linear, backbone.patch_embed(x), rtol=1e-4, atol=1e-4)
    assert patchify(x, 16).shape == (2, 2 * 3 * 1, 2 * 16**3)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 20, 16, 16), 16)


@pytest.mark.e2e
def test_simmim_run_logs_finite_losses_and_records_the_method(simmim_runs):
    folder = simmim_runs["run"]  # the default name keeps the method apart from 3DINO's tiny__990
    for name in ("run.json", "log.csv", "curves.png", "checkpoint_latest.pt", "checkpoint_final.pt", "backbone.pt"):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader((folder / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 21))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert all(float(r["masked_fraction"]) == pytest.approx(round(0.6 * 216) / 216) for r in rows)
    assert float(rows[0]["lr"]) == 0.0 and max(float(r["lr"]) for r in rows) == pytest.approx(1e-4)
    assert "SimMIM, mask ratio 0.6" in simmim_runs["stderr"][0]

    record = json.loads((folder / "run.json").read_text())
    options = record["options"]
    assert options["method"] == "simmim" and options["mask_ratio"] == 0.6 and options["global_crop"] == 96
    assert (options["drop_path"], options["layerscale_init"], options["weight_decay"]) == (0.1, 0.1, 0.05)
    assert record["decisions"]["method"] == "simmim" and record["decisions"]["backbone_family"] == "vit3d"
    assert "prototypes" not in options and "koleo_weight" not in options

    backbone, info = load_backbone(folder / "backbone.pt")
    assert info["meta"]["method"] == "simmim" and info["meta"]["family"] == "vit3d" and info["preset"] == "tiny"
    assert backbone.pos_embed.shape[1] == 6**3 + 1
    state = torch.load(folder / "checkpoint_final.pt", weights_only=True)
    assert torch.equal(state["network"]["backbone.mask_token"], backbone.mask_token)  # the learnt token is kept
    assert not torch.equal(backbone.mask_token, torch.zeros_like(backbone.mask_token))
    assert set(state["network"]) - {f"backbone.{k}" for k in load_backbone_state(folder / "backbone.pt")[0]} == {
        "head.weight", "head.bias"}
    assert state["network"]["head.weight"].shape == (16**3, 96)  # linear: a token -> its 16^3 voxels


@pytest.mark.e2e
def test_simmim_resumes_bitwise_after_stop_after(simmim_runs):
    whole, split = simmim_runs["run"], simmim_runs["split"]
    assert "resuming" in simmim_runs["stderr"][2]
    a = torch.load(whole / "checkpoint_final.pt", weights_only=True)
    b = torch.load(split / "checkpoint_final.pt", weights_only=True)
    for key in a["network"]:
        assert torch.equal(a["network"][key], b["network"][key]), key
    assert [r["loss"] for r in csv.DictReader((whole / "log.csv").open())] == \
        [r["loss"] for r in csv.DictReader((split / "log.csv").open())]


@pytest.mark.e2e
def test_simmim_backbone_finetunes_and_predicts(simmim_runs, mni_raw, tmp_path):
    env, run = simmim_runs["env"], simmim_runs["run"]
    folder, source = finetune_and_predict_from(run, simmim_runs["results"], mni_raw, tmp_path, env, "from_simmim")
    card = json.loads((folder / "model.json").read_text())
    assert card["backbone"]["method"] == "simmim" and card["backbone"]["family"] == "vit3d"
    assert card["backbone"]["tag"] == "tiny__simmim__990" and len(card["backbone"]["sha256"]) == 16
    options = json.loads((folder / "run.json").read_text())["options"]
    assert options["backbone_method"] == "simmim" and options["backbone_sha256"] == card["backbone"]["sha256"]

    # embed and visualize take the SimMIM run folder as they take a 3DINO one
    table = embed.run(run, source, tmp_path / "features", device="cpu")
    rows = list(csv.reader(table.open()))
    assert rows[1][0] == "mni_000" and all(math.isfinite(float(v)) for v in rows[1][1:])
    maps = visualize.run(run, source, tmp_path / "maps", size=64, device="cpu")
    assert set(maps.pngs) == {"pca_rgb", "attention"} and all(Path(p).is_file() for p in maps.pngs.values())


@pytest.mark.e2e
def test_simmim_refusals(simmim_runs, tmp_path):
    """3DINO-only options under simmim, --mask-ratio under dino, 3DINO-only commands on a SimMIM run: named
    errors (the real command once: no traceback, non-zero exit; the others in-process), nothing written."""
    env = {**simmim_runs["env"], "THREEDINO_RESULTS": str(tmp_path / "results")}
    result = run_3dino(*SIMMIM, "--koleo-weight", "0.2", "--prototypes", "64", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "--koleo-weight, --prototypes are 3DINO options" in " ".join(result.stderr.split())
    cases = [(("pretrain", "-d", "990", "--preset", "tiny", "--mask-ratio", "0.5"), "--mask-ratio is SimMIM's"),
             ((*SIMMIM, "--mask-ratio", "1.0"), "must lie strictly between 0 and 1"),
             ((*SIMMIM, "--recipe", "paper"), "--recipe is a 3DINO option"),
             ((*SIMMIM, "--intensity-prob", "0"), "--intensity-prob is a 3DINO option"),
             ((*SIMMIM, "--augment-device", "torch"), "--method simmim augments its crops"),
             (("pretrain", "-d", "990", "--method", "mae"), "unknown --method mae"),
             (("adapt-highres", "--from", str(simmim_runs["run"]), "--base-lr", "0.01"), "--base-lr is a 3DINO"),
             (("export", str(simmim_runs["run"]), "-o", str(tmp_path / "t.pth")), "--method simmim` run")]
    runner = CliRunner()
    for args, message in cases:
        outcome = runner.invoke(app, list(args), env=env)
        assert isinstance(outcome.exception, UserError), (args, outcome.output, outcome.exception)
        assert message in str(outcome.exception), (args, str(outcome.exception))
    assert not (tmp_path / "results").exists() and not (tmp_path / "t.pth").exists()


@pytest.mark.e2e
def test_simmim_torchrun_two_ranks_match_one_process_with_double_batch(simmim_runs, tmp_path):
    """Each rank its share of the batch and of the iteration's masks, DDP-averaged gradients: the same weights
    as one process (every crop masks as many patches, so the mean of the ranks' losses is the batch's). A tiny
    learning rate keeps Adam's sign-like first updates of near-zero gradients below the tolerance."""
    env = {**simmim_runs["env"], "THREEDINO_RESULTS": str(tmp_path / "results")}
    common = (*SIMMIM[:8], "3", "--num-workers", "0", "--precision", "fp32", "--no-progress", "--snapshot-every",
              "0", "--probe-every", "0", "--drop-path", "0", "--peak-lr", "1e-6")
    single = run_3dino(*common, "--batch-size", "2", "--run", "single", env=env)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "-m", "threedino_pipe.cli", *common,
                          "--batch-size", "1", "--run-name", "ddp"],
                         capture_output=True, text=True, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                         cwd=REPO, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = tmp_path / "results" / "pretrain"
    a, b = (torch.load(runs / name / "checkpoint_final.pt", weights_only=True)["network"] for name in ("single", "ddp"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    assert json.loads((runs / "ddp" / "run.json").read_text())["options"]["world_size"] == 2


@pytest.mark.e2e
def test_simmim_run_adapts_to_high_resolution(simmim_runs, tmp_path):
    """adapt-highres continues a SimMIM run with SimMIM on 112^3 crops: 7^3 position grid, method recorded."""
    results = tmp_path / "results"
    shutil.copytree(simmim_runs["run"], results / "pretrain" / "tiny__simmim__990")
    env = {**simmim_runs["env"], "THREEDINO_RESULTS": str(results)}
    done = run_3dino("adapt-highres", "--from", str(results / "pretrain" / "tiny__simmim__990"), "--iters", "2",
                     "--batch-size", "1", "--num-workers", "0", "--precision", "fp32", "--no-progress",
                     "--snapshot-every", "0", "--probe-every", "0", env=env)
    assert done.returncode == 0, done.stderr
    folder = results / "pretrain" / "tiny__simmim__990__highres"
    record = json.loads((folder / "run.json").read_text())
    assert record["stage"] == "adapt-highres" and record["options"]["method"] == "simmim"
    assert record["options"]["configuration"] == "pretrain_highres" and record["options"]["global_crop"] == 112
    assert record["options"]["init_from"] == "tiny__simmim__990/checkpoint_final.pt@20"
    rows = list(csv.DictReader((folder / "log.csv").open()))
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    backbone, info = load_backbone(folder / "backbone.pt")
    assert backbone.pos_embed.shape[1] == 7**3 + 1 and info["meta"]["method"] == "simmim"


def test_runs_recorded_before_method_existed_resume_as_3dino(tmp_path):
    """run.json written before --method: its missing ``method`` reads as ``dino`` (resume), never as ``simmim``."""
    folder = tmp_path / "tiny__990"
    options = {"preset": "tiny", "iters": 6, "augment_device": "cpu-monai"}
    RunRecord(stage="pretrain", options=options, volatile=[]).write(folder / RunRecord.FILE)
    (folder / "checkpoint_latest.pt").write_bytes(b"")
    assert open_run_folder(folder, RunRecord(stage="pretrain", options={**options, "method": "dino"}))
    with pytest.raises(UserError, match="method: 'dino' -> 'simmim'"):
        open_run_folder(folder, RunRecord(stage="pretrain", options={**options, "method": "simmim"}))


def test_pretraining_method_of_backbone_files(tmp_path):
    """What model.json records as the backbone's method, per kind of file finetune may be given."""
    backbone = build_backbone("tiny")
    files = {"simmim": ({"kind": "simmim_backbone", "method": "simmim"}, "simmim"),
             "old_3dino": ({"kind": "teacher_backbone"}, "dino"),  # our 3DINO files before methods were recorded
             "other": ({}, None)}
    for name, (meta, expected) in files.items():
        save_backbone(backbone, tmp_path / f"{name}.pt", preset="tiny", meta=meta)
        assert pretraining_method(load_backbone(tmp_path / f"{name}.pt")[1]) == expected, name
    export_3dino(backbone, None, tmp_path / "released.pth")  # the released 3DINO-ViT layout
    assert pretraining_method(load_backbone(tmp_path / "released.pth")[1]) == "dino"
    torch.save(backbone.state_dict(), tmp_path / "plain.pth")  # a bare state dict: unknown
    assert pretraining_method(load_backbone(tmp_path / "plain.pth")[1]) is None
