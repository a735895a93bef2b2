"""training.volume_tokenizer.evaluate: metrics, orientation consistency and the figure on a held-out series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.config import VolumeTokenizerConfig
from prima.factory import create_volume_tokenizer, get_model_config
from prima.manifest import manifest_digest, read_manifest
from prima.release import save_volume_tokenizer
from training.volume_tokenizer.data import extract_patch_set
from training.volume_tokenizer.evaluate import (
    SAMPLES_FILE,
    evaluate,
    lesion_contrast,
    main,
    psnr,
    reconstruct,
    reconstruction_metrics,
    summary_line,
)


def test_psnr_and_l1_of_a_known_error() -> None:
    originals = np.zeros((4, 32, 32, 4), dtype=np.float16)
    metrics = reconstruction_metrics(originals, np.full((4, 32, 32, 4), 0.1, dtype=np.float32))
    assert metrics["patches"] == 4
    assert metrics["l1"] == pytest.approx(0.1, rel=1e-6)
    assert metrics["psnr_db"] == pytest.approx(20.0, abs=1e-4)  # MSE 0.01, peak 1
    assert metrics["mean_patch_psnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert psnr(1e-3) == pytest.approx(30.0)


def test_lesion_contrast_of_known_reconstructions() -> None:
    lesions = np.zeros((3, 32, 32, 4), dtype=bool)
    lesions[:, :8] = True  # a quarter of each patch
    lesions[2] = False
    lesions[2, 0, 0, :2] = True  # 2 voxels: too few to measure
    originals = np.where(lesions, 0.8, 0.2).astype(np.float16)
    halved = lesion_contrast(originals, 0.5 * originals + 0.25, lesions)
    assert halved["patches"] == 2 and halved["original_abs_median"] == pytest.approx(0.6, abs=1e-3)
    assert halved["kept_median"] == pytest.approx(0.5, abs=1e-3) and halved["sign_kept"] == 1.0
    inverted = lesion_contrast(originals, 1.0 - originals, lesions)
    assert inverted["kept_mean"] == pytest.approx(-1.0, abs=1e-3) and inverted["sign_kept"] == 0.0
    flat = np.full_like(originals, 0.5)
    assert lesion_contrast(flat, flat, lesions) == {"patches": 0}  # no contrast to keep


def test_evaluation_reports_lesion_fidelity_where_the_manifest_has_masks(tiny_dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_volume_tokenizer(VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=64)).eval()
    entries = [e for e in read_manifest(tiny_dataset) if e.lesion_masks is not None][:4]
    patch_set = extract_patch_set(entries, get_model_config("prima-lite"), progress=False, lesions=True)
    lesions = evaluate(model, patch_set, tmp_path, consistency_patches=16)["lesions"]
    touching = patch_set.lesions.reshape(len(patch_set), -1).any(axis=1).sum()
    assert lesions["touching_lesion"]["patches"] == touching > 0
    assert lesions["touching_lesion"]["patches"] + lesions["no_lesion"]["patches"] == len(patch_set)
    assert 0 < lesions["contrast"]["patches"] <= touching
    without_masks = evaluate(model, extract_patch_set(entries, get_model_config("prima-lite"), progress=False),
                             tmp_path / "plain", consistency_patches=16)
    assert "lesions" not in without_masks


def test_evaluate_writes_metrics_and_figure(mni_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_volume_tokenizer(VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=128))
    patch_set = extract_patch_set(read_manifest(mni_manifest), get_model_config("prima-lite"), progress=False)
    model.train()
    model(torch.from_numpy(patch_set.patches[:64].astype(np.float32)))  # initialise the codebook on data
    model.eval()
    result = evaluate(model, patch_set, tmp_path, consistency_patches=32)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["overall"] == result["overall"] and result["overall"]["patches"] == len(patch_set)
    assert set(result["by_sequence"]) == {"T1", "T2"}  # "AX T1"/"COR T2"-style names of the two series
    assert sum(m["patches"] for m in result["by_plane"].values()) == len(patch_set)
    assert 0 < result["codebook"]["used"] <= 128 and 1 <= result["codebook"]["perplexity"] <= 128
    ratios = result["orientation_consistency"]["ratio_by_permutation"]
    assert len(ratios) == 5 and all(np.isfinite(r) and r >= 0 for r in ratios.values())
    assert (tmp_path / "reconstructions.png").stat().st_size > 10_000
    assert summary_line(result).startswith("Volume tokenizer: foreground PSNR ")
    assert summary_line(result).endswith("/128")


def test_evaluation_records_provenance_and_samples_that_reproduce_it(mni_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_volume_tokenizer(VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=64))
    patch_set = extract_patch_set(read_manifest(mni_manifest), get_model_config("prima-lite"), progress=False)
    model.train()
    model(torch.from_numpy(patch_set.patches[:64].astype(np.float32)))
    weights = save_volume_tokenizer(model.eval(), tmp_path / "vt.safetensors", provenance={"steps": 7, "seed": 3})
    main(["--volume-tokenizer", str(weights), "--manifest", str(mni_manifest), "--out", str(tmp_path / "eval"),
          "--splits", "train", "--seed", "5"])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    provenance = result["provenance"]
    assert provenance["training"] == {"steps": 7, "seed": 3}
    assert provenance["evaluation"]["manifest_sha256"] == manifest_digest(mni_manifest)
    assert provenance["evaluation"]["seed"] == 5 and provenance["evaluation"]["splits"] == ["train"]
    assert provenance["evaluation"]["commit"]  # the evaluating code's git commit
    with np.load(tmp_path / "eval" / SAMPLES_FILE) as samples:
        recons, codes = reconstruct(model, samples["patches"])
        assert np.array_equal(codes, samples["codes"])
        recorded = result["samples"]["psnr_db"]
        again = [reconstruction_metrics(p[None], r[None])["psnr_db"] for p, r in zip(samples["patches"], recons)]
    assert len(recorded) == 16 and np.allclose(again, recorded, atol=1e-4)
