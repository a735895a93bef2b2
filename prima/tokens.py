"""The one path from a loaded series to model-ready tokens (docs/design.md section 2).

    loaded series -> preprocess (the model config's section) -> 32x32x4 patches -> Otsu background
    filter -> VQ-VAE codes of the kept patches only, in batches -> token features (N, 289)

Training (token cache, tokenizer data), ``predict``, LIME and the app all go through these
functions, so what a model is trained on and what it sees at inference cannot drift apart.

A token is stored as its VQ-VAE codes (128 indices into the 8192-entry codebook); its 256-d latent is
the codebook vectors of those codes, so codes reproduce the latents bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from prima.config import PrimaConfig, VolumeTokenizerConfig
from prima.io.study import Series, Study
from prima.models.features import token_features
from prima.models.place_normal import PlaceNormalModel
from prima.models.vqvae import VQVAE
from prima.patching import foreground_fractions, patch_grid_shape, patchify, select_tokens
from prima.precision import autocast, autocast_dtype
from prima.preprocess import grid_anchor, preprocess_series

ENCODE_BATCH_SIZE = 256  # patches per VQ-VAE call: bounds memory, large enough to keep the matmuls busy


@dataclass
class SeriesPatches:
    """A preprocessed series cut into patches, before the background filter."""

    name: str  # series name (SeriesDescription, NIfTI stem or the manifest's name)
    plane: str  # acquisition plane: axial, coronal or sagittal
    through_axis: int  # array axis across the acquisition plane
    shape: tuple[int, int, int]  # preprocessed volume shape (L, P, S axes)
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the preprocessed grid
    patches: np.ndarray  # (N, 32, 32, 4) float32 in [0, 1], every patch of the grid, canonical layout
    coords: np.ndarray  # (N, 3) int64 patch-grid coordinates in array-axis order
    fractions: np.ndarray  # (N,) float32 Otsu-foreground fraction of every patch


@dataclass
class FilteredPatches:
    """A series after the background filter, before encoding: the numpy half of ``tokenize_series``
    (batch inference runs it in DataLoader workers and only the kept patches travel)."""

    name: str  # series name
    plane: str  # acquisition plane
    through_axis: int  # array axis across the acquisition plane
    shape: tuple[int, int, int]  # preprocessed volume shape
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the preprocessed grid
    fractions: np.ndarray  # (N_all,) foreground fraction of every patch of the grid
    kept: np.ndarray  # (K,) grid indices of the kept patches, increasing
    coords: np.ndarray  # (K, 3) patch-grid coordinates of the kept patches
    patches: np.ndarray  # (K, 32, 32, 4) float32, the kept patches only


@dataclass
class SeriesTokens:
    """The kept (non-background) tokens of one series, with what is needed to re-filter or draw them."""

    name: str  # series name
    plane: str  # acquisition plane: axial, coronal or sagittal
    through_axis: int  # array axis across the acquisition plane
    shape: tuple[int, int, int]  # preprocessed volume shape the patch grid covers
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the preprocessed grid (heatmaps are drawn on it)
    fractions: np.ndarray  # (N_all,) float32 foreground fraction of EVERY patch of the grid, in grid C order
    patch_indices: np.ndarray  # (K,) int64 grid index of each kept token, increasing
    coords: np.ndarray  # (K, 3) int64 patch-grid coordinates of each kept token, array-axis order
    codes: np.ndarray  # (K, 128) VQ-VAE codes of each kept token (``code_dtype``: int16 for 8192 codes)
    latents: Tensor  # (K, 256) float32 quantised latents (the codebook vectors of ``codes``)
    deviations: Tensor | None = None  # (K, 256) each latent against a place-normal model (``place_normalised``);
    #                                   when set, the sequence ViT reads these instead of the latents

    def __len__(self) -> int:
        return len(self.patch_indices)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Patches along each array axis."""
        return patch_grid_shape(self.shape, self.through_axis)

    @property
    def features(self) -> Tensor:
        """(K, 289) sequence-ViT input: ``[latent (or its deviation) | sinusoidal position | plane one-hot]``."""
        values = self.latents if self.deviations is None else self.deviations
        return token_features(values, torch.from_numpy(self.coords), self.plane)

    def subset(self, keep: np.ndarray | list[int]) -> "SeriesTokens":
        """The tokens at positions ``keep`` (indices into this series' K tokens), in increasing order."""
        keep = np.unique(np.asarray(keep, dtype=np.int64))
        if len(keep) and (keep[0] < 0 or keep[-1] >= len(self)):
            raise ValueError(f"token indices must lie in [0, {len(self)}), got {keep.min()}..{keep.max()}")
        rows = torch.from_numpy(keep)
        return dataclasses.replace(self, patch_indices=self.patch_indices[keep], coords=self.coords[keep],
                                   codes=self.codes[keep], latents=self.latents[rows],
                                   deviations=None if self.deviations is None else self.deviations[rows])

    def refilter(self, min_fraction: float, min_tokens: int) -> "SeriesTokens":
        """Re-apply the background filter at ``min_fraction`` among the encoded tokens (a threshold at or
        above the one they were encoded with; the training-time filter jitter)."""
        return self.subset(select_tokens(self.fractions[self.patch_indices], min_fraction, min_tokens))


@dataclass
class StudyTokens:
    """The tokens of every usable series of a study."""

    description: str  # study description (None-like empty string when unknown)
    series: list[SeriesTokens]


def series_patches(series: Series, config: PrimaConfig, head_centre: np.ndarray | None = None) -> SeriesPatches:
    """Preprocess ``series`` with the config's preprocessing and cut it into patches.

    Args:
        series: a loaded series (``prima.io.load_study``), any orientation and resolution.
        config: the model config; its ``preprocess`` and ``volume_tokenizer.patch_size`` are used.
        head_centre: the study's ``prima.preprocess.grid_anchor`` (needed on the "head" grid).
    """
    ready = preprocess_series(series, config.preprocess, head_centre)
    patch_size = config.volume_tokenizer.patch_size
    patches, coords = patchify(ready.array, ready.through_axis, patch_size)
    fractions = foreground_fractions(ready.array, ready.through_axis, patch_size)
    return SeriesPatches(series.name, ready.plane, ready.through_axis, ready.shape, ready.affine,
                         patches.astype(np.float32, copy=False), coords, fractions.astype(np.float32, copy=False))


def filter_patches(patches: SeriesPatches, config: PrimaConfig, min_fraction: float | None = None) -> FilteredPatches:
    """The patches the background filter keeps (the config's threshold unless ``min_fraction``)."""
    tokenizer_config = config.volume_tokenizer
    threshold = tokenizer_config.min_foreground_fraction if min_fraction is None else min_fraction
    kept = select_tokens(patches.fractions, threshold, tokenizer_config.min_tokens)
    return FilteredPatches(patches.name, patches.plane, patches.through_axis, patches.shape, patches.affine,
                           patches.fractions, kept, patches.coords[kept], patches.patches[kept])


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type that holds every code index (int16 for the paper's 8192 codes)."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


@torch.no_grad()
def encode_patches(volume_tokenizer: VQVAE, patches: np.ndarray, batch_size: int = ENCODE_BATCH_SIZE,
                   precision: str = "auto") -> tuple[np.ndarray, Tensor]:
    """VQ-VAE codes (K, 128) and latents (K, 256) float32 of canonical (K, 32, 32, 4) patches, computed
    ``batch_size`` patches at a time on the volume tokenizer's device (latents stay there).

    ``precision`` ("auto", "fp32", "bf16"; ``prima.precision``) is the encoder's compute precision; the
    nearest-code search is always float32 or better. bf16 moves about one latent position in six to a
    neighbouring code (a near-tie among 8192 codes in a 2-D space) at the same reconstruction PSNR,
    so a token cache and the predictions that should match it are made with the same precision.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(volume_tokenizer.parameters()).device
    dtype = autocast_dtype(device, precision)
    codes = [torch.zeros(0, math.prod(volume_tokenizer.latent_grid), dtype=torch.long, device=device)]
    for start in range(0, len(patches), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size], dtype=np.float32))
        with autocast(device, dtype):
            codes.append(volume_tokenizer.codes(batch.to(device)).flatten(1))
    all_codes = torch.cat(codes)
    stored = all_codes.cpu().numpy().astype(code_dtype(volume_tokenizer.config.codebook_size))
    return stored, volume_tokenizer.tokens_from_codes(all_codes)


def encode_filtered(filtered: FilteredPatches, volume_tokenizer: VQVAE, batch_size: int = ENCODE_BATCH_SIZE,
                    precision: str = "auto") -> SeriesTokens:
    """The torch half of ``tokenize_series``: the kept patches' codes and latents on the tokenizer's device."""
    codes, latents = encode_patches(volume_tokenizer, filtered.patches, batch_size, precision)
    return SeriesTokens(filtered.name, filtered.plane, filtered.through_axis, filtered.shape, filtered.affine,
                        filtered.fractions, filtered.kept, filtered.coords, codes, latents)


def check_volume_tokenizer(volume_tokenizer: VQVAE, config: PrimaConfig) -> None:
    """Raise ValueError when the volume tokenizer was not built with the model config's section."""
    if volume_tokenizer.config != config.volume_tokenizer:
        raise ValueError("the volume tokenizer was built with another config than the model config's "
                         f"volume_tokenizer section: {volume_tokenizer.config} vs {config.volume_tokenizer}")


def tokenize_series(series: Series, volume_tokenizer: VQVAE, config: PrimaConfig, *,
                    min_fraction: float | None = None, batch_size: int = ENCODE_BATCH_SIZE,
                    precision: str = "auto", head_centre: np.ndarray | None = None) -> SeriesTokens:
    """The kept tokens of one loaded series: ``series_patches`` -> ``filter_patches`` -> ``encode_filtered``.

    Args:
        series: a loaded series (``prima.io.load_study``).
        volume_tokenizer: the release's VQ-VAE (its device is where patches are encoded).
        config: the model config (preprocessing, patch size, filter threshold, minimum tokens).
        min_fraction: background-filter threshold; default the config's. A token cache may encode at a
            lower threshold so that training can re-filter higher (``SeriesTokens.refilter``).
        batch_size: patches per VQ-VAE call.
        precision: the encoder's compute precision (``encode_patches``).
        head_centre: the study's ``prima.preprocess.grid_anchor`` (needed on the "head" grid).

    Only the kept patches are encoded.
    """
    check_volume_tokenizer(volume_tokenizer, config)
    return encode_filtered(filter_patches(series_patches(series, config, head_centre), config, min_fraction),
                           volume_tokenizer, batch_size, precision)


def tokenize_study(study: Study, release, *, min_fraction: float | None = None,
                   batch_size: int = ENCODE_BATCH_SIZE, precision: str = "auto",
                   on_series: Callable[[int, str], None] | None = None) -> StudyTokens:
    """The tokens of every series of a loaded study with a release's volume tokenizer and config.

    Args:
        study: ``prima.io.load_study`` output.
        release: a ``prima.release.Release`` that ships a volume tokenizer.
        min_fraction, batch_size, precision: as in :func:`tokenize_series`.
        on_series: called with (index, name) before each series is tokenized (progress reports).

    Raises:
        ValueError: the release has no volume tokenizer or the study no series.
    """
    if release.volume_tokenizer is None:
        raise ValueError(f"release {release.path} ships no volume tokenizer, so it cannot tokenize studies")
    if not study.series:
        raise ValueError(f"study {study.source!r} has no usable series")
    tokens = []
    head_centre = grid_anchor(study.series, release.config.preprocess)
    for index, series in enumerate(study.series):
        if on_series is not None:
            on_series(index, series.name)
        tokens.append(tokenize_series(series, release.volume_tokenizer, release.config, min_fraction=min_fraction,
                                      batch_size=batch_size, precision=precision, head_centre=head_centre))
    return read_by_model(StudyTokens(study.description, tokens), release)


def read_by_model(tokens: StudyTokens, release) -> StudyTokens:
    """A study's tokens as the release's model reads them: against its place-normal model when it ships one
    (``place_normalised``), else as they are. Every path from a study to the model goes through it."""
    if release.place_normal is None:
        return tokens
    return place_normalised(tokens, release.place_normal, release.config.volume_tokenizer)


def place_normalised(tokens: StudyTokens, model: PlaceNormalModel, config: VolumeTokenizerConfig) -> StudyTokens:
    """The study with every token's ``deviations`` against the place-normal model set (the sequence ViT then
    reads them instead of the latents). A series' kind is found from the mean latent of the tokens that the
    config's background filter keeps, so training (whose cache keeps more) and inference agree on it.

    Args:
        tokens: the study's tokens (encoded at or below the config's filter threshold).
        model: the release's ``PlaceNormalModel``.
        config: the model config's volume-tokenizer section (its filter threshold and minimum token count).
    """
    device = model.centroids.device
    series = []
    for one in tokens.series:
        kept = one.refilter(config.min_foreground_fraction, config.min_tokens)
        kind = model.kind_of(kept.latents.to(device).mean(0, keepdim=True))[0]
        series.append(dataclasses.replace(one, deviations=model.deviations(
            one.latents.to(device), kind, one.plane, torch.from_numpy(one.patch_indices)).cpu()))
    return dataclasses.replace(tokens, series=series)
