"""A study = the series that could be loaded plus the ones that were skipped, each with a reason."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from prima.errors import NoUsableSeriesError, SeriesLoadError, StudyLoadError
from prima.io import dicom
from prima.io.archive import ArchiveLimits, extracted_zip
from prima.io.limits import StudyBudget, StudyLimits
from prima.io.nifti import is_nifti_path, nifti_stem, read_nifti
from prima.io.orientation import (
    PLANE_OF_THROUGH_AXIS,
    axcodes,
    reorient,
    through_axis_from_normal,
    through_axis_from_spacing,
    voxel_spacing,
)

logger = logging.getLogger("prima.io")

# Series of a DICOM study decoded at the same time (threads): reading files and numpy's copies release
# the GIL, so on several cores one series is read while another is rescaled and reoriented.
LOAD_THREADS = min(4, os.cpu_count() or 1)

# Folders and files that archivers and desktops add next to the images; skipped silently.
_IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
# BIDS sidecars next to NIfTI files: metadata, not images; skipped silently.
_SIDECAR_SUFFIXES = {".json", ".bval", ".bvec", ".tsv"}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # SOP class of DICOMDIR files


@dataclass
class Series:
    """One 3D series with array axes ordered L, P, S (``nibabel.aff2axcodes(affine) == ('L','P','S')``)."""

    name: str  # SeriesDescription (fallback ProtocolName), NIfTI file stem, or the name given
    array: np.ndarray  # float32 (X, Y, Z), axes towards L, P, S
    affine: np.ndarray  # (4, 4) voxel -> world mm, RAS+ (DICOM LPS converted)
    plane: str  # "axial" | "coronal" | "sagittal": the acquisition plane
    through_axis: int  # array axis across the acquisition plane: sagittal 0, coronal 1, axial 2
    source_orientation: str  # axcodes of the data as stored before reorientation, e.g. "LPS", "PIL"
    source: str  # file or folder it came from ("archive.zip!/folder" inside an archive)
    meta: dict = field(default_factory=dict)  # modality, series_uid, series_number, ... (JSON-serialisable)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the array axes."""
        return voxel_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]


@dataclass
class SkippedSeries:
    """A series (or group of files) that could not be loaded, and why."""

    name: str
    reason: str
    source: str


@dataclass
class Study:
    description: str  # StudyDescription, or the description given
    series: list[Series]
    skipped: list[SkippedSeries]
    source: str


def _sanitise(array: np.ndarray, meta: dict) -> np.ndarray:
    """Replace NaN by 0 and +/-Inf by the largest/smallest finite value; reject all-non-finite data."""
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise SeriesLoadError("no finite voxel value (all NaN/Inf)")
    n_bad = int(array.size - np.count_nonzero(finite))
    lo, hi = float(array[finite].min()), float(array[finite].max())
    logger.warning("%d NaN/Inf voxels replaced (NaN -> 0, +Inf -> %g, -Inf -> %g)", n_bad, hi, lo)
    meta["nonfinite_voxels"] = n_bad
    return np.nan_to_num(array, nan=0.0, posinf=hi, neginf=lo).astype(np.float32, copy=False)


def _make_series(name: str, array: np.ndarray, affine: np.ndarray, source: str, meta: dict,
                 normal_lps: np.ndarray | None, source_orientation: str | None = None) -> Series:
    """Sanitise, reorient to L,P,S and detect the plane (slice normal for DICOM, spacing for NIfTI).

    ``source_orientation`` is given for an array already reoriented (DICOM volumes are read in L,P,S order).
    """
    array = _sanitise(np.asarray(array, dtype=np.float32), meta)
    if source_orientation is None:
        source_orientation = axcodes(affine)
    array, affine = reorient(array, affine)
    if normal_lps is not None:
        through_axis = through_axis_from_normal(np.asarray(normal_lps) * [-1.0, -1.0, 1.0], affine)
    else:
        through_axis = through_axis_from_spacing(affine, array.shape)
    return Series(name=name, array=array, affine=affine, plane=PLANE_OF_THROUGH_AXIS[through_axis],
                  through_axis=through_axis, source_orientation=source_orientation, source=source, meta=meta)


def _display(path: Path, root: Path, label: str) -> str:
    """How a path is shown to users: relative to an extracted archive as ``archive.zip!/rel``."""
    if not label:
        return str(path)
    relative = path.relative_to(root).as_posix()
    return f"{label}!/{relative}" if relative != "." else label


def _load_nifti(path: Path, root: Path, label: str, budget: StudyBudget) -> tuple[list[Series], list[SkippedSeries]]:
    name = nifti_stem(path)
    source = _display(path, root, label)
    try:
        array, affine = read_nifti(path, budget=budget)
        meta = {"format": "nifti"}
        return [_make_series(name, array, affine, source, meta, None)], []
    except SeriesLoadError as error:
        return [], [SkippedSeries(name, error.reason, source)]


@dataclass
class _DicomJob:
    """One DICOM series whose budget is claimed: decoding it, independent of the other series."""

    name: str
    source: str
    header: pydicom.Dataset
    images: list[dicom.DicomFile]

    def run(self, budget: StudyBudget) -> tuple[list[Series], SkippedSeries | None]:
        try:
            volumes = dicom.volumes(self.images)
            # Every volume's voxels first, read straight into L,P,S order (one copy), then the checks.
            voxels = [volume.voxels(lps=True) for volume in volumes]
            meta_base = dicom.series_meta(self.header)
            meta_base["n_files"] = len(self.images)
            loaded = []
            for volume, (array, affine) in zip(volumes, voxels):
                meta = {**meta_base, **volume.meta, "format": "dicom"}
                full_name = f"{self.name} [{volume.label}]" if volume.label else self.name
                budget.check_extent(full_name, volume.affine, volume.shape)
                loaded.append(_make_series(full_name, array, affine, self.source, meta, volume.normal,
                                           axcodes(volume.affine)))
            logger.info("loaded series %r (%d files)", self.name, len(self.images))
            return loaded, None
        except SeriesLoadError as error:
            logger.info("skipped series %r: %s", self.name, error.reason)
            return [], SkippedSeries(self.name, error.reason, self.source)


def _load_dicom_files(paths: list[Path], root: Path, label: str, budget: StudyBudget
                      ) -> tuple[list[Series], list[SkippedSeries], str]:
    groups, not_dicom = dicom.group_series(paths)
    loaded: list[Series] = []
    skipped: list[SkippedSeries] = []
    if not_dicom:
        shown = ", ".join(p.name for p in not_dicom[:5]) + (" ..." if len(not_dicom) > 5 else "")
        skipped.append(SkippedSeries("(files that are not DICOM or NIfTI)",
                                     f"{len(not_dicom)} file(s) could not be read as DICOM or NIfTI: {shown}",
                                     _display(Path(os.path.commonpath(not_dicom)), root, label)))
    descriptions = []
    # One entry per series in SeriesNumber order: its outcome, or the job that builds it. Budgets are claimed
    # here, in that order and from the headers, before any series is decoded.
    outcomes: list[tuple[list[Series], SkippedSeries | None] | _DicomJob] = []
    for files in sorted(groups.values(), key=lambda group: dicom.series_order_key(group[0].series_header)):
        header = files[0].series_header
        name = dicom.series_name_of(header)
        source = _display(Path(os.path.commonpath([f.path for f in files])), root, label)
        study_description = dicom.get_value(header, "StudyDescription")
        if study_description:
            descriptions.append(str(study_description))
        images = [f for f in files if dicom.is_image(f.fields)]
        if not images and all(dicom.sop_class_of(f.series_header) == MEDIA_STORAGE_DIRECTORY for f in files):
            logger.debug("ignored DICOMDIR %s", source)  # an index of the other files, not a series
            continue
        if not images:
            sop = dicom.sop_class_of(header)
            sop_name = pydicom.uid.UID(sop).name if sop else "unknown SOP class"
            reason = (f"no pixel matrix (Rows/Columns missing) in {sop_name} object" if "Image Storage" in sop_name
                      else f"non-image object ({sop_name}, {len(files)} file(s))")
            outcomes.append(([], SkippedSeries(name, reason, source)))
            continue
        try:
            budget.claim(name, dicom.declared_voxels(images))  # from the headers, before decoding
        except SeriesLoadError as error:
            logger.info("skipped series %r: %s", name, error.reason)
            outcomes.append(([], SkippedSeries(name, error.reason, source)))
            continue
        outcomes.append(_DicomJob(name, source, header, images))

    jobs = [outcome for outcome in outcomes if isinstance(outcome, _DicomJob)]
    workers = min(len(jobs), LOAD_THREADS)
    if workers > 1:  # file reads and numpy copies release the GIL: series overlap on several cores
        with ThreadPoolExecutor(workers, thread_name_prefix="prima-load") as pool:
            built = dict(zip(map(id, jobs), pool.map(lambda job: job.run(budget), jobs)))
    else:
        built = {id(job): job.run(budget) for job in jobs}
    for outcome in outcomes:
        series, skip = built[id(outcome)] if isinstance(outcome, _DicomJob) else outcome
        loaded += series
        if skip is not None:
            skipped.append(skip)
    return loaded, skipped, descriptions[0] if descriptions else ""


def folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files a study folder is read from, in load order: (NIfTI files, candidate DICOM files). Hidden
    folders, operating-system litter and sidecars (JSON, bval/bvec, TSV) are left out."""
    nifti_paths, other_paths = [], []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if d not in _IGNORED_NAMES and not d.startswith("."))
        for file_name in sorted(names):
            if (file_name in _IGNORED_NAMES or file_name.startswith("._")
                    or Path(file_name).suffix.lower() in _SIDECAR_SUFFIXES):
                continue
            path = Path(directory) / file_name
            (nifti_paths if is_nifti_path(path) else other_paths).append(path)
    return nifti_paths, other_paths


def _load_folder(folder: Path, budget: StudyBudget, label: str = "") -> tuple[list[Series], list[SkippedSeries], str]:
    nifti_paths, other_paths = folder_files(folder)
    loaded, skipped, description = (_load_dicom_files(other_paths, folder, label, budget) if other_paths
                                    else ([], [], ""))
    for path in nifti_paths:
        series, bad = _load_nifti(path, folder, label, budget)
        loaded += series
        skipped += bad
    return loaded, skipped, description


def is_archive(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)


def _is_loose_file(path: Path) -> bool:
    """True for a file that is neither NIfTI nor an archive: a candidate DICOM file."""
    return path.is_file() and not is_nifti_path(path) and not is_archive(path)


def _load_one(path: Path, limits: ArchiveLimits, budget: StudyBudget) -> tuple[list[Series], list[SkippedSeries], str]:
    if not path.exists():
        raise StudyLoadError(f"{path} does not exist")
    if path.is_dir():
        return _load_folder(path, budget)
    if is_nifti_path(path):
        series, skipped = _load_nifti(path, path.parent, "", budget)
        return series, skipped, ""
    if is_archive(path):
        with extracted_zip(path, limits) as folder:
            return _load_folder(folder, budget, label=path.name)
    return _load_dicom_files([path], path.parent, "", budget)


def _load_loose_files(paths: list[Path], budget: StudyBudget) -> tuple[list[Series], list[SkippedSeries], str]:
    """Group loose DICOM files into series, as if they were the files of one folder."""
    # Absolute: the grouping takes common paths, which cannot mix relative and absolute paths.
    paths = [path.absolute() for path in paths]
    return _load_dicom_files(paths, Path(os.path.commonpath([path.parent for path in paths])), "", budget)


def load_study(
    source: str | Path | Sequence[str | Path],
    series_names: Sequence[str] | None = None,
    study_description: str | None = None,
    *,
    archive_limits: ArchiveLimits = ArchiveLimits(),
    limits: StudyLimits = StudyLimits(),
) -> Study:
    """Load every usable series of a study, reoriented to L,P,S but not resampled.

    Args:
        source: a folder of DICOM files (any nesting, any names, several series), a ``.zip`` of such a
            folder, a NIfTI file, a folder of NIfTI files, or a sequence of any of these. The loose
            DICOM files of a sequence (files that are neither NIfTI nor zip) are grouped into series
            together, as the files of one folder are (e.g. the slices of a multi-file upload).
        series_names: one name per element of ``source`` (each must yield exactly one series); by
            default names come from SeriesDescription / ProtocolName or the NIfTI file name. With
            names, every element is loaded on its own, so each loose DICOM file must hold a whole
            series (an enhanced multi-frame object); single-slice files are skipped as such.
        study_description: overrides the DICOM StudyDescription.
        archive_limits: bounds on file count, uncompressed bytes and compression ratio when ``source``
            is a zip.
        limits: bounds on series, voxels and field of view (``prima.io.limits``), checked from the
            headers before voxels are decoded: a series over a per-series bound is skipped with the
            reason, a study over the study bounds is refused.

    Returns:
        A ``Study`` with the loaded series (in SeriesNumber order for DICOM, input order for NIfTI)
        and the skipped ones with their reasons.

    Raises:
        StudyLoadError: a source does not exist or is not a readable archive.
        UnsafeArchiveError: a zip with path traversal, links, or too many files/bytes.
        NoUsableSeriesError: nothing could be loaded; ``.skipped`` lists why.
        ValueError: ``series_names`` does not match ``source``.
    """
    sources = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    if not sources:
        raise StudyLoadError("no study source given")
    if series_names is not None and len(series_names) != len(sources):
        raise ValueError(f"series_names has {len(series_names)} names for {len(sources)} sources")
    loose = {path for path in sources if _is_loose_file(path)} if series_names is None else set()
    loose_loaded = False
    budget = StudyBudget(limits)
    all_series: list[Series] = []
    all_skipped: list[SkippedSeries] = []
    descriptions: list[str] = []
    for index, path in enumerate(sources):
        if path in loose:
            if loose_loaded:
                continue  # the group was loaded in the place of the first loose file
            loose_loaded = True
            series, skipped, description = _load_loose_files([p for p in sources if p in loose], budget)
        else:
            series, skipped, description = _load_one(path, archive_limits, budget)
        if series_names is not None:
            if len(series) + len(skipped) != 1:
                raise ValueError(f"{path} holds {len(series) + len(skipped)} series; series_names needs one "
                                 "series per source")
            for item in series + skipped:
                item.name = series_names[index]
        all_series += series
        all_skipped += skipped
        if description:
            descriptions.append(description)
    shown_source = str(sources[0]) if len(sources) == 1 else ", ".join(map(str, sources))
    if not all_series:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in all_skipped) or "no files found"
        raise NoUsableSeriesError(f"no usable series in {shown_source} ({reasons})", all_skipped)
    description = study_description if study_description is not None else (descriptions[0] if descriptions else "")
    return Study(description=description, series=all_series, skipped=all_skipped, source=shown_source)
