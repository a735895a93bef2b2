"""Evaluate a trained volume tokenizer on held-out series of a manifest.

    python -m training.volume_tokenizer.evaluate --volume-tokenizer runs/vt/volume_tokenizer.safetensors \
        --manifest data/synth/manifest.jsonl --out runs/vt/eval

Reports, over foreground patches (the deterministic filter at the config's minimum fraction):
L1 and PSNR overall, per sequence type and per plane; codebook utilisation; orientation
consistency; where the manifest has lesion masks, the same metrics for the patches that touch a
lesion and for the others, and the share of each lesion's contrast the reconstruction keeps; and
writes ``reconstructions.png`` (original / reconstruction / difference).
``eval.json`` records its provenance (the evaluating commit, the manifest's SHA-256, splits, seed,
the weights' SHA-256 and the training provenance stored in the weights file) and a few evaluated
patches are saved beside it (``eval_samples.npz``) with their codes and PSNR, so anyone can check that
the figures belong to these weights.

PSNR: intensities are in [0, 1] (peak 1) and reconstructions are clipped to [0, 1];
``psnr_db`` = 10 log10(1 / MSE) with the MSE pooled over every voxel of the patches considered, and
``mean_patch_psnr_db`` the mean of per-patch PSNRs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from prima.config import PrimaConfig, config_from_dict
from prima.factory import create_volume_tokenizer, get_model_config
from prima.manifest import manifest_digest, read_manifest
from prima.models.vqvae import VQVAE
from prima.release import load_volume_tokenizer, volume_tokenizer_provenance
from training.runtime import file_digest, git_commit
from training.volume_tokenizer.augment import AXIS_PERMUTATIONS, orient_patches
from training.volume_tokenizer.data import PatchSet, extract_patch_set, sequence_type
from training.volume_tokenizer.train import VolumeTokenizerTrainConfig, model_config

SAMPLES_FILE = "eval_samples.npz"
SAMPLE_PATCHES = 16  # evaluated patches saved beside eval.json so its figures can be re-checked


def load_for_evaluation(path: Path, device: str = "cpu") -> tuple[VQVAE, PrimaConfig | None, dict | None]:
    """(volume tokenizer, model config it was trained for or None, training provenance or None) from a
    ``volume_tokenizer.safetensors`` or a training checkpoint ``last.pt``."""
    if path.suffix == ".safetensors":
        return load_volume_tokenizer(path, device), None, volume_tokenizer_provenance(path)
    state = torch.load(path, map_location=device, weights_only=False)
    run_config = config_from_dict(VolumeTokenizerTrainConfig, state["config"], str(path))
    settings = model_config(run_config)
    model = create_volume_tokenizer(settings)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), settings, {"checkpoint": str(path), "steps": state["step"],
                                               "config": state["config"]}


@torch.no_grad()
def reconstruct(model: VQVAE, patches: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions clipped to [0, 1], codes (N, 8, 8, 2)) of canonical patches."""
    device = next(model.parameters()).device
    recons, codes = [], []
    for start in range(0, len(patches), batch_size):
        batch = torch.from_numpy(patches[start : start + batch_size].astype(np.float32)).to(device)
        batch_codes = model.codes(batch)
        recons.append(model.decode_latent(model.quantizer.lookup(batch_codes)).clamp(0, 1).cpu().numpy())
        codes.append(batch_codes.cpu().numpy())
    return np.concatenate(recons), np.concatenate(codes)


def psnr(mse: float) -> float:
    """PSNR in dB for intensities with peak 1."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def patch_psnrs(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Per-patch PSNR (dB) of aligned (N, ...) arrays."""
    errors = (recons - originals.astype(np.float32)).reshape(len(originals), -1)
    return 10 * np.log10(1.0 / np.maximum((errors**2).mean(axis=1), 1e-12))


def reconstruction_metrics(originals: np.ndarray, recons: np.ndarray) -> dict:
    """L1, pooled PSNR and mean per-patch PSNR of aligned (N, ...) arrays."""
    errors = (recons - originals.astype(np.float32)).reshape(len(originals), -1)
    return {
        "patches": int(len(originals)),
        "l1": float(np.abs(errors).mean()),
        "psnr_db": psnr(float((errors**2).mean())),
        "mean_patch_psnr_db": float(np.mean(patch_psnrs(originals, recons))),
    }


def lesion_contrast(originals: np.ndarray, recons: np.ndarray, lesions: np.ndarray, min_voxels: int = 20,
                    min_contrast: float = 0.03) -> dict:
    """How much of a lesion's contrast the reconstruction keeps, over patches that hold both lesion and
    other voxels.

    A patch's contrast is the mean intensity of its lesion voxels minus that of its other voxels; its
    kept fraction is the reconstruction's contrast over the same voxels divided by the original's (1 =
    kept, 0 = the lesion is blurred into its surroundings, negative = inverted). Patches with fewer than
    ``min_voxels`` voxels on either side, or an original contrast below ``min_contrast`` in absolute value,
    are left out (their ratio is noise).

    Args:
        originals, recons: aligned (N, ...) patches and reconstructions.
        lesions: (N, ...) bool lesion voxels of the same patches.
    """
    originals = originals.reshape(len(originals), -1).astype(np.float32)
    recons = recons.reshape(len(recons), -1).astype(np.float32)
    lesions = lesions.reshape(len(lesions), -1)
    inside, outside = lesions.sum(axis=1), (~lesions).sum(axis=1)
    usable = (inside >= min_voxels) & (outside >= min_voxels)

    def contrast(values: np.ndarray) -> np.ndarray:
        lesion_mean = (values * lesions).sum(axis=1)[usable] / inside[usable]
        other_mean = (values * ~lesions).sum(axis=1)[usable] / outside[usable]
        return lesion_mean - other_mean

    original, reconstructed = contrast(originals), contrast(recons)
    measured = np.abs(original) >= min_contrast
    kept = reconstructed[measured] / original[measured]
    if not kept.size:
        return {"patches": 0}
    return {"patches": int(kept.size), "original_abs_median": float(np.median(np.abs(original[measured]))),
            "kept_median": float(np.median(kept)), "kept_mean": float(np.mean(kept)),
            "sign_kept": float(np.mean(kept > 0))}


@torch.no_grad()
def orientation_consistency(model: VQVAE, patches: np.ndarray, seed: int = 0) -> dict:
    """Distance between a patch's token and the tokens of its axis permutations, relative to unrelated patches.

    For each non-identity permutation: mean L2 distance between the quantised latent of the
    canonical patch and that of the permuted patch (its latent grid permuted back), divided by the
    mean distance between the tokens of two different patches. 0 = invariant; ~1 = no better than chance.
    """
    device = next(model.parameters()).device
    x = torch.from_numpy(patches.astype(np.float32)).to(device)
    reference = model.quantized_latent(x).flatten(1)
    shuffled = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    unrelated = (reference - reference[shuffled]).norm(dim=1)
    unrelated = unrelated[shuffled != torch.arange(len(x))].mean()
    ratios = {}
    for permutation in AXIS_PERMUTATIONS[1:]:
        latent = model.quantized_latent(orient_patches(x, permutation, (False, False, False)))
        inverse = [permutation.index(axis) for axis in range(3)]
        restored = latent.permute(0, 1, *(2 + axis for axis in inverse)).flatten(1)
        shape = "x".join(str(s) for s in orient_patches(x[:1], permutation, (False,) * 3).shape[1:])
        ratios[f"{permutation}->{shape}"] = float((restored - reference).norm(dim=1).mean() / unrelated)
    return {"ratio_by_permutation": ratios, "mean_ratio": float(np.mean(list(ratios.values()))), "patches": len(x)}


def reconstruction_figure(
    patch_set: PatchSet, recons: np.ndarray, path: Path, per_plane: int = 3, seed: int = 0
) -> Path:
    """PNG of original / reconstruction / |difference| (one through-plane slice) for a few patches per plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    planes = np.array(patch_set.planes)[patch_set.series_index]
    mean_intensity = patch_set.patches.reshape(len(patch_set), -1).astype(np.float32).mean(axis=1)
    rows = []
    for plane in ("axial", "coronal", "sagittal"):
        # Patches well inside the brain, so the panels show anatomy rather than edges of the field.
        candidates = np.flatnonzero((planes == plane) & (mean_intensity > np.median(mean_intensity)))
        rows += [(plane, int(i)) for i in rng.choice(candidates, min(per_plane, len(candidates)), replace=False)]
    figure, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.2 * len(rows)), squeeze=False)
    for row, (plane, index) in enumerate(rows):
        original = patch_set.patches[index, :, :, 1].astype(np.float32)
        recon = recons[index, :, :, 1]
        error = np.abs(recon - original)
        name = patch_set.series_names[patch_set.series_index[index]]
        patch_psnr = psnr(float(((recons[index] - patch_set.patches[index].astype(np.float32)) ** 2).mean()))
        panels = (
            (original, f"{plane} {name}", (0, 1)),
            (recon, f"recon {patch_psnr:.1f} dB", (0, 1)),
            (error, "|diff| (0-0.2)", (0, 0.2)),
        )
        for column, (image, title, limits) in enumerate(panels):
            axes[row, column].imshow(image.T, cmap="gray", vmin=limits[0], vmax=limits[1], origin="lower")
            axes[row, column].set_title(title, fontsize=8)
            axes[row, column].axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def evaluate(model: VQVAE, patch_set: PatchSet, out: Path, consistency_patches: int = 256, seed: int = 0,
             provenance: dict | None = None) -> dict:
    """All metrics of ``model`` on ``patch_set``; writes ``eval.json``, ``eval_samples.npz`` and
    ``reconstructions.png`` under ``out``. ``provenance`` is recorded in ``eval.json`` as given."""
    recons, codes = reconstruct(model, patch_set.patches)
    histogram = np.bincount(codes.reshape(-1), minlength=model.config.codebook_size)
    probabilities = histogram / histogram.sum()
    nonzero = probabilities[probabilities > 0]
    families = np.array([sequence_type(name) for name in patch_set.series_names])[patch_set.series_index]
    planes = np.array(patch_set.planes)[patch_set.series_index]
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(patch_set), min(consistency_patches, len(patch_set)), replace=False)
    kept_samples = np.sort(rng.choice(len(patch_set), min(SAMPLE_PATCHES, len(patch_set)), replace=False))

    def metrics_where(selected: np.ndarray) -> dict:
        return reconstruction_metrics(patch_set.patches[selected], recons[selected])

    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / SAMPLES_FILE, patches=patch_set.patches[kept_samples],
                        codes=codes[kept_samples].astype(np.int16))
    result = {
        "series": len(patch_set.series_names),
        "overall": reconstruction_metrics(patch_set.patches, recons),
        "by_sequence": {f: metrics_where(families == f) for f in sorted(set(families))},
        "by_plane": {p: metrics_where(planes == p) for p in sorted(set(planes))},
        "codebook": {
            "size": model.config.codebook_size,
            "used": int((histogram > 0).sum()),
            "used_fraction": float((histogram > 0).mean()),
            "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
        },
        "orientation_consistency": orientation_consistency(model, patch_set.patches[sample], seed),
        "config": dataclasses.asdict(model.config),
        "samples": {"file": SAMPLES_FILE, "indices": kept_samples.tolist(),
                    "psnr_db": patch_psnrs(patch_set.patches[kept_samples], recons[kept_samples]).tolist()},
        "provenance": provenance or {},
    }
    if patch_set.lesions is not None and patch_set.lesions_known.any():
        # Lesions are a small share of the patches: a tokenizer can reach a high PSNR overall and still
        # blur them away, and then no model can find them in its tokens.
        touching = patch_set.lesions_known & patch_set.lesions.reshape(len(patch_set), -1).any(axis=1)
        result["lesions"] = {
            "touching_lesion": metrics_where(touching),
            "no_lesion": metrics_where(patch_set.lesions_known & ~touching),
            "contrast": lesion_contrast(patch_set.patches[touching], recons[touching], patch_set.lesions[touching]),
        }
    result["figure"] = reconstruction_figure(patch_set, recons, out / "reconstructions.png", seed=seed).name
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def summary_line(result: dict) -> str:
    """The model-card line: ``Volume tokenizer: foreground PSNR 29.4 dB, codes used 3120/8192``."""
    codebook = result["codebook"]
    psnr_db = result["overall"]["psnr_db"]
    return f"Volume tokenizer: foreground PSNR {psnr_db:.1f} dB, codes used {codebook['used']}/{codebook['size']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume-tokenizer", type=Path, required=True,
                        help="volume_tokenizer.safetensors, or a training run's last.pt")
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.jsonl (docs/design.md section 7)")
    parser.add_argument("--out", type=Path, required=True, help="folder for eval.json and reconstructions.png")
    parser.add_argument("--model", default="prima-lite",
                        help="model config whose preprocessing is used (a last.pt names its own)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], help="held-out splits to evaluate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds the patch samples")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, settings, training = load_for_evaluation(args.volume_tokenizer, args.device)
    if settings is None:
        settings = dataclasses.replace(get_model_config(args.model), volume_tokenizer=model.config)
    studies = read_manifest(args.manifest, args.splits)
    if not studies:
        raise SystemExit(f"{args.manifest}: no study in splits {args.splits}")
    provenance = {
        "evaluation": {"commit": git_commit(), "manifest": str(args.manifest),
                       "manifest_sha256": manifest_digest(args.manifest), "splits": args.splits, "seed": args.seed,
                       "preprocess": dataclasses.asdict(settings.preprocess)},
        "weights_sha256": file_digest(args.volume_tokenizer),
        "training": training,
    }
    result = evaluate(model, extract_patch_set(studies, settings, lesions=True), args.out, seed=args.seed,
                      provenance=provenance)
    shown = ("overall", "by_sequence", "by_plane", "codebook", "orientation_consistency", "lesions")
    print(json.dumps({key: result[key] for key in shown if key in result}, indent=2))
    print(summary_line(result))


if __name__ == "__main__":
    main()
