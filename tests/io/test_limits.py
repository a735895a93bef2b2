"""prima.io.limits: series, voxels and field of view are bounded from the headers, before decoding."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from prima.errors import NoUsableSeriesError, StudyLoadError
from prima.io import StudyLimits, load_study, write_dicom_series

AXIAL = np.diag([-2.0, -2.0, 4.0, 1.0])


@pytest.fixture()
def study(tmp_path):
    """Two DICOM series of 32 x 32 x 8 = 8192 voxels and one NIfTI of 16 x 16 x 8 = 2048."""
    rng = np.random.default_rng(0)
    for number, name in enumerate(("AX T2", "AX FLAIR"), start=1):
        write_dicom_series((rng.random((32, 32, 8)) * 1000).astype(np.float32), AXIAL, tmp_path / name,
                           series_description=name, series_number=number, uid_seed=name)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 8)).astype(np.float32), AXIAL), tmp_path / "extra.nii.gz")
    return tmp_path


def test_defaults_load_the_study(study):
    assert [s.name for s in load_study(study).series] == ["AX T2", "AX FLAIR", "extra"]


def test_a_series_over_the_voxel_bound_is_skipped_with_the_reason(study):
    loaded = load_study(study, limits=StudyLimits(max_voxels_per_series=4096))
    assert [s.name for s in loaded.series] == ["extra"]
    assert [s.reason for s in loaded.skipped] == ["8,192 voxels, more than the limit of 4,096 per series"] * 2


def test_a_nifti_over_the_voxel_bound_is_skipped(study):
    with pytest.raises(NoUsableSeriesError, match="2,048 voxels, more than the limit of 1,000"):
        load_study(study / "extra.nii.gz", limits=StudyLimits(max_voxels_per_series=1000))


def test_too_many_series_refuse_the_study(study):
    with pytest.raises(StudyLoadError, match="more than 2 series"):
        load_study(study, limits=StudyLimits(max_series=2))


def test_too_many_voxels_in_total_refuse_the_study(study):
    with pytest.raises(StudyLoadError, match="more than 10,000 voxels"):
        load_study(study, limits=StudyLimits(max_total_voxels=10_000))


def test_an_implausible_field_of_view_is_skipped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.diag([100.0, 100.0, 100.0, 1.0])),
             tmp_path / "wide.nii.gz")
    with pytest.raises(NoUsableSeriesError, match="field of view 1600 x 1600 x 800 mm exceeds the limit of 1000 mm"):
        load_study(tmp_path / "wide.nii.gz")
    assert load_study(tmp_path / "wide.nii.gz", limits=StudyLimits(max_extent_mm=2000)).series
