"""Learning signals and teacher centring on hand-made embeddings with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from threedino_pipe.ssl.centering import TeacherCentring
from threedino_pipe.ssl.signals import (
    LearningSignals,
    PrototypeUsage,
    agreement,
    effective_rank,
    spread,
    target_entropy,
)


def test_uniform_targets_have_entropy_ratio_one_and_one_hot_zero():
    k = 256
    assert target_entropy(torch.full((8, k), 1.0 / k)) == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.arange(8) % k, k).float()
    assert target_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(4, k)
    half[:, : k // 2] = 2.0 / k  # uniform over half the prototypes: log(K/2) / log(K)
    assert target_entropy(half) == pytest.approx(math.log(k / 2) / math.log(k), abs=1e-6)


def test_one_hot_collapse_uses_one_prototype_and_the_window_forgets():
    k = 256
    usage = PrototypeUsage(k, window=3)
    collapsed = torch.nn.functional.one_hot(torch.full((8,), 17), k).float()
    for _ in range(5):
        fraction = usage.update(collapsed)
    assert usage.count() == 1 and fraction == pytest.approx(1 / k)
    spread_out = torch.nn.functional.one_hot(torch.arange(8) * 3, k).float()  # 8 distinct prototypes
    usage.update(spread_out)
    assert usage.count() == 9  # 17 and the 8 new ones are in the window of 3
    usage.update(spread_out)
    usage.update(spread_out)
    assert usage.count() == 8  # the collapsed iterations left the window
    copy = PrototypeUsage(1)
    copy.load_state_dict(usage.state_dict())
    assert copy.count() == 8 and copy.fraction() == pytest.approx(8 / k)


def test_effective_rank_of_known_matrices():
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    for r in (1, 3, 10):
        x = q[:, :r] @ q[:, :r].T * 5.0  # r equal singular values
        assert effective_rank(x) == pytest.approx(r, rel=1e-3)
    unequal = q[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ q[:, :2].T  # s = (0.75, 0.25)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(unequal) == pytest.approx(expected, rel=1e-4)
    assert effective_rank(torch.zeros(5, 4)) == 0.0


def test_spread_and_agreement():
    same = torch.ones(6, 4)
    assert spread(same) == 0.0 and spread(same[:1]) == 0.0
    assert spread(torch.tensor([[0.0, 0.0], [2.0, 4.0]])) == pytest.approx((math.sqrt(2) + 2 * math.sqrt(2)) / 2)
    teacher = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    student = torch.zeros(4, 5)
    student[[0, 1, 2, 3], [0, 1, 4, 4]] = 1.0
    assert agreement(student, teacher) == pytest.approx(0.5)


def _embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_queue_centring_returns_the_current_rows_and_spreads_less_than_the_batch():
    prototypes = torch.nn.Linear(16, 128, bias=False)
    torch.nn.init.normal_(prototypes.weight)
    with torch.no_grad():
        prototypes.weight /= prototypes.weight.norm(dim=1, keepdim=True)
    batch_only = TeacherCentring("sinkhorn")
    queued = TeacherCentring("sinkhorn_queue", queue_size=512)
    for step in range(8):  # fill the queue with 8 x 64 earlier embeddings
        queued.targets(_embeddings(64, 16, step), prototypes, 0.04)
    assert queued.queue.shape == (512, 16)
    current = _embeddings(8, 16, 100)
    a = batch_only.targets(current, prototypes, 0.04)
    b = queued.targets(current, prototypes, 0.04)
    assert a.shape == b.shape == (8, 128)
    assert torch.allclose(b.sum(-1), torch.ones(8), atol=1e-5)
    # 8 rows balanced over 128 prototypes: each row spread over >= 16; with the queue the rows may peak
    assert target_entropy(b) < target_entropy(a) - 0.1
    assert torch.equal(queued.queue[-8:], current)  # pushed after use, oldest dropped
    restored = TeacherCentring("sinkhorn_queue", queue_size=512)
    restored.load_state_dict(queued.state_dict())
    nxt = _embeddings(8, 16, 101)
    assert torch.equal(restored.targets(nxt, prototypes, 0.04), queued.targets(nxt, prototypes, 0.04))


def test_softmax_centring_subtracts_a_running_mean_of_the_logits():
    prototypes = torch.nn.Identity()
    centring = TeacherCentring("softmax", center_momentum=0.9)
    first = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    probs = centring.targets(first, prototypes, 1.0)
    assert torch.allclose(probs, torch.softmax(first, -1))  # no centre yet
    assert torch.allclose(centring.center, torch.tensor([[1.0, 0.0, 0.0]]))
    second = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    probs = centring.targets(second, prototypes, 1.0)
    assert torch.allclose(probs, torch.softmax(second - torch.tensor([[1.0, 0.0, 0.0]]), -1))
    assert torch.allclose(centring.center, torch.tensor([[0.9, 0.1, 0.0]]))
    with pytest.raises(ValueError, match="unknown centring"):
        TeacherCentring("zscore")


def test_learning_signals_warn_once_about_uniform_targets_and_collapse():
    signals = LearningSignals(num_prototypes=64, window=5)
    moving = {"target_entropy": 0.9995, "prototypes_used": 0.5, "teacher_cls_std": 0.6, "cls_rank": 14.0}
    assert signals.warning(moving, 60, 100) is None  # near-uniform targets from a teacher that sees its input
    row = {**moving, "teacher_cls_std": 2e-4, "cls_rank": 1.0}
    assert signals.warning(row, 10, 100) is None  # still in the warm-up (a fifth of the run, at least 50)
    text = signals.warning(row, 60, 100)
    assert "nothing is distilled" in text and "--recipe auto" in text
    assert signals.warning(row, 61, 100) is None  # once
    collapsed = {**moving, "target_entropy": 0.001, "prototypes_used": 1 / 64}
    assert "collapse" in signals.warning(collapsed, 70, 100)
