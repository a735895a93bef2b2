"""training.lesion_masks: a manifest's lesion masks on the series grid and per token."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from prima.manifest import read_manifest
from training.evaluate import FOCAL_DIAGNOSES
from training.lesion_masks import lesion_mask_on_grid, token_lesion_overlap


def test_lesion_masks_land_on_the_series_grid_where_the_lesion_is(tiny_dataset, random_release_path, tmp_path):
    """The mask resampled by lesion_mask_on_grid covers the same voxels as the mask file loaded and
    preprocessed like a series (prima.io -> LPS -> 256 in-plane): no flip, no shift."""
    from prima import load_release
    from prima.io import load_study
    from prima.preprocess import preprocess_series
    from prima.tokens import tokenize_study

    release = load_release(random_release_path)
    entry = next(e for e in read_manifest(tiny_dataset) if e.lesion_masks and any(
        key in FOCAL_DIAGNOSES for mask in e.lesion_masks.values() for key in mask.keys))
    name, lesion = next((n, m) for n, m in entry.lesion_masks.items() if any(k in FOCAL_DIAGNOSES for k in m.keys))
    key = next(k for k in lesion.keys if k in FOCAL_DIAGNOSES)
    series_entry = next(s for s in entry.series if s.name == name)
    tokens = next(s for s in tokenize_study(load_study([series_entry.path], series_names=[name]), release).series)
    on_grid = lesion_mask_on_grid(entry, name, key, tokens, release.config.preprocess)
    assert on_grid is not None and on_grid.shape == tuple(tokens.shape)
    image = nib.load(str(lesion.path))
    channel = np.asarray(image.dataobj, dtype=np.float32)
    if channel.ndim == 4:
        channel = channel[..., lesion.keys.index(key)]
    nib.save(nib.Nifti1Image(channel, image.affine), tmp_path / "mask.nii.gz")
    (mask_series,) = load_study([tmp_path / "mask.nii.gz"]).series  # the mask loaded like any series
    reference = preprocess_series(mask_series, release.config.preprocess).array > 0.5
    assert reference.shape == on_grid.shape
    overlap = (reference & on_grid).sum() / (reference | on_grid).sum()
    assert overlap > 0.8
    overlap = token_lesion_overlap(entry, tokens, release.config.preprocess, release.config.volume_tokenizer.patch_size)
    assert overlap.shape == (len(tokens),) and overlap.max() > 0 and (overlap == 0).any()
    without = next(e for e in read_manifest(tiny_dataset) if e.lesion_masks == {})
    assert token_lesion_overlap(without, tokens, release.config.preprocess, (32, 32, 4)) is None
