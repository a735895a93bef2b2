"""training.release end to end on the tiny synthetic set: every stage writes what the next reads, the
release loads with prima.load_release and predicts, and its model card holds the evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prima import load_release
from prima.manifest import read_manifest
from prima.predict import predict
from training.evaluate import FOCAL_DIAGNOSES
from training.release import ReleaseConfig, StageTimer, build, card_from_files, check_release_config, main
from training.runtime import machine_description, read_config_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED_VOLUME_TOKENIZER = REPO / "assets/volume-tokenizer-lite/volume_tokenizer.safetensors"


def tiny_release_config(manifest: Path, tmp_path: Path) -> ReleaseConfig:
    return ReleaseConfig(
        out=str(tmp_path / "release"), work=str(tmp_path / "work"), device="cpu", seed=0,
        data={"manifest": str(manifest)}, volume_tokenizer={"weights": str(SHIPPED_VOLUME_TOKENIZER)},
        token_cache={"min_fraction": 0.02, "precision": "fp32"},
        report_lm={"steps": 3, "batch_size": 4, "warmup": 1, "eval_every": 3, "log_every": 1, "precision": "fp32"},
        series_names={"steps": 3, "batch_size": 4, "max_tokens": 32, "warmup": 1, "eval_every": 3, "log_every": 1,
                      "precision": "fp32"},
        clip={"steps": 3, "batch_size": 4, "warmup": 1, "max_tokens": 32, "eval_every": 3, "log_every": 1,
              "precision": "fp32"},
        heads={"train_views": 2, "epochs": 3, "precision": "fp32"},
        evaluate={"n_boot": 20, "lime_samples": 16, "lime_max": 2, "precision": "fp32"},
        shifted={"n": 2, "spacing": 6.0, "max_series": 3},
        localisation={"n": 2, "spacing": 6.0, "max_series": 3, "stratify": True},
        test_set={"n": 3, "spacing": 6.0, "max_series": 3},
        scaling={"fractions": [0.5], "steps": "proportional"},
    )


def test_the_lite_recipe_releases_a_model_that_reads_place_deviations_and_pools_tokens(tiny_dataset, tmp_path):
    """prima-lite-head: the place-normal stage runs after the token cache, the heads train with the hViT in the clip
    stage and the heads stage only chooses their thresholds; the release ships the place-normal model and its
    evaluation reads the studies through it."""
    config = dataclasses.replace(
        tiny_release_config(tiny_dataset, tmp_path), model="prima-lite-head",
        place_normal={"kinds": 2, "min_count": 2}, shifted={}, localisation={}, test_set={}, scaling={},
        clip={"steps": 3, "batch_size": 4, "warmup": 1, "max_tokens": 32, "eval_every": 3, "log_every": 1,
              "precision": "fp32", "task_weight": 1.0})
    folder = build(config, "python -m training.release --config tiny-head.yaml")
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert list(stages) == ["data", "token cache", "place normal", "report LM", "series names", "clip", "heads",
                            "assemble", "evaluate"]
    release = load_release(folder)
    assert release.place_normal is not None and release.heads.pools_tokens
    assert json.loads((tmp_path / "work" / "heads" / "heads.json").read_text())["trained_with_the_hvit"]
    result = json.loads((folder / "evaluation" / "eval.json").read_text())
    assert result["split"] == "test" and result["studies"] > 0
    card = (folder / "README.md").read_text()
    assert "deviation from a place-normal model" in card and "largest token scores" in card


def test_every_stage_feeds_the_next_and_the_release_predicts(tiny_dataset, tmp_path):
    folder = build(tiny_release_config(tiny_dataset, tmp_path), "python -m training.release --config tiny.yaml")
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert list(stages) == ["data", "token cache", "report LM", "series names", "clip", "heads", "assemble",
                            "evaluate", "shifted test set", "localisation test set", "test set", "scaling"]
    shifted = json.loads((folder / "evaluation" / "shifted" / "eval.json").read_text())
    assert shifted["split"] == "all" and shifted["studies"] == 2
    shifted_md = (folder / "evaluation" / "shifted" / "eval.md").read_text()
    assert shifted_md.startswith("## Evaluation on every study of the manifest (2 studies)")
    assert "labels have positives and negatives; 95% CI " in shifted_md
    assert json.loads((tmp_path / "work" / "shifted" / "synth_config.json").read_text())["shift"] == 1.0
    localisation = json.loads((folder / "evaluation" / "localisation" / "eval.json").read_text())
    assert localisation["studies"] == 2 and localisation["lime_localisation"]["candidates"] >= 2
    focal = set(FOCAL_DIAGNOSES)
    assert json.loads((tmp_path / "work" / "localisation" / "synth_config.json").read_text())["stratify"] is True
    assert all(any(entry.labels[key] for key in focal) for entry in read_manifest(
        tmp_path / "work" / "localisation" / "manifest.jsonl"))
    # the stratified test set: drawn as the data are, every study in test, the baseline fitted on the data's train
    test_set = json.loads((folder / "evaluation" / "test_set" / "eval.json").read_text())
    assert test_set["split"] == "test" and test_set["studies"] == 3
    assert test_set["metadata_baseline"]["n_train"] == 8 and test_set["lime_localisation"]["explanations"] == 0
    drawn = json.loads((tmp_path / "work" / "test_set" / "synth_config.json").read_text())
    assert drawn["split_fractions"] == [0.0, 0.0, 1.0] and drawn["stratify"] is True and drawn["seed"] == 3
    assert {e.split for e in read_manifest(tmp_path / "work" / "test_set" / "manifest.jsonl")} == {"test"}
    curve = json.loads((folder / "evaluation" / "scaling.json").read_text())
    assert [p["fraction"] for p in curve] == [0.5, 1.0]
    assert curve[0]["train_studies"] < curve[1]["train_studies"] == 8
    assert [p["clip_steps"] for p in curve] == [2, 3]  # proportional: the same epochs
    # scored where the card is read: the test set (the full point is its evaluation)
    assert all(p["scored_on"] == str(tmp_path / "work" / "test_set" / "manifest.jsonl") for p in curve)
    assert [p["studies_scored"] for p in curve] == [3, 3] and curve[1]["mean_auroc"] == test_set["diagnosis"][
        "mean_auroc"]
    release = load_release(folder)
    assert release.heads is not None and release.volume_tokenizer is not None
    entry = read_manifest(tiny_dataset, ["test"])[0]
    prediction = predict([s.path for s in entry.series], release, device="cpu", precision="fp32")
    assert len(prediction.diagnoses) == 52 and prediction.priority.tier in ("low", "medium", "high")
    heads = json.loads((tmp_path / "work" / "heads" / "heads.json").read_text())
    assert set(heads["best"]) == {"diagnosis", "referral", "priority"}
    assert all(1 <= heads["best"][task]["epoch"] <= 3 for task in heads["best"] if heads["best"][task]["epoch"] > 0)
    assert len(release.config.diagnosis_thresholds) == 52 and len(release.config.referral_thresholds) == 11
    evaluation = json.loads((folder / "evaluation" / "eval.json").read_text())
    assert evaluation["studies"] == 2 and evaluation["split"] == "test"
    assert "labels have test positives and negatives; 95% CI " in (folder / "evaluation" / "eval.md").read_text()
    assert "| Mean probability / positive rate | Brier |" in (folder / "evaluation" / "eval.md").read_text()
    assert evaluation["provenance"]["machine"]["cpu_capability"] == machine_description()["cpu_capability"]
    assert evaluation["provenance"]["precision"] == "torch.float32"  # the config's fp32, named
    card = (folder / "README.md").read_text()
    assert "not for clinical use" in card and "## Targets" in card and "Localisation test set (2" in card
    # the card is read on the test set, the data's own test split named beside it
    assert (folder / "evaluation" / "test_set" / "eval.md").read_text().strip() in card and "Built on: " in card
    assert "Every figure below is read on the **test set**: 3 test-only studies" in card
    assert "The data's own test split (2 studies" in card and "| test set (test-only) | 3 |" in card
    assert "evaluation/test_set/reliability.png" in card and "(the same 3 test studies;" in card
    assert (folder / "evaluation" / "reliability.png").stat().st_size > 1000
    # the card is what the card code renders from the files the build left (how a shipped card is rewritten)
    assert card_from_files(folder) == card and "| Release build time, every stage (minutes) | <= 120 |" in card
    assert "Synthesis (studies per minute" not in card  # the data came from a manifest
    (folder / "README.md").write_text("stale card")
    assert main(["--rewrite-card", str(folder)]) == 0 and (folder / "README.md").read_text() == card
    # a second build finds every stage done (nothing is trained or evaluated again) and the same release
    before = (folder / "model.safetensors").read_bytes()
    evaluated = (folder / "evaluation" / "eval.json").stat().st_mtime_ns
    summaries = {name: (tmp_path / "work" / name / f"{name}.json").read_bytes()
                 for name in ("report_lm", "series_names", "clip")}
    build(tiny_release_config(tiny_dataset, tmp_path), "python -m training.release --config tiny.yaml")
    assert (folder / "model.safetensors").read_bytes() == before
    assert summaries == {name: (tmp_path / "work" / name / f"{name}.json").read_bytes() for name in summaries}
    assert (folder / "evaluation" / "eval.json").stat().st_mtime_ns == evaluated


@pytest.mark.parametrize("name", ["release-lite.yaml", "release-paper.yaml", "release-cuda-check.yaml"])
def test_shipped_release_configs_name_only_known_fields(name):
    check_release_config(read_config_file(REPO / "training" / "configs" / name))


@pytest.mark.parametrize("stage", ["clip", "heads", "place_normal", "report_lm", "series_names", "token_cache", "evaluate",
                                   "release", "volume_tokenizer.train"])
def test_every_stage_command_explains_itself(stage):
    result = subprocess.run([sys.executable, "-m", f"training.{stage}", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--" in result.stdout


def test_a_typo_in_a_release_section_is_refused_before_any_work(tmp_path):
    from prima.errors import ConfigError

    doc = read_config_file(REPO / "training" / "configs" / "release-lite.yaml")
    doc["clip"]["stpes"] = 10
    with pytest.raises(ConfigError, match="stpes"):
        check_release_config(doc)


def test_an_interrupted_stage_keeps_the_seconds_it_ran(tmp_path):
    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageTimer(tmp_path).run("clip", interrupted)
    StageTimer(tmp_path).run("clip", lambda: time.sleep(0.2))  # the resumed run, in a new process
    assert json.loads((tmp_path / "stages.json").read_text())["clip"] >= 0.4


def test_a_terminated_release_keeps_the_seconds_of_its_stage(tmp_path):
    """SIGTERM stops the stage through its ``finally`` (exit 143) and forked workers die of the signal."""
    script = f"""
import multiprocessing, sys, time
from pathlib import Path
from training.release import StageTimer
from training.runtime import stop_on_terminate

def stage():
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    print(worker.pid, flush=True)
    try:
        time.sleep(60)
    finally:
        worker.join(30)
        print(worker.exitcode, file=sys.stderr, flush=True)

with stop_on_terminate():
    StageTimer(Path({str(tmp_path)!r})).run("clip", stage)
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    worker = int(process.stdout.readline())
    time.sleep(0.3)
    os.kill(worker, signal.SIGTERM)
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == str(-signal.SIGTERM)
    assert json.loads((tmp_path / "stages.json").read_text())["clip"] >= 0.3
