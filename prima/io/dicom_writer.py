"""Write a 3D volume as a multi-file DICOM series (one file per slice) with consistent geometry tags.

Used by the synthetic study engine to export studies in the same on-disk form as a hospital export,
and by the tests to build multi-series studies. Nothing written here comes from a real patient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from prima.io.orientation import LPS_TO_RAS, TARGET_AXCODES, reorient, through_axis_from_spacing

SOP_CLASS_OF_MODALITY = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}
# For each slice axis of an L,P,S-ordered volume: the (axis, sign) of the image columns and of the image
# rows that give the display orientation scanners write. Axial: columns run towards L, rows towards P;
# coronal and sagittal images are shown head up, so their rows run towards I (-S).
_DISPLAY_AXES = {
    2: ((0, +1), (1, +1)),  # axial:    IOP 1\0\0\0\1\0
    1: ((0, +1), (2, -1)),  # coronal:  IOP 1\0\0\0\0\-1
    0: ((1, +1), (2, -1)),  # sagittal: IOP 0\1\0\0\0\-1
}


def _uid(seed: str | int | None, *parts: object) -> str:
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def _storage_plan(volume: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """Choose how to store ``volume`` as 16-bit integers: (stored values, slope, intercept, pixel representation)."""
    lo, hi = float(volume.min()), float(volume.max())
    is_integral = np.array_equal(volume, np.round(volume))
    if is_integral and lo >= 0 and hi <= 65535:
        return volume.astype(np.uint16), 1.0, 0.0, 0
    if is_integral and lo >= -32768 and hi <= 32767:
        return volume.astype(np.int16), 1.0, 0.0, 1
    # Float data: map [lo, hi] linearly onto the full uint16 range; error <= slope / 2 per voxel.
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((volume.astype(np.float64) - lo) / slope).clip(0, 65535).astype(np.uint16)
    return stored, slope, lo, 0


def _ds_number(value: float) -> str:
    """A DICOM Decimal String (at most 16 characters) as close to ``value`` as possible."""
    return pydicom.valuerep.format_number_as_ds(float(value)) if abs(value) > 0 else "0"


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    series_description: str,
    study_description: str = "",
    series_number: int = 1,
    study_uid: str | None = None,
    patient_id: str = "ANON",
    through_axis: int | None = None,
    modality: str = "MR",
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_seed: str | int | None = None,
    file_name_pattern: str = "IM{index:04d}.dcm",
    study_date: str = "20000101",
    extra_tags: dict[str, object] | None = None,
) -> list[Path]:
    """Write ``volume`` as a DICOM series, one file per slice along ``through_axis``.

    Args:
        volume: 3D array of shape (X, Y, Z) in the orientation given by ``affine`` (any orientation;
            it is permuted/flipped, never interpolated, to the usual display orientation of its plane).
            Must be finite. Integer data that fits 16 bits is stored as is; anything else is stored as
            uint16 with RescaleSlope/RescaleIntercept (quantisation error <= slope / 2).
        affine: (4, 4) voxel -> world mm in RAS+ (nibabel convention).
        out_dir: folder to create/fill with the files.
        series_description: SeriesDescription (and ProtocolName).
        study_description: StudyDescription.
        series_number: SeriesNumber.
        study_uid: StudyInstanceUID shared by the series of one study; generated when None.
        patient_id: PatientID (PatientName is always "ANON^ANON").
        through_axis: axis of ``volume`` (as given) that becomes the slice axis; default: the axis with
            the largest spacing, ties broken by fewest voxels then axial (same rule as plane detection).
        modality: "MR" or "CT" (selects the SOP class).
        series_uid: SeriesInstanceUID; generated when None (give one to add files to an existing series).
        frame_of_reference_uid: FrameOfReferenceUID; generated when None.
        uid_seed: when given, every generated UID is a deterministic function of it (and of the series).
        file_name_pattern: ``str.format`` pattern with ``index`` (0-based slice index) for file names.
        study_date: StudyDate/SeriesDate (YYYYMMDD); a fixed synthetic date by default.
        extra_tags: additional top-level elements by keyword, e.g. {"EchoTime": 90.0}.

    Returns:
        The written file paths, in slice order.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if not np.isfinite(volume).all():
        raise ValueError("volume holds NaN or Inf values; DICOM stores finite numbers only")
    if modality not in SOP_CLASS_OF_MODALITY:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_OF_MODALITY)}, got {modality!r}")
    if through_axis is not None and through_axis not in (0, 1, 2):
        raise ValueError(f"through_axis must be 0, 1 or 2, got {through_axis}")

    # Reorient to L,P,S (permutation/flips only) and follow the requested slice axis through it.
    lps_volume, lps_affine = reorient(volume, affine)
    if through_axis is None:
        slice_axis = through_axis_from_spacing(lps_affine, lps_volume.shape)
    else:
        transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                                orientations.axcodes2ornt(TARGET_AXCODES))
        slice_axis = int(transform[through_axis, 0])
    (col_axis, col_sign), (row_axis, row_sign) = _DISPLAY_AXES[slice_axis]
    # Arrange as (slice, row, column) with the display signs applied to the in-plane axes.
    arranged = np.transpose(lps_volume, (slice_axis, row_axis, col_axis))
    index_to_lps = LPS_TO_RAS @ lps_affine  # RAS -> LPS is the same sign flip
    flip_origin = np.zeros(3)
    if row_sign < 0:
        arranged = arranged[:, ::-1, :]
        flip_origin[row_axis] = lps_volume.shape[row_axis] - 1
    if col_sign < 0:
        arranged = arranged[:, :, ::-1]
        flip_origin[col_axis] = lps_volume.shape[col_axis] - 1
    col_vec = index_to_lps[:3, col_axis] * col_sign
    row_vec = index_to_lps[:3, row_axis] * row_sign
    slice_vec = index_to_lps[:3, slice_axis]
    col_spacing, row_spacing = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    slice_spacing = float(np.linalg.norm(slice_vec))
    origin = index_to_lps[:3, :3] @ flip_origin + index_to_lps[:3, 3]
    orientation = np.concatenate([col_vec / col_spacing, row_vec / row_spacing])

    stored, slope, intercept, pixel_representation = _storage_plan(arranged)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid(uid_seed, "study", patient_id, study_description)
    series_uid = series_uid or _uid(uid_seed, "series", study_uid, series_number, series_description)
    frame_uid = frame_of_reference_uid or _uid(uid_seed, "frame", study_uid)
    sop_class = SOP_CLASS_OF_MODALITY[modality]
    n_slices, rows, columns = stored.shape
    written: list[Path] = []
    for index in range(n_slices):
        position = origin + index * slice_vec
        sop_uid = _uid(uid_seed, "instance", series_uid, index, np.round(position, 4).tolist(), orientation.tolist())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "Prima synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = ds.ProtocolName = series_description
        ds.PatientName = "ANON^ANON"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in orientation]
        ds.PixelSpacing = [_ds_number(row_spacing), _ds_number(col_spacing)]
        ds.SliceThickness = _ds_number(slice_spacing)
        ds.SpacingBetweenSlices = _ds_number(slice_spacing)
        normal = np.cross(orientation[:3], orientation[3:])
        ds.SliceLocation = _ds_number(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleSlope = _ds_number(slope) if slope != 1.0 else "1"
        ds.RescaleIntercept = _ds_number(intercept) if intercept != 0.0 else "0"
        ds.RescaleType = "US"
        for keyword, value in (extra_tags or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored[index]).tobytes()
        path = out_dir / file_name_pattern.format(index=index)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
