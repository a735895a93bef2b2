"""Configuration dataclasses. A model config is a small JSON file in ``model_configs/`` named after
the model; every section below maps to one key of that file, and checkpoints carry the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PreprocessConfig:
    """How a loaded series is turned into the model's input grid (SPEC section 2)."""

    in_plane_size: int = 256  # in-plane matrix after resampling, both in-plane axes
    min_slice_spacing_mm: float = 4.0  # through-plane spacing is raised to at least this
    intensity_low_percentile: float = 0.5  # foreground percentile mapped to 0 (robust to dark outliers)
    intensity_high_percentile: float = 99.5  # foreground percentile mapped to 1 (robust to bright spikes)


@dataclass
class TokenizerConfig:
    """The 3D VQ-VAE that turns a 32x32x4 patch into a 256-d token (SPEC section 2)."""

    patch_size: tuple[int, int, int] = (32, 32, 4)  # in-plane x in-plane x through-plane voxels
    channels: int = 256  # width of the CNN encoder/decoder (paper: 256; lite: fewer)
    res_layers: int = 2  # residual blocks per resolution level
    latent_channels: int = 2  # channels of the 8x8x2 latent grid: 8*8*2*2 = 256-d token
    codebook_size: int = 8192  # number of codes in the quantiser
    commitment_beta: float = 0.25  # weight of the commitment loss pulling encodings to their code
    ema_decay: float = 0.99  # decay of the exponential moving average codebook updates
    dead_code_threshold: float = 1.0  # a code used less than this (EMA count) is restarted from the batch
    min_foreground_fraction: float = 0.05  # a patch is background below this Otsu-foreground fraction
    min_tokens: int = 25  # the filter lowers its threshold until at least this many patches survive
