"""Training objectives: the symmetric CLIP loss (eqs. 4-6), the patient-discrimination loss (eq. 8)
and the class-weighted losses of the task heads. Models return embeddings; these turn them into
losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _gather(features: Tensor) -> Tensor:
    """All processes' features concatenated in rank order, differentiable for the local slice."""
    return torch.cat(dist_fn.all_gather(features), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between study and report embeddings, averaged over both directions.

    Under ``torch.distributed`` every process scores its studies against the reports of all
    processes (and vice versa), so the negatives come from the global batch.

    Args:
        gather: gather features across processes when a process group is initialised.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        """image_features, text_features: (B, D) L2-normalised; logit_scale: () = 1 / temperature."""
        if image_features.shape != text_features.shape:
            raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
        offset = 0
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_text, all_image = _gather(text_features), _gather(image_features)
            offset = dist.get_rank() * image_features.shape[0]
        else:
            all_text, all_image = text_features, image_features
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
        image_to_text = logit_scale * image_features @ all_text.T
        text_to_image = logit_scale * text_features @ all_image.T
        return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


class PatientDiscriminationLoss(nn.Module):
    """Eq. 8: each series should be closer to the series of its own study than to the others.

    For series ``j`` of study ``i``: ``-log(sum_same exp(sim/tau) / sum_all exp(sim/tau))``,
    averaged over the series of each study, then over studies. As in eq. 8 the sums include the
    series itself.

    Series without a real token (dropped by series dropout) all get the same embedding, which would
    make them spurious positives and negatives of each other; ``series_valid`` leaves them out.

    Under ``torch.distributed`` (as ``ClipLoss``) every process's series are negatives of the others', so
    processes with equal shares of a global batch compute the loss of that batch on one process.

    Args:
        gather: gather series across processes when a process group is initialised.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self, series_features: Tensor, series_study: Tensor, logit_scale: Tensor, series_valid: Tensor | None = None
    ) -> Tensor:
        """The loss, averaged over the studies that keep at least one valid series.

        Args:
            series_features: (S, D) L2-normalised patient-discrimination embeddings.
            series_study: (S,) study index of each series.
            logit_scale: () 1 / tau_p.
            series_valid: (S,) bool, True for series with at least one real token; the others are
                neither anchors, positives nor negatives, and a study without valid series adds
                nothing. Default: every series is valid.

        Returns:
            A scalar; a zero still attached to the inputs' graph when no series is valid, so that
            backward (and DDP's gradient reduction) runs as on any other batch.
        """
        if series_features.shape[0] != series_study.shape[0]:
            raise ValueError(f"{series_features.shape[0]} series but {series_study.shape[0]} study indices")
        if series_valid is None:
            series_valid = torch.ones_like(series_study, dtype=torch.bool)
        elif series_valid.shape != series_study.shape:
            raise ValueError(f"series_valid has shape {tuple(series_valid.shape)}, expected "
                             f"{tuple(series_study.shape)}")
        if not series_valid.any():
            return (series_features.sum() + logit_scale) * 0.0
        anchors, anchor_study = series_features[series_valid], series_study[series_valid]
        others, other_study, other_valid = series_features, series_study, series_valid
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            others, other_study, other_valid = _gather_series(series_features, series_study, series_valid)
            anchor_study = anchor_study + dist.get_rank() * _STUDY_OFFSET
        logits = (logit_scale * anchors @ others.T).masked_fill(~other_valid[None, :], float("-inf"))
        same = anchor_study[:, None] == other_study[None, :]
        per_series = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
        studies, series_to_study, counts = torch.unique(anchor_study, return_inverse=True, return_counts=True)
        per_study = torch.zeros(len(studies), dtype=per_series.dtype, device=per_series.device)
        per_study = per_study.index_add(0, series_to_study, per_series) / counts
        return per_study.mean()


_STUDY_OFFSET = 1 << 40  # added to a process's study indices so that studies of different processes differ


def _gather_series(features: Tensor, study: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every process's series (padded to the largest count, padding marked invalid), features
    differentiable for the local slice, study indices made globally unique."""
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    padding = int(max(c.item() for c in counts)) - features.shape[0]
    padded = F.pad(features, (0, 0, 0, padding))
    global_study = F.pad(study + dist.get_rank() * _STUDY_OFFSET, (0, padding), value=-1)
    padded_valid = F.pad(valid.to(torch.uint8), (0, padding), value=0)  # gloo gathers no bool tensors
    studies = [torch.empty_like(global_study) for _ in counts]
    valids = [torch.empty_like(padded_valid) for _ in counts]
    dist.all_gather(studies, global_study)
    dist.all_gather(valids, padded_valid)
    return _gather(padded), torch.cat(studies), torch.cat(valids).bool()


def positive_weights(labels: Tensor, max_weight: float = 1000.0) -> Tensor:
    """``neg_i / pos_i`` per column of a (N, C) 0/1 label matrix, capped at ``max_weight``.

    A column with no positive gets the cap; a column with no negative gets 1 (plain BCE), since
    neg/pos = 0 there would silence its positives entirely.
    """
    positives = labels.float().sum(0)
    negatives = labels.shape[0] - positives
    weights = (negatives / positives.clamp(min=1e-12)).clamp(max=max_weight)
    return torch.where((negatives == 0) & (positives > 0), torch.ones_like(weights), weights)


def weighted_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor) -> Tensor:
    """Mean binary cross-entropy with positives weighted by ``pos_weight`` (C,) (paper: neg/pos)."""
    return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=pos_weight)


def priority_ce(logits: Tensor, tiers: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy over priority tiers; ``tiers`` (N,) holds tier indices."""
    return F.cross_entropy(logits, tiers, weight=weight)
