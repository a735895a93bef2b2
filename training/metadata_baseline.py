"""Metadata-only baseline: how well the labels can be read off a study's metadata, without its images.

    python -m training.metadata_baseline data/synth/manifest.jsonl [--split test] [--out baseline.json]

One logistic regression per label (balanced class weights, fixed random state) on features of the
manifest alone: word and character n-grams of the study description and series names, the series
kinds (each series' ``sequence`` and ``plane`` where the manifest has them) and the number of series.
Fitted on the train split and scored by per-label AUROC on another split (test by default). A model
evaluated beside it should beat it by a clear margin; a baseline well above 0.5 means the metadata
leaks the labels (the synthetic engine draws held-out splits protocol-blind so that it does not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction import DictVectorizer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from prima.manifest import StudyEntry, manifest_digest, read_manifest

RANDOM_STATE = 0
MAX_SERIES_SCALE = 8.0  # series count divided by this, so it sits on the scale of the other features


def metadata_text(study: StudyEntry) -> str:
    """The study's free-text metadata: its description and series names, one per line."""
    return "\n".join([study.study_description, *(s.name for s in study.series)])


def series_features(study: StudyEntry) -> dict[str, float]:
    """Series kinds (sequence, plane and both) present, and the number of series (count and one-hot)."""
    features: dict[str, float] = {"n_series": len(study.series) / MAX_SERIES_SCALE,
                                  f"n_series={len(study.series)}": 1.0}
    for s in study.series:  # sequence and plane are optional in a manifest
        if s.sequence is not None:
            features[f"sequence={s.sequence}"] = 1.0
        if s.plane is not None:
            features[f"plane={s.plane}"] = 1.0
        if s.sequence is not None and s.plane is not None:
            features[f"kind={s.sequence}/{s.plane}"] = 1.0
    return features


class MetadataFeatures:
    """Feature extraction fitted on the training studies: text n-grams plus series features."""

    def __init__(self) -> None:
        self.words = TfidfVectorizer(token_pattern=r"[A-Za-z0-9+*]+", ngram_range=(1, 2), sublinear_tf=True)
        self.chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
        self.series = DictVectorizer()

    def fit(self, studies: list[StudyEntry]) -> MetadataFeatures:
        """Learn the vocabularies of ``studies``; returns self."""
        texts = [metadata_text(s) for s in studies]
        self.words.fit(texts)
        self.chars.fit(texts)
        self.series.fit([series_features(s) for s in studies])
        return self

    def transform(self, studies: list[StudyEntry]) -> sparse.csr_matrix:
        """Sparse feature matrix, one row per study."""
        texts = [metadata_text(s) for s in studies]
        return sparse.hstack([self.words.transform(texts), self.chars.transform(texts),
                              self.series.transform([series_features(s) for s in studies])]).tocsr()


def metadata_baseline(studies: list[StudyEntry], split: str = "test", train_split: str = "train") -> dict:
    """Fit the per-label regressions on ``train_split`` and score them on ``split``.

    Args:
        studies: manifest entries of every split (only ``train_split`` and ``split`` are used).
        split: the split scored.
        train_split: the split fitted on.

    Returns:
        ``{"split", "n_train", "n_test", "mean_auroc", "n_labels_scored", "per_label", "positives",
        "abnormal_auroc"}``: ``per_label`` maps every label to its AUROC on ``split``, or None where
        that split (or the train split) has no positive or no negative; ``mean_auroc`` averages the
        others (None if none); ``positives`` counts each label's positives in ``split``; ``n_test``
        is the number of studies in ``split``; ``abnormal_auroc`` is normal (no positive label)
        against abnormal studies, from a regression fitted the same way (None where a split has one
        kind only).
    """
    if split == train_split:
        raise ValueError(f"the scored split must differ from the train split, got {split!r} for both")
    train = [s for s in studies if s.split == train_split]
    test = [s for s in studies if s.split == split]
    if not train or not test:
        raise ValueError(f"need studies in both {train_split!r} ({len(train)}) and {split!r} ({len(test)})")
    keys = list(train[0].labels)
    if not keys:
        raise ValueError("the studies have no labels (an unlabelled export)")
    features = MetadataFeatures().fit(train)
    x_train, x_test = features.transform(train), features.transform(test)

    def fitted_auroc(y_train: np.ndarray, y_test: np.ndarray) -> float | None:
        if len(set(y_train)) < 2 or len(set(y_test)) < 2:
            return None
        model = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=RANDOM_STATE)
        model.fit(x_train, y_train)
        return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))

    per_label: dict[str, float | None] = {}
    positives: dict[str, int] = {}
    for key in keys:
        y_test = np.array([s.labels.get(key, 0) for s in test])
        positives[key] = int(y_test.sum())
        per_label[key] = fitted_auroc(np.array([s.labels.get(key, 0) for s in train]), y_test)
    def abnormal_of(studies: list[StudyEntry]) -> np.ndarray:
        return np.array([max(s.labels.values(), default=0) for s in studies])

    abnormal = fitted_auroc(abnormal_of(train), abnormal_of(test))
    scored = [v for v in per_label.values() if v is not None]
    return {
        "split": split,
        "n_train": len(train),
        "n_test": len(test),
        "mean_auroc": float(np.mean(scored)) if scored else None,
        "n_labels_scored": len(scored),
        "per_label": per_label,
        "positives": positives,
        "abnormal_auroc": abnormal,
    }


def run(manifest: Path | str, split: str = "test", out: Path | str | None = None) -> dict:
    """Read ``manifest`` (no images are opened), score the baseline on ``split`` and write it to ``out``.

    Args:
        manifest: a ``manifest.jsonl``.
        split: the split scored ("val" or "test"); the model is fitted on "train".
        out: JSON file to write (parent folders created), or None.

    Returns:
        ``metadata_baseline``'s result plus the manifest path and its SHA-256.
    """
    result = {"manifest": str(manifest), "manifest_sha256": manifest_digest(manifest),
              **metadata_baseline(read_manifest(manifest), split)}
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.metadata_baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="manifest.jsonl")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="split scored (fitted on train)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    a = parser.parse_args(argv)
    try:
        result = run(a.manifest, a.split, a.out)
    except ValueError as error:
        parser.error(str(error))
    mean, abnormal = result["mean_auroc"], result["abnormal_auroc"]
    print(f"metadata-only baseline on {result['split']} ({result['n_test']} studies, fitted on {result['n_train']}): "
          f"mean AUROC {'n/a' if mean is None else f'{mean:.3f}'} over {result['n_labels_scored']} labels; "
          f"normal vs abnormal {'n/a' if abnormal is None else f'{abnormal:.3f}'}")
    top = sorted(((v, k) for k, v in result["per_label"].items() if v is not None), reverse=True)[:5]
    for auroc, key in top:
        print(f"  {auroc:.3f}  {key}  ({result['positives'][key]} positives)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
