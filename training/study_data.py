"""Studies for the CLIP and head stages: manifest entries joined with their cached tokens, the paper's
CLIP augmentations, seeded batch sampling and batched study embeddings.

An augmentation draws its random choices from a ``numpy.random.Generator`` seeded by (seed, step, study),
so a resumed run sees exactly the batches an uninterrupted one would, on any number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from prima.config import PrimaConfig, VolumeTokenizerConfig
from prima.labels import LabelSpace
from prima.manifest import StudyEntry, read_manifest
from prima.models.clip import PrimaCLIP
from prima.models.heads import HeadOutput, TaskHeads
from prima.models.name_encoder import UNK_NAME
from prima.precision import autocast
from prima.tokens import SeriesTokens, StudyTokens
from training.report_items import shuffle_items
from training.token_cache import TokenCache


@dataclass
class AugmentConfig:
    """The paper's CLIP augmentations (docs/training.md); the zero config leaves a study as it is."""

    token_dropout: float = 0.03  # fraction of a series' tokens dropped (paper: ~3%)
    series_dropout: float = 0.08  # chance that a series is dropped (one series always stays; paper: ~8%)
    unk_name: float = 0.07  # chance that a series name becomes "unk" (paper: ~7%)
    unk_description: float = 0.07  # chance that the study description becomes "unk"
    filter_range: tuple[float, float] | None = None  # background threshold drawn in this range per series;
    #                                                   None = the model config's threshold (what inference uses)
    max_tokens: int | None = None  # keep at most this many tokens of a series (random subset); None = all
    shuffle_report_items: bool = True  # report items in a random order (paper)

    def __post_init__(self) -> None:
        for name in ("token_dropout", "series_dropout", "unk_name", "unk_description"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.filter_range is not None and not 0.0 <= self.filter_range[0] <= self.filter_range[1] < 1.0:
            raise ValueError(f"filter_range must satisfy 0 <= low <= high < 1, got {self.filter_range}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")


NO_AUGMENTATION = AugmentConfig(token_dropout=0.0, series_dropout=0.0, unk_name=0.0, unk_description=0.0,
                                shuffle_report_items=False)


@dataclass
class TokenStudy:
    """One manifest study whose series are in the token cache."""

    entry: StudyEntry  # the manifest line
    cache: TokenCache  # where its tokens are (read as its ``read`` says)

    def tokens(self) -> StudyTokens:
        return self.cache.study_tokens(self.entry.study_id, self.entry.study_description)

    @property
    def abnormal(self) -> bool:
        return any(self.entry.labels.values())


def token_studies(manifest: str, cache: TokenCache, splits: Sequence[str]) -> list[TokenStudy]:
    """The studies of ``splits`` that have cached tokens (studies whose every series failed to load are
    absent from the cache and left out), in manifest order."""
    cached = set(cache.study_ids)
    return [TokenStudy(entry, cache) for entry in read_manifest(manifest, splits) if entry.study_id in cached]


def label_targets(entries: Sequence[StudyEntry], space: LabelSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(diagnoses (N, 52) 0/1, referrals (N, 11) 0/1, priority tier index (N,)) of manifest entries; priority
    and referrals derive from the labels with the label space's mapping when the entry does not give them."""
    diagnoses = np.array([[entry.labels.get(key, 0) for key in space.diagnosis_keys] for entry in entries],
                         dtype=np.int64).reshape(len(entries), len(space.diagnosis_keys))
    referrals = np.zeros((len(entries), len(space.referral_keys)), dtype=np.int64)
    tiers = np.zeros(len(entries), dtype=np.int64)
    for row, entry in enumerate(entries):
        positive = [key for key, flag in zip(space.diagnosis_keys, diagnoses[row]) if flag]
        for key in entry.referrals or space.referrals_of(positive):
            referrals[row, space.referral_keys.index(key)] = 1
        tiers[row] = space.priority_tiers.index(entry.priority or space.priority_of(positive))
    return diagnoses, referrals, tiers


def augment_series(series: SeriesTokens, config: AugmentConfig, tokenizer: VolumeTokenizerConfig,
                   rng: np.random.Generator) -> SeriesTokens:
    """Filter-threshold jitter, token dropout and the token cap for one series; ``tokenizer`` (the model
    config's section) gives the background filter's threshold and minimum token count."""
    low, high = config.filter_range or (tokenizer.min_foreground_fraction,) * 2
    series = series.refilter(float(rng.uniform(low, high)) if high > low else low, tokenizer.min_tokens)
    count = len(series)
    keep = np.arange(count)
    if config.token_dropout > 0 and count > 1:
        keep = keep[rng.random(count) >= config.token_dropout]
    if config.max_tokens is not None and len(keep) > config.max_tokens:
        keep = np.sort(rng.choice(keep, config.max_tokens, replace=False))
    if len(keep) == 0:
        keep = np.array([int(rng.integers(count))]) if count else keep
    return series if len(keep) == count else series.subset(keep)


def study_inputs(tokens: StudyTokens, config: AugmentConfig, tokenizer: VolumeTokenizerConfig,
                 rng: np.random.Generator) -> tuple[list[tuple[Tensor, str]], str]:
    """The ``PrimaCLIP.pack`` input of one study, augmented: its series as (features, name) and its
    description. With ``NO_AUGMENTATION`` this is what inference sees (the config's filter threshold)."""
    series = list(tokens.series)
    if config.series_dropout > 0 and len(series) > 1:
        kept = [s for s in series if rng.random() >= config.series_dropout]
        series = kept or [series[int(rng.integers(len(series)))]]
    pairs = []
    for one in series:
        augmented = augment_series(one, config, tokenizer, rng)
        name = UNK_NAME if config.unk_name > 0 and rng.random() < config.unk_name else augmented.name
        pairs.append((augmented.features, name))
    unk_description = config.unk_description > 0 and rng.random() < config.unk_description
    return pairs, UNK_NAME if unk_description else tokens.description


def report_text(report: str, config: AugmentConfig, rng: np.random.Generator) -> str:
    return shuffle_items(report, rng) if config.shuffle_report_items else report


def step_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of one study's augmentation at one step: a pure function of its arguments."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, index]))


def sampling_weights(studies: Sequence[TokenStudy], abnormal_upsample: float) -> np.ndarray:
    """Per-study sampling probability: abnormal studies ``abnormal_upsample`` times as likely (paper: x3-4)."""
    if abnormal_upsample <= 0:
        raise ValueError(f"abnormal_upsample must be > 0, got {abnormal_upsample}")
    weights = np.array([abnormal_upsample if s.abnormal else 1.0 for s in studies])
    return weights / weights.sum()


def global_batch(num_studies: int, batch_size: int, probabilities: np.ndarray, seed: int, step: int) -> np.ndarray:
    """Study indices of step ``step``'s global batch: drawn without replacement (one study at most once,
    so the CLIP loss has no duplicate positives), a pure function of (seed, step)."""
    if batch_size > num_studies:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_studies} training studies")
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, 0x5EED]))
    return rng.choice(num_studies, batch_size, replace=False, p=probabilities)


def rank_share(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's equal share of a global batch (the batch size must divide by the world size)."""
    if len(indices) % world_size:
        raise ValueError(f"a global batch of {len(indices)} does not split over {world_size} processes")
    return indices[rank::world_size]


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@dataclass
class StudyOutputs:
    """What the model (and heads) make of a list of studies, float32 on the CPU."""

    embeddings: Tensor  # (N, study_dim) raw hViT study embeddings
    image_features: Tensor  # (N, embed_dim) L2-normalised joint-space image features
    heads: HeadOutput | None  # the heads' outputs (when heads were given)


def study_outputs(model: PrimaCLIP, studies: Sequence[StudyTokens], config: PrimaConfig, *,
                  heads: TaskHeads | None = None, augment: AugmentConfig = NO_AUGMENTATION, seed: int = 0,
                  batch_size: int = 16, dtype: torch.dtype | None = None) -> StudyOutputs:
    """The model (and ``heads``) on tokenized studies, ``batch_size`` studies per forward, in eval mode (no
    augmentation by default: what inference sees)."""
    model.eval()
    if heads is not None:
        heads.eval()
    device = model.logit_scale.device
    raw, joint, outputs = [], [], []
    for first, chunk in zip(range(0, len(studies), batch_size), batches(studies, batch_size)):
        inputs = [study_inputs(tokens, augment, config.volume_tokenizer, step_rng(seed, 0, first + i))
                  for i, tokens in enumerate(chunk)]
        batch = model.pack([pairs for pairs, _ in inputs], [description for _, description in inputs])
        with torch.no_grad(), autocast(device, dtype):
            study, _, token_outputs = model.visual.encode(batch)
            features = model.image_proj(study)
            if heads is not None:
                outputs.append(heads.on_batch(study, token_outputs, batch))
        raw.append(study.float().cpu())
        joint.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    def joined(name: str) -> Tensor | None:
        parts = [getattr(output, name) for output in outputs]
        return None if parts[0] is None else torch.cat([part.float().cpu() for part in parts])

    head_output = HeadOutput(*map(joined, (f.name for f in dataclasses.fields(HeadOutput)))) if outputs else None
    return StudyOutputs(torch.cat(raw), torch.cat(joint), head_output)


def study_embeddings(model: PrimaCLIP, studies: Sequence[StudyTokens], config: PrimaConfig, *,
                     augment: AugmentConfig = NO_AUGMENTATION, seed: int = 0, batch_size: int = 16,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Raw hViT study embeddings (N, study_dim) and joint-space image features (N, embed_dim), float32 on
    the CPU, of tokenized studies (``study_outputs`` without heads)."""
    outputs = study_outputs(model, studies, config, augment=augment, seed=seed, batch_size=batch_size, dtype=dtype)
    return outputs.embeddings, outputs.image_features
