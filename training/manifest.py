"""Read, validate and write study manifests (``manifest.jsonl``, SPEC section 7).

One study per line. Series paths may be absolute or relative to the manifest's folder; they are
resolved on reading. Used by every training stage (tokenizer, CLIP, heads), so it knows nothing of
any one stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REQUIRED_FIELDS = ("study_id", "patient_id", "split", "study_description", "series", "report", "labels")
KNOWN_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SeriesEntry:
    name: str  # series description as written by the scanner, e.g. "AX T2 FLAIR"
    path: Path  # DICOM series folder or NIfTI file, resolved against the manifest folder


@dataclass(frozen=True)
class StudyEntry:
    study_id: str  # unique per study
    patient_id: str  # splits must never share a patient
    split: str  # "train", "val" or "test"
    study_description: str  # e.g. "MRI BRAIN WITH AND WITHOUT CONTRAST"
    series: tuple[SeriesEntry, ...]  # at least one
    report: str  # free-text (summarised) report, may be empty
    labels: dict[str, int]  # diagnosis key -> 0/1
    priority: str | None = None  # optional priority tier
    referrals: tuple[str, ...] = ()  # optional referral keys
    lesion_masks: Any = None  # optional, engine-specific (kept as read)
    extra: dict[str, Any] = field(default_factory=dict)  # any other fields, kept for round trips


def parse_study(record: dict, base_dir: Path | str = ".", where: str = "record") -> StudyEntry:
    """Validate one manifest record and resolve its series paths against ``base_dir``.

    Raises:
        ValueError: a required field is missing or has the wrong type.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a manifest line must be a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in ("study_id", "patient_id", "split", "study_description", "report"):
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: {name} must be a string")
    if record["split"] not in KNOWN_SPLITS:
        raise ValueError(f"{where}: split must be one of {KNOWN_SPLITS}, got {record['split']!r}")
    series = record["series"]
    if not isinstance(series, list) or not series:
        raise ValueError(f"{where}: series must be a non-empty list")
    entries = []
    for index, item in enumerate(series):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise ValueError(f"{where}: series[{index}] must be an object with string 'name' and 'path'")
        path = Path(item["path"])
        entries.append(SeriesEntry(name=item["name"], path=path if path.is_absolute() else Path(base_dir) / path))
    labels = record["labels"]
    if not isinstance(labels, dict) or any(value not in (0, 1) for value in labels.values()):
        raise ValueError(f"{where}: labels must map diagnosis keys to 0 or 1")
    known = set(REQUIRED_FIELDS) | {"priority", "referrals", "lesion_masks"}
    return StudyEntry(
        study_id=record["study_id"],
        patient_id=record["patient_id"],
        split=record["split"],
        study_description=record["study_description"],
        series=tuple(entries),
        report=record["report"],
        labels={str(key): int(value) for key, value in labels.items()},
        priority=record.get("priority"),
        referrals=tuple(record.get("referrals") or ()),
        lesion_masks=record.get("lesion_masks"),
        extra={key: value for key, value in record.items() if key not in known},
    )


def read_manifest(path: Path | str, splits: Iterable[str] | None = None) -> list[StudyEntry]:
    """All studies of a ``manifest.jsonl`` (blank lines skipped), optionally only the given splits.

    Raises:
        ValueError: a line is not JSON or not a valid study, a study id repeats, or a patient
            appears in two splits.
        FileNotFoundError: the manifest does not exist.
    """
    path = Path(path)
    wanted = None if splits is None else set(splits)
    if wanted is not None and not wanted <= set(KNOWN_SPLITS):
        raise ValueError(f"splits must be among {KNOWN_SPLITS}, got {sorted(wanted)}")
    studies: list[StudyEntry] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            studies.append(parse_study(record, path.parent, where=f"{path}:{number}"))
    _check_consistency(studies, path)
    return [study for study in studies if wanted is None or study.split in wanted]


def _check_consistency(studies: list[StudyEntry], path: Path) -> None:
    seen_ids: set[str] = set()
    split_of_patient: dict[str, str] = {}
    for study in studies:
        if study.study_id in seen_ids:
            raise ValueError(f"{path}: study_id {study.study_id!r} appears twice")
        seen_ids.add(study.study_id)
        previous = split_of_patient.setdefault(study.patient_id, study.split)
        if previous != study.split:
            raise ValueError(f"{path}: patient {study.patient_id!r} is in both {previous!r} and {study.split!r}")


def study_record(study: StudyEntry, base_dir: Path | str | None = None) -> dict:
    """The JSON object of a study; series paths are written relative to ``base_dir`` when inside it."""
    def relative(path: Path) -> str:
        if base_dir is not None:
            try:
                return str(path.resolve().relative_to(Path(base_dir).resolve()))
            except ValueError:
                pass
        return str(path)

    record = {
        "study_id": study.study_id,
        "patient_id": study.patient_id,
        "split": study.split,
        "study_description": study.study_description,
        "series": [{"name": s.name, "path": relative(s.path)} for s in study.series],
        "report": study.report,
        "labels": dict(study.labels),
    }
    if study.priority is not None:
        record["priority"] = study.priority
    if study.referrals:
        record["referrals"] = list(study.referrals)
    if study.lesion_masks is not None:
        record["lesion_masks"] = study.lesion_masks
    record.update(study.extra)
    return record


def write_manifest(studies: Iterable[StudyEntry], path: Path | str) -> Path:
    """Write studies as ``manifest.jsonl`` (series paths relative to its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for study in studies:
            out.write(json.dumps(study_record(study, path.parent)) + "\n")
    return path
