"""``prima.export``: an explanation and a prediction as DICOM objects a PACS or a DICOM viewer opens over
the series they came from (docs/explain.md, "DICOM outputs").

    from prima.export import export_dicom
    written = export_dicom("out/dicom", "study.zip", study.series[i], explanation, tokens.series[i], prediction)

Three objects, written with ``highdicom``, all on the **source** series' own grid (one frame per source
slice, each frame at its slice's ImagePositionPatient / ImageOrientationPatient, referencing its
SOPInstanceUID, the series' FrameOfReferenceUID and the StudyInstanceUID):

- a **Parametric Map** (``parametric_map.dcm``): the LIME heatmap as float32 weights with a real-world
  value mapping (unitless LIME weight), resampled from the preprocessed grid onto the source slices;
- a **Segmentation** (``segmentation.dcm``): the top-k LIME tokens, one binary segment per rank;
- a **Comprehensive SR** (``report.dcm``, a basic diagnostic imaging report, TID 2000 style): the
  diagnoses above threshold, the top of the differential with probabilities, the priority tier, the
  referrals, the model and its revision, the explanation and a research-use statement.

Identity: by default the patient and study modules are copied from the source (so a PACS files the
objects with the study). ``deidentify=True`` replaces every identifier and UID consistently across the
objects, a de-identified copy of the source series (``source/``, so the references resolve) and the
manifest ``prima-dicom.json``. Everything is written into a temporary folder beside the output folder and
moved into place at the end: a failure leaves no partial output.

Supported sources: single-frame DICOM series (one file per slice; any orientation, oblique and
gantry-tilted stacks included). Refused with ``ExportError``: NIfTI series (``heatmap_on_input_grid``
gives the heatmap on a NIfTI input's own grid instead), enhanced multi-frame objects, Siemens mosaics, and
source files that no longer match the loaded series (e.g. a slice removed since loading).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid
from scipy import ndimage

import prima
from prima.errors import ExportError, SeriesLoadError
from prima.io import dicom
from prima.io.archive import ArchiveLimits, extracted_zip
from prima.io.nifti import is_nifti_path
from prima.io.orientation import LPS_TO_RAS, reorient
from prima.io.study import Series, folder_files, is_archive
from prima.patching import DEFAULT_PATCH_SIZE, unpatchify

if TYPE_CHECKING:  # torch-free at import: the types only
    import highdicom as hd

    from prima.explain import Explanation
    from prima.predict import Prediction
    from prima.tokens import SeriesTokens

PRIMA_SCHEME = "99PRIMA"  # private coding scheme ("99" prefix: local) of the diagnoses, tiers and referrals
RESEARCH_USE = ("Research use only. Produced by Prima, a research model trained on synthetic studies; not a "
                "medical device and not validated for clinical use. Do not use for diagnosis or treatment.")
MANUFACTURER = "Prima (research software)"
PARAMETRIC_MAP_FILE = "parametric_map.dcm"
SEGMENTATION_FILE = "segmentation.dcm"
REPORT_FILE = "report.dcm"
SOURCE_FOLDER = "source"  # the de-identified copy of the source series (deidentify=True only)
MANIFEST_FILE = "prima-dicom.json"
# Series numbers of the derived objects (far from a scanner's own numbers).
SERIES_NUMBERS = {"parametric_map": 9901, "segmentation": 9902, "report": 9903}
DEFAULT_DIFFERENTIAL = 5  # diagnoses listed in the report's differential
# Distance (in voxels of the loaded series) within which a source slice must sit on the loaded grid.
GRID_TOLERANCE_VOXELS = 0.01

# Attributes of a source slice kept in its de-identified copy (everything else, private tags included,
# is dropped): what a viewer needs to show the image at its place, and the acquisition parameters.
_KEPT_ATTRIBUTES = (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "Modality", "Manufacturer", "ManufacturerModelName",
    "StudyDescription", "SeriesDescription", "ProtocolName", "SeriesNumber", "InstanceNumber",
    "AcquisitionNumber", "PatientSex", "PatientPosition", "BodyPartExamined", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "SliceThickness",
    "SpacingBetweenSlices", "RepetitionTime", "EchoTime", "InversionTime", "EchoNumbers", "EchoTrainLength",
    "NumberOfAverages", "ImagingFrequency", "ImagedNucleus", "MagneticFieldStrength", "FlipAngle",
    "PixelBandwidth", "ContrastBolusAgent", "DiffusionBValue", "TemporalPositionIdentifier",
    "NumberOfTemporalPositions", "TriggerTime", "ImagePositionPatient", "ImageOrientationPatient",
    "PositionReferenceIndicator", "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue", "WindowCenter", "WindowWidth",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "BurnedInAnnotation", "PixelData",
)
# Patient and study attributes the DICOM objects need (type 2: present, possibly empty); highdicom reads
# them from the first source image, so a source without one gets it empty.
_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")


@dataclass(frozen=True)
class SeriesGeometry:
    """What DICOM output needs of a loaded series, without its voxels (the app keeps this, not the volume)."""

    name: str  # the loaded series' name (a split series ends in e.g. " [echo 2]")
    source: str  # ``Series.source``: where its files were found
    meta: dict  # ``Series.meta``: format, series_uid, mosaic, ...
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the loaded (L, P, S) array
    shape: tuple[int, int, int]
    through_axis: int
    source_orientation: str  # axcodes of the data as stored, e.g. "LPS", "PIL"

    @classmethod
    def of(cls, series: Series | SeriesGeometry) -> SeriesGeometry:
        """The geometry of a loaded series.

        Args:
            series: a ``prima.io.Series`` (a ``SeriesGeometry`` is returned as it is).
        """
        if isinstance(series, SeriesGeometry):
            return series
        return cls(series.name, series.source, dict(series.meta), np.asarray(series.affine, dtype=np.float64),
                   tuple(int(n) for n in series.shape), int(series.through_axis), series.source_orientation)


@dataclass
class SourceSeries:
    """The DICOM files behind one loaded series: one single-frame dataset per slice, in the loader's slice
    order (by position along the slice normal)."""

    name: str  # the loaded series' name
    datasets: list[Dataset]  # headers (pixel data only when read with ``pixels=True``), in slice order

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns): the shape of a volume on this series' grid."""
        return len(self.datasets), int(self.datasets[0].Rows), int(self.datasets[0].Columns)


@dataclass
class DicomExport:
    """What :func:`export_dicom` wrote (every path inside ``folder``)."""

    folder: Path
    parametric_map: Path
    segmentation: Path | None  # None when no token has a positive weight (nothing to outline)
    report: Path
    manifest: Path
    source: list[Path] = field(default_factory=list)  # the de-identified source copy (deidentify=True)
    deidentified: bool = False

    @property
    def files(self) -> list[Path]:
        """Every written file."""
        return [p for p in (self.parametric_map, self.segmentation, self.report, self.manifest) if p] + self.source


# ---------------------------------------------------------------------------------------------- source


def _files_under(folder: Path) -> list[Path]:
    """Candidate DICOM files under ``folder`` (what the study loader would look at, NIfTI excluded)."""
    return [folder] if folder.is_file() else folder_files(folder)[1]


@contextlib.contextmanager
def _candidate_files(sources: list[Path], series_source: str, limits: ArchiveLimits) -> Iterator[list[Path]]:
    """The files that may hold the series, zips extracted for the duration of the context. Only the
    series' own folder (``Series.source``) is read when it lies within a source."""
    with contextlib.ExitStack() as stack:
        files: list[Path] = []
        for path in sources:
            if not path.exists():
                raise ExportError(f"{path} does not exist (the study source must be the one the series was "
                                  "loaded from)")
            if path.is_dir():
                own = Path(series_source)
                inside = own.exists() and (own == path or path in own.parents)
                files += _files_under(own if inside else path)
            elif is_nifti_path(path):
                continue
            elif is_archive(path):
                folder = stack.enter_context(extracted_zip(path, limits))
                prefix = f"{path.name}!/"
                own = folder / series_source[len(prefix):] if series_source.startswith(prefix) else folder
                files += _files_under(own if own.exists() else folder)
            else:
                files.append(path)
        yield files


def read_source_series(source: str | Path | Sequence[str | Path], series: Series | SeriesGeometry, *,
                       pixels: bool = False, archive_limits: ArchiveLimits = ArchiveLimits()) -> SourceSeries:
    """The DICOM datasets of the slices a loaded series was built from, in its slice order.

    The files are grouped, their frames split (echoes, b-values...) and ordered exactly as
    ``prima.io.load_study`` does (the same functions of ``prima.io.dicom``), then checked against the
    loaded series: as many slices, each on the loaded grid.

    Args:
        source: what the study was loaded from (a folder, a ``.zip``, DICOM files; what ``load_study`` accepts).
        series: the loaded series (``Study.series[i]``) or its :class:`SeriesGeometry`.
        pixels: read the pixel data too (for a copy of the source); default headers only.
        archive_limits: bounds for extracting a zip source.

    Returns:
        A :class:`SourceSeries`.

    Raises:
        ExportError: a NIfTI series, a Siemens mosaic, an enhanced multi-frame object, a series whose files
            are not in ``source``, or files that no longer form the loaded series (missing or extra slices).
    """
    geometry = SeriesGeometry.of(series)
    meta = geometry.meta
    if meta.get("format") != "dicom":
        raise ExportError(f"series {geometry.name!r} was loaded from NIfTI: DICOM output needs a DICOM source "
                          "series to reference. Write the heatmap as NIfTI instead (on the input's own grid: "
                          "prima.export.heatmap_on_input_grid, or --heatmap on the command line)")
    if meta.get("mosaic"):
        raise ExportError(f"series {geometry.name!r} is a Siemens mosaic (one file holds every slice): DICOM "
                          "output supports series of single-frame slices only")
    series_uid = str(meta.get("series_uid") or "")
    if not series_uid:
        raise ExportError(f"series {geometry.name!r} has no SeriesInstanceUID to find its files by")
    sources = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    if not sources:
        raise ExportError("no study source given")
    with _candidate_files(sources, geometry.source, archive_limits) as paths:
        groups, _ = dicom.group_series(paths)
        files = [f for f in groups.get(series_uid, []) if dicom.is_image(f.header)]
        if not files:
            raise ExportError(f"the study source holds no DICOM file of series {geometry.name!r}: give the source "
                              "the study was loaded from")
        frames = [frame for file in files for frame in dicom._frames_of(file)]
        if any(frame.frame_index is not None for frame in frames):
            raise ExportError(f"series {geometry.name!r} is stored as an enhanced multi-frame object: DICOM output "
                              "supports series of single-frame slices only (one file per slice)")
        try:
            dicom._check_geometry(frames, allow_single_slice=False)
            normal = dicom._normal(frames[0].orientation)
            split, _ = dicom._split_repeated_positions(frames, normal)
        except SeriesLoadError as error:
            raise ExportError(f"the files of series {geometry.name!r} no longer form a volume: {error.reason}") from error
        chosen = split[0][1] if len(split) == 1 else next(
            (group for label, group in split if geometry.name.endswith(f" [{label}]")), None)
        if chosen is None:
            raise ExportError(f"series {geometry.name!r}: its files split into {[label for label, _ in split]}, "
                              "none of which is this series")
        chosen = sorted(chosen, key=lambda f: float(f.position @ normal))
        _check_on_grid(chosen, geometry)
        datasets = [dicom._dcmread(frame.file.path) if pixels else frame.file.header for frame in chosen]
    return SourceSeries(geometry.name, datasets)


def _check_on_grid(frames: list, geometry: SeriesGeometry) -> None:
    """ExportError unless the frames are the loaded series' slices: one per slice, each on its grid."""
    n_slices = geometry.shape[geometry.through_axis]
    to_voxel = np.linalg.inv(geometry.affine)
    voxels = np.array([(to_voxel @ LPS_TO_RAS @ np.append(frame.position, 1.0))[:3] for frame in frames])
    off_grid = np.abs(voxels - np.round(voxels)).max() if len(voxels) else 0.0
    slices = sorted(int(round(v)) for v in voxels[:, geometry.through_axis])
    if len(frames) != n_slices or off_grid > GRID_TOLERANCE_VOXELS or slices != list(range(n_slices)):
        raise ExportError(
            f"the DICOM files of series {geometry.name!r} no longer match the loaded series: {len(frames)} slice "
            f"file(s) against {n_slices} loaded slices (missing or extra slices, or files changed since loading); "
            "load the study again")


# ---------------------------------------------------------------------------------------------- grids


def _frame_world_ras(dataset: Dataset) -> np.ndarray:
    """(rows, columns, 3) RAS mm of every pixel centre of one single-frame slice."""
    import highdicom as hd

    rows, columns = int(dataset.Rows), int(dataset.Columns)
    transformer = hd.spatial.PixelToReferenceTransformer(
        image_position=[float(v) for v in dataset.ImagePositionPatient],
        image_orientation=[float(v) for v in dataset.ImageOrientationPatient],
        pixel_spacing=[float(v) for v in dataset.PixelSpacing])
    row, column = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    lps = transformer(np.stack([column.ravel(), row.ravel()], axis=1))  # (column, row) pairs -> LPS
    return (lps * np.array([-1.0, -1.0, 1.0])).reshape(rows, columns, 3)


class _Sampler:
    """Samples a volume (voxel -> RAS ``affine``) at world points; 0 outside the volume's extent."""

    def __init__(self, volume: np.ndarray, affine: np.ndarray, order: int):
        volume = np.asarray(volume)
        affine = np.asarray(affine, dtype=np.float64)
        if volume.ndim != 3 or affine.shape != (4, 4):
            raise ValueError(f"expected a 3D volume and a 4x4 affine, got {volume.shape} and {affine.shape}")
        if order not in range(6):
            raise ValueError(f"order must be 0..5, got {order}")
        self.volume = np.asarray(volume, dtype=np.float64)
        self.to_voxel = np.linalg.inv(affine)
        self.order = order

    def __call__(self, world_ras: np.ndarray) -> np.ndarray:
        """Values at world points (..., 3) RAS mm, float64 of shape (...)."""
        points = world_ras.reshape(-1, 3)
        voxel = (self.to_voxel @ np.vstack([points.T, np.ones(len(points))]))[:3]
        shape = np.array(self.volume.shape)[:, None]
        inside = np.all((voxel >= -0.5) & (voxel <= shape - 0.5), axis=0)
        values = np.zeros(len(points), dtype=np.float64)
        if inside.any():
            values[inside] = ndimage.map_coordinates(self.volume, voxel[:, inside], order=self.order, mode="nearest")
        return values.reshape(world_ras.shape[:-1])


def resample_to_source(volume: np.ndarray, affine: np.ndarray, source: SourceSeries, *, order: int = 0) -> np.ndarray:
    """A volume (e.g. a heatmap on the preprocessed grid) sampled at every pixel of the source slices.

    Each source pixel centre is placed in patient space from its own slice's ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing (LPS, as a viewer places it), turned into RAS and into the
    volume's voxel coordinates, and sampled with ``scipy.ndimage.map_coordinates``.

    Args:
        volume: 3D array.
        affine: (4, 4) voxel -> RAS mm of ``volume``.
        source: the source series (:func:`read_source_series`).
        order: spline order; 0 (nearest, the default) keeps a heatmap's per-token blocks and labels exact.

    Returns:
        (slices, rows, columns) float64 in ``source``'s slice order; 0 outside ``volume``'s extent
        (a point within half a voxel of the outer voxel centres is inside).
    """
    sample = _Sampler(volume, affine, order)
    return np.stack([sample(_frame_world_ras(ds)) for ds in source.datasets])


def heatmap_on_input_grid(volume: np.ndarray, affine: np.ndarray, series: Series | SeriesGeometry
                          ) -> tuple[np.ndarray, np.ndarray]:
    """A volume (e.g. the heatmap on the preprocessed grid) resampled onto a series' grid as stored in its
    input file: same shape, same affine, same axis order as the NIfTI the series was read from.

    Args:
        volume: 3D array.
        affine: (4, 4) voxel -> RAS mm of ``volume``.
        series: the loaded series (any source; for NIfTI this is the input file's own grid).

    Returns:
        (array float32, affine): nearest-neighbour samples (heatmap blocks stay blocks), 0 outside ``volume``.
    """
    geometry = SeriesGeometry.of(series)
    sample = _Sampler(volume, affine, 0)
    nx, ny, nz = geometry.shape
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    sampled = np.empty(geometry.shape, dtype=np.float32)
    for k in range(nz):  # a slab at a time: memory stays at one slice of points
        voxels = np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)])
        sampled[:, :, k] = sample((geometry.affine @ voxels)[:3].T).reshape(nx, ny)
    array, input_affine = reorient(sampled, geometry.affine, tuple(geometry.source_orientation))
    return np.ascontiguousarray(array), input_affine


def top_k_labels(explanation: Explanation, tokens: SeriesTokens) -> np.ndarray:
    """The top-k tokens of an explanation as a label volume on the preprocessed grid.

    Args:
        explanation: ``prima.explain.explain`` output.
        tokens: the explained series' tokens.

    Returns:
        ``tokens.shape`` uint8: a top-k token's patch holds its rank (1 = largest weight), every other voxel 0.
    """
    from prima.explain import heatmap

    heatmap(explanation, tokens)  # the same check that these are the explained tokens
    ranks = np.zeros(len(tokens), dtype=np.float32)
    ranks[np.asarray(explanation.top_k, dtype=np.int64)] = np.arange(1, len(explanation.top_k) + 1)
    patches = np.broadcast_to(ranks[:, None, None, None], (len(ranks), *DEFAULT_PATCH_SIZE))
    return unpatchify(patches, tokens.coords, tokens.shape, tokens.through_axis).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- identity


class Pseudonyms:
    """One export's replacement identifiers: a pseudonymous patient ID, and a new UID for each original."""

    def __init__(self) -> None:
        self.patient_id = f"PRIMA-{secrets.token_hex(5).upper()}"
        self.uids: dict[str, str] = {}

    def uid(self, original: str) -> str:
        """The replacement of ``original`` (a new UID on first sight, the same one afterwards).

        Args:
            original: a UID of the source.
        """
        if original not in self.uids:
            self.uids[original] = generate_uid()
        return self.uids[original]


def deidentified_copy(dataset: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """A de-identified copy of one source slice.

    Only the image attributes (``_KEPT_ATTRIBUTES``) are kept, private tags and the institution dropped;
    patient name and ID become the pseudonym; birth date, accession number, referring physician, study ID,
    study and series dates and times are emptied; every UID is replaced through ``pseudonyms`` (so that all
    slices and objects of one export agree). Pixel data are copied as they are.

    Args:
        dataset: a source slice, with its pixel data.
        pseudonyms: the export's replacement identifiers (one :class:`Pseudonyms` per export).

    Raises:
        ExportError: the slice declares burned-in annotation (identifiers may be in its pixels).
    """
    if str(dataset.get("BurnedInAnnotation", "")).upper() == "YES":
        raise ExportError("the source images have burned-in annotation (BurnedInAnnotation YES): their pixels may "
                          "show identifiers, so they cannot be de-identified by replacing attributes")
    out = Dataset()
    for keyword in _KEPT_ATTRIBUTES:
        if keyword in dataset:
            out[keyword] = copy.deepcopy(dataset[keyword])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        if keyword in dataset:
            setattr(out, keyword, pseudonyms.uid(str(dataset[keyword].value)))
    out.PatientName = f"{pseudonyms.patient_id}^"  # one name component, said explicitly (trailing caret)
    out.PatientID = pseudonyms.patient_id
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate",
                    "StudyTime", "SeriesDate", "SeriesTime"):
        setattr(out, keyword, "")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "Prima: identifiers, dates, UIDs replaced; image attributes kept"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    meta.TransferSyntaxUID = syntax or pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta = meta
    return out


def _copy_of(dataset: Dataset, without: tuple[str, ...] = ()) -> Dataset:
    """A new dataset holding ``dataset``'s top-level elements (shared, not copied) but those named in
    ``without``, and its file meta: changing the copy's top level leaves ``dataset`` as it is."""
    out = Dataset()
    for element in dataset:
        if element.keyword not in without:
            out.add(element)
    if getattr(dataset, "file_meta", None) is not None:
        out.file_meta = dataset.file_meta
    out.preamble = getattr(dataset, "preamble", None)
    return out


def _with_identity_attributes(dataset: Dataset) -> Dataset:
    """A copy with every type 2 patient/study attribute present (empty when the source lacks it)."""
    out = _copy_of(dataset)
    for keyword in _TYPE2_IDENTITY:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


# ---------------------------------------------------------------------------------------------- objects


def _model_label(model: dict) -> tuple[str, str]:
    """(model name, revision) of ``Prediction.model`` as written into the objects."""
    return str(model.get("name") or "prima"), str(model.get("revision") or "unversioned")


def _software_versions() -> str:
    import highdicom as hd

    return f"prima {prima.__version__}, highdicom {hd.__version__}"


def _check_frames(array: np.ndarray, images: Sequence[Dataset], what: str) -> None:
    if not images:
        raise ValueError("no source images")
    expected = (len(images), int(images[0].Rows), int(images[0].Columns))
    if array.shape != expected:
        raise ValueError(f"{what} of shape {array.shape} do not match the source slices {expected}")


def parametric_map(images: Sequence[Dataset], weights: np.ndarray, *, target: str, series_name: str,
                   model: dict) -> hd.pm.ParametricMap:
    """The heatmap on the source grid as a float32 Parametric Map: one frame per source slice, placed and
    referenced as that slice (highdicom copies each slice's position, orientation and pixel spacing).

    Args:
        images: the source slices (headers), in slice order.
        weights: (slices, rows, columns) LIME weights on those slices (:func:`resample_to_source`).
        target: the explained output (diagnosis or referral key, or "priority").
        series_name: the explained series.
        model: ``Prediction.model`` ({"name", "revision"}).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    weights = np.asarray(weights, dtype=np.float32)
    _check_frames(weights, images, "weights")
    if not np.isfinite(weights).all():
        raise ValueError("weights hold NaN or infinite values")
    name, revision = _model_label(model)
    lo, hi = float(min(weights.min(), 0.0)), float(max(weights.max(), 0.0))
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="LIME", lut_explanation=f"LIME weight for {target}"[:64], unit=codes.UCUM.NoUnits,
        value_range=(lo, hi), slope=1.0, intercept=0.0)
    return hd.pm.ParametricMap(
        source_images=list(images), pixel_array=weights, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["parametric_map"], sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=name, software_versions=_software_versions(),
        device_serial_number=revision, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=2.0 * max(-lo, hi))],
        content_label="LIME", content_description=f"LIME heatmap: {target} on {series_name}"[:64],
        series_description=f"Prima LIME heatmap {target}"[:64])


def segmentation(images: Sequence[Dataset], labels: np.ndarray, rank_weights: Sequence[float], *, target: str,
                 model: dict) -> hd.seg.Segmentation | None:
    """The top-k LIME tokens on the source grid as a binary Segmentation, one segment per rank.

    Args:
        images: the source slices (headers), in slice order.
        labels: (slices, rows, columns) token rank of each source pixel, 1 = largest weight, 0 = none
            (:func:`top_k_labels` resampled with :func:`resample_to_source`).
        rank_weights: the LIME weight of each rank (``rank_weights[r - 1]`` for rank r).
        target: the explained output.
        model: ``Prediction.model`` ({"name", "revision"}).

    Returns:
        The segmentation, or None when no rank covers any source pixel (nothing to outline). Segments are
        numbered 1, 2, ... over the ranks that cover source pixels; each segment's label names its rank.
        Segmented property: category "Spatial and Relational Concept" (SCT 309825002), type "Imaging
        Region of Interest" (NCIt); algorithm type AUTOMATIC, family "Artificial Intelligence".
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    _check_frames(labels, images, "labels")
    labels = np.rint(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() > len(rank_weights):
        raise ValueError(f"labels must lie in 0..{len(rank_weights)} (one weight per rank)")
    present = [rank for rank in range(1, len(rank_weights) + 1) if np.any(labels == rank)]
    if not present:
        return None
    name, revision = _model_label(model)
    renumbered = np.zeros(labels.shape, dtype=np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name=f"{name} LIME"[:64], version=revision[:64],
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, rank in enumerate(present, start=1):
        renumbered[labels == rank] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"LIME token rank {rank} (weight {rank_weights[rank - 1]:+.3g})"[:64],
            segmented_property_category=codes.cid7150.SpatialAndRelationalConcept,
            segmented_property_type=codes.NCIt.ImagingRegionOfInterest,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_id=f"LIME rank {rank}", tracking_uid=generate_uid()))
    return hd.seg.Segmentation(
        source_images=list(images), pixel_array=renumbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["segmentation"], sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=name, software_versions=_software_versions(),
        device_serial_number=revision, content_label="LIME_TOP_K",
        content_description=f"Top {len(present)} LIME tokens: {target}"[:64],
        series_description=f"Prima LIME top tokens {target}"[:64])


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=PRIMA_SCHEME, meaning=meaning[:64])


def _scored_finding(key: str, name: str, prob: float, threshold_prob: float) -> hd.sr.CodeContentItem:
    """CODE "Finding" = the diagnosis, with its probability and operating threshold as properties."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rel = hd.sr.RelationshipTypeValues
    item = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=_code(key, name), relationship_type=rel.CONTAINS)
    item.ContentSequence = hd.sr.ContentSequence([
        hd.sr.NumContentItem(name=_code("probability", "Probability"), value=round(prob, 4),
                             unit=codes.UCUM.NoUnits, relationship_type=rel.HAS_PROPERTIES),
        hd.sr.NumContentItem(name=_code("threshold", "Operating threshold (probability)"),
                             value=round(threshold_prob, 4), unit=codes.UCUM.NoUnits,
                             relationship_type=rel.HAS_PROPERTIES)])
    return item


def _raised_note(prediction: Prediction) -> str:
    """Why the worklist tier is above the priority head's, when it is."""
    priority = prediction.priority
    if not priority.raised_by:
        return ""
    names = ", ".join(prediction.raised_by_names)
    return f"; raised from {priority.tier} by the positive {priority.worklist_tier}-tier findings {names}"


def _sigmoid(logit: float) -> float:
    return float(1.0 / (1.0 + np.exp(-logit)))


def report(evidence: Sequence[Dataset], prediction: Prediction, explanation: Explanation | None = None, *,
           parametric_map_dataset: Dataset | None = None, segmentation_dataset: Dataset | None = None,
           differential: int = DEFAULT_DIFFERENTIAL) -> hd.sr.ComprehensiveSR:
    """The prediction as a Comprehensive SR: a diagnostic imaging report (TID 2000 style) a text viewer reads.

    Content: algorithm name and version; "Findings" (each diagnosis above its operating threshold, as a
    coded finding with its probability and threshold); "Differential Diagnosis/Impression" (the top
    ``differential`` diagnoses); "Impression" (one sentence, the worklist priority tier with its
    probabilities, the positive referrals); the explanation (target, series, references to the parametric
    map and the segmentation); a research-use comment.

    Args:
        evidence: the source slices (the patient and study modules are copied from the first).
        prediction: ``prima.predict.Prediction``.
        explanation: the explanation the parametric map and segmentation show, if any.
        parametric_map_dataset, segmentation_dataset: the objects to reference (same study).
        differential: diagnoses listed in the differential (>= 1).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if differential < 1:
        raise ValueError(f"differential must be >= 1, got {differential}")
    rel = hd.sr.RelationshipTypeValues
    name, revision = _model_label(prediction.model)
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    items: list = [
        *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")),
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmName, value=name, relationship_type=rel.HAS_CONCEPT_MOD),
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmVersion, value=revision, relationship_type=rel.HAS_CONCEPT_MOD),
    ]

    findings = hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type=rel.CONTAINS)
    positives = prediction.positives
    findings.ContentSequence = hd.sr.ContentSequence(
        [_scored_finding(d.key, d.name, d.prob, _sigmoid(d.threshold)) for d in positives]
        or [hd.sr.TextContentItem(name=codes.DCM.Finding, value="No diagnosis above its operating threshold.",
                                  relationship_type=rel.CONTAINS)])
    items.append(findings)

    ranked = hd.sr.ContainerContentItem(name=codes.DCM.DifferentialDiagnosisImpression, relationship_type=rel.CONTAINS)
    ranked.ContentSequence = hd.sr.ContentSequence(
        [_scored_finding(d.key, d.name, d.prob, _sigmoid(d.threshold)) for d in prediction.differential[:differential]])
    items.append(ranked)

    tier_probs = ", ".join(f"{tier} {p:.2f}" for tier, p in prediction.priority.probs.items())
    referrals = [r for r in prediction.referrals if r.positive]
    above = ", ".join(f"{d.name} (p={d.prob:.3f})" for d in positives) or "none"
    impression = hd.sr.ContainerContentItem(name=codes.DCM.Impression, relationship_type=rel.CONTAINS)
    impression_items = [
        hd.sr.TextContentItem(name=codes.DCM.Impression, relationship_type=rel.CONTAINS, value=(
            f"Diagnoses above threshold: {above}. Worklist priority: {prediction.priority.worklist_tier} "
            f"(priority head: {tier_probs}{_raised_note(prediction)}). "
            f"Referrals: {', '.join(r.name for r in referrals) or 'none'}.")),
        hd.sr.CodeContentItem(name=_code("priority", "Worklist priority"),
                              value=_code(f"priority_{prediction.priority.worklist_tier}",
                                          f"{prediction.priority.worklist_tier.capitalize()} priority"),
                              relationship_type=rel.CONTAINS),
    ]
    impression_items += [hd.sr.CodeContentItem(name=_code("referral", "Specialist referral"),
                                                value=_code(r.key, r.name), relationship_type=rel.CONTAINS)
                         for r in referrals]
    impression.ContentSequence = hd.sr.ContentSequence(impression_items)
    items.append(impression)

    if explanation is not None:
        section = hd.sr.ContainerContentItem(name=_code("explanation", "Explanation (LIME)"),
                                             relationship_type=rel.CONTAINS)
        section_items = [hd.sr.TextContentItem(
            name=_code("explanation_method", "Explanation method"), relationship_type=rel.CONTAINS, value=(
                f"LIME over the volume tokens of series '{explanation.series}' for {explanation.target} "
                f"({explanation.target_kind}): {explanation.num_samples} samples, surrogate R^2 {explanation.r2:.3f}, "
                f"top {len(explanation.top_k)} of {len(explanation.weights)} tokens outlined."))]
        if parametric_map_dataset is not None:
            section_items.append(hd.sr.ImageContentItem(
                name=_code("lime_heatmap", "LIME heatmap (parametric map)"),
                referenced_sop_class_uid=parametric_map_dataset.SOPClassUID,
                referenced_sop_instance_uid=parametric_map_dataset.SOPInstanceUID, relationship_type=rel.CONTAINS))
        if segmentation_dataset is not None:
            section_items.append(hd.sr.CompositeContentItem(
                name=_code("lime_top_tokens", "LIME top tokens (segmentation)"),
                referenced_sop_class_uid=segmentation_dataset.SOPClassUID,
                referenced_sop_instance_uid=segmentation_dataset.SOPInstanceUID, relationship_type=rel.CONTAINS))
        section.ContentSequence = hd.sr.ContentSequence(section_items)
        items.append(section)
    items.append(hd.sr.TextContentItem(name=codes.DCM.Comment, value=RESEARCH_USE, relationship_type=rel.CONTAINS))
    root.ContentSequence = hd.sr.ContentSequence(items)

    objects = [ds for ds in (parametric_map_dataset, segmentation_dataset) if ds is not None]
    return hd.sr.ComprehensiveSR(
        evidence=[*evidence, *objects], content=root, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["report"], sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=f"Prima report ({name})"[:64])


def report_text(dataset: Dataset) -> str:
    """An SR document's content tree as indented plain text ("concept: value" lines, as an SR text viewer
    shows them).

    Args:
        dataset: an SR document (``pydicom.dcmread`` or ``highdicom.sr.srread`` output).
    """
    lines: list[str] = []

    def value_of(item: Dataset) -> str:
        kind = str(item.get("ValueType", ""))
        if kind == "TEXT":
            return str(item.TextValue)
        if kind == "CODE":
            return str(item.ConceptCodeSequence[0].CodeMeaning)
        if kind == "NUM":
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0]
            return f"{measured.NumericValue}" + ("" if unit.CodeValue == "1" else f" {unit.CodeMeaning}")
        if kind in ("IMAGE", "COMPOSITE"):
            reference = item.ReferencedSOPSequence[0]
            return f"{pydicom.uid.UID(reference.ReferencedSOPClassUID).name} {reference.ReferencedSOPInstanceUID}"
        if kind == "UIDREF":
            return str(item.UID)
        return ""

    def walk(item: Dataset, depth: int) -> None:
        concept = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        value = value_of(item)
        lines.append("  " * depth + (f"{concept}: {value}" if value else f"{concept}"))
        for child in item.get("ContentSequence", []):
            walk(child, depth + 1)

    walk(dataset, 0)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- writing


def check_output_folder(out_dir: str | Path) -> None:
    """Refuse an output folder that exists and is not empty (checked before any work, and again before the
    written files are moved into place).

    Args:
        out_dir: the folder DICOM output is meant for.

    Raises:
        ExportError: ``out_dir`` is a file or a folder holding anything.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder: give a new folder for the DICOM output")


def export_dicom(out_dir: str | Path, source: str | Path | Sequence[str | Path], series: Series | SeriesGeometry,
                 explanation: Explanation, tokens: SeriesTokens, prediction: Prediction, *,
                 deidentify: bool = False, differential: int = DEFAULT_DIFFERENTIAL,
                 archive_limits: ArchiveLimits = ArchiveLimits()) -> DicomExport:
    """Write the parametric map, the segmentation and the SR of one explanation and its prediction.

    Args:
        out_dir: a new (or empty) folder; filled at the end, all at once (nothing is left on error).
        source: what the study was loaded from (folder, ``.zip``, DICOM files).
        series: the explained series as loaded (``Study.series[explanation.series_index]``) or its geometry.
        explanation: ``prima.explain.explain`` output for that series.
        tokens: the explained series' tokens (``StudyTokens.series[explanation.series_index]``).
        prediction: the study's prediction (the report's content).
        deidentify: replace every identifier and UID (see the module docstring) and write a de-identified
            copy of the source series in ``source/`` so that the objects' references resolve.
        differential: diagnoses listed in the report's differential.
        archive_limits: bounds for extracting a zip source.

    Returns:
        A :class:`DicomExport` listing the files.

    Raises:
        ExportError: bad input (a NIfTI series, unsupported storage, a source that does not match the loaded
            series, an output folder that is not empty).
        ValueError: the explanation, tokens and series do not belong together.
    """
    from prima.explain import heatmap

    out_dir = Path(out_dir)
    geometry = SeriesGeometry.of(series)
    if tokens.name != geometry.name:
        raise ValueError(f"the tokens are of series {tokens.name!r}, not of {geometry.name!r}")
    if differential < 1:
        raise ValueError(f"differential must be >= 1, got {differential}")
    check_output_folder(out_dir)
    source_series = read_source_series(source, geometry, pixels=deidentify, archive_limits=archive_limits)
    weights = resample_to_source(heatmap(explanation, tokens), tokens.affine, source_series)
    labels = resample_to_source(top_k_labels(explanation, tokens), tokens.affine, source_series)
    if deidentify:
        pseudonyms = Pseudonyms()
        images = [deidentified_copy(ds, pseudonyms) for ds in source_series.datasets]
    else:
        images = [_with_identity_attributes(ds) for ds in source_series.datasets]
    headers = [_without_pixels(ds) for ds in images]
    try:
        pm = parametric_map(headers, weights, target=explanation.target, series_name=explanation.series,
                            model=prediction.model)
        seg = segmentation(headers, labels, [float(explanation.weights[i]) for i in explanation.top_k],
                           target=explanation.target, model=prediction.model)
        sr = report(headers, prediction, explanation, parametric_map_dataset=pm, segmentation_dataset=seg,
                    differential=differential)
    except ExportError:
        raise
    except (ValueError, TypeError, AttributeError) as error:  # highdicom refusing the source's attributes
        raise ExportError(f"series {geometry.name!r}: the DICOM objects could not be built from its files: "
                          f"{error}") from error

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prima-dicom-", dir=out_dir.parent))
    try:
        pm.save_as(staging / PARAMETRIC_MAP_FILE)
        if seg is not None:
            seg.save_as(staging / SEGMENTATION_FILE)
        sr.save_as(staging / REPORT_FILE)
        copies = []
        if deidentify:
            (staging / SOURCE_FOLDER).mkdir()
            for index, image in enumerate(images, start=1):
                name = f"{SOURCE_FOLDER}/{index:04d}.dcm"
                image.save_as(staging / name, enforce_file_format=True)
                copies.append(name)
        manifest = _manifest(images, pm, seg, sr, explanation, prediction, copies, deidentify)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        check_output_folder(out_dir)
        staging.chmod(out_dir.stat().st_mode & 0o7777 if out_dir.exists() else _default_folder_mode())
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DicomExport(out_dir, out_dir / PARAMETRIC_MAP_FILE, out_dir / SEGMENTATION_FILE if seg is not None else None,
                       out_dir / REPORT_FILE, out_dir / MANIFEST_FILE, [out_dir / name for name in copies], deidentify)


def _default_folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder (``mkdtemp`` makes its folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _without_pixels(dataset: Dataset) -> Dataset:
    return _copy_of(dataset, without=("PixelData",)) if "PixelData" in dataset else dataset


def _manifest(images: Sequence[Dataset], pm: Dataset, seg: Dataset | None, sr: Dataset, explanation: Explanation,
              prediction: Prediction, copies: list[str], deidentified: bool) -> dict:
    """What was written, by UID (the de-identified UIDs when ``deidentified``); never a patient attribute."""
    def entry(file: str, dataset: Dataset) -> dict:
        return {"file": file, "sop_class": pydicom.uid.UID(dataset.SOPClassUID).name,
                "sop_class_uid": str(dataset.SOPClassUID), "sop_instance_uid": str(dataset.SOPInstanceUID),
                "series_instance_uid": str(dataset.SeriesInstanceUID)}

    objects = [entry(PARAMETRIC_MAP_FILE, pm)] + ([entry(SEGMENTATION_FILE, seg)] if seg is not None else [])
    objects.append(entry(REPORT_FILE, sr))
    name, _ = _model_label(prediction.model)
    return {
        "deidentified": deidentified,
        "model": {"name": name, "revision": prediction.model.get("revision")},
        "target": explanation.target, "series": explanation.series,
        "study_instance_uid": str(images[0].StudyInstanceUID),
        "source": {"series_instance_uid": str(images[0].SeriesInstanceUID),
                   "frame_of_reference_uid": str(images[0].get("FrameOfReferenceUID", "")),
                   "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in images],
                   "files": copies},
        "objects": objects,
        "note": RESEARCH_USE,
    }
