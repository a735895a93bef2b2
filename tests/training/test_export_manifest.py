from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from prima.io import write_dicom_series
from prima.manifest import load_entry_study, read_manifest
from training.export_manifest import (
    SPLIT_FRACTIONS,
    build_export_manifest,
    main,
    patient_split,
    read_studies_csv,
)

MENINGIOMA = "tumor_adult_meningioma"
ICH = "vascular_hemorrhagic_intracranial_hemorrhage"
SDH = "trauma_subdural_hematoma"
ANEURYSM = "vascular_malformation_cerebral_aneurysm"
AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


def write_nifti(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(seed).integers(0, 500, (16, 16, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, AFFINE), str(path))


def write_dicom(folder: Path, name: str, number: int, study_description: str = "MRI BRAIN WO CONTRAST") -> None:
    volume = np.random.default_rng(number).integers(0, 500, (16, 16, 8)).astype(np.int16)
    write_dicom_series(volume, AFFINE, folder, series_description=name, study_description=study_description,
                       series_number=number, through_axis=2, uid_seed=f"export-{folder.parent.name}")


def make_export(root: Path) -> Path:
    """Four studies: two NIfTI, one DICOM, one with nothing loadable."""
    export = root / "export"
    write_nifti(export / "S1" / "nifti" / "AX_FLAIR.nii.gz", 1)
    write_nifti(export / "S1" / "T1.nii.gz", 2)
    (export / "S1" / "report.txt").write_text("1. No hemorrhage, but a large meningioma.\n2. No hydrocephalus.\n")
    write_nifti(export / "S2" / "AX_T2.nii.gz", 3)
    (export / "S2" / "report.txt").write_text("The subdural hematoma has resolved. Possible small aneurysm.")
    write_dicom(export / "S3" / "DICOM" / "series_2", "AX T2", 2)
    write_dicom(export / "S3" / "DICOM" / "series_3", "AX T2", 3)  # same description: the name is made unique
    (export / "S3" / "report.txt").write_text("Unremarkable MRI of the brain.")
    (export / "S4").mkdir()
    (export / "S4" / "notes.txt").write_text("not an image")
    (export / "S4" / "report.txt").write_text("Acute subdural hematoma.")
    return export


def test_builds_a_manifest_that_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = make_export(tmp_path)
    (export / "studies.csv").write_text("study_id,patient_id,study_description\n"
                                        "S1,P1,MRI BRAIN W WO\nS2,P1,\nS3,P2,\n")
    out = tmp_path / "out" / "manifest.jsonl"
    summary = build_export_manifest(export, out, progress=False)
    assert "skipped study S4" in capsys.readouterr().out
    assert (summary.studies, summary.series) == (3, 5) and set(summary.skipped) == {"S4"}
    entries = {entry.study_id: entry for entry in read_manifest(out)}
    assert sorted(entries) == ["S1", "S2", "S3"]

    s1, s2, s3 = entries["S1"], entries["S2"], entries["S3"]
    assert s1.patient_id == s2.patient_id == "P1" and s1.split == s2.split
    assert (s1.study_description, s2.study_description, s3.study_description) == (
        "MRI BRAIN W WO", "", "MRI BRAIN WO CONTRAST")  # CSV, none, DICOM StudyDescription
    assert s1.labels[MENINGIOMA] == 1 and s1.labels[ICH] == 0 and s1.labels["ventricular_ventriculomegaly"] == 0
    assert (s1.priority, s1.referrals) == ("medium", ("ns_oncology",))
    assert s2.labels[SDH] == 0 and s2.labels[ANEURYSM] == 1
    assert sum(s3.labels.values()) == 0 and s3.priority == "low" and s3.referrals == ()
    assert summary.label_counts == {MENINGIOMA: 1, ANEURYSM: 1}

    assert sorted(s.name for s in s1.series) == ["AX_FLAIR", "T1"]
    assert [s.name for s in s3.series] == ["AX T2", "AX T2_2"]
    assert all(s.path.is_dir() for s in s3.series) and all(s.path.is_file() for s in s1.series)
    for entry in entries.values():
        study = load_entry_study(entry)
        assert [s.name for s in study.series] == [s.name for s in entry.series]
        assert all(s.shape == (16, 16, 8) for s in study.series)


def test_series_that_do_not_own_their_path_are_left_out(tmp_path: Path) -> None:
    export = tmp_path / "export"
    # DICOM files loose in the study folder share it with the report: no path names that series alone.
    write_dicom(export / "S1", "AX T1", 1)
    (export / "S1" / "report.txt").write_text("Meningioma.")
    write_nifti(export / "S2" / "T1.nii.gz")
    summary = build_export_manifest(export, tmp_path / "manifest.jsonl", progress=False)
    assert "give each series its own folder" in summary.skipped["S1"]
    assert summary.studies == 1 and read_manifest(tmp_path / "manifest.jsonl")[0].labels == {}  # S2 has no report


def test_splits_are_drawn_per_patient(tmp_path: Path) -> None:
    export = tmp_path / "export"
    lines = ["study_id,patient_id,study_description"]
    for i in range(24):
        write_nifti(export / f"S{i:02d}" / "T1.nii.gz", i)
        lines.append(f"S{i:02d},P{i % 6},")
    (export / "studies.csv").write_text("\n".join(lines) + "\n")
    build_export_manifest(export, tmp_path / "manifest.jsonl", seed=3, progress=False)
    entries = read_manifest(tmp_path / "manifest.jsonl")  # would raise if a patient spanned two splits
    splits_of = {p: {e.split for e in entries if e.patient_id == p} for p in {e.patient_id for e in entries}}
    assert all(len(splits) == 1 for splits in splits_of.values()) and len(splits_of) == 6
    assert {p: splits.pop() for p, splits in splits_of.items()} == {p: patient_split(p, 3) for p in splits_of}

    drawn = Counter(patient_split(f"P{i}", 0) for i in range(4000))
    for name, fraction in SPLIT_FRACTIONS:
        assert abs(drawn[name] / 4000 - fraction) < 0.02
    assert patient_split("P1", 0) == patient_split("P1", 0)
    assert [patient_split(f"P{i}", 0) for i in range(50)] != [patient_split(f"P{i}", 1) for i in range(50)]


def test_csv_splits(tmp_path: Path) -> None:
    export = tmp_path / "export"
    for i in range(3):
        write_nifti(export / f"S{i}" / "T1.nii.gz", i)
    csv_path = export / "studies.csv"
    csv_path.write_text("study_id,patient_id,study_description,split\nS0,P0,,test\nS1,P0,,\nS2,P2,,val\n")
    build_export_manifest(export, tmp_path / "manifest.jsonl", progress=False)
    assert {e.study_id: e.split for e in read_manifest(tmp_path / "manifest.jsonl")} == {
        "S0": "test", "S1": "test", "S2": "val"}  # S1 follows its patient's CSV split

    csv_path.write_text("study_id,patient_id,study_description,split\nS0,P0,,test\nS1,P0,,train\n")
    with pytest.raises(ValueError, match="patient 'P0' is in both"):
        build_export_manifest(export, tmp_path / "manifest.jsonl", progress=False)
    csv_path.write_text("study_id,patient_id,study_description,split\nS0,P0,,holdout\n")
    with pytest.raises(ValueError, match="split must be one of"):
        read_studies_csv(csv_path)
    csv_path.write_text("study_id,study_description\nS0,\n")
    with pytest.raises(ValueError, match="missing column"):
        read_studies_csv(csv_path)
    csv_path.write_text("study_id,patient_id,study_description\nS0,P0,\nS0,P1,\n")
    with pytest.raises(ValueError, match="repeats"):
        read_studies_csv(csv_path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = make_export(tmp_path)
    out = tmp_path / "manifest.jsonl"
    assert main([str(export), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 studies, 5 series written" in printed and "1 studies skipped" in printed
    assert "label_counts:" in printed and MENINGIOMA in printed
    assert len(read_manifest(out)) == 3
    with pytest.raises(ValueError, match="does not exist"):
        build_export_manifest(tmp_path / "missing", out)
