"""A ``manifest.jsonl`` from a health-system export: one folder per study with its series and report.

    python -m training.export_manifest EXPORT_DIR --out manifest.jsonl [--seed 0]

Layout (``docs/labeler.md``)::

    EXPORT_DIR/studies.csv                optional: study_id,patient_id,study_description[,split]
    EXPORT_DIR/<study_id>/report.txt      the study's report
    EXPORT_DIR/<study_id>/...             its series: DICOM series folders or files, NIfTI files, any nesting

Each study is loaded with ``prima.io.load_study`` (it has no header-only path, and loading is what
proves a series usable); a series enters the manifest under its description with the path that
``prima.manifest.load_entry_study`` loads back: its DICOM folder (or multi-frame file) or its NIfTI
file. Labels come from the report through ``training.labeler.ReportLabeler``; priority and referrals
follow from them through the label space. Splits come from the CSV, else from a hash of the patient id
and ``--seed`` (so all studies of a patient share a split). Studies without a usable series are skipped
with the reason printed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from prima.errors import NoUsableSeriesError
from prima.io import load_study
from prima.labels import default_label_space
from prima.manifest import KNOWN_SPLITS, SeriesEntry, StudyEntry, unique_series_name, write_manifest
from training.labeler import ReportLabeler

REPORT_NAME = "report.txt"
STUDIES_CSV = "studies.csv"
CSV_COLUMNS = ("study_id", "patient_id", "study_description")  # required; "split" is optional
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))  # by patient, as the synthetic engine draws them


@dataclass(frozen=True)
class StudyRow:
    patient_id: str  # splits never share a patient
    study_description: str  # "" lets the DICOM StudyDescription stand
    split: str | None  # "train", "val" or "test"; None: drawn from the patient id


@dataclass
class ExportSummary:
    manifest: Path  # the written manifest.jsonl
    studies: int  # studies written
    series: int  # series written, over all studies
    skipped: dict[str, str] = field(default_factory=dict)  # study id -> why it was left out
    label_counts: dict[str, int] = field(default_factory=dict)  # diagnosis key -> positive studies


def patient_split(patient_id: str, seed: int = 0) -> str:
    """The split of a patient: a uniform draw from a hash of ``seed`` and ``patient_id`` against
    ``SPLIT_FRACTIONS``; the same for every study of the patient and on every machine."""
    digest = hashlib.sha256(f"{seed}\0{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    for name, fraction in SPLIT_FRACTIONS:
        if u < fraction:
            return name
        u -= fraction
    return SPLIT_FRACTIONS[-1][0]


def read_studies_csv(path: Path | str) -> dict[str, StudyRow]:
    """The rows of ``studies.csv`` by study id (an empty patient_id makes the study its own patient).

    Raises:
        ValueError: a required column is missing, a study id is empty or repeats, or a split is not
            one of ``prima.manifest.KNOWN_SPLITS`` (an empty split is drawn).
    """
    rows: dict[str, StudyRow] = {}
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in CSV_COLUMNS if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            study_id = (row["study_id"] or "").strip()
            split = (row.get("split") or "").strip() or None
            if not study_id or study_id in rows:
                raise ValueError(f"{path}:{number}: study_id {study_id!r} is empty or repeats")
            if split is not None and split not in KNOWN_SPLITS:
                raise ValueError(f"{path}:{number}: split must be one of {KNOWN_SPLITS} or empty, got {split!r}")
            rows[study_id] = StudyRow((row["patient_id"] or "").strip() or study_id,
                                      (row["study_description"] or "").strip(), split)
    return rows


def study_series(study_dir: Path) -> tuple[list[SeriesEntry], str, list[str]]:
    """The loadable series of a study folder as manifest entries.

    A series is kept only when its path (the folder or file ``prima.io`` loaded it from) holds that
    series alone, so that ``load_entry_study`` loads it back; e.g. DICOM files lying loose in the study
    folder next to the report do not.

    Args:
        study_dir: one study of the export.

    Returns:
        (series entries with unique names, the DICOM StudyDescription or "", why other series were left out).

    Raises:
        NoUsableSeriesError: nothing in the folder could be loaded.
    """
    study_dir = study_dir.absolute()
    study = load_study(study_dir)
    report = study_dir / REPORT_NAME
    found = [(item, Path(item.source)) for item in (*study.series, *study.skipped)]
    notes = [f"{item.name}: {item.reason}" for item in study.skipped if Path(item.source) != report]
    entries: list[SeriesEntry] = []
    taken: set[str] = set()
    for series in study.series:
        path = Path(series.source)
        others = [item.name for item, source in found if item is not series and source.is_relative_to(path)]
        if others:
            notes.append(f"{series.name}: its path {path} also holds {', '.join(others)}; give each series its "
                         "own folder")
            continue
        entries.append(SeriesEntry(unique_series_name(series.name, taken), path))
    return entries, study.description, notes


def _study_folders(export_dir: Path) -> list[Path]:
    return sorted(p for p in export_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def build_export_manifest(export_dir: Path | str, out: Path | str, *, seed: int = 0,
                          labeler: ReportLabeler | None = None, progress: bool = True) -> ExportSummary:
    """Write the manifest of a health-system export (layout in the module docstring).

    Args:
        export_dir: folder with one sub-folder per study and an optional ``studies.csv``.
        out: the ``manifest.jsonl`` to write (paths are written relative to its folder when inside it).
        seed: salt of the per-patient split draw for studies without a split in the CSV.
        labeler: labels the reports; ``ReportLabeler()`` (rule judge) by default.
        progress: show a progress bar over the studies.

    Returns:
        What was written and what was skipped, with the positives per label.

    Raises:
        ValueError: ``export_dir`` is not a folder, ``studies.csv`` is malformed or puts a patient in two
            splits, or no study has a usable series.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ValueError(f"export folder {str(export_dir)!r} does not exist")
    csv_path = export_dir / STUDIES_CSV
    rows = read_studies_csv(csv_path) if csv_path.is_file() else {}
    if not rows:
        print(f"no {STUDIES_CSV}: each study is taken as its own patient and drawn into a split on its own")
    split_of_patient: dict[str, str] = {}  # the CSV's splits, which a patient's other studies follow
    for study_id, row in rows.items():
        if row.split is not None and split_of_patient.setdefault(row.patient_id, row.split) != row.split:
            raise ValueError(f"{csv_path}: patient {row.patient_id!r} is in both {split_of_patient[row.patient_id]!r} "
                             f"and {row.split!r} (study {study_id})")
    labeler = labeler if labeler is not None else ReportLabeler()
    space = default_label_space()
    entries: list[StudyEntry] = []
    summary = ExportSummary(Path(out), 0, 0)
    folders = _study_folders(export_dir)
    for folder in tqdm(folders, desc="studies", unit="study", disable=not progress):
        study_id = folder.name
        try:
            series, dicom_description, notes = study_series(folder)
        except NoUsableSeriesError as error:
            series, dicom_description, notes = [], "", [str(error)]
        if not series:
            summary.skipped[study_id] = "; ".join(notes)
            tqdm.write(f"skipped study {study_id}: no loadable series ({summary.skipped[study_id]})")
            continue
        if notes:
            tqdm.write(f"{study_id}: left out {'; '.join(notes)}")
        row = rows.get(study_id)
        if rows and row is None:
            tqdm.write(f"{study_id}: not in {STUDIES_CSV}; taken as its own patient")
        patient_id = row.patient_id if row else study_id
        split = split_of_patient.setdefault(patient_id, patient_split(patient_id, seed))
        report_path = folder / REPORT_NAME
        report = report_path.read_text(encoding="utf-8", errors="replace").strip() if report_path.is_file() else ""
        if not report_path.is_file():
            tqdm.write(f"{study_id}: no {REPORT_NAME}; written unlabelled")
        labels = labeler.label(report) if report_path.is_file() else {}
        positive = space.positives(labels)
        entries.append(StudyEntry(
            study_id=study_id, patient_id=patient_id, split=split,
            study_description=(row.study_description if row and row.study_description else dicom_description),
            series=tuple(series), report=report, labels=labels,
            priority=space.priority_of(positive) if labels else None,
            referrals=tuple(space.referrals_of(positive)),
        ))
    if not entries:
        raise ValueError(f"no study of {export_dir} has a loadable series")
    write_manifest(entries, out)
    counts = Counter(key for entry in entries for key in space.positives(entry.labels))
    summary.studies, summary.series = len(entries), sum(len(entry.series) for entry in entries)
    summary.label_counts = {key: counts[key] for key in space.diagnosis_keys if counts[key]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_manifest",
                                     description="Build manifest.jsonl from a health-system export.")
    parser.add_argument("export_dir", help="folder with one sub-folder per study (series + report.txt)")
    parser.add_argument("--out", required=True, help="manifest.jsonl to write")
    parser.add_argument("--seed", type=int, default=0, help="salt of the per-patient split draw")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = build_export_manifest(args.export_dir, args.out, seed=args.seed, progress=not args.no_progress)
    print(f"{summary.studies} studies, {summary.series} series written to {summary.manifest}; "
          f"{len(summary.skipped)} studies skipped")
    print("label_counts:")
    for key, count in summary.label_counts.items():
        print(f"  {count:6d}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
