"""CLI: ``python -m training.synth`` writes a manifest and files that do not depend on the worker count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prima.manifest import read_manifest
from training.synth.__main__ import main
from training.synth.writers import label_count_summary, label_counts


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_is_identical_for_one_and_two_workers(tmp_path):
    args = ["--n", "3", "--seed", "4", "--spacing", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert one.keys() == two.keys()
    assert one == two  # manifest and every NIfTI byte for byte
    lines = (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["study_id"] for r in records] == ["S0000000", "S0000001", "S0000002"]
    for record in records:
        assert record["protocol_blind"] == (record["split"] != "train")  # default: held-out splits blind
        for series in record["series"]:
            assert (tmp_path / "one" / series["path"]).is_file()
    config = json.loads((tmp_path / "one" / "synth_config.json").read_text())
    assert config["protocol_blind"] == "heldout" and config["metadata_only"] is False


@pytest.mark.parametrize("setting", ["all", "none"])
def test_metadata_only_manifest_records_the_protocol_blind_setting(tmp_path, setting):
    assert main(["--n", "12", "--seed", "3", "--spacing", "6", "--metadata-only", "--protocol-blind", setting,
                 "--out", str(tmp_path), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["protocol_blind"] for r in records] == [setting == "all"] * 12
    assert not (tmp_path / "studies").exists()  # no images
    assert json.loads((tmp_path / "synth_config.json").read_text())["protocol_blind"] == setting


def test_balance_is_recorded_and_label_counts_are_printed(tmp_path, capsys):
    assert main(["--n", "10", "--seed", "3", "--spacing", "6", "--metadata-only", "--balance", "1", "--workers", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "synth_config.json").read_text())["balance"] == 1.0
    err = capsys.readouterr().err.splitlines()
    summary = label_count_summary(label_counts(tmp_path / "manifest.jsonl"))
    assert summary and err[-len(summary):] == summary  # the release log ends with the positives per split


def test_primary_keys_are_recorded_and_every_study_has_one(tmp_path):
    keys = ["tumor_adult_meningioma", "cyst_colloid_cyst"]
    assert main(["--n", "6", "--seed", "3", "--spacing", "6", "--metadata-only", "--workers", "1", "--no-progress",
                 "--primary", *keys, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "synth_config.json").read_text())["primary"] == keys
    assert all(any(e.labels[k] for k in keys) for e in read_manifest(tmp_path / "manifest.jsonl"))


def test_stratify_is_recorded_and_gives_each_split_its_share_of_every_label(tmp_path):
    assert main(["--n", "140", "--seed", "0", "--spacing", "6", "--metadata-only", "--balance", "1", "--stratify",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "synth_config.json").read_text())["stratify"] is True
    counts = label_counts(tmp_path / "manifest.jsonl")
    # 140 studies leave ~67 abnormal ones in train: every label is the primary diagnosis of one or two.
    assert min(counts["train"].values()) >= 1


def test_shift_is_recorded_and_moves_the_subjects(tmp_path):
    args = ["--n", "4", "--seed", "3", "--spacing", "6", "--metadata-only", "--workers", "1", "--no-progress"]
    for shift in ("0", "1"):
        assert main([*args, "--shift", shift, "--out", str(tmp_path / shift)]) == 0
    assert json.loads((tmp_path / "1" / "synth_config.json").read_text())["shift"] == 1.0
    assert json.loads((tmp_path / "0" / "synth_config.json").read_text())["shift"] == 0.0
    records = {s: [json.loads(line) for line in (tmp_path / s / "manifest.jsonl").read_text().splitlines()]
               for s in ("0", "1")}
    for training, shifted in zip(records["0"], records["1"]):
        assert (training["study_id"], training["split"]) == (shifted["study_id"], shifted["split"])
        assert training["subject"]["age"] == shifted["subject"]["age"]
        assert abs(shifted["subject"]["rotation_deg"][0]) >= 15.0  # beyond 3 SD (5 degrees) of pitch


def test_module_entry_point_runs(tmp_path):
    out = tmp_path / "ds"
    result = subprocess.run(
        [sys.executable, "-m", "training.synth", "--n", "1", "--out", str(out), "--spacing", "3",
         "--format", "dicom", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "studies/min" in result.stderr
    record = json.loads((out / "manifest.jsonl").read_text())
    assert list((out / record["series"][0]["path"]).glob("*.dcm"))


@pytest.mark.parametrize("bad", [["--n", "0"], ["--workers", "0"], ["--format", "png"], ["--protocol-blind", "x"],
                                 ["--balance", "2"], ["--shift", "-1"], ["--shift", "1.5"],
                                 ["--primary", "not_a_diagnosis"]])
def test_bad_arguments_exit_with_usage_error(tmp_path, bad):
    with pytest.raises(SystemExit) as error:
        main([*bad, "--out", str(tmp_path)])
    assert error.value.code == 2


def test_one_split_drawn_alone_is_that_split_of_the_whole_set(tmp_path):
    args = ["--n", "30", "--seed", "5", "--spacing", "6", "--metadata-only", "--balance", "1", "--stratify",
            "--no-progress", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "val"), "--only-split", "val"]) == 0
    assert main([*args, "--out", str(tmp_path / "train3"), "--only-split", "train", "--first", "3"]) == 0
    whole = (tmp_path / "whole" / "manifest.jsonl").read_text().splitlines()
    split_of = [json.loads(line)["split"] for line in whole]
    val = (tmp_path / "val" / "manifest.jsonl").read_text().splitlines()
    assert val and val == [line for line, split in zip(whole, split_of) if split == "val"]
    train3 = (tmp_path / "train3" / "manifest.jsonl").read_text().splitlines()
    assert train3 == [line for line, split in zip(whole, split_of) if split == "train"][:3]
    config = json.loads((tmp_path / "train3" / "synth_config.json").read_text())
    assert config["only_split"] == "train" and config["first"] == 3


def test_one_split_drawn_alone_writes_the_same_images(tmp_path):
    # seed 4 with these fractions: study 0 is a training study, study 1 the first test study
    args = ["--n", "2", "--seed", "4", "--spacing", "6", "--split-fractions", "0.5", "0", "0.5", "--no-progress",
            "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "test"), "--only-split", "test", "--first", "1"]) == 0
    [record] = [json.loads(line) for line in (tmp_path / "test" / "manifest.jsonl").read_text().splitlines()]
    assert record["split"] == "test" and record["study_id"] == "S0000001"
    for series in record["series"]:
        path = Path(series["path"])
        assert (tmp_path / "test" / path).read_bytes() == (tmp_path / "whole" / path).read_bytes()


@pytest.mark.parametrize("bad", [["--only-split", "val", "--n", "1"], ["--first", "0"], ["--only-split", "dev"]])
def test_bad_split_choices_are_usage_errors(tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["--n", "4", "--metadata-only", "--no-progress", "--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2
    assert not (tmp_path / "manifest.jsonl").exists()
