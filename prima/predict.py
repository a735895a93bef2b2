"""``prima.predict``: a loaded study (or its path) and a release -> the prediction the app and the CLI show.

    release = prima.load_release("assets/weights/prima-lite")     # load once, reuse for every study
    prediction = prima.predict("study.zip", release)
    prediction.to_json()                                          # docs/design.md section 7

The path: ``prima.tokens.tokenize_study`` (only kept patches encoded) -> the hViT (sequence ViT per
series, study ViT) -> the task heads. ``device="auto"`` uses CUDA when present; ``precision="auto"``
computes in bf16 on CUDA and on CPUs with native bf16, in fp32 otherwise (``prima.precision``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from prima.distributed import resolve_device
from prima.errors import ReleaseError
from prima.io import Study, load_study
from prima.io.orientation import voxel_spacing
from prima.labels import LabelSpace
from prima.models.heads import HeadOutput
from prima.models.name_encoder import encode_names
from prima.precision import autocast, autocast_dtype
from prima.release import Release, load_release
from prima.spaces import on_gpu
from prima.tokens import StudyTokens, tokenize_study

# progress(fraction done in [0, 1], what is happening now): the app shows a bar, the CLI a tqdm bar.
Progress = Callable[[float, str], None]

# Share of the progress bar each stage takes (tokenizing dominates on a CPU).
_LOAD_SHARE, _TOKENS_SHARE = 0.1, 0.8


@dataclass
class LabelScore:
    """One diagnosis or referral output."""

    key: str  # machine name, e.g. "tumor_adult_meningioma"
    name: str  # display name, e.g. "Meningioma"
    logit: float  # raw head output
    prob: float  # sigmoid(logit)
    threshold: float  # operating threshold in logit units (from the release)
    positive: bool  # logit > threshold


@dataclass
class PriorityScore:
    """The priority head's tier and the worklist tier, which never reads below a positive finding's own tier
    (docs/predict.md, "Priority")."""

    tier: str  # the priority head's most probable tier: "low", "medium" or "high"
    probs: dict[str, float]  # the head's softmax probability of every tier
    findings_tier: str  # the most urgent tier among the positive diagnoses; the least urgent when none is
    worklist_tier: str  # the more urgent of ``tier`` and ``findings_tier``: what a worklist sorts by
    raised_by: list[str]  # the positive diagnoses of ``findings_tier`` when it is above ``tier`` (a conflict)


def priority_score(probs: Sequence[float], diagnoses: Sequence[LabelScore], space: LabelSpace) -> PriorityScore:
    """The priority head's output reconciled with the positive diagnoses.

    A worklist that read a study LOW while the model calls one of its findings positive, and that finding's tier
    is HIGH, would bury the finding; so the worklist tier is the more urgent of the two and ``raised_by`` names the
    findings that raised it, for the reader to check.

    Args:
        probs: (tiers,) the priority head's softmax probabilities, in ``space.priority_tiers`` order.
        diagnoses: every diagnosis score (their ``positive`` flags are used).
        space: the label space (each diagnosis' tier).
    """
    if len(probs) != len(space.priority_tiers):
        raise ValueError(f"expected {len(space.priority_tiers)} tier probabilities, got {len(probs)}")
    rank = {tier: i for i, tier in enumerate(space.priority_tiers)}
    tier = space.priority_tiers[max(range(len(probs)), key=probs.__getitem__)]
    positive = [d.key for d in diagnoses if d.positive]
    findings_tier = space.priority_of(positive)
    raised = rank[findings_tier] > rank[tier]
    return PriorityScore(tier, dict(zip(space.priority_tiers, map(float, probs))), findings_tier,
                         findings_tier if raised else tier,
                         [k for k in positive if space.diagnosis(k).tier == findings_tier] if raised else [])


@dataclass
class SeriesInfo:
    """What the model saw of one series."""

    name: str  # series name as loaded (SeriesDescription or file name)
    plane: str  # acquisition plane
    shape: list[int]  # voxels after preprocessing (L, P, S axes)
    spacing_mm: list[float]  # voxel size after preprocessing
    tokens_kept: int  # tokens that passed the background filter (the only ones encoded)
    tokens_total: int  # patches of the whole grid


@dataclass
class Prediction:
    """The prediction of one study (docs/design.md section 7). ``to_json()`` carries no patient
    identifiers: only the study description, series names and the model's outputs."""

    study: dict  # {"description": ...}
    series: list[SeriesInfo]
    skipped: list[dict]  # series that could not be loaded: {"name", "reason"}
    diagnoses: list[LabelScore]  # every diagnosis, in the model's output order
    priority: PriorityScore
    referrals: list[LabelScore]  # every referral, in the model's output order
    model: dict  # {"name", "revision"}
    timings_s: dict[str, float]  # seconds per stage: load, tokens, model, total
    embedding: list[float] | None = None  # the study embedding (return_embedding=True)
    # probability that the study shows any abnormality (token-pooling heads' own output); None without one
    abnormal: float | None = None
    explanations: list[dict] = field(default_factory=list)  # LIME results added by prima.explain
    # What the model read (never in the JSON): prima.explain reuses it instead of tokenizing again.
    tokens: StudyTokens | None = field(default=None, repr=False, compare=False)

    @property
    def differential(self) -> list[LabelScore]:
        """Diagnoses sorted by how far their logit exceeds the operating threshold, highest first."""
        return sorted(self.diagnoses, key=lambda d: d.logit - d.threshold, reverse=True)

    @property
    def positives(self) -> list[LabelScore]:
        return [d for d in self.differential if d.positive]

    @property
    def raised_by_names(self) -> list[str]:
        """Display names of the positive findings that raised the worklist tier (``PriorityScore.raised_by``)."""
        return [self.diagnosis(key).name for key in self.priority.raised_by]

    def diagnosis(self, key: str) -> LabelScore:
        for score in self.diagnoses:
            if score.key == key:
                return score
        raise KeyError(f"unknown diagnosis {key!r}; known: {', '.join(d.key for d in self.diagnoses)}")

    def to_dict(self) -> dict:
        doc = asdict(dataclasses.replace(self, tokens=None))
        doc.pop("tokens")
        doc["differential"] = [d.key for d in self.differential]
        if self.embedding is None:
            doc.pop("embedding")
        if not self.explanations:
            doc.pop("explanations")
        return doc

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


_LOADED: dict[tuple[str, str], Release] = {}


def get_release(source: Release | str | Path, device: str | torch.device = "auto") -> Release:
    """A release ready on ``device``: a ``Release`` is moved there; a folder or ``hf://`` URI is loaded
    once per process and device and then reused (no reload per study)."""
    target = resolve_device(device)
    if isinstance(source, Release):
        for module in (source.model, source.volume_tokenizer, source.heads, source.place_normal):
            if module is not None:
                module.to(target)
        return source
    key = (str(source), str(target))
    if key not in _LOADED:
        _LOADED[key] = load_release(source, device=target)
    return _LOADED[key]


def _label_scores(keys: Sequence[str], names: Sequence[str], logits: Tensor, thresholds: Tensor) -> list[LabelScore]:
    return [LabelScore(key, name, float(logit), 1.0 / (1.0 + math.exp(-float(logit))), float(threshold),
                       bool(logit > threshold))
            for key, name, logit, threshold in zip(keys, names, logits.tolist(), thresholds.tolist())]


class SeriesOutputs(NamedTuple):
    """What the model computes once per series, and LIME and the series-drop analysis reuse."""

    vectors: Tensor  # (S, series_dim) float32 series vectors
    token_scores: Tensor | None  # (S, top_tokens, 1 + diagnoses) float32 with token-pooling heads, else None


def padded_series_outputs(release: Release, tokens: Tensor, token_mask: Tensor, name_ids: Tensor,
                          name_mask: Tensor, dtype: torch.dtype | None) -> SeriesOutputs:
    """The sequence ViT on padded series, and with token-pooling heads their top token scores
    (``TaskHeads.series_scores``).

    Args:
        release: the release (its model, and its heads when they pool tokens).
        tokens, token_mask, name_ids, name_mask: as ``PrimaVisual.encode_series``, on the model's device.
        dtype: autocast dtype, None for fp32.
    """
    model, heads = release.model, release.heads
    with torch.no_grad(), autocast(model.logit_scale.device, dtype):
        vectors, token_outputs = model.visual.encode_series_with_tokens(tokens, token_mask, name_ids, name_mask)
        scores = heads.series_scores(token_outputs, token_mask) if heads is not None and heads.pools_tokens else None
    return SeriesOutputs(vectors.float(), None if scores is None else scores.float())


def series_outputs(release: Release, tokens: StudyTokens, dtype: torch.dtype | None) -> SeriesOutputs:
    """``padded_series_outputs`` of every series of a study, one padded batch."""
    batch = release.model.pack([[(series.features, series.name) for series in tokens.series]], [tokens.description])
    return padded_series_outputs(release, batch.tokens, batch.token_mask, batch.name_ids, batch.name_mask, dtype)


def study_embedding(release: Release, vectors: Tensor, description: str | None, dtype: torch.dtype | None) -> Tensor:
    """(B, study_dim) study embeddings from (B, S, series_dim) series vectors (all present)."""
    model = release.model
    device = model.logit_scale.device
    ids, mask = encode_names([description] * len(vectors), model.config.vision.study.description.max_length)
    series_mask = torch.ones(vectors.shape[:2], dtype=torch.bool, device=device)
    with torch.no_grad(), autocast(device, dtype):
        return model.visual.encode_study(vectors.to(device), series_mask, ids.to(device), mask.to(device)).float()


def head_outputs(release: Release, vectors: Tensor, scores: Tensor | None, description: str | None,
                 dtype: torch.dtype | None) -> tuple[HeadOutput, Tensor]:
    """The heads' outputs and the study embeddings of (B, S, series_dim) series vectors (all present) and, with
    token-pooling heads, their (B, S, top_tokens, outputs) token scores."""
    embedding = study_embedding(release, vectors, description, dtype)
    with torch.no_grad(), autocast(embedding.device, dtype):
        return release.heads(embedding, None if scores is None else scores.to(embedding.device)), embedding


def ready_release(release: Release | str | Path, device: str | torch.device = "auto") -> Release:
    """``get_release`` plus the check that the release can predict (it ships a volume tokenizer and heads)."""
    release = get_release(release, device)
    missing = [name for name, part in (("volume tokenizer", release.volume_tokenizer), ("task heads", release.heads))
               if part is None]
    if missing:
        raise ReleaseError(f"release {release.path} cannot predict: it ships no {' and no '.join(missing)}")
    return release


def predict_tokens(tokens: StudyTokens, release: Release, *, precision: str = "auto",
                   return_embedding: bool = False) -> Prediction:
    """The prediction of an already tokenized study (``prima.tokens.tokenize_study``) on the release's
    device. ``skipped`` is empty and ``timings_s`` holds the model time only; ``predict`` fills both."""
    if not tokens.series:
        raise ValueError("the study has no tokenized series to predict from")
    target = release.model.logit_scale.device
    dtype = autocast_dtype(target, precision)
    started = time.perf_counter()
    vectors, scores = series_outputs(release, tokens, dtype)
    heads, embedding = head_outputs(release, vectors[None], None if scores is None else scores[None],
                                    tokens.description, dtype)
    elapsed = time.perf_counter() - started
    space = release.config.label_space
    diagnoses = _label_scores(space.diagnosis_keys, [d.name for d in space.diagnoses],
                              heads.diagnosis_logits[0].float().cpu(), release.heads.diagnosis_thresholds.cpu())
    return Prediction(
        study={"description": tokens.description},
        series=[SeriesInfo(t.name, t.plane, list(t.shape), [round(float(v), 4) for v in voxel_spacing(t.affine)], len(t),
                           len(t.fractions)) for t in tokens.series],
        skipped=[],
        diagnoses=diagnoses,
        priority=priority_score(heads.priority_logits[0].float().softmax(-1).cpu().tolist(), diagnoses, space),
        referrals=_label_scores(space.referral_keys, space.referral_names, heads.referral_logits[0].float().cpu(),
                                release.heads.referral_thresholds.cpu()),
        model={"name": release.config.name, "revision": release.revision},
        timings_s={"model": round(elapsed, 4)},
        embedding=embedding[0].cpu().tolist() if return_embedding else None,
        abnormal=None if heads.abnormal_logits is None else float(heads.abnormal_logits[0].float().sigmoid()),
        tokens=tokens,
    )


@on_gpu
def predict(
    study: Study | str | Path | Sequence[str | Path],
    release: Release | str | Path,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    return_embedding: bool = False,
    progress: Progress | None = None,
) -> Prediction:
    """Predict the 52 diagnoses, the priority tier and the referrals of one study.

    Args:
        study: a loaded ``prima.io.Study``, or what ``prima.io.load_study`` accepts (folder, zip, NIfTI
            file(s), loose DICOM files).
        release: a loaded ``Release``, or a release folder / ``hf://owner/repo`` (loaded once, reused).
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or a ``torch.device``.
        precision: "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "fp32" or "bf16".
        return_embedding: include the study embedding in the prediction.
        progress: called with (fraction done, stage description) as the work advances.

    Raises:
        StudyLoadError: the study cannot be loaded (``NoUsableSeriesError`` when no series is usable).
        ReleaseError: the release cannot be loaded or lacks the volume tokenizer or the task heads.
    """
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    release = ready_release(release, device)
    timings: dict[str, float] = {}
    if not isinstance(study, Study):
        report(0.0, "loading the study")
        study = load_study(study)
        timings["load"] = time.perf_counter() - started
    tokens_at = time.perf_counter()
    tokens = tokenize_study(study, release, precision=precision, on_series=lambda index, name: report(
        _LOAD_SHARE + _TOKENS_SHARE * index / len(study.series), f"tokenizing {name}"))
    timings["tokens"] = time.perf_counter() - tokens_at
    report(_LOAD_SHARE + _TOKENS_SHARE, "running the model")
    prediction = predict_tokens(tokens, release, precision=precision, return_embedding=return_embedding)
    prediction.skipped = [{"name": s.name, "reason": s.reason} for s in study.skipped]
    timings["model"] = prediction.timings_s["model"]
    timings["total"] = time.perf_counter() - started
    prediction.timings_s = {key: round(value, 4) for key, value in timings.items()}
    report(1.0, "done")
    return prediction
