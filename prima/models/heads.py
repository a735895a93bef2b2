"""Task heads on the study embedding: 3-layer MLPs for the diagnoses (sigmoid each), the referrals
(sigmoid each) and the priority tier (softmax). Each diagnosis and referral output keeps its operating
threshold in logit units, so a prediction is positive when ``logit > threshold``.

With ``diagnosis_pool="tokens"`` the diagnoses are read from the tokens instead: a linear layer scores every
token output of the sequence ViT for an abnormal logit and each diagnosis, and a study's logit is the mean of
its ``top_tokens`` largest scores over all its series. A few lesion tokens can then decide a study, which
registers pooled over hundreds of tokens did not learn to do (docs/training.md).

``calibrate`` folds a logit calibration (``LogitCalibration``, fitted by ``training.heads``) into an output's
last linear layer and its thresholds, so a release's probabilities are calibrated with no step at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prima.config import TOKEN_DIM, HeadsConfig
from prima.models.batching import StudyBatch


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


@dataclass(frozen=True)
class LogitCalibration:
    """``(logit - shift) / temperature`` per output: ``shift`` undoes the offset a positive-weighted BCE
    trains into a logit (its optimum sits ``log pos_weight`` above the true log-odds), ``temperature`` > 0
    rescales over- or under-confident logits. Neither changes the order of one output's scores, so AUROC is
    unchanged and a threshold maps to the same decisions."""

    shift: Tensor  # (n_outputs,) or 0-d, in logit units
    temperature: float  # > 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def apply(self, logits: Tensor) -> Tensor:
        """(..., n_outputs) logits -> calibrated logits."""
        return (logits - self.shift.to(logits)) / self.temperature


CALIBRATED_OUTPUTS = ("diagnosis", "referral", "priority", "abnormal")


@dataclass
class HeadOutput:
    diagnosis_logits: Tensor  # (B, n_diagnoses)
    referral_logits: Tensor  # (B, n_referrals)
    priority_logits: Tensor  # (B, n_tiers)
    abnormal_logits: Tensor | None = None  # (B,) normal vs abnormal, with token pooling only


class TaskHeads(nn.Module):
    """Args:
        in_dim: width of the study embedding (e.g. 10240).
        config: hidden width and dropout.
        n_diagnoses, n_referrals, n_tiers: output sizes (52, 11, 3 for the shipped label space).
        diagnosis_thresholds, referral_thresholds: operating thresholds in logit units; ``None`` = 0.

    With ``config.diagnosis_pool == "tokens"`` the diagnosis MLP is replaced by ``token_scorer``, a linear layer
    from a sequence-ViT token output (289) to the abnormal logit and the diagnosis logits (1 + n_diagnoses).
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
        self.pools_tokens = config.diagnosis_pool == "tokens"
        if self.pools_tokens:
            self.token_scorer = nn.Linear(TOKEN_DIM, 1 + n_diagnoses)
        else:
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

    @torch.no_grad()
    def calibrate(self, output: str, calibration: LogitCalibration) -> None:
        """Fold ``calibration`` into ``output``'s logits (one of ``CALIBRATED_OUTPUTS``; ``abnormal`` with token
        pooling only) and its thresholds: the last linear layer's weight is divided by the temperature and its
        bias calibrated. With token pooling the study logit is a mean of its largest token scores, which moves
        with every token score alike, so calibrating the token scores calibrates the study logit."""
        if output not in CALIBRATED_OUTPUTS:
            raise ValueError(f"unknown output {output!r}; valid: {CALIBRATED_OUTPUTS}")
        if output == "abnormal" and not self.pools_tokens:
            raise ValueError("these heads have no abnormal logit (diagnosis_pool 'embedding')")
        if self.pools_tokens and output in ("diagnosis", "abnormal"):
            rows = slice(1, None) if output == "diagnosis" else slice(0, 1)
            layer = self.token_scorer
        else:
            rows, layer = slice(None), getattr(self, output)[-1]
        layer.weight[rows] /= calibration.temperature
        layer.bias[rows] = calibration.apply(layer.bias[rows])
        if output in ("diagnosis", "referral"):
            thresholds = getattr(self, f"{output}_thresholds")
            thresholds.copy_(calibration.apply(thresholds))

    def series_scores(self, token_outputs: Tensor, token_mask: Tensor) -> Tensor:
        """The ``top_tokens`` largest token scores of each series and output, all a study's pooling needs.

        Args:
            token_outputs: (S, T, 289) the sequence ViT's token outputs (``PrimaVisual.encode_series_with_tokens``).
            token_mask: (S, T) bool, True for real tokens.

        Returns:
            (S, top_tokens, 1 + n_diagnoses) scores, largest first; -inf where a series has fewer tokens.
        """
        if not self.pools_tokens:
            raise ValueError("these heads read the study embedding (diagnosis_pool 'embedding'), not token scores")
        if token_outputs.ndim != 3 or token_mask.shape != token_outputs.shape[:2]:
            raise ValueError(f"token_outputs (S, T, {TOKEN_DIM}) and token_mask (S, T) expected, got "
                             f"{tuple(token_outputs.shape)} and {tuple(token_mask.shape)}")
        scores = self.token_scorer(token_outputs).float().masked_fill(~token_mask.bool()[..., None], -torch.inf)
        top = scores.topk(min(self.config.top_tokens, scores.shape[1]), dim=1).values
        missing = self.config.top_tokens - top.shape[1]
        return torch.cat([top, top.new_full((len(top), missing, top.shape[2]), -torch.inf)], 1) if missing else top

    def pool(self, series_scores: Tensor) -> Tensor:
        """(B, 1 + n_diagnoses) per study and output, the mean of its ``top_tokens`` largest token scores.

        Args:
            series_scores: (B, S, top_tokens, 1 + n_diagnoses) ``series_scores`` of each study's series, -inf
                for padded series. A study without any token (every series left out, as the series-drop analysis
                does to a one-series study) scores 0: no evidence either way.
        """
        scores = series_scores.flatten(1, 2)
        top = scores.topk(min(self.config.top_tokens, scores.shape[1]), dim=1).values
        real = torch.isfinite(top)
        return torch.where(real, top, torch.zeros_like(top)).sum(1) / real.sum(1).clamp(min=1)

    def on_batch(self, study_embedding: Tensor, token_outputs: Tensor, batch: StudyBatch) -> HeadOutput:
        """The outputs for a packed batch of studies.

        Args:
            study_embedding: (B, in_dim) the batch's study embeddings.
            token_outputs: (S, T, 289) the sequence ViT's token outputs of the batch's series (read only when
                pooling tokens; ``PrimaVisual.encode``).
            batch: the ``StudyBatch`` they were computed from.
        """
        if not self.pools_tokens:
            return self(study_embedding)
        scores, _ = batch.study_layout(self.series_scores(token_outputs, batch.token_mask), fill=-torch.inf)
        return self(study_embedding, scores)

    def forward(self, study_embedding: Tensor, series_scores: Tensor | None = None) -> HeadOutput:
        """Args:
            study_embedding: (B, in_dim).
            series_scores: (B, S, top_tokens, 1 + n_diagnoses) token scores of each study's series (``series_scores``,
                -inf for padded series); required with token pooling, refused without.
        """
        if self.pools_tokens != (series_scores is not None):
            raise ValueError("token-pooling heads need series_scores" if self.pools_tokens
                             else "these heads read the study embedding only: series_scores must be None")
        referral, priority = self.referral(study_embedding), self.priority(study_embedding)
        if not self.pools_tokens:
            return HeadOutput(self.diagnosis(study_embedding), referral, priority)
        pooled = self.pool(series_scores)
        return HeadOutput(pooled[:, 1:], referral, priority, abnormal_logits=pooled[:, 0])
