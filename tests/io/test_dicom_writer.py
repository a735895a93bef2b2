"""write_dicom_series: valid tags, round trip through load_study, deterministic UIDs, bad arguments."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from prima.io import load_study, read_dicom, write_dicom_series


def _ras_affine(spacing, origin=(0.0, 0.0, 0.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("through_axis,plane,iop", [
    (2, "axial", [1, 0, 0, 0, 1, 0]),
    (1, "coronal", [1, 0, 0, 0, 0, -1]),
    (0, "sagittal", [0, 1, 0, 0, 0, -1]),
])
def test_round_trip_each_plane(tmp_path, through_axis, plane, iop):
    rng = np.random.default_rng(through_axis)
    volume = rng.normal(100.0, 30.0, size=(12, 14, 10)).astype(np.float32)
    spacing = [0.8, 0.9, 1.1]
    spacing[through_axis] = 3.5
    affine = _ras_affine(spacing, (-5.0, 7.0, 11.0))
    paths = write_dicom_series(volume, affine, tmp_path / "s", series_description=f"{plane} test",
                               through_axis=through_axis, uid_seed="x")
    assert len(paths) == volume.shape[through_axis]
    ds = pydicom.dcmread(paths[0])
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-9)
    assert float(ds.SliceThickness) == pytest.approx(3.5)
    assert ds.PatientName == "ANON^ANON" and ds.Modality == "MR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    (series,) = load_study(tmp_path).series
    assert series.plane == plane and series.through_axis == through_axis
    # RAS input -> L,P,S output flips the first two axes.
    expected = volume[::-1, ::-1, :]
    expected_affine = affine @ np.array([[-1, 0, 0, 11], [0, -1, 0, 13], [0, 0, 1, 0], [0, 0, 0, 1]])
    slope = float(ds.RescaleSlope)
    assert slope == pytest.approx((volume.max() - volume.min()) / 65535, rel=1e-6)
    np.testing.assert_allclose(series.array, expected, atol=slope / 2 + 1e-4)
    np.testing.assert_allclose(series.affine, expected_affine, atol=1e-5)


def test_integer_data_is_stored_exactly(tmp_path):
    volume = np.arange(-1000, -1000 + 6 * 7 * 5).reshape(6, 7, 5).astype(np.float32)
    paths = write_dicom_series(volume, _ras_affine([1, 1, 5]), tmp_path, series_description="CT-like",
                               modality="CT")
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) == 1.0
    array, _ = read_dicom(tmp_path)
    np.testing.assert_array_equal(array, volume[::-1, ::-1, :])


def test_uids_are_deterministic_with_seed_and_fresh_without(tmp_path):
    volume = np.ones((4, 4, 3), dtype=np.float32)
    kwargs = dict(series_description="S", through_axis=2)
    a = write_dicom_series(volume, np.eye(4), tmp_path / "a", uid_seed=7, **kwargs)
    b = write_dicom_series(volume, np.eye(4), tmp_path / "b", uid_seed=7, **kwargs)
    c = write_dicom_series(volume, np.eye(4), tmp_path / "c", **kwargs)
    uids = [[pydicom.dcmread(p).SOPInstanceUID for p in paths] for paths in (a, b, c)]
    assert uids[0] == uids[1]
    assert not set(uids[0]) & set(uids[2])
    assert len(set(uids[0])) == 3
    for uid in uids[0]:
        assert pydicom.uid.UID(uid).is_valid


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        write_dicom_series(np.zeros((4, 4)), np.eye(4), tmp_path, series_description="x")
    with pytest.raises(ValueError, match="NaN"):
        write_dicom_series(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path, series_description="x")
    with pytest.raises(ValueError, match="modality"):
        write_dicom_series(np.zeros((2, 2, 2)), np.eye(4), tmp_path, series_description="x", modality="US")
    with pytest.raises(ValueError, match="through_axis"):
        write_dicom_series(np.zeros((2, 2, 2)), np.eye(4), tmp_path, series_description="x", through_axis=3)
