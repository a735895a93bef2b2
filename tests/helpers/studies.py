"""Builders for test studies: real sample files shipped in packages, and DICOM studies written by us."""

from __future__ import annotations

import gzip
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel
import numpy as np
import pydicom

from prima.io import write_dicom_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
NICOM_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"

# (name, array slicing step along the through-plane RAS axis, through axis in the template's RAS grid)
THREE_PLANE_SERIES = (("AX T1", 2, "axial"), ("SAG T1", 0, "sagittal"), ("COR T2", 1, "coronal"))
SLICE_STEP = 4  # the template is 1 mm isotropic; series keep every 4th slice -> 1 x 1 x 4 mm


@dataclass
class ThreePlaneStudy:
    folder: Path  # nested folders, shuffled extension-less file names
    zip_path: Path  # the same folder zipped
    template: np.ndarray  # (197, 233, 189) float32, RAS
    template_affine: np.ndarray
    n_files: int


def write_three_plane_study(root: Path, template: np.ndarray, affine: np.ndarray, seed: int = 0) -> ThreePlaneStudy:
    """The same head acquired axially, sagittally and coronally (1 x 1 x 4 mm), plus a 3-plane localizer
    and a non-image object (RT plan), written with shuffled names without extension in nested folders."""
    staging = root / "staging"
    study_uid = pydicom.uid.generate_uid(entropy_srcs=["three-plane", str(seed)])
    for number, (name, axis, _) in enumerate(THREE_PLANE_SERIES, start=2):
        index = [slice(None)] * 3
        index[axis] = slice(None, None, SLICE_STEP)
        scale = np.eye(4)
        scale[axis, axis] = SLICE_STEP
        write_dicom_series(template[tuple(index)], affine @ scale, staging / name.replace(" ", "_"),
                           series_description=name, study_description="MRI BRAIN WO CONTRAST",
                           series_number=number, study_uid=study_uid, through_axis=axis, uid_seed=seed)
    localizer_uid = pydicom.uid.generate_uid(entropy_srcs=["localizer", str(seed)])
    centre = [n // 2 for n in template.shape]
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = slice(centre[axis], centre[axis] + 1)
        shift = np.eye(4)
        shift[axis, 3] = centre[axis]
        write_dicom_series(template[tuple(index)], affine @ shift, staging / "localizer",
                           series_description="3-PLANE LOC", study_description="MRI BRAIN WO CONTRAST",
                           series_number=1, study_uid=study_uid, series_uid=localizer_uid, through_axis=axis,
                           uid_seed=seed, file_name_pattern=f"LOC{axis}_{{index}}.dcm",
                           extra_tags={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", staging / "rtplan.dcm")

    rng = random.Random(seed)
    folder = root / "study"
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    rng.shuffle(files)
    for path in files:
        nested = folder / "DICOM" / f"{rng.randrange(16):02X}" / f"{rng.randrange(4):02X}"
        nested.mkdir(parents=True, exist_ok=True)
        path.rename(nested / f"{rng.getrandbits(48):012x}")
    shutil.rmtree(staging)
    zip_path = zip_folder(folder, root / "study.zip")
    return ThreePlaneStudy(folder, zip_path, template, affine, len(files))


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return zip_path


def rewrite_at_positions(source: Path, out_dir: Path, offsets_mm: list[float], **tags: object) -> list[Path]:
    """Copies of one real single-slice DICOM file at ``offsets_mm`` along its slice normal (one series).

    Files are written in a shuffled order of names so that nothing but positions can order them;
    ``tags`` are set on every copy (a list value gives one value per copy).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(source)
    orientation = np.array([float(v) for v in original.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([float(v) for v in original.ImagePositionPatient])
    series_uid = pydicom.uid.generate_uid(entropy_srcs=[str(source), str(out_dir)])
    names = [f"{i:03d}" for i in range(len(offsets_mm))]
    random.Random(1).shuffle(names)
    written = []
    for i, offset in enumerate(offsets_mm):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[series_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + offset * normal]
        ds.InstanceNumber = len(offsets_mm) - i  # deliberately the reverse of the position order
        for keyword, value in tags.items():
            setattr(ds, keyword, value[i] if isinstance(value, list) else value)
        path = out_dir / names[i]
        ds.save_as(path)
        written.append(path)
    return written


def vendor_sample_with_pixels(folder: Path, name: str) -> None:
    """A nibabel vendor sample (real headers: Philips enhanced groups, Siemens mosaic CSA) written into
    ``folder`` (created) with its pixel data, blank in the shipped file, replaced by noise so that voxel
    order can be checked too (the dcm2niix oracle tests and benchmarks/bench_load_dicom.py)."""
    folder.mkdir(parents=True)
    path = folder / name.removesuffix(".gz")
    path.write_bytes(gzip.open(NICOM_DATA / name).read())
    ds = pydicom.dcmread(path)
    shape = ds.pixel_array.shape
    assert not ds.pixel_array.any(), "the sample now ships pixels; use them instead of noise"
    noise = np.random.default_rng(len(name)).integers(0, 2 ** int(ds.BitsStored), size=shape)
    ds.PixelData = noise.astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)


def rotation_matrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """(3, 3) rotation about x, then y, then z, by these angles in degrees (oblique test geometries)."""
    x, y, z = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx
