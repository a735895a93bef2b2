"""The diagnostic ladder of an evaluation: where along the model the study-level signal is lost.

All rungs are measured on the same evaluated studies, so a failure points to its stage:

1. **signal available**: a token-level lesion probe. A logistic regression on a lone token's 256-d latent
   (no position, no context) tells lesion tokens (more than ``LESION_TOKEN_LEVEL`` of the patch inside a
   lesion mask) from clean ones (none inside), out of fold with studies as groups. Only where masks exist.
2. **signal kept**: linear probes on the frozen study embedding (the hViT's output, before the heads),
   out of fold: normal vs abnormal, and the diagnoses with enough positives for every fold.
3. **signal used**: the heads' own scores (the diagnosis AUROC of the evaluation, and normal vs abnormal read
   as the largest diagnosis probability).
4. **alignment**: CLIP retrieval (the evaluation's retrieval figures).

Probes fit on the evaluated split itself, out of fold, so the ladder needs no tokens of the training split:
an evaluation tokenizes only the studies it scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline

from training.lesion_masks import LESION_TOKEN_LEVEL
from training.metrics import auroc

PROBE_FOLDS = 5  # out-of-fold probes: each study is scored by a probe fitted without it
PROBE_C = 0.1  # inverse L2 strength of every probe (strong: the embeddings are wider than the splits are long)
MAX_CLEAN_TOKENS = 20000  # clean tokens kept for the token probe (a random subset: it bounds the fit's time)


def _probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, seed: int) -> float | None:
    """Out-of-fold AUROC of a balanced, standardised L2 logistic regression; None when a class has fewer
    members than there are folds (or groups too few to split)."""
    labels = np.asarray(labels, dtype=int)
    if labels.min(initial=1) == labels.max(initial=0) or min(np.bincount(labels, minlength=2)) < PROBE_FOLDS:
        return None
    if groups is not None and len(np.unique(groups[labels == 1])) < PROBE_FOLDS:
        return None
    folds = (StratifiedGroupKFold(PROBE_FOLDS, shuffle=True, random_state=seed).split(features, labels, groups)
             if groups is not None else
             StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=seed).split(features, labels))
    scores = np.zeros(len(labels))
    for train, held_out in folds:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=2000))
        model.fit(features[train], labels[train])
        scores[held_out] = model.decision_function(features[held_out])
    return auroc(labels, scores)


def token_lesion_probe(latents: Sequence[np.ndarray], overlaps: Sequence[np.ndarray], study_index: Sequence[int],
                       seed: int = 0) -> dict:
    """Rung 1: how well a lone token's latent tells lesion tokens from clean ones.

    Args:
        latents: per series with a lesion mask, (K, 256) token latents.
        overlaps: per series, (K,) share of each token's patch inside a lesion (``token_lesion_overlap``).
        study_index: per series, the index of its study (tokens of one study never straddle folds).
        seed: folds and the subset of clean tokens.

    Returns:
        ``{"auroc", "lesion_tokens", "clean_tokens", "series", "studies"}``; auroc None when too few studies
        have lesion tokens for the folds.
    """
    if not (len(latents) == len(overlaps) == len(study_index)):
        raise ValueError("latents, overlaps and study_index need one entry per series")
    empty = {"auroc": None, "lesion_tokens": 0, "clean_tokens": 0, "series": len(latents),
             "studies": len(set(study_index))}
    if not latents:
        return empty
    x = np.concatenate([np.asarray(v, dtype=np.float32) for v in latents])
    share = np.concatenate([np.asarray(o, dtype=np.float64) for o in overlaps])
    groups = np.concatenate([np.full(len(o), s) for o, s in zip(overlaps, study_index)])
    lesion, clean = np.flatnonzero(share > LESION_TOKEN_LEVEL), np.flatnonzero(share == 0)
    rng = np.random.default_rng(seed)
    if len(clean) > MAX_CLEAN_TOKENS:
        clean = np.sort(rng.choice(clean, MAX_CLEAN_TOKENS, replace=False))
    rows = np.concatenate([lesion, clean])
    labels = np.concatenate([np.ones(len(lesion), int), np.zeros(len(clean), int)])
    return {**empty, "auroc": _probe(x[rows], labels, groups[rows], seed), "lesion_tokens": int(len(lesion)),
            "clean_tokens": int(len(clean))}


def embedding_probe(embeddings: np.ndarray, diagnoses: np.ndarray, keys: Sequence[str], seed: int = 0) -> dict:
    """Rung 2: linear probes on the frozen study embeddings of the evaluated studies, out of fold.

    Args:
        embeddings: (N, D) raw hViT study embeddings.
        diagnoses: (N, C) 0/1 diagnosis labels.
        keys: C diagnosis keys.
        seed: the folds.

    Returns:
        ``{"abnormal_auroc", "diagnosis_mean_auroc", "labels_probed", "per_label"}``: normal vs abnormal (any
        positive diagnosis), then each diagnosis with at least ``PROBE_FOLDS`` positives and negatives.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(diagnoses)
    if x.ndim != 2 or y.shape != (len(x), len(keys)):
        raise ValueError(f"embeddings {x.shape}, diagnoses {y.shape} and {len(keys)} keys disagree")
    per_label = {key: _probe(x, y[:, c], None, seed) for c, key in enumerate(keys)}
    scored = [v for v in per_label.values() if v is not None]
    return {"abnormal_auroc": _probe(x, y.any(axis=1), None, seed),
            "diagnosis_mean_auroc": float(np.mean(scored)) if scored else None, "labels_probed": len(scored),
            "per_label": per_label}


def abnormal_auroc(diagnoses: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Rung 3's normal vs abnormal figure: the largest of a study's (N, C) probabilities as its score (its
    diagnosis probabilities, or its one abnormal probability as (N, 1))."""
    return auroc(np.asarray(diagnoses).any(axis=1).astype(int), np.asarray(probabilities).max(axis=1))


def normal_vs_abnormal(ladder: dict) -> float | None:
    """An evaluation's ladder's normal-vs-abnormal read: the abnormal output's where the heads have one, else the
    largest diagnosis probability's."""
    read = ladder.get("abnormal_output_auroc")
    return ladder.get("abnormal_auroc") if read is None else read
