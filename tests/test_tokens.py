"""prima.tokens: the one path from a loaded series to token features (preprocess, patch, filter, encode)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from prima.config import VolumeTokenizerConfig
from prima.factory import create_model, create_volume_tokenizer, get_model_config
from prima.io import Series, load_study
from prima.models.features import token_features
from prima.models.text import train_report_tokenizer
from prima.patching import foreground_fractions, patchify, select_tokens
from prima.preprocess import grid_anchor, preprocess_series
from prima.release import load_release, save_release
from prima.tokens import series_patches, tokenize_series, tokenize_study

SMALL = VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=64)


@pytest.fixture(scope="module")
def config():
    lite = get_model_config("prima-lite")
    return dataclasses.replace(lite, volume_tokenizer=SMALL)


@pytest.fixture(scope="module")
def volume_tokenizer():
    torch.manual_seed(0)
    model = create_volume_tokenizer(SMALL)
    model.train()
    model(torch.rand(64, 32, 32, 4))  # initialise the codebook on data, so codes vary
    return model.eval()


@pytest.fixture(scope="module")
def series(three_plane_study) -> Series:
    study = load_study(three_plane_study.folder)
    return next(s for s in study.series if s.plane == "coronal")


def test_only_kept_patches_are_encoded_with_the_config_preprocessing(series, volume_tokenizer, config, monkeypatch):
    encoded = []
    original = volume_tokenizer.codes
    monkeypatch.setattr(volume_tokenizer, "codes", lambda patches: encoded.append(len(patches)) or original(patches))
    tokens = tokenize_series(series, volume_tokenizer, config, batch_size=50, precision="fp32")

    ready = preprocess_series(series, config.preprocess)  # the config's section, not the defaults
    patches, coords = patchify(ready.array, ready.through_axis)
    fractions = foreground_fractions(ready.array, ready.through_axis)
    kept = select_tokens(fractions, config.volume_tokenizer.min_foreground_fraction, config.volume_tokenizer.min_tokens)
    assert sum(encoded) == len(kept) < len(patches) and max(encoded) <= 50  # kept patches only, in batches
    assert np.array_equal(tokens.patch_indices, kept) and np.array_equal(tokens.coords, coords[kept])
    assert np.array_equal(tokens.fractions, fractions) and tokens.shape == ready.shape
    assert (tokens.name, tokens.plane, tokens.through_axis) == (series.name, "coronal", ready.through_axis)
    np.testing.assert_array_equal(tokens.affine, ready.affine)
    with torch.no_grad():
        expected = volume_tokenizer.encode(torch.from_numpy(patches[kept]))
    assert torch.equal(tokens.latents, expected)
    assert torch.equal(tokens.features, token_features(expected, torch.from_numpy(coords[kept]), "coronal"))
    assert tokens.features.shape == (len(kept), 289) and tokens.codes.dtype == np.int16


def test_preprocessing_comes_from_the_model_config(series, volume_tokenizer, config):
    coarse = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, in_plane_size=128))
    shape = series_patches(series, coarse).shape
    assert sorted(shape)[1:] == [128, 128]  # the two in-plane axes, whatever the plane
    assert tokenize_series(series, volume_tokenizer, coarse).shape == shape


def test_refilter_and_subset(series, volume_tokenizer, config):
    low = tokenize_series(series, volume_tokenizer, config, min_fraction=0.01)
    default = tokenize_series(series, volume_tokenizer, config)
    again = low.refilter(config.volume_tokenizer.min_foreground_fraction, config.volume_tokenizer.min_tokens)
    assert len(low) > len(default)
    assert np.array_equal(again.patch_indices, default.patch_indices)
    assert torch.equal(again.features, default.features)
    part = default.subset([4, 0, 2])
    assert np.array_equal(part.patch_indices, default.patch_indices[[0, 2, 4]])
    assert torch.equal(part.latents, default.latents[[0, 2, 4]])
    with pytest.raises(ValueError, match="token indices"):
        default.subset([len(default)])


def test_mismatched_volume_tokenizer_is_refused(series, volume_tokenizer):
    with pytest.raises(ValueError, match="another config"):
        tokenize_series(series, volume_tokenizer, get_model_config("prima-lite"))


def test_tokenize_study_uses_the_release(three_plane_study, volume_tokenizer, config, tmp_path):
    study = load_study(three_plane_study.folder)
    model, report_tokenizer = create_model(config), train_report_tokenizer(["No acute abnormality."] * 4, 280)
    save_release(tmp_path / "bare", model, report_tokenizer=report_tokenizer)
    with pytest.raises(ValueError, match="ships no volume tokenizer"):
        tokenize_study(study, load_release(tmp_path / "bare"))
    save_release(tmp_path / "full", model, report_tokenizer=report_tokenizer, volume_tokenizer=volume_tokenizer)
    tokens = tokenize_study(study, load_release(tmp_path / "full"))
    assert [t.name for t in tokens.series] == [s.name for s in study.series]
    assert tokens.description == study.description
    first = tokenize_series(study.series[0], volume_tokenizer, config)
    assert torch.equal(tokens.series[0].features, first.features)


def test_tokenize_study_on_the_head_grid_anchors_every_series_on_the_study(three_plane_study, volume_tokenizer,
                                                                           config, tmp_path):
    head = dataclasses.replace(config, name="prima-lite-head",
                               preprocess=dataclasses.replace(config.preprocess, grid="head"))
    study = load_study(three_plane_study.folder)
    save_release(tmp_path / "head", create_model(head), report_tokenizer=train_report_tokenizer(["Normal."] * 4, 280),
                 volume_tokenizer=volume_tokenizer)
    tokens = tokenize_study(study, load_release(tmp_path / "head"))
    # in-plane 256 voxels of 0.9375 mm, 48 slices of 4 mm: 8 x 8 x 12 patches in every plane
    assert all(sorted(s.grid_shape) == [8, 8, 12] for s in tokens.series)
    centre = grid_anchor(study.series, head.preprocess)
    for series, tokenized in zip(study.series, tokens.series):
        assert np.allclose(tokenized.affine[:3, :3] @ ((np.array(tokenized.shape) - 1) / 2) + tokenized.affine[:3, 3],
                           centre)
    with pytest.raises(ValueError, match="head centre"):
        series_patches(study.series[0], head)
