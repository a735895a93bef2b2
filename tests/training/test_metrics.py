"""Evaluation metrics on hand-computed examples, and the vectorised parts against their reference libraries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from prima.patching import DEFAULT_PATCH_SIZE, unpatchify
from training.metrics import (
    _resampled_aurocs,
    auroc,
    bootstrap_auroc_ci,
    calibration,
    choose_threshold,
    equal_opportunity,
    lime_top_k_hit,
    markdown_table,
    per_label_auroc,
    per_label_calibration,
    priority_correlation,
    priority_score,
    reliability_diagram,
    retrieval_top_k,
    token_overlap,
)

# Positives score .35, .8, .9 and negatives .1, .4, .2: of the 3 x 3 pairs, .35 beats .1 and .2 but not .4,
# .8 and .9 beat all three, so 8 of 9 pairs are concordant: AUROC = 8/9.
Y = np.array([0, 0, 1, 1, 0, 1])
S = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
PATCH = [32, 32, 4]  # as a release config holds it (a JSON list)


def _signal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + y


def test_auroc_hand_example_and_undefined_cases():
    assert auroc(Y, S) == pytest.approx(8 / 9)
    assert auroc(np.ones(4), S[:4]) is None
    assert auroc(np.zeros(4), S[:4]) is None
    with pytest.raises(ValueError, match="0/1"):
        auroc(np.array([0, 2, 1]), S[:3])
    with pytest.raises(ValueError, match="one length"):
        auroc(Y, S[:5])
    with pytest.raises(ValueError, match="finite"):
        auroc(Y, np.r_[S[:5], np.nan])


def test_resampled_aurocs_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 30), np.round(rng.normal(size=30), 1)  # rounded: many tied scores
    resamples = rng.integers(0, 30, size=(100, 30))
    resamples[0] = np.flatnonzero(y == 1)[0]  # a resample with one class only
    expected = [roc_auc_score(y[r], s[r]) if 0 < y[r].sum() < 30 else np.nan for r in resamples]
    np.testing.assert_allclose(_resampled_aurocs(y, s, resamples), expected, rtol=0, atol=1e-12)


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_more_data():
    widths = []
    for n in (100, 2000):
        y, s = _signal(n, seed=n)
        low, high = bootstrap_auroc_ci(y, s, n_boot=500, seed=0)
        assert low < auroc(y, s) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(n): 20 times the data, about 4.5 times narrower
    y, s = _signal(100, seed=1)
    assert bootstrap_auroc_ci(y, s, seed=3) == bootstrap_auroc_ci(y, s, seed=3)
    assert bootstrap_auroc_ci(y, s, seed=3) != bootstrap_auroc_ci(y, s, seed=4)
    assert bootstrap_auroc_ci(np.zeros(10), np.arange(10.0)) is None
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_auroc_ci(y, s, alpha=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auroc_ci(y, s, n_boot=0)


def test_per_label_auroc_scores_defined_labels_and_reports_the_others():
    labels = np.stack([Y, np.zeros(6, dtype=int), Y], axis=1)
    scores = np.stack([S, S, Y + 0.5 * S], axis=1)  # the third label is perfectly separated
    result = per_label_auroc(labels, scores, ["hand", "empty", "perfect"], n_boot=200)
    hand, empty = result["per_label"]["hand"], result["per_label"]["empty"]
    assert hand["auroc"] == pytest.approx(8 / 9) and hand["positives"] == 3
    assert hand["ci_low"] <= 8 / 9 <= hand["ci_high"]
    assert empty == {"auroc": None, "ci_low": None, "ci_high": None, "positives": 0}
    assert result["per_label"]["perfect"]["auroc"] == 1.0
    assert result["mean_auroc"] == pytest.approx((8 / 9 + 1) / 2)
    assert result["n_labels_scored"] == 2
    assert (result["min_label"], result["min_auroc"]) == ("hand", pytest.approx(8 / 9))
    # the perfect label is 1 in every resample, so the mean's interval is the hand label's, halved and moved
    assert result["mean_ci_low"] == pytest.approx((hand["ci_low"] + 1) / 2)
    assert result["mean_ci_high"] == pytest.approx((hand["ci_high"] + 1) / 2)
    no_ci = per_label_auroc(labels, scores, ["hand", "empty", "perfect"], n_boot=0)
    assert no_ci["per_label"]["hand"]["ci_low"] is None and no_ci["mean_auroc"] == result["mean_auroc"]
    assert no_ci["mean_ci_low"] is None and no_ci["mean_ci_high"] is None
    with pytest.raises(ValueError, match="disagree"):
        per_label_auroc(labels, scores, ["hand", "empty"])


def test_the_mean_aurocs_interval_narrows_with_more_studies():
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        labels = (rng.random((n, 4)) < 0.3).astype(int)
        result = per_label_auroc(labels, labels + rng.normal(0, 1.0, (n, 4)), list("abcd"), n_boot=300)
        assert result["mean_ci_low"] < result["mean_auroc"] < result["mean_ci_high"]
        return result["mean_ci_high"] - result["mean_ci_low"]

    assert width(400) < 0.6 * width(40)


def test_retrieval_identical_features_find_every_partner():
    features = np.random.default_rng(0).normal(size=(250, 16))
    result = retrieval_top_k(features, features.copy(), ks=(1, 5), group_size=100)
    assert (result["group_size"], result["n_groups"]) == (100, 2)  # the last 50 studies are dropped
    assert result["image_to_text"] == {"top1": 1.0, "top5": 1.0}
    assert result["text_to_image"] == {"top1": 1.0, "top5": 1.0}
    small = retrieval_top_k(features[:30], features[:30], group_size=100)
    assert (small["group_size"], small["n_groups"]) == (30, 1)


def test_retrieval_known_permutation():
    # Unit vectors at these angles (degrees); the reports of studies 0 and 1, and of 3 and 4, are swapped.
    # Studies 2 and 5 find their own report first. Study 0 (0 deg) ranks first report 1 (= image 0, 0 deg)
    # and second its own report (= image 1, 5 deg), the next candidate being 40 deg away; likewise for 1, 3
    # and 4, and the same holds from the reports' side. So top-1 = 2/6 and top-2 = 6/6 in both directions.
    angles = np.deg2rad([0, 5, 45, 90, 95, 150])
    images = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    reports = images[[1, 0, 2, 4, 3, 5]]
    result = retrieval_top_k(images, reports, ks=(1, 2), group_size=6, seed=7)
    for direction in ("image_to_text", "text_to_image"):
        assert result[direction]["top1"] == pytest.approx(1 / 3)
        assert result[direction]["top2"] == 1.0
    constant = retrieval_top_k(np.ones((5, 3)), np.ones((5, 3)), ks=(1,))  # ties count against the study
    assert constant["image_to_text"]["top1"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        retrieval_top_k(images, reports[:5])
    with pytest.raises(ValueError, match="zero"):
        retrieval_top_k(np.zeros((6, 2)), reports)


def test_priority_correlation_hand_example():
    probs = np.array([[0.8, 0.2, 0.0], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    tiers = np.array([0, 1, 2, 2])
    # score = (p1 + 2 p2) / 2: 0.1, 0.5, 0.8, 0.45
    np.testing.assert_allclose(priority_score(probs), [0.1, 0.5, 0.8, 0.45])
    result = priority_correlation(probs, tiers)
    # Spearman: score ranks 1, 3, 4, 2 against tier ranks 1, 2, 3.5, 3.5 (mean 2.5 both): deviations
    # (-1.5, .5, 1.5, -.5) and (-1.5, -.5, 1, 1), products summing to 3, squares to 5 and 4.5.
    assert result["spearman"] == pytest.approx(3 / math.sqrt(5 * 4.5))
    # Pearson: score deviations from .4625 are (-.3625, .0375, .3375, -.0125), tier deviations from 1.25
    # (-1.25, -.25, .75, .75): products sum to .6875, squares to .246875 and 2.75.
    assert result["pearson"] == pytest.approx(0.6875 / math.sqrt(0.246875 * 2.75))
    # argmax tiers 0, 1, 2, 0: the last study (tier 2) is called low
    assert result["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert result["accuracy"] == 0.75 and result["n"] == 4
    constant = priority_correlation(probs, np.array([1, 1, 1, 1]))
    assert constant["spearman"] is None and constant["pearson"] is None
    with pytest.raises(ValueError, match="summing to 1"):
        priority_correlation(probs * 2, tiers)
    with pytest.raises(ValueError, match="integer indices"):
        priority_correlation(probs, np.array([0, 1, 2, 3]))


def test_calibration_hand_example_and_diagram(tmp_path):
    # bin [0, .1]: one prediction of .05, observed 0 -> gap .05; bin (.1, .2]: two of .15, observed 1/2
    # -> gap .35; bin (.9, 1]: one of .95, observed 1 -> gap .05 (pooled over both labels).
    # ECE = 1/4 * .05 + 2/4 * .35 + 1/4 * .05 = .2
    y = np.array([[0, 1], [0, 1]])
    p = np.array([[0.05, 0.15], [0.15, 0.95]])
    result = calibration(y, p, n_bins=10)
    assert result["ece"] == pytest.approx(0.2)
    assert result["n"] == 4 and [b["count"] for b in result["bins"]] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert result["bins"][1]["mean_predicted"] == pytest.approx(0.15) and result["bins"][1]["observed"] == 0.5
    assert result["bins"][2]["mean_predicted"] is None and result["bins"][2]["observed"] is None
    png = reliability_diagram(result, tmp_path / "plots" / "reliability.png", title="hand")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="probabilities"):
        calibration(y, p + 1)


def test_calibration_bins_agree_with_sklearn():
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(size=500), np.linspace(0, 1, 11)]  # bin edges included
    y = (rng.uniform(size=len(p)) < p).astype(int)
    filled = [b for b in calibration(y, p, n_bins=10)["bins"] if b["count"]]
    observed, predicted = calibration_curve(y, p, n_bins=10)
    np.testing.assert_allclose([b["observed"] for b in filled], observed)
    np.testing.assert_allclose([b["mean_predicted"] for b in filled], predicted)


def test_per_label_calibration_hand_example():
    # label a: predicted .2 and .6 (mean .4), one positive of two (rate .5), Brier (.2^2 + .4^2) / 2 = .1;
    # label b: predicted .9 twice, no positive: mean .9, rate 0, Brier .81
    y = np.array([[0, 0], [1, 0]])
    p = np.array([[0.2, 0.9], [0.6, 0.9]])
    result = per_label_calibration(y, p, ["a", "b"])
    assert result["a"] == pytest.approx({"observed_rate": 0.5, "mean_predicted": 0.4, "brier": 0.1})
    assert result["b"] == pytest.approx({"observed_rate": 0.0, "mean_predicted": 0.9, "brier": 0.81})
    with pytest.raises(ValueError, match="do not match"):
        per_label_calibration(y, p, ["a"])
    with pytest.raises(ValueError, match="probabilities"):
        per_label_calibration(y, p + 1, ["a", "b"])


def test_choose_threshold_hand_example():
    # Thresholds .9, .8, .4, .35, .2, .1 give (TP, FP) = (1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (3, 3):
    # J = 1/3, 2/3, 1/3, 2/3, 1/3, 0: the tie between .8 and .35 goes to .8, midway to .4 -> .6.
    assert choose_threshold(Y, S) == pytest.approx(0.6)
    # F1 = 2TP / (TP + FP + 3) = 2/4, 4/5, 4/6, 6/7, 6/8, 6/9: best at .35, midway to .2 -> .275.
    assert choose_threshold(Y, S, rule="f1") == pytest.approx(0.275)
    # every score ranked the wrong way: J < 0 everywhere but at the lowest score (all positive), 1 below it
    assert choose_threshold(np.array([1, 0]), np.array([0.0, 1.0])) == -1.0
    assert choose_threshold(np.zeros(3), np.array([1.0, 2.0, 3.0])) == 0.0  # one class: the logit fallback
    # Y holds 3 positives: the rule needs at least min_positives of them, else the logit fallback
    assert choose_threshold(Y, S, min_positives=3) == pytest.approx(0.6)
    assert choose_threshold(Y, S, min_positives=4) == 0.0
    with pytest.raises(ValueError, match="unknown rule"):
        choose_threshold(Y, S, rule="accuracy")
    with pytest.raises(ValueError, match="min_positives"):
        choose_threshold(Y, S, min_positives=0)


def test_lime_hit_is_about_the_top_tokens_that_cover_the_mask():
    # a 64 x 64 x 8 axial grid, 2 x 2 x 2 patches of 32 x 32 x 4; the lesion sits inside patch (1, 0, 0)
    mask = np.zeros((64, 64, 8), dtype=bool)
    mask[40:44, 5:9, 1:3] = True
    coords = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(token_overlap(coords, mask, PATCH, 2), [0, 32 / 4096, 0, 0])
    assert lime_top_k_hit(np.array([0.1, 0.5, 0.2, 0.3]), coords, mask, PATCH, 2, k=1) is True
    weights = np.array([0.9, 0.5, 0.8, 0.7])  # the covering token is only 4th
    assert lime_top_k_hit(weights, coords, mask, PATCH, 2, k=3) is False
    assert lime_top_k_hit(weights, coords, mask, PATCH, 2, k=4) is True
    # a negative weight is not among the top tokens however few tokens there are
    assert lime_top_k_hit(np.array([0.2, -1.0, 0.0, 0.0]), coords, mask, PATCH, 2) is False
    assert lime_top_k_hit(weights, coords, np.zeros_like(mask), PATCH, 2) is None
    with pytest.raises(ValueError, match="outside the patch grid"):
        token_overlap(np.array([[2, 0, 0]]), mask, PATCH, 2)


def test_token_overlap_matches_the_heatmap_voxels_of_a_padded_coronal_grid():
    # what prima.explain.heatmap paints for a token (unpatchify of a constant patch) is its voxel box
    shape, through_axis = (40, 9, 70), 1
    mask = np.random.default_rng(0).uniform(size=shape) < 0.3
    coords = np.array([[0, 0, 0], [1, 2, 1], [0, 1, 2]])  # [1, 2, 1] and [0, 1, 2] reach the padding
    expected = []
    for c in coords:
        box = unpatchify(np.ones((1, 32, 32, 4), dtype=np.float32), c[None], shape, through_axis).astype(bool)
        expected.append(mask[box].sum() / (32 * 32 * 4))
    np.testing.assert_allclose(token_overlap(coords, mask, DEFAULT_PATCH_SIZE, through_axis), expected)


def test_equal_opportunity_hand_example():
    # label a: group F has 5 positives, 4 called (TPR .8); M has 5, 3 called (.6): disparity .2.
    # label b: F has 5 positives, all called (1.0); M only 2 (< 5, not scored): no disparity.
    groups = np.array(["F"] * 6 + ["M"] * 6)
    y_a = np.array([1, 1, 1, 1, 1, 0] * 2)
    called_a = np.array([1, 1, 1, 1, 0, 1] + [1, 1, 1, 0, 0, 0], dtype=bool)
    y_b = np.array([1, 1, 1, 1, 1, 0] + [1, 1, 0, 0, 0, 0])
    called_b = y_b.astype(bool)
    result = equal_opportunity(np.stack([y_a, y_b], 1), np.stack([called_a, called_b], 1), groups, ["a", "b"])
    assert result["groups"]["F"] == {"n": 6, "tpr": {"a": pytest.approx(0.8), "b": 1.0}}
    assert result["groups"]["M"] == {"n": 6, "tpr": {"a": pytest.approx(0.6), "b": None}}
    assert result["disparity"] == {"a": pytest.approx(0.2), "b": None}
    assert result["mean_disparity"] == pytest.approx(0.2) and result["n_labels_scored"] == 1
    lenient = equal_opportunity(np.stack([y_a, y_b], 1), np.stack([called_a, called_b], 1), groups, ["a", "b"],
                                min_positives=2)
    assert lenient["disparity"]["b"] == 0.0 and lenient["mean_disparity"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="bool"):
        equal_opportunity(np.stack([y_a, y_b], 1), np.stack([y_a, y_b], 1), groups, ["a", "b"])


def test_markdown_table():
    rows = [{"key": "a", "auroc": 0.12345, "n": 3}, {"key": "b|c", "auroc": None}]
    table = markdown_table(rows, [("key", "Label"), ("auroc", "AUROC"), ("n", "n")])
    assert table == "| Label | AUROC | n |\n|---|---|---|\n| a | 0.123 | 3 |\n| b\\|c | — | — |\n"
    with pytest.raises(ValueError, match="column"):
        markdown_table(rows, [])
