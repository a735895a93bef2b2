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
    affine = np.asarray(affine, dtype=np.float64)
    current = orientations.io_orientation(affine)
    wanted = orientations.axcodes2ornt(target)
    transform = orientations.ornt_transform(current, wanted)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = orientations.apply_orientation(array, transform)
    new_affine = affine @ orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


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
