"""training.volume_tokenizer.train: a short real-anatomy run learns, resumes exactly and writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.errors import ConfigError
from prima.factory import get_model_config
from prima.manifest import manifest_digest, read_manifest
from prima.release import load_volume_tokenizer, volume_tokenizer_provenance
from training.volume_tokenizer.data import extract_patch_set
from training.volume_tokenizer.evaluate import main
from training.volume_tokenizer.mni_manifest import build_mni_manifest
from training.volume_tokenizer.train import parse_args, train


def _args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--manifest", str(manifest), "--out", str(out), "--splits", "train",
        "--channels", "16", "--res-layers", "1", "--codebook-size", "512",
        "--batch-size", "16", "--warmup", "10", "--device", "cpu", *extra,
    ]


def test_short_training_lowers_the_reconstruction_loss_threefold(mni_manifest: Path, tmp_path: Path) -> None:
    # ~600 foreground patches of two deformed-template series (real anatomy); ~25 s on one core.
    weights = train(parse_args(_args(mni_manifest, tmp_path, "--steps", "150", "--lr", "3e-3", "--log-every", "10")))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(10, 151, 10))
    first, last = log[0]["l1"], log[-1]["l1"]
    assert last < first / 3, f"L1 went from {first:.4f} to {last:.4f}"
    assert log[-1]["perplexity"] > 20  # the codebook did not collapse onto a few codes
    assert all(record["step_s"] > 0 and record["patches_per_s"] > 0 for record in log)
    model = load_volume_tokenizer(weights)
    assert model.config.channels == 16 and model.config.codebook_size == 512
    assert model.encode(torch.rand(3, 32, 32, 4)).shape == (3, 256)
    provenance = volume_tokenizer_provenance(weights)
    assert provenance["steps"] == 150 and provenance["manifest_sha256"] == manifest_digest(mni_manifest)
    assert provenance["config"]["lr"] == 3e-3 and provenance["config"]["model"] == "prima-lite"


def test_resumed_run_matches_an_uninterrupted_one(mni_manifest: Path, tmp_path: Path) -> None:
    tiny = ["--channels", "8", "--codebook-size", "64", "--batch-size", "8", "--checkpoint-every", "3"]
    straight = train(parse_args(_args(mni_manifest, tmp_path / "straight", "--steps", "6", *tiny)))
    interrupted = tmp_path / "interrupted"
    train(parse_args(_args(mni_manifest, interrupted, "--steps", "3", *tiny)))
    checkpoint = torch.load(interrupted / "last.pt", weights_only=False)
    assert checkpoint["step"] == 3 and checkpoint["config"]["codebook_size"] == 64  # the config travels inside
    resumed_weights = train(parse_args(_args(mni_manifest, interrupted, "--steps", "6", *tiny)))
    expected = load_volume_tokenizer(straight).state_dict()
    resumed = load_volume_tokenizer(resumed_weights).state_dict()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], msg=key)
    with pytest.raises(ConfigError, match="lr"):  # another config must not silently continue this run
        train(parse_args(_args(mni_manifest, interrupted, "--steps", "9", "--lr", "1e-4", *tiny)))


@pytest.mark.slow
def test_longer_lite_run_generalises_to_a_held_out_subject(tmp_path: Path) -> None:
    # The long variant of the test above (`make test-slow`, ~8 min on 2 cores): the prima-lite
    # tokenizer, 1200 steps on 5 deformed-template subjects, evaluated on a sixth it never saw.
    # Measured: held-out 23.3 dB vs 19.9 dB for 4x4x2 block means (128 numbers per patch, half a
    # token's 256); held-out L1 0.042 vs 0.040 on the last training steps; 7975 codes used.
    manifest = build_mni_manifest(tmp_path / "mni", subjects=6, seed=1, series_per_subject=3)
    run = tmp_path / "run"
    weights = train(parse_args(["--manifest", str(manifest), "--out", str(run), "--model", "prima-lite",
                                "--steps", "1200", "--batch-size", "32", "--lr", "2e-3", "--warmup", "100"]))
    main(["--volume-tokenizer", str(weights), "--manifest", str(manifest), "--out", str(tmp_path / "eval"),
          "--splits", "val"])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())

    held_out = extract_patch_set(read_manifest(manifest, ["val"]), get_model_config("prima-lite"), progress=False)
    blocks = held_out.patches.astype(np.float32).reshape(-1, 8, 4, 8, 4, 2, 2)
    block_means = np.broadcast_to(blocks.mean(axis=(2, 4, 6), keepdims=True), blocks.shape)
    baseline_db = 10 * np.log10(1 / np.mean((blocks - block_means) ** 2))
    assert result["overall"]["psnr_db"] >= baseline_db + 2.0, (result["overall"], baseline_db)

    final_train_l1 = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["l1"]
    assert result["overall"]["l1"] <= 1.15 * final_train_l1, (result["overall"], final_train_l1)
    assert result["codebook"]["used"] >= 0.25 * result["codebook"]["size"], result["codebook"]
