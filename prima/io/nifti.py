"""NIfTI reading (``.nii`` / ``.nii.gz``): one file is one 3D series."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from prima.errors import SeriesLoadError
from prima.io.limits import StudyBudget
from prima.io.orientation import affine_problem

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Compressed files declaring at most this many voxel bytes are read without counting them first.
_UNCHECKED_BYTES = 64 << 20


def is_nifti_path(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (the default series name)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: str | Path, *, budget: StudyBudget | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image as stored.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        budget: the study's ``StudyBudget``: the declared voxels and field of view are checked against
            it before the voxels are read.

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
    affine = np.asarray(image.affine, dtype=np.float64)
    problem = affine_problem(affine)
    if problem:
        raise SeriesLoadError(f"{path.name}: header geometry (sform/qform) gives no usable affine: {problem}",
                              nifti_stem(path))
    if budget is not None:
        budget.claim(nifti_stem(path), int(np.prod(shape, dtype=np.int64)))
        budget.check_extent(nifti_stem(path), affine, shape)
    _check_data_size(path, image, shape)
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:  # noqa: BLE001 - truncated data etc.
        raise SeriesLoadError(f"{path.name}: voxel data could not be read ({error})", nifti_stem(path)) from error
    return array, affine


def _check_data_size(path: Path, image: nib.Nifti1Image, shape: tuple[int, ...]) -> None:
    """SeriesLoadError when the file holds fewer voxel bytes than the header declares.

    Checked before reading because nibabel allocates the declared size first (a corrupt 4096^3
    header would take 256 GiB). A compressed file is decompressed in chunks and counted, only when
    the declared size is large enough for the allocation to matter.
    """
    header = image.header
    needed = int(np.prod(shape, dtype=np.float64) * header.get_data_dtype().itemsize)
    offset = int(header.get_data_offset())
    if path.name.lower().endswith(".gz"):
        if needed <= _UNCHECKED_BYTES:
            return
        available = 0
        try:
            with gzip.open(path, "rb") as stream:
                stream.seek(offset)
                while available < needed:
                    chunk = stream.read(min(1 << 20, needed - available))
                    if not chunk:
                        break
                    available += len(chunk)
        except Exception as error:  # noqa: BLE001 - corrupt gzip stream
            raise SeriesLoadError(f"{path.name}: voxel data could not be read ({error})", nifti_stem(path)) from error
    else:
        available = path.stat().st_size - offset
    if available < needed:
        raise SeriesLoadError(f"{path.name}: header declares {shape} voxels ({needed} bytes) but the file holds "
                              f"{max(available, 0)} bytes of voxel data", nifti_stem(path))
