"""The Prima CLIP model: the hierarchical ViT (``.visual``), the GPT-2 report encoder (``.text``),
their 128-d projections and the learnable temperatures. It returns embeddings, never losses.

The encoders are public so that callers can cache pieces: LIME re-runs one series through
``visual.encode_series`` and reuses the other series' vectors in ``visual.encode_study``.
``PrimaCLIP.embed_texts`` is the one way texts are embedded outside training steps (zero-shot, the
evaluation, CLIP validation), and ``zero_shot_prompt`` the one text a diagnosis is scored with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prima.config import PrimaConfig, VisionConfig
from prima.models.batching import StudyBatch, pack_studies
from prima.models.name_encoder import NameEncoder
from prima.models.sequence_vit import SequenceViT
from prima.models.study_vit import StudyViT
from prima.models.text import ReportTokenizer, TextTower
from prima.precision import autocast


class PrimaVisual(nn.Module):
    """The hViT as the paper counts it: series-name encoder, sequence ViT, study-description encoder,
    study ViT and the patient-discrimination MLP.

    Args:
        config: the vision section of a ``PrimaConfig``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.series_name_encoder = NameEncoder(config.sequence.series_name)
        self.sequence_vit = SequenceViT(config.sequence)
        self.description_encoder = NameEncoder(config.study.description)
        self.study_vit = StudyViT(config.study, series_dim=config.sequence.out_dim)
        self.patdis_proj = nn.Sequential(
            nn.Linear(config.sequence.out_dim, config.patdis_hidden),
            nn.GELU(),
            nn.Linear(config.patdis_hidden, config.patdis_dim),
        )

    @property
    def series_dim(self) -> int:
        return self.config.sequence.out_dim

    @property
    def study_dim(self) -> int:
        """Width of the study embedding the heads read (paper: 10 x 1024 = 10240)."""
        return self.study_vit.out_dim

    def encode_series(self, tokens: Tensor, token_mask: Tensor, name_ids: Tensor, name_mask: Tensor) -> Tensor:
        """Series vectors (S, series_dim) from padded token features (S, T, 289), their mask (S, T)
        and the series-name codes and mask (S, Ln)."""
        return self.encode_series_with_tokens(tokens, token_mask, name_ids, name_mask)[0]

    def encode_series_with_tokens(self, tokens: Tensor, token_mask: Tensor, name_ids: Tensor,
                                  name_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``encode_series``, also returning the sequence ViT's token outputs (S, T, 289) (what token-pooling
        heads score; padded positions are not meaningful)."""
        names = self.series_name_encoder(name_ids, name_mask)
        return self.sequence_vit.encode_with_tokens(tokens, token_mask, names)

    def encode_study(
        self, series_vectors: Tensor, series_mask: Tensor, description_ids: Tensor, description_mask: Tensor
    ) -> Tensor:
        """Study embeddings (B, registers * width) from series vectors (B, S_max, series_dim), their
        mask (B, S_max) and the study-description codes and mask (B, Ld)."""
        description = self.description_encoder(description_ids, description_mask)
        return self.study_vit(series_vectors, series_mask, description)

    def patient_embedding(self, series_vectors: Tensor) -> Tensor:
        """Patient-discrimination embeddings (S, patdis_dim) of series vectors (S, series_dim)."""
        return self.patdis_proj(series_vectors)

    def encode(self, batch: StudyBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``forward``, also returning the sequence ViT's token outputs (S, T, 289)."""
        series, token_outputs = self.encode_series_with_tokens(batch.tokens, batch.token_mask, batch.name_ids,
                                                               batch.name_mask)
        series_vectors, series_mask = batch.study_layout(series)
        study = self.encode_study(series_vectors, series_mask, batch.description_ids, batch.description_mask)
        return study, series, token_outputs

    def forward(self, batch: StudyBatch) -> tuple[Tensor, Tensor]:
        """Returns the study embeddings (B, study_dim) and the series vectors (S, series_dim)."""
        return self.encode(batch)[:2]


# Cap of both logit scales (temperature >= 0.01), as in CLIP: beyond it training becomes unstable.
MAX_LOGIT_SCALE = 100.0


def zero_shot_prompt(name: str) -> str:
    """The text a diagnosis is scored with zero-shot: its display name as a sentence, "Meningioma." (the
    evaluation's zero-shot AUROC and ``prima.explain.zero_shot``'s nearest diagnoses).

    Args:
        name: the diagnosis' display name (``Diagnosis.name``).

    Raises:
        ValueError: an empty name.
    """
    if not name.strip():
        raise ValueError("a zero-shot prompt needs a non-empty display name")
    return f"{name}."


@dataclass
class ClipOutput:
    image_features: Tensor  # (B, embed_dim) L2-normalised study embeddings in the joint space
    text_features: Tensor  # (B, embed_dim) L2-normalised report embeddings in the joint space
    logit_scale: Tensor  # () exp of the learnable CLIP log-scale (1 / temperature), at most MAX_LOGIT_SCALE
    series_features: Tensor  # (S, patdis_dim) L2-normalised patient-discrimination embeddings
    patdis_logit_scale: Tensor  # () exp of the patient-discrimination log-scale, at most MAX_LOGIT_SCALE
    series_study: Tensor  # (S,) study index of each series (the positives of eq. 8)
    series_valid: Tensor  # (S,) bool, True for series with at least one real token
    study_embedding: Tensor  # (B, visual.study_dim) raw hViT study embeddings (for the heads)
    token_outputs: Tensor  # (S, T, 289) the sequence ViT's token outputs (for token-pooling heads)


class PrimaCLIP(nn.Module):
    """Args:
        config: the full model config.
    """

    def __init__(self, config: PrimaConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.visual = PrimaVisual(config.vision)
        self.text = TextTower(config.text)
        self.image_proj = nn.Linear(self.visual.study_dim, config.embed_dim)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.patdis_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_patdis_temperature)))

    def pack(
        self, studies: Sequence[Sequence[tuple[Tensor, str | None]]], descriptions: Sequence[str | None]
    ) -> StudyBatch:
        """``pack_studies`` with this model's name lengths, moved to the model's device."""
        vision = self.config.vision
        batch = pack_studies(
            studies,
            descriptions,
            name_max_length=vision.sequence.series_name.max_length,
            description_max_length=vision.study.description.max_length,
        )
        return batch.to(self.logit_scale.device)

    def encode_image(self, batch: StudyBatch, normalize: bool = True) -> Tensor:
        """Study embeddings in the joint space (B, embed_dim)."""
        study, _ = self.visual(batch)
        features = self.image_proj(study)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        """Report embeddings in the joint space (N, embed_dim) from ``ReportTokenizer`` ids and mask."""
        features = self.text_proj(self.text(ids, mask))
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def embed_texts(self, tokenizer: ReportTokenizer, texts: Sequence[str], dtype: torch.dtype | None = None,
                    batch_size: int = 64) -> Tensor:
        """Joint-space embeddings of texts (reports, findings, prompts), without gradients, in the model's
        current mode.

        Args:
            tokenizer: the report tokenizer the text tower was trained with.
            texts: the texts; each is cut to the text config's context length.
            dtype: autocast dtype of the forwards (``prima.precision.autocast_dtype``), None for fp32.
            batch_size: texts per forward.

        Returns:
            (N, embed_dim) float32 on the model's device, L2-normalised in float32 whatever ``dtype``.

        Raises:
            ValueError: ``batch_size`` below 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.logit_scale.device
        rows = [self.logit_scale.new_empty(0, self.config.embed_dim, dtype=torch.float32)]
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenizer(texts[start : start + batch_size], self.config.text.context_length)
            with autocast(device, dtype):
                rows.append(self.encode_text(ids.to(device), mask.to(device), normalize=False).float())
        return F.normalize(torch.cat(rows), dim=-1)

    def forward(self, batch: StudyBatch, text_ids: Tensor, text_mask: Tensor) -> ClipOutput:
        study, series, token_outputs = self.visual.encode(batch)
        return ClipOutput(
            image_features=F.normalize(self.image_proj(study), dim=-1),
            text_features=self.encode_text(text_ids, text_mask),
            logit_scale=self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
            series_features=F.normalize(self.visual.patient_embedding(series), dim=-1),
            patdis_logit_scale=self.patdis_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
            series_study=batch.series_study,
            series_valid=batch.token_mask.any(dim=-1),
            study_embedding=study,
            token_outputs=token_outputs,
        )
