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

Speed (docs/io.md, "Loading speed"): plain files are read by the lean header reader of ``dicom_scan``
and their pixel data straight into the output array (``Volume.voxels``); pydicom reads everything else,
with the same values; every header check runs before any voxel is read.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

from prima.errors import CodecUnavailableError, SeriesLoadError
from prima.io.dicom_scan import PER_FRAME_GROUPS, FlatHeader, FlatItem, FlatSequence, scan
from prima.io.orientation import (
    LPS_TO_RAS,
    TILE_SLICES,
    affine_problem,
    copy_tiled,
    inverse_transform,
    lps_transform,
)

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


class DicomFile:
    """One DICOM file read without its pixel data.

    ``fields`` answers the per-file questions (series, matrix, geometry with the functional groups, pixel
    format): the lean ``FlatHeader`` of ``dicom_scan`` for a plain file, else pydicom's header. ``header``
    is pydicom's ``Dataset``, read on first use for lean files; ``series_header`` is pydicom's header up to
    the per-frame functional groups (what a series' name, order and description come from: the loader
    reads it once per series, and for an enhanced object it costs ~2 ms instead of ~70 ms).
    """

    __slots__ = ("path", "_header", "_series_header", "pixel_offset", "flat")

    def __init__(self, path: Path, header: Dataset | None = None, pixel_offset: int | None = None,
                 flat: FlatHeader | None = None):
        if header is None and flat is None:
            raise ValueError("a DicomFile needs a header or a FlatHeader")
        self.path = path
        self._header = header
        self._series_header: Dataset | None = None
        # Byte offset where reading the header stopped: the pixel data element, when the file has one there
        # (checked again before use); None when unknown.
        self.pixel_offset = pixel_offset
        self.flat = flat

    @property
    def header(self) -> Dataset:
        """pydicom's header (no pixel data); SeriesLoadError if pydicom cannot read a file the lean reader took."""
        if self._header is None:
            try:
                self._header, _ = _header_until_pixels(self.path, force=False)
            except Exception as error:  # noqa: BLE001 - any parse failure means "not usable DICOM"
                raise SeriesLoadError(f"{self.path.name}: unreadable DICOM header ({error})") from error
        return self._header

    @property
    def series_header(self) -> Dataset:
        """pydicom's header without the per-frame functional groups (``header`` when anything but the pixel
        data follows them); SeriesLoadError as for ``header``."""
        if self._header is not None or self.flat is None or not self.flat.groups_last:
            return self.header
        if self._series_header is None:
            try:
                self._series_header = _header_until(self.path, _SERIES_HEADER_END)
            except Exception as error:  # noqa: BLE001 - any parse failure means "not usable DICOM"
                raise SeriesLoadError(f"{self.path.name}: unreadable DICOM header ({error})") from error
        return self._series_header

    @property
    def fields(self) -> Dataset | FlatHeader:
        return self.flat if self.flat is not None else self.header

    @property
    def series_uid(self) -> str:
        return str(get_value(self.fields, "SeriesInstanceUID", ""))


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


def get_value(dataset: Dataset | FlatItem | None, keyword: str, default: object = None) -> object:
    """``dataset.get(keyword, default)``, or ``default`` when the stored value cannot be parsed.

    pydicom converts values lazily and raises (ValueError, OverflowError, struct errors...) on a
    corrupt one; a deferred value (longer than the file, see ``_dcmread``) is not read at all.
    A ``FlatItem`` holds converted values already (and raises NotCollected for any other keyword).
    """
    if dataset is None:
        return default
    if isinstance(dataset, FlatItem):
        return dataset.get(keyword, default)
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


# Where a series-level header stops: the per-frame functional groups, or the pixel data without them.
_SERIES_HEADER_END = frozenset({PER_FRAME_GROUPS, 0x7FE00008, 0x7FE00009, 0x7FE00010})


def _header_until(path: Path, tags: frozenset[int]) -> Dataset:
    """pydicom's header of a file up to (without) the first element whose tag is in ``tags``."""
    with open(path, "rb") as fp:
        return read_partial(fp, stop_when=lambda tag, vr, length: tag in tags,
                            defer_size=max(os.fstat(fp.fileno()).st_size, 1))


def _header_until_pixels(path: Path, force: bool) -> tuple[Dataset, int]:
    """``_dcmread(path, stop_before_pixels=True)`` and the offset where it stopped (pixel data or end)."""
    with open(path, "rb") as fp:
        header = pydicom.dcmread(fp, defer_size=max(os.fstat(fp.fileno()).st_size, 1), stop_before_pixels=True,
                                 force=force)
        return header, fp.tell()


def read_file(path: Path) -> DicomFile | None:
    """The file's header without pixel data (and where its pixel data starts), or None when it is not DICOM.

    A plain image file is read by the lean reader (``dicom_scan``); everything else (non-image objects
    included), and anything that reader declines, by pydicom.
    """
    scanned = scan(path)
    if scanned is not None:
        flat, offset = scanned
        if "Rows" in flat and "Columns" in flat:
            return DicomFile(path, None, offset, flat)
    return _read_with_pydicom(path)


def _read_with_pydicom(path: Path) -> DicomFile | None:
    try:
        return DicomFile(path, *_header_until_pixels(path, force=False))
    except InvalidDicomError:
        pass  # no preamble: old files are still DICOM, a PNG or text file is not (checked below)
    except Exception as error:  # noqa: BLE001 - any parse failure means "not usable DICOM"
        logger.debug("%s: not DICOM (%s)", path, error)
        return None
    try:
        header, offset = _header_until_pixels(path, force=True)
    except Exception as error:  # noqa: BLE001
        logger.debug("%s: not DICOM (%s)", path, error)
        return None
    # Forced parsing of arbitrary bytes "succeeds" with junk; require the identifying tags of a real object.
    if "SOPClassUID" not in header or "SOPInstanceUID" not in header:
        return None
    return DicomFile(path, header, offset)


def read_header(path: Path) -> Dataset | None:
    """The file's header without pixel data, or None when it is not DICOM."""
    file = read_file(path)
    return file.header if file is not None else None


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


def is_image(header: Dataset | FlatHeader) -> bool:
    """True for objects with an image matrix (not RT plans, reports, presentation states...)."""
    return "Rows" in header and "Columns" in header


def _float_list(value: object) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _first_item(dataset: Dataset | FlatItem | None, sequence: str) -> Dataset | FlatItem | None:
    if dataset is None or sequence not in dataset:
        return None
    items = get_value(dataset, sequence)
    return items[0] if isinstance(items, (pydicom.Sequence, FlatSequence)) and items else None


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


def matrix_of(header: Dataset | FlatHeader) -> tuple[int, int]:
    """(Rows, Columns); SeriesLoadError unless both are positive integers."""
    rows, columns = get_value(header, "Rows"), get_value(header, "Columns")
    if not all(isinstance(n, int) and n > 0 for n in (rows, columns)):
        raise SeriesLoadError(f"unusable image matrix Rows={rows!r} Columns={columns!r}")
    return rows, columns


def declared_voxels(files: list[DicomFile]) -> int:
    """Voxels the image files declare (Rows x Columns x frames), from their headers only."""
    total = 0
    for file in files:
        rows, columns = matrix_of(file.fields)
        total += rows * columns * max(_integer(get_value(file.fields, "NumberOfFrames"), 1), 1)
    return total


def _frames_of(file: DicomFile) -> list[_Frame]:
    header = file.fields
    instance = _integer(get_value(header, "InstanceNumber"), 0)
    n_frames = _integer(get_value(header, "NumberOfFrames"), 1) or 1
    per_frame = get_value(header, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and not isinstance(per_frame, (pydicom.Sequence, FlatSequence)):
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
    image_type = [str(v).upper() for v in (get_value(frames[0].file.series_header, "ImageType") or [])]
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
    matrices = {matrix_of(f.file.fields) for f in frames}
    if len(matrices) > 1:
        raise SeriesLoadError(f"slices have different matrix sizes {sorted(matrices)}")
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        raise SeriesLoadError(f"slices have different pixel spacings {sorted(spacings)}")
    samples = _integer(get_value(frames[0].file.series_header, "SamplesPerPixel"), 1)
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


# Transfer syntaxes whose pixel data are plain little-endian integers (no encapsulation, no deflate).
_NATIVE_LITTLE_ENDIAN = {pydicom.uid.ExplicitVRLittleEndian: False, pydicom.uid.ImplicitVRLittleEndian: True}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


@dataclass(frozen=True)
class _NativeFormat:
    """How a file's pixel data is stored when it is the plain case: little-endian integers, one sample."""

    dtype: np.dtype
    shift: int  # unused high bits (BitsAllocated - BitsStored)
    frames: int
    implicit: bool  # VR encoding of the pixel data element's header

    def shape(self, matrix: tuple[int, int]) -> tuple[int, int, int]:
        return (self.frames, *matrix)


def _native_format(file: DicomFile) -> _NativeFormat | None:
    """The storage of a natively encoded little-endian monochrome file's pixel data, from its header; None
    when anything is not the plain case (pydicom then decodes the file)."""
    header = file.fields
    if isinstance(header, FlatHeader):
        syntax, encoding = header.transfer_syntax, (header.implicit, True)
    else:
        syntax, encoding = get_value(getattr(header, "file_meta", None), "TransferSyntaxUID"), header.original_encoding
    if file.pixel_offset is None or not isinstance(syntax, str) or syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    implicit = _NATIVE_LITTLE_ENDIAN[syntax]
    if encoding != (implicit, True):
        return None  # pydicom found another encoding than the transfer syntax says
    values = [get_value(header, keyword) for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
                                                         "BitsStored", "PixelRepresentation")]
    if not all(isinstance(v, int) for v in values):
        return None
    rows, columns, samples, allocated, stored, signed = values
    frames = get_value(header, "NumberOfFrames", 1) if "NumberOfFrames" in header else 1
    photometric = get_value(header, "PhotometricInterpretation")
    if (rows <= 0 or columns <= 0 or samples != 1 or allocated not in (8, 16, 32) or not 0 < stored <= allocated
            or signed not in (0, 1) or not isinstance(frames, int) or frames <= 0
            or photometric not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    return _NativeFormat(np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}"), allocated - stored, frames, implicit)


def _read_native(file: DicomFile, form: _NativeFormat, out: np.ndarray) -> bool:
    """Read the pixel data element at ``file.pixel_offset`` straight into ``out`` (C-contiguous, ``form``'s
    dtype, as many bytes as the header declares); False when the element is not the plain one expected
    (another tag or VR, an unexpected length, a truncated file): pydicom then decodes the file."""
    expected = out.nbytes
    header_length = 8 if form.implicit else 12
    with open(file.path, "rb", buffering=0) as fp:
        fp.seek(file.pixel_offset)
        element = fp.read(header_length)
        if len(element) != header_length or element[:4] != _PIXEL_DATA_TAG:
            return False
        if not form.implicit and element[4:6] not in (b"OB", b"OW"):
            return False
        length = int.from_bytes(element[-4:], "little")
        if length not in (expected, expected + expected % 2):  # pydicom warns about (or refuses) any other
            return False
        view = memoryview(out).cast("B")
        done = 0
        while done < expected:  # a raw read may return fewer bytes than asked
            count = fp.readinto(view[done:])
            if not count:
                return False  # truncated: pydicom's error message says so
            done += count
    return True


def _correct_unused_bits(pixels: np.ndarray, shift: int) -> None:
    """Sign-extend (signed) or clear (unsigned) the unused high bits in place, as pydicom's ``pixel_array`` does."""
    if shift:
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)


def _native_pixels(file: DicomFile) -> np.ndarray | None:
    """The pixel data of a natively encoded little-endian monochrome file as (frames, rows, columns), the
    values pydicom's ``pixel_array`` gives; None when anything is not the plain case (pydicom decodes it).

    Saves parsing the header a second time and pydicom's per-call overhead (~0.5 ms a file).
    """
    form = _native_format(file)
    if form is None:
        return None
    pixels = np.empty(form.shape(matrix_of(file.fields)), dtype=form.dtype)
    if not _read_native(file, form, pixels):
        return None
    _correct_unused_bits(pixels, form.shift)
    return pixels


def _read_native_into(target: np.ndarray, group: list[_Frame], matrix: tuple[int, int]) -> bool:
    """Read the stored integers of ``group`` (single-frame files, all stored alike) into ``target`` (float32,
    (columns, rows, slices) as stored: any view), 16 slices at a time: each file's pixel data straight
    into a small band buffer, then the band cast and copied into place in tiles (``copy_tiled``). False
    unless every file is the plain case (``target`` is then to be filled by the pydicom path)."""
    forms = {_native_format(frame.file) if frame.frame_index is None else None for frame in group}
    if len(forms) != 1 or None in forms:
        return False
    (form,) = forms
    if form.frames != 1:
        return False
    band = np.empty((min(TILE_SLICES, len(group)), *matrix), dtype=form.dtype)
    for start in range(0, len(group), TILE_SLICES):
        part = band[:len(group) - start]
        for k, frame in enumerate(group[start:start + len(part)]):
            if not _read_native(frame.file, form, part[k]):
                return False
        _correct_unused_bits(part, form.shift)
        copy_tiled(target, part.transpose(2, 1, 0), start)
    return True


def _decode(file: DicomFile) -> np.ndarray:
    """Pixel data of one file as (frames, rows, columns), raw stored values."""
    pixels = _native_pixels(file)
    if pixels is not None:
        return pixels
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


def _frame_pixels(frame: _Frame, matrix: tuple[int, int], decoded: dict[Path, np.ndarray]) -> np.ndarray:
    """The stored values of one frame, its file decoded (``_decode``) once: a multi-frame file is kept in
    ``decoded`` for the other frames (and the other volumes of a split series)."""
    path = frame.file.path
    frames_decoded = decoded.get(path)
    if frames_decoded is None:
        frames_decoded = _decode(frame.file)
        if frame.frame_index is not None:
            decoded[path] = frames_decoded
    if (frame.frame_index or 0) >= len(frames_decoded):
        raise SeriesLoadError(f"{path.name}: decoded {len(frames_decoded)} frame(s), "
                              f"geometry lists frame {(frame.frame_index or 0) + 1}")
    pixels = frames_decoded[frame.frame_index or 0]
    if pixels.shape != matrix:
        raise SeriesLoadError(f"{path.name}: decoded {pixels.shape} pixels, header says {matrix[0]}x{matrix[1]}")
    return pixels


def _fill_decoded(target: np.ndarray, group: list[_Frame], matrix: tuple[int, int],
                  decoded: dict[Path, np.ndarray]) -> None:
    """Write the frames of ``group`` into ``target`` ((columns, rows, slices) as stored), each file decoded
    once (``_frame_pixels``), ``TILE_SLICES`` frames at a time."""
    for start in range(0, len(group), TILE_SLICES):
        band = np.stack([_frame_pixels(frame, matrix, decoded) for frame in group[start:start + TILE_SLICES]])
        copy_tiled(target, band.transpose(2, 1, 0), start)


def _is_mosaic(header: Dataset) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (get_value(header, "ImageType") or [])]


def _mosaic_volume(files: list[DicomFile]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """First volume of a series of Siemens mosaics (one file = one 3D volume), via nibabel."""
    with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental on import
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

    ordered = sorted(files, key=lambda f: (_number(get_value(f.fields, "AcquisitionNumber"), 0),
                                           _number(get_value(f.fields, "InstanceNumber"), 0)))
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


# Linux and the BSDs: an anonymous private mapping, its pages faulted in by the kernel in one call where it can.
_ANONYMOUS_FLAGS = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
                    if hasattr(mmap, "MAP_ANONYMOUS") else None)


def output_array(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array (zeros) in ordinary 4 KiB pages, for a loaded volume.

    numpy asks the kernel for transparent huge pages on every large array (``madvise``). Where memory is
    fragmented (a long-running server, or after a converter wrote a few hundred MB), each huge-page fault then
    waits on compaction: loading the 2,053-file benchmark folder took 0.27 s of system time one run and 0.71 s the
    next. An anonymous mapping without that advice costs the same every time, and ``MAP_POPULATE`` faults its
    pages in at once (0.19 s against 0.31 s for 512 MiB here; docs/io.md, "Speed").
    """
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0 or _ANONYMOUS_FLAGS is None:
        return np.empty(shape, dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, count * 4, flags=_ANONYMOUS_FLAGS), dtype=np.float32,
                         count=count).reshape(shape)


class Volume:
    """One volume of a series: its geometry from the headers, its voxels read on demand (``voxels``).

    ``affine`` maps the array axes as stored (0 = image columns, 1 = image rows, 2 = slices sorted along
    the normal) to RAS mm; ``shape`` is that array's shape.
    """

    def __init__(self, label: str, affine: np.ndarray, normal: np.ndarray, meta: dict, shape: tuple[int, int, int],
                 fill: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None]):
        self.label, self.affine, self.normal, self.meta, self.shape = label, affine, normal, meta, shape
        # fill(target) writes the stored values into ``target`` (float32, axes as stored) and returns the
        # per-slice (slopes, intercepts) still to apply, or None.
        self._fill = fill

    def voxels(self, lps: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(float32 C-contiguous array, affine): as stored, or reoriented to L,P,S (what
        ``orientation.reorient`` gives for the stored array).

        The output is allocated in its final order and filled through a view of it in the stored order,
        so the voxels are cast and reordered in one pass; then rescaled in place: value = stored * slope
        + intercept in float32, per slice (bit for bit ``stored.astype(float32) * float32(slope) +
        float32(intercept)``).
        """
        transform, affine = lps_transform(self.affine, self.shape) if lps else (None, self.affine)
        if transform is None:
            array = target = output_array(self.shape)
        else:
            shape = orientations.apply_orientation(np.broadcast_to(np.float32(0), self.shape), transform).shape
            array = output_array(shape)
            target = orientations.apply_orientation(array, inverse_transform(transform))
        rescale = self._fill(target)
        if rescale is not None:
            slopes, intercepts = rescale
            if (slopes == slopes[0]).all() and (intercepts == intercepts[0]).all():
                if slopes[0] != 1 or intercepts[0] != 0:
                    array *= slopes[0]
                    array += intercepts[0]
            else:  # per slice: along the stored slice axis, the last of ``target``
                target *= slopes
                target += intercepts
        return array, affine


def volumes(files: list[DicomFile], allow_single_slice: bool = False) -> list[Volume]:
    """The volumes of one series, checked from the headers; no voxel is read until ``Volume.voxels``.

    One volume unless repeated positions were split (its label then says e.g. ``"b=1000"``).
    """
    if _is_mosaic(files[0].series_header):
        array, affine, normal, meta = _mosaic_volume(files)  # nibabel unpacks geometry and voxels together
        _check_affine(affine)
        return [Volume("", affine, normal, meta, array.shape, lambda target: copy_tiled(target, array))]
    frames = [frame for file in files for frame in _frames_of(file)]
    _check_geometry(frames, allow_single_slice)
    normal = _normal(frames[0].orientation)
    found = []
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
                         or _number(get_value(group[0].file.series_header, "SpacingBetweenSlices"), 1.0))
            step = normal * float(thickness or 1.0)
        matrix = matrix_of(group[0].file.fields)  # the same for every frame (_check_geometry)
        row_spacing, column_spacing = group[0].pixel_spacing
        orientation = group[0].orientation
        affine_lps = np.eye(4)
        affine_lps[:3, 0] = orientation[:3] * column_spacing
        affine_lps[:3, 1] = orientation[3:] * row_spacing
        affine_lps[:3, 2] = step
        affine_lps[:3, 3] = group[0].position
        _check_affine(LPS_TO_RAS @ affine_lps)
        found.append(Volume(label, LPS_TO_RAS @ affine_lps, normal, meta, (matrix[1], matrix[0], len(group)),
                            partial(_fill_from_files, group, matrix, decoded)))
    return found


def _fill_from_files(group: list[_Frame], matrix: tuple[int, int], decoded: dict[Path, np.ndarray],
                     target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write the stored values of ``group`` into ``target`` ((columns, rows, slices) as stored); each slice's
    slope and intercept. Plain native files are read straight in; anything else is decoded file by file
    (pydicom), a band of slices at a time."""
    if not _read_native_into(target, group, matrix):
        _fill_decoded(target, group, matrix, decoded)
    return (np.array([frame.slope for frame in group], dtype=np.float32),
            np.array([frame.intercept for frame in group], dtype=np.float32))


def build_volume(files: list[DicomFile], allow_single_slice: bool = False
                 ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict]]:
    """Turn the files of one series into volumes.

    Returns a list of (label, array (X, Y, Z) float32, affine (4, 4) RAS, slice normal (3,) LPS, meta);
    one element unless repeated positions were split (label then says e.g. ``"b=1000"``).
    Array axes: 0 = image columns, 1 = image rows, 2 = slices sorted along the normal.
    """
    built = []
    for volume in volumes(files, allow_single_slice):
        array, affine = volume.voxels()
        built.append((volume.label, array, affine, volume.normal, volume.meta))
    return built


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
        file = read_file(path)
        if file is None:
            not_dicom.append(path)
            continue
        groups[file.series_uid].append(file)
    # The loader reads a series' name, description and order from its first file's pydicom header: make
    # sure that one reads (a file the lean reader took but pydicom refuses is not DICOM, as before).
    refused = set()
    for uid, files in list(groups.items()):
        while files:
            try:
                files[0].series_header  # noqa: B018 - read it now
                break
            except SeriesLoadError:
                refused.add(files.pop(0).path)
        if not files:
            del groups[uid]
    if refused:
        refused.update(not_dicom)
        not_dicom = [path for path in paths if path in refused]
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
    image_groups = {uid: group for uid, group in groups.items() if any(is_image(f.fields) for f in group)}
    if not image_groups:
        raise SeriesLoadError(f"{path}: DICOM object without image (SOP class "
                              f"{get_value(next(iter(groups.values()))[0].header, 'SOPClassUID', '?')})")
    if len(image_groups) > 1:
        raise SeriesLoadError(f"{path} holds {len(image_groups)} series; use load_study for several series")
    files_of_series = [f for f in next(iter(image_groups.values())) if is_image(f.fields)]
    _, array, affine, _, _ = build_volume(files_of_series, allow_single_slice=True)[0]
    return array, affine
