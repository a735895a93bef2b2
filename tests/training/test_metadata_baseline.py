"""Metadata-only baseline: it reads only the manifest, finds nothing on a protocol-blind test split and
finds the leak where the test split's protocols follow the indication."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prima.manifest import StudyEntry, read_manifest, write_manifest
from training.metadata_baseline import main, metadata_baseline, run
from training.synth.study import is_protocol_blind, plan_study, study_split
from training.synth.writers import plan_entry

# Metadata-only studies (plan_study, no images) on a coarse phantom: ~13 ms each, and their labels are
# those of generate_study at this spacing. The split of a study is known before planning it, so the
# test plans only what it scores: a test split larger than 10% of the studies, for a steadier mean.
SEED = 0
SPACING = 6.0
N_TRAIN = 800  # indication-driven, as the default setting draws the train split
N_TEST_BLIND = 500  # protocol-blind, as the default setting draws val and test
N_TEST_DRIVEN = 300  # the first of those test studies again, indication-driven


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> tuple[Path, Path]:
    """Two manifests with the same train studies: one with the default protocol-blind test split, one
    with an indication-driven test split (same studies, same labels: only their metadata differ)."""
    root = tmp_path_factory.mktemp("metadata")
    picked: dict[str, list[int]] = {"train": [], "test": []}
    wanted = {"train": N_TRAIN, "test": N_TEST_BLIND}
    index = 0
    while any(len(picked[s]) < n for s, n in wanted.items()):
        split = study_split(SEED, index)
        if split in picked and len(picked[split]) < wanted[split]:
            picked[split].append(index)
        index += 1

    def entry(i: int, blind: bool) -> StudyEntry:
        return plan_entry(plan_study(SEED, i, protocol_blind=blind, spacing=SPACING), root)

    train = [entry(i, is_protocol_blind("heldout", "train")) for i in picked["train"]]
    blind = [entry(i, is_protocol_blind("heldout", "test")) for i in picked["test"]]
    driven = [entry(i, False) for i in picked["test"][:N_TEST_DRIVEN]]
    return (write_manifest(train + blind, root / "blind_test.jsonl"),
            write_manifest(train + driven, root / "driven_test.jsonl"))


@pytest.fixture(scope="module")
def results(manifests) -> tuple[dict, dict]:
    """The baseline on the protocol-blind and on the indication-driven test split."""
    return run(manifests[0]), run(manifests[1])


def test_baseline_reads_only_the_manifest(manifests):
    studies = read_manifest(manifests[0])
    assert not any(s.path.exists() for e in studies for s in e.series)  # there are no images
    assert [e.extra["protocol_blind"] for e in studies] == [e.split == "test" for e in studies]
    assert not any(e.extra["protocol_blind"] for e in read_manifest(manifests[1]))


def test_baseline_is_at_chance_on_a_protocol_blind_test_split(results):
    blind, _ = results
    assert (blind["n_train"], blind["n_test"]) == (N_TRAIN, N_TEST_BLIND)
    assert blind["n_labels_scored"] >= 48
    assert blind["mean_auroc"] <= 0.55, blind["mean_auroc"]  # measured 0.507
    assert blind["abnormal_auroc"] <= 0.6, blind["abnormal_auroc"]  # measured 0.515


def test_baseline_finds_the_leak_of_an_indication_driven_test_split(results):
    blind, driven = results
    assert driven["n_test"] == N_TEST_DRIVEN
    assert driven["mean_auroc"] >= 0.60, driven["mean_auroc"]  # measured 0.675
    assert driven["mean_auroc"] >= blind["mean_auroc"] + 0.1
    assert driven["abnormal_auroc"] >= blind["abnormal_auroc"] + 0.1  # measured 0.706 against 0.515


def test_cli_writes_json_and_prints_the_top_labels(manifests, tmp_path, capsys):
    _, driven = manifests
    out = tmp_path / "sub" / "baseline.json"
    assert main([str(driven), "--split", "test", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"per_label", "mean_auroc", "n_train", "n_test", "positives", "split", "manifest_sha256"}
    assert len(result["per_label"]) == 52 and result["split"] == "test"
    for key, auroc in result["per_label"].items():
        if result["positives"][key] in (0, result["n_test"]):
            assert auroc is None  # no positive (or no negative) in the test split: not scored
    printed = capsys.readouterr().out.splitlines()
    assert f"{result['mean_auroc']:.3f}" in printed[0]
    assert len(printed) == 6  # the mean, then the five highest labels


def test_bad_splits_raise(manifests):
    blind, _ = manifests
    studies = read_manifest(blind)
    with pytest.raises(ValueError):
        metadata_baseline(studies, split="train")
    with pytest.raises(ValueError):
        metadata_baseline([s for s in studies if s.split == "train"])
    with pytest.raises(SystemExit):
        main([str(blind), "--split", "train"])
