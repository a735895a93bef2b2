"""Geometry helpers shared by the readers, the writer and preprocessing.

Conventions: affines map voxel indices to world millimetres in RAS+ (nibabel/NIfTI). DICOM patient
coordinates are LPS, so converting between the two flips the sign of the first two world axes.
Volumes handed out by ``prima.io`` have their array axes ordered L, P, S, i.e.
``nibabel.aff2axcodes(affine) == ('L', 'P', 'S')``.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TARGET_AXCODES = ("L", "P", "S")
PLANE_OF_THROUGH_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


def axcodes(affine: np.ndarray) -> str:
    """Orientation code of an affine, e.g. ``"LPS"`` or ``"RAS"`` (nibabel convention)."""
    return "".join(str(code) for code in orientations.aff2axcodes(affine))


# Voxel axes whose directions are closer to parallel than this (ratio of the smallest to the largest
# singular value of the unit axis vectors) do not span space: no image geometry, however sheared.
DEGENERATE_AXES = 1e-6


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` cannot map voxels to the world (non-finite, a zero-length axis, axes parallel), or None.

    The readers refuse such affines: reorientation and plane detection need three independent axes.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "not a finite 4x4 matrix"
    with np.errstate(over="ignore"):
        lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.isfinite(lengths).all() and (lengths > 0).all()):
        return f"voxel sizes {lengths.tolist()} are not finite and positive"
    singular = np.linalg.svd(affine[:3, :3] / lengths, compute_uv=False)
    if singular.min() < DEGENERATE_AXES * singular.max():
        return "voxel axes are (nearly) parallel"
    return None


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def reorient(array: np.ndarray, affine: np.ndarray, target: tuple[str, str, str] = TARGET_AXCODES
             ) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``array`` so its axes follow ``target`` axcodes, updating ``affine`` to match.

    Only axis permutations and flips are applied (no interpolation); an oblique acquisition keeps its
    obliquity in the affine.
    """
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    transform, new_affine = lps_transform(affine, array.shape, target)
    if transform is None:
        return array, new_affine
    return contiguous(orientations.apply_orientation(array, transform)), new_affine


def lps_transform(affine: np.ndarray, shape: tuple[int, ...], target: tuple[str, str, str] = TARGET_AXCODES
                  ) -> tuple[np.ndarray | None, np.ndarray]:
    """The nibabel orientation transform that brings an array of ``shape`` under ``affine`` to ``target``
    axcodes (None when it already is) and the affine after it."""
    affine = np.asarray(affine, dtype=np.float64)
    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(target))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return None, affine
    return transform, affine @ orientations.inv_ornt_aff(transform, shape)


def inverse_transform(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform``: ``apply_orientation(apply_orientation(a, t),
    inverse_transform(t))`` is ``a`` (as a view)."""
    inverse = np.empty_like(transform)
    for axis, (new_axis, flip) in enumerate(transform):
        inverse[int(new_axis)] = (axis, flip)
    return inverse


# Tiles of ``contiguous`` and ``copy_tiled``: planes along the axis with the largest stride (DICOM: slices) x
# along the one with the middle stride (rows).
_TILE_LARGEST, _TILE_MIDDLE = 16, 8
TILE_SLICES = 32  # slices per band in ``copy_tiled`` (the DICOM reader reads that many files per band)
_SMALL = 1 << 16  # elements; below this numpy's own copy is as fast


def contiguous(array: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """``np.ascontiguousarray(array, dtype)`` (same values), faster for a transposed 3D view.

    numpy copies a view whose last axis has the largest stride (e.g. DICOM slices, stored (slice, row,
    column), seen as (column, row, slice)) one element per cache line; with power-of-two image sizes
    the lines also collide in the cache (256^3 float32: ~0.18 s). Copying tiles of 16 planes along the
    largest-stride axis by 8 along the middle-stride one keeps the lines in use (~0.02 s, any of the
    three orientations; benchmarks/bench_load_dicom.py).
    """
    if array.flags.c_contiguous or array.ndim != 3 or array.size < _SMALL:
        return np.ascontiguousarray(array, dtype=dtype)
    smallest, middle, largest = np.argsort(np.abs(array.strides), kind="stable")
    if smallest == 2:  # rows stay rows (flips, swapped planes): numpy copies those at memory speed
        return np.ascontiguousarray(array, dtype=dtype)
    out = np.empty(array.shape, dtype=dtype or array.dtype)
    index: list[slice] = [slice(None)] * 3
    for start in range(0, array.shape[largest], _TILE_LARGEST):
        index[largest] = slice(start, start + _TILE_LARGEST)
        for inner in range(0, array.shape[middle], _TILE_MIDDLE):
            index[middle] = slice(inner, inner + _TILE_MIDDLE)
            out[tuple(index)] = array[tuple(index)]
    return out


def through_axis_from_normal(normal_world: np.ndarray, affine: np.ndarray) -> int:
    """Array axis closest to a world direction (the slice normal): the through-plane axis.

    Works for any orientation of ``affine``: each array axis' direction is compared with the normal.
    """
    directions = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    normal = np.asarray(normal_world, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    return int(np.argmax(np.abs(directions.T @ normal)))


def through_axis_from_spacing(affine: np.ndarray, shape: tuple[int, ...], tie_tolerance: float = 0.1) -> int:
    """Through-plane axis from geometry alone (NIfTI): the axis with the largest spacing.

    Spacings within ``tie_tolerance`` (relative) of the largest tie; ties go to the axis with the fewest
    voxels, then to the axial axis (2), then the coronal one (1).
    """
    spacing = np.array(voxel_spacing(affine))
    candidates = [axis for axis in range(3) if spacing[axis] >= spacing.max() * (1.0 - tie_tolerance)]
    # Sort key: fewest voxels first; among equal counts prefer axial (2), then coronal (1), then sagittal (0).
    return min(candidates, key=lambda axis: (shape[axis], -axis))


def copy_tiled(target: np.ndarray, source: np.ndarray, start: int = 0) -> None:
    """``target[:, :, start:start + n] = source`` (n = ``source.shape[2]``, any dtypes) for arrays seen in
    the stored DICOM order (columns, rows, slices), ``target`` any view (of an L,P,S array, say).

    Copied in bands of ``TILE_SLICES`` slices; when the slice axis is the target's contiguous one (axial
    images) each band goes in tiles of 8 rows, so that the cache lines written stay in use (a 256^3
    uint16 -> float32 copy: ~0.025 s instead of ~0.04 s whole-band; sagittal and coronal targets are
    fastest whole-band, ~0.02 s).
    """
    slices, rows = source.shape[2], source.shape[1]
    strides = np.abs(target.strides)
    row_tile = _TILE_MIDDLE if strides[2] <= strides.min() else rows
    for first in range(0, slices, TILE_SLICES):
        last = min(first + TILE_SLICES, slices)
        for row in range(0, rows, row_tile):
            rows_tile = slice(row, row + row_tile)
            target[:, rows_tile, start + first:start + last] = source[:, rows_tile, first:last]
