"""``prima.explain``: why the model said what it said (docs/design.md section 4, docs/explain.md).

    release = prima.load_release("assets/weights/prima-lite")
    tokens = prima.tokenize_study(prima.load_study("study.zip"), release)     # tokenize once, reuse
    explanation = explain(tokens, release, "tumor_adult_meningioma", "AX_T1_POST")
    volume = heatmap(explanation, tokens.series[explanation.series_index])    # on the series' voxel grid
    prediction.explanations.append(explanation.to_dict())

- :func:`explain`: LIME over the volume tokens of one series. A perturbed sample keeps a random half
  of the series' tokens and physically drops the others; samples are packed into batches sorted by
  kept count and run through the sequence ViT only for the explained series, the other series'
  vectors being computed once. A locally weighted ridge fit (``lime.lime_base.LimeBase``) gives one
  weight per token.
- :func:`heatmap`: the token weights back-projected onto the series' preprocessed voxel grid.
- :func:`series_contribution`: the change of every diagnosis logit when one series is left out.
- :func:`zero_shot`: a free-text finding scored against the study through the CLIP text tower.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lime.lime_base import LimeBase
from sklearn.metrics import pairwise_distances
from torch import Tensor

from prima.io import Study, load_study
from prima.models.clip import MAX_LOGIT_SCALE, zero_shot_prompt
from prima.models.heads import HeadOutput
from prima.models.name_encoder import encode_names
from prima.patching import DEFAULT_PATCH_SIZE, unpatchify
from prima.precision import autocast, autocast_dtype
from prima.predict import (Progress, get_release, head_outputs, padded_series_outputs, ready_release, series_outputs,
                           study_embedding)
from prima.release import Release
from prima.spaces import on_gpu
from prima.tokens import SeriesTokens, StudyTokens, tokenize_study

PRIORITY_TARGET = "priority"

# Samples per forward by device type. For prima-lite on a 2-core CPU (docs/explain.md) 16 to 64 samples
# run within 10% of each other and 128 or more run slower (the padded activations outgrow the caches);
# 64 is the fastest in bf16. A GPU needs larger batches to fill its cores.
DEFAULT_BATCH_SIZE = {"cpu": 64, "cuda": 256}
# LIME samples by device type: the paper's 3000 on a GPU; 1000 on a CPU, about 3 s in fp32 and 1.4 s in
# bf16 for prima-lite on a 2-core CPU (docs/explain.md), well inside the project's 15 s target.
DEFAULT_NUM_SAMPLES = {"cpu": 1000, "cuda": 3000}
# lime's image explainer default. Distances are cosine distances of keep masks from the all-ones mask:
# a mask keeping k of K tokens lies at 1 - sqrt(k / K), so half the tokens is at ~0.29 and gets a
# kernel weight of ~0.50, a quarter ~0.14, three quarters ~0.87: the fit leans towards samples close to
# the study that was predicted without letting the few near-complete ones dominate it.
DEFAULT_KERNEL_WIDTH = 0.25


@dataclass
class Explanation:
    """LIME weights of one series' tokens for one model output."""

    target: str  # diagnosis key, referral key or "priority"
    target_kind: str  # "diagnosis", "referral" or "priority"
    series: str  # name of the explained series
    series_index: int  # its position in the study's series
    num_samples: int  # perturbed samples, the unperturbed one included
    seed: int
    kernel_width: float
    weights: np.ndarray  # (K,) float64 surrogate weight of each token, in the series' token order
    coords: np.ndarray  # (K, 3) int64 patch-grid coordinates of each token (array-axis order)
    patch_indices: np.ndarray  # (K,) int64 grid index of each token
    intercept: float  # the surrogate's intercept
    r2: float  # the surrogate's kernel-weighted R^2 on the samples
    base_value: float  # the target output of the unperturbed study (logit, or priority score)
    top_k: np.ndarray  # (<= k,) indices of the largest positive weights, largest first
    elapsed_s: float  # wall time of the whole explanation

    def to_dict(self) -> dict:
        """JSON-ready (lists, not arrays): the form ``Prediction.explanations`` holds."""
        return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in asdict(self).items()}


@dataclass
class SeriesContribution:
    """The sequence-drop analysis: every diagnosis logit with all series minus without one series."""

    diagnosis_keys: list[str]  # in model output order
    series: list[str]  # series names in study order
    logits: np.ndarray  # (n_diagnoses,) logits of the whole study
    deltas: np.ndarray  # (S, n_diagnoses) full logit minus the logit without series s

    def by_series(self) -> dict[str, dict[str, float]]:
        """series name -> {diagnosis key: delta}; a repeated name gets its study position appended."""
        names = [name if self.series.count(name) == 1 else f"{name} #{i}" for i, name in enumerate(self.series)]
        return {name: dict(zip(self.diagnosis_keys, row.tolist())) for name, row in zip(names, self.deltas)}

    def to_dict(self) -> dict:
        return {"logits": dict(zip(self.diagnosis_keys, self.logits.tolist())), "deltas": self.by_series()}


@dataclass
class ZeroShot:
    """A free-text finding scored against a study in the CLIP joint space."""

    text: str
    cosine: float  # cosine similarity of the study's and the text's joint-space embeddings
    logit: float  # logit_scale * cosine, the value CLIP training puts in its softmax
    nearest: list[dict]  # [{key, name, similarity}] diagnoses whose zero_shot_prompt embeds closest to the text

    def to_dict(self) -> dict:
        return asdict(self)


StudyInput = StudyTokens | Study | str | Path


def _study_tokens(study: StudyInput, release: Release, report: Progress, precision: str) -> StudyTokens:
    if not isinstance(study, StudyTokens):
        if not isinstance(study, Study):
            report(0.0, "loading the study")
            study = load_study(study)
        report(0.0, "tokenizing the study")
        study = tokenize_study(study, release, precision=precision)
    if not study.series:
        raise ValueError("the study has no tokenized series; at least one is needed")
    return study


def _resolve_target(release: Release, target: str) -> tuple[str, int]:
    """(kind, output index) of a diagnosis key, a referral key or "priority"."""
    space = release.config.label_space
    if target == PRIORITY_TARGET:
        return "priority", -1
    if target in space.diagnosis_keys:
        return "diagnosis", space.diagnosis_keys.index(target)
    if target in space.referral_keys:
        return "referral", space.referral_keys.index(target)
    raise ValueError(f"unknown target {target!r}; valid: {PRIORITY_TARGET!r}, a diagnosis key "
                     f"({', '.join(space.diagnosis_keys)}) or a referral key ({', '.join(space.referral_keys)})")


def _resolve_series(tokens: StudyTokens, series: str | int) -> int:
    names = [s.name for s in tokens.series]
    if isinstance(series, (int, np.integer)) and not isinstance(series, bool):
        if 0 <= series < len(names):
            return int(series)
    elif series in names:
        return names.index(series)
    raise ValueError(f"unknown series {series!r}; valid: an index in [0, {len(names)}) or one of {names}")


def _target_output(heads: HeadOutput, kind: str, index: int) -> Tensor:
    """(B,) float32 target of a batch of head outputs; priority = expected tier index / (n_tiers - 1)."""
    if kind == "diagnosis":
        return heads.diagnosis_logits[:, index].float()
    if kind == "referral":
        return heads.referral_logits[:, index].float()
    probs = heads.priority_logits.float().softmax(-1)
    tiers = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    return probs @ tiers / (probs.shape[-1] - 1)


def keep_masks(num_tokens: int, num_samples: int, seed: int) -> np.ndarray:
    """LIME's perturbations of one series.

    Args:
        num_tokens: K, the series' tokens.
        num_samples: N, the first being the unperturbed study.
        seed: seeds ``numpy.random.RandomState``.

    Returns:
        (N, K) int64 0/1: row 0 all ones; every other token kept with probability 0.5, as lime's image
        explainer draws; a row that would keep nothing keeps one random token (a series without tokens
        would be a missing series, not a perturbation of it).
    """
    rng = np.random.RandomState(seed)
    masks = rng.randint(0, 2, (num_samples, num_tokens), dtype=np.int64)  # lime_image.data_labels' draw
    masks[0] = 1
    empty = np.flatnonzero(masks.sum(1) == 0)
    masks[empty, rng.randint(0, num_tokens, len(empty))] = 1
    return masks


@torch.no_grad()
def masked_outputs(
    tokens: StudyTokens,
    release: Release,
    series_index: int,
    masks: np.ndarray,
    target: str,
    *,
    batch_size: int,
    dtype: torch.dtype | None,
    progress: Progress | None = None,
) -> np.ndarray:
    """The target output for every keep mask of one series, the other series as they are.

    Kept tokens are gathered (removed ones are not in the sequence at all), samples are sorted by kept
    count and cut into batches of ``batch_size`` padded to the batch's largest count; only the
    explained series goes through the sequence ViT, the other series' vectors are computed once.

    Args:
        tokens: the tokenized study.
        release: a release with heads, on the device to compute on.
        series_index: the perturbed series.
        masks: (N, K) 0/1 keep masks over that series' K tokens, at least one token kept per row.
        target: a diagnosis key, a referral key or "priority".
        batch_size: samples per forward.
        dtype: autocast dtype (``prima.precision.autocast_dtype``), None for fp32.
        progress: called with (fraction of samples done, stage) after every batch.

    Returns:
        (N,) float64 target output per mask, in the order of ``masks``.
    """
    kind, index = _resolve_target(release, target)
    series = tokens.series[_resolve_series(tokens, series_index)]
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 2 or masks.shape[1] != len(series):
        raise ValueError(f"masks must be (N, {len(series)}) for series {series.name!r}, got {masks.shape}")
    if not masks.any(1).all():
        raise ValueError("every mask must keep at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = release.model
    device = model.logit_scale.device
    features = series.features.to(device)
    others, other_scores = series_outputs(release, tokens, dtype)  # the explained series' row is replaced below
    name_ids, name_mask = encode_names([series.name], model.config.vision.sequence.series_name.max_length)
    name_ids, name_mask = name_ids.to(device), name_mask.to(device)
    counts = masks.sum(1)
    order = np.argsort(counts, kind="stable")  # similar lengths share a batch, so padding stays small
    outputs = np.empty(len(masks))
    report = progress or (lambda fraction, stage: None)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        keep = torch.from_numpy(masks[rows]).to(device)
        length = int(counts[rows].max())
        # kept token indices first, in increasing order (as SeriesTokens.subset orders them)
        gather = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :length]
        token_mask = torch.arange(length, device=device)[None] < keep.sum(1, keepdim=True)
        batch = features[gather] * token_mask[..., None]
        vectors, scores = padded_series_outputs(release, batch, token_mask, name_ids.expand(len(rows), -1),
                                                name_mask.expand(len(rows), -1), dtype)
        study = others[None].repeat(len(rows), 1, 1)
        study[:, series_index] = vectors
        study_scores = None
        if scores is not None:
            study_scores = other_scores[None].repeat(len(rows), 1, 1, 1)
            study_scores[:, series_index] = scores
        heads, _ = head_outputs(release, study, study_scores, tokens.description, dtype)
        outputs[rows] = _target_output(heads, kind, index).cpu().double().numpy()
        done = min(start + batch_size, len(order))
        report(done / len(order), f"explaining {series.name}: {done}/{len(order)} samples")
    return outputs


def lime_kernel(distances: np.ndarray, width: float) -> np.ndarray:
    """lime's exponential kernel: ``sqrt(exp(-d^2 / width^2))``, the weight of a sample at distance d."""
    return np.sqrt(np.exp(-(distances**2) / width**2))


def _per_device(table: dict[str, int], device: torch.device) -> int:
    """A device-type default; devices other than CUDA take the CPU's (conservative) value."""
    return table["cuda" if device.type == "cuda" else "cpu"]


@on_gpu
def explain(
    study: StudyInput,
    release: Release | str | Path,
    target: str,
    series: str | int,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    top_k: int = 10,
    kernel_width: float = DEFAULT_KERNEL_WIDTH,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> Explanation:
    """LIME over the volume tokens of one series for one output.

    Args:
        study: tokens from ``prima.tokens.tokenize_study`` (reused as they are), a loaded
            ``prima.io.Study`` or anything ``prima.io.load_study`` accepts (then tokenized here).
        release: a loaded ``Release`` or a release folder / ``hf://`` URI (``prima.predict.ready_release``).
        target: a diagnosis key or a referral key (their logit is explained), or "priority" (the
            expected tier index / (n_tiers - 1), in [0, 1]).
        series: the explained series, by name or by index in the study.
        num_samples: perturbed samples, the unperturbed one included (>= 2); default 3000 on CUDA
            (the paper's), 1000 elsewhere (``DEFAULT_NUM_SAMPLES``).
        seed: seeds the perturbations and the surrogate; on a CPU the result is bitwise reproducible.
        top_k: how many of the largest positive weights ``Explanation.top_k`` lists.
        kernel_width: width of the locality kernel on the cosine distance of a keep mask from the
            all-ones mask (lime's image-explainer default, 0.25; see ``DEFAULT_KERNEL_WIDTH``).
        batch_size: samples per forward; default 256 on CUDA, 64 elsewhere (``DEFAULT_BATCH_SIZE``).
        device: "auto" (CUDA when present), "cpu", "cuda" or a ``torch.device``.
        precision: "auto", "fp32" or "bf16" (``prima.precision.autocast_dtype``).
        progress: called with (fraction done, stage description).

    Returns:
        The :class:`Explanation`: weights (K,) in the series' token order, their coordinates, the
        surrogate's intercept and R^2, the unperturbed output and the top-k tokens.

    Raises:
        ValueError: unknown target or series, a study without series, or an out-of-range argument.
    """
    started = time.perf_counter()
    report = progress or (lambda fraction, stage: None)
    if kernel_width <= 0:
        raise ValueError(f"kernel_width must be > 0, got {kernel_width}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    release = ready_release(release, device)
    kind, _ = _resolve_target(release, target)  # before tokenizing: a typo should not cost a minute
    tokens = _study_tokens(study, release, report, precision)
    series_index = _resolve_series(tokens, series)
    explained = tokens.series[series_index]
    target_device = release.model.logit_scale.device
    num_samples = _per_device(DEFAULT_NUM_SAMPLES, target_device) if num_samples is None else num_samples
    batch_size = _per_device(DEFAULT_BATCH_SIZE, target_device) if batch_size is None else batch_size
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (the unperturbed study and a perturbation), got {num_samples}")

    masks = keep_masks(len(explained), num_samples, seed)
    outputs = masked_outputs(tokens, release, series_index, masks, target, batch_size=batch_size,
                             dtype=autocast_dtype(target_device, precision),
                             progress=lambda fraction, stage: report(0.95 * fraction, stage))
    report(0.95, "fitting the local linear model")
    # cosine distance from the unperturbed (all-ones) mask, as lime's image explainer measures it
    distances = pairwise_distances(masks, masks[:1], metric="cosine").ravel()
    surrogate = LimeBase(lambda d: lime_kernel(d, kernel_width), random_state=seed)
    intercept, pairs, r2, _ = surrogate.explain_instance_with_data(
        masks, outputs[:, None], distances, label=0, num_features=len(explained), feature_selection="none")
    weights = np.zeros(len(explained))
    features, values = zip(*pairs)
    weights[list(features)] = values
    ranked = np.argsort(-weights, kind="stable")
    report(1.0, "done")
    return Explanation(
        target=target, target_kind=kind, series=explained.name, series_index=series_index,
        num_samples=num_samples, seed=seed, kernel_width=float(kernel_width), weights=weights,
        coords=explained.coords.copy(), patch_indices=explained.patch_indices.copy(), intercept=float(intercept),
        r2=float(r2), base_value=float(outputs[0]), top_k=ranked[weights[ranked] > 0][:top_k],
        elapsed_s=time.perf_counter() - started,
    )


def heatmap(explanation: Explanation, tokens: SeriesTokens) -> np.ndarray:
    """Token weights back-projected onto the explained series' preprocessed voxel grid.

    Args:
        explanation: from :func:`explain`.
        tokens: the explained series' tokens (``study_tokens.series[explanation.series_index]``).

    Returns:
        ``tokens.shape`` float32 (L, P, S axes; ``tokens.affine`` maps it to mm): every voxel of a
        token's patch holds the token's weight, voxels of background (dropped) patches hold 0.

    Raises:
        ValueError: the tokens are not the ones explained.
    """
    if not np.array_equal(explanation.patch_indices, tokens.patch_indices):
        raise ValueError(f"the explanation is of series {explanation.series!r} with {len(explanation.weights)} "
                         f"tokens, not of these tokens ({tokens.name!r}, {len(tokens)} tokens)")
    weights = explanation.weights.astype(np.float32)
    patches = np.broadcast_to(weights[:, None, None, None], (len(weights), *DEFAULT_PATCH_SIZE))
    return unpatchify(patches, tokens.coords, tokens.shape, tokens.through_axis)


@torch.no_grad()
@on_gpu
def series_contribution(
    study: StudyInput,
    release: Release | str | Path,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> SeriesContribution:
    """The paper's sequence-drop analysis: each series left out in turn (the study ViT without it).

    Args:
        study, release, device, precision, progress: as in :func:`explain`.

    Returns:
        A :class:`SeriesContribution`: for every series, the full study's diagnosis logits minus the
        logits without that series. Series vectors are computed once; only the study ViT and the heads
        run per left-out series (one batch).

    Raises:
        ValueError: a study without series.
    """
    report = progress or (lambda fraction, stage: None)
    release = ready_release(release, device)
    tokens = _study_tokens(study, release, report, precision)
    dtype = autocast_dtype(release.model.logit_scale.device, precision)
    report(0.5, "dropping each series in turn")
    vectors, scores = series_outputs(release, tokens, dtype)
    count = len(vectors)
    others = ~torch.eye(count, dtype=torch.bool, device=vectors.device)

    def without_each(per_series: Tensor) -> Tensor:  # (S, ...) -> (S, S - 1, ...): row i lacks series i
        return per_series[None].expand(count, *per_series.shape)[others].reshape(count, count - 1,
                                                                                 *per_series.shape[1:])

    logits = []
    for batch, batch_scores in ((vectors[None], None if scores is None else scores[None]),
                                (without_each(vectors), None if scores is None else without_each(scores))):
        heads, _ = head_outputs(release, batch, batch_scores, tokens.description, dtype)
        logits.append(heads.diagnosis_logits.float().cpu().double().numpy())
    report(1.0, "done")
    return SeriesContribution(list(release.config.label_space.diagnosis_keys), [s.name for s in tokens.series],
                              logits[0][0], logits[0] - logits[1])


# Text embeddings of the diagnosis prompts, per model and autocast dtype: computed on first use.
_DIAGNOSIS_TEXT: weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype | None, Tensor]] = (
    weakref.WeakKeyDictionary())


def _diagnosis_text_features(release: Release, dtype: torch.dtype | None) -> Tensor:
    """(n_diagnoses, embed_dim) embeddings of every diagnosis' ``zero_shot_prompt``, as the evaluation scores."""
    cached = _DIAGNOSIS_TEXT.setdefault(release.model, {})
    if dtype not in cached:
        prompts = [zero_shot_prompt(d.name) for d in release.config.label_space.diagnoses]
        cached[dtype] = release.model.embed_texts(release.report_tokenizer, prompts, dtype)
    return cached[dtype].to(release.model.logit_scale.device)


@torch.no_grad()
@on_gpu
def zero_shot(
    study_or_embedding: StudyInput | Tensor | np.ndarray | Sequence[float],
    release: Release | str | Path,
    text: str,
    *,
    top_k: int = 5,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> ZeroShot:
    """Score a free-text finding against a study through the CLIP text tower.

    Args:
        study_or_embedding: a study as in :func:`explain`, or its study embedding (study_dim,), e.g.
            ``Prediction.embedding`` from ``predict(..., return_embedding=True)``.
        release: a loaded ``Release`` or a release folder / ``hf://`` URI.
        text: the finding, e.g. "ring-enhancing mass in the left frontal lobe".
        top_k: how many nearest diagnoses to list.
        device, precision: as in :func:`explain`.

    Returns:
        A :class:`ZeroShot`: the cosine similarity of the study's and the text's joint-space
        embeddings (``PrimaCLIP.embed_texts``), that cosine times the model's logit scale, and the
        ``top_k`` diagnoses whose prompts' text embeddings (``prima.models.clip.zero_shot_prompt``:
        the display name as a sentence, as the evaluation scores) are most similar to the text's
        (cached per model).

    Raises:
        ValueError: an empty text, a negative top_k, an embedding of the wrong width or a study
            without series.
    """
    if not text.strip():
        raise ValueError("text must be a non-empty finding, e.g. 'ring-enhancing mass'")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    release = get_release(release, device)  # the heads are not needed, so any CLIP release will do
    model = release.model
    target = model.logit_scale.device
    dtype = autocast_dtype(target, precision)
    if isinstance(study_or_embedding, (StudyTokens, Study, str, Path)):
        tokens = _study_tokens(study_or_embedding, release, lambda fraction, stage: None, precision)
        vectors = series_outputs(release, tokens, dtype).vectors
        embedding = study_embedding(release, vectors[None], tokens.description, dtype)
    else:
        embedding = torch.as_tensor(np.asarray(study_or_embedding, dtype=np.float32), device=target)[None]
        if embedding.shape != (1, model.visual.study_dim):
            raise ValueError(f"a study embedding must have shape ({model.visual.study_dim},), "
                             f"got {tuple(embedding.shape[1:])}")
    with autocast(target, dtype):
        image = model.image_proj(embedding)
    image = F.normalize(image.float(), dim=-1)[0]
    finding = model.embed_texts(release.report_tokenizer, [text], dtype)[0]
    cosine = float(image @ finding)
    similarity = (_diagnosis_text_features(release, dtype) @ finding).cpu().numpy()
    diagnoses = release.config.label_space.diagnoses
    nearest = [{"key": diagnoses[i].key, "name": diagnoses[i].name, "similarity": float(similarity[i])}
               for i in np.argsort(-similarity, kind="stable")[:top_k]]
    scale = float(model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE))
    return ZeroShot(text, cosine, scale * cosine, nearest)
