"""Classification linear probe (`3dino finetune --head probe`): the batched grid, features, a real-scan run."""

from __future__ import annotations

import csv
import inspect
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_3dino

from threedino_pipe import cli
from threedino_pipe.evaluation.classification_metrics import classification_metrics
from threedino_pipe.inference.features import case_views, centre_view, view_rng
from threedino_pipe.models.classification import (
    FrozenFeatures,
    ProbeClassifier,
    build_probe,
    frozen_tokens,
    probe_input,
    probe_input_dim,
)
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.training.probe import best_point
from threedino_pipe.training.probe_grid import (
    LEARNING_RATES,
    GridPoint,
    ProbeGrid,
    batch_indices,
    cosine_factor,
    grid_points,
)


# ----- unit tests ------------------------------------------------------------------------------
def test_grid_is_the_papers_52_points():
    points = grid_points(4)
    assert len(points) == 13 * 2 * 2 == 52
    assert {p.lr for p in points} == set(LEARNING_RATES)
    assert {(p.layers, p.avgpool) for p in points} == {(1, False), (1, True), (4, False), (4, True)}
    assert {p.layers for p in grid_points(2)} == {1, 2}  # a 2-block backbone: last 1 or 2 blocks


def test_batched_grid_equals_torch_sgd_on_each_linear_layer():
    """Every grid point trains exactly like its own nn.Linear under torch.optim.SGD(momentum 0.9) +
    CosineAnnealingLR on its own probe input (same initial weights, same batches)."""
    gen = torch.Generator().manual_seed(0)
    n, layers_cached, channels, dim, k, iters = 40, 4, 2, 5, 3, 25
    cls = torch.randn(n, layers_cached, channels, dim, generator=gen)
    patch_mean = torch.randn(n, channels, dim, generator=gen)
    y = torch.randint(0, k, (n,), generator=gen)
    full = probe_input(cls, patch_mean, layers_cached, True)
    points = [GridPoint(0.05, 1, False), GridPoint(0.5, 4, True), GridPoint(0.002, 1, True), GridPoint(0.2, 4, False)]
    grid = ProbeGrid(points, layers_cached, channels * dim, k, seed=3)
    assert full.shape[1] == grid.weight.shape[0] == 5 * channels * dim
    references = []
    for g, point in enumerate(points):
        weight, bias = grid.linear(g)
        linear = torch.nn.Linear(weight.shape[1], k)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        optimizer = torch.optim.SGD(linear.parameters(), lr=point.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
        references.append((linear, optimizer, scheduler))
    for t in range(iters):
        idx = batch_indices(t, 16, n, seed=1)
        grid.step(full[idx], y[idx], cosine_factor(t, iters))
        for point, (linear, optimizer, scheduler) in zip(points, references, strict=True):
            optimizer.zero_grad()
            x = probe_input(cls[idx], patch_mean[idx], point.layers, point.avgpool)
            torch.nn.functional.cross_entropy(linear(x), y[idx]).backward()
            optimizer.step()
            scheduler.step()
    for g, (linear, _, _) in enumerate(references):
        weight, bias = grid.linear(g)
        torch.testing.assert_close(weight, linear.weight.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bias, linear.bias.detach(), rtol=1e-4, atol=1e-6)
    # unused feature blocks stay exactly zero
    assert torch.count_nonzero(grid.weight * (1 - grid.mask)) == 0


def test_batch_indices_are_epoch_permutations_independent_of_resume():
    seen = torch.cat([batch_indices(t, 4, 10, seed=2) for t in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, 4, 10, seed=2), batch_indices(3, 4, 10, seed=2))
    assert batch_indices(0, 32, 10, seed=0).numel() == 10  # batch larger than the set: the whole set


def test_probe_classifier_matches_the_grid_point_it_was_built_from():
    """checkpoint_best.pt's network (backbone + chosen Linear) gives the logits the cached-feature grid gave."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny").eval()
    views = torch.randn(3, 2, 32, 48, 32)  # 2 channels, non-cubic
    cls, patch_mean = FrozenFeatures(backbone)(views)
    assert cls.shape == (3, 4, 2, 96) and patch_mean.shape == (3, 2, 96)
    points = grid_points(4)
    grid = ProbeGrid(points, 4, 2 * 96, 3, seed=1)
    x = probe_input(cls, patch_mean, 4, True)
    for _ in range(3):
        grid.step(x, torch.tensor([0, 1, 2]), 1.0)
    for g in (0, 20, 45):
        probe = ProbeClassifier(backbone, 2, 3, points[g].layers, points[g].avgpool)
        weight, bias = grid.linear(g)
        assert weight.shape[1] == probe_input_dim(96, 2, points[g].layers, points[g].avgpool)
        with torch.no_grad():
            probe.head.weight.copy_(weight)
            probe.head.bias.copy_(bias)
        torch.testing.assert_close(probe(views), grid.logits(x)[:, g], rtol=1e-4, atol=1e-5)
    # rebuilt from model_args + state dict (what predict does), the backbone keys load as a backbone
    rebuilt = build_probe(**probe.model_args())
    rebuilt.load_state_dict(probe.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(views), probe(views))
    assert all(not p.requires_grad for p in rebuilt.backbone.parameters())


def test_channels_go_through_the_backbone_separately():
    torch.manual_seed(1)
    backbone = build_backbone("tiny").eval()
    x = torch.randn(2, 3, 32, 32, 32)
    cls, patch_mean = frozen_tokens(backbone, x, 4)
    for c in range(3):
        cls_c, mean_c = frozen_tokens(backbone, x[:, c:c + 1], 4)
        torch.testing.assert_close(cls[:, :, c], cls_c[:, :, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patch_mean[:, c], mean_c[:, 0], rtol=1e-5, atol=1e-5)


def test_views_centre_first_reproducible_and_of_patch_size():
    volume = np.random.default_rng(0).normal(size=(2, 50, 41, 23)).astype(np.float32)
    views = case_views(volume, (32, 32, 16), 3, view_rng(0, "case_a"))
    assert views.shape == (4, 2, 32, 32, 16)
    torch.testing.assert_close(views[0], centre_view(volume, (32, 32, 16)))
    again = case_views(volume, (32, 32, 16), 3, view_rng(0, "case_a"))
    assert torch.equal(views, again)
    other = case_views(volume, (32, 32, 16), 3, view_rng(0, "case_b"))
    assert not torch.equal(views[1:], other[1:])


def test_best_point_ranks_auc_then_accuracy_then_loss():
    scores = [{"auc": 0.9, "accuracy": 0.7, "loss": 0.3}, {"auc": 0.95, "accuracy": 0.6, "loss": 0.5},
              {"auc": 0.95, "accuracy": 0.8, "loss": 0.6}, {"auc": 0.95, "accuracy": 0.8, "loss": 0.4},
              {"auc": math.nan, "accuracy": 1.0, "loss": 0.0}]
    assert best_point(scores) == 3


# ----- a real-scan classification run ----------------------------------------------------------
def _cli_has_probe() -> bool:
    return "head" in inspect.signature(cli.finetune).parameters


@pytest.mark.e2e
def test_probe_run_reports_auc_f1_and_beats_chance_on_held_out_scans(tissue, monkeypatch):
    for key, value in tissue["env"].items():
        monkeypatch.setenv(key, value)
    args = ("--pct", "100", "--fold", "0", "--backbone", str(tissue["backbone"]), "--iters", "300")
    if _cli_has_probe():
        result = run_3dino("finetune", "-d", "995", "--head", "probe", *args, "--no-progress", env=tissue["env"])
        assert result.returncode == 0, result.stderr
    else:  # the finetune command does not dispatch --head probe yet: the stage function it will call
        from threedino_pipe.training import probe
        probe.run("995", pct=100, fold=0, backbone=str(tissue["backbone"]), iters=300)
    run_dir = tissue["root"] / "results" / "Dataset995_MNITissueContent" / \
        "finetune__probe__tiny_random__pct100__fold0__seed0"
    for name in ("model.json", "checkpoint_best.pt", "checkpoint_latest.pt", "subset.json", "run.json", "grid.csv",
                 "log.csv", "curves.png", "validation.json", "validation_predictions.csv", "features.pt"):
        assert (run_dir / name).is_file(), name

    validation = json.loads((run_dir / "validation.json").read_text())
    for metric in ("auc", "f1"):
        assert set(validation["metrics"][metric]) == {"grey", "white", "macro"}
        assert 0.0 <= validation["metrics"][metric]["macro"] <= 1.0
    grid = list(csv.DictReader((run_dir / "grid.csv").open()))
    assert len(grid) == 52 and sum(int(r["best"]) for r in grid) == 1
    model_json = json.loads((run_dir / "model.json").read_text())
    best = next(r for r in grid if r["best"] == "1")
    assert model_json["task"] == "classification" and model_json["head"] == "probe"
    assert (float(best["lr"]), int(best["layers"]), best["avgpool"] == "True") == \
        (model_json["probe"]["lr"], model_json["probe"]["layers"], model_json["probe"]["avgpool"])
    assert model_json["best_metric"] == {"name": "auc", "value": validation["metrics"]["auc"]["macro"]}
    subset = json.loads((run_dir / "subset.json").read_text())
    assert len(subset["ids"]) == 15 and len(subset["val_ids"]) == 4 and not set(subset["ids"]) & set(subset["val_ids"])

    # the rebuilt network (model_args + checkpoint_best.pt) reproduces validation_predictions.csv from the
    # preprocessed arrays: training on cached features and predicting with the network agree
    from threedino_pipe.preprocessing.arrays import open_array
    network = build_probe(**model_json["model_args"])
    network.load_state_dict(torch.load(run_dir / "checkpoint_best.pt", weights_only=True)["model"], strict=True)
    final = torch.load(run_dir / "checkpoint_final.pt", weights_only=True)["model"]  # predict --checkpoint final
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in final.items())
    pre = tissue["root"] / "preprocessed" / "Dataset995_MNITissueContent" / "finetune"
    for row in csv.DictReader((run_dir / "validation_predictions.csv").open()):
        view = centre_view(open_array(pre / f"{row['case_id']}.b2nd")[:], model_json["patch_size"])
        probs = torch.softmax(network(view[None]), dim=1)[0]
        torch.testing.assert_close(probs, torch.tensor([float(row["prob_grey"]), float(row["prob_white"])]),
                                   rtol=0, atol=2e-5)

    # 40 fresh crops through `3dino embed` with the chosen layers/avgpool, then the probe's Linear:
    # embed's columns are the probe's input, and the probe generalises beyond its 19 cases
    out = tissue["root"] / "held_out.csv"
    result = run_3dino("embed", "-m", str(run_dir), "-i", str(tissue["held_out"]), "-o", str(out),
                       "--layers", str(model_json["probe"]["layers"]),
                       "--avgpool" if model_json["probe"]["avgpool"] else "--no-avgpool", "--no-progress",
                       env=tissue["env"])
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    weight, bias = network.head.weight.detach().double().numpy(), network.head.bias.detach().double().numpy()
    features = np.array([[float(v) for k, v in r.items() if k != "case_id"] for r in rows])
    logits = features @ weight.T + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = np.array([tissue["classes"][r["case_id"]] for r in rows])
    held_out = classification_metrics(y, probs.argmax(1), probs, ["grey", "white"])
    # Margin: 40 independent crops, 20 per class. Scores unrelated to the class give an AUC with mean
    # 0.5 and standard deviation sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.092, so AUC >= 0.75 happens by
    # chance with probability < 0.5 % (z = 2.7). A linear probe on a frozen *random* tiny ViT only sees
    # random projections of local intensity patterns (its CLS token carries nothing: LayerScale 1e-5),
    # and the grey/white balance of a crop is a property of its intensity distribution, so the probe
    # gets about 0.85-0.95 here; a pretrained backbone would do better.
    assert held_out["auc"]["macro"] >= 0.75, held_out
    assert held_out["f1"]["macro"] > 0.5, held_out


@pytest.mark.e2e
def test_features_are_computed_once_per_case_and_view_and_reused_on_resume(tissue, monkeypatch):
    """The 52-point grid costs one backbone pass per (case, view): counted at the backbone itself."""
    for key, value in tissue["env"].items():
        monkeypatch.setenv(key, value)
    from threedino_pipe.training import probe
    passes = []
    original = VisionTransformer3D.get_intermediate_layers

    def counting(self, x, *args, **kwargs):
        passes.append(int(x.shape[0]))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer3D, "get_intermediate_layers", counting)
    options = dict(pct=50, fold=1, backbone=str(tissue["backbone"]), iters=40, num_augmentations=2, device="cpu")
    folder = probe.run("995", **options, stop_after=15)
    subset = json.loads((folder / "subset.json").read_text())
    expected = len(subset["ids"]) * (1 + 2) + len(subset["val_ids"])  # one channel
    assert sum(passes) == expected
    assert not (folder / "model.json").exists()
    assert torch.load(folder / "checkpoint_latest.pt", weights_only=True)["iteration"] == 15

    passes.clear()
    probe.run("995", **options)  # the same command again: resumes from iteration 15 with the cached features
    assert sum(passes) == 0
    assert torch.load(folder / "checkpoint_latest.pt", weights_only=True)["iteration"] == 40
    log = [int(r["iteration"]) for r in csv.DictReader((folder / "log.csv").open())]
    assert log == sorted(set(log)) and log[-1] == 40
    grid = list(csv.DictReader((folder / "grid.csv").open()))
    assert len(grid) == 52 and (folder / "validation.json").is_file()
    cache = torch.load(folder / "features.pt", weights_only=True)
    assert sum(v["cls"].shape[0] for v in cache["features"].values()) == expected
