"""training.evaluate: figures computed from known model outputs equal hand-computed ones; the unk-names
variant and the lesion masks on the series grid."""

from __future__ import annotations

import dataclasses

import nibabel as nib
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


def test_lesion_masks_land_on_the_series_grid_where_the_lesion_is(tiny_dataset, random_release_path, tmp_path):
    """The mask resampled by lesion_mask_on_grid covers the same voxels as the mask file loaded and
    preprocessed like a series (prima.io -> LPS -> 256 in-plane): no flip, no shift."""
    from prima import load_release
    from prima.io import load_study
    from prima.preprocess import preprocess_series
    from prima.tokens import tokenize_study
    from training.evaluate import lesion_mask_on_grid

    release = load_release(random_release_path)
    entry = next(e for e in read_manifest(tiny_dataset) if e.lesion_masks and any(
        key in FOCAL_DIAGNOSES for mask in e.lesion_masks.values() for key in mask.keys))
    name, lesion = next((n, m) for n, m in entry.lesion_masks.items() if any(k in FOCAL_DIAGNOSES for k in m.keys))
    key = next(k for k in lesion.keys if k in FOCAL_DIAGNOSES)
    series_entry = next(s for s in entry.series if s.name == name)
    tokens = next(s for s in tokenize_study(load_study([series_entry.path], series_names=[name]), release).series)
    on_grid = lesion_mask_on_grid(entry, name, key, tokens, release.config.preprocess)
    assert on_grid is not None and on_grid.shape == tuple(tokens.shape)
    image = nib.load(str(lesion.path))
    channel = np.asarray(image.dataobj, dtype=np.float32)
    if channel.ndim == 4:
        channel = channel[..., lesion.keys.index(key)]
    nib.save(nib.Nifti1Image(channel, image.affine), tmp_path / "mask.nii.gz")
    (mask_series,) = load_study([tmp_path / "mask.nii.gz"]).series  # the mask loaded like any series
    reference = preprocess_series(mask_series, release.config.preprocess).array > 0.5
    assert reference.shape == on_grid.shape
    overlap = (reference & on_grid).sum() / (reference | on_grid).sum()
    assert overlap > 0.8


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
