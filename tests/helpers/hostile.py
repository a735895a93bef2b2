"""A corpus of hostile and malformed studies, generated on the fly (nothing is shipped).

Each case is what a user could upload (a zip, DICOM files, NIfTI files) and what a careful loader must
do with it: refuse it with a plain error, or load what is usable and name what it skipped. The same
corpus goes through ``prima.io``, the CLI and the app (tests/test_hostile_corpus.py,
tests/app/test_hostile_uploads.py).
"""

from __future__ import annotations

import gzip
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers.studies import PYDICOM_FILES
from prima.io import write_dicom_series

REFUSED, PARTIAL, LOADED = "refused", "partial", "loaded"
GOOD_SERIES = "AX GOOD"


@dataclass
class HostileCase:
    name: str
    sources: list[Path]  # what is uploaded / passed to load_study (one zip, or several files)
    outcome: str  # REFUSED: a StudyLoadError; PARTIAL: loads GOOD_SERIES and skips the rest; LOADED: loads
    match: str  # REFUSED: a fragment of the error; PARTIAL: of a skipped reason; LOADED: of a series name
    uploadable: bool = True  # False for what a browser upload cannot carry (a folder with links)
    notes: str = ""  # why the outcome is the right one, where it is not obvious


def _volume(shape=(32, 32, 8), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.float32)


AXIAL = np.diag([-2.0, -2.0, 4.0, 1.0])


def good_series(folder: Path, description: str = GOOD_SERIES, seed: int = 0, **kwargs) -> list[Path]:
    """A small valid axial DICOM series (32 x 32 x 8, 2 x 2 x 4 mm)."""
    return write_dicom_series(_volume(seed=seed), AXIAL, folder, series_description=description,
                              study_description="HOSTILE", uid_seed=f"{description}-{seed}", **kwargs)


def _zip(path: Path, entries: dict[str, bytes], **infos: Callable[[zipfile.ZipInfo], None]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in infos:
                infos[name](info)
            archive.writestr(info, data)
    return path


def _mark_encrypted(path: Path, name: str) -> Path:
    """Set the "encrypted" flag of one entry in its local and central headers (zipfile cannot write it)."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    # (signature, offset of the flags, of the name length, of the name) in a local / central header
    for signature, flag_at, length_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            length = int.from_bytes(data[start + length_at:start + length_at + 2], "little")
            if data[start + name_at:start + name_at + length] == encoded:
                data[start + flag_at] |= 0x1
            start += 4
    path.write_bytes(bytes(data))
    return path


def _folder_entries(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AXIAL, image=nib.Nifti1Image) -> Path:
    nib.save(image(array, affine), path)
    return path


def _nifti_with_header(path: Path, shape: tuple[int, ...], data: bytes = b"\0" * 64) -> Path:
    """A NIfTI-1 file whose header declares ``shape`` (int16) but holds only ``data``: a lie."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_sform(AXIAL, code=1)
    header.set_qform(AXIAL, code=1)
    raw = header.binaryblock + b"\0" * 4  # vox_offset 352
    path.write_bytes(raw + data)
    return path


def _edited_series(folder: Path, edit: Callable[[Dataset, int], None], description: str) -> list[Path]:
    paths = good_series(folder, description=description, seed=3)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, index)
        ds.save_as(path, enforce_file_format=False)
    return paths


def _presentation_state(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["pr"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "PR"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["pr-series"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["pr-study"])
    ds.SeriesDescription = "PRESENTATION"
    ds.save_as(path, enforce_file_format=True)
    return path


def build_corpus(root: Path) -> list[HostileCase]:
    """Write every case under ``root`` and return them."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[HostileCase] = []
    good = root / "good"
    good_files = good_series(good)
    good_entries = _folder_entries(good, "study/good/")

    def case(name: str, sources, outcome: str, match: str, **kwargs) -> None:
        cases.append(HostileCase(name, [Path(s) for s in (sources if isinstance(sources, list) else [sources])],
                                 outcome, match, **kwargs))

    # --- archives -------------------------------------------------------------------------------------------
    case("zip slip", _zip(root / "slip.zip", {**good_entries, "../../evil.dcm": good_files[0].read_bytes()}),
         REFUSED, "zip slip")
    case("absolute entry path", _zip(root / "absolute.zip", {**good_entries, "/tmp/evil.dcm": b"x"}), REFUSED,
         "absolute path")
    bomb = _zip(root / "bomb_declared.zip", {"big.bin": b"\0" * (1 << 20)})
    data = bytearray(bomb.read_bytes())
    real = (1 << 20).to_bytes(4, "little")
    bomb.write_bytes(bytes(data).replace(real, (3 << 30).to_bytes(4, "little")))  # declares 3 GiB
    case("zip bomb (absolute size)", bomb, REFUSED, "zip bomb")
    case("zip bomb (ratio)", _zip(root / "bomb_ratio.zip", {**good_entries, "study/zeros.bin": b"\0" * (16 << 20)}),
         REFUSED, "compression ratio")
    inner = _zip(root / "inner.zip", good_entries)
    case("nested zip", _zip(root / "nested.zip", {"study/inner.zip": inner.read_bytes()}), REFUSED, "inner.zip",
         notes="a zip inside the zip is not opened: it is listed as a file that is not DICOM")

    def symlink(info: zipfile.ZipInfo) -> None:
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16

    case("symlink entry", _zip(root / "symlink.zip", {**good_entries, "study/link": b"/etc/passwd"},
                               **{"study/link": symlink}), REFUSED, "symbolic link")

    case("encrypted entry", _mark_encrypted(_zip(root / "encrypted.zip", {**good_entries, "study/secret.dcm": b"x"}),
                                            "study/secret.dcm"), REFUSED, "encrypted")
    case("thousands of tiny files", _zip(root / "tiny.zip", {f"study/f{i:05d}": b"\x01" for i in range(3000)}),
         REFUSED, "could not be read as DICOM")
    case("empty zip", _zip(root / "empty.zip", {}), REFUSED, "empty")
    junk_zip = root / "junk.zip"
    junk_zip.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    case("corrupt zip", junk_zip, REFUSED, "zip")
    links = root / "links"
    good_series(links / "series")
    (links / "series" / "hardlink.dcm").hardlink_to(next((links / "series").glob("*.dcm")))
    (links / "series" / "symlink.dcm").symlink_to("/etc/hostname")
    case("hard and symbolic links in a folder", links, LOADED, GOOD_SERIES, uploadable=False,
         notes="a folder read in place: the hard link is a duplicate slice, the symlink's target is not DICOM")

    # --- DICOM ----------------------------------------------------------------------------------------------
    truncated = root / "truncated"
    good_series(truncated / "good")
    for path in _edited_series(truncated / "cut", lambda ds, i: None, "AX CUT"):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    case("truncated DICOM", _zip(root / "truncated.zip", _folder_entries(truncated)), PARTIAL, "AX CUT")
    zero = root / "zero"
    good_series(zero)
    (zero / "IM9999.dcm").write_bytes(b"")
    case("zero-byte DICOM file", _zip(root / "zero.zip", _folder_entries(zero)), PARTIAL, "not DICOM")

    def short_pixels(ds: Dataset, index: int) -> None:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]

    wrong = root / "wrong_length"
    good_series(wrong / "good")
    _edited_series(wrong / "short", short_pixels, "AX SHORT")
    case("wrong pixel-data length", _zip(root / "wrong_length.zip", _folder_entries(wrong)), PARTIAL, "AX SHORT")
    non_image = root / "non_image"
    non_image.mkdir()
    (non_image / "sr.dcm").write_bytes((PYDICOM_FILES / "reportsi.dcm").read_bytes())
    _presentation_state(non_image / "pr.dcm")
    case("non-image DICOM only (SR, PR)", _zip(root / "non_image.zip", _folder_entries(non_image)), REFUSED,
         "non-image object")

    def mixed(ds: Dataset, index: int) -> None:
        if index % 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    orientation = root / "mixed_orientation"
    good_series(orientation / "good")
    _edited_series(orientation / "mixed", mixed, "AX MIXED")
    case("mixed-orientation series", _zip(root / "mixed.zip", _folder_entries(orientation)), PARTIAL, "AX MIXED")
    case("a 2D image", PYDICOM_FILES / "MR_small.dcm", REFUSED, "single slice")

    def unknown_syntax(ds: Dataset, index: int) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder
        ds.PixelData = encapsulate([b"\0" * 200])
        ds["PixelData"].VR = "OB"

    codec = root / "codec"
    good_series(codec / "good")
    _edited_series(codec / "mpeg", unknown_syntax, "AX MPEG")
    case("unknown compressed transfer syntax", _zip(root / "codec.zip", _folder_entries(codec)), PARTIAL, "AX MPEG")

    def latin1(ds: Dataset, index: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds["SeriesDescription"].value = b"AX T2 \xe9\xe8\xff"

    def bad_bytes(ds: Dataset, index: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, with invalid bytes
        ds["SeriesDescription"].value = b"AX \xc3\x28 BAD"

    names = root / "names"
    _edited_series(names / "latin1", latin1, "AX LATIN1")
    _edited_series(names / "bad", bad_bytes, "AX BADUTF8")
    case("non-UTF-8 series descriptions", _zip(root / "names.zip", _folder_entries(names)), LOADED, "AX T2")

    def zero_spacing(ds: Dataset, index: int) -> None:
        ds.PixelSpacing = [0, 0]

    def negative_spacing(ds: Dataset, index: int) -> None:
        ds.PixelSpacing = [-1.0, 2.0]

    spacing = root / "spacing"
    good_series(spacing / "good")
    _edited_series(spacing / "zero", zero_spacing, "AX ZERO")
    _edited_series(spacing / "negative", negative_spacing, "AX NEGATIVE")
    case("zero and negative DICOM pixel spacing", _zip(root / "spacing.zip", _folder_entries(spacing)), PARTIAL,
         "PixelSpacing")

    def huge(ds: Dataset, index: int) -> None:
        ds.Rows = ds.Columns = 4096
        ds.NumberOfFrames = 4096

    big = root / "big_dicom"
    good_series(big / "good")
    _edited_series(big / "huge", huge, "AX HUGE")
    case("4096^3 declared in DICOM", _zip(root / "big_dicom.zip", _folder_entries(big)), PARTIAL, "AX HUGE")
    executable = root / "program.dcm"
    executable.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(1000))
    case("an executable renamed .dcm", executable, REFUSED, "not DICOM")

    # --- NIfTI ----------------------------------------------------------------------------------------------
    case("2D NIfTI", _save_nifti(root / "flat.nii.gz", _volume((64, 64))), REFUSED, "2D")
    case("4D NIfTI", _save_nifti(root / "fmri.nii.gz", _volume((16, 16, 8, 5))), REFUSED, "4D")
    case("5D NIfTI", _save_nifti(root / "five.nii.gz", _volume((8, 8, 4, 2, 3))), REFUSED, "5D")
    nan = _volume((32, 32, 8))
    nan[0, 0, :] = np.nan
    nan[1, 1, :] = np.inf
    case("NaN and Inf voxels", _save_nifti(root / "AX_NAN.nii.gz", nan), LOADED, "AX_NAN")
    case("all-NaN volume", _save_nifti(root / "all_nan.nii.gz", np.full((16, 16, 8), np.nan, np.float32)), REFUSED,
         "no finite")
    case("1 x 1 x 100000 volume", _save_nifti(root / "line.nii.gz", _volume((1, 1, 100000)), image=nib.Nifti2Image), REFUSED, "must be a 3D volume")
    case("4096^3 declared in NIfTI", _nifti_with_header(root / "huge.nii", (4096, 4096, 4096)), REFUSED, "voxels")
    flat = nib.Nifti1Image(_volume((16, 16, 8)), None)
    flat.header.set_sform(np.diag([0.0, 2.0, 4.0, 1.0]), code=1)  # zero spacing along x
    flat.header["pixdim"][1:4] = [0.0, 2.0, 4.0]
    nib.save(flat, root / "zero_spacing.nii.gz")
    case("zero NIfTI spacing", root / "zero_spacing.nii.gz", REFUSED, "affine")
    negative = np.diag([2.0, -2.0, -4.0, 1.0])
    case("negative NIfTI spacing (a flip, legal)", _save_nifti(root / "AX_FLIPPED.nii.gz", _volume((16, 16, 8)),
                                                              negative), LOADED, "AX_FLIPPED")
    case("absurd voxel size (1 km)", _save_nifti(root / "AX_HUGE_VOXELS.nii.gz", _volume((16, 16, 8)),
                                                 np.diag([1e6, 1e6, 1e6, 1.0])), REFUSED, "field of view")
    gz = root / "not_really.nii.gz"
    gz.write_bytes(gzip.compress(b"not a nifti header" * 10))
    case("gzip that is not NIfTI", gz, REFUSED, "not a readable NIfTI")
    return cases
