"""prima.patching: patch/unpatch, coordinates, padding and the background filter."""

from __future__ import annotations

import numpy as np
import pytest

from prima.patching import (
    foreground_fractions,
    foreground_mask,
    patch_extent,
    patch_grid_shape,
    patchify,
    select_tokens,
    unpatchify,
)


@pytest.mark.parametrize("through_axis", [0, 1, 2])
def test_round_trip_is_exact_with_padding(through_axis: int) -> None:
    shape = [70, 45, 66]
    shape[through_axis] = 13  # not a multiple of 4, like most slice counts
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    patches, coords = patchify(volume, through_axis)
    assert patches.shape[1:] == (32, 32, 4)
    assert len(patches) == np.prod(patch_grid_shape(volume.shape, through_axis))
    assert coords.dtype == np.int64
    np.testing.assert_array_equal(unpatchify(patches, coords, volume.shape, through_axis), volume)


@pytest.mark.parametrize("through_axis", [0, 1, 2])
def test_coordinates_point_at_the_patch_voxels(through_axis: int) -> None:
    rng = np.random.default_rng(through_axis)
    shape = [64, 96, 64]
    shape[through_axis] = 12
    volume = rng.random(shape).astype(np.float32)
    patches, coords = patchify(volume, through_axis)
    extent = patch_extent(through_axis)
    assert extent[through_axis] == 4 and sorted(extent) == [4, 32, 32]
    for index in rng.choice(len(patches), 6, replace=False):
        box = tuple(slice(c * e, (c + 1) * e) for c, e in zip(coords[index], extent))
        # through-plane axis last, in-plane axes in array order
        np.testing.assert_array_equal(patches[index], np.moveaxis(volume[box], through_axis, -1))


def test_padding_is_zero_at_the_far_edges() -> None:
    volume = np.ones((33, 32, 5), dtype=np.float32)
    patches, coords = patchify(volume, through_axis=2)
    assert patch_grid_shape(volume.shape, 2) == (2, 1, 2)
    assert len(patches) == 4
    last = int(np.flatnonzero((coords == [1, 0, 1]).all(axis=1))[0])
    assert patches[last, :1, :, :1].sum() == 32  # the one real voxel column
    assert patches[last].sum() == 32
    assert patches[0].sum() == 32 * 32 * 4


def test_unpatchify_of_a_subset_leaves_zeros() -> None:
    volume = np.arange(64 * 64 * 8, dtype=np.float32).reshape(64, 64, 8) + 1
    patches, coords = patchify(volume, 2)
    restored = unpatchify(patches[:1], coords[:1], volume.shape, 2)
    np.testing.assert_array_equal(restored[:32, :32, :4], volume[:32, :32, :4])
    assert restored[32:].sum() == 0 and restored[:, :, 4:].sum() == 0


@pytest.mark.parametrize("through_axis", [0, 1, 2])
def test_filter_keeps_exactly_the_foreground_block(through_axis: int) -> None:
    shape = [96, 96, 96]
    shape[through_axis] = 16
    volume = np.zeros(shape, dtype=np.float32)
    extent = patch_extent(through_axis)
    block_start = np.array([1, 2, 1]) * extent  # a block of 2 x 1 x 2 patches on the patch grid
    block = tuple(slice(s, s + n * e) for s, n, e in zip(block_start, (2, 1, 2), extent))
    volume[block] = 0.8
    fractions = foreground_fractions(volume, through_axis)
    _, coords = patchify(volume, through_axis)
    kept = select_tokens(fractions, min_fraction=0.5, min_tokens=1)
    expected = np.flatnonzero(
        np.all((coords >= [1, 2, 1]) & (coords < [1, 2, 1] + np.array([2, 1, 2])), axis=1)
    )
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_allclose(fractions[kept], 1.0)


def test_filter_lowers_its_threshold_when_too_few_survive() -> None:
    fractions = np.array([0.9, 0.3, 0.2, 0.12, 0.01, 0.0, 0.0])
    np.testing.assert_array_equal(select_tokens(fractions, 0.5, min_tokens=1), [0])
    np.testing.assert_array_equal(select_tokens(fractions, 0.5, min_tokens=3), [0, 1, 2])  # 0.5 -> 0.25 -> 0.125
    np.testing.assert_array_equal(select_tokens(fractions, 0.5, min_tokens=5), [0, 1, 2, 3, 4])
    # never more than asked once thresholds run out: the largest fractions win
    assert len(select_tokens(fractions, 0.5, min_tokens=6)) == 6
    assert len(select_tokens(fractions, 0.5, min_tokens=25)) == 7


@pytest.mark.parametrize("through_axis", [0, 1, 2])
@pytest.mark.parametrize("patch_size", [(32, 32, 4), (5, 7, 3)])
def test_fractions_are_the_mean_of_each_mask_patch(through_axis: int, patch_size: tuple[int, int, int]) -> None:
    volume = np.random.default_rng(through_axis).random((41, 37, 29)).astype(np.float32)
    mask_patches, _ = patchify(foreground_mask(volume).astype(np.float32), through_axis, patch_size)
    fractions = foreground_fractions(volume, through_axis, patch_size)
    assert fractions.dtype == np.float32
    np.testing.assert_array_equal(fractions, mask_patches.reshape(len(mask_patches), -1).mean(axis=1))


def test_constant_volume_has_no_foreground() -> None:
    np.testing.assert_array_equal(foreground_fractions(np.ones((32, 32, 8)), 2), [0.0, 0.0])


@pytest.mark.parametrize(
    "call",
    [
        lambda: patchify(np.zeros((32, 32)), 2),
        lambda: patchify(np.zeros((32, 32, 4)), 3),
        lambda: patchify(np.zeros((32, 32, 4)), 2, (32, 0, 4)),
        lambda: unpatchify(np.zeros((2, 32, 32, 4)), np.zeros((3, 3), dtype=int), (64, 32, 4), 2),
        lambda: unpatchify(np.zeros((1, 32, 32, 4)), np.array([[5, 0, 0]]), (64, 32, 4), 2),
        lambda: select_tokens(np.zeros(4), 1.5),
        lambda: select_tokens(np.zeros(4), 0.1, min_tokens=0),
        lambda: select_tokens(np.zeros((2, 2)), 0.1),
    ],
)
def test_bad_arguments_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()
