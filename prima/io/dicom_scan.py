"""A lean reader for DICOM headers: the few elements that grouping, geometry and pixel reading need,
parsed straight from the bytes, the functional groups of enhanced multi-frame objects included.

``pydicom.dcmread(..., stop_before_pixels=True)`` spends ~0.3 ms a file building a full ``Dataset``
(file meta validation, one object per element, lazy value conversion), and converting the dozen values
the loader reads costs another ~0.2 ms; an enhanced object's per-frame functional groups take ~70 ms
(Philips MPRAGE, 176 frames). dcm2niix reads a whole file in about the time of the first half.
``scan`` walks the element stream with ``struct`` and keeps only ``COLLECTED`` (and, inside the
functional groups, ``GROUP_SEQUENCES`` and ``MACRO_VALUES``), converted to exactly the values
``pydicom.Dataset.get`` returns for them (checked against pydicom on pydicom's, nibabel's and the
fuzzer's files in tests/io/test_fast_dicom.py).

It is an accelerator, never a second opinion: whatever is not the plain case (no preamble, big endian or
deflated transfer syntax, an element longer than the file or than its item, an unexpected VR, a value
pydicom would parse in any other way than ``float``/``int`` of a plain decimal string, a sequence it
cannot step over structurally) makes ``scan`` return None, and the caller reads the file with pydicom.
"""

from __future__ import annotations

import math
import os
import re
import struct
from functools import lru_cache

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword

# The elements kept, by keyword: at the top level; in the items of the functional group sequences (the macro
# sequences the loader reads); in the items of those (their values). Reading any other keyword from a
# ``FlatItem`` is a programming error (``NotCollected``), never a silent default.
COLLECTED = (
    "SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames", "InstanceNumber", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
    "SliceThickness", "RescaleSlope", "RescaleIntercept", "EchoNumbers", "EchoTime", "DiffusionBValue",
    "TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PhotometricInterpretation",
)
GROUP_SEQUENCES = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                   "PixelValueTransformationSequence", "MREchoSequence", "MRDiffusionSequence", "FrameContentSequence")
MACRO_VALUES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
                "RescaleIntercept", "EffectiveEchoTime", "DiffusionBValue", "TemporalPositionIndex", "StackID")
# Per nesting level: tag -> (keyword, VR); the items of a sequence kept at level n are read at level n + 1.
_LEVELS = (COLLECTED, GROUP_SEQUENCES, MACRO_VALUES)
_WANTED: tuple[dict[int, tuple[str, bytes]], ...] = tuple(
    {tag_for_keyword(keyword): (keyword, dictionary_VR(keyword).encode()) for keyword in level} for level in _LEVELS
)
_KEYWORDS = tuple(frozenset(level) for level in _LEVELS)
_NOTHING: dict[int, tuple[str, bytes]] = {}  # wanted in the items of a sequence only stepped over

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2); the others have a 2-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where pydicom's stop_before_pixels stops
PER_FRAME_GROUPS = 0x52009230  # (5200,9230) PerFrameFunctionalGroupsSequence
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16  # nested sequences read before giving up
_CHUNK = 8192  # bytes read at a time; the header of a synthetic file fits in the first, a scanner's in 1-4

# Plain decimal strings: float()/int() of such a part is exactly pydicom's DSfloat/IS value. Anything else
# (NaN, underscores, empty parts, ten or more digits for IS: pydicom turns those into floats) goes to pydicom.
_DECIMAL = re.compile(rb"[ ]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ ]*")
_DECIMALS = re.compile(_DECIMAL.pattern + rb"(?:\\" + _DECIMAL.pattern + rb")*")  # one or more, backslash-separated
_INTEGER = re.compile(rb"[ ]*[+-]?[0-9]{1,9}[ ]*")
_UID = re.compile(rb"[0-9.]*")
_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII without the backslash


class Unsupported(Exception):
    """Not the plain case: the caller reads the file with pydicom instead."""


class NotCollected(KeyError):
    """A keyword that is not collected at that level was read from a ``FlatItem`` (a bug in the caller)."""


class FlatItem:
    """The collected elements of one dataset (a file, or an item of a functional group sequence):
    ``get``/``in`` by keyword, with pydicom's values; a kept sequence is a ``FlatSequence`` of items."""

    __slots__ = ("values", "keywords")

    def __init__(self, values: dict[str, object], keywords: frozenset[str]):
        self.values = values
        self.keywords = keywords

    def get(self, keyword: str, default: object = None) -> object:
        if keyword not in self.keywords:
            raise NotCollected(keyword)
        return self.values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        if keyword not in self.keywords:
            raise NotCollected(keyword)
        return keyword in self.values


class FlatSequence(list):
    """The items (``FlatItem``) of a kept sequence: what pydicom's ``Sequence`` holds, reduced."""


class FlatHeader(FlatItem):
    """The collected top-level elements of a file, and how its data set is encoded.

    ``groups_last``: no element but the pixel data follows the per-frame functional groups (or there are
    none), so a header read up to them holds every other element.
    """

    __slots__ = ("transfer_syntax", "implicit", "groups_last")

    def __init__(self, values: dict[str, object], transfer_syntax: pydicom.uid.UID, implicit: bool,
                 groups_last: bool = True):
        super().__init__(values, _KEYWORDS[0])
        self.transfer_syntax = transfer_syntax
        self.implicit = implicit
        self.groups_last = groups_last


def _strings(raw: bytes) -> list[bytes]:
    """pydicom's multi-value split: trailing spaces and NULs dropped, then split at backslashes."""
    return raw.rstrip(b" \x00").split(b"\\")


def _single_or_list(values: list) -> object:
    return values[0] if len(values) == 1 else values


def _convert(vr: bytes, raw: bytes) -> object:
    """The value pydicom gives for a collected element, or Unsupported."""
    if not raw:
        return "" if vr in (b"UI", b"CS", b"SH") else None  # pydicom's empty values
    if vr == b"US":
        if len(raw) != 2:
            raise Unsupported
        return raw[0] | raw[1] << 8
    if vr == b"UL":
        if len(raw) != 4:
            raise Unsupported
        return int.from_bytes(raw, "little")
    if vr == b"SH":  # text: one printable ASCII value (any character set decodes it alike), trailing pad dropped
        value = raw.rstrip(b"\x00 ")
        if not _TEXT.fullmatch(value):
            raise Unsupported
        return value.decode("ascii")
    if vr == b"FD":
        if len(raw) != 8:
            raise Unsupported
        return struct.unpack("<d", raw)[0]
    if vr == b"DS":
        text = raw.rstrip(b" \x00")
        if not _DECIMALS.fullmatch(text):
            raise Unsupported
        values = [float(part) for part in text.split(b"\\")]
        if not all(math.isfinite(value) for value in values):
            raise Unsupported
        return _single_or_list(values)
    if vr == b"IS":
        parts = _strings(raw)
        if not all(_INTEGER.fullmatch(part) for part in parts):
            raise Unsupported
        return _single_or_list([int(part) for part in parts])
    if vr == b"UI":
        value = raw.rstrip(b"\x00 ")
        if not _UID.fullmatch(value):
            raise Unsupported
        return value.decode("ascii")
    if vr == b"CS":
        parts = _strings(raw)
        if not all(_TEXT.fullmatch(part) for part in parts):
            raise Unsupported
        return _single_or_list([part.decode("ascii") for part in parts])
    raise Unsupported


@lru_cache(maxsize=64)
def _syntax(uid: str) -> tuple[pydicom.uid.UID, bool]:
    """(UID, implicit VR) for a little-endian, non-deflated transfer syntax; Unsupported otherwise."""
    syntax = pydicom.uid.UID(uid)
    if not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax.is_deflated:
        raise Unsupported
    return syntax, syntax.is_implicit_VR


_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_IMPLICIT = struct.Struct("<HHL")  # group, element, 4-byte length (also item and delimiter tags)
_LENGTH = struct.Struct("<L")


class _Reader:
    """Random access to the file through one window of bytes, refilled on demand."""

    def __init__(self, fp, size: int):
        self.fp = fp
        self.size = size
        self.base = 0
        self.buf = fp.read(_CHUNK)
        self.per_frame_seen = False  # the top-level walk met the per-frame functional groups...
        self.after_per_frame = False  # ...and another element after them

    def window(self, pos: int, n: int) -> tuple[bytes, int]:
        """(buffer, index of ``pos`` in it) holding at least ``n`` bytes from ``pos``; Unsupported past the end."""
        if pos + n > self.size:
            raise Unsupported
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.fp.seek(pos)
            buf = b""
            while len(buf) < max(n, _CHUNK) and pos + len(buf) < self.size:  # a raw read may return less
                more = self.fp.read(max(n, _CHUNK) - len(buf))
                if not more:
                    break
                buf += more
            self.buf, self.base = buf, pos
            if len(buf) < n:
                raise Unsupported
        return self.buf, pos - self.base

    def element(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None for implicit, value length, header length) of the element at ``pos``."""
        buf, i = self.window(pos, 8)
        if implicit:
            group, number, length = _IMPLICIT.unpack_from(buf, i)
            return group << 16 | number, None, length, 8
        group, number, vr, length = _EXPLICIT.unpack_from(buf, i)
        if vr not in _VRS:
            raise Unsupported
        if vr in _LONG_VRS:
            buf, i = self.window(pos, 12)
            return group << 16 | number, vr, _LENGTH.unpack_from(buf, i + 8)[0], 12
        return group << 16 | number, vr, length, 8

    def looks_explicit(self, pos: int) -> bool:
        """pydicom's test of the first element of a dataset: two capital letters where an explicit VR goes."""
        buf, i = self.window(pos, 6)
        return 0x40 < buf[i + 4] < 0x5B and 0x40 < buf[i + 5] < 0x5B

    def skip_undefined(self, pos: int, tag: int, vr: bytes | None, implicit: bool, depth: int) -> int:
        """Position after an undefined-length value starting at ``pos``: only a sequence is stepped over."""
        if tag >> 16 == 0xFFFE or not self.is_sequence(tag, vr, implicit):
            raise Unsupported
        return self.sequence(pos, _UNDEFINED, implicit, depth, None)[1]

    @staticmethod
    def is_sequence(tag: int, vr: bytes | None, implicit: bool) -> bool:
        if not implicit:
            return vr == b"SQ"
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:  # private or unknown: pydicom guesses; leave it to pydicom
            return False

    def sequence(self, start: int, length: int, implicit: bool, depth: int, level: int | None
                 ) -> tuple[FlatSequence, int]:
        """The items of a sequence value at ``start`` (defined or undefined ``length``), read at ``level``
        (None: stepped over), and the position after the value."""
        if depth > _MAX_DEPTH:
            raise Unsupported
        items = FlatSequence()
        end = None if length == _UNDEFINED else start + length
        if end is not None and end > self.size:
            raise Unsupported
        pos = start
        while True:
            if end is not None and pos >= end:
                if pos > end:
                    raise Unsupported  # an item runs past its sequence
                return items, pos
            item, _, item_length, _ = self.element(pos, True)  # item tags are always 4 + 4 bytes
            pos += 8
            if item == _SEQUENCE_END:
                if end is not None or item_length:
                    raise Unsupported
                return items, pos
            if item != _ITEM:
                raise Unsupported
            if level is None and item_length != _UNDEFINED:
                pos += item_length
                continue
            found: dict[str, object] = {}
            if item_length == _UNDEFINED:
                pos = self.walk(pos, implicit, depth + 1, found, level, end_tag=_ITEM_END)
            else:
                pos = self.walk(pos, implicit, depth + 1, found, level, end=pos + item_length)
            if level is not None:
                items.append(FlatItem(found, _KEYWORDS[level]))

    def walk(self, pos: int, implicit: bool, depth: int, found: dict[str, object], level: int | None,
             end_tag: int | None = None, end: int | None = None) -> int:
        """Step over the elements of a dataset from ``pos``, keeping those wanted at ``level`` in ``found``
        (converted; None: keep nothing).

        The top level (no ``end_tag``, no ``end``) stops at the pixel data element, or at the end of the
        file, and returns that position; an item stops after its delimiter (``end_tag``) or exactly at
        ``end`` (defined length) and returns the position after it.
        """
        top = end_tag is None and end is None
        size = self.size
        stop = size if end is None else end
        if stop > size:
            raise Unsupported
        if implicit and pos < stop and self.looks_explicit(pos):
            raise Unsupported  # pydicom would switch encodings here
        wanted = _NOTHING if level is None else _WANTED[level]
        while True:
            if pos == stop and end_tag is None:
                return pos
            buf, i = self.buf, pos - self.base
            if i < 0 or i + 12 > len(buf):  # not in the window: refill (the call costs more than the test)
                buf, i = self.window(pos, 12 if pos + 12 <= size else 8)
            group, number, length = _IMPLICIT.unpack_from(buf, i)
            tag = group << 16 | number
            if group == 0xFFFE:  # delimiters have no VR in either encoding
                if tag == end_tag:
                    return pos + 8
                raise Unsupported  # an item or delimiter where an element belongs
            if implicit:
                vr, header = None, 8
            else:
                vr = buf[i + 4:i + 6]
                if vr in _LONG_VRS:
                    if i + 12 > len(buf):
                        raise Unsupported
                    length, header = _LENGTH.unpack_from(buf, i + 8)[0], 12
                elif vr in _VRS:
                    length, header = length >> 16, 8
                else:
                    raise Unsupported
            if top:
                if tag in _PIXEL_TAGS:
                    return pos
                if self.per_frame_seen:
                    self.after_per_frame = True
                elif tag == PER_FRAME_GROUPS:
                    self.per_frame_seen = True
            start = pos + header
            keep = wanted.get(tag)
            if keep is not None and keep[1] == b"SQ":
                if not self.is_sequence(tag, vr, implicit):
                    raise Unsupported
                found[keep[0]], pos = self.sequence(start, length, implicit, depth, level + 1)
            elif length == _UNDEFINED:
                if keep is not None:
                    raise Unsupported
                pos = self.skip_undefined(start, tag, vr, implicit, depth)
            else:
                pos = start + length
                if keep is not None:
                    if vr is not None and vr != keep[1]:
                        raise Unsupported
                    if pos > stop:
                        raise Unsupported
                    if pos <= self.base + len(buf):
                        raw = buf[i + header:i + header + length]
                    else:
                        value, j = self.window(start, length)
                        raw = value[j:j + length]
                    found[keep[0]] = _convert(keep[1], raw)
            if pos > stop:
                raise Unsupported  # past the end of the file (pydicom defers such a value) or of the item


def scan(path: str | os.PathLike) -> tuple[FlatHeader, int] | None:
    """The collected elements of a file and the offset of its pixel data element (the file size when it
    has none), or None when the file is not the plain case (see the module docstring)."""
    try:
        with open(path, "rb", buffering=0) as fp:
            reader = _Reader(fp, os.fstat(fp.fileno()).st_size)
            buf, _ = reader.window(0, 132)
            if buf[128:132] != b"DICM":
                return None
            pos, syntax = 132, None
            while True:  # file meta: explicit VR little endian, group 0002
                buf, i = reader.window(pos, 4)
                if buf[i:i + 2] != b"\x02\x00":
                    break
                tag, _, length, header = reader.element(pos, False)
                if length == _UNDEFINED:
                    return None
                if tag == 0x00020010:
                    value_buf, j = reader.window(pos + header, length)
                    syntax = value_buf[j:j + length].rstrip(b"\x00 ").decode("ascii")
                pos += header + length
            if syntax is None:
                return None
            transfer_syntax, implicit = _syntax(syntax)
            found: dict[str, object] = {}
            pixel_offset = reader.walk(pos, implicit, 0, found, 0)
            return FlatHeader(found, transfer_syntax, implicit, not reader.after_per_frame), pixel_offset
    except (Unsupported, OSError, ValueError, struct.error):
        return None
