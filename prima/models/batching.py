"""Packing a batch of studies (a variable number of series, each with a variable number of tokens)
into padded tensors with masks, so the model's forward has no Python loop over series or tokens.

Layout: all series of all studies are stacked along one axis ``S`` (the sequence ViT sees them as
one batch); ``series_study`` and ``series_slot`` say where each series goes in the ``(B, S_max)``
layout the study ViT reads. A series whose tokens are all masked is treated as absent by the study
ViT, so dropping every token of a series equals dropping the series.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from prima.config import TOKEN_DIM
from prima.models.name_encoder import encode_names


@dataclass
class StudyBatch:
    """A batch of B studies holding S series in total."""

    tokens: Tensor  # (S, T, 289) token features, zero-padded along T
    token_mask: Tensor  # (S, T) bool, True for real tokens
    name_ids: Tensor  # (S, Ln) series-name byte codes (see name_encoder.encode_names)
    name_mask: Tensor  # (S, Ln) bool, True for real codes
    series_study: Tensor  # (S,) int64, index of the study each series belongs to
    series_slot: Tensor  # (S,) int64, position of the series within its study
    description_ids: Tensor  # (B, Ld) study-description byte codes
    description_mask: Tensor  # (B, Ld) bool
    max_series: int  # S_max, the largest number of series in one study

    @property
    def num_studies(self) -> int:
        return self.description_ids.shape[0]

    def to(self, device: torch.device | str) -> "StudyBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return StudyBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})

    def study_layout(self, series_vectors: Tensor, fill: float = 0.0) -> tuple[Tensor, Tensor]:
        """Scatter per-series values (S, ...) to (B, S_max, ...), ``fill`` where a study has fewer series, with a
        (B, S_max) mask of usable series.

        A series is usable when it has at least one real token.
        """
        shape = (self.num_studies, self.max_series)
        out = series_vectors.new_full((*shape, *series_vectors.shape[1:]), fill)
        out[self.series_study, self.series_slot] = series_vectors
        mask = torch.zeros(shape, dtype=torch.bool, device=series_vectors.device)
        mask[self.series_study, self.series_slot] = self.token_mask.any(dim=-1)
        return out, mask


def pad_series(series_tokens: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (N_i, 289) token-feature tensors into (S, T_max, 289) zeros-padded plus a (S, T_max) mask."""
    for i, tokens in enumerate(series_tokens):
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_DIM:
            raise ValueError(f"series {i}: token features must be (N, {TOKEN_DIM}), got {tuple(tokens.shape)}")
    lengths = torch.tensor([t.shape[0] for t in series_tokens], dtype=torch.long)
    padded = torch.zeros(len(series_tokens), max(lengths.tolist(), default=0), TOKEN_DIM)
    for i, tokens in enumerate(series_tokens):  # packing happens once per batch, outside the forward
        padded[i, : tokens.shape[0]] = tokens
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask


def pack_studies(
    studies: Sequence[Sequence[tuple[Tensor, str | None]]],
    descriptions: Sequence[str | None],
    name_max_length: int,
    description_max_length: int,
) -> StudyBatch:
    """Pack studies into a ``StudyBatch``.

    Args:
        studies: per study, its series as ``(token_features (N, 289), series_name)`` pairs; a series
            may have zero tokens (then the study ViT ignores it).
        descriptions: one study description per study (``None`` -> ``unk``).
        name_max_length, description_max_length: byte codes kept per name / description, from the
            model config (``NameEncoderConfig.max_length``).
    """
    if len(studies) != len(descriptions):
        raise ValueError(f"{len(studies)} studies but {len(descriptions)} descriptions")
    if not studies:
        raise ValueError("cannot pack an empty batch of studies")
    series = [s for study in studies for s in study]
    tokens, token_mask = pad_series([features for features, _ in series])
    name_ids, name_mask = encode_names([name for _, name in series], name_max_length)
    description_ids, description_mask = encode_names(list(descriptions), description_max_length)
    counts = [len(study) for study in studies]
    series_study = torch.repeat_interleave(torch.arange(len(studies)), torch.tensor(counts))
    series_slot = torch.cat([torch.arange(n) for n in counts])
    return StudyBatch(
        tokens=tokens,
        token_mask=token_mask,
        name_ids=name_ids,
        name_mask=name_mask,
        series_study=series_study,
        series_slot=series_slot,
        description_ids=description_ids,
        description_mask=description_mask,
        max_series=max(counts),
    )
