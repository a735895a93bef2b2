"""The shipped prima-lite release (assets/weights/prima-lite/, made by `python -m training.release --config
training/configs/release-lite.yaml`): it loads, predicts, fits the size budget, and its model card carries the
evaluation it ships with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prima import load_release
from prima.predict import predict
from training.release import card_from_files

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "weights" / "prima-lite"
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "glioma_high_grade.zip"

pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped release yet")


def test_shipped_release_fits_the_size_budget():
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) <= 30 * 2**20


def test_shipped_release_loads_and_predicts_an_example():
    release = load_release(SHIPPED)
    assert release.heads is not None and release.volume_tokenizer is not None
    prediction = predict(EXAMPLE, release, device="cpu")
    assert len(prediction.diagnoses) == 52 and len(prediction.referrals) == 11


def test_a_positive_finding_shows_on_the_apps_plain_probability_axis():
    """The app's charts read probabilities on a 0-1 axis (app.charts.PROBABILITY_AXIS): a positive bar is at least
    as long as its threshold, so no threshold may sit below a twentieth of the axis."""
    heads = load_release(SHIPPED).heads
    assert float(torch.sigmoid(heads.diagnosis_thresholds).min()) >= 0.05
    assert float(torch.sigmoid(heads.referral_thresholds).min()) >= 0.05


def test_model_card_carries_the_shipped_evaluation_and_how_it_was_made():
    card = (SHIPPED / "README.md").read_text(encoding="utf-8")
    evaluation = SHIPPED / "evaluation"
    # the card is read on the stratified test set: every label has >= 5 positives there
    read_on = json.loads((evaluation / "test_set" / "eval.json").read_text(encoding="utf-8"))
    assert (evaluation / "test_set" / "eval.md").read_text(encoding="utf-8").strip() in card
    assert min(row["positives"] for row in read_on["diagnosis"]["per_label"].values()) >= 5
    assert "not for clinical use" in card and "python -m training.release --config" in card
    result = json.loads((evaluation / "eval.json").read_text(encoding="utf-8"))
    provenance = json.loads((evaluation / "provenance.json").read_text(encoding="utf-8"))
    shipped_config = json.loads((SHIPPED / "config.json").read_text(encoding="utf-8"))
    assert result["split"] == "test" and provenance["config"]["model"] == shipped_config["name"]
    assert (evaluation / "reliability.png").stat().st_size > 0


def test_shipped_card_is_what_the_card_code_writes_from_the_release_files():
    assert card_from_files(SHIPPED) == (SHIPPED / "README.md").read_text(encoding="utf-8")
