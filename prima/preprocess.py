"""Per-series preprocessing (docs/design.md §2): reorient to LPS, resample, normalise intensities.

Pure functions on arrays and affines; ``preprocess_series`` chains them on a ``prima.io.Series``. A series is
resampled over its own field of view (the paper), or, with ``PreprocessConfig.grid == "head"``, onto a fixed box
centred on its study's head (``grid_anchor``), so that a voxel index is the same place in every study.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from nibabel import orientations
from scipy import ndimage

from prima.config import PreprocessConfig
from prima.io.orientation import PLANE_OF_THROUGH_AXIS, TARGET_AXCODES, reorient, through_axis_from_spacing, voxel_spacing
from prima.io.study import Series


def reorient_to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip a 3D array so ``nibabel.aff2axcodes(affine) == ('L', 'P', 'S')`` (no interpolation)."""
    return reorient(np.asarray(array), affine)


def detect_plane(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[str, int]:
    """(plane, through_axis) of an L,P,S-ordered array from its geometry.

    The through-plane axis has the largest spacing; spacings within 10% tie and ties go to the axis
    with the fewest voxels, then to axial. (DICOM series use the slice normal instead, see prima.io.)

    Args:
        affine: (4, 4) voxel -> RAS mm of an L,P,S-ordered array.
        shape: the array shape (3 dims).
    """
    if len(shape) != 3:
        raise ValueError(f"expected a 3D shape, got {shape}")
    axis = through_axis_from_spacing(np.asarray(affine), tuple(shape))
    return PLANE_OF_THROUGH_AXIS[axis], axis


def linear_resize_axis(array: np.ndarray, axis: int, new_size: int) -> np.ndarray:
    """Linear interpolation of one axis to ``new_size`` voxels over the same extent, float32.

    Bit for bit ``scipy.ndimage.zoom(array, zoom, order=1, mode="nearest", grid_mode=True,
    prefilter=False)`` with ``zoom`` 1 on the other axes (tested against it): the same sample
    positions, weights and float64 arithmetic. scipy evaluates its order-1 spline on all three axes
    (8 neighbours per voxel) even where the zoom is 1; blending two slices at a time is 4-20x faster.
    """
    old_size = array.shape[axis]
    # New voxel i samples old index (i + 0.5) * old/new - 0.5, clamped to the edge voxels ("nearest").
    positions = np.clip((np.arange(new_size, dtype=np.float64) + 0.5) * (old_size / new_size) - 0.5,
                        0, old_size - 1)
    lower = np.floor(positions).astype(np.intp)
    upper = np.minimum(lower + 1, old_size - 1)
    weights = positions - lower
    source = np.moveaxis(array, axis, 0)
    shape = list(array.shape)
    shape[axis] = new_size
    out = np.empty(shape, dtype=np.float32)
    target = np.moveaxis(out, axis, 0)
    for index in range(new_size):
        blend = source[lower[index]].astype(np.float64)
        blend *= 1.0 - weights[index]
        blend += source[upper[index]] * weights[index]
        target[index] = blend
    return out


def _resample_axis(array: np.ndarray, affine: np.ndarray, axis: int, new_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Resample one axis to ``new_size`` voxels covering the same extent (voxel edges aligned)."""
    old_size = array.shape[axis]
    if new_size == old_size:
        return array, affine
    factor = old_size / new_size  # old voxels per new voxel
    if factor > 1.0:
        # Anti-aliasing before decimation; sigma ~ half the decimation factor (in old voxels).
        array = ndimage.gaussian_filter1d(array, sigma=0.5 * factor, axis=axis, mode="nearest")
    array = linear_resize_axis(array, axis, new_size)
    # New voxel i sits at old index (i + 0.5) * factor - 0.5.
    scale = np.eye(4)
    scale[axis, axis] = factor
    scale[axis, 3] = 0.5 * factor - 0.5
    return array, affine @ scale


def resample_series(array: np.ndarray, affine: np.ndarray, through_axis: int, in_plane_size: int = 256,
                    min_slice_spacing_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Resample in-plane to ``in_plane_size`` x ``in_plane_size`` and through-plane to >= the minimum spacing.

    The field of view is kept (voxel edges aligned). The through-plane axis keeps its spacing when it
    is already coarser than ``min_slice_spacing_mm``; otherwise it gets ``floor(extent / min)`` slices,
    i.e. a spacing of at least the minimum. Linear interpolation, with Gaussian anti-aliasing along
    axes that are downsampled.

    Args:
        array: 3D array (X, Y, Z).
        affine: (4, 4) voxel -> RAS mm.
        through_axis: 0, 1 or 2.
        in_plane_size: voxels along each of the two other axes.
        min_slice_spacing_mm: minimum through-plane spacing.

    Returns:
        (array float32, affine) with the updated voxel grid.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    if through_axis not in (0, 1, 2):
        raise ValueError(f"through_axis must be 0, 1 or 2, got {through_axis}")
    if in_plane_size < 1 or not min_slice_spacing_mm > 0:
        raise ValueError("in_plane_size must be >= 1 and min_slice_spacing_mm > 0")
    affine = np.asarray(affine, dtype=np.float64)
    for axis in range(3):
        if axis != through_axis:
            array, affine = _resample_axis(array, affine, axis, in_plane_size)
    spacing = voxel_spacing(affine)[through_axis]
    if spacing < min_slice_spacing_mm:
        extent = spacing * array.shape[through_axis]
        new_size = max(1, int(np.floor(extent / min_slice_spacing_mm + 1e-6)))
        array, affine = _resample_axis(array, affine, through_axis, new_size)
    return np.ascontiguousarray(array, dtype=np.float32), affine


def find_head_centre(series: Sequence[Series]) -> np.ndarray:
    """RAS mm centre of the head as the images show it, without a registration: the centroid of the foreground
    (voxels above a tenth of the 99th percentile) of the series whose foreground is the largest in volume, so a
    slab that covers part of the head does not decide it.

    Raises:
        ValueError: no series has a foreground.
    """
    best_volume, centre = 0.0, None
    for one in series:
        values = np.asarray(one.array, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if not finite.size:
            continue
        foreground = values > 0.1 * np.percentile(finite[:: max(1, finite.size // 1_000_000)], 99)
        volume = float(foreground.sum()) * abs(np.linalg.det(one.affine[:3, :3]))
        if volume > best_volume:
            voxel = np.asarray(ndimage.center_of_mass(foreground))
            best_volume, centre = volume, one.affine[:3, :3] @ voxel + one.affine[:3, 3]
    if centre is None:
        raise ValueError("no series has a foreground to centre the head grid on")
    return centre


def grid_anchor(series: Sequence[Series], config: PreprocessConfig) -> np.ndarray | None:
    """What ``preprocess_series`` needs besides a series: the study's head centre on the "head" grid (from all of
    its series), None on the paper's per-series field of view."""
    return find_head_centre(series) if config.grid == "head" else None


def head_grid(affine: np.ndarray, through_axis: int, head_centre: np.ndarray, config: PreprocessConfig
              ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the "head" grid of an L,P,S-ordered series: its own axes, the config's box and spacing
    (``in_plane_size`` voxels over each in-plane extent, ``min_slice_spacing_mm`` through the plane), and the
    box's centre on ``head_centre``.

    Args:
        affine: (4, 4) voxel -> RAS mm of the reoriented series (its axes' directions are kept).
        through_axis: the array axis across the acquisition plane.
        head_centre: (3,) RAS mm (``find_head_centre``).
        config: the preprocessing config.
    """
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    in_plane = iter(config.head_box_mm[:2])
    shape, spacing = [], []
    for axis in range(3):
        if axis == through_axis:
            shape.append(max(1, int(round(config.head_box_mm[2] / config.min_slice_spacing_mm))))
            spacing.append(config.min_slice_spacing_mm)
        else:
            shape.append(config.in_plane_size)
            spacing.append(next(in_plane) / config.in_plane_size)
    linear = directions * np.asarray(spacing)
    target = np.eye(4)
    target[:3, :3] = linear
    target[:3, 3] = np.asarray(head_centre, dtype=np.float64) - linear @ ((np.asarray(shape) - 1) / 2)
    return tuple(shape), target


def resample_onto(array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], target_affine: np.ndarray
                  ) -> np.ndarray:
    """``array`` (voxel -> RAS ``affine``) sampled linearly at the voxel centres of another grid, float32; outside
    its field of view the array's minimum (background). Axes that the target samples more coarsely are smoothed
    first (Gaussian, sigma half the decimation factor, as ``resample_series`` does)."""
    array = np.asarray(array, dtype=np.float32)
    mapping = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    for axis, factor in enumerate(np.abs(matrix).max(axis=1)):
        if factor > 1.0:
            array = ndimage.gaussian_filter1d(array, sigma=0.5 * factor, axis=axis, mode="nearest")
    finite = array[np.isfinite(array)]
    background = float(finite.min()) if finite.size else 0.0
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9):
        matrix = np.diag(matrix)  # an axis-aligned mapping: scipy's faster path
    return ndimage.affine_transform(array, matrix, offset, output_shape=tuple(shape), order=1, mode="constant",
                                    cval=background, prefilter=False).astype(np.float32, copy=False)


def normalize_intensity(array: np.ndarray, lower_percentile: float = 0.5, upper_percentile: float = 99.5,
                        foreground_only: bool = True) -> np.ndarray:
    """Map intensities to [0, 1] by percentile scaling, clipping outliers.

    NaN becomes 0 and +/-Inf are clipped like any other outlier. With ``foreground_only`` the
    percentiles are taken over voxels above the minimum (background air in MRI is a large block of
    the lowest value); when no such voxel exists all voxels are used. A constant image maps to 0.

    Args:
        array: any-shape array.
        lower_percentile: percentile mapped to 0.
        upper_percentile: percentile mapped to 1.
        foreground_only: see above.

    Returns:
        float32 array of the same shape, values in [0, 1].
    """
    if not 0 <= lower_percentile < upper_percentile <= 100:
        raise ValueError(f"need 0 <= lower_percentile < upper_percentile <= 100, got "
                         f"{lower_percentile}, {upper_percentile}")
    values = np.asarray(array, dtype=np.float32)
    finite_mask = np.isfinite(values)
    all_finite = bool(finite_mask.all())  # the usual case: no masked copies needed
    finite = values.ravel() if all_finite else values[finite_mask]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    sample = finite
    if foreground_only:
        foreground = finite[finite > finite.min()]
        if foreground.size:
            sample = foreground
    if sample.size > 2_000_000:  # percentiles of a strided subsample are accurate to well under 0.1%
        sample = sample[:: sample.size // 1_000_000]
    lo, hi = (np.float32(v) for v in np.percentile(sample, [lower_percentile, upper_percentile]))
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values if all_finite else np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)) - lo
    out /= hi - lo
    np.clip(out, 0.0, 1.0, out=out)
    if not all_finite:
        out[np.isnan(values)] = 0.0
    return out


def preprocess_series(series: Series, config: PreprocessConfig | None = None,
                      head_centre: np.ndarray | None = None) -> Series:
    """A reoriented, resampled and normalised copy of ``series`` (plane and through_axis unchanged).

    Args:
        series: a loaded series (``prima.io.load_study``); any orientation is accepted.
        config: the model config's preprocessing section. Default: ``PreprocessConfig()``.
        head_centre: (3,) RAS mm, the study's ``grid_anchor``; required on the "head" grid, unused otherwise.

    ``meta["preprocessing"]`` records the config and the shape/spacing before resampling.

    Raises:
        ValueError: the "head" grid without a ``head_centre``.
    """
    config = config if config is not None else PreprocessConfig()
    transform = orientations.ornt_transform(orientations.io_orientation(series.affine),
                                            orientations.axcodes2ornt(TARGET_AXCODES))
    through_axis = int(transform[series.through_axis, 0])  # unchanged for series from load_study
    array, affine = reorient_to_lps(series.array, series.affine)
    if config.grid == "head":
        if head_centre is None:
            raise ValueError("the head grid needs the study's head centre (prima.preprocess.grid_anchor)")
        shape, target = head_grid(affine, through_axis, head_centre, config)
        array, affine = resample_onto(array, affine, shape, target), target
    else:
        array, affine = resample_series(array, affine, through_axis, config.in_plane_size,
                                        config.min_slice_spacing_mm)
    array = normalize_intensity(array, config.intensity_low_percentile, config.intensity_high_percentile,
                                config.foreground_only)
    meta = {**series.meta, "preprocessing": {**dataclasses.asdict(config),
                                             "original_shape": list(series.shape),
                                             "original_spacing_mm": list(series.spacing),
                                             **({"head_centre_mm": [float(v) for v in head_centre]}
                                                if config.grid == "head" else {})}}
    return dataclasses.replace(series, array=array, affine=affine, through_axis=through_axis,
                               plane=PLANE_OF_THROUGH_AXIS[through_axis], meta=meta)
