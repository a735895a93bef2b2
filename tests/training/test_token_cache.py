"""training.token_cache: the training side gets bit-identical features to the inference side, from a
cache keyed by what built it, sharded across torchrun processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.config import VolumeTokenizerConfig
from prima.factory import create_model, create_volume_tokenizer, get_model_config
from prima.manifest import load_entry_study, read_manifest
from prima.models.text import train_report_tokenizer
from prima.release import load_release, load_volume_tokenizer, save_release, save_volume_tokenizer
from prima.tokens import tokenize_study
from training.token_cache import INDEX_FILE, TokenCache, TokenCacheConfig, build_token_cache
from training.volume_tokenizer.mni_manifest import build_mni_manifest
from helpers.torchrun import run_torchrun

SMALL = VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=64)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    volume_tokenizer = create_volume_tokenizer(SMALL)
    volume_tokenizer.train()
    volume_tokenizer(torch.rand(64, 32, 32, 4))  # initialise the codebook on data, so codes vary
    return save_volume_tokenizer(volume_tokenizer.eval(), tmp_path_factory.mktemp("vt") / "vt.safetensors")


def _config(manifest: Path, out: Path, weights: Path) -> TokenCacheConfig:
    return TokenCacheConfig(manifest=str(manifest), out=str(out), volume_tokenizer=str(weights), splits=("train",),
                            device="cpu")


def test_cached_features_equal_the_inference_path_bit_for_bit(mni_manifest, weights, tmp_path):
    folder = build_token_cache(_config(mni_manifest, tmp_path / "cache", weights), progress=False)
    cache = TokenCache(folder)
    # The inference side: a release holding the same volume tokenizer, as predict loads it.
    config = dataclasses.replace(get_model_config("prima-lite"), volume_tokenizer=SMALL)
    save_release(tmp_path / "release", create_model(config), volume_tokenizer=load_volume_tokenizer(weights),
                 report_tokenizer=train_report_tokenizer(["No acute abnormality."] * 4, 280))
    release = load_release(tmp_path / "release")
    (entry,) = read_manifest(mni_manifest, ["train"])
    expected = tokenize_study(load_entry_study(entry), release)
    cached = cache.study_tokens(entry.study_id, entry.study_description)
    assert cache.study_ids == [entry.study_id] and cache.skipped == []
    assert [s.name for s in cached.series] == [s.name for s in expected.series] == [s.name for s in entry.series]
    for got, want in zip(cached.series, expected.series):
        assert torch.equal(got.features, want.features)  # bit-identical, not just close
        assert np.array_equal(got.codes, want.codes) and np.array_equal(got.fractions, want.fractions)
        assert np.array_equal(got.patch_indices, want.patch_indices) and got.shape == want.shape
        assert (got.plane, got.through_axis) == (want.plane, want.through_axis)
        np.testing.assert_array_equal(got.affine, want.affine)
    with pytest.raises(KeyError, match="not in the token cache"):
        cache.study_tokens("nobody")


def test_cache_is_reused_only_for_the_same_inputs(mni_manifest, weights, tmp_path):
    config = _config(mni_manifest, tmp_path / "cache", weights)
    first = build_token_cache(config, progress=False)
    stamp = (first / INDEX_FILE).stat().st_mtime_ns
    assert build_token_cache(config, progress=False) == first and (first / INDEX_FILE).stat().st_mtime_ns == stamp
    lower = build_token_cache(dataclasses.replace(config, min_fraction=0.01), progress=False)
    assert lower != first
    edited = tmp_path / "edited" / "manifest.jsonl"
    edited.parent.mkdir()
    text = mni_manifest.read_text().replace('"path": "', f'"path": "{mni_manifest.parent}/')
    edited.write_text(text.replace('"report": ""', '"report": "edited"'))
    assert build_token_cache(dataclasses.replace(config, manifest=str(edited)), progress=False) not in (first, lower)


def test_two_torchrun_processes_write_the_same_tokens(tmp_path, weights):
    manifest = build_mni_manifest(tmp_path / "mni", subjects=2, seed=3, series_per_subject=1)
    args = ["--manifest", str(manifest), "--volume-tokenizer", str(weights), "--device", "cpu", "--threads", "1",
            "--splits", "train", "val", "test"]
    done = run_torchrun(["-m", "training.token_cache", *args, "--out", str(tmp_path / "two")], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single = build_token_cache(TokenCacheConfig(manifest=str(manifest), out=str(tmp_path / "one"),
                                                volume_tokenizer=str(weights), device="cpu",
                                                splits=("train", "val", "test")), progress=False)
    (two_folder,) = (tmp_path / "two").iterdir()
    two, one = TokenCache(two_folder), TokenCache(single)
    assert len(two.index["shards"]) == 2 and two.study_ids == one.study_ids and len(one.study_ids) == 2
    for study_id in one.study_ids:
        for a, b in zip(two.study_tokens(study_id).series, one.study_tokens(study_id).series):
            assert torch.equal(a.features, b.features)


def test_an_unreadable_study_is_skipped_with_its_reason_for_any_worker_count(weights, tmp_path):
    manifest = build_mni_manifest(tmp_path / "mni", subjects=2, seed=4, series_per_subject=1)
    entries = read_manifest(manifest)
    broken = entries[1].series[0].path
    broken.write_bytes(b"not a NIfTI file")
    shards = {}
    for workers in (0, 1):
        config = dataclasses.replace(_config(manifest, tmp_path / f"cache{workers}", weights),
                                     splits=tuple(sorted({e.split for e in entries})), workers=workers)
        cache = TokenCache(build_token_cache(config, progress=False))
        assert cache.study_ids == [entries[0].study_id]
        assert [s["study_id"] for s in cache.skipped] == [entries[1].study_id] and cache.skipped[0]["reason"]
        shards[workers] = {p.name: p.read_bytes() for p in sorted(cache.folder.glob("shard-*/*"))}
    assert shards[0] == shards[1]  # the workers do not change a byte
    with pytest.raises(ValueError, match="workers"):
        build_token_cache(dataclasses.replace(config, workers=-1, out=str(tmp_path / "bad")), progress=False)
