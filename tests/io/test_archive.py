"""Safe extraction of well-formed archives (hostile archives: test_hostile.py)."""

from __future__ import annotations

import zipfile

import numpy as np

import pytest

from helpers.studies import NIBABEL_DATA, PYDICOM_FILES
from prima.errors import StudyLoadError
from prima.io import ArchiveLimits, extracted_zip, load_study, write_dicom_series


def test_extracted_folder_exists_inside_and_is_removed_after(guarded_tmp, tmp_path):
    archive = tmp_path / "inputs" / "study.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/b/c/file1", b"one")
        zf.writestr("a/", b"")
        zf.writestr("./a/file2", b"two")
    with extracted_zip(archive, ArchiveLimits(max_total_bytes=6, max_files=3)) as folder:
        assert folder.parent == guarded_tmp[0]
        assert (folder / "a/b/c/file1").read_bytes() == b"one"
        assert (folder / "a/file2").read_bytes() == b"two"
    assert not folder.exists()


def test_zip_with_nifti_and_macos_junk_loads(guarded_tmp, tmp_path):
    archive = tmp_path / "inputs" / "nifti.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(NIBABEL_DATA / "anatomical.nii", "export/T1.nii")
        zf.writestr("__MACOSX/export/._T1.nii", b"\x00\x05\x16\x07")
        zf.writestr("export/.DS_Store", b"junk")
    study = load_study(archive)
    assert [s.name for s in study.series] == ["T1"] and study.skipped == []
    assert study.series[0].source == "nifti.zip!/export/T1.nii"


def test_not_a_zip(tmp_path):
    fake = tmp_path / "study.zip"
    fake.write_bytes((PYDICOM_FILES / "MR_small.dcm").read_bytes()[:50])
    with pytest.raises(StudyLoadError, match="not a readable zip"):
        load_study(fake)


def test_a_full_disk_during_extraction_is_a_plain_error(guarded_tmp, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: Python ignores SIGXFSZ, so a write past it fails with EFBIG."""
    import resource

    folder = tmp_path / "inputs" / "study"
    write_dicom_series(np.random.default_rng(0).random((64, 64, 8)).astype(np.float32) * 1000,
                       np.diag([-1.0, -1.0, 4.0, 1.0]), folder, series_description="AX")
    archive = tmp_path / "inputs" / "study.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(StudyLoadError, match="no room to extract"):
            load_study(archive)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
