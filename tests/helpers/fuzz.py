"""Property-based fuzzing of the study loaders: seeds, mutation strategies and the "run one case" check.

Shared by ``tests/io/test_fuzz_loaders.py`` (a few hundred fixed-seed cases) and
``benchmarks/bench_fuzz.py`` (thousands), so both try the same mutations and judge them the same way.

A case is a small valid seed study (a DICOM series or a NIfTI file, kept as bytes) plus a few
mutations: raw byte damage, DICOM elements deleted or rewritten with hostile values or VRs, files
dropped or duplicated, NIfTI header fields set to absurd values. The property (``run_case``): each
loader entry point either returns a usable result (float32 3D arrays, finite invertible affines; for
``load_study`` also finite voxels) or raises a ``prima.errors.StudyLoadError`` subclass. Anything
else is a failure: another exception type, a run past the time bound, or an attempt to allocate
more memory than the per-case budget.

Bounds, and why these:
- time: a wall-clock ``SIGALRM`` timer raising ``CaseTimeout``, a ``BaseException`` so that prima's
  ``except Exception`` blocks cannot swallow it. Hypothesis' ``deadline`` only measures an example
  after it finished (a hang never finishes) and flakes on a shared CPU, so callers disable it. The
  timer saved and restored around each case, so pytest-timeout's own SIGALRM timer keeps working.
- memory: the soft ``RLIMIT_AS`` is lowered to the current address space plus a budget for the
  duration of the case, so a declared 4096^3 volume fails to allocate instead of exhausting the
  machine. The resulting ``MemoryError`` counts as a failure even when prima wrapped it into a
  ``StudyLoadError`` (found in the exception chain or in a skipped series' reason): the loader tried.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import resource
import signal
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import pydicom
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from helpers.studies import PYDICOM_FILES, rewrite_at_positions
from prima.errors import StudyLoadError
from prima.io import load_study, read_dicom, read_nifti, write_dicom_series

DEFAULT_TIME_LIMIT_S = 5.0  # a valid seed loads in ~20 ms; 250x that on a busy 2-core machine is a hang
DEFAULT_MEMORY_BUDGET = 1 << 30  # address space a case may add; seeds need a few MB


# --------------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    """A valid study as file bytes: ``kind`` is "dicom" (one series) or "nifti" (one file)."""

    name: str
    kind: str
    files: tuple[tuple[str, bytes], ...]


def _folder_bytes(folder: Path) -> tuple[tuple[str, bytes], ...]:
    return tuple((p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file())


def _enhanced_mr_bytes() -> bytes:
    """A 4-frame 16x16 Enhanced MR object: exercises the functional-group path of the reader."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesDescription = "MR", "FUZZ ENHANCED"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    ds.NumberOfFrames = 4
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, orientation, transform, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], 3.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 0.5, -10, "US"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in (2, 0, 3, 1):  # listed out of position order on purpose
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-10.0, -12.0, 3.0 * k]
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = np.random.default_rng(3).integers(0, 4000, size=(4, 16, 16)).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, slope: float | None, gz: bool) -> bytes:
    image = nib.Nifti1Image(array, affine)
    if slope is not None:
        image.header.set_slope_inter(slope, 10.0)
    with tempfile.TemporaryDirectory(prefix="prima-fuzz-seed-") as tmp:
        path = Path(tmp) / ("image.nii.gz" if gz else "image.nii")
        nib.save(image, path)
        return path.read_bytes()


@lru_cache(maxsize=1)
def seeds() -> dict[str, Seed]:
    """The seed studies, built once per process (deterministic bytes)."""
    rng = np.random.default_rng(0)
    out: dict[str, Seed] = {}
    with tempfile.TemporaryDirectory(prefix="prima-fuzz-seed-") as tmp:
        root = Path(tmp)
        volume = rng.normal(300.0, 80.0, size=(32, 32, 6)).astype(np.float32)  # float: slope/intercept written
        affine = np.array([[-0.9, 0.0, 0.0, 14.0], [0.0, 0.9, 0.1, -20.0], [0.0, -0.05, 3.0, -8.0], [0, 0, 0, 1]])
        write_dicom_series(volume, affine, root / "series", series_description="FUZZ AX", uid_seed="fuzz",
                           through_axis=2)
        out["dicom-series"] = Seed("dicom-series", "dicom", _folder_bytes(root / "series"))
        rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", root / "mr_small", [0.0, 1.5, 3.0, 4.5])
        out["dicom-mr-small"] = Seed("dicom-mr-small", "dicom", _folder_bytes(root / "mr_small"))
    out["dicom-enhanced"] = Seed("dicom-enhanced", "dicom", (("enhanced.dcm", _enhanced_mr_bytes()),))
    oblique = np.array([[0.0, 0.0, 2.0, -20.0], [1.1, 0.1, 0.0, -30.0], [0.0, 1.1, 0.0, -10.0], [0, 0, 0, 1]])
    out["nifti-float"] = Seed("nifti-float", "nifti", (("image.nii", _nifti_bytes(
        rng.normal(size=(16, 16, 8)).astype(np.float32), oblique, None, gz=False)),))
    out["nifti-int-gz"] = Seed("nifti-int-gz", "nifti", (("image.nii.gz", _nifti_bytes(
        rng.integers(-500, 2000, size=(16, 12, 6)).astype(np.int16), np.diag([1.0, 1.2, 4.0, 1.0]), 0.5,
        gz=True)),))
    return out


DICOM_SEEDS = ("dicom-series", "dicom-mr-small", "dicom-enhanced")
NIFTI_SEEDS = ("nifti-float", "nifti-int-gz")


# ----------------------------------------------------------------------------------------- mutations


Files = dict[str, bytes]


def _pick(files: Files, index: int) -> str:
    names = sorted(files)
    return names[index % len(names)]


def _gunzipped(name: str, data: bytes) -> bool:
    return name.lower().endswith(".gz") and data[:2] == b"\x1f\x8b"


@dataclass(frozen=True)
class ByteMutation:
    """Raw damage to one file: flip bits, overwrite, truncate at, or insert at ``offset`` (mod length).

    ``inner``: for a .nii.gz, damage the decompressed payload (then recompress) instead of the gzip stream.
    """

    file: int
    op: str  # "flip" | "overwrite" | "truncate" | "insert"
    offset: int
    data: bytes
    inner: bool = False

    def apply(self, files: Files) -> Files:
        name = _pick(files, self.file)
        data = files[name]
        wrapped = self.inner and _gunzipped(name, data)
        if wrapped:
            try:
                data = gzip.decompress(data)
            except Exception:  # noqa: BLE001 - already damaged by an earlier mutation: leave it
                return files
        buf = bytearray(data)
        at = self.offset % (len(buf) + 1)
        if self.op == "flip":
            for i, byte in enumerate(self.data or b"\x01"):
                if at + i < len(buf):
                    buf[at + i] ^= byte or 0x80
        elif self.op == "overwrite":
            buf[at:at + len(self.data)] = self.data
        elif self.op == "truncate":
            del buf[at:]
        else:
            buf[at:at] = self.data
        out = bytes(buf)
        return {**files, name: gzip.compress(out, mtime=0) if wrapped else out}

    def __str__(self) -> str:
        where = " (inside gzip)" if self.inner else ""
        return f"bytes {self.op} file#{self.file} @{self.offset}{where} {self.data[:16]!r}"


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    """``ds``, its file meta and every dataset nested in its sequences, depth first."""
    yield ds
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield meta
    for tag in list(ds.keys()):
        if ds.get_item(tag).VR != "SQ":  # raw VR: other elements stay unparsed (an earlier mutation may
            continue                     # have left a value pydicom cannot convert)
        try:
            items = ds[tag].value
        except Exception:  # noqa: BLE001 - a garbled sequence: nothing to walk into
            continue
        for item in items:
            yield from _datasets(item)


def _read(data: bytes) -> Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 - damaged by an earlier mutation
        return None


def _write(ds: Dataset) -> bytes | None:
    buffer = io.BytesIO()
    try:
        with pydicom.config.disable_value_validation():
            ds.save_as(buffer, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - pydicom cannot write this combination; the mutation is a no-op
        return None
    return buffer.getvalue()


@dataclass(frozen=True)
class TagMutation:
    """Delete a DICOM element, or replace its value by raw bytes (optionally under another VR).

    Applied to every file of the series (``file`` None) or one file, and to every occurrence of the
    keyword (top level, file meta, functional-group items) or only the ``occurrence``-th one. A ``set``
    of a keyword that is absent adds it at the top level.
    """

    keyword: str
    action: str  # "delete" | "set"
    raw: bytes = b""
    vr: str | None = None  # None: the dictionary VR
    file: int | None = None
    occurrence: int | None = None

    def apply(self, files: Files) -> Files:
        names = sorted(files) if self.file is None else [_pick(files, self.file)]
        out = dict(files)
        tag = Tag(tag_for_keyword(self.keyword))
        for name in names:
            ds = _read(files[name])
            if ds is None:
                continue
            try:
                holders = [d for d in _datasets(ds) if tag in d]
            except Exception:  # noqa: BLE001 - unparseable after earlier damage: leave the file as it is
                continue
            if self.occurrence is not None and holders:
                holders = [holders[self.occurrence % len(holders)]]
            if self.action == "set" and not holders:
                holders = [ds.file_meta if tag.group == 2 and hasattr(ds, "file_meta") else ds]
            for holder in holders:
                if self.action == "delete":
                    del holder[tag]
                else:
                    raw = self.raw + (b" " if len(self.raw) % 2 else b"")
                    vr = self.vr or dictionary_VR(tag)
                    holder[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
            written = _write(ds)
            if written is not None:
                out[name] = written
        return out

    def __str__(self) -> str:
        where = "all files" if self.file is None else f"file#{self.file}"
        which = "" if self.occurrence is None else f" occurrence {self.occurrence}"
        if self.action == "delete":
            return f"delete {self.keyword} ({where}{which})"
        return f"set {self.keyword} = {self.raw!r} as {self.vr or 'dictionary VR'} ({where}{which})"


@dataclass(frozen=True)
class FileMutation:
    """Drop one file of a series, or add a byte-identical copy of it under another name."""

    op: str  # "drop" | "duplicate"
    file: int

    def apply(self, files: Files) -> Files:
        name = _pick(files, self.file)
        if self.op == "drop":
            if len(files) == 1:
                return files  # an empty folder is a different, already tested, case
            return {k: v for k, v in files.items() if k != name}
        return {**files, f"copy_of_{name}": files[name]}

    def __str__(self) -> str:
        return f"{self.op} file#{self.file}"


_NIFTI_DTYPE = nib.nifti1.header_dtype


@dataclass(frozen=True)
class NiftiFieldMutation:
    """Set one NIfTI-1 header field (or one element of an array field) to a raw value, unchecked."""

    field: str
    index: int | None
    value: object

    def apply(self, files: Files) -> Files:
        out = dict(files)
        for name, data in files.items():
            gz = _gunzipped(name, data)
            try:
                payload = bytearray(gzip.decompress(data) if gz else data)
            except Exception:  # noqa: BLE001 - already damaged
                continue
            if len(payload) < _NIFTI_DTYPE.itemsize:
                continue
            header = np.frombuffer(bytes(payload[:_NIFTI_DTYPE.itemsize]), dtype=_NIFTI_DTYPE).copy()
            kind = header.dtype[self.field]
            target = header[self.field]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = kind.base
                value = np.asarray(self.value).astype(base) if base.kind in "iuf" else self.value
                if self.index is None:
                    header[self.field] = value
                else:
                    target[0][self.index % kind.shape[0]] = value
                    header[self.field] = target
            payload[:_NIFTI_DTYPE.itemsize] = header.tobytes()
            out[name] = gzip.compress(bytes(payload), mtime=0) if gz else bytes(payload)
        return out

    def __str__(self) -> str:
        index = "" if self.index is None else f"[{self.index}]"
        return f"nifti {self.field}{index} = {self.value!r}"


Mutation = ByteMutation | TagMutation | FileMutation | NiftiFieldMutation


@dataclass(frozen=True)
class Case:
    """A seed and the mutations applied to it, in order."""

    seed: str
    mutations: tuple[Mutation, ...]

    def files(self) -> Files:
        files = dict(seeds()[self.seed].files)
        with warnings.catch_warnings():  # pydicom and nibabel warn about the values we plant on purpose
            warnings.simplefilter("ignore")
            for mutation in self.mutations:
                files = mutation.apply(files)
        return files

    def __str__(self) -> str:
        return f"{self.seed}: " + "; ".join(map(str, self.mutations))


# ---------------------------------------------------------------------------------------- strategies

# Numbers and text that break parsers: empty, non-numeric, NaN/Inf, overflow, wrong multiplicity.
TEXT_VALUES = (b"", b"abc", b"nan", b"NaN\\nan", b"inf", b"-inf", b"1e309", b"-1e309", b"0", b"-0", b"-1", b"1e-300",
               b"99999999999999999999", b"2147483648", b"1\\2", b"1\\2\\3\\4\\5\\6\\7", b"\x00\xff\xfe", b"0\\0",
               b"-1\\-1", b"nan\\1", b"0\\0\\0", b"nan\\nan\\nan", b"1e308\\1e308\\1e308", b"0\\0\\0\\0\\0\\0",
               b"1\\0\\0\\1\\0\\0", b"1\\0\\0\\0.7\\0.7\\0", b"nan\\0\\0\\0\\1\\0", b"1\\0\\0\\0\\1",
               b"4096", b"65536", b"1.2.3", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"LOCALIZER",
               b"ORIGINAL\\PRIMARY\\MOSAIC", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.2")
# Little-endian binary values: 16- and 32-bit extremes, odd bit depths, wrong lengths.
BINARY_VALUES = tuple(np.array(v, dtype="<u2").tobytes() for v in (0, 1, 2, 3, 7, 8, 12, 17, 24, 32, 33, 64, 4096,
                                                                 65535)) + (
    np.array(2**31 - 1, dtype="<u4").tobytes(), np.array(2**32 - 1, dtype="<u4").tobytes(), b"\x01",
    b"\x10\x00\x10\x00", b"\x00\x00\x00", np.array([0.0, np.nan], dtype="<f8").tobytes())
KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
            "RescaleIntercept", "InstanceNumber", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "SeriesNumber",
            "SeriesDescription", "ImageType", "PixelData", "PerFrameFunctionalGroupsSequence",
            "SharedFunctionalGroupsSequence", "PlanePositionSequence", "PixelMeasuresSequence", "EchoTime",
            "EchoNumbers", "AcquisitionNumber", "TemporalPositionIdentifier", "TriggerTime", "TransferSyntaxUID",
            "StudyDescription", "SmallestImagePixelValue", "LargestImagePixelValue")
WRONG_VRS = ("LO", "DS", "IS", "US", "SS", "UL", "FD", "OB", "OW", "UN", "SQ", "CS", "UI")

_offsets = st.one_of(st.integers(0, 2048), st.integers(0, 1 << 20))  # biased towards the header
_chunks = st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(TEXT_VALUES + BINARY_VALUES))


def byte_mutations(allow_inner: bool = False) -> st.SearchStrategy[ByteMutation]:
    return st.builds(ByteMutation, file=st.integers(0, 7),
                     op=st.sampled_from(("flip", "overwrite", "truncate", "insert")),
                     offset=_offsets, data=_chunks, inner=st.booleans() if allow_inner else st.just(False))


def tag_mutations() -> st.SearchStrategy[TagMutation]:
    where = st.one_of(st.none(), st.integers(0, 7))
    occurrence = st.one_of(st.none(), st.integers(0, 7))
    delete = st.builds(TagMutation, keyword=st.sampled_from(KEYWORDS), action=st.just("delete"), file=where,
                       occurrence=occurrence)
    values = st.one_of(st.sampled_from(TEXT_VALUES), st.sampled_from(BINARY_VALUES), st.binary(max_size=24))
    set_value = st.builds(TagMutation, keyword=st.sampled_from(KEYWORDS), action=st.just("set"), raw=values,
                          vr=st.one_of(st.none(), st.none(), st.sampled_from(WRONG_VRS)), file=where,
                          occurrence=occurrence)
    return st.one_of(delete, set_value)


def file_mutations() -> st.SearchStrategy[FileMutation]:
    return st.builds(FileMutation, op=st.sampled_from(("drop", "duplicate")), file=st.integers(0, 7))


_INT_VALUES = (0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 255, 4096, 32767, -32768, 65535, 2**31 - 1)
_FLOAT_VALUES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), float("-inf"), 352.0,
                 353.0, 1e10, -352.0)
_DATATYPES = (0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999, -4)
_NIFTI_FIELDS = {  # field -> (array length or None, value strategy)
    "sizeof_hdr": (None, st.sampled_from((348, 0, 540, -348, 1 << 24))),
    "dim": (8, st.sampled_from(_INT_VALUES)),
    "pixdim": (8, st.sampled_from(_FLOAT_VALUES)),
    "datatype": (None, st.sampled_from(_DATATYPES)),
    "bitpix": (None, st.sampled_from((0, 1, 8, 16, 32, 64, 128, 7, -8))),
    "vox_offset": (None, st.sampled_from(_FLOAT_VALUES)),
    "scl_slope": (None, st.sampled_from(_FLOAT_VALUES)),
    "scl_inter": (None, st.sampled_from(_FLOAT_VALUES)),
    "qform_code": (None, st.sampled_from((0, 1, 2, 3, 4, 5, -1, 100))),
    "sform_code": (None, st.sampled_from((0, 1, 2, 3, 4, 5, -1, 100))),
    "quatern_b": (None, st.sampled_from(_FLOAT_VALUES)),
    "quatern_c": (None, st.sampled_from(_FLOAT_VALUES)),
    "quatern_d": (None, st.sampled_from(_FLOAT_VALUES)),
    "qoffset_x": (None, st.sampled_from(_FLOAT_VALUES)),
    "srow_x": (4, st.sampled_from(_FLOAT_VALUES)),
    "srow_y": (4, st.sampled_from(_FLOAT_VALUES)),
    "srow_z": (4, st.sampled_from(_FLOAT_VALUES)),
    "dim_info": (None, st.sampled_from((0, 255, 57))),
    "magic": (None, st.sampled_from((b"n+1", b"ni1", b"n+2", b"xyz", b""))),
}


def nifti_mutations() -> st.SearchStrategy[NiftiFieldMutation]:
    def build(name: str) -> st.SearchStrategy[NiftiFieldMutation]:
        length, values = _NIFTI_FIELDS[name]
        index = st.just(None) if length is None else st.integers(0, length - 1)
        return st.builds(NiftiFieldMutation, field=st.just(name), index=index, value=values)

    return st.sampled_from(sorted(_NIFTI_FIELDS)).flatmap(build)


FAMILIES = ("bytes", "tags", "files", "nifti")


def keep_hypothesis_out_of_the_repo() -> None:
    """Point Hypothesis' storage (its source-constants cache is written even with ``database=None``) at a
    temporary folder removed at exit, instead of ``.hypothesis/`` in the working directory."""
    from hypothesis.configuration import set_hypothesis_home_dir

    global _HYPOTHESIS_HOME
    if _HYPOTHESIS_HOME is None:
        _HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="prima-hypothesis-")
        set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)


_HYPOTHESIS_HOME: tempfile.TemporaryDirectory | None = None


def cases(seed_names: tuple[str, ...], families: tuple[str, ...] = FAMILIES, max_mutations: int = 4
          ) -> st.SearchStrategy[Case]:
    """Cases on ``seed_names`` with 1..``max_mutations`` mutations from ``families`` that fit the seed kind."""

    def for_seed(name: str) -> st.SearchStrategy[Case]:
        kind = seeds()[name].kind
        options = []
        if "bytes" in families:
            options.append(byte_mutations(allow_inner=kind == "nifti"))
        if kind == "dicom" and "tags" in families:
            options.append(tag_mutations())
        if kind == "dicom" and "files" in families:
            options.append(file_mutations())
        if kind == "nifti" and "nifti" in families:
            options.append(nifti_mutations())
        mutation = st.one_of(*options)
        return st.lists(mutation, min_size=1, max_size=max_mutations).map(lambda ms: Case(name, tuple(ms)))

    return st.sampled_from(seed_names).flatmap(for_seed)


# ------------------------------------------------------------------------------------------- running


class CaseTimeout(BaseException):
    """Raised by the per-case timer; a BaseException so no ``except Exception`` in prima can swallow it."""


def _raise_timeout(signum: int, frame: object) -> None:
    raise CaseTimeout()


def _address_space() -> int | None:
    """This process' virtual memory size in bytes (Linux), None where /proc is not available."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


@contextlib.contextmanager
def bounded(time_limit_s: float, memory_budget: int) -> Iterator[None]:
    """Run the body under a wall-clock timer and an address-space cap, restoring both afterwards."""
    import threading

    use_timer = threading.current_thread() is threading.main_thread()
    if use_timer:
        old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    start = time.monotonic()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _address_space()
    if current is not None:
        cap = current + memory_budget
        for limit in (soft, hard):
            if limit != resource.RLIM_INFINITY:
                cap = min(cap, limit)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if use_timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:  # give an outer timer (pytest-timeout) back what it had left
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3), old_interval)


@dataclass
class CallOutcome:
    """What one loader entry point did: ``status`` "ok" | "error" (a StudyLoadError) | "failure"."""

    entry: str
    status: str
    label: str  # "loaded", the error class name, or the failure kind
    detail: str = ""


@dataclass
class CaseOutcome:
    case: Case
    calls: list[CallOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[CallOutcome]:
        return [c for c in self.calls if c.status == "failure"]

    @property
    def label(self) -> str:
        """``load_study``'s outcome: "loaded" or the error class name."""
        return self.calls[0].label

    def report(self) -> str:
        lines = [f"case {self.case}"]
        lines += [f"  {c.entry}: {c.label}\n    " + c.detail.replace("\n", "\n    ") for c in self.failures]
        return "\n".join(lines)


_MEMORY_WORDS = ("MemoryError", "Unable to allocate", "Cannot allocate memory", "cannot allocate")


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _check_volume(array: object, affine: object, require_finite: bool) -> str | None:
    """Why (array, affine) is not a usable volume, or None."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        return f"array is {type(array).__name__} {getattr(array, 'dtype', '')}, not float32"
    if array.ndim != 3 or array.size == 0:
        return f"array shape {array.shape} is not a non-empty 3D volume"
    if require_finite and not np.isfinite(array).all():
        return "array holds NaN/Inf"
    affine = np.asarray(affine)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return f"affine is not a finite 4x4 matrix: {affine.tolist()}"
    with np.errstate(all="ignore"):
        determinant = np.linalg.det(affine[:3, :3])
        try:
            inverse = np.linalg.inv(affine)
        except np.linalg.LinAlgError:
            inverse = np.full((4, 4), np.nan)
    if not (np.isfinite(determinant) and determinant != 0 and np.isfinite(inverse).all()):
        return f"affine is not invertible: {affine.tolist()}"
    return None


def _check_study(study: object) -> str | None:
    series = getattr(study, "series", None)
    if not series:
        return "load_study returned no series without raising"
    for item in series:
        problem = _check_volume(item.array, item.affine, require_finite=True)
        if problem:
            return f"series {item.name!r}: {problem}"
        if item.plane not in ("axial", "coronal", "sagittal"):
            return f"series {item.name!r}: plane {item.plane!r}"
    for skipped in study.skipped:
        if any(word in skipped.reason for word in _MEMORY_WORDS):
            return f"memory: skipped series {skipped.name!r} ran out of the per-case budget: {skipped.reason}"
    return None


def _call(entry: str, function: Callable[[], object], check: Callable[[object], str | None],
          time_limit_s: float, memory_budget: int) -> CallOutcome:
    try:
        with warnings.catch_warnings(), bounded(time_limit_s, memory_budget):
            warnings.simplefilter("ignore")
            result = function()
    except CaseTimeout:
        return CallOutcome(entry, "failure", "timeout", f"did not finish within {time_limit_s:g} s\n"
                           + "".join(traceback.format_exc(limit=-8)))
    except StudyLoadError as error:
        if any(isinstance(e, MemoryError) for e in _chain(error)) or any(w in str(error) for w in _MEMORY_WORDS):
            return CallOutcome(entry, "failure", "memory", "a MemoryError was wrapped into "
                               f"{type(error).__name__}: tried to allocate beyond the budget\n"
                               + "".join(traceback.format_exception(error, limit=-6)))
        return CallOutcome(entry, "error", type(error).__name__, str(error)[:300])
    except BaseException as error:  # noqa: BLE001 - the property: nothing else may escape
        if isinstance(error, KeyboardInterrupt):
            raise
        label = "memory" if isinstance(error, MemoryError) else f"exception {type(error).__name__}"
        return CallOutcome(entry, "failure", label, "".join(traceback.format_exception(error, limit=-6)))
    problem = check(result)
    if problem:
        return CallOutcome(entry, "failure", "memory" if problem.startswith("memory") else "invalid result", problem)
    return CallOutcome(entry, "ok", "loaded")


def write_files(files: Files, folder: Path) -> Path:
    """Write a case's files into ``folder`` (created); the folder."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def run_case(case: Case, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
             memory_budget: int = DEFAULT_MEMORY_BUDGET) -> CaseOutcome:
    """Write the mutated study to a fresh folder and load it with ``load_study`` and the format's reader."""
    start = time.monotonic()
    outcome = CaseOutcome(case)
    files = case.files()
    kind = seeds()[case.seed].kind
    with tempfile.TemporaryDirectory(prefix="prima-fuzz-") as tmp:
        folder = write_files(files, Path(tmp) / "study")
        bounds = (time_limit_s, memory_budget)
        outcome.calls.append(_call("load_study", lambda: load_study(folder), _check_study, *bounds))
        if kind == "dicom":
            outcome.calls.append(_call("read_dicom", lambda: read_dicom(folder),
                                       lambda r: _check_volume(*r, require_finite=False), *bounds))
        else:
            for name in sorted(files):
                path = folder / name
                outcome.calls.append(_call(f"read_nifti({name})", lambda: read_nifti(path),
                                           lambda r: _check_volume(*r, require_finite=False), *bounds))
    outcome.seconds = time.monotonic() - start
    return outcome

