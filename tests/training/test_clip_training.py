"""training.clip: a resumed run equals an uninterrupted one, two torchrun processes equal one, bad
arguments are refused; training.study_data's sampling and augmentations are pure functions of their seed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prima.factory import get_model_config
from prima.labels import default_label_space
from prima.manifest import read_manifest
from prima.models.text import train_report_tokenizer
from training.clip import ClipTrainConfig, load_clip, train
from training.study_data import (
    AugmentConfig,
    global_batch,
    label_targets,
    rank_share,
    sampling_weights,
    step_rng,
    study_inputs,
    token_studies,
)
from training.token_cache import TokenCache
from helpers.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = get_model_config("prima-lite").volume_tokenizer


@pytest.fixture(scope="module")
def report_tokenizer(tiny_dataset: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report_tokenizer") / "report_tokenizer.json"
    train_report_tokenizer([s.report for s in read_manifest(tiny_dataset)], 400).save(path)
    return path


def _config(tiny_dataset, tiny_token_cache, report_tokenizer, out, **overrides) -> ClipTrainConfig:
    settings = dict(manifest=str(tiny_dataset), token_cache=str(tiny_token_cache),
                    report_tokenizer=str(report_tokenizer), out=str(out), steps=4, batch_size=4, warmup=1,
                    max_tokens=48, eval_every=2, log_every=1, checkpoint_every=2, precision="fp32", device="cpu")
    return ClipTrainConfig(**{**settings, **overrides})


def test_resumed_run_equals_an_uninterrupted_one(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path):
    whole = train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "whole"))
    train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "parts", steps=2))
    parts = train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "parts"))
    first, second = load_file(whole), load_file(parts)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    summary = json.loads((tmp_path / "whole" / "clip.json").read_text())
    assert summary["steps"] == 4 and [v["step"] for v in summary["validation"]] == [2, 4]
    assert {"top1", "top5"} <= set(summary["validation"][-1]["image_to_text"])
    resumed = json.loads((tmp_path / "parts" / "clip.json").read_text())
    assert resumed["validation"] == summary["validation"]  # the history before the interruption is kept
    finished = (tmp_path / "whole" / "clip.json").read_bytes(), whole.stat().st_mtime_ns
    assert train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "whole")) == whole
    assert ((tmp_path / "whole" / "clip.json").read_bytes(), whole.stat().st_mtime_ns) == finished
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert "val_image_to_text_top1" in logged[1] and "val_text_to_image_top5" in logged[3]
    model = load_clip(whole, "prima-lite")  # loads into the release's model config
    assert not model.training


def test_resume_refuses_another_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path):
    from prima.errors import ConfigError

    train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path, steps=2))
    with pytest.raises(ConfigError, match="lr"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path, lr=1e-2))


def test_bad_arguments_raise(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "a", batch_size=64))
    with pytest.raises(ValueError, match="token_dropout"):
        _config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "b", token_dropout=1.5).augment()
    with pytest.raises(ValueError, match="attention"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / "c", attention="flash"))


def test_the_attention_kernels_train_the_same_function(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path):
    # fp32: the math and flash kernels differ only by rounding, so two steps give nearly the same losses
    losses = {}
    for kernel in ("math", "torch"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path / kernel, steps=2, attention=kernel))
        losses[kernel] = [json.loads(line)["loss"] for line in (tmp_path / kernel / "log.jsonl").read_text().splitlines()]
    assert np.allclose(losses["math"], losses["torch"], rtol=1e-4)


def test_two_torchrun_processes_give_the_loss_of_one(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path):
    common = ["--manifest", str(tiny_dataset), "--token-cache", str(tiny_token_cache), "--report-tokenizer",
              str(report_tokenizer), "--steps", "3", "--batch-size", "4", "--warmup", "1", "--max-tokens", "48",
              "--eval-every", "100", "--log-every", "1", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "training.clip", *common, "--out", str(tmp_path / "one")], check=True,
                   cwd=REPO, env=env, capture_output=True)
    result = run_torchrun(["-m", "training.clip", *common, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_global_batches_are_seeded_without_duplicates_and_split_over_ranks():
    probabilities = np.full(10, 0.1)
    batch = global_batch(10, 6, probabilities, seed=1, step=5)
    assert len(set(batch.tolist())) == 6
    assert np.array_equal(batch, global_batch(10, 6, probabilities, seed=1, step=5))
    assert not np.array_equal(batch, global_batch(10, 6, probabilities, seed=1, step=6))
    shares = [rank_share(batch, rank, 2) for rank in (0, 1)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(batch.tolist())
    with pytest.raises(ValueError, match="split"):
        rank_share(batch, 0, 4)


def test_abnormal_studies_are_upsampled(tiny_dataset, tiny_token_cache):
    studies = token_studies(str(tiny_dataset), TokenCache(tiny_token_cache), ["train"])
    probabilities = sampling_weights(studies, 3.0)
    abnormal = np.array([s.abnormal for s in studies])
    assert abnormal.any() and (~abnormal).any()
    assert np.allclose(probabilities[abnormal] / probabilities[~abnormal][0], 3.0)
    with pytest.raises(ValueError):
        sampling_weights(studies, 0.0)


def test_augmentations_are_a_pure_function_of_the_seed(tiny_dataset, tiny_token_cache):
    (study, *_) = token_studies(str(tiny_dataset), TokenCache(tiny_token_cache), ["train"])
    tokens = study.tokens()
    augment = AugmentConfig(token_dropout=0.3, series_dropout=0.5, unk_name=0.5, filter_range=(0.05, 0.3),
                            max_tokens=40)
    first, description = study_inputs(tokens, augment, TOKENIZER, step_rng(0, 3, 7))
    again, _ = study_inputs(tokens, augment, TOKENIZER, step_rng(0, 3, 7))
    assert [name for _, name in first] == [name for _, name in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert 1 <= len(first) <= len(tokens.series) and all(1 <= len(f) <= 40 for f, _ in first)
    plain, plain_description = study_inputs(tokens, AugmentConfig(token_dropout=0, series_dropout=0, unk_name=0,
                                                                  unk_description=0), TOKENIZER, step_rng(0, 0, 0))
    assert [name for _, name in plain] == [s.name for s in tokens.series] and plain_description == tokens.description
    # without augmentation a series keeps what the inference filter keeps (the model config's threshold)
    expected = [len(s.refilter(TOKENIZER.min_foreground_fraction, TOKENIZER.min_tokens)) for s in tokens.series]
    assert [len(features) for features, _ in plain] == expected


def test_label_targets_derive_priority_and_referrals(tiny_dataset):
    space = default_label_space()
    entries = read_manifest(tiny_dataset)
    diagnoses, referrals, tiers = label_targets(entries, space)
    for entry, row, referral_row, tier in zip(entries, diagnoses, referrals, tiers):
        positives = [k for k, flag in zip(space.diagnosis_keys, row) if flag]
        assert space.priority_tiers[tier] == space.priority_of(positives) == (entry.priority or "low")
        assert [k for k, flag in zip(space.referral_keys, referral_row) if flag] == space.referrals_of(positives)


@pytest.fixture(scope="module")
def overfit_set(tmp_path_factory) -> tuple[Path, Path]:
    """Sixteen small synthetic studies, all abnormal (distinct reports to retrieve), and their token cache:
    (manifest, cache folder)."""
    from training.synth.writers import write_dataset
    from training.token_cache import TokenCacheConfig, build_token_cache

    manifest = write_dataset(16, tmp_path_factory.mktemp("overfit_synth"), seed=5, workers=1, spacing=6.0,
                             max_series=2, progress=False, balance=1.0,
                             primary=list(default_label_space().diagnosis_keys))
    cache = build_token_cache(TokenCacheConfig(
        manifest=str(manifest), out=str(tmp_path_factory.mktemp("overfit_cache")),
        volume_tokenizer=str(REPO / "assets" / "volume-tokenizer-lite" / "volume_tokenizer.safetensors"),
        min_fraction=0.02, device="cpu", precision="fp32"), progress=False)
    return manifest, cache


def test_clip_overfits_a_dozen_studies(overfit_set, tmp_path):
    """Gradients reach both towers and the loss is right: CLIP memorises its training studies' reports
    (retrieval top-1 >= 0.9 among them, every token read as inference reads them), and both towers' weights
    moved."""
    from prima.models.text import ReportTokenizer
    from training.clip import initial_model, validate

    manifest, cache = overfit_set
    studies = token_studies(str(manifest), TokenCache(cache), ["train"])
    reports = [s.entry.report for s in studies]
    assert len(studies) >= 12 and len(set(reports)) == len(reports)
    tokenizer_path = tmp_path / "report_tokenizer.json"
    train_report_tokenizer(reports, 400).save(tokenizer_path)
    # every training study in every step, without augmentation; 96 of a series' 95-420 tokens a step (as the
    # release samples 128) and torch's attention kernel keep the run near a minute on a 2-core CPU: every token
    # with the math kernel took 9 minutes there (docs/training.md)
    config = ClipTrainConfig(manifest=str(manifest), token_cache=str(cache), report_tokenizer=str(tokenizer_path),
                             out=str(tmp_path / "clip"), steps=120, batch_size=len(studies), lr=1e-3,
                             text_lr_scale=1.0, warmup=10, token_dropout=0.0, series_dropout=0.0, unk_name=0.0,
                             unk_description=0.0, filter_range=(0.05, 0.05), max_tokens=96, attention="torch",
                             shuffle_report_items=False, abnormal_upsample=1.0, eval_every=1000, log_every=20,
                             precision="fp32", device="cpu")
    start = initial_model(config)
    model = load_clip(train(config), config.model)
    moved = {tower: max(float((dict(model.named_parameters())[name] - parameter).detach().abs().max())
                        for name, parameter in start.named_parameters() if name.startswith(tower))
             for tower in ("visual.", "text.")}
    assert moved["visual."] > 1e-3 and moved["text."] > 1e-3
    retrieval = validate(model, studies, ReportTokenizer.load(tokenizer_path), config, None)
    assert retrieval["image_to_text"]["top1"] >= 0.9 and retrieval["text_to_image"]["top1"] >= 0.9, retrieval


@pytest.fixture(scope="module")
def place_normal(tiny_dataset, tiny_head_token_cache, tmp_path_factory) -> Path:
    from training.place_normal import PlaceNormalFitConfig, fit

    return fit(PlaceNormalFitConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                    out=str(tmp_path_factory.mktemp("place_normal")), kinds=2, min_count=2))


def test_heads_train_jointly_on_place_deviations_and_resume(tiny_dataset, tiny_head_token_cache, report_tokenizer,
                                                            place_normal, tmp_path):
    """prima-lite-head without the CLIP loss: the token-pooling heads learn with the hViT on the labels, are saved
    beside it and scored at validation; a resumed run equals an uninterrupted one, heads included."""
    from training.heads import load_heads

    def run(out: Path, steps: int = 4) -> Path:
        return train(_config(tiny_dataset, tiny_head_token_cache, report_tokenizer, out, steps=steps,
                             model="prima-lite-head", place_normal=str(place_normal), clip_weight=0.0,
                             task_weight=1.0))

    whole = run(tmp_path / "whole")
    run(tmp_path / "parts", steps=2)
    parts = run(tmp_path / "parts")
    for name in ("clip.safetensors", "heads.safetensors"):
        first, second = load_file(whole.parent / name), load_file(parts.parent / name)
        assert all(torch.equal(first[key], second[key]) for key in first)
    heads = load_heads(whole.parent / "heads.safetensors", get_model_config("prima-lite-head"))
    assert heads.pools_tokens
    summary = json.loads((tmp_path / "whole" / "clip.json").read_text())
    assert {"abnormal_auroc", "diagnosis_mean_auroc"} == set(summary["validation"][-1]["heads"])
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert logged[0]["task"] > 0 and logged[0]["loss"] == pytest.approx(logged[0]["task"], rel=1e-4)
    assert "val_abnormal_auroc" in logged[1]

    # the heads stage keeps heads trained with the hViT: it only chooses their thresholds on validation, and their
    # calibration, which rescales the last layers by the temperatures in the summary
    from training.heads import HeadsTrainConfig, train as train_heads

    config = HeadsTrainConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache), clip=str(whole),
                              out=str(tmp_path / "heads"), trained=str(whole.parent / "heads.safetensors"),
                              place_normal=str(place_normal), model="prima-lite-head", calibrate=False)
    kept = load_heads(train_heads(config), get_model_config("prima-lite-head"))
    for key, value in heads.state_dict().items():
        if not key.endswith("thresholds"):
            assert torch.equal(kept.state_dict()[key], value)
    config = dataclasses.replace(config, out=str(tmp_path / "calibrated"), calibrate=True)
    calibrated = load_heads(train_heads(config), get_model_config("prima-lite-head")).state_dict()
    chosen_summary = json.loads((tmp_path / "calibrated" / "heads.json").read_text())
    assert chosen_summary["trained_with_the_hvit"] == config.trained and chosen_summary["history"] == []
    temperatures = {name: fit["temperature"] for name, fit in chosen_summary["calibration"].items()}
    assert set(temperatures) == {"diagnosis", "referral", "priority", "abnormal"}
    scorer = heads.state_dict()["token_scorer.weight"]
    torch.testing.assert_close(calibrated["token_scorer.weight"][0], scorer[0] / temperatures["abnormal"])
    torch.testing.assert_close(calibrated["token_scorer.weight"][1:], scorer[1:] / temperatures["diagnosis"])
    last = {"referral": "referral.6.weight", "priority": "priority.6.weight"}
    for name, key in last.items():
        torch.testing.assert_close(calibrated[key], heads.state_dict()[key] / temperatures[name])
    for key, value in heads.state_dict().items():
        if not key.startswith(("token_scorer", "referral.6", "priority.6")) and not key.endswith("thresholds"):
            assert torch.equal(calibrated[key], value)
    with pytest.raises(ValueError, match="give them as trained"):
        train_heads(HeadsTrainConfig(manifest=str(tiny_dataset), token_cache=str(tiny_head_token_cache),
                                     clip=str(whole), out=str(tmp_path / "again"), place_normal=str(place_normal),
                                     model="prima-lite-head"))


def test_bad_recipes_are_refused(tiny_dataset, tiny_token_cache, tiny_head_token_cache, report_tokenizer,
                                 place_normal, tmp_path):
    with pytest.raises(ValueError, match="place-normal model is needed"):
        train(_config(tiny_dataset, tiny_head_token_cache, report_tokenizer, tmp_path, model="prima-lite-head"))
    with pytest.raises(ValueError, match="not read"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path, place_normal=str(place_normal)))
    with pytest.raises(ValueError, match="nothing to train"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path, clip_weight=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        train(_config(tiny_dataset, tiny_token_cache, report_tokenizer, tmp_path, task_weight=-1.0))
