"""Hostile inputs: each raises its error type and nothing is written outside the temp area.

``guarded_tmp`` (tests/conftest.py) redirects temporary folders to a private area, plants a canary
outside it, and after the test checks the area is empty again, the canary untouched and no new file
appeared anywhere else but the test's own ``inputs`` folder.
"""

from __future__ import annotations

import io
import shutil
import stat
import zipfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.studies import NIBABEL_DATA, PYDICOM_FILES  # noqa: E402
from prima.errors import NoUsableSeriesError, SeriesLoadError, StudyLoadError, UnsafeArchiveError  # noqa: E402
from prima.io import ArchiveLimits, load_study, read_dicom, read_nifti  # noqa: E402


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def _zip(path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def test_zip_slip_is_refused(guarded_tmp, inputs, tmp_path):
    dicom = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    for entry in ("../../outside/evil.dcm", "/tmp/evil_absolute.dcm", "study/../../evil.dcm", "C:/evil.dcm",
                  "..\\..\\evil_backslash.dcm"):
        archive = _zip(inputs / "slip.zip", {"study/ok.dcm": dicom, entry: dicom})
        with pytest.raises(UnsafeArchiveError, match="zip slip"):
            load_study(archive)
    assert not (tmp_path / "outside" / "evil.dcm").exists()
    assert not list(tmp_path.rglob("evil*"))


def test_symlink_entry_is_refused(guarded_tmp, inputs, tmp_path):
    archive = _zip(inputs / "link.zip", {"study/a.dcm": (PYDICOM_FILES / "MR_small.dcm").read_bytes()},
                   symlinks={"study/link": str(guarded_tmp[1])})
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        load_study(archive)


def test_zip_bomb_is_refused_from_central_directory(guarded_tmp, inputs):
    archive = _zip(inputs / "bomb.zip", {"big.bin": b"\0" * (8 * 1024 * 1024)})
    assert archive.stat().st_size < 100_000  # highly compressible
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        load_study(archive, archive_limits=ArchiveLimits(max_total_bytes=1024 * 1024))


def test_zip_bomb_with_lying_header_expands_no_further_than_declared(guarded_tmp, inputs):
    archive = _zip(inputs / "liar.zip", {"big.bin": b"\0" * (4 * 1024 * 1024)})
    # Rewrite the declared uncompressed size (central directory and local header) to 1 KiB.
    data = bytearray(archive.read_bytes())
    real = (4 * 1024 * 1024).to_bytes(4, "little")
    assert data.count(real) == 2
    archive.write_bytes(bytes(data).replace(real, (1024).to_bytes(4, "little")))
    # zipfile stops each entry at its declared size, so nothing past the lie is ever written; the CRC of
    # the truncated data then fails, which the extractor reports as a corrupt archive.
    with pytest.raises(StudyLoadError) as caught:
        load_study(archive, archive_limits=ArchiveLimits(max_total_bytes=1024 * 1024))
    assert type(caught.value) is StudyLoadError
    assert str(caught.value) == "liar.zip: corrupt zip archive (Bad CRC-32 for file 'big.bin')"
    assert isinstance(caught.value.__cause__, zipfile.BadZipFile)


def test_too_many_files_is_refused(guarded_tmp, inputs):
    archive = _zip(inputs / "many.zip", {f"f{i}": b"x" for i in range(30)})
    with pytest.raises(UnsafeArchiveError, match="entries"):
        load_study(archive, archive_limits=ArchiveLimits(max_files=20))


def test_empty_zip(guarded_tmp, inputs):
    archive = _zip(inputs / "empty.zip", {})
    with pytest.raises(StudyLoadError, match="empty"):
        load_study(archive)


def test_temp_folder_removed_after_error_inside_extracted_study(guarded_tmp, inputs):
    archive = _zip(inputs / "junk.zip", {"a/readme.txt": b"not an image", "a/b/notes": b"\x00\x01"})
    with pytest.raises(NoUsableSeriesError, match="could not be read as DICOM"):
        load_study(archive)


def test_truncated_dicom(guarded_tmp, inputs):
    with pytest.raises(SeriesLoadError, match="could not be decoded"):
        read_dicom(PYDICOM_FILES / "MR_truncated.dcm")
    truncated_header = inputs / "cut.dcm"
    truncated_header.write_bytes((PYDICOM_FILES / "MR_small.dcm").read_bytes()[:300])
    with pytest.raises(StudyLoadError):
        load_study(truncated_header)


def test_png_renamed_dcm(guarded_tmp, inputs):
    buffer = io.BytesIO()
    plt.imsave(buffer, np.random.default_rng(0).random((32, 32)), format="png")
    fake = inputs / "scan.dcm"
    fake.write_bytes(buffer.getvalue())
    with pytest.raises(SeriesLoadError, match="not DICOM"):
        read_dicom(fake)
    with pytest.raises(NoUsableSeriesError, match="scan.dcm"):
        load_study(inputs)


def test_4d_nifti(guarded_tmp):
    with pytest.raises(SeriesLoadError, match="4D image"):
        read_nifti(NIBABEL_DATA / "example4d.nii.gz")
    with pytest.raises(NoUsableSeriesError, match="4D image"):
        load_study(NIBABEL_DATA / "functional.nii")


def test_2d_images(guarded_tmp, inputs):
    nib.save(nib.Nifti1Image(np.ones((20, 30), dtype=np.float32), np.eye(4)), inputs / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 30, 1), dtype=np.float32), np.eye(4)), inputs / "one_slice.nii")
    with pytest.raises(SeriesLoadError, match="2D image"):
        read_nifti(inputs / "flat.nii.gz")
    with pytest.raises(NoUsableSeriesError) as caught:
        load_study(inputs)
    assert [s.name for s in caught.value.skipped] == ["flat", "one_slice"]
    assert all("2D image" in s.reason for s in caught.value.skipped)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", inputs / "ct")  # a 2D DICOM image
    with pytest.raises(NoUsableSeriesError, match="single slice"):
        load_study(inputs / "ct")


def test_nan_inf_voxels_are_sanitised_and_all_nan_is_refused(guarded_tmp, inputs, caplog):
    data = np.random.default_rng(0).uniform(10, 20, size=(8, 9, 10)).astype(np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), inputs / "holes.nii")
    with caplog.at_level("WARNING", logger="prima.io"):
        (series,) = load_study(inputs / "holes.nii").series
    assert any(r.name == "prima.io" and "3 NaN/Inf voxels" in r.getMessage() for r in caplog.records)
    assert np.isfinite(series.array).all()
    assert series.meta["nonfinite_voxels"] == 3
    finite = data[np.isfinite(data)]
    values = set(series.array.ravel().tolist())
    assert 0.0 in values and float(finite.max()) in values and float(finite.min()) in values
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, dtype=np.float32), np.eye(4)), inputs / "void.nii")
    with pytest.raises(NoUsableSeriesError, match="no finite voxel"):
        load_study(inputs / "void.nii")


def test_empty_folder(guarded_tmp, inputs):
    with pytest.raises(NoUsableSeriesError, match="no files found"):
        load_study(inputs)


def test_duplicate_and_conflicting_entries(guarded_tmp, inputs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        archive = _zip(inputs / "dup.zip", {"a/x": b"first"})
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr("a/x", b"second")
    with pytest.raises(StudyLoadError, match="cannot be extracted"):
        load_study(archive)
    archive = _zip(inputs / "clash.zip", {"a/x": b"file", "a/x/y": b"under a file"})
    with pytest.raises(StudyLoadError, match="cannot be extracted"):
        load_study(archive)
