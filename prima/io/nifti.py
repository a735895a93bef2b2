"""NIfTI reading (``.nii`` / ``.nii.gz``): one file is one 3D series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from prima.errors import SeriesLoadError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (the default series name)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image as stored.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        (array, affine): float32 array (X, Y, Z) with scl_slope/scl_inter applied (NaN/Inf kept; the
        study loader sanitises them), and the (4, 4) voxel -> RAS mm affine (sform, else qform).
        Trailing singleton dimensions beyond the third are dropped.

    Raises:
        SeriesLoadError: unreadable file, a 4D (or higher) image with more than one volume, a 2D image.
    """
    path = Path(path)
    try:
        image = nib.load(path)
    except Exception as error:  # noqa: BLE001 - nibabel raises several types for bad files
        raise SeriesLoadError(f"{path.name}: not a readable NIfTI file ({error})", nifti_stem(path)) from error
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise SeriesLoadError(f"{len(shape)}D image of shape {shape} holds {int(np.prod(shape[3:]))} volumes; "
                              "split it into 3D files (one series each)", nifti_stem(path))
    if len(shape) < 3 or min(shape) < 2:
        raise SeriesLoadError(f"2D image of shape {tuple(image.shape)}: a series must be a 3D volume",
                              nifti_stem(path))
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:  # noqa: BLE001 - truncated data etc.
        raise SeriesLoadError(f"{path.name}: voxel data could not be read ({error})", nifti_stem(path)) from error
    return array, np.asarray(image.affine, dtype=np.float64)
