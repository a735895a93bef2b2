"""training.volume_tokenizer.data and augment: sequence families, patch sets, orientation and filter augmentations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.factory import get_model_config
from prima.manifest import read_manifest
from training.volume_tokenizer.augment import orient_patches, random_orientation, random_token_selection
from training.volume_tokenizer.data import PatchSet, cached_patch_set, extract_patch_set, sequence_type


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("AX T1", "T1"), ("Sag_T1_MPRAGE", "T1"), ("AX T1 POST GAD", "T1_POST"), ("AX T2", "T2"),
        ("AX T2 FLAIR", "FLAIR"), ("COR FLAIR", "FLAIR"), ("AX DWI", "DWI"), ("AX SWI", "SWI"), ("LOCALIZER", "OTHER"),
    ],
)
def test_sequence_type(name: str, family: str) -> None:
    assert sequence_type(name) == family


def test_orient_patches_permutes_and_flips() -> None:
    patches = torch.arange(2 * 32 * 32 * 4, dtype=torch.float32).reshape(2, 32, 32, 4)
    moved = orient_patches(patches, (2, 0, 1), (False, False, False))
    assert moved.shape == (2, 4, 32, 32)
    assert moved[1, 3, 5, 7] == patches[1, 5, 7, 3]
    flipped = orient_patches(patches, (0, 1, 2), (True, False, True))
    assert flipped[0, 0, 2, 0] == patches[0, 31, 2, 3]
    permutation, flips = random_orientation(torch.Generator().manual_seed(0))
    assert sorted(permutation) == [0, 1, 2] and len(flips) == 3
    with pytest.raises(ValueError):
        orient_patches(patches, (0, 0, 1), (False, False, False))


def test_random_token_selection_draws_a_threshold_in_range() -> None:
    fractions = np.linspace(0, 1, 101)
    rng = np.random.default_rng(0)
    kept = [random_token_selection(fractions, rng, 0.2, 0.6, min_tokens=1) for _ in range(20)]
    assert all(fractions[k].min() >= 0.2 - 1e-9 and 41 <= len(k) <= 81 for k in kept)
    assert len({len(k) for k in kept}) > 1  # the threshold varies
    with pytest.raises(ValueError):
        random_token_selection(fractions, rng, 0.6, 0.2)


def test_cached_patch_set_round_trip(mni_manifest: Path, tmp_path: Path) -> None:
    config = get_model_config("prima-lite")
    built = cached_patch_set(mni_manifest, ["train"], tmp_path, config, fraction_range=(0.05, 0.05))
    assert len(list(tmp_path.glob("patches-*.npz"))) == 1
    loaded = cached_patch_set(mni_manifest, ["train"], tmp_path, config, fraction_range=(0.05, 0.05))
    assert np.array_equal(built.patches, loaded.patches) and np.array_equal(built.coords, loaded.coords)
    assert loaded.series_names == [s.name for s in read_manifest(mni_manifest)[0].series]
    assert loaded.patches.dtype == np.float16 and loaded.patches.shape[1:] == (32, 32, 4)
    assert 0.0 <= float(loaded.patches.min()) and float(loaded.patches.max()) <= 1.0
    assert set(np.unique(loaded.series_index)) == {0, 1}
    assert isinstance(loaded, PatchSet) and len(loaded) > 100
    with pytest.raises(ValueError):
        cached_patch_set(mni_manifest, ["test"], tmp_path, config)


def test_patch_cache_is_keyed_by_what_built_it(mni_manifest: Path, tmp_path: Path) -> None:
    config = get_model_config("prima-lite")
    cached_patch_set(mni_manifest, ["train"], tmp_path, config)
    coarser = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, in_plane_size=128))
    small = cached_patch_set(mni_manifest, ["train"], tmp_path, coarser)  # another preprocessing: not the cache
    assert len(list(tmp_path.glob("patches-*.npz"))) == 2
    manifest_copy = tmp_path / "m" / "manifest.jsonl"
    manifest_copy.parent.mkdir()
    lines = mni_manifest.read_text().replace('"report": ""', '"report": "edited"')
    manifest_copy.write_text(lines.replace('"path": "', f'"path": "{mni_manifest.parent}/'))
    cached_patch_set(manifest_copy, ["train"], tmp_path, coarser)  # another manifest: not the cache either
    assert len(list(tmp_path.glob("patches-*.npz"))) == 3
    assert len(small) < len(cached_patch_set(mni_manifest, ["train"], tmp_path, config))


def test_lesion_patches_follow_the_manifest_masks_and_survive_a_save(tiny_dataset: Path, tmp_path: Path) -> None:
    from prima.manifest import load_entry_study
    from prima.tokens import series_patches
    from training.lesion_masks import lesion_mask_on_grid
    from training.metrics import token_overlap

    config = get_model_config("prima-lite")
    entries = read_manifest(tiny_dataset)
    with_lesion = next(e for e in entries if e.lesion_masks)
    without = next(e for e in entries if e.lesion_masks == {})
    patch_set = extract_patch_set([with_lesion, without], config, progress=False, lesions=True)
    assert patch_set.lesions.shape == patch_set.patches.shape and patch_set.lesions_known.all()
    per_patch = patch_set.lesions.reshape(len(patch_set), -1).mean(axis=1)
    series_count = len(load_entry_study(with_lesion).series)
    assert not per_patch[patch_set.series_index >= series_count].any()  # the study without a lesion
    # the first lesion series: its patches' lesion share is the mask's overlap with each kept token
    name = next(iter(with_lesion.lesion_masks))
    row = patch_set.series_names.index(name)
    series = next(s for s in load_entry_study(with_lesion).series if s.name == name)
    grid = series_patches(series, config)
    mask = lesion_mask_on_grid(with_lesion, name, None, grid, config.preprocess)
    rows = patch_set.series_index == row
    expected = token_overlap(patch_set.coords[rows], mask, config.volume_tokenizer.patch_size, grid.through_axis)
    assert expected.any() and np.allclose(per_patch[rows], expected)
    patch_set.save(tmp_path / "set.npz")
    loaded = PatchSet.load(tmp_path / "set.npz")
    assert np.array_equal(loaded.lesions, patch_set.lesions)
    assert np.array_equal(loaded.lesions_known, patch_set.lesions_known)
    assert extract_patch_set([without], config, progress=False).lesions is None  # only when asked for
