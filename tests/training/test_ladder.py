"""training.ladder: the probes find a signal that is there, find none where there is none, and refuse what
they cannot score."""

from __future__ import annotations

import numpy as np
import pytest

from training.ladder import PROBE_FOLDS, abnormal_auroc, embedding_probe, token_lesion_probe


def _tokens(rng, separation: float, series: int = 12):
    latents, overlaps, owners = [], [], []
    for index in range(series):
        share = np.where(rng.random(60) < 0.2, rng.uniform(0.3, 1.0, 60), 0.0)
        share[rng.random(60) < 0.1] = 0.1  # partial tokens: neither lesion nor clean
        x = rng.normal(size=(60, 256)).astype(np.float32)
        x[:, 0] += separation * (share > 0.25)
        latents.append(x)
        overlaps.append(share)
        owners.append(index // 2)  # two series a study
    return latents, overlaps, owners


def test_token_probe_sees_a_lesion_signal_and_chance_without_one():
    rng = np.random.default_rng(0)
    strong = token_lesion_probe(*_tokens(rng, 4.0))
    assert strong["auroc"] > 0.95 and strong["studies"] == 6 and strong["lesion_tokens"] > 50
    none = token_lesion_probe(*_tokens(rng, 0.0))
    assert abs(none["auroc"] - 0.5) < 0.1
    assert token_lesion_probe([], [], [])["auroc"] is None
    with pytest.raises(ValueError, match="one entry per series"):
        token_lesion_probe([np.zeros((2, 256))], [], [0])


def test_embedding_probe_scores_out_of_fold():
    rng = np.random.default_rng(1)
    n, keys = 80, ["a", "b", "c"]
    diagnoses = np.zeros((n, 3), dtype=int)
    diagnoses[:20, 0] = 1
    diagnoses[20:40, 1] = 1
    diagnoses[40:42, 2] = 1  # fewer positives than folds: not probed
    embeddings = rng.normal(size=(n, 16))
    embeddings[:, 0] += 3.0 * diagnoses[:, 0]
    result = embedding_probe(embeddings, diagnoses, keys)
    assert result["per_label"]["a"] > 0.9 and abs(result["per_label"]["b"] - 0.5) < 0.2
    assert result["per_label"]["c"] is None and result["labels_probed"] == 2
    assert 0.5 < result["abnormal_auroc"] < 1.0  # half of the abnormal studies stand out
    with pytest.raises(ValueError, match="disagree"):
        embedding_probe(embeddings, diagnoses[:, :2], keys)
    assert PROBE_FOLDS == 5


def test_abnormal_auroc_reads_the_largest_probability():
    diagnoses = np.array([[0, 0], [1, 0], [0, 1], [0, 0]])
    probabilities = np.array([[0.1, 0.2], [0.9, 0.1], [0.1, 0.3], [0.25, 0.0]])
    # abnormal studies score 0.9 and 0.3, normal ones 0.2 and 0.25: every pair ordered right
    assert abnormal_auroc(diagnoses, probabilities) == 1.0
