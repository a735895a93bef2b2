"""training.evaluate: figures computed from known model outputs equal hand-computed ones; the unk-names
variant, the ladder and the conflicting-outputs count."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from prima.labels import default_label_space
from prima.manifest import read_manifest
from training.evaluate import FOCAL_DIAGNOSES, score, subgroups, unk_tokens
from training.token_cache import TokenCache

SPACE = default_label_space()
MENINGIOMA = SPACE.diagnosis_keys.index("tumor_adult_meningioma")


def _entries(tiny_dataset, labels_of_meningioma):
    (template, *_) = read_manifest(tiny_dataset)
    entries = []
    for i, flag in enumerate(labels_of_meningioma):
        labels = {key: 0 for key in SPACE.diagnosis_keys}
        labels["tumor_adult_meningioma"] = flag
        entries.append(dataclasses.replace(template, study_id=f"S{i}", labels=labels, priority=None, referrals=()))
    return entries


def test_known_outputs_give_hand_computed_aurocs(tiny_dataset):
    truth = [0, 0, 1, 1, 0, 1]
    entries = _entries(tiny_dataset, truth)
    n = len(entries)
    diagnosis = np.zeros((n, 52))
    # Meningioma scores [.1, .4, .35, .8, .2, .9]: of the 9 (positive, negative) pairs, only (.35, .4) is
    # ordered wrongly -> AUROC 8/9. Every other label has no positive and is left out of the mean.
    diagnosis[:, MENINGIOMA] = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    unk = diagnosis.copy()
    unk[:, MENINGIOMA] = [0.9, 0.4, 0.35, 0.8, 0.2, 0.1]  # positives .35, .8, .1 vs .9, .4, .2: 3 of 9 right
    priority = np.tile([0.2, 0.8, 0.0], (n, 1))
    outputs = {"diagnosis": diagnosis, "probability": 1 / (1 + np.exp(-diagnosis)), "positive": diagnosis > 0.5,
               "referral": np.zeros((n, len(SPACE.referral_keys))), "priority": priority}
    unk_outputs = {**outputs, "diagnosis": unk}
    features = np.eye(n, 8)
    baseline = {"mean_auroc": 0.5, "per_label": {}, "n_train": 10}
    result = score(entries, outputs, unk_outputs, features, features, np.eye(52, 8), SPACE, baseline, n_boot=50)
    assert result["diagnosis"]["per_label"]["tumor_adult_meningioma"]["auroc"] == pytest.approx(8 / 9)
    assert result["diagnosis"]["mean_auroc"] == pytest.approx(8 / 9) and result["diagnosis"]["n_labels_scored"] == 1
    assert result["diagnosis_unk_names"]["mean_auroc"] == pytest.approx(3 / 9)
    assert result["retrieval"]["image_to_text"]["top1"] == 1.0  # each study's own report is its nearest
    # ns_oncology follows meningioma; its scores are all equal -> AUROC 0.5
    assert result["referral"]["per_label"]["ns_oncology"]["auroc"] == pytest.approx(0.5)
    assert result["metadata_baseline"]["mean_auroc"] == 0.5
    # the tier truth: medium for meningioma, low otherwise; every prediction says medium
    assert result["priority"]["confusion_matrix"] == [[0, 3, 0], [0, 3, 0], [0, 0, 0]]
    meningioma = result["calibration_per_label"]["tumor_adult_meningioma"]
    assert meningioma["observed_rate"] == 0.5
    assert meningioma["mean_predicted"] == pytest.approx(np.mean(outputs["probability"][:, MENINGIOMA]))


def test_unk_tokens_hide_every_name_and_keep_the_tokens(tiny_dataset, tiny_token_cache):
    cache = TokenCache(tiny_token_cache)
    tokens = cache.study_tokens(cache.study_ids[0], "MRI BRAIN")
    hidden = unk_tokens(tokens)
    assert hidden.description == "unk" and {s.name for s in hidden.series} == {"unk"}
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(tokens.series, hidden.series))


def test_subgroups_and_focal_labels_are_known(tiny_dataset):
    entry = read_manifest(tiny_dataset)[0]
    groups = subgroups(entry)
    assert groups["vendor"] and groups["sex"] in ("F", "M") and groups["age group"]
    assert set(FOCAL_DIAGNOSES) <= set(SPACE.diagnosis_keys)


def test_a_token_memo_tokenizes_each_study_once_and_changes_no_figure(tiny_dataset, random_release_path, tmp_path,
                                                                      monkeypatch):
    import training.evaluate as evaluation

    calls = []
    tokenize = evaluation.tokenize_study
    monkeypatch.setattr(evaluation, "tokenize_study", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    options = dict(n_boot=0, lime_max=0, device="cpu", precision="fp32", progress=False)
    memo = {}
    first = evaluation.evaluate(random_release_path, tiny_dataset, out=tmp_path / "a", token_memo=memo, **options)
    assert len(calls) == first["studies"] == len(memo)
    second = evaluation.evaluate(random_release_path, tiny_dataset, out=tmp_path / "b", token_memo=memo, **options)
    assert len(calls) == first["studies"]  # the second evaluation tokenized nothing
    plain = evaluation.evaluate(random_release_path, tiny_dataset, out=tmp_path / "c", **options)
    for result in (second, plain):
        assert result["diagnosis"] == first["diagnosis"] and result["retrieval"] == first["retrieval"]


def test_releases_that_differ_only_in_their_thresholds_share_their_tokens(random_release_path, tmp_path):
    """The data-scaling points differ in weights and thresholds, not in what tokenizes: their memo is one."""
    import shutil

    from prima import load_release
    from training.evaluate import tokens_identity

    def variant(name: str, change) -> str:
        folder = shutil.copytree(random_release_path, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
        return tokens_identity(load_release(folder), "fp32")

    same = tokens_identity(load_release(random_release_path), "fp32")
    assert variant("thresholds", lambda c: c.update(diagnosis_thresholds=[0.5] * 52, referral_thresholds=[0.1] * 11)) \
        == same
    assert variant("preprocess", lambda c: c["preprocess"].update(min_slice_spacing_mm=6.0)) != same
    assert tokens_identity(load_release(random_release_path), "bf16") != same


def test_priority_conflicts_count_urgent_positives_read_as_least_urgent():
    from training.evaluate import priority_conflicts

    urgent = next(i for i, d in enumerate(SPACE.diagnoses) if d.tier == SPACE.priority_tiers[-1])
    mild = next(i for i, d in enumerate(SPACE.diagnoses) if d.tier == SPACE.priority_tiers[0])
    positive = np.zeros((4, 52), dtype=bool)
    positive[0, urgent] = positive[1, urgent] = positive[2, mild] = True
    priority = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    # studies 0 and 1 have an urgent positive; only study 0's priority reads the least urgent tier
    assert priority_conflicts(positive, priority, SPACE) == {"studies_with_urgent_positive": 2, "conflicts": 1,
                                                             "rate": 0.5}
    assert priority_conflicts(positive[2:], priority[2:], SPACE)["rate"] is None
