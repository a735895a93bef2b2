"""Cut a preprocessed series into 32x32x4 volume patches and drop background patches (docs/design.md §2).

Pure, vectorised numpy functions. A patch always has its through-plane axis LAST and its two
in-plane axes in the order they have in the array, whatever the acquisition plane, so an axial,
a coronal and a sagittal patch all have shape ``patch_size``. Patch coordinates are integer
indices on the patch grid, in array-axis order, so ``coords[:, a] * patch_extent[a]`` is the first
voxel of the patch along array axis ``a``.
"""

from __future__ import annotations

import math

import numpy as np
from einops import rearrange
from skimage.filters import threshold_otsu

DEFAULT_PATCH_SIZE: tuple[int, int, int] = (32, 32, 4)
# How many times select_tokens halves the minimum foreground fraction before falling back to the
# patches with the largest foreground fractions.
_MAX_THRESHOLD_HALVINGS = 8


def _check_volume(volume: np.ndarray, through_axis: int, patch_size: tuple[int, int, int]) -> None:
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    _check_geometry(through_axis, patch_size)


def _check_geometry(through_axis: int, patch_size: tuple[int, ...]) -> None:
    if through_axis not in (0, 1, 2):
        raise ValueError(f"through_axis must be 0, 1 or 2, got {through_axis!r}")
    if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be three positive ints, got {patch_size!r}")


def _canonical_order(per_axis: tuple[int, ...], through_axis: int) -> tuple[int, ...]:
    """Per-array-axis values reordered as (in-plane, in-plane, through-plane), the patches' layout."""
    return tuple(v for axis, v in enumerate(per_axis) if axis != through_axis) + (per_axis[through_axis],)


def patch_extent(through_axis: int, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE) -> tuple[int, int, int]:
    """The patch size along each array axis (the through-plane size sits at ``through_axis``)."""
    _check_geometry(through_axis, patch_size)
    in_plane = iter(patch_size[:2])
    return tuple(patch_size[2] if axis == through_axis else next(in_plane) for axis in range(3))


def patch_grid_shape(
    volume_shape: tuple[int, int, int], through_axis: int, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
) -> tuple[int, int, int]:
    """Number of patches along each array axis once the far edges are zero-padded."""
    extent = patch_extent(through_axis, patch_size)
    return tuple(-(-int(size) // p) for size, p in zip(volume_shape, extent))


def patchify(
    volume: np.ndarray, through_axis: int, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a volume into non-overlapping patches, zero-padding the far edge of every axis.

    Args:
        volume: (D0, D1, D2) array, any dtype.
        through_axis: the array axis perpendicular to the acquisition plane (0, 1 or 2).
        patch_size: (in-plane, in-plane, through-plane) voxels.

    Returns:
        patches: (N, *patch_size) array of ``volume.dtype``, through-plane axis last, the two in-plane
            axes in array order; N = product of :func:`patch_grid_shape`, in C order of the grid.
        coords: (N, 3) int64 patch-grid indices in array-axis order.
    """
    _check_volume(volume, through_axis, patch_size)
    canonical = np.moveaxis(volume, through_axis, -1)
    grid = patch_grid_shape(volume.shape, through_axis, patch_size)
    canonical_grid = _canonical_order(grid, through_axis)
    padding = [(0, g * p - size) for g, p, size in zip(canonical_grid, patch_size, canonical.shape)]
    padded = np.pad(canonical, padding) if any(after for _, after in padding) else canonical
    patches = rearrange(
        padded, "(g0 p0) (g1 p1) (g2 p2) -> (g0 g1 g2) p0 p1 p2", p0=patch_size[0], p1=patch_size[1], p2=patch_size[2]
    )
    canonical_coords = np.indices(canonical_grid, dtype=np.int64).reshape(3, -1).T
    coords = np.empty_like(canonical_coords)
    coords[:, [axis for axis in range(3) if axis != through_axis]] = canonical_coords[:, :2]
    coords[:, through_axis] = canonical_coords[:, 2]
    return np.ascontiguousarray(patches), coords


def unpatchify(
    patches: np.ndarray,
    coords: np.ndarray,
    volume_shape: tuple[int, int, int],
    through_axis: int,
) -> np.ndarray:
    """Put patches back at their grid coordinates; the inverse of :func:`patchify`.

    Args:
        patches: (N, p_in, p_in, p_through) array as returned by :func:`patchify` (possibly a subset).
        coords: (N, 3) patch-grid indices in array-axis order.
        volume_shape: shape of the original volume; the padding is cropped away.
        through_axis: the through-plane array axis used when patchifying.

    Returns:
        (D0, D1, D2) array of ``patches.dtype``; voxels not covered by any patch are zero.
    """
    if patches.ndim != 4:
        raise ValueError(f"patches must be (N, p, p, p), got shape {patches.shape}")
    coords = np.asarray(coords)
    if coords.shape != (patches.shape[0], 3):
        raise ValueError(f"coords must be ({patches.shape[0]}, 3), got {coords.shape}")
    patch_size = tuple(int(s) for s in patches.shape[1:])
    if len(volume_shape) != 3:
        raise ValueError(f"volume_shape must have 3 entries, got {volume_shape!r}")
    _check_geometry(through_axis, patch_size)
    grid = patch_grid_shape(volume_shape, through_axis, patch_size)
    canonical_grid = _canonical_order(grid, through_axis)
    in_plane_axes = [axis for axis in range(3) if axis != through_axis]
    canonical_coords = coords[:, in_plane_axes + [through_axis]]
    if len(coords) and (canonical_coords.min() < 0 or np.any(canonical_coords.max(axis=0) >= canonical_grid)):
        raise ValueError(f"coords fall outside the patch grid {grid} of a volume of shape {tuple(volume_shape)}")
    gridded = np.zeros(canonical_grid + patch_size, dtype=patches.dtype)
    gridded[tuple(canonical_coords.T)] = patches
    padded = rearrange(gridded, "g0 g1 g2 p0 p1 p2 -> (g0 p0) (g1 p1) (g2 p2)")
    canonical_shape = _canonical_order(tuple(volume_shape), through_axis)
    cropped = padded[: canonical_shape[0], : canonical_shape[1], : canonical_shape[2]]
    return np.ascontiguousarray(np.moveaxis(cropped, -1, through_axis))


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Voxels brighter than the series' Otsu threshold (all False for a constant volume)."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    values = volume.astype(np.float32, copy=False)
    if values.size == 0 or float(values.max()) == float(values.min()):
        return np.zeros(volume.shape, dtype=bool)
    return values > threshold_otsu(values)


def foreground_fractions(
    volume: np.ndarray, through_axis: int, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
) -> np.ndarray:
    """Fraction of each patch's voxels above the series' Otsu threshold, in :func:`patchify` order.

    Padding voxels count as background, so an edge patch is judged on its full size.

    Returns:
        (N,) float32 in [0, 1].
    """
    _check_volume(volume, through_axis, patch_size)
    mask_patches, _ = patchify(foreground_mask(volume), through_axis, patch_size)
    voxels = np.count_nonzero(mask_patches.reshape(len(mask_patches), -1), axis=1)
    return (voxels / math.prod(patch_size)).astype(np.float32)


def select_tokens(fractions: np.ndarray, min_fraction: float, min_tokens: int = 25) -> np.ndarray:
    """Indices of the patches whose foreground fraction reaches ``min_fraction``.

    When fewer than ``min_tokens`` patches survive, the threshold is halved step by step (up to
    8 times); if still too few survive, the ``min_tokens`` patches with the largest fractions are
    kept (every patch when there are fewer than that).

    Args:
        fractions: (N,) foreground fractions from :func:`foreground_fractions`.
        min_fraction: threshold in [0, 1].
        min_tokens: at least this many patches are kept when the series has them (>= 1).

    Returns:
        (K,) int64 indices into ``fractions``, increasing, so tokens and coordinates stay aligned.
    """
    fractions = np.asarray(fractions)
    if fractions.ndim != 1:
        raise ValueError(f"fractions must be 1-D, got shape {fractions.shape}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens!r}")
    wanted = min(min_tokens, len(fractions))
    threshold = float(min_fraction)
    for _ in range(_MAX_THRESHOLD_HALVINGS + 1):
        kept = np.flatnonzero(fractions >= threshold)
        if len(kept) >= wanted:
            return kept.astype(np.int64)
        threshold /= 2
    largest = np.argsort(-fractions, kind="stable")[:wanted]
    return np.sort(largest).astype(np.int64)
