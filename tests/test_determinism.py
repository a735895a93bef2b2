"""Determinism on CPU: the same study gives bitwise-identical predictions and LIME weights in this
process and in fresh processes (the app's precision, ``auto``, and the shipped release)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = r"""
import json, sys
from prima.explain import explain
from prima.predict import predict
release, study = sys.argv[1], sys.argv[2]
prediction = predict(study, release, device="cpu", return_embedding=True)
lime = explain(prediction.tokens, release, prediction.differential[0].key, 0, num_samples=64, seed=3, device="cpu")
print(json.dumps({"logits": [d.logit.hex() for d in prediction.diagnoses],
                  "priority": [p.hex() for p in prediction.priority.probs.values()],
                  "embedding": [v.hex() for v in prediction.embedding],
                  "lime": [w.hex() for w in lime.weights.tolist()], "r2": lime.r2.hex()}))
"""
RELEASE = REPO / "assets" / "weights" / "prima-lite"
STUDY = REPO / "assets" / "examples" / "normal_dwi.zip"


def fingerprint_in_subprocess() -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(RELEASE), str(STUDY)], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_predictions_and_lime_are_bitwise_identical_across_processes():
    from prima.explain import explain
    from prima.predict import predict

    prediction = predict(STUDY, RELEASE, device="cpu", return_embedding=True)
    lime = explain(prediction.tokens, RELEASE, prediction.differential[0].key, 0, num_samples=64, seed=3, device="cpu")
    here = {"logits": [d.logit.hex() for d in prediction.diagnoses],
            "priority": [p.hex() for p in prediction.priority.probs.values()],
            "embedding": [v.hex() for v in prediction.embedding],
            "lime": [w.hex() for w in lime.weights.tolist()], "r2": lime.r2.hex()}
    first, second = fingerprint_in_subprocess(), fingerprint_in_subprocess()
    assert first == second == here
