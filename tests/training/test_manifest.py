"""training.manifest: SPEC section 7 manifests are read, validated and written back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.manifest import read_manifest, write_manifest


def _record(study_id: str = "s1", patient_id: str = "p1", split: str = "train", **changes) -> dict:
    record = {
        "study_id": study_id,
        "patient_id": patient_id,
        "split": split,
        "study_description": "MRI BRAIN",
        "series": [{"name": "AX T1", "path": "s1/ax_t1.nii.gz"}, {"name": "SAG T2", "path": "/abs/sag.nii.gz"}],
        "report": "- no acute findings",
        "labels": {"stroke": 0, "tumor": 1},
        "priority": "medium",
        "lesion_masks": {"tumor": "s1/mask.nii.gz"},
        "site": "A",
    }
    record.update(changes)
    return record


def _write(path: Path, *records: dict | str) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n\n")
    return path


def test_read_resolves_paths_and_round_trips(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "manifest.jsonl", _record(), _record("s2", "p2", "val", labels={}))
    studies = read_manifest(manifest)
    assert [s.study_id for s in studies] == ["s1", "s2"]
    first = studies[0]
    assert first.series[0].path == tmp_path / "s1/ax_t1.nii.gz" and first.series[1].path == Path("/abs/sag.nii.gz")
    assert first.labels == {"stroke": 0, "tumor": 1} and first.priority == "medium" and first.extra == {"site": "A"}
    assert [s.study_id for s in read_manifest(manifest, ["val"])] == ["s2"]
    copy = write_manifest(studies, tmp_path / "copy" / "manifest.jsonl")
    assert read_manifest(copy) == studies  # series outside the new folder are written absolute
    assert json.loads(copy.read_text().splitlines()[0])["series"][1]["path"] == "/abs/sag.nii.gz"
    again = write_manifest(studies, tmp_path / "manifest2.jsonl")
    assert json.loads(again.read_text().splitlines()[0]) == _record()


@pytest.mark.parametrize(
    "records",
    [
        ["{not json"],
        [{k: v for k, v in _record().items() if k != "labels"}],
        [_record(split="training")],
        [_record(series=[])],
        [_record(series=[{"name": "AX T1"}])],
        [_record(labels={"tumor": 2})],
        [_record(), _record()],  # duplicate study id
        [_record("s1", "p1", "train"), _record("s2", "p1", "test")],  # one patient in two splits
    ],
)
def test_invalid_manifests_raise_value_error(tmp_path: Path, records: list) -> None:
    with pytest.raises(ValueError):
        read_manifest(_write(tmp_path / "manifest.jsonl", *records))


def test_unknown_split_filter_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_manifest(_write(tmp_path / "manifest.jsonl", _record()), ["holdout"])
