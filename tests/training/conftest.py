"""A one-subject deformed-MNI study on disk (NIfTI + manifest), built once per session (~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.volume_tokenizer.mni_manifest import build_mni_manifest

_SHIPPED_VOLUME_TOKENIZER = (Path(__file__).resolve().parents[2] / "assets" / "volume-tokenizer-lite"
                             / "volume_tokenizer.safetensors")


@pytest.fixture(scope="session")
def mni_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mni_manifest(tmp_path_factory.mktemp("mni"), subjects=1, seed=0, series_per_subject=2)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen small synthetic studies (NIfTI, coarse phantom, <= 3 series) across train/val/test: the
    manifest path. Built once per session for the training-stage tests."""
    from training.synth.writers import write_dataset

    return write_dataset(12, tmp_path_factory.mktemp("tiny_synth"), seed=3, workers=1, spacing=6.0, max_series=3,
                         progress=False)


@pytest.fixture(scope="session")
def tiny_token_cache(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The token cache of ``tiny_dataset`` (every split) with the shipped lite volume tokenizer: its folder."""
    from training.token_cache import TokenCacheConfig, build_token_cache

    config = TokenCacheConfig(manifest=str(tiny_dataset), out=str(tmp_path_factory.mktemp("tiny_cache")),
                              volume_tokenizer=str(_SHIPPED_VOLUME_TOKENIZER),
                              splits=("train", "val", "test"), min_fraction=0.02, device="cpu", precision="fp32")
    return build_token_cache(config, progress=False)


@pytest.fixture(scope="session")
def tiny_head_token_cache(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The token cache of ``tiny_dataset`` on the head grid (``prima-lite-head``), every split: its folder."""
    from training.token_cache import TokenCacheConfig, build_token_cache

    config = TokenCacheConfig(manifest=str(tiny_dataset), out=str(tmp_path_factory.mktemp("tiny_head_cache")),
                              model="prima-lite-head", volume_tokenizer=str(_SHIPPED_VOLUME_TOKENIZER),
                              splits=("train", "val", "test"), min_fraction=0.02, device="cpu", precision="fp32")
    return build_token_cache(config, progress=False)
