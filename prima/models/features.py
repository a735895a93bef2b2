"""Token features for the sequence ViT: ``[256 latent | 30 sinusoidal 3D position | 3 plane one-hot]``.

The position part encodes each of the three patch-grid coordinates (array-axis order, patch units)
with 5 sine and 5 cosine frequencies, so the model sees where a token sits in the volume; the
one-hot says which plane the series was acquired in (order: axial, coronal, sagittal).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prima.config import LATENT_DIM, PLANES, POSITION_DIM_PER_AXIS

_MAX_PERIOD = 10_000.0


def sinusoidal_position(coords: Tensor) -> Tensor:
    """Sinusoidal embedding of 3D patch coordinates.

    Args:
        coords: (N, 3) integer or float patch-grid indices.

    Returns:
        (N, 30) float32: for each axis, 5 sines then 5 cosines of ``coord * 10000**(-k/5)``.
    """
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (N, 3), got {tuple(coords.shape)}")
    half = POSITION_DIM_PER_AXIS // 2
    freqs = _MAX_PERIOD ** (-torch.arange(half, dtype=torch.float32, device=coords.device) / half)
    angles = coords.to(torch.float32)[:, :, None] * freqs  # (N, 3, 5)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


def plane_one_hot(plane: str, n: int, device: torch.device | str | None = None) -> Tensor:
    """(n, 3) one-hot rows for an acquisition plane in {"axial", "coronal", "sagittal"}."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    out = torch.zeros(n, len(PLANES), device=device)
    out[:, PLANES.index(plane)] = 1.0
    return out


def token_features(latents: Tensor, coords: Tensor, plane: str) -> Tensor:
    """The 289-d sequence-ViT input of every token of one series.

    Args:
        latents: (N, 256) VQ-VAE token latents.
        coords: (N, 3) patch-grid indices in array-axis order.
        plane: acquisition plane of the series, one of ``PLANES``.

    Returns:
        (N, 289) float tensor on the latents' device.
    """
    if latents.ndim != 2 or latents.shape[1] != LATENT_DIM:
        raise ValueError(f"latents must have shape (N, {LATENT_DIM}), got {tuple(latents.shape)}")
    if coords.shape[0] != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {coords.shape[0]} coordinates")
    coords = coords.to(latents.device)
    n = latents.shape[0]
    return torch.cat(
        [latents.float(), sinusoidal_position(coords), plane_one_hot(plane, n, latents.device)], dim=-1
    )
