"""Task heads on the frozen study embedding: 3-layer MLPs for the diagnoses (sigmoid each), the
referrals (sigmoid each) and the priority tier (softmax). Each diagnosis and referral output keeps
its operating threshold in logit units, so a prediction is positive when ``logit > threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prima.config import HeadsConfig


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


@dataclass
class HeadOutput:
    diagnosis_logits: Tensor  # (B, n_diagnoses)
    referral_logits: Tensor  # (B, n_referrals)
    priority_logits: Tensor  # (B, n_tiers)


class TaskHeads(nn.Module):
    """Args:
        in_dim: width of the study embedding (e.g. 10240).
        config: hidden width and dropout.
        n_diagnoses, n_referrals, n_tiers: output sizes (52, 11, 3 for the shipped label space).
        diagnosis_thresholds, referral_thresholds: operating thresholds in logit units; ``None`` = 0.
    """

    def __init__(
        self,
        in_dim: int,
        config: HeadsConfig,
        n_diagnoses: int,
        n_referrals: int,
        n_tiers: int,
        diagnosis_thresholds: list[float] | None = None,
        referral_thresholds: list[float] | None = None,
    ) -> None:
        super().__init__()
        if min(in_dim, config.hidden, n_diagnoses, n_referrals, n_tiers) <= 0:
            raise ValueError("in_dim, hidden width and every output size must be positive")
        self.config = config
        self.diagnosis = _mlp(in_dim, config.hidden, n_diagnoses, config.dropout)
        self.referral = _mlp(in_dim, config.hidden, n_referrals, config.dropout)
        self.priority = _mlp(in_dim, config.hidden, n_tiers, config.dropout)
        self.register_buffer("diagnosis_thresholds", self._thresholds(diagnosis_thresholds, n_diagnoses, "diagnosis"))
        self.register_buffer("referral_thresholds", self._thresholds(referral_thresholds, n_referrals, "referral"))

    @staticmethod
    def _thresholds(values: list[float] | None, n: int, what: str) -> Tensor:
        if not values:
            return torch.zeros(n)
        if len(values) != n:
            raise ValueError(f"{len(values)} {what} thresholds for {n} outputs")
        return torch.tensor(values, dtype=torch.float32)

    def forward(self, study_embedding: Tensor) -> HeadOutput:
        """study_embedding: (B, in_dim)."""
        return HeadOutput(
            diagnosis_logits=self.diagnosis(study_embedding),
            referral_logits=self.referral(study_embedding),
            priority_logits=self.priority(study_embedding),
        )
