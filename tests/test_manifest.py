"""prima.manifest: manifests are read, validated and written back unchanged, every field included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prima.errors import ManifestError
from prima.manifest import LesionMask, manifest_digest, read_manifest, write_manifest


def _record(study_id: str = "s1", patient_id: str = "p1", split: str = "train", **changes) -> dict:
    record = {
        "study_id": study_id,
        "patient_id": patient_id,
        "split": split,
        "study_description": "MRI BRAIN",
        "series": [{"name": "AX T1", "path": "s1/ax_t1.nii.gz", "sequence": "t1", "plane": "axial"},
                   {"name": "SAG T2", "path": "/abs/sag.nii.gz"}],
        "report": "1. Glioma.",
        "labels": {"stroke": 0, "tumor": 1},
        "priority": "medium",
        "referrals": ["ns_oncology"],
        "lesion_masks": {"AX T1": {"path": "masks/s1/ax_t1.nii.gz", "keys": ["tumor", "edema"]}},
        "subject": {"age": 63.2, "sex": "F"},
        "site": "A",
    }
    record.update(changes)
    return record


def _write(path: Path, *records: dict | str) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n\n")
    return path


def test_read_resolves_paths_and_every_field_round_trips(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "manifest.jsonl", _record(), _record("s2", "p2", "val", labels={}))
    studies = read_manifest(manifest)
    assert [s.study_id for s in studies] == ["s1", "s2"]
    first = studies[0]
    assert first.series[0].path == tmp_path / "s1/ax_t1.nii.gz" and first.series[1].path == Path("/abs/sag.nii.gz")
    assert (first.series[0].sequence, first.series[0].plane) == ("t1", "axial")
    assert (first.series[1].sequence, first.series[1].plane) == (None, None)
    assert first.labels == {"stroke": 0, "tumor": 1} and first.priority == "medium"
    assert first.referrals == ("ns_oncology",) and first.subject == {"age": 63.2, "sex": "F"}
    assert first.lesion_masks == {"AX T1": LesionMask(tmp_path / "masks/s1/ax_t1.nii.gz", ("tumor", "edema"))}
    assert first.extra == {"site": "A"}
    assert [s.study_id for s in read_manifest(manifest, ["val"])] == ["s2"]
    copy = write_manifest(studies, tmp_path / "copy" / "manifest.jsonl")
    assert read_manifest(copy) == studies  # paths outside the new folder are written absolute
    assert json.loads(copy.read_text().splitlines()[0])["series"][1]["path"] == "/abs/sag.nii.gz"
    again = write_manifest(studies, tmp_path / "manifest2.jsonl")
    assert [json.loads(line) for line in again.read_text().splitlines()] == [
        _record(), _record("s2", "p2", "val", labels={})]


def test_digest_changes_with_the_bytes(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "manifest.jsonl", _record())
    before = manifest_digest(manifest)
    assert before == manifest_digest(manifest) and len(before) == 64
    _write(manifest, _record(report="2. Edema."))
    assert manifest_digest(manifest) != before


@pytest.mark.parametrize(
    "records",
    [
        ["{not json"],
        [{k: v for k, v in _record().items() if k != "labels"}],
        [_record(split="training")],
        [_record(series=[])],
        [_record(series=[{"name": "AX T1"}])],
        [_record(series=[{"name": "AX T1", "path": "a"}, {"name": "AX T1", "path": "b"}])],  # names repeat
        [_record(series=[{"name": "AX T1", "path": "a", "plane": "oblique"}])],
        [_record(series=[{"name": "AX T1", "path": "a", "echo": 2}])],  # unknown series field
        [_record(labels={"tumor": 2})],
        [_record(labels={"tumor": True})],
        [_record(referrals="ns_oncology")],
        [_record(lesion_masks={"COR T2": {"path": "m", "keys": ["tumor"]}})],  # not a series of the study
        [_record(lesion_masks={"AX T1": "m.nii.gz"})],
        [_record(subject=[1])],
        [_record(), _record()],  # duplicate study id
        [_record("s1", "p1", "train"), _record("s2", "p1", "test")],  # one patient in two splits
    ],
)
def test_invalid_manifests_raise_manifest_error(tmp_path: Path, records: list) -> None:
    with pytest.raises(ManifestError):
        read_manifest(_write(tmp_path / "manifest.jsonl", *records))


def test_missing_manifest_and_unknown_split_filter_raise(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nothing.jsonl")
    with pytest.raises(ManifestError, match="splits must be among"):
        read_manifest(_write(tmp_path / "manifest.jsonl", _record()), ["holdout"])
