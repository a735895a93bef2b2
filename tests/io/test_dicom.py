"""DICOM reading on real sample files shipped in pydicom and nibabel, and on enhanced multi-frame MR."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from helpers.enhanced import write_enhanced_mr
from helpers.studies import NICOM_DATA, PYDICOM_FILES
from prima.errors import CodecUnavailableError, NoUsableSeriesError, SeriesLoadError
from prima.io import load_study, read_dicom

LOSSLESS_MR_SMALL = ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
                     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]


def _gunzip(name: str, folder: Path) -> Path:
    out = folder / name.removesuffix(".gz")
    out.write_bytes(gzip.open(NICOM_DATA / name).read())
    return out


def test_mr_small_uncompressed_geometry():
    array, affine = read_dicom(PYDICOM_FILES / "MR_small.dcm")
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    assert array.shape == (64, 64, 1)
    np.testing.assert_array_equal(array[:, :, 0], ds.pixel_array.T.astype(np.float32))
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.3125, 0.3125, 0.8])
    np.testing.assert_allclose(affine[:3, 3], [-1, -1, 1] * np.array(ds.ImagePositionPatient, dtype=float))


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")  # MR_small_padded
@pytest.mark.parametrize("name", LOSSLESS_MR_SMALL)
def test_every_lossless_transfer_syntax_decodes_identically(name):
    reference, reference_affine = read_dicom(PYDICOM_FILES / "MR_small.dcm")
    array, affine = read_dicom(PYDICOM_FILES / name)
    np.testing.assert_array_equal(array, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_single_slice_is_skipped_at_study_level():
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(PYDICOM_FILES / "MR_small_jp2klossless.dcm")
    assert "single slice" in caught.value.skipped[0].reason


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_files_without_geometry_are_rejected_then_decode_with_geometry(tmp_path, name):
    with pytest.raises(SeriesLoadError, match="no patient geometry"):
        read_dicom(PYDICOM_FILES / name)
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [2, 2]
    ds.save_as(tmp_path / name)
    array, _ = read_dicom(tmp_path / name)
    expected = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(array[:, :, 0], expected.T)


def test_unavailable_codec_names_the_codec(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists for pydicom
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(CodecUnavailableError, match="MPEG2"):
        read_dicom(tmp_path / "mpeg.dcm")


def test_truncated_pixel_data():
    with pytest.raises(SeriesLoadError, match="could not be decoded"):
        read_dicom(PYDICOM_FILES / "MR_truncated.dcm")


@pytest.mark.parametrize("name,kind", [("rtplan.dcm", "RT Plan"), ("test-SR.dcm", "SR")])
def test_non_image_objects(name, kind):
    with pytest.raises(SeriesLoadError, match="without image"):
        read_dicom(PYDICOM_FILES / name)
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(PYDICOM_FILES / name)
    assert "non-image object" in caught.value.skipped[0].reason and kind in caught.value.skipped[0].reason


def test_philips_enhanced_multiframe_mprage(tmp_path):
    path = _gunzip("philips_mprage.dcm.gz", tmp_path)
    (series,) = load_study(path).series
    assert series.name == "MPRAGE_S2"
    assert json.loads(json.dumps(series.meta))["manufacturer"] == "Philips Medical Systems"
    assert series.plane == "sagittal" and series.through_axis == 0
    assert series.shape == (176, 256, 256)
    np.testing.assert_allclose(series.spacing, (1.0, 1.0, 1.0), atol=1e-3)
    ds = pydicom.dcmread(path)
    slope = float(ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope)
    assert series.array.max() == pytest.approx(ds.pixel_array.max() * slope, rel=1e-5)


def test_siemens_dwi_mosaics_unpack_and_keep_first_volume(tmp_path):
    _gunzip("siemens_dwi_0.dcm.gz", tmp_path)
    _gunzip("siemens_dwi_1000.dcm.gz", tmp_path)
    (series,) = load_study(tmp_path).series
    assert series.plane == "axial" and series.shape == (128, 128, 48)
    np.testing.assert_allclose(series.spacing, (1.797, 1.797, 3.0), atol=2e-3)
    assert series.meta["volumes_in_series"] == 2
    json.dumps(series.meta)
    b0, _ = read_dicom(tmp_path / "siemens_dwi_0.dcm")
    assert b0.shape == (128, 128, 48)


@pytest.mark.parametrize("name", ["0.dcm", "1.dcm", "csa_slice_norm.dcm"])
def test_mosaics_without_full_pixel_data_are_reported(name):
    with pytest.raises(SeriesLoadError, match="mosaic could not be unpacked"):
        read_dicom(NICOM_DATA / name)


def test_decimal_rescale_is_applied():
    ds = pydicom.dcmread(NICOM_DATA / "decimal_rescale.dcm")
    array, _ = read_dicom(NICOM_DATA / "decimal_rescale.dcm")
    expected = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    np.testing.assert_allclose(array[:, :, 0], expected.T, rtol=1e-6)
    assert float(ds.RescaleIntercept) != 0 or float(ds.RescaleSlope) != 1


def test_empty_slice_thickness_falls_back_to_one_mm():
    array, affine = read_dicom(NICOM_DATA / "slicethickness_empty_string.dcm")
    assert array.shape == (384, 384, 1)
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(1.0)


def test_enhanced_multiframe_built_with_pydicom(tmp_path):
    stored = np.random.default_rng(2).integers(0, 4000, size=(9, 20, 16)).astype(np.uint16)  # (frames, rows, cols)
    origin = np.array([-30.0, -40.0, -20.0])
    write_enhanced_mr(stored, (3.0, 0.7, 0.8), origin, tmp_path / "enhanced")
    study = load_study(tmp_path)
    (series,) = study.series
    assert study.description == "ENHANCED TEST"
    assert series.plane == "axial" and series.shape == (16, 20, 9)
    np.testing.assert_allclose(series.spacing, (0.8, 0.7, 3.0), atol=1e-6)
    expected_lps_order = stored.transpose(2, 1, 0).astype(np.float32) * 0.5 - 10  # (cols, rows, frames) = L,P,S
    np.testing.assert_array_equal(series.array, expected_lps_order)
    np.testing.assert_allclose(series.affine[:3, 3], origin * [-1, -1, 1])


def test_read_dicom_folder_with_two_series_refuses(tmp_path):
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", tmp_path / "a")
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "b")
    with pytest.raises(SeriesLoadError, match="2 series"):
        read_dicom(tmp_path)
