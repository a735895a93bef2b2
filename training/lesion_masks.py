"""Synthetic (or annotated) lesion masks on the model's grids: what the LIME localisation, the token-level
lesion probe of the evaluation ladder and the volume tokenizer's lesion fidelity are scored against.

A manifest study may record, per series, a mask file on that series' voxel grid (``prima.manifest``
``lesion_masks``). Here such a mask goes through the preprocessing of a series (L,P,S reorientation, the
in-plane and through-plane resampling) so it lies on the same grid as the series' tokens.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from prima.config import PreprocessConfig
from prima.manifest import StudyEntry
from prima.preprocess import reorient_to_lps, resample_onto, resample_series
from training.metrics import token_overlap

MASK_LEVEL = 0.25  # a resampled lesion-mask voxel counts as lesion above this partial-volume fraction
LESION_TOKEN_LEVEL = 0.25  # a token is a lesion token when more than this share of its patch is lesion


def lesion_mask_on_grid(entry: StudyEntry, series_name: str, key: str | None, grid,
                        preprocess: PreprocessConfig) -> np.ndarray | None:
    """The lesion mask of ``key`` (``None``: of every lesion the series shows) on the preprocessed grid of a
    series (``grid``: its ``SeriesTokens`` or ``SeriesPatches``); None when the study records none there."""
    masks = entry.lesion_masks or {}
    if series_name not in masks or (key is not None and key not in masks[series_name].keys):
        return None
    image = nib.load(str(masks[series_name].path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 3:
        channel = data
    else:
        channel = data.max(axis=-1) if key is None else data[..., masks[series_name].keys.index(key)]
    array, affine = reorient_to_lps(channel, image.affine)
    if preprocess.grid == "head":
        array = resample_onto(array, affine, tuple(grid.shape), grid.affine)
    else:
        array, _ = resample_series(array, affine, grid.through_axis, preprocess.in_plane_size,
                                   preprocess.min_slice_spacing_mm)
    if array.shape != tuple(grid.shape):
        raise ValueError(f"{entry.study_id}/{series_name}: mask grid {array.shape} != series grid {grid.shape}")
    mask = array > MASK_LEVEL
    return mask if mask.any() else None


def token_lesion_overlap(entry: StudyEntry, series, preprocess: PreprocessConfig,
                         patch_size: tuple[int, int, int]) -> np.ndarray | None:
    """(K,) share of each kept token's patch that lies inside any lesion of ``series`` (its ``SeriesTokens``);
    None when the study records no mask for that series (``entry.lesion_masks`` None: unknown; {}: none)."""
    mask = lesion_mask_on_grid(entry, series.name, None, series, preprocess)
    if mask is None:
        return None
    return token_overlap(series.coords, mask, patch_size, series.through_axis)
