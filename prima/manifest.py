"""Study manifests (``manifest.jsonl``): the contract between a data export and everything that reads it.

One study per line (design notes: ``docs/design.md`` section 7)::

    {"study_id": "S0000042", "patient_id": "P0000042", "split": "train",
     "study_description": "MRI BRAIN WITH AND WITHOUT CONTRAST",
     "series": [{"name": "AX T2 FLAIR", "path": "studies/S0000042/01_AX_T2_FLAIR.nii.gz",
                 "sequence": "flair", "plane": "axial"}],
     "report": "1. ...", "labels": {"<diagnosis key>": 0 or 1, ...},
     "priority": "high", "referrals": ["ns_oncology"],
     "lesion_masks": {"AX T2 FLAIR": {"path": "masks/S0000042/01_AX_T2_FLAIR.nii.gz", "keys": ["..."]}},
     "subject": {"age": 63.2, "sex": "F"}, ...any other field...}

Required: ``study_id``, ``patient_id``, ``split``, ``study_description``, ``series`` (each with ``name``
and ``path``), ``report``, ``labels`` (may be ``{}`` for unlabelled exports). Optional: a series'
``sequence`` and ``plane``, ``priority``, ``referrals``, ``lesion_masks`` (series name -> 4D mask file
on that series' grid, one channel per key; ``{}`` says the study has no lesion), ``subject``. Any other field is kept as it was read and
written back unchanged. Paths may be absolute or relative to the manifest's folder; they are
resolved on reading and written relative to the manifest's folder when inside it.

The synthetic engine writes manifests through this module; the training stages and
``prima predict-batch`` read them through it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from prima.config import PLANES
from prima.errors import ManifestError

REQUIRED_FIELDS = ("study_id", "patient_id", "split", "study_description", "series", "report", "labels")
OPTIONAL_FIELDS = ("priority", "referrals", "lesion_masks", "subject")
KNOWN_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SeriesEntry:
    name: str  # series description as written by the scanner, e.g. "AX T2 FLAIR"
    path: Path  # DICOM series folder or NIfTI file, resolved against the manifest folder
    sequence: str | None = None  # sequence family when the export knows it, e.g. "flair"
    plane: str | None = None  # acquisition plane when the export knows it: axial, coronal or sagittal


@dataclass(frozen=True)
class LesionMask:
    path: Path  # NIfTI on the series' voxel grid; 4D with one channel per key (3D when one key)
    keys: tuple[str, ...]  # diagnosis key of each channel, in channel order


@dataclass(frozen=True)
class StudyEntry:
    study_id: str  # unique per manifest
    patient_id: str  # splits never share a patient
    split: str  # "train", "val" or "test"
    study_description: str  # e.g. "MRI BRAIN WITH AND WITHOUT CONTRAST"
    series: tuple[SeriesEntry, ...]  # at least one
    report: str  # free-text (summarised) report, may be empty
    labels: dict[str, int]  # diagnosis key -> 0/1; {} for an unlabelled export
    priority: str | None = None  # priority tier, when known
    referrals: tuple[str, ...] = ()  # referral keys, when known
    lesion_masks: dict[str, LesionMask] | None = None  # series name -> its mask; {} = no lesion; None = unknown
    subject: dict[str, Any] = field(default_factory=dict)  # age, sex, ... when the export records them
    extra: dict[str, Any] = field(default_factory=dict)  # every other field, kept for round trips


def unique_series_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... if already in ``taken`` (series names key a study's lesion
    masks, so they are unique within a study); the chosen name is added to ``taken``."""
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _resolve(path: str, base_dir: Path) -> Path:
    as_path = Path(path)
    return as_path if as_path.is_absolute() else base_dir / as_path


def _check_string_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ManifestError(f"{where}: {name} must be a list of strings")
    return tuple(value)


def _parse_series(series: Any, base_dir: Path, where: str) -> tuple[SeriesEntry, ...]:
    if not isinstance(series, list) or not series:
        raise ManifestError(f"{where}: series must be a non-empty list")
    entries = []
    for index, item in enumerate(series):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise ManifestError(f"{where}: series[{index}] must be an object with string 'name' and 'path'")
        unknown = set(item) - {"name", "path", "sequence", "plane"}
        if unknown:
            raise ManifestError(f"{where}: series[{index}] has unknown fields {sorted(unknown)}")
        sequence, plane = item.get("sequence"), item.get("plane")
        if sequence is not None and not isinstance(sequence, str):
            raise ManifestError(f"{where}: series[{index}].sequence must be a string")
        if plane is not None and plane not in PLANES:
            raise ManifestError(f"{where}: series[{index}].plane must be one of {PLANES}, got {plane!r}")
        entries.append(SeriesEntry(item["name"], _resolve(item["path"], base_dir), sequence, plane))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: series names must be unique within a study, got {names}")
    return tuple(entries)


def _parse_lesion_masks(value: Any, series_names: set[str], base_dir: Path, where: str) -> dict[str, LesionMask]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: lesion_masks must map series names to {{'path', 'keys'}} objects")
    masks = {}
    for name, mask in value.items():
        if name not in series_names:
            raise ManifestError(f"{where}: lesion_masks names series {name!r}, which the study does not list")
        if not isinstance(mask, dict) or not isinstance(mask.get("path"), str) or set(mask) != {"path", "keys"}:
            raise ManifestError(f"{where}: lesion_masks[{name!r}] must be an object with 'path' and 'keys'")
        masks[name] = LesionMask(_resolve(mask["path"], base_dir),
                                 _check_string_list(mask["keys"], where, f"lesion_masks[{name!r}].keys"))
    return masks


def parse_study(record: Any, base_dir: Path | str = ".", where: str = "record") -> StudyEntry:
    """Validate one manifest record and resolve its paths against ``base_dir``.

    Raises:
        ManifestError: a required field is missing or a field has the wrong type or value.
    """
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: a manifest line must be a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in ("study_id", "patient_id", "split", "study_description", "report"):
        if not isinstance(record[name], str):
            raise ManifestError(f"{where}: {name} must be a string")
    if record["split"] not in KNOWN_SPLITS:
        raise ManifestError(f"{where}: split must be one of {KNOWN_SPLITS}, got {record['split']!r}")
    base_dir = Path(base_dir)
    series = _parse_series(record["series"], base_dir, where)
    labels = record["labels"]
    if not isinstance(labels, dict) or any(type(value) is not int or value not in (0, 1) for value in labels.values()):
        raise ManifestError(f"{where}: labels must map diagnosis keys to 0 or 1")
    priority = record.get("priority")
    if priority is not None and not isinstance(priority, str):
        raise ManifestError(f"{where}: priority must be a string")
    subject = record.get("subject", {})
    if not isinstance(subject, dict):
        raise ManifestError(f"{where}: subject must be an object")
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    return StudyEntry(
        study_id=record["study_id"],
        patient_id=record["patient_id"],
        split=record["split"],
        study_description=record["study_description"],
        series=series,
        report=record["report"],
        labels=dict(labels),
        priority=priority,
        referrals=_check_string_list(record.get("referrals", []), where, "referrals"),
        lesion_masks=(None if record.get("lesion_masks") is None
                      else _parse_lesion_masks(record["lesion_masks"], {s.name for s in series}, base_dir, where)),
        subject=dict(subject),
        extra={key: value for key, value in record.items() if key not in known},
    )


def read_manifest(path: Path | str, splits: Iterable[str] | None = None) -> list[StudyEntry]:
    """All studies of a ``manifest.jsonl`` (blank lines skipped), optionally only the given splits.

    Raises:
        ManifestError: the file is missing, a line is not JSON or not a valid study, a study id
            repeats, or a patient appears in two splits.
    """
    path = Path(path)
    wanted = None if splits is None else set(splits)
    if wanted is not None and not wanted <= set(KNOWN_SPLITS):
        raise ManifestError(f"splits must be among {KNOWN_SPLITS}, got {sorted(wanted)}")
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist")
    studies: list[StudyEntry] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            studies.append(parse_study(record, path.parent, where=f"{path}:{number}"))
    _check_consistency(studies, path)
    return [study for study in studies if wanted is None or study.split in wanted]


def _check_consistency(studies: list[StudyEntry], path: Path) -> None:
    seen_ids: set[str] = set()
    split_of_patient: dict[str, str] = {}
    for study in studies:
        if study.study_id in seen_ids:
            raise ManifestError(f"{path}: study_id {study.study_id!r} appears twice")
        seen_ids.add(study.study_id)
        previous = split_of_patient.setdefault(study.patient_id, study.split)
        if previous != study.split:
            raise ManifestError(f"{path}: patient {study.patient_id!r} is in both {previous!r} and {study.split!r}")


def study_record(study: StudyEntry, base_dir: Path | str | None = None) -> dict:
    """The JSON object of a study; paths are written relative to ``base_dir`` when inside it.

    Optional fields are written only when set, so a record read and written back is unchanged.
    """
    def relative(path: Path) -> str:
        if base_dir is not None:
            try:
                return path.resolve().relative_to(Path(base_dir).resolve()).as_posix()
            except ValueError:
                pass
        return str(path)

    def series_record(series: SeriesEntry) -> dict:
        record = {"name": series.name, "path": relative(series.path)}
        record.update({key: value for key, value in (("sequence", series.sequence), ("plane", series.plane))
                       if value is not None})
        return record

    record: dict[str, Any] = {
        "study_id": study.study_id,
        "patient_id": study.patient_id,
        "split": study.split,
        "study_description": study.study_description,
        "series": [series_record(s) for s in study.series],
        "report": study.report,
        "labels": dict(study.labels),
    }
    if study.priority is not None:
        record["priority"] = study.priority
    if study.referrals:
        record["referrals"] = list(study.referrals)
    if study.lesion_masks is not None:
        record["lesion_masks"] = {name: {"path": relative(mask.path), "keys": list(mask.keys)}
                                  for name, mask in study.lesion_masks.items()}
    if study.subject:
        record["subject"] = dict(study.subject)
    record.update(study.extra)
    return record


def manifest_line(study: StudyEntry, base_dir: Path | str | None = None) -> str:
    """One manifest line (newline included), byte-stable for equal studies."""
    return json.dumps(study_record(study, base_dir), ensure_ascii=False) + "\n"


def write_manifest(studies: Iterable[StudyEntry], path: Path | str) -> Path:
    """Write studies as ``manifest.jsonl`` (paths relative to its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for study in studies:
            out.write(manifest_line(study, path.parent))
    return path


def load_entry_study(study: StudyEntry):
    """Load the series a manifest study lists, each under its manifest name (``prima.io.Study``).

    Raises:
        NoUsableSeriesError: none of the series could be loaded (``.skipped`` says why).
        StudyLoadError: a series path does not exist or holds more than one series.
    """
    from prima.io import load_study  # DICOM/NIfTI readers are heavy; reading manifests does not need them

    return load_study([series.path for series in study.series], series_names=[series.name for series in study.series],
                      study_description=study.study_description)


def manifest_digest(path: Path | str) -> str:
    """SHA-256 of the manifest's bytes: what caches built from it are keyed by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
