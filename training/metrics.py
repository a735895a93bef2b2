"""Evaluation metrics of a Prima release: pure functions of numpy arrays, JSON-ready results.

``training.evaluate`` runs a release over a manifest and hands the outputs to these functions:

- :func:`auroc`, :func:`bootstrap_auroc_ci`, :func:`per_label_auroc`: diagnosis AUROC with study-bootstrap
  percentile intervals.
- :func:`retrieval_top_k`: the paper's image <-> report retrieval within random groups of studies.
- :func:`priority_correlation`: the normalised priority score against the true tier.
- :func:`calibration`, :func:`reliability_diagram`: pooled reliability bins, ECE and their plot.
- :func:`choose_threshold`: a validation-set operating threshold (Youden's J or max F1).
- :func:`token_overlap`, :func:`lime_top_k_hit`: do the top LIME tokens fall inside the lesion.
- :func:`equal_opportunity`: per-subgroup true-positive rates and their spread.
- :func:`markdown_table`: the report's tables.

Results hold Python floats, ints, lists and dicts, with None where a value is undefined (one class only,
too few positives, a constant input), so they go to ``json.dumps`` unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from prima.patching import patch_grid_shape, patchify

THRESHOLD_RULES = ("youden", "f1")
# choose_threshold's answer when the validation labels hold one class only: logit 0, probability 0.5.
FALLBACK_LOGIT_THRESHOLD = 0.0
# How far below the lowest score choose_threshold puts a threshold that must classify every study positive.
BELOW_LOWEST_SCORE = 1.0


def _binary_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y as int64 0/1, scores as float64), both 1-D of one length, scores finite; ValueError otherwise."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and scores must be 1-D of one length, got shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        raise ValueError("y_true and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold 0/1 labels, got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    return y.astype(np.int64), s


def _label_matrix(labels: np.ndarray, name: str) -> np.ndarray:
    """(N, C) int64 0/1 matrix; ValueError when it is not one."""
    y = np.asarray(labels)
    if y.ndim != 2 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be an (N, C) matrix of 0/1 labels, got shape {y.shape}")
    return y.astype(np.int64)


def _check_probabilities(probs: np.ndarray) -> None:
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("probs must be probabilities in [0, 1] (apply a sigmoid to logits)")


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < len(y)


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); None when only one class is present.

    Raises:
        ValueError: labels other than 0/1, mismatched or empty inputs, non-finite scores.
    """
    y, s = _binary_inputs(y_true, scores)
    return float(roc_auc_score(y, s)) if _both_classes(y) else None


def _resampled_aurocs(y: np.ndarray, scores: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """AUROC of each resample (a row of study indices), NaN where a resample has one class only.

    The Mann-Whitney U statistic, all resamples at once: a resample is a count of positives and of
    negatives at each distinct score, and U sums, over the positives, the negatives scored below them
    plus half those tied with them; no per-resample sort.
    """
    n_boot = len(resamples)
    distinct, level = np.unique(scores, return_inverse=True)
    n_levels = len(distinct)
    cells = (np.arange(n_boot)[:, None] * n_levels + level[resamples]).ravel()
    picked = y[resamples].ravel()
    pos = np.bincount(cells, weights=picked, minlength=n_boot * n_levels).reshape(n_boot, n_levels)
    neg = np.bincount(cells, weights=1 - picked, minlength=n_boot * n_levels).reshape(n_boot, n_levels)
    below = np.cumsum(neg, axis=1) - neg
    u = (pos * (below + 0.5 * neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, u / pairs, np.nan)


def bootstrap_auroc_ci(
    y_true: np.ndarray, scores: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUROC over resamples of the studies.

    Args:
        y_true: (N,) 0/1 labels.
        scores: (N,) scores (any monotone units: logits or probabilities).
        n_boot: resamples drawn (each of N studies, with replacement); those with one class are skipped.
        alpha: the interval covers 1 - alpha.
        seed: seeds the resamples, so every label of one evaluation sees the same resampled studies.

    Returns:
        (low, high), or None when the data, or every resample, has only one class.

    Raises:
        ValueError: bad labels or scores (as :func:`auroc`), n_boot < 1, alpha outside (0, 1).
    """
    y, s = _binary_inputs(y_true, scores)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not _both_classes(y):
        return None
    return _percentile_interval(_resampled_aurocs(y, s, _resamples(len(y), n_boot, seed)), alpha)


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) study indices drawn with replacement; one seed gives every label the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of resampled values, NaN (a resample with one class) left out; None if all are."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _mean_over_labels(resampled: np.ndarray) -> np.ndarray:
    """Each resample's mean of (L, n_boot) resampled AUROCs over the labels defined in it (NaN if none)."""
    counted = ~np.isnan(resampled)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted, resampled, 0.0).sum(axis=0) / counted.sum(axis=0)


def per_label_auroc(
    labels: np.ndarray, scores: np.ndarray, keys: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict:
    """AUROC of every label with its bootstrap interval, and their summary.

    Args:
        labels: (N, C) 0/1 labels.
        scores: (N, C) scores, column c for label ``keys[c]``.
        keys: C label keys.
        n_boot: bootstrap resamples per label; 0 skips the intervals (ci_low and ci_high None).
        seed: bootstrap seed (the same resamples for every label).

    Returns:
        ``{"per_label": {key: {"auroc", "ci_low", "ci_high", "positives"}}, "mean_auroc", "mean_ci_low",
        "mean_ci_high", "n_labels_scored", "min_auroc", "min_label"}``: a label without a positive or without a
        negative has auroc None and is left out of the mean and the minimum (both None when no label is
        scored). The mean's interval resamples the studies once for every label together (a resample's mean
        over the scored labels that have both classes in it), so it holds the labels' correlation.

    Raises:
        ValueError: shapes that disagree with each other or with ``keys``, a negative n_boot.
    """
    y = _label_matrix(labels, "labels")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape or len(keys) != y.shape[1]:
        raise ValueError(f"labels {y.shape}, scores {s.shape} and {len(keys)} keys disagree")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    per_label: dict[str, dict] = {}
    # The resamples bootstrap_auroc_ci draws with this seed, shared by every label's interval and the mean's.
    resamples = _resamples(len(y), n_boot, seed) if n_boot else None
    resampled: list[np.ndarray] = []
    for c, key in enumerate(keys):
        value = auroc(y[:, c], s[:, c])
        ci = None
        if resamples is not None and value is not None:
            resampled.append(_resampled_aurocs(y[:, c], s[:, c], resamples))
            ci = _percentile_interval(resampled[-1])
        per_label[key] = {"auroc": value, "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                          "positives": int(y[:, c].sum())}
    scored = {key: row["auroc"] for key, row in per_label.items() if row["auroc"] is not None}
    min_label = min(scored, key=scored.__getitem__) if scored else None
    mean_ci = _percentile_interval(_mean_over_labels(np.array(resampled))) if resampled else None
    return {
        "per_label": per_label,
        "mean_auroc": float(np.mean(list(scored.values()))) if scored else None,
        "mean_ci_low": mean_ci[0] if mean_ci else None,
        "mean_ci_high": mean_ci[1] if mean_ci else None,
        "n_labels_scored": len(scored),
        "min_auroc": scored[min_label] if min_label is not None else None,
        "min_label": min_label,
    }


def _unit_rows(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all() or not np.isfinite(norms).all():
        raise ValueError(f"{name} has zero or non-finite rows: cosine similarity is undefined")
    return x / norms


def retrieval_top_k(
    image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5), group_size: int = 100,
    seed: int = 0,
) -> dict:
    """The paper's retrieval: each study's report among those of a random group of studies, and back.

    The studies are shuffled (seeded) into groups of ``group_size``; a last group smaller than that is
    dropped, unless there are fewer than ``group_size`` studies, which then form one group. In a group,
    every image ranks the group's reports by cosine similarity (image -> text) and every report ranks the
    images (text -> image); a hit at k is the study's own partner within the first k. A tie with another
    candidate counts against the study, so a model that scores everything alike gets no hits.

    Args:
        image_features: (N, D) study embeddings in the joint space.
        text_features: (N, D) report embeddings, row i being study i's report.
        ks: the k of each top-k accuracy (>= 1; a k at or above the group size scores 1).
        group_size: studies per group (the paper's 100).
        seed: seeds the shuffle.

    Returns:
        ``{"group_size", "n_groups", "image_to_text": {"top1": ..., ...}, "text_to_image": {...}}``: the
        group size used, the number of groups and the mean over groups of each top-k accuracy.

    Raises:
        ValueError: mismatched or empty features, zero rows, no ks, a k or group_size below 1.
    """
    image, text = _unit_rows(image_features, "image_features"), _unit_rows(text_features, "text_features")
    if image.shape != text.shape:
        raise ValueError(f"image_features {image.shape} and text_features {text.shape} must have one shape")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of ints >= 1, got {ks!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = len(image)
    size = min(group_size, n)
    n_groups = n // size
    groups = np.random.default_rng(seed).permutation(n)[: n_groups * size].reshape(n_groups, size)
    similarity = image[groups] @ text[groups].transpose(0, 2, 1)  # (groups, images, reports)
    own = np.diagonal(similarity, axis1=1, axis2=2)  # (groups, studies): each study with its own report
    # 0-based rank of the own partner among the candidates; a tie counts against it
    ranks = {"image_to_text": (similarity >= own[:, :, None]).sum(axis=2) - 1,
             "text_to_image": (similarity >= own[:, None, :]).sum(axis=1) - 1}
    result: dict = {"group_size": size, "n_groups": n_groups}
    for direction, rank in ranks.items():
        result[direction] = {f"top{k}": float((rank < k).mean(axis=1).mean()) for k in ks}
    return result


def priority_score(tier_probs: np.ndarray) -> np.ndarray:
    """(N,) normalised priority score in [0, 1]: the expected tier index / (n_tiers - 1), as ``prima``'s
    explained "priority" target."""
    probs = np.asarray(tier_probs, dtype=np.float64)
    return probs @ np.arange(probs.shape[1]) / (probs.shape[1] - 1)


def priority_correlation(tier_probs: np.ndarray, tiers: np.ndarray) -> dict:
    """The normalised priority score against the true tier, and the argmax tier's confusion matrix.

    Args:
        tier_probs: (N, T) tier probabilities (softmax of the priority logits), T >= 2, rows summing to 1.
        tiers: (N,) true tier indices in [0, T).

    Returns:
        ``{"n", "spearman", "pearson", "accuracy", "confusion_matrix"}``: the correlations of the score
        (:func:`priority_score`) with the tier index (None when either is constant), the argmax accuracy
        and the T x T confusion matrix as lists, row = true tier, column = argmax tier.

    Raises:
        ValueError: shapes, probabilities or tier indices out of range.
    """
    probs = np.asarray(tier_probs, dtype=np.float64)
    truth = np.asarray(tiers)
    if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) == 0 or truth.shape != (len(probs),):
        raise ValueError(f"tier_probs must be (N, T >= 2) and tiers (N,), got {probs.shape} and {truth.shape}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("tier_probs rows must be probabilities summing to 1 (apply a softmax to logits)")
    n_tiers = probs.shape[1]
    if not np.issubdtype(truth.dtype, np.integer) or truth.min() < 0 or truth.max() >= n_tiers:
        raise ValueError(f"tiers must be integer indices in [0, {n_tiers}), got {np.unique(truth)[:10].tolist()}")
    score = priority_score(probs)
    defined = np.ptp(score) > 0 and np.ptp(truth) > 0  # a constant input has no correlation
    predicted = probs.argmax(axis=1)
    return {
        "n": len(truth),
        "spearman": float(spearmanr(score, truth).statistic) if defined else None,
        "pearson": float(pearsonr(score, truth).statistic) if defined else None,
        "accuracy": float((predicted == truth).mean()),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=np.arange(n_tiers)).tolist(),
    }


def calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability bins and expected calibration error, pooled over every label.

    The bins split [0, 1] evenly and hold (low, high] (the first also 0), as
    ``sklearn.calibration.calibration_curve`` bins; that function drops empty bins and does not count,
    and ECE and the diagram need the counts, so the bins are summed here.

    Args:
        y_true: 0/1 labels, (N,) or (N, C).
        probs: predicted probabilities of the same shape, in [0, 1].
        n_bins: number of equal-width bins.

    Returns:
        ``{"n", "n_bins", "ece", "bins": [{"low", "high", "count", "mean_predicted", "observed"}]}``: every
        bin, an empty one with count 0 and None means; ece = sum over bins of count / n * |observed -
        mean_predicted|.

    Raises:
        ValueError: mismatched or empty inputs, labels other than 0/1, probabilities outside [0, 1], n_bins < 1.
    """
    y, p = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"y_true and probs must have one non-empty shape, got {y.shape} and {p.shape}")
    y, p = y.ravel(), p.ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels")
    _check_probabilities(p)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(bin_of, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(bin_of, weights=p, minlength=n_bins) / counts
        observed = np.bincount(bin_of, weights=y, minlength=n_bins) / counts
    filled = counts > 0
    ece = float((counts[filled] / len(p) * np.abs(observed[filled] - predicted[filled])).sum())
    bins = [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(counts[b]),
             "mean_predicted": float(predicted[b]) if filled[b] else None,
             "observed": float(observed[b]) if filled[b] else None} for b in range(n_bins)]
    return {"n": len(p), "n_bins": n_bins, "ece": ece, "bins": bins}


def per_label_calibration(y_true: np.ndarray, probs: np.ndarray, keys: Sequence[str]) -> dict:
    """Per label: how far the mean predicted probability is from the observed positive rate, and the Brier score.

    With a handful of positives per label, binned reliability per label is noise; calibration in the large
    (mean predicted vs observed) and the Brier score stay readable, and a label whose mean probability sits far
    above its prevalence is one the heads over-call.

    Args:
        y_true: (N, C) 0/1 labels.
        probs: (N, C) predicted probabilities in [0, 1].
        keys: the C label keys.

    Returns:
        ``{key: {"observed_rate", "mean_predicted", "brier"}}``.

    Raises:
        ValueError: mismatched shapes, labels other than 0/1, probabilities outside [0, 1].
    """
    y, p = _label_matrix(y_true, "y_true"), np.asarray(probs, dtype=np.float64)
    if p.shape != y.shape or len(keys) != y.shape[1]:
        raise ValueError(f"y_true {y.shape}, probs {p.shape} and {len(keys)} keys do not match")
    _check_probabilities(p)
    return {key: {"observed_rate": float(y[:, c].mean()), "mean_predicted": float(p[:, c].mean()),
                  "brier": float(((p[:, c] - y[:, c]) ** 2).mean())} for c, key in enumerate(keys)}


def reliability_diagram(calibration_result: dict, path: Path | str, title: str = "Reliability") -> Path:
    """Draw :func:`calibration`'s result as a PNG: the diagonal, the observed-vs-predicted curve and, below,
    the count of each bin. Matplotlib's Agg canvas, without pyplot, so no global backend is touched.

    Args:
        calibration_result: the dict :func:`calibration` returns.
        path: PNG file to write (parent folders created).
        title: the figure title (the ECE is appended).

    Returns:
        The written path.
    """
    bins = calibration_result["bins"]
    filled = [b for b in bins if b["count"]]
    figure = Figure(figsize=(5, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    curve, counts = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    curve.plot([b["mean_predicted"] for b in filled], [b["observed"] for b in filled], marker="o", label="model")
    curve.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed fraction of positives",
              title=f"{title} (ECE {calibration_result['ece']:.3f})")
    curve.legend(loc="upper left")
    counts.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] for b in bins],
               width=[b["high"] - b["low"] for b in bins], edgecolor="white")
    # pooled over many rare labels, the lowest bin holds most predictions: a log scale keeps the others visible
    counts.set(xlabel="mean predicted probability", ylabel="count", yscale="symlog")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, rule: str = "youden", min_positives: int = 1) -> float:
    """The operating threshold, on validation data, in the scores' units: predict positive when score >= it.

    Rules, over every distinct score as a candidate threshold:

    - ``"youden"``: maximise Youden's J = TPR - FPR.
    - ``"f1"``: maximise F1 = 2 TP / (2 TP + FP + FN).

    A tie goes to the largest threshold (the fewest positive calls). The threshold returned is the midpoint
    between the chosen score and the next lower distinct score, so it is not exactly a score and classifies
    the validation studies as the chosen score does; when the chosen score is the lowest, it is
    ``BELOW_LOWEST_SCORE`` below it. The caller passes logits: when the labels hold one class only, or fewer
    than ``min_positives`` positives (a rule fitted to one or two positives is noise: it places the threshold
    just under them and calls much of the population positive), the answer is ``FALLBACK_LOGIT_THRESHOLD``
    (logit 0: probability 0.5, "more likely than not" for calibrated logits).

    Raises:
        ValueError: an unknown rule, ``min_positives`` < 1, bad labels or scores (as :func:`auroc`).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {THRESHOLD_RULES}")
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1, got {min_positives}")
    y, s = _binary_inputs(y_true, scores)
    if not _both_classes(y) or y.sum() < min_positives:
        return FALLBACK_LOGIT_THRESHOLD
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # the first point (threshold +inf, nothing positive) is not a threshold one can use
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    tp, fp = np.rint(tpr * n_pos).astype(np.int64), np.rint(fpr * n_neg).astype(np.int64)
    # one division of integers each, so equal criteria are equal floats and ties are found exactly
    criterion = (tp * n_neg - fp * n_pos) / (n_pos * n_neg) if rule == "youden" else 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(criterion))  # thresholds decrease, so the first maximum is the largest threshold
    if best + 1 < len(thresholds):
        return float((thresholds[best] + thresholds[best + 1]) / 2)
    return float(thresholds[best] - BELOW_LOWEST_SCORE)


def token_overlap(coords: np.ndarray, mask: np.ndarray, patch_size: Sequence[int], through_axis: int) -> np.ndarray:
    """Fraction of each token's patch that lies inside a mask on the series' preprocessed grid.

    The mask is cut into patches exactly as the series was (``prima.patching.patchify``), so a token's
    voxels are those ``prima.explain.heatmap`` paints with its weight; the zero padding past the grid's far
    edges counts as outside, as in the background filter.

    Args:
        coords: (K, 3) patch-grid coordinates of the tokens (``SeriesTokens.coords``, array-axis order).
        mask: bool volume of shape ``SeriesTokens.shape``.
        patch_size: (in-plane, in-plane, through-plane) voxels of a patch: the volume tokenizer's
            (``prima.patching.DEFAULT_PATCH_SIZE`` for the shipped ones).
        through_axis: ``SeriesTokens.through_axis``.

    Returns:
        (K,) float64 in [0, 1].

    Raises:
        ValueError: a mask that is not 3-D, coordinates outside the mask's patch grid.
    """
    mask = np.asarray(mask, dtype=bool)
    coords = np.asarray(coords)
    patch_size = tuple(int(p) for p in patch_size)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
    grid = patch_grid_shape(mask.shape, through_axis, patch_size)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (K, 3), got shape {coords.shape}")
    if len(coords) and (coords.min() < 0 or (coords.max(axis=0) >= grid).any()):
        raise ValueError(f"coords fall outside the patch grid {grid} of a mask of shape {mask.shape}")
    patches, all_coords = patchify(mask, through_axis, patch_size)
    inside = np.zeros(grid)
    inside[tuple(all_coords.T)] = patches.reshape(len(patches), -1).mean(axis=1)
    return inside[tuple(coords.T)]


def lime_top_k_hit(
    weights: np.ndarray, coords: np.ndarray, mask: np.ndarray, patch_size: Sequence[int], through_axis: int,
    k: int = 3,
) -> bool | None:
    """Whether any of a study's top-k LIME tokens touches the lesion: the per-study value of the paper's
    "top-3 accuracy" (the fraction of studies where this is True).

    The top k are the tokens with the largest positive weights, as ``Explanation.top_k`` ranks them
    (fewer when fewer weights are positive; no positive weight is a miss). A token touches the lesion
    when its patch holds at least one mask voxel (:func:`token_overlap` > 0).

    Args:
        weights: (K,) LIME weights (``Explanation.weights``).
        coords: (K, 3) their patch-grid coordinates (``Explanation.coords``).
        mask: bool lesion mask on the explained series' preprocessed grid (shape ``SeriesTokens.shape``).
        patch_size, through_axis: as for :func:`token_overlap`.
        k: how many top tokens count (the paper's 3).

    Returns:
        True or False; None when the mask is empty (nothing to hit).

    Raises:
        ValueError: k < 1, weights and coords of different lengths, or as :func:`token_overlap`.
    """
    weights = np.asarray(weights, dtype=np.float64)
    coords = np.asarray(coords)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if weights.ndim != 1 or len(coords) != len(weights):
        raise ValueError(f"weights must be (K,) and coords (K, 3), got {weights.shape} and {coords.shape}")
    if not np.asarray(mask).any():
        return None
    ranked = np.argsort(-weights, kind="stable")
    top = ranked[weights[ranked] > 0][:k]
    return bool((token_overlap(coords[top], mask, patch_size, through_axis) > 0).any())


def equal_opportunity(
    y_true: np.ndarray, predictions: np.ndarray, groups: np.ndarray, keys: Sequence[str], min_positives: int = 5
) -> dict:
    """True-positive rate of every label in every subgroup, and the paper's equal-opportunity difference.

    Args:
        y_true: (N, C) 0/1 labels.
        predictions: (N, C) bool positive calls (scores at their operating thresholds).
        groups: (N,) the subgroup of each study for one attribute (e.g. sex); values are reported as strings.
        keys: C label keys.
        min_positives: a group's TPR of a label needs at least this many positives there (else None).

    Returns:
        ``{"min_positives", "groups": {group: {"n", "tpr": {key: value}}}, "disparity": {key: value},
        "mean_disparity", "n_labels_scored"}``: disparity = max - min TPR over the groups scored for that
        label, None with fewer than 2; the mean is over the labels with a disparity (None if none).

    Raises:
        ValueError: shapes that disagree, min_positives < 1.
    """
    y = _label_matrix(y_true, "y_true").astype(bool)
    called = np.asarray(predictions)
    group_of = np.asarray(groups).astype(str)
    if called.shape != y.shape or group_of.shape != (len(y),) or len(keys) != y.shape[1]:
        raise ValueError(f"y_true {y.shape}, predictions {called.shape}, groups {group_of.shape} "
                         f"and {len(keys)} keys disagree")
    if called.dtype != bool:
        raise ValueError(f"predictions must be bool, got {called.dtype}")
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1, got {min_positives}")
    names = np.unique(group_of)
    member = group_of[None, :] == names[:, None]  # (G, N)
    positives = member.astype(np.int64) @ y  # (G, C)
    hits = member.astype(np.int64) @ (y & called)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(positives >= min_positives, hits / positives, np.nan)
    scored = ~np.isnan(tpr)
    spread = np.where(scored, tpr, -np.inf).max(axis=0) - np.where(scored, tpr, np.inf).min(axis=0)
    spread = np.where(scored.sum(axis=0) >= 2, spread, np.nan)
    disparity = {key: None if np.isnan(v) else float(v) for key, v in zip(keys, spread)}
    defined = [v for v in disparity.values() if v is not None]
    return {
        "min_positives": min_positives,
        "groups": {str(name): {"n": int(member[g].sum()),
                               "tpr": {key: None if np.isnan(v) else float(v) for key, v in zip(keys, tpr[g])}}
                   for g, name in enumerate(names)},
        "disparity": disparity,
        "mean_disparity": float(np.mean(defined)) if defined else None,
        "n_labels_scored": len(defined),
    }


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def interval_text(low: float | None, high: float | None) -> str | None:
    """"low–high" of an interval, None without one (no bootstrap, or a result made before it existed)."""
    return None if low is None or high is None else f"{low:.3f}–{high:.3f}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table: one line per row, one column per (key, header); floats with 3 decimals, None as "—",
    a missing key as "—".

    Raises:
        ValueError: no columns.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = ["| " + " | ".join(_cell(header) for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
