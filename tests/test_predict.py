"""prima.predict: the prediction of a whole study from any release (random weights here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.errors import NoUsableSeriesError, ReleaseError
from prima.io import load_study
from prima.labels import default_label_space
from prima.predict import LabelScore, get_release, predict, priority_score, series_outputs
from prima.release import load_release, save_release
from prima.tokens import tokenize_study

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


@pytest.fixture(scope="module")
def study():
    return load_study(EXAMPLES / "normal_dwi.zip")


@pytest.fixture(scope="module")
def prediction(study, random_release):
    return predict(study, random_release, device="cpu", precision="fp32", return_embedding=True)


def test_prediction_json_schema(prediction, random_release, study):
    doc = json.loads(prediction.to_json())
    assert set(doc) == {"study", "series", "skipped", "diagnoses", "priority", "referrals", "model", "timings_s",
                        "embedding", "abnormal", "differential"}
    assert doc["abnormal"] is None  # heads on the study embedding have no abnormal output
    space = random_release.config.label_space
    assert [d["key"] for d in doc["diagnoses"]] == list(space.diagnosis_keys)
    assert [r["key"] for r in doc["referrals"]] == list(space.referral_keys)
    for score in doc["diagnoses"] + doc["referrals"]:
        assert set(score) == {"key", "name", "logit", "prob", "threshold", "positive"}
        assert score["prob"] == pytest.approx(1 / (1 + math.exp(-score["logit"])))
        assert score["positive"] == (score["logit"] > score["threshold"])
    margins = {d["key"]: d["logit"] - d["threshold"] for d in doc["diagnoses"]}
    assert doc["differential"] == sorted(margins, key=margins.get, reverse=True)
    assert set(doc["priority"]["probs"]) == {"low", "medium", "high"}
    assert sum(doc["priority"]["probs"].values()) == pytest.approx(1.0)
    assert doc["priority"]["tier"] == max(doc["priority"]["probs"], key=doc["priority"]["probs"].get)
    assert set(doc["priority"]) == {"tier", "probs", "findings_tier", "worklist_tier", "raised_by"}
    assert [s["name"] for s in doc["series"]] == [s.name for s in study.series]
    assert all(0 < s["tokens_kept"] <= s["tokens_total"] for s in doc["series"])
    assert doc["study"] == {"description": study.description}  # nothing that identifies the patient
    assert doc["model"] == {"name": "prima-lite", "revision": None}
    assert set(doc["timings_s"]) == {"tokens", "model", "total"}
    assert len(doc["embedding"]) == random_release.model.visual.study_dim


def _scores(space, positive: set[str]) -> list[LabelScore]:
    return [LabelScore(d.key, d.name, 1.0 if d.key in positive else -1.0, 0.5, 0.0, d.key in positive)
            for d in space.diagnoses]


def test_worklist_tier_is_never_below_a_positive_findings_tier():
    space = default_label_space()
    low, medium, high = space.priority_tiers
    urgent = [d.key for d in space.diagnoses if d.tier == high][:2]
    routine = next(d.key for d in space.diagnoses if d.tier == low)
    # the head reads LOW while two HIGH-tier findings are positive: raised, both named
    raised = priority_score([0.7, 0.2, 0.1], _scores(space, {*urgent, routine}), space)
    assert (raised.tier, raised.findings_tier, raised.worklist_tier) == (low, high, high)
    assert raised.raised_by == urgent
    # the head already reads HIGH, or nothing urgent is positive: the head's tier stands, no conflict
    agreed = priority_score([0.1, 0.2, 0.7], _scores(space, set(urgent)), space)
    assert (agreed.worklist_tier, agreed.raised_by) == (high, [])
    calm = priority_score([0.2, 0.7, 0.1], _scores(space, {routine}), space)
    assert (calm.tier, calm.findings_tier, calm.worklist_tier, calm.raised_by) == (medium, low, medium, [])
    assert priority_score([0.2, 0.7, 0.1], _scores(space, set()), space).findings_tier == low
    with pytest.raises(ValueError, match="3 tier probabilities"):
        priority_score([0.5, 0.5], _scores(space, set()), space)


def test_split_path_equals_the_full_forward(study, random_release, prediction):
    tokens = tokenize_study(study, random_release, precision="fp32")
    model = random_release.model
    batch = model.pack([[(t.features, t.name) for t in tokens.series]], [tokens.description])
    with torch.no_grad():
        embedding, vectors = model.visual(batch)
        logits = random_release.heads(embedding).diagnosis_logits[0]
    torch.testing.assert_close(vectors, series_outputs(random_release, tokens, None).vectors, rtol=1e-5, atol=1e-5)
    got = torch.tensor([d.logit for d in prediction.diagnoses])
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)


def test_bitwise_deterministic_on_cpu(study, random_release, prediction):
    again = predict(study, random_release, device="cpu", precision="fp32", return_embedding=True)
    assert [d.logit for d in again.diagnoses] == [d.logit for d in prediction.diagnoses]
    assert again.embedding == prediction.embedding


def test_precision_does_not_change_the_top_five(study, random_release, prediction):
    bf16 = predict(study, random_release, device="cpu", precision="bf16")
    assert [d.key for d in bf16.differential[:5]] == [d.key for d in prediction.differential[:5]]


def test_a_path_is_loaded_once_and_progress_is_reported(random_release_path):
    assert get_release(random_release_path, "cpu") is get_release(random_release_path, "cpu")
    seen = []
    result = predict(EXAMPLES / "normal_dwi.zip", random_release_path, device="cpu",
                     progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any(stage.startswith("tokenizing") for _, stage in seen) and "load" in result.timings_s


def test_release_without_heads_or_study_without_series_raise(random_release, tmp_path):
    save_release(tmp_path, random_release.model, report_tokenizer=random_release.report_tokenizer,
                 volume_tokenizer=random_release.volume_tokenizer)
    with pytest.raises(ReleaseError, match="no task heads"):
        predict(EXAMPLES / "normal_dwi.zip", load_release(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoUsableSeriesError):
        predict(empty, random_release)
    assert np.isfinite([d.logit for d in predict(EXAMPLES / "normal_dwi.zip", random_release).diagnoses]).all()


def test_a_token_pooling_release_reads_deviations_and_pools_the_whole_batch_forward(study, pooling_release):
    """prima-lite-head: the tokens carry their place deviations, and each diagnosis logit is what the heads make of
    the one-batch forward of every series (the split path of series vectors and token scores changes nothing)."""
    tokens = tokenize_study(study, pooling_release, precision="fp32")
    assert all(s.deviations is not None and s.deviations.shape == s.latents.shape for s in tokens.series)
    assert all(torch.equal(s.features[:, :256], s.deviations) for s in tokens.series)
    model, heads = pooling_release.model, pooling_release.heads
    batch = model.pack([[(t.features, t.name) for t in tokens.series]], [tokens.description])
    with torch.no_grad():
        embedding, _, token_outputs = model.visual.encode(batch)
        expected = heads.on_batch(embedding, token_outputs, batch)
    prediction = predict(study, pooling_release, device="cpu", precision="fp32")
    got = torch.tensor([d.logit for d in prediction.diagnoses])
    torch.testing.assert_close(got, expected.diagnosis_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r.logit for r in prediction.referrals]), expected.referral_logits[0],
                               rtol=1e-5, atol=1e-5)
    assert prediction.abnormal == pytest.approx(float(expected.abnormal_logits[0].sigmoid()), abs=1e-5)
