"""DICOM reading: group files into series and turn each series into a 3D volume with its affine.

A series becomes a volume only when its frames share one orientation and one matrix and sit at
evenly spaced positions along the slice normal; everything else raises ``SeriesLoadError`` with a
reason a person can act on (the study loader records it and goes on with the other series).

Choices documented in ``docs/io.md``:
- slices are ordered by their position projected on the slice normal (never by InstanceNumber);
- the slice step comes from the measured positions (first to last), not from SliceThickness;
- frames that repeat a position (multi-echo, several b-values, several time points) are split into one
  volume per echo / b-value / time point when one of those tags separates them cleanly (at most
  ``MAX_SPLIT_VOLUMES``; beyond that only the first volume is kept), otherwise the first frame at each
  position (lowest InstanceNumber) is kept and the number dropped is recorded;
- uneven slice gaps (e.g. a missing slice) reject the series rather than silently warping anatomy;
- Siemens mosaics are unpacked with nibabel's DICOM wrappers; a series of mosaics (e.g. one per
  diffusion direction) keeps its first volume.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from prima.errors import CodecUnavailableError, SeriesLoadError
from prima.io.orientation import LPS_TO_RAS

logger = logging.getLogger("prima.io")

# Positions closer than this along the normal are the same slice (mm).
SAME_POSITION_MM = 0.01
# Slice gaps may differ from the median gap by this fraction (plus SAME_POSITION_MM) before a series
# is rejected as unevenly spaced; real scanners write positions with ~1e-4 mm jitter, a missing slice
# doubles a gap.
GAP_TOLERANCE = 0.05
# A series whose frames repeat positions is split into at most this many volumes (echoes, b-values);
# more (dynamic, perfusion, diffusion directions) keeps the first volume only.
MAX_SPLIT_VOLUMES = 8
# Orientation cosines of frames in one volume may differ by this much.
ORIENTATION_TOLERANCE = 1e-3
# Per-frame attributes of enhanced multi-frame files that tell apart frames at the same position:
# (functional group sequence, attribute, name used in the split volume's label).
_FRAME_SPLIT_KEYS = (
    ("MREchoSequence", "EffectiveEchoTime", "echo time"),
    ("MRDiffusionSequence", "DiffusionBValue", "b"),
    ("FrameContentSequence", "TemporalPositionIndex", "time point"),
    ("FrameContentSequence", "StackID", "stack"),
)


@dataclass
class DicomFile:
    """One DICOM file read without its pixel data."""

    path: Path
    header: Dataset

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))


@dataclass
class _Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file."""

    file: DicomFile
    frame_index: int | None
    orientation: np.ndarray | None  # (6,) row cosines then column cosines, LPS
    position: np.ndarray | None  # (3,) LPS mm of the first transmitted pixel
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slice_thickness: float | None
    slope: float
    intercept: float
    split_keys: dict[str, float] = field(default_factory=dict)
    instance_number: int = 0


def read_header(path: Path) -> Dataset | None:
    """The file's header without pixel data, or None when it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass  # no preamble: old files are still DICOM, a PNG or text file is not (checked below)
    except Exception as error:  # noqa: BLE001 - any parse failure means "not usable DICOM"
        logger.debug("%s: not DICOM (%s)", path, error)
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001
        logger.debug("%s: not DICOM (%s)", path, error)
        return None
    # Forced parsing of arbitrary bytes "succeeds" with junk; require the identifying tags of a real object.
    if "SOPClassUID" not in header or "SOPInstanceUID" not in header:
        return None
    return header


def series_name_of(header: Dataset) -> str:
    """SeriesDescription, falling back to ProtocolName, then the series number."""
    for keyword in ("SeriesDescription", "ProtocolName"):
        value = str(header.get(keyword, "") or "").strip()
        if value:
            return value
    number = header.get("SeriesNumber")
    return f"Series {number}" if number not in (None, "") else "Unnamed series"


def series_order_key(header: Dataset) -> tuple[float, str]:
    """Sort key of a series in a study: SeriesNumber, then name."""
    return (_number(header.get("SeriesNumber"), 0.0) or 0.0, series_name_of(header))


def sop_class_of(header: Dataset) -> str:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID (DICOMDIR has only that)."""
    sop = header.get("SOPClassUID") or getattr(header, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return str(sop) if sop else ""


def is_image(header: Dataset) -> bool:
    """True for objects with an image matrix (not RT plans, reports, presentation states...)."""
    return "Rows" in header and "Columns" in header


def _float_list(value: object) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _first_item(dataset: Dataset | None, sequence: str) -> Dataset | None:
    if dataset is None or sequence not in dataset:
        return None
    items = dataset[sequence].value
    return items[0] if items else None


def _functional(frame_groups: Dataset | None, shared: Dataset | None, sequence: str, keyword: str):
    """Look ``keyword`` up in the per-frame functional group first, then in the shared one."""
    for groups in (frame_groups, shared):
        item = _first_item(groups, sequence)
        if item is not None and keyword in item and item.get(keyword) not in (None, ""):
            return item.get(keyword)
    return None


def _number(value: object, default: float | None = None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _frames_of(file: DicomFile) -> list[_Frame]:
    header = file.header
    instance = int(_number(header.get("InstanceNumber"), 0) or 0)
    n_frames = int(_number(header.get("NumberOfFrames"), 1) or 1)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 or per_frame is not None:
        shared = _first_item(header, "SharedFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != n_frames:
            items = 0 if per_frame is None else len(per_frame)
            raise SeriesLoadError(
                f"multi-frame object with {n_frames} frame(s) but {items} per-frame geometry item(s) "
                "(not an enhanced MR/CT volume)"
            )
        frames = []
        for index, groups in enumerate(per_frame):
            orientation = _float_list(_functional(groups, shared, "PlaneOrientationSequence",
                                                  "ImageOrientationPatient"))
            position = _float_list(_functional(groups, shared, "PlanePositionSequence", "ImagePositionPatient"))
            spacing = _float_list(_functional(groups, shared, "PixelMeasuresSequence", "PixelSpacing"))
            keys = {}
            for sequence, attribute, key in _FRAME_SPLIT_KEYS:
                value = _number(_functional(groups, shared, sequence, attribute))
                if value is not None:
                    keys[key] = value
            frames.append(_Frame(
                file=file, frame_index=index,
                orientation=np.array(orientation) if orientation and len(orientation) == 6 else None,
                position=np.array(position) if position and len(position) == 3 else None,
                pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
                slice_thickness=_number(_functional(groups, shared, "PixelMeasuresSequence", "SliceThickness")),
                slope=_number(_functional(groups, shared, "PixelValueTransformationSequence", "RescaleSlope"),
                              _number(header.get("RescaleSlope"), 1.0)) or 1.0,
                intercept=_number(_functional(groups, shared, "PixelValueTransformationSequence",
                                              "RescaleIntercept"), _number(header.get("RescaleIntercept"), 0.0))
                or 0.0,
                split_keys=keys, instance_number=instance * 100_000 + index,
            ))
        return frames
    orientation = _float_list(header.get("ImageOrientationPatient"))
    position = _float_list(header.get("ImagePositionPatient"))
    spacing = _float_list(header.get("PixelSpacing"))
    keys = {}
    for label, keyword in (("echo", "EchoNumbers"), ("echo time", "EchoTime"), ("b", "DiffusionBValue"),
                           ("time point", "TemporalPositionIdentifier"), ("acquisition", "AcquisitionNumber"),
                           ("trigger time", "TriggerTime")):
        value = _number(header.get(keyword))
        if value is not None:
            keys[label] = value
    return [_Frame(
        file=file, frame_index=None,
        orientation=np.array(orientation) if orientation and len(orientation) == 6 else None,
        position=np.array(position) if position and len(position) == 3 else None,
        pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
        slice_thickness=_number(header.get("SliceThickness")),
        slope=_number(header.get("RescaleSlope"), 1.0) or 1.0,
        intercept=_number(header.get("RescaleIntercept"), 0.0) or 0.0,
        split_keys=keys, instance_number=instance * 100_000,
    )]


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 0.5:
        raise SeriesLoadError("ImageOrientationPatient does not hold two perpendicular directions")
    return normal / norm


def _check_geometry(frames: list[_Frame], allow_single_slice: bool) -> None:
    """Raise SeriesLoadError when the frames cannot form one volume (before any pixel is read)."""
    image_type = [str(v).upper() for v in (frames[0].file.header.get("ImageType") or [])]
    if any(frame.orientation is None or frame.position is None or frame.pixel_spacing is None
           for frame in frames):
        raise SeriesLoadError("missing ImageOrientationPatient/ImagePositionPatient/PixelSpacing: "
                              "no patient geometry to build a volume")
    reference = frames[0].orientation
    if any(np.abs(frame.orientation - reference).max() > ORIENTATION_TOLERANCE for frame in frames):
        raise SeriesLoadError("slices have different orientations (a localizer/scout or a composite series)")
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise SeriesLoadError("localizer/scout images (ImageType says LOCALIZER)")
    matrices = {(int(f.file.header.Rows), int(f.file.header.Columns)) for f in frames}
    if len(matrices) > 1:
        raise SeriesLoadError(f"slices have different matrix sizes {sorted(matrices)}")
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        raise SeriesLoadError(f"slices have different pixel spacings {sorted(spacings)}")
    samples = int(_number(frames[0].file.header.get("SamplesPerPixel"), 1) or 1)
    if samples != 1:
        raise SeriesLoadError(f"colour image ({samples} samples per pixel), not an MR/CT volume")
    if len(frames) == 1 and not allow_single_slice:
        raise SeriesLoadError("a single slice cannot form a 3D volume")


def _split_repeated_positions(frames: list[_Frame], normal: np.ndarray
                              ) -> tuple[list[tuple[str, list[_Frame]]], dict]:
    """Separate frames that repeat positions into volumes: ([(label, frames)], meta describing what was done).

    Split by the first tag (echo, b-value, time point, ...) whose values each give unique positions;
    beyond ``MAX_SPLIT_VOLUMES`` (dynamic or diffusion-direction series) only the first value's volume
    is kept. Without such a tag, the first frame at each position (lowest InstanceNumber) is kept.
    """
    positions = np.round(np.array([f.position @ normal for f in frames]) / SAME_POSITION_MM).astype(np.int64)
    if len(np.unique(positions)) == len(frames):
        return [("", frames)], {}
    for key in ("echo", "echo time", "b", "time point", "stack", "acquisition", "trigger time"):
        groups: dict[float, list[int]] = defaultdict(list)
        for i, frame in enumerate(frames):
            groups[frame.split_keys.get(key, float("nan"))].append(i)
        if len(groups) < 2 or any(np.isnan(value) for value in groups):
            continue
        if all(len(np.unique(positions[idx])) == len(idx) for idx in groups.values()):
            split = []
            for value, idx in sorted(groups.items()):
                label = f"{key} {value:g}" if key != "b" else f"b={value:g}"
                split.append((label, [frames[i] for i in idx]))
            if len(split) > MAX_SPLIT_VOLUMES:
                logger.warning("%d volumes (%s) in one series; kept the first", len(split), key)
                return [("", split[0][1])], {"volumes_in_series": len(split), "kept_volume": split[0][0]}
            return split, {"split_by": key}
    kept: dict[int, _Frame] = {}
    for position, frame in sorted(zip(positions, frames), key=lambda pf: pf[1].instance_number):
        kept.setdefault(int(position), frame)
    logger.warning("%d frames repeat a position; kept the first at each position", len(frames) - len(kept))
    return [("", list(kept.values()))], {"dropped_repeated_frames": len(frames) - len(kept)}


def _decode(file: DicomFile) -> np.ndarray:
    """Pixel data of one file as (frames, rows, columns), raw stored values."""
    try:
        dataset = pydicom.dcmread(file.path)
    except Exception as error:  # noqa: BLE001
        raise SeriesLoadError(f"{file.path.name}: unreadable DICOM ({error})") from error
    if "PixelData" not in dataset:
        raise SeriesLoadError(f"{file.path.name}: no pixel data")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is not None and (not syntax.is_transfer_syntax or syntax.is_compressed):
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise CodecUnavailableError(
                f"pixel data is compressed with {syntax.name} ({syntax}) and no installed decoder handles it; "
                "install the pydicom plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls) "
                "or convert the series to an uncompressed transfer syntax"
            )
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - decoders raise many types for corrupt data
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise SeriesLoadError(f"{file.path.name}: pixel data could not be decoded ({name}): {error}") from error
    if pixels.ndim == 2:
        pixels = pixels[None]
    return pixels


def _is_mosaic(header: Dataset) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (header.get("ImageType") or [])]


def _mosaic_volume(files: list[DicomFile]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """First volume of a series of Siemens mosaics (one file = one 3D volume), via nibabel."""
    with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental on import
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

    ordered = sorted(files, key=lambda f: (_number(f.header.get("AcquisitionNumber"), 0),
                                           _number(f.header.get("InstanceNumber"), 0)))
    dataset = pydicom.dcmread(ordered[0].path)
    try:
        wrapper = dicomwrappers.wrapper_from_data(dataset)
        data = np.asarray(wrapper.get_data(), dtype=np.float32)  # rescale already applied
        affine_lps = np.asarray(wrapper.affine, dtype=np.float64)
        normal = np.asarray(wrapper.slice_normal, dtype=np.float64)
    except Exception as error:  # noqa: BLE001
        raise SeriesLoadError(f"Siemens mosaic could not be unpacked: {error}") from error
    if data.ndim != 3 or data.shape[2] < 2:
        raise SeriesLoadError(f"Siemens mosaic holds {data.shape} voxels, not a 3D volume")
    return data, LPS_TO_RAS @ affine_lps, normal, {"volumes_in_series": len(files), "mosaic": True}


def build_volume(files: list[DicomFile], allow_single_slice: bool = False
                 ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict]]:
    """Turn the files of one series into volumes.

    Returns a list of (label, array (X, Y, Z) float32, affine (4, 4) RAS, slice normal (3,) LPS, meta);
    one element unless repeated positions were split (label then says e.g. ``"b=1000"``).
    Array axes: 0 = image columns, 1 = image rows, 2 = slices sorted along the normal.
    """
    if _is_mosaic(files[0].header):
        array, affine, normal, meta = _mosaic_volume(files)
        return [("", array, affine, normal, meta)]
    frames = [frame for file in files for frame in _frames_of(file)]
    _check_geometry(frames, allow_single_slice)
    normal = _normal(frames[0].orientation)
    volumes = []
    split, split_meta = _split_repeated_positions(frames, normal)
    decoded: dict[Path, np.ndarray] = {}
    for label, group in split:
        group = sorted(group, key=lambda f: float(f.position @ normal))
        if len(group) == 1 and not allow_single_slice:
            raise SeriesLoadError("a single slice cannot form a 3D volume")
        projections = np.array([f.position @ normal for f in group])
        gaps = np.diff(projections)
        meta: dict = {"n_frames": len(group), **split_meta}
        if len(gaps):
            median = float(np.median(gaps))
            if np.abs(gaps - median).max() > GAP_TOLERANCE * median + SAME_POSITION_MM:
                raise SeriesLoadError(
                    f"uneven slice gaps ({gaps.min():.2f} to {gaps.max():.2f} mm, median {median:.2f} mm): "
                    "missing or extra slices"
                )
            step = (group[-1].position - group[0].position) / (len(group) - 1)
        else:
            thickness = group[0].slice_thickness or _number(group[0].file.header.get("SpacingBetweenSlices"), 1.0)
            step = normal * float(thickness or 1.0)
        slices = []
        for frame in group:
            if frame.file.path not in decoded:
                decoded[frame.file.path] = _decode(frame.file)
            pixels = decoded[frame.file.path][frame.frame_index or 0]
            if pixels.shape != (int(frame.file.header.Rows), int(frame.file.header.Columns)):
                raise SeriesLoadError(f"{frame.file.path.name}: decoded {pixels.shape} pixels, header says "
                                      f"{frame.file.header.Rows}x{frame.file.header.Columns}")
            slices.append(pixels.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept))
        # (slices, rows, columns) -> (columns, rows, slices)
        array = np.ascontiguousarray(np.stack(slices).transpose(2, 1, 0))
        row_spacing, column_spacing = group[0].pixel_spacing
        orientation = group[0].orientation
        affine_lps = np.eye(4)
        affine_lps[:3, 0] = orientation[:3] * column_spacing
        affine_lps[:3, 1] = orientation[3:] * row_spacing
        affine_lps[:3, 2] = step
        affine_lps[:3, 3] = group[0].position
        volumes.append((label, array, LPS_TO_RAS @ affine_lps, normal, meta))
    return volumes


def series_meta(header: Dataset) -> dict:
    """JSON-serialisable description of a series from one of its headers (no patient identifiers)."""
    meta: dict = {}
    for key, keyword in (("modality", "Modality"), ("series_uid", "SeriesInstanceUID"),
                         ("study_uid", "StudyInstanceUID"), ("manufacturer", "Manufacturer"),
                         ("manufacturer_model", "ManufacturerModelName"), ("protocol_name", "ProtocolName"),
                         ("series_description", "SeriesDescription"), ("sop_class", "SOPClassUID")):
        value = header.get(keyword)
        if value not in (None, ""):
            meta[key] = str(value)
    for key, keyword in (("series_number", "SeriesNumber"),):
        value = _number(header.get(keyword))
        if value is not None:
            meta[key] = int(value)
    for key, keyword in (("echo_time_ms", "EchoTime"), ("repetition_time_ms", "RepetitionTime"),
                         ("inversion_time_ms", "InversionTime"), ("field_strength_t", "MagneticFieldStrength"),
                         ("slice_thickness_mm", "SliceThickness")):
        value = _number(header.get(keyword))
        if value is not None:
            meta[key] = value
    syntax = getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None:
        meta["transfer_syntax"] = syntax.name
    return meta


def group_series(paths: list[Path]) -> tuple[dict[str, list[DicomFile]], list[Path]]:
    """Read headers and group DICOM files by SeriesInstanceUID; also return the files that are not DICOM."""
    groups: dict[str, list[DicomFile]] = defaultdict(list)
    not_dicom: list[Path] = []
    for path in paths:
        header = read_header(path)
        if header is None:
            not_dicom.append(path)
            continue
        file = DicomFile(path, header)
        groups[file.series_uid].append(file)
    logger.debug("grouped %d DICOM files into %d series", sum(map(len, groups.values())), len(groups))
    return dict(groups), not_dicom


def read_dicom(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series (a file, or a folder holding exactly one image series) as stored.

    Args:
        path: a DICOM file (single- or multi-frame) or a folder of the files of one series.

    Returns:
        (array, affine): float32 array (X, Y, Z) = (image columns, rows, slices sorted along the
        normal), rescale applied; (4, 4) affine voxel -> RAS mm. Not reoriented (``load_study`` does
        that). A single slice gives Z = 1 with the slice thickness as through-plane spacing.

    Raises:
        SeriesLoadError: not DICOM, no image, or the series cannot form a volume (reason says why).
        CodecUnavailableError: compressed pixel data without an installed decoder.
    """
    path = Path(path)
    if not path.exists():
        raise SeriesLoadError(f"{path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    groups, not_dicom = group_series(files)
    if not groups:
        raise SeriesLoadError(f"{path} holds no DICOM file" + (f" ({not_dicom[0].name} is not DICOM)"
                                                                 if not_dicom else ""))
    image_groups = {uid: group for uid, group in groups.items() if any(is_image(f.header) for f in group)}
    if not image_groups:
        raise SeriesLoadError(f"{path}: DICOM object without image (SOP class "
                              f"{next(iter(groups.values()))[0].header.get('SOPClassUID', '?')})")
    if len(image_groups) > 1:
        raise SeriesLoadError(f"{path} holds {len(image_groups)} series; use load_study for several series")
    files_of_series = [f for f in next(iter(image_groups.values())) if is_image(f.header)]
    _, array, affine, _, _ = build_volume(files_of_series, allow_single_slice=True)[0]
    return array, affine
