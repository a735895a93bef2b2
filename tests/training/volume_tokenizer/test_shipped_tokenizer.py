"""The lite tokenizer shipped in assets/tokenizer-lite: it loads, matches the prima-lite config, and
reconstructs real-anatomy patches it never saw (the undeformed MNI152 template) well."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template

from prima.factory import get_model_config
from prima.patching import select_tokens
from training.tokenizer.data import load_preprocessed, series_patches
from training.tokenizer.evaluate import reconstruct, reconstruction_metrics
from training.tokenizer.train import load_tokenizer

SHIPPED = Path(__file__).resolve().parents[3] / "assets" / "tokenizer-lite"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED)


def test_shipped_tokenizer_is_the_prima_lite_tokenizer(tokenizer):
    lite = get_model_config("prima-lite").tokenizer
    assert (tokenizer.config.channels, tokenizer.config.res_layers, tokenizer.config.codebook_size) == (
        lite.channels, lite.res_layers, lite.codebook_size)


def test_shipped_evaluation_meets_the_release_bar():
    result = json.loads((SHIPPED / "eval.json").read_text())
    assert result["overall"]["psnr_db"] >= 28.0
    assert result["codebook"]["used"] >= 0.25 * result["codebook"]["size"]


def test_template_patches_reconstruct_above_26_db(tokenizer, tmp_path):
    template = load_mni152_template(resolution=1)
    path = tmp_path / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine), path)
    series = load_preprocessed(path, "AX T1")
    patches, _, fractions = series_patches(series, tokenizer.config)
    kept = select_tokens(fractions, tokenizer.config.min_foreground_fraction, tokenizer.config.min_tokens)
    recons, codes = reconstruct(tokenizer, patches[kept])
    metrics = reconstruction_metrics(patches[kept], recons)
    assert metrics["psnr_db"] > 26.0, metrics
    assert len(np.unique(codes)) > 1000  # a real codebook, not a few codes
