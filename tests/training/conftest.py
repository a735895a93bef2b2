"""A one-subject deformed-MNI study on disk (NIfTI + manifest), built once per session (~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.volume_tokenizer.mni_manifest import build_mni_manifest


@pytest.fixture(scope="session")
def mni_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mni_manifest(tmp_path_factory.mktemp("mni"), subjects=1, seed=0, series_per_subject=2)
