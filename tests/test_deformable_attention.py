"""3D multi-scale deformable attention: coordinate convention, integer-offset sampling, octant init."""

from __future__ import annotations

import itertools

import torch

from threedino_pipe.models.deformable_attention import (
    MSDeformAttn3D,
    deformable_sample,
    multilevel_reference_points,
    octant_directions,
    reference_points,
)


def _volume(shape: tuple[int, int, int], channels: int = 2) -> torch.Tensor:
    """``[channels, *shape]`` with a distinct value per voxel and channel."""
    n = channels * shape[0] * shape[1] * shape[2]
    return torch.arange(n, dtype=torch.float32).reshape(channels, *shape) + 1.0


def _as_value(volumes: list[torch.Tensor]) -> torch.Tensor:
    """Level volumes ``[hd, w, h, d]`` -> value tokens ``[1, Nv, 1 head, hd]`` (W-major)."""
    return torch.cat([v.flatten(1).T for v in volumes], dim=0)[None, :, None, :]


def _sample_at(volumes: list[torch.Tensor], level: int, locations: torch.Tensor) -> torch.Tensor:
    """Sample level ``level`` at ``locations`` ``[Nq, 3]`` with one head, one point, all weight on that level."""
    shapes = [tuple(v.shape[1:]) for v in volumes]
    nq, levels = locations.shape[0], len(volumes)
    loc = locations[None, :, None, None, None, :].expand(1, nq, 1, levels, 1, 3)
    weights = torch.zeros(1, nq, 1, levels, 1)
    weights[..., level, :] = 1.0
    return deformable_sample(_as_value(volumes), shapes, loc, weights)[0]  # [Nq, hd]


def test_reference_points_are_voxel_centres_in_w_major_order() -> None:
    ref = reference_points((2, 3, 4))
    for i, j, k in itertools.product(range(2), range(3), range(4)):
        expected = torch.tensor([(i + 0.5) / 2, (j + 0.5) / 3, (k + 0.5) / 4])
        assert torch.equal(ref[i * 12 + j * 4 + k], expected)
    assert multilevel_reference_points([(2, 3, 4), (1, 1, 2)]).shape == (24 + 2, 3)


def test_grid_sample_axis_order_on_a_known_volume() -> None:
    """Location (first, middle, last) = voxel centre of (i, j, k) returns volume[:, i, j, k]:
    grid_sample's (x, y, z) is (last, middle, first) axis, and the code flips accordingly.
    Sides are powers of two, so every step of the coordinate arithmetic is exact and the samples
    equal the voxels bit for bit (align_corners=False, voxel i centred at (i + 0.5) / n)."""
    vol = _volume((4, 8, 16))
    out = _sample_at([vol], 0, reference_points((4, 8, 16)))
    assert torch.equal(out, vol.flatten(1).T)
    one = _sample_at([vol], 0, torch.tensor([[(1 + 0.5) / 4, (6 + 0.5) / 8, (3 + 0.5) / 16]]))
    assert torch.equal(one[0], vol[:, 1, 6, 3])
    # a location between two voxels of the last axis is their mean (trilinear interpolation)
    mid = _sample_at([vol], 0, torch.tensor([[(1 + 0.5) / 4, (6 + 0.5) / 8, (3 + 1.0) / 16]]))
    assert torch.equal(mid[0], (vol[:, 1, 6, 3] + vol[:, 1, 6, 4]) / 2)


def test_non_power_of_two_sides_match_within_float_rounding() -> None:
    vol = _volume((3, 5, 7))
    out = _sample_at([vol], 0, reference_points((3, 5, 7)))
    torch.testing.assert_close(out, vol.flatten(1).T, rtol=1e-6, atol=1e-4)


def test_each_level_samples_its_own_volume() -> None:
    coarse, fine = _volume((2, 4, 8)), _volume((4, 8, 16)) * -1.0
    ref = reference_points((2, 4, 8))
    assert torch.equal(_sample_at([fine, coarse], 1, ref), coarse.flatten(1).T)
    assert torch.equal(_sample_at([fine, coarse], 0, reference_points((4, 8, 16))), fine.flatten(1).T)


def test_integer_offsets_equal_direct_indexing() -> None:
    """Through the module: a one-point head with offset (1, -2, 3) voxels returns value[i+1, j-2, k+3]
    (zero outside the volume), with identity value and output projections."""
    shape = (4, 8, 16)
    vol = _volume(shape, channels=1)
    attn = MSDeformAttn3D(1, heads=1, levels=1, points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
        attn.value_proj.weight.fill_(1.0)
        attn.output_proj.weight.fill_(1.0)
    ref = reference_points(shape)[None]
    query = torch.randn(1, ref.shape[1], 1)
    out = attn(query, ref, vol.flatten(1).T[None], [shape])[0, :, 0].reshape(shape)
    expected = torch.zeros(shape)
    expected[:-1, 2:, :-3] = vol[0, 1:, :-2, 3:]
    assert torch.equal(out, expected)


def test_initial_points_of_the_8_heads_lie_in_the_8_octants() -> None:
    attn = MSDeformAttn3D(32, heads=8, levels=3, points=4)
    shapes = [(16, 12, 8), (8, 6, 4), (4, 3, 2)]
    ref = torch.full((1, 5, 3), 0.5)
    locations = attn.sampling_locations(torch.randn(1, 5, 32), ref, shapes)  # [1, 5, 8, 3, 4, 3]
    rel = locations - ref[:, :, None, None, None, :]
    signs = torch.sign(rel)
    assert not (signs == 0).any()
    octants = set()
    for h in range(8):
        head_signs = signs[:, :, h].reshape(-1, 3)
        assert (head_signs == head_signs[0]).all(), "all points of a head share one octant"
        octants.add(tuple(head_signs[0].tolist()))
    assert octants == set(itertools.product((-1.0, 1.0), repeat=3))
    # points step outwards 1, 2, 3, 4 voxels of each level along the diagonal
    sizes = torch.tensor(shapes, dtype=torch.float32)
    voxels = (rel[0, 0] * sizes[None, :, None, :]).abs()
    steps = torch.arange(1, 5, dtype=torch.float32)[None, None, :, None].expand_as(voxels)
    torch.testing.assert_close(voxels, steps)
    assert torch.equal(octant_directions(8).abs(), torch.ones(8, 3))


def test_initial_attention_weights_are_uniform_and_output_has_query_shape() -> None:
    attn = MSDeformAttn3D(16, heads=8, levels=2, points=4, query_dim=24, value_dim=40, out_dim=24)
    shapes = [(4, 4, 2), (2, 2, 1)]
    value = torch.randn(2, 32 + 4, 40)
    query = torch.randn(2, 7, 24)
    out = attn(query, torch.rand(2, 7, 3), value, shapes)
    assert out.shape == (2, 7, 24)
    logits = attn.attention_weights(query)
    assert torch.equal(logits, torch.zeros_like(logits))
