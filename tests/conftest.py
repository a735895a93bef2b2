"""Shared I/O fixtures: the MNI152 template and a generated 3-plane DICOM study (built once per session)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from helpers.studies import ThreePlaneStudy, write_three_plane_study


@pytest.fixture(scope="session")
def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm ICBM152 template bundled with nilearn: (array (197, 233, 189) float32, RAS affine)."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=1)
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


@pytest.fixture(scope="session")
def three_plane_study(tmp_path_factory: pytest.TempPathFactory, mni_template) -> ThreePlaneStudy:
    """Axial, sagittal and coronal 1x1x4 mm series of the template + localizer + RT plan, shuffled and nested."""
    template, affine = mni_template
    return write_three_plane_study(tmp_path_factory.mktemp("three_plane"), template, affine)


@pytest.fixture
def guarded_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private temp area for code under test plus a canary file outside it.

    Yields (temp area, canary). After the test: the temp area must be empty again (temporary
    folders removed) and the canary unchanged; tests add their own checks for escape targets.
    """
    area = tmp_path / "tmp_area"
    area.mkdir()
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("untouched")
    monkeypatch.setattr(tempfile, "tempdir", str(area))
    outside_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    yield area, canary
    assert list(area.iterdir()) == [], "temporary files were left behind"
    assert canary.read_text() == "untouched"
    outside_after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if area not in p.parents)
    created = set(outside_after) - set(outside_before)
    # Only files the test itself placed under its inputs folder may appear.
    assert all(p.parts[0] == "inputs" for p in created), f"files written outside the temp area: {created}"


@pytest.fixture(scope="session")
def random_release_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prima-lite release with random weights and the shipped volume tokenizer (built once)."""
    from helpers.releases import write_random_release

    return write_random_release(tmp_path_factory.mktemp("random_release"))


@pytest.fixture(scope="session")
def random_release(random_release_path: Path):
    from prima.release import load_release

    return load_release(random_release_path)


@pytest.fixture(scope="session")
def pooling_release(tmp_path_factory: pytest.TempPathFactory):
    """A prima-lite-head release with random weights: tokens read against a place-normal model, diagnoses pooled
    from token scores."""
    from helpers.releases import write_random_release

    from prima.release import load_release

    return load_release(write_random_release(tmp_path_factory.mktemp("pooling_release"), model="prima-lite-head"))
