"""training.report_lm: the report tokenizer and GPT-2 pre-training write loadable files, resume exactly,
learn, refuse bad settings and give the same losses on 2 processes as on one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prima.errors import ConfigError, ReleaseError
from prima.factory import get_model_config
from prima.models.text import ReportTokenizer, TextTower
from prima.release import REPORT_TOKENIZER_FILE
from training.report_items import split_items
from training.report_lm import (
    SUMMARY_FILE,
    ReportBatches,
    ReportLMConfig,
    load_text_tower,
    parse_args,
    report_corpus,
    train,
)
from helpers.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]
LITE_TEXT = get_model_config("prima-lite").text


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # The runs below use one thread (small matmuls on a busy 2-core machine are much faster that way):
    # give the other tests of the session the thread count they had.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(manifest: Path, out: Path, **overrides) -> ReportLMConfig:
    # warmup >= steps: the learning rate of a step does not depend on the run's total steps, so a run of 4
    # steps resumed to 8 follows the schedule of a run of 8.
    settings = {"steps": 4, "batch_size": 4, "warmup": 8, "log_every": 1, "eval_every": 2, "precision": "fp32",
                "device": "cpu", "threads": 1, **overrides}
    return ReportLMConfig(manifest=str(manifest), out=str(out), **settings)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_stage_writes_a_tokenizer_a_text_tower_and_a_summary(tiny_dataset: Path, tmp_path: Path) -> None:
    weights = train(_config(tiny_dataset, tmp_path))
    tokenizer = ReportTokenizer.load(tmp_path / REPORT_TOKENIZER_FILE)
    assert 258 < tokenizer.vocab_size <= LITE_TEXT.vocab_size  # a tiny corpus: fewer tokens than the tower's
    state = load_file(weights)
    assert sorted(state) == sorted(TextTower(LITE_TEXT).state_dict())
    tower = load_text_tower(weights, LITE_TEXT)
    assert all(torch.equal(tower.state_dict()[key], value) for key, value in state.items())
    ids, mask = tokenizer(report_corpus(tiny_dataset, ("val",)), LITE_TEXT.context_length)
    assert tower(ids, mask).shape == (len(ids), LITE_TEXT.width)

    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["corpus_reports"] == 8 and summary["val_reports"] == 2
    assert summary["tokenizer_vocab_size"] == tokenizer.vocab_size
    assert summary["val_perplexity"] == pytest.approx(torch.tensor(summary["val_loss"]).exp().item())
    log = _log(tmp_path)
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    assert [("val_loss" in record) for record in log] == [False, True, False, True]
    assert log[-1]["val_loss"] == summary["val_loss"] and log[-1]["loss"] == summary["train_loss"]
    assert all(record["tokens_per_s"] > 0 for record in log)

    with pytest.raises(ReleaseError, match="trained as"):  # same tensor shapes, another number of heads
        load_text_tower(weights, dataclasses.replace(LITE_TEXT, heads=4))
    with pytest.raises(ReleaseError):  # another context: the position table has another shape
        load_text_tower(weights, dataclasses.replace(LITE_TEXT, context_length=64))


def test_resumed_run_equals_an_uninterrupted_one(tiny_dataset: Path, tmp_path: Path) -> None:
    straight = load_file(train(_config(tiny_dataset, tmp_path / "straight", steps=8)))
    interrupted = tmp_path / "interrupted"
    train(_config(tiny_dataset, interrupted, steps=4))
    tokenizer_bytes = (interrupted / REPORT_TOKENIZER_FILE).read_bytes()
    resumed = load_file(train(_config(tiny_dataset, interrupted, steps=8)))
    assert (interrupted / REPORT_TOKENIZER_FILE).read_bytes() == tokenizer_bytes
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
    assert [r["loss"] for r in _log(interrupted)] == [r["loss"] for r in _log(tmp_path / "straight")]
    summary = (interrupted / "report_lm.json").read_bytes()
    train(_config(tiny_dataset, interrupted, steps=8))  # finished: nothing is trained or rewritten
    assert (interrupted / "report_lm.json").read_bytes() == summary
    with pytest.raises(ConfigError, match="lr"):  # another config must not silently continue this run
        train(_config(tiny_dataset, interrupted, steps=9, lr=1e-4))
    (interrupted / "report_tokenizer.key.json").write_text('{"key": "another corpus"}')
    with pytest.raises(ConfigError, match="tokenizer"):  # nor another tokenizer
        train(_config(tiny_dataset, interrupted, steps=9))


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    reports = ["1. a.\n2. b.\n3. c.", "Normal.", "1. d.\n2. e."]
    batches = ReportBatches(reports, batch_size=4, seed=1, shuffle=True)
    first = [batches(step) for step in range(6)]
    assert [ReportBatches(reports, 4, 1, True)(step) for step in reversed(range(6))] == first[::-1]
    # every 3 consecutive samples of the stream are one epoch: each report once, items shuffled
    stream = [report for batch in first for report in batch]
    for epoch in range(len(stream) // 3):
        drawn = stream[3 * epoch : 3 * epoch + 3]
        assert sorted(sorted(split_items(r)) for r in drawn) == sorted(sorted(split_items(r)) for r in reports)
    assert any(r not in reports for r in stream)  # some item order changed
    assert all(r in reports for batch in (ReportBatches(reports, 4, 1, False)(s) for s in range(6)) for r in batch)


@pytest.mark.parametrize("overrides", [{"splits": ("train", "val")}, {"splits": ()}, {"vocab_size": 100},
                                       {"vocab_size": LITE_TEXT.vocab_size + 1}, {"batch_size": 0}, {"lr": 0.0},
                                       {"steps": 0}, {"precision": "fp16"}, {"time_limit_min": 0.0}])
def test_bad_settings_are_refused(tiny_dataset: Path, tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        train(_config(tiny_dataset, tmp_path, **overrides))
    assert not (tmp_path / "last.pt").exists()


def test_loss_goes_down_on_the_tiny_corpus(tiny_dataset: Path, tmp_path: Path) -> None:
    train(_config(tiny_dataset, tmp_path, steps=30, warmup=5, lr=3e-3, log_every=5, eval_every=30))
    log = _log(tmp_path)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])


def test_command_line_reads_the_lite_config(tmp_path: Path) -> None:
    config = parse_args(["--config", str(REPO / "training/configs/report-lm-lite.yaml"), "--out", str(tmp_path),
                         "--no-shuffle-items", "--steps", "3"])
    assert config.model == "prima-lite" and config.splits == ("train",) and config.out == str(tmp_path)
    assert config.steps == 3 and config.shuffle_items is False


def test_two_processes_give_the_losses_of_one(tiny_dataset: Path, tmp_path: Path) -> None:
    args = ["--manifest", str(tiny_dataset), "--steps", "3", "--batch-size", "4", "--warmup", "8", "--log-every",
            "1", "--eval-every", "3", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    train(parse_args([*args, "--out", str(tmp_path / "one")]))
    result = run_torchrun(["-m", "training.report_lm", *args, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for key in ("loss", "val_loss"):
        expected = [r[key] for r in one if key in r]
        assert [r[key] for r in two if key in r] == pytest.approx(expected, abs=1e-5, rel=0), key
    assert json.loads((tmp_path / "two" / SUMMARY_FILE).read_text())["processes"] == 2
