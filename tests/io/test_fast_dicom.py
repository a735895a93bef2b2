"""The fast DICOM path of ``load_study`` gives what the pydicom path gives.

Three accelerators (docs/io.md, "Loading speed"): the lean header reader (``prima.io.dicom_scan``), the
native pixel reader (plain little-endian pixel data read straight into the volume) and the tiled
reordering copy (``orientation.contiguous``); series are also decoded in threads. Each is checked
against the pydicom / numpy result it replaces: on pydicom's and nibabel's sample files, on series
written here, and on the fuzzer's mutated files, where the lean reader must either decline (pydicom
then reads the file, as before) or agree with pydicom on every value it collects.
"""

from __future__ import annotations

import gzip
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings

from helpers import fuzz
from helpers.enhanced import write_enhanced_mr
from helpers.studies import NICOM_DATA, PYDICOM_FILES, rewrite_at_positions
from prima.io import dicom, load_study, read_dicom, study, write_dicom_series
from prima.io.dicom_scan import FlatHeader, FlatItem, FlatSequence, NotCollected, scan
from prima.io.orientation import contiguous, reorient

fuzz.keep_hypothesis_out_of_the_repo()


def _same(a: object, b: object) -> bool:
    """Equal values, a list equal to pydicom's MultiValue, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) or isinstance(b, pydicom.multival.MultiValue):
        return isinstance(a, list) and isinstance(b, pydicom.multival.MultiValue) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    return type(a) is not list and a == b and (a is None) == (b is None)


def _assert_items_agree(flat: FlatItem, full: pydicom.Dataset, where: str) -> None:
    """Every keyword collected at ``flat``'s level: present in both or neither, with the same value; kept
    sequences item by item."""
    for keyword in flat.keywords:
        assert (keyword in flat) == (keyword in full), (where, keyword)
        lean, reference = dicom.get_value(flat, keyword), dicom.get_value(full, keyword)
        if isinstance(lean, FlatSequence):
            assert isinstance(reference, pydicom.Sequence) and len(lean) == len(reference), (where, keyword)
            for index, (item, full_item) in enumerate(zip(lean, reference)):
                _assert_items_agree(item, full_item, f"{where} {keyword}[{index}]")
        else:
            assert _same(lean, reference), (where, keyword, lean, reference)


def _check_agrees_with_pydicom(path: Path) -> bool:
    """If the lean reader takes ``path``, pydicom reads it too and agrees on everything collected, the
    functional groups included. Returns whether the lean reader took it."""
    scanned = scan(path)
    if scanned is None:
        return False
    flat, offset = scanned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dicom._read_with_pydicom(path)
        assert reference is not None, f"{path.name}: lean reader took a file pydicom refuses"
        header = reference.header
        _assert_items_agree(flat, header, path.name)
        if "Rows" in flat and "Columns" in flat:  # what the loader derives: the frames of a lean file
            lean_file = dicom.DicomFile(path, None, offset, flat)
            try:
                expected = [vars(frame) for frame in dicom._frames_of(reference)]
            except dicom.SeriesLoadError as error:
                with pytest.raises(dicom.SeriesLoadError, match=re.escape(error.reason)):
                    dicom._frames_of(lean_file)
            else:
                found = [vars(frame) for frame in dicom._frames_of(lean_file)]
                assert len(found) == len(expected)
                for mine, theirs in zip(found, expected):
                    assert {k: v for k, v in mine.items() if k != "file"}.keys() == theirs.keys() - {"file"}
                    for key in theirs.keys() - {"file"}:
                        assert repr(mine[key]) == repr(theirs[key]), (path.name, key)
    assert offset == reference.pixel_offset, path.name
    assert flat.transfer_syntax == header.file_meta.TransferSyntaxUID
    assert (flat.implicit, True) == header.original_encoding
    return True


def _sample_files() -> list[Path]:
    return [p for p in sorted(PYDICOM_FILES.rglob("*")) if p.is_file() and p.suffix not in (".gz", ".bz2", ".zip")]


def test_lean_reader_agrees_with_pydicom_on_sample_files(tmp_path):
    files = _sample_files()
    for name in ("0.dcm", "1.dcm", "csa_slice_norm.dcm", "decimal_rescale.dcm", "slicethickness_empty_string.dcm"):
        files.append(NICOM_DATA / name)
    files += write_dicom_series(np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3), np.diag([0.9, 1.1, 3.0, 1]),
                                tmp_path / "written", series_description="W")
    taken = [path.name for path in files if _check_agrees_with_pydicom(path)]
    # The plain files are taken (explicit and implicit VR, uncompressed and compressed pixel data)...
    assert {"MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm", "MR_small_RLE.dcm", "IM0000.dcm",
            "0.dcm"} <= set(taken)
    # ...the others are left to pydicom: big endian, deflated, no preamble, no transfer syntax.
    for declined in ("MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm", "no_meta.dcm",
                     "ExplVR_LitEndNoMeta.dcm", "meta_missing_tsyntax.dcm"):
        assert scan(PYDICOM_FILES / declined) is None, declined
    assert len(taken) >= 40


@settings(derandomize=True, database=None, deadline=None, max_examples=200,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(fuzz.cases(fuzz.DICOM_SEEDS, ("tags", "bytes")))
def test_lean_reader_declines_or_agrees_on_mutated_files(tmp_path_factory, case: fuzz.Case) -> None:
    folder = fuzz.write_files(case.files(), tmp_path_factory.mktemp("case") / "files")
    for path in sorted(folder.iterdir()):
        _check_agrees_with_pydicom(path)


def test_lean_header_refuses_keywords_it_does_not_collect():
    file = dicom.read_file(PYDICOM_FILES / "MR_small.dcm")
    assert isinstance(file.fields, FlatHeader)
    with pytest.raises(NotCollected):
        dicom.get_value(file.fields, "SeriesDescription")
    with pytest.raises(NotCollected):
        _ = "ImageType" in file.fields
    assert file.header.StudyInstanceUID == pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").StudyInstanceUID


def test_enhanced_objects_are_read_lean_and_non_image_files_by_pydicom(tmp_path):
    write_enhanced_mr(np.zeros((3, 4, 5), np.uint16), (2.0, 1.0, 1.0), np.zeros(3), tmp_path / "enhanced.dcm")
    philips = tmp_path / "philips_mprage.dcm"
    philips.write_bytes(gzip.open(NICOM_DATA / "philips_mprage.dcm.gz").read())
    for path in (tmp_path / "enhanced.dcm", philips):
        file = dicom.read_file(path)
        assert isinstance(file.fields, FlatHeader)
        assert _check_agrees_with_pydicom(path)
        # The series-level header stops before the per-frame groups, and holds the rest.
        assert "PerFrameFunctionalGroupsSequence" not in file.series_header
        full = pydicom.dcmread(path, stop_before_pixels=True)
        assert all(element.tag in file.series_header for element in full if element.tag < 0x52009230)
    plan = dicom.read_file(PYDICOM_FILES / "rtplan.dcm")
    assert plan.flat is None and not dicom.is_image(plan.fields)


def test_series_header_is_the_full_header_when_elements_follow_the_per_frame_groups(tmp_path):
    path = tmp_path / "enhanced.dcm"
    write_enhanced_mr(np.zeros((3, 4, 5), np.uint16), (2.0, 1.0, 1.0), np.zeros(3), path)
    ds = pydicom.dcmread(path)
    ds.add_new(0x60000010, "US", 4)  # an overlay element: after (5200,9230) in tag order
    ds.save_as(path)
    file = dicom.read_file(path)
    assert isinstance(file.fields, FlatHeader) and not file.fields.groups_last
    assert "PerFrameFunctionalGroupsSequence" in file.series_header and 0x60000010 in file.series_header


def test_geometry_is_checked_before_any_pixel_is_read(tmp_path, monkeypatch):
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "gap", [0.0, 1.5, 3.0, 6.0])
    monkeypatch.setattr(dicom, "_read_native", lambda *args: pytest.fail("pixels read for a rejected series"))
    monkeypatch.setattr(dicom, "_decode", lambda *args: pytest.fail("pixels decoded for a rejected series"))
    with pytest.raises(dicom.SeriesLoadError, match="uneven slice gaps"):
        read_dicom(tmp_path / "gap")


def test_a_file_pydicom_refuses_is_not_dicom_even_when_the_lean_reader_takes_it(tmp_path, monkeypatch):
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", tmp_path / "s", [0.0, 1.0, 2.0])
    first = sorted((tmp_path / "s").iterdir())[0]
    real = dicom._header_until

    def refuse_first(path, tags):  # pydicom's series-level read of the first file fails
        if path == first:
            raise ValueError("refused")
        return real(path, tags)

    monkeypatch.setattr(dicom, "_header_until", refuse_first)
    groups, not_dicom = dicom.group_series(sorted((tmp_path / "s").iterdir()))
    assert not_dicom == [first]
    assert [len(files) for files in groups.values()] == [2]


def _pydicom_pixels(path: Path) -> np.ndarray:
    pixels = pydicom.dcmread(path).pixel_array
    return pixels[None] if pixels.ndim == 2 else pixels


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on its deliberately odd samples
def test_native_pixel_reader_gives_pydicoms_pixel_array():
    taken = 0
    for path in _sample_files():
        file = dicom.read_file(path)
        if file is None:
            continue
        pixels = dicom._native_pixels(file)
        if pixels is None:
            continue
        taken += 1
        reference = _pydicom_pixels(path)
        assert pixels.dtype == reference.dtype and np.array_equal(pixels, reference), path.name
    assert taken >= 30


@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_are_corrected_as_pydicom_does(tmp_path, signed):
    """12 bits stored in 16 with junk in the 4 high bits: masked (unsigned) or sign-extended (signed)."""
    folder = tmp_path / "bits"
    rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", folder, [0.0, 1.0, 2.0], PixelRepresentation=signed)
    rng = np.random.default_rng(signed)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        stored = rng.integers(0, 1 << 16, size=(ds.Rows, ds.Columns)).astype(np.uint16)
        ds.BitsStored, ds.HighBit, ds.PixelData = 12, 11, stored.tobytes()
        ds.save_as(path)
        assert np.array_equal(dicom._native_pixels(dicom.read_file(path)), _pydicom_pixels(path))
    array, _ = read_dicom(folder)  # slices in position order: the offsets' order
    def along_normal(path: Path) -> float:
        ds = pydicom.dcmread(path)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        return float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(orientation[:3], orientation[3:]))

    by_position = sorted(folder.iterdir(), key=along_normal)
    for k, path in enumerate(by_position):
        assert np.array_equal(array[:, :, k], _pydicom_pixels(path)[0].T.astype(np.float32))
    assert (array < 0).any() == bool(signed)


def test_per_slice_rescale_is_applied_slice_by_slice(tmp_path):
    folder = tmp_path / "slopes"
    slopes, intercepts = ["1.5", "2", "0.5", "3"], ["0", "-10", "5", "0.25"]
    files = rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", folder, [0.0, 1.5, 3.0, 4.5], RescaleSlope=slopes,
                                 RescaleIntercept=intercepts)
    series = load_study(folder).series[0]
    raw, raw_affine = read_dicom(folder)
    stored = pydicom.dcmread(files[0]).pixel_array.astype(np.float32)
    expected = [stored * np.float32(float(s)) + np.float32(float(i)) for s, i in zip(slopes, intercepts)]
    found = [raw[:, :, k].T for k in range(4)]  # read_dicom: (columns, rows, slices sorted by position)
    assert all(np.array_equal(f, e) for f, e in zip(found, expected))
    assert np.array_equal(series.array, reorient(raw, raw_affine)[0])  # read in L,P,S order directly: the same


@pytest.mark.parametrize("view", ["axial", "sagittal", "coronal", "flipped", "tiny"])
@pytest.mark.parametrize("dtype", [None, np.float32])
def test_tiled_copy_equals_numpys(view, dtype):
    stack = np.random.default_rng(0).integers(0, 4000, size=(40, 72, 56)).astype(np.uint16)
    views = {"axial": stack.transpose(2, 1, 0), "sagittal": stack.transpose(0, 2, 1)[:, :, ::-1],
             "coronal": stack.transpose(2, 0, 1)[:, ::-1, ::-1], "flipped": stack[::-1],
             "tiny": stack[:4, :5, :6].transpose(2, 1, 0)}
    out = contiguous(views[view], dtype)
    expected = np.ascontiguousarray(views[view], dtype=dtype)
    assert out.flags.c_contiguous and out.dtype == expected.dtype and np.array_equal(out, expected)


def _series_tuple(series):
    return (series.name, series.array.tobytes(), series.affine.tobytes(), series.plane, series.source_orientation,
            series.meta)


def test_threads_do_not_change_the_result(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    for index, axis in enumerate((2, 0, 1)):
        shape = [16, 12, 8]
        write_dicom_series(rng.normal(100, 20, size=shape).astype(np.float32), np.diag([1.0, 1.2, 2.5, 1.0]),
                           tmp_path / f"s{index}", series_description=f"S{index}", series_number=index + 1,
                           study_uid="1.2.3.4", through_axis=axis, uid_seed=index)
    shutil.copytree(tmp_path / "s0", tmp_path / "copy" / "s0")
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(study, "LOAD_THREADS", threads)
        loaded = load_study(tmp_path)
        results[threads] = ([_series_tuple(s) for s in loaded.series], [(s.name, s.reason) for s in loaded.skipped])
    assert results[1] == results[3]
    assert [name for name, *_ in results[1][0]] == ["S0", "S1", "S2"]


def test_output_array_is_zeroed_writable_float32_in_ordinary_pages():
    from prima.io.dicom import output_array

    array = output_array((3, 4, 5))
    assert array.shape == (3, 4, 5) and array.dtype == np.float32 and array.flags.c_contiguous
    assert array.flags.writeable and not array.any()
    array[1, 2, 3] = 7.0
    assert array.sum() == 7.0
    assert output_array((0, 4, 5)).shape == (0, 4, 5)
