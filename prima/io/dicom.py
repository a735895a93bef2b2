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
from prima.io.orientation import LPS_TO_RAS, affine_problem

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
        return str(get_value(self.header, "SeriesInstanceUID", ""))


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


def get_value(dataset: Dataset | None, keyword: str, default: object = None) -> object:
    """``dataset.get(keyword, default)``, or ``default`` when the stored value cannot be parsed.

    pydicom converts values lazily and raises (ValueError, OverflowError, struct errors...) on a
    corrupt one; a deferred value (longer than the file, see ``_dcmread``) is not read at all.
    """
    if dataset is None:
        return default
    try:
        raw = dataset.get_item(keyword, keep_deferred=True)
        if raw is not None and raw.value is None and raw.length not in (0, 0xFFFFFFFF):
            return default  # deferred by _dcmread: declares more bytes than the file holds
        return dataset.get(keyword, default)
    except Exception as error:  # noqa: BLE001 - any conversion failure means "no usable value"
        logger.debug("unreadable %s (%s)", keyword, error)
        return default


def _dcmread(path: Path, **kwargs: object) -> Dataset:
    """``pydicom.dcmread`` that skips (defers) elements declaring more bytes than the whole file.

    A corrupt element length makes pydicom allocate that many bytes (up to 4 GiB) before reading.
    """
    return pydicom.dcmread(path, defer_size=max(path.stat().st_size, 1), **kwargs)


def read_header(path: Path) -> Dataset | None:
    """The file's header without pixel data, or None when it is not DICOM."""
    try:
        return _dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass  # no preamble: old files are still DICOM, a PNG or text file is not (checked below)
    except Exception as error:  # noqa: BLE001 - any parse failure means "not usable DICOM"
        logger.debug("%s: not DICOM (%s)", path, error)
        return None
    try:
        header = _dcmread(path, stop_before_pixels=True, force=True)
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
        value = str(get_value(header, keyword, "") or "").strip()
        if value:
            return value
    number = get_value(header, "SeriesNumber")
    return f"Series {number}" if number not in (None, "") else "Unnamed series"


def series_order_key(header: Dataset) -> tuple[float, str]:
    """Sort key of a series in a study: SeriesNumber, then name."""
    return (_number(get_value(header, "SeriesNumber"), 0.0) or 0.0, series_name_of(header))


def sop_class_of(header: Dataset) -> str:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID (DICOMDIR has only that)."""
    sop = get_value(header, "SOPClassUID") or get_value(getattr(header, "file_meta", None), "MediaStorageSOPClassUID")
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
    items = get_value(dataset, sequence)
    return items[0] if isinstance(items, pydicom.Sequence) and items else None


def _functional(frame_groups: Dataset | None, shared: Dataset | None, sequence: str, keyword: str):
    """Look ``keyword`` up in the per-frame functional group first, then in the shared one."""
    for groups in (frame_groups, shared):
        item = _first_item(groups, sequence)
        if item is not None and keyword in item and get_value(item, keyword) not in (None, ""):
            return get_value(item, keyword)
    return None


def _number(value: object, default: float | None = None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _integer(value: object, default: int) -> int:
    """An integer tag value, ``default`` when missing, not a number, or not finite."""
    number = _number(value)
    return int(number) if number is not None and np.isfinite(number) else default


def matrix_of(header: Dataset) -> tuple[int, int]:
    """(Rows, Columns); SeriesLoadError unless both are positive integers."""
    rows, columns = get_value(header, "Rows"), get_value(header, "Columns")
    if not all(isinstance(n, int) and n > 0 for n in (rows, columns)):
        raise SeriesLoadError(f"unusable image matrix Rows={rows!r} Columns={columns!r}")
    return rows, columns


def declared_voxels(files: list[DicomFile]) -> int:
    """Voxels the image files declare (Rows x Columns x frames), from their headers only."""
    total = 0
    for file in files:
        rows, columns = matrix_of(file.header)
        total += rows * columns * max(_integer(get_value(file.header, "NumberOfFrames"), 1), 1)
    return total


def _frames_of(file: DicomFile) -> list[_Frame]:
    header = file.header
    instance = _integer(get_value(header, "InstanceNumber"), 0)
    n_frames = _integer(get_value(header, "NumberOfFrames"), 1) or 1
    per_frame = get_value(header, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and not isinstance(per_frame, pydicom.Sequence):
        per_frame = None
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
                              _number(get_value(header, "RescaleSlope"), 1.0)) or 1.0,
                intercept=_number(_functional(groups, shared, "PixelValueTransformationSequence",
                                              "RescaleIntercept"), _number(get_value(header, "RescaleIntercept"), 0.0))
                or 0.0,
                split_keys=keys, instance_number=instance * 100_000 + index,
            ))
        return frames
    orientation = _float_list(get_value(header, "ImageOrientationPatient"))
    position = _float_list(get_value(header, "ImagePositionPatient"))
    spacing = _float_list(get_value(header, "PixelSpacing"))
    keys = {}
    for label, keyword in (("echo", "EchoNumbers"), ("echo time", "EchoTime"), ("b", "DiffusionBValue"),
                           ("time point", "TemporalPositionIdentifier"), ("acquisition", "AcquisitionNumber"),
                           ("trigger time", "TriggerTime")):
        value = _number(get_value(header, keyword))
        if value is not None:
            keys[label] = value
    return [_Frame(
        file=file, frame_index=None,
        orientation=np.array(orientation) if orientation and len(orientation) == 6 else None,
        position=np.array(position) if position and len(position) == 3 else None,
        pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
        slice_thickness=_number(get_value(header, "SliceThickness")),
        slope=_number(get_value(header, "RescaleSlope"), 1.0) or 1.0,
        intercept=_number(get_value(header, "RescaleIntercept"), 0.0) or 0.0,
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
    image_type = [str(v).upper() for v in (get_value(frames[0].file.header, "ImageType") or [])]
    if any(frame.orientation is None or frame.position is None or frame.pixel_spacing is None
           for frame in frames):
        raise SeriesLoadError("missing ImageOrientationPatient/ImagePositionPatient/PixelSpacing: "
                              "no patient geometry to build a volume")
    reference = frames[0].orientation
    if any(np.abs(frame.orientation - reference).max() > ORIENTATION_TOLERANCE for frame in frames):
        raise SeriesLoadError("slices have different orientations (a localizer/scout or a composite series)")
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise SeriesLoadError("localizer/scout images (ImageType says LOCALIZER)")
    for frame in frames:
        if not (np.isfinite(frame.orientation).all() and np.isfinite(frame.position).all()):
            raise SeriesLoadError("ImageOrientationPatient/ImagePositionPatient hold NaN or infinite values")
        if not all(np.isfinite(s) and s > 0 for s in frame.pixel_spacing):
            raise SeriesLoadError(f"PixelSpacing {list(frame.pixel_spacing)} is not two positive numbers")
    matrices = {matrix_of(f.file.header) for f in frames}
    if len(matrices) > 1:
        raise SeriesLoadError(f"slices have different matrix sizes {sorted(matrices)}")
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        raise SeriesLoadError(f"slices have different pixel spacings {sorted(spacings)}")
    samples = _integer(get_value(frames[0].file.header, "SamplesPerPixel"), 1)
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
        dataset = _dcmread(file.path)
    except Exception as error:  # noqa: BLE001
        raise SeriesLoadError(f"{file.path.name}: unreadable DICOM ({error})") from error
    if "PixelData" not in dataset:
        raise SeriesLoadError(f"{file.path.name}: no pixel data")
    raw = dataset.get_item("PixelData", keep_deferred=True)  # never read a deferred value: its length lies
    if raw.value is None and raw.length != 0xFFFFFFFF:  # deferred by _dcmread
        raise SeriesLoadError(f"{file.path.name}: pixel data declares {raw.length} bytes, more than the file holds")
    syntax = get_value(getattr(dataset, "file_meta", None), "TransferSyntaxUID")
    syntax = syntax if isinstance(syntax, pydicom.uid.UID) else None
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
    return "MOSAIC" in [str(v).upper() for v in (get_value(header, "ImageType") or [])]


def _mosaic_volume(files: list[DicomFile]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """First volume of a series of Siemens mosaics (one file = one 3D volume), via nibabel."""
    with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental on import
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

    ordered = sorted(files, key=lambda f: (_number(get_value(f.header, "AcquisitionNumber"), 0),
                                           _number(get_value(f.header, "InstanceNumber"), 0)))
    try:
        dataset = _dcmread(ordered[0].path)
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
        _check_affine(affine)
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
            thickness = (group[0].slice_thickness
                         or _number(get_value(group[0].file.header, "SpacingBetweenSlices"), 1.0))
            step = normal * float(thickness or 1.0)
        slices = []
        for frame in group:
            if frame.file.path not in decoded:
                decoded[frame.file.path] = _decode(frame.file)
            frames_decoded = decoded[frame.file.path]
            if (frame.frame_index or 0) >= len(frames_decoded):
                raise SeriesLoadError(f"{frame.file.path.name}: decoded {len(frames_decoded)} frame(s), "
                                      f"geometry lists frame {(frame.frame_index or 0) + 1}")
            pixels = frames_decoded[frame.frame_index or 0]
            if pixels.shape != matrix_of(frame.file.header):
                raise SeriesLoadError(f"{frame.file.path.name}: decoded {pixels.shape} pixels, header says "
                                      "{}x{}".format(*matrix_of(frame.file.header)))
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
        _check_affine(LPS_TO_RAS @ affine_lps)
        volumes.append((label, array, LPS_TO_RAS @ affine_lps, normal, meta))
    return volumes


def _check_affine(affine: np.ndarray) -> None:
    problem = affine_problem(affine)
    if problem:
        raise SeriesLoadError(f"patient geometry gives no usable voxel-to-world affine: {problem}")


def series_meta(header: Dataset) -> dict:
    """JSON-serialisable description of a series from one of its headers (no patient identifiers)."""
    meta: dict = {}
    for key, keyword in (("modality", "Modality"), ("series_uid", "SeriesInstanceUID"),
                         ("study_uid", "StudyInstanceUID"), ("manufacturer", "Manufacturer"),
                         ("manufacturer_model", "ManufacturerModelName"), ("protocol_name", "ProtocolName"),
                         ("series_description", "SeriesDescription"), ("sop_class", "SOPClassUID")):
        value = get_value(header, keyword)
        if value not in (None, ""):
            meta[key] = str(value)
    for key, keyword in (("series_number", "SeriesNumber"),):
        value = _number(get_value(header, keyword))
        if value is not None and np.isfinite(value):
            meta[key] = int(value)
    for key, keyword in (("echo_time_ms", "EchoTime"), ("repetition_time_ms", "RepetitionTime"),
                         ("inversion_time_ms", "InversionTime"), ("field_strength_t", "MagneticFieldStrength"),
                         ("slice_thickness_mm", "SliceThickness")):
        value = _number(get_value(header, keyword))
        if value is not None and np.isfinite(value):
            meta[key] = value
    syntax = get_value(getattr(header, "file_meta", None), "TransferSyntaxUID")
    if isinstance(syntax, pydicom.uid.UID):
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
                              f"{get_value(next(iter(groups.values()))[0].header, 'SOPClassUID', '?')})")
    if len(image_groups) > 1:
        raise SeriesLoadError(f"{path} holds {len(image_groups)} series; use load_study for several series")
    files_of_series = [f for f in next(iter(image_groups.values())) if is_image(f.header)]
    _, array, affine, _, _ = build_volume(files_of_series, allow_single_slice=True)[0]
    return array, affine
