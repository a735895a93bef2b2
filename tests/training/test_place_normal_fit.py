"""training.place_normal: the normal training studies' tokens at each place of the head grid, by series kind."""

from __future__ import annotations

import json

import pytest
import torch

from prima.config import PLANES
from prima.factory import get_model_config
from prima.models.place_normal import PLACE_STRIDE
from prima.release import load_place_normal
from training.place_normal import PlaceNormalFitConfig, fit
from training.study_data import token_studies
from training.token_cache import TokenCache


def test_fit_models_the_normal_training_tokens_at_their_places(tiny_dataset, tiny_head_token_cache, tmp_path):
    config = PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                  out=str(tmp_path), kinds=2, min_count=2)
    path = fit(config)
    model = load_place_normal(path)
    summary = json.loads((tmp_path / "place_normal.json").read_text())
    assert summary["places"] == len(model.keys) > 0 and sum(summary["series_per_kind"]) == summary["train_series"]
    assert torch.all(model.keys[1:] > model.keys[:-1]) and model.kinds == 2

    # every modelled place is the mean of the normal training tokens found there, in their kind and plane
    studies = token_studies(str(tiny_dataset), TokenCache(tiny_head_token_cache), ["train"])
    tokenizer = get_model_config("prima-lite-head").volume_tokenizer
    sums: dict[int, list] = {}
    for study in studies:
        for series in study.tokens().series:
            kept = series.refilter(tokenizer.min_foreground_fraction, tokenizer.min_tokens)
            kind = int(model.kind_of(kept.latents.mean(0, keepdim=True))[0])
            if study.abnormal:
                continue
            for index, latent in zip(series.patch_indices, series.latents):
                key = (kind * len(PLANES) + PLANES.index(series.plane)) * PLACE_STRIDE + int(index)
                sums.setdefault(key, []).append(latent)
    expected = {key: torch.stack(values).mean(0) for key, values in sums.items() if len(values) >= 2}
    assert set(expected) == set(model.keys.tolist())
    mean, _ = model.normal_of(torch.arange(len(model.keys)))
    for row, key in enumerate(model.keys.tolist()):  # stored at 8 bits: within half a step
        assert torch.all((mean[row] - expected[key]).abs() <= model.mean_step / 2 + 1e-4)

    # a finished fit of the same config is kept; another config refits
    stamp = path.stat().st_mtime_ns
    assert fit(config) == path and path.stat().st_mtime_ns == stamp


def test_fit_refuses_what_it_cannot_model(tiny_dataset, tiny_head_token_cache, tiny_token_cache, tmp_path):
    with pytest.raises(ValueError, match="head grid"):
        fit(PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_token_cache), out=str(tmp_path)))
    with pytest.raises(ValueError, match="head grid"):
        fit(PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                 out=str(tmp_path), model="prima-lite"))
    with pytest.raises(ValueError, match="no place holds"):
        fit(PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                 out=str(tmp_path), kinds=1, min_count=10_000))
    with pytest.raises(ValueError, match="kinds"):
        fit(PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                 out=str(tmp_path), kinds=10_000))
