"""load_study on generated multi-series studies, NIfTI inputs and mixed good/bad content."""

from __future__ import annotations

import json
import random
import shutil
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from helpers.studies import NIBABEL_DATA, PYDICOM_FILES, THREE_PLANE_SERIES, rewrite_at_positions
from prima.errors import NoUsableSeriesError, StudyLoadError
from prima.io import load_study, write_dicom_series

# Agreement of each series, resampled back onto the 1 mm template grid, with the template itself.
# Every 4th template slice is stored exactly (to uint16 quantisation); in between, linear interpolation
# across 4 mm slices loses fine detail, hence a correlation bound rather than exact equality.
# Measured: correlation 0.995-0.996, mean abs error 0.0047-0.0056 (see docs/io.md).
MIN_CORRELATION = 0.99
MAX_MEAN_ABS_ERROR = 0.01  # in template units (the template spans 0..1)
QUANTISATION = 1.0 / 65535  # uint16 storage of a 0..1 float volume: error <= half of this


def _on_template_grid(series, template_shape, template_affine) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``series`` at every 2nd template voxel; return (values, mask of points inside the series)."""
    grid = np.stack(np.meshgrid(*[np.arange(0, n, 2) for n in template_shape], indexing="ij"), -1).reshape(-1, 3)
    to_series = np.linalg.inv(series.affine) @ template_affine
    coords = grid @ to_series[:3, :3].T + to_series[:3, 3]
    inside = np.all((coords >= 0) & (coords <= np.array(series.array.shape) - 1), axis=1)
    values = ndimage.map_coordinates(series.array, coords.T, order=1, mode="nearest")
    return values, inside, grid


def test_three_plane_study_loads_three_series_with_planes(three_plane_study):
    study = load_study(three_plane_study.folder)
    assert study.description == "MRI BRAIN WO CONTRAST"
    assert sorted((s.name, s.plane) for s in study.series) == sorted((n, p) for n, _, p in THREE_PLANE_SERIES)
    for series in study.series:
        assert nib.aff2axcodes(series.affine) == ("L", "P", "S")
        assert series.through_axis == {"sagittal": 0, "coronal": 1, "axial": 2}[series.plane]
        assert series.spacing[series.through_axis] == pytest.approx(4.0, abs=1e-3)
        assert series.array.dtype == np.float32
        json.dumps(series.meta)
    reasons = {s.name: s.reason for s in study.skipped}
    assert "different orientations" in reasons["3-PLANE LOC"]
    assert any("non-image" in reason and "RT Plan" in reason for reason in reasons.values())
    sources = {s.source_orientation for s in study.series}
    assert sources == {"LPS", "PIR", "LIP"}  # the display orientations scanners write


def test_three_plane_series_agree_with_template(three_plane_study):
    template, affine = three_plane_study.template, three_plane_study.template_affine
    study = load_study(three_plane_study.folder)
    for series in study.series:
        values, inside, grid = _on_template_grid(series, template.shape, affine)
        expected = template[tuple(grid[inside].T)]
        got = values[inside]
        assert inside.mean() > 0.95, f"{series.name} covers only {inside.mean():.2%} of the template"
        correlation = np.corrcoef(expected, got)[0, 1]
        mean_abs = np.abs(expected - got).mean()
        assert correlation > MIN_CORRELATION, (series.name, correlation)
        assert mean_abs < MAX_MEAN_ABS_ERROR, (series.name, mean_abs)


def test_acquired_slices_match_template_exactly(three_plane_study):
    template = three_plane_study.template
    lps_template = template[::-1, ::-1, :]  # the template is RAS-ordered: flip to L,P,S
    study = {s.name: s for s in load_study(three_plane_study.folder).series}
    for name, axis, _ in THREE_PLANE_SERIES:
        # Acquired slice k sits at template RAS index 4k; after the L/P flips that is LPS index n-1-4k for
        # axes 0 and 1 (kept order along S).
        index = np.arange(0, template.shape[axis], 4)
        lps_index = index if axis == 2 else template.shape[axis] - 1 - index
        expected = np.take(lps_template, lps_index[::-1] if axis != 2 else lps_index, axis=axis)
        np.testing.assert_allclose(study[name].array, expected, atol=QUANTISATION)


def test_zip_of_three_plane_study_gives_same_volumes(three_plane_study, guarded_tmp):
    from_folder = load_study(three_plane_study.folder)
    from_zip = load_study(three_plane_study.zip_path)
    assert [s.name for s in from_zip.series] == [s.name for s in from_folder.series]
    for a, b in zip(from_zip.series, from_folder.series, strict=True):
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.affine, b.affine)
        assert a.source.startswith("study.zip!/")


def test_series_ordered_by_position_not_instance_number_or_name(tmp_path):
    offsets = [0.0, 5.0, 10.0, 15.0]
    # Slice k holds the value k; its InstanceNumber disagrees with the position order without even being
    # monotonic (a reversed order would be undone by the reorientation to L,P,S and hide a wrong sort),
    # and rewrite_at_positions shuffles the file names.
    pixels = [np.full((64, 64), k, dtype=np.int16).tobytes() for k in range(len(offsets))]
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "s", offsets, PixelData=pixels,
                         InstanceNumber=[3, 1, 4, 2])
    (series,) = load_study(tmp_path).series
    assert series.shape == (64, 64, 4) and series.through_axis == 2
    assert series.spacing == pytest.approx((0.3125, 0.3125, 5.0), abs=1e-4)
    # MR_small is axial (IOP 1\0\0\0\1\0): the slice normal is +S in both LPS and RAS, so slice k lies
    # k * 5 mm above the original slice and, with axes L,P,S, at index k of the array.
    first_slice_s = float(pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").ImagePositionPatient[2])
    for index in range(4):
        assert np.all(series.array[:, :, index] == index)
        world_s = (series.affine @ [0, 0, index, 1])[2]
        assert world_s - first_slice_s == pytest.approx(5.0 * index, abs=1e-3)


def test_loose_dicom_files_load_as_one_study_grouped_by_series(tmp_path):
    rng = np.random.default_rng(0)
    axial = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.float32)
    axial += 1000 * np.arange(4)  # every slice in its own value range: a wrong order cannot match
    sagittal = rng.integers(0, 1000, size=(3, 7, 8)).astype(np.float32)
    files = write_dicom_series(axial, np.diag([1.0, 1.0, 3.0, 1.0]), tmp_path / "ax", series_description="AX T2",
                               series_number=2, study_description="LOOSE", uid_seed=0, through_axis=2)
    files += write_dicom_series(sagittal, np.diag([4.0, 1.0, 1.0, 1.0]), tmp_path / "sag",
                                series_description="SAG T1", series_number=1, uid_seed=0, through_axis=0)
    random.Random(0).shuffle(files)
    nifti = NIBABEL_DATA / "anatomical.nii"
    study = load_study([*files[:5], nifti, *files[5:]])
    assert study.skipped == []
    assert study.description == "LOOSE"
    assert [s.name for s in study.series] == ["SAG T1", "AX T2", "anatomical"]
    sag, ax, _ = study.series
    assert (sag.plane, sag.shape) == ("sagittal", (3, 7, 8)) and (ax.plane, ax.shape) == ("axial", (6, 5, 4))
    # the writer's affines are RAS: the loader flips the first two axes to L,P and keeps S
    np.testing.assert_array_equal(ax.array, axial[::-1, ::-1, :])
    np.testing.assert_array_equal(sag.array, sagittal[::-1, ::-1, :])
    assert ax.meta["n_files"] == 4 and sag.meta["n_files"] == 3


def test_series_names_load_each_loose_file_on_its_own(tmp_path):
    files = write_dicom_series(np.ones((4, 4, 3), dtype=np.float32), np.eye(4), tmp_path / "ax",
                               series_description="AX", uid_seed=0, through_axis=2)
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(files, series_names=["a", "b", "c"])
    assert [(s.name, s.reason) for s in caught.value.skipped] == [
        (name, "a single slice cannot form a 3D volume") for name in "abc"]


def test_uneven_gaps_skip_series_with_reason(tmp_path):
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "gappy", [0.0, 5.0, 10.0, 20.0])
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(tmp_path)
    assert "uneven slice gaps" in caught.value.skipped[0].reason


def test_repeated_positions_split_by_echo(tmp_path):
    offsets = [0.0, 0.0, 4.0, 4.0, 8.0, 8.0]
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "dual", offsets,
                         EchoNumbers=[1, 2, 1, 2, 1, 2])
    study = load_study(tmp_path)
    assert sorted(s.name for s in study.series) == ["Series 1 [echo 1]", "Series 1 [echo 2]"]
    assert all(s.shape == (64, 64, 3) for s in study.series)


def test_many_time_points_keep_first_volume(tmp_path):
    offsets = [float(z) for z in (0, 4, 8)] * 10
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "dyn", offsets,
                         TemporalPositionIdentifier=[i // 3 + 1 for i in range(30)])
    (series,) = load_study(tmp_path).series
    assert series.shape == (64, 64, 3)
    assert series.meta["volumes_in_series"] == 10 and series.meta["kept_volume"] == "time point 1"


def test_dicomdir_is_ignored(tmp_path):
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "s", [0.0, 4.0])
    shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
    study = load_study(tmp_path)
    assert len(study.series) == 1 and study.skipped == []


def test_repeated_positions_without_distinguishing_tag_keep_first(tmp_path):
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "dup", [0.0, 0.0, 4.0, 8.0])
    (series,) = load_study(tmp_path).series
    assert series.shape == (64, 64, 3)
    assert series.meta["dropped_repeated_frames"] == 1


def test_broken_series_are_skipped_and_good_ones_load(tmp_path, three_plane_study):
    study_folder = tmp_path / "study"
    shutil.copytree(three_plane_study.folder, study_folder)
    mixed_matrix = rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", study_folder / "a", [0.0, 3.0, 6.0],
                                        SeriesDescription="MIXED MATRIX")
    ds = pydicom.dcmread(mixed_matrix[1])
    ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
    ds.Rows, ds.Columns = 32, 32
    ds.save_as(mixed_matrix[1])
    truncated = rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", study_folder / "b", [0.0, 3.0, 6.0],
                                     SeriesDescription="TRUNCATED")
    ds = pydicom.dcmread(truncated[2])
    ds.PixelData = ds.PixelData[:-100]
    ds.save_as(truncated[2])
    study = load_study(study_folder)
    assert sorted(s.plane for s in study.series) == ["axial", "coronal", "sagittal"]
    reasons = {s.name: s.reason for s in study.skipped}
    assert "different matrix sizes" in reasons["MIXED MATRIX"]
    assert "could not be decoded" in reasons["TRUNCATED"]


def test_truncated_file_inside_series_reports_decoding_error(tmp_path):
    paths = rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "s", [0.0, 3.0, 6.0])
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:-100]
    ds.save_as(paths[1])
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(tmp_path)
    assert "could not be decoded" in caught.value.skipped[0].reason


def test_nifti_files_names_and_description(tmp_path):
    paths = [NIBABEL_DATA / "anatomical.nii", NIBABEL_DATA / "reoriented_anat_moved.nii"]
    study = load_study(paths, series_names=["T1", "T1 moved"], study_description="research")
    assert [s.name for s in study.series] == ["T1", "T1 moved"]
    assert study.description == "research"
    assert study.series[0].source_orientation == "LAS"
    assert study.series[0].shape == (33, 41, 25)
    with pytest.raises(ValueError):
        load_study(paths, series_names=["only one"])


def test_folder_of_nifti_names_from_files(tmp_path):
    for name in ("anatomical.nii", "example4d.nii.gz"):
        shutil.copy(NIBABEL_DATA / name, tmp_path / name)
    (tmp_path / "anatomical.json").write_text('{"RepetitionTime": 2.0}')  # BIDS sidecar: ignored
    study = load_study(tmp_path)
    assert [s.name for s in study.series] == ["anatomical"]
    assert [s.name for s in study.skipped] == ["example4d"]
    assert "4D image" in study.skipped[0].reason


def test_missing_source_raises_study_load_error(tmp_path):
    with pytest.raises(StudyLoadError, match="does not exist"):
        load_study(tmp_path / "nope")


def test_round_trip_affine_of_oblique_series(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.uniform(-50, 900, size=(20, 24, 7)).astype(np.float32)
    angle = np.deg2rad(12)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.9, 5.0])
    affine[:3, 3] = [-10, 20, -30]
    write_dicom_series(volume, affine, tmp_path / "obl", series_description="AX OBLIQUE", uid_seed=3)
    (series,) = load_study(tmp_path).series
    assert series.plane == "axial"
    expected, expected_affine = volume[::-1, ::-1, :], affine @ np.array(
        [[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(series.affine, expected_affine, atol=1e-4)
    slope = (volume.max() - volume.min()) / 65535
    np.testing.assert_allclose(series.array, expected, atol=slope / 2 + 1e-3)


def test_two_hundred_file_series_loads_fast(tmp_path):
    volume = np.random.default_rng(1).integers(0, 1000, size=(256, 256, 200)).astype(np.float32)
    write_dicom_series(volume, np.diag([1.0, 1.0, 1.0, 1.0]), tmp_path / "big", series_description="AX 3D",
                       uid_seed=0, through_axis=2)
    start = time.perf_counter()
    (series,) = load_study(tmp_path).series
    elapsed = time.perf_counter() - start
    assert series.shape == (256, 256, 200)
    assert elapsed < 5.0, f"200-file series took {elapsed:.2f} s"
