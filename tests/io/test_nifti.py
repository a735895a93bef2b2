"""NIfTI reading on nibabel's real test images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from helpers.studies import NIBABEL_DATA
from prima.errors import SeriesLoadError
from prima.io import load_study, read_nifti


def _same_world(series, path):
    """Every loaded voxel holds the original value at the same world position."""
    image = nib.load(path)
    original = np.asarray(image.dataobj, dtype=np.float32)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in series.shape], indexing="ij"), -1).reshape(-1, 3)
    to_original = np.linalg.inv(image.affine) @ series.affine
    original_index = np.round(index @ to_original[:3, :3].T + to_original[:3, 3]).astype(int)
    values = original[tuple(original_index.T)]
    finite = np.isfinite(values)
    np.testing.assert_array_equal(series.array.reshape(-1)[finite], values[finite])


def test_anatomical():
    (series,) = load_study(NIBABEL_DATA / "anatomical.nii").series
    assert series.name == "anatomical" and series.source_orientation == "LAS"
    assert series.shape == (33, 41, 25) and series.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert series.plane == "axial"  # isotropic: fewest voxels along S
    assert nib.aff2axcodes(series.affine) == ("L", "P", "S")
    _same_world(series, NIBABEL_DATA / "anatomical.nii")


@pytest.mark.parametrize("name,orientation,shape", [
    ("reoriented_anat_moved.nii", "RAS", (21, 26, 22)),
    ("resampled_anat_moved.nii", "LAS", (17, 21, 3)),
    ("standard.nii.gz", "RAS", (4, 5, 7)),
])
def test_reoriented_and_resampled_images(name, orientation, shape):
    (series,) = load_study(NIBABEL_DATA / name).series
    assert series.source_orientation == orientation
    assert series.shape == shape
    assert nib.aff2axcodes(series.affine) == ("L", "P", "S")
    _same_world(series, NIBABEL_DATA / name)


def test_real_image_with_nan_is_sanitised():
    (series,) = load_study(NIBABEL_DATA / "resampled_anat_moved.nii").series
    assert series.meta["nonfinite_voxels"] > 0
    assert np.isfinite(series.array).all()
    assert series.plane == "axial"  # 4 x 4 x 8 mm


def test_standard_is_coronal():
    (series,) = load_study(NIBABEL_DATA / "standard.nii.gz").series
    assert series.spacing == pytest.approx((1.0, 3.0, 2.0))
    assert series.plane == "coronal" and series.through_axis == 1


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz"])
def test_4d_images_raise(name):
    with pytest.raises(SeriesLoadError, match="4D image"):
        read_nifti(NIBABEL_DATA / name)


def test_unreadable_nifti(tmp_path):
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SeriesLoadError, match="not a readable NIfTI"):
        read_nifti(bad)
