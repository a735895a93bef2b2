"""training.lesion_masks: a manifest's lesion masks on the series grid and per token."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from prima.manifest import read_manifest
from training.evaluate import FOCAL_DIAGNOSES
from training.lesion_masks import lesion_mask_on_grid, token_lesion_overlap


def _focal_lesion(tiny_dataset):
    """A study with a focal lesion: its manifest entry, the series name, the mask entry and the lesion's key."""
    entry = next(e for e in read_manifest(tiny_dataset) if e.lesion_masks and any(
        key in FOCAL_DIAGNOSES for mask in e.lesion_masks.values() for key in mask.keys))
    name, lesion = next((n, m) for n, m in entry.lesion_masks.items() if any(k in FOCAL_DIAGNOSES for k in m.keys))
    return entry, name, lesion, next(k for k in lesion.keys if k in FOCAL_DIAGNOSES)


def _mask_as_series(lesion, key: str, folder):
    """The lesion mask's channel ``key`` loaded like any series (prima.io)."""
    from prima.io import load_study

    image = nib.load(str(lesion.path))
    channel = np.asarray(image.dataobj, dtype=np.float32)
    if channel.ndim == 4:
        channel = channel[..., lesion.keys.index(key)]
    nib.save(nib.Nifti1Image(channel, image.affine), folder / "mask.nii.gz")
    (mask_series,) = load_study([folder / "mask.nii.gz"]).series
    return mask_series


def test_lesion_masks_land_on_the_series_grid_where_the_lesion_is(tiny_dataset, random_release_path, tmp_path):
    """The mask resampled by lesion_mask_on_grid covers the same voxels as the mask file loaded and
    preprocessed like a series (prima.io -> LPS -> 256 in-plane): no flip, no shift."""
    from prima import load_release
    from prima.io import load_study
    from prima.preprocess import preprocess_series
    from prima.tokens import tokenize_study

    release = load_release(random_release_path)
    entry, name, lesion, key = _focal_lesion(tiny_dataset)
    series_entry = next(s for s in entry.series if s.name == name)
    tokens = next(s for s in tokenize_study(load_study([series_entry.path], series_names=[name]), release).series)
    on_grid = lesion_mask_on_grid(entry, name, key, tokens, release.config.preprocess)
    assert on_grid is not None and on_grid.shape == tuple(tokens.shape)
    reference = preprocess_series(_mask_as_series(lesion, key, tmp_path), release.config.preprocess).array > 0.5
    assert reference.shape == on_grid.shape
    overlap = (reference & on_grid).sum() / (reference | on_grid).sum()
    assert overlap > 0.8
    overlap = token_lesion_overlap(entry, tokens, release.config.preprocess, release.config.volume_tokenizer.patch_size)
    assert overlap.shape == (len(tokens),) and overlap.max() > 0 and (overlap == 0).any()
    without = next(e for e in read_manifest(tiny_dataset) if e.lesion_masks == {})
    assert token_lesion_overlap(without, tokens, release.config.preprocess, (32, 32, 4)) is None


def test_lesion_masks_land_on_the_head_grid(tiny_dataset, tmp_path):
    """On the "head" grid the mask follows the series onto the box centred on the study's head."""
    from prima.factory import get_model_config
    from prima.manifest import load_entry_study
    from prima.preprocess import grid_anchor, preprocess_series
    from prima.tokens import series_patches

    config = get_model_config("prima-lite-head")
    entry, name, lesion, key = _focal_lesion(tiny_dataset)
    study = load_entry_study(entry)
    centre = grid_anchor(study.series, config.preprocess)
    patches = series_patches(next(s for s in study.series if s.name == name), config, centre)
    on_grid = lesion_mask_on_grid(entry, name, key, patches, config.preprocess)
    assert on_grid is not None and on_grid.shape == tuple(patches.shape)
    reference = preprocess_series(_mask_as_series(lesion, key, tmp_path), config.preprocess, centre).array > 0.5
    overlap = (reference & on_grid).sum() / (reference | on_grid).sum()
    assert overlap > 0.8
