"""The SSL objective against values computed by hand: Sinkhorn-Knopp, DINO, iBOT, KoLeo, masking."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from threedino_pipe.ssl import (
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    koleo_per_chunk,
    masked_patch_weights,
    random_patch_masks,
    sinkhorn_knopp,
)

LN = math.log


def _numpy_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """Independent reference with explicit loops: ``[B, K]`` logits -> ``[B, K]``."""
    n_samples, n_protos = logits.shape
    q = np.exp(logits.astype(np.float64) / temp)
    q = q / q.sum()
    for _ in range(n_iterations):
        for k in range(n_protos):  # prototype k: total mass 1/K
            q[:, k] = q[:, k] / q[:, k].sum() / n_protos
        for b in range(n_samples):  # sample b: total mass 1/B
            q[b, :] = q[b, :] / q[b, :].sum() / n_samples
    return q * n_samples


def _ce(teacher: np.ndarray, student_logits: np.ndarray, student_temp: float) -> float:
    """``-sum_k t_k log softmax(s / temp)_k`` for one pair of vectors."""
    z = student_logits.astype(np.float64) / student_temp
    log_p = z - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
    return float(-np.sum(teacher * log_p))


# --- Sinkhorn-Knopp -------------------------------------------------------------------------------------------

def test_sinkhorn_one_iteration_by_hand():
    # exp(logits / T) = [[1, 3], [1, 1]]: mass 6 -> prototypes to 1/2 -> samples to 1/2 -> x B = 2
    temp = 0.05
    logits = temp * torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    q = sinkhorn_knopp(logits, temp, n_iterations=1)
    expected = torch.tensor([[2 / 5, 3 / 5], [2 / 3, 1 / 3]])
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-6)


def test_sinkhorn_three_iterations_guarantees():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen)
    temp = 0.5
    q = sinkhorn_knopp(logits, temp)
    ref = _numpy_sinkhorn(logits.numpy(), temp, 3)
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-5, atol=1e-7)
    # exact after the last (sample) step: every sample's probabilities sum to 1
    torch.testing.assert_close(q.sum(dim=1), torch.ones(6), rtol=0, atol=1e-6)
    # prototype masses approach B / K: closer than a plain softmax, and closer with more iterations
    target = 6 / 4
    softmax_dev = (torch.softmax(logits / temp, dim=1).sum(0) - target).abs().max()
    dev3 = (q.sum(0) - target).abs().max()
    dev30 = (sinkhorn_knopp(logits, temp, n_iterations=30).sum(0) - target).abs().max()
    assert dev30 < dev3 < softmax_dev
    assert dev30 < 1e-5


def test_sinkhorn_is_stable_for_large_logits():
    logits = torch.tensor([[30.0, 29.0, 0.0], [28.0, 30.0, 1.0]])  # exp(30 / 0.04) overflows float32
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, sinkhorn_knopp(logits - 30.0, 0.04))
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def _sinkhorn_worker(rank: int, world: int, store_path: str, logits: torch.Tensor,
                     splits: list[list[int]], temp: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        results = []
        for split in splits:
            start = sum(split[:rank])
            results.append(sinkhorn_knopp(logits[start:start + split[rank]], temp))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_distributed_equals_whole_batch(tmp_path):
    """Two gloo ranks on a split batch (even, uneven, one rank empty) == one process on the whole batch."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 7, generator=gen) * 3.0
    temp = 0.07
    splits = [[5, 5], [7, 3], [10, 0]]
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "store"), logits, splits, temp, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = sinkhorn_knopp(logits, temp)
    for i, split in enumerate(splits):
        assert [ranks[r][i].shape[0] for r in range(2)] == split
        torch.testing.assert_close(torch.cat([ranks[0][i], ranks[1][i]]), whole, rtol=1e-5, atol=1e-7)
    # without the all-reduce each half would be balanced on its own: a different answer
    separate = torch.cat([sinkhorn_knopp(logits[:7], temp), sinkhorn_knopp(logits[7:], temp)])
    assert (separate - whole).abs().max() > 1e-2


# --- DINO loss ------------------------------------------------------------------------------------------------

def test_dino_loss_by_hand_two_global_two_local():
    # B = 1, K = 2. Student logits 0.1 * ln(p) have softmax(. / 0.1) = p, so every CE is -ln p[k].
    t = 0.1
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # teacher crop 0, crop 1
    student_global = t * torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    student_local = t * torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    loss = DINOLoss(2, student_temp=t)(student_global, student_local, teacher)
    # pairs: g0-t1, g1-t0 (g0-t0 and g1-t1 skipped), l0-t0, l0-t1, l1-t0, l1-t1 -> 2 x 1 + 2 x 2 = 6
    expected = (-LN(0.75) - LN(0.5) - LN(0.8) - LN(0.2) - LN(0.5) - LN(0.5)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.6999508, rel=1e-6)


def test_dino_loss_matches_explicit_pair_loop():
    gen = torch.Generator().manual_seed(1)
    batch, k, n_local = 3, 5, 2
    student_global = torch.randn(2 * batch, k, generator=gen)
    student_local = torch.randn(n_local * batch, k, generator=gen)
    teacher = torch.softmax(torch.randn(2 * batch, k, generator=gen), dim=1)
    loss_fn = DINOLoss(k, student_temp=0.1)
    parts = loss_fn.terms(student_global, student_local, teacher)

    sg, sl, tp = student_global.numpy(), student_local.numpy(), teacher.numpy()
    pair_means_global, pair_means_local = [], []
    for s in range(2):
        for tc in range(2):
            if s != tc:
                pair_means_global.append(np.mean([_ce(tp[tc * batch + b], sg[s * batch + b], 0.1)
                                                  for b in range(batch)]))
    for loc in range(n_local):
        for tc in range(2):
            pair_means_local.append(np.mean([_ce(tp[tc * batch + b], sl[loc * batch + b], 0.1)
                                             for b in range(batch)]))
    n_pairs = len(pair_means_global) + len(pair_means_local)
    assert n_pairs == 2 * 1 + n_local * 2
    assert parts["dino_global"].item() == pytest.approx(sum(pair_means_global) / n_pairs, rel=1e-5)
    assert parts["dino_local"].item() == pytest.approx(sum(pair_means_local) / n_pairs, rel=1e-5)
    total = loss_fn(student_global, student_local, teacher)
    assert total.item() == pytest.approx((sum(pair_means_global) + sum(pair_means_local)) / n_pairs, rel=1e-5)


def test_dino_loss_pair_count_with_eight_local_crops_and_gradient():
    batch, k = 2, 4
    student_global = torch.zeros(2 * batch, k, requires_grad=True)
    student_local = torch.zeros(8 * batch, k)
    teacher = torch.full((2 * batch, k), 1 / k)
    loss = DINOLoss(k)(student_global, student_local, teacher)
    # uniform student and teacher: every pair's CE is ln K; 18 pairs / 18 -> ln K
    assert loss.item() == pytest.approx(LN(k), rel=1e-6)
    loss.backward()
    assert student_global.grad is not None
    with pytest.raises(ValueError):
        DINOLoss(k)(student_global, student_local[:3], teacher)


# --- iBOT loss ------------------------------------------------------------------------------------------------

def test_ibot_loss_by_hand():
    # 2 crops x 3 patches; crop 0 masks patches 0 and 2, crop 1 none
    masks = torch.tensor([[True, False, True], [False, False, False]])
    t = 0.1
    student = t * torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = iBOTPatchLoss(2, student_temp=t)(student, teacher, masks)
    # crop 0: mean(ln 2, -ln 0.8); crop 1: 0; / 2 crops; x 1/2 (two global crops)
    expected = 0.5 * ((LN(2) - LN(0.8)) / 2 + 0.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.1145364, rel=1e-6)


def test_ibot_loss_uneven_masks_matches_loop():
    gen = torch.Generator().manual_seed(2)
    masks = torch.tensor([[True, False, False, False],
                          [True, True, True, False],
                          [False, False, False, False],
                          [False, True, False, True]])
    m, k = int(masks.sum()), 6
    student = torch.randn(m, k, generator=gen, requires_grad=True)
    teacher = torch.softmax(torch.randn(m, k, generator=gen), dim=1)
    weights = masked_patch_weights(masks)
    torch.testing.assert_close(weights, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 0.5, 0.5]))
    loss = iBOTPatchLoss(k)(student, teacher, masks, weights)

    row, per_crop = 0, []
    for crop in range(masks.shape[0]):
        ces = []
        for _ in range(int(masks[crop].sum())):
            ces.append(_ce(teacher[row].numpy(), student[row].detach().numpy(), 0.1))
            row += 1
        per_crop.append(np.mean(ces) if ces else 0.0)
    expected = 0.5 * np.sum(per_crop) / masks.shape[0]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert iBOTPatchLoss(k)(student, teacher, masks).item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_ibot_loss_without_masked_patches_is_zero_with_graph():
    student = torch.zeros(0, 3, requires_grad=True)
    loss = iBOTPatchLoss(3)(student, torch.zeros(0, 3), torch.zeros(2, 5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="select"):
        iBOTPatchLoss(3)(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(2, 5, dtype=torch.bool))


def test_ibot_teacher_probabilities_are_sinkhorn_over_masked_tokens():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    probs = iBOTPatchLoss(4).teacher_probabilities(logits, 0.04)
    np.testing.assert_allclose(probs.numpy(), _numpy_sinkhorn(logits.numpy(), 0.04, 3), rtol=1e-4, atol=1e-7)


# --- KoLeo ----------------------------------------------------------------------------------------------------

def _circle(degrees: list[float], radius: float = 1.0) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (radius * torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)).float()


def test_koleo_on_known_points():
    koleo = KoLeoLoss()
    # square corners (any radius: features are L2-normalised): nearest neighbour at 90 degrees, distance sqrt 2
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]) * 3.0
    assert koleo(square).item() == pytest.approx(-LN(math.sqrt(2)), abs=1e-6)
    # 0, 60, 180 degrees on a circle of radius 5: distances 1, 1, sqrt 3
    assert koleo(_circle([0, 60, 180], 5.0)).item() == pytest.approx(-LN(math.sqrt(3)) / 3, abs=1e-6)
    # +-e_i in 3D: every nearest neighbour at distance sqrt 2
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    assert koleo(axes).item() == pytest.approx(-LN(math.sqrt(2)), abs=1e-6)


def test_koleo_per_chunk_sums_chunks_and_handles_single_rows():
    second = _circle([0, 60, 180, 270])  # distances 1, 1, sqrt 2, sqrt 2
    first = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    cls = torch.cat([first, second]).requires_grad_(True)
    total = koleo_per_chunk(cls, n_chunks=2)
    assert total.item() == pytest.approx(-LN(2) / 2 - LN(2) / 4, abs=1e-6)
    total.backward()
    assert torch.isfinite(cls.grad).all()
    assert koleo_per_chunk(torch.randn(2, 8), n_chunks=2).item() == 0.0  # B = 1: no neighbour
    with pytest.raises(ValueError):
        koleo_per_chunk(torch.randn(3, 8), n_chunks=2)


# --- masking --------------------------------------------------------------------------------------------------

def test_masking_ratio_statistics():
    gen = torch.Generator().manual_seed(0)
    grid, n_crops, draws = (6, 6, 6), 8, 400
    n_patches = 216
    ratios, per_crop_masked, patch_counts = [], torch.zeros(n_crops), torch.zeros(n_patches)
    edges = np.linspace(0.2, 0.75, 5)
    for _ in range(draws):
        pm = random_patch_masks(n_crops, grid, generator=gen)
        masked = pm.n_masked > 0
        assert int(masked.sum()) == n_crops // 2  # half of the global crops
        r = pm.ratios[masked]
        assert ((r >= 0.2) & (r <= 0.75)).all()
        assert torch.equal(pm.n_masked, torch.floor(pm.ratios * n_patches).long())
        assert torch.equal(pm.masks.sum(1), pm.n_masked)
        sorted_r = np.sort(r.numpy())  # stratified: one ratio per linspace bin
        assert ((sorted_r >= edges[:-1]) & (sorted_r <= edges[1:])).all()
        ratios.extend(r.tolist())
        per_crop_masked += masked.float()
        patch_counts += pm.masks.sum(0).float()
    assert np.mean(ratios) == pytest.approx((0.2 + 0.75) / 2, abs=0.01)
    freq = per_crop_masked / draws  # every crop position equally likely to be masked
    assert ((freq > 0.4) & (freq < 0.6)).all()
    patch_freq = patch_counts / patch_counts.mean()  # patches chosen uniformly
    assert ((patch_freq > 0.8) & (patch_freq < 1.2)).all()


def test_masking_outputs_non_cubic_grid_and_determinism():
    pm = random_patch_masks(6, (3, 4, 5), generator=torch.Generator().manual_seed(7))
    assert pm.masks.shape == (6, 60) and pm.masks.dtype == torch.bool
    assert torch.equal(pm.mask_indices, pm.masks.flatten().nonzero().flatten())
    assert pm.weights.shape == pm.mask_indices.shape
    crop_of = pm.mask_indices // 60
    for crop in range(6):  # weights of one crop sum to 1 when it is masked
        total = pm.weights[crop_of == crop].sum().item()
        assert total == pytest.approx(1.0 if pm.n_masked[crop] else 0.0)
    again = random_patch_masks(6, (3, 4, 5), generator=torch.Generator().manual_seed(7))
    other = random_patch_masks(6, (3, 4, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(pm.masks, again.masks)
    assert not torch.equal(pm.masks, other.masks)
    single = random_patch_masks(2, 216, generator=torch.Generator().manual_seed(1))  # B = 1
    assert int((single.n_masked > 0).sum()) == 1
    with pytest.raises(ValueError):
        random_patch_masks(2, 8, ratio_range=(0.8, 0.2))
