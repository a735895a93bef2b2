"""The lite volume tokenizer shipped in assets/volume-tokenizer-lite: ``prima`` loads it (no ``training``
import needed), it matches the prima-lite config, its recorded evaluation belongs to these weights, and
it reconstructs real-anatomy patches it never saw (the undeformed MNI152 template) well."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template

from prima.factory import get_model_config
from prima.io import load_study
from prima.release import VOLUME_TOKENIZER_FILE, load_volume_tokenizer, volume_tokenizer_provenance
from prima.tokens import filter_patches, series_patches
from training.runtime import file_digest
from training.volume_tokenizer.evaluate import SAMPLES_FILE, patch_psnrs, reconstruct, reconstruction_metrics

SHIPPED = Path(__file__).resolve().parents[3] / "assets" / "volume-tokenizer-lite"


@pytest.fixture(scope="module")
def volume_tokenizer():
    return load_volume_tokenizer(SHIPPED / VOLUME_TOKENIZER_FILE)


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((SHIPPED / "eval.json").read_text())


def test_shipped_tokenizer_is_the_prima_lite_tokenizer(volume_tokenizer):
    assert volume_tokenizer.config == get_model_config("prima-lite").volume_tokenizer


def test_shipped_evaluation_meets_the_release_bar(evaluation):
    assert evaluation["overall"]["psnr_db"] >= 28.0
    assert evaluation["codebook"]["used"] >= 0.25 * evaluation["codebook"]["size"]


def test_shipped_evaluation_records_its_provenance(evaluation):
    provenance = evaluation["provenance"]
    assert provenance["weights_sha256"] == file_digest(SHIPPED / VOLUME_TOKENIZER_FILE)
    assert provenance["training"] == volume_tokenizer_provenance(SHIPPED / VOLUME_TOKENIZER_FILE)
    assert provenance["training"]["steps"] > 0 and provenance["training"]["commit"]
    assert len(provenance["evaluation"]["manifest_sha256"]) == 64 and provenance["evaluation"]["commit"]


def test_shipped_evaluation_samples_reproduce_with_these_weights(volume_tokenizer, evaluation):
    with np.load(SHIPPED / SAMPLES_FILE) as samples:
        patches, codes = samples["patches"], samples["codes"]
    recons, again = reconstruct(volume_tokenizer, patches)
    assert np.array_equal(again, codes)
    np.testing.assert_allclose(patch_psnrs(patches, recons), evaluation["samples"]["psnr_db"], atol=1e-3)


def test_template_patches_reconstruct_above_26_db(volume_tokenizer, tmp_path):
    template = load_mni152_template(resolution=1)
    path = tmp_path / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine), path)
    config = get_model_config("prima-lite")
    kept = filter_patches(series_patches(load_study(path).series[0], config), config).patches
    recons, codes = reconstruct(volume_tokenizer, kept)
    metrics = reconstruction_metrics(kept, recons)
    assert metrics["psnr_db"] > 26.0, metrics
    assert len(np.unique(codes)) > 1000  # a real codebook, not a few codes
