"""training.series_names: the series-name CLIP stage writes loadable weights, resumes exactly, draws batches of
distinct names and gives the same losses on two processes as on one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prima.factory import get_model_config
from prima.models.clip import PrimaVisual
from prima.models.name_encoder import encode_names
from training.series_names import (
    SERIES_NAMES_FILE,
    SUMMARY_FILE,
    TRAINED_PREFIXES,
    SeriesNameClip,
    SeriesNamesConfig,
    global_batch,
    load_series_names,
    parse_args,
    train,
)
from helpers.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]


def _config(dataset: Path, cache: Path, out: Path, **overrides: object) -> SeriesNamesConfig:
    # warmup above every run's steps: the learning rate then does not depend on the total steps, so a run
    # stopped at 4 and resumed to 8 follows the same schedule as a straight run of 8.
    settings = dict(manifest=str(dataset), token_cache=str(cache), out=str(out), steps=4, batch_size=4, max_tokens=16,
                    lr=1e-4, warmup=20, eval_every=2, log_every=1, checkpoint_every=2, precision="fp32", device="cpu",
                    threads=1)
    return SeriesNamesConfig(**{**settings, **overrides})


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tiny_token_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run's folder."""
    run = tmp_path_factory.mktemp("series_names")
    train(_config(tiny_dataset, tiny_token_cache, run))
    return run


def test_the_stage_writes_weights_that_load_into_primavisual(trained: Path) -> None:
    log = _log(trained)
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    assert [("val_loss" in record) for record in log] == [False, True, False, True]
    summary = json.loads((trained / SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["train_loss"] == log[-1]["loss"]
    assert summary["val_loss"] == log[-1]["val_loss"] and 0 <= summary["val_name_to_series_top1"] <= 1
    assert summary["val_names"] == summary["val_series"] == 6 and summary["train_names"] >= 4
    assert summary["seconds"] > 0 and summary["config"]["max_tokens"] == 16

    visual = PrimaVisual(get_model_config("prima-lite").vision)
    untouched = {key: value.clone() for key, value in visual.state_dict().items()
                 if not key.startswith(TRAINED_PREFIXES)}
    state = load_file(trained / SERIES_NAMES_FILE)
    result = visual.load_state_dict(state, strict=False)  # what the CLIP stage does
    assert not result.unexpected_keys
    assert all(not key.startswith(TRAINED_PREFIXES) for key in result.missing_keys)
    assert {key.split(".")[0] for key in state} == {"series_name_encoder", "sequence_vit"}

    fresh = PrimaVisual(get_model_config("prima-lite").vision)
    assert load_series_names(trained / SERIES_NAMES_FILE, fresh) == sorted(state)
    trained_model = torch.load(trained / "last.pt", weights_only=False)["model"]
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[key], trained_model[key]) for key in state)
    assert all(torch.equal(visual.state_dict()[key], value) for key, value in untouched.items())


def test_load_series_names_refuses_foreign_or_misshapen_weights(trained: Path, tmp_path: Path) -> None:
    state = load_file(trained / SERIES_NAMES_FILE)
    visual = PrimaVisual(get_model_config("prima-lite").vision)
    save_file({**state, "study_vit.registers": visual.study_vit.registers.detach()}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['study_vit.registers'\]"):
        load_series_names(tmp_path / "extra.safetensors", visual)
    save_file({key: value for key, value in state.items() if key != "sequence_vit.registers"},
              tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['sequence_vit.registers'\]"):
        load_series_names(tmp_path / "short.safetensors", visual)
    save_file({**state, "sequence_vit.registers": torch.zeros(3, 289)}, tmp_path / "misshapen.safetensors")
    with pytest.raises(ValueError, match="shapes differ"):
        load_series_names(tmp_path / "misshapen.safetensors", visual)


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_dataset: Path, tiny_token_cache: Path, tmp_path: Path) -> None:
    train(_config(tiny_dataset, tiny_token_cache, tmp_path / "straight", steps=8))
    train(_config(tiny_dataset, tiny_token_cache, tmp_path / "resumed", steps=4))
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 4
    train(_config(tiny_dataset, tiny_token_cache, tmp_path / "resumed", steps=8))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 8
    assert all(torch.equal(resumed["model"][key], value) for key, value in straight["model"].items())
    assert [r["loss"] for r in _log(tmp_path / "resumed")] == [r["loss"] for r in _log(tmp_path / "straight")]
    summary = (tmp_path / "resumed" / "series_names.json").read_bytes()
    train(_config(tiny_dataset, tiny_token_cache, tmp_path / "resumed", steps=8))  # finished: nothing is rewritten
    assert (tmp_path / "resumed" / "series_names.json").read_bytes() == summary


def test_global_batches_hold_distinct_names_and_depend_only_on_seed_and_step() -> None:
    batches = [global_batch(10, 3, seed=5, step=step) for step in range(6)]
    assert all(len(set(batch.tolist())) == 3 for batch in batches)
    for epoch in (batches[:3], batches[3:]):  # 3 batches of 3 per epoch of 10 names: no name twice
        assert len(set(np.concatenate(epoch).tolist())) == 9
    assert all(np.array_equal(global_batch(10, 3, seed=5, step=step), batches[step]) for step in range(6))
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))  # each epoch reshuffles
    assert not np.array_equal(global_batch(10, 3, seed=6, step=0), batches[0])
    with pytest.raises(ValueError, match="cannot fill"):
        global_batch(2, 3, seed=0, step=0)


def test_the_series_view_does_not_see_the_name() -> None:
    torch.manual_seed(0)
    settings = get_model_config("prima-lite")
    model = SeriesNameClip(PrimaVisual(settings.vision), settings.embed_dim, settings.init_temperature).eval()
    tokens, mask = torch.randn(2, 5, 289), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        first = model(tokens, mask, *encode_names(["AX T2 FLAIR", "SAG T1"], 64))
        second = model(tokens, mask, *encode_names(["DWI_TRA_b1000", "ADC"], 64))
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
    assert first[0].dtype == first[1].dtype == torch.float32
    assert torch.allclose(first[0].norm(dim=-1), torch.ones(2)) and float(first[2]) == pytest.approx(1 / 0.07)


def test_bad_arguments_raise_value_error(tiny_dataset: Path, tiny_token_cache: Path, tmp_path: Path) -> None:
    for bad in ({"batch_size": 1}, {"max_tokens": 0}, {"steps": 0}, {"eval_every": 0}, {"lr": 0.0},
                {"time_limit_min": 0.0}, {"precision": "fp16"}):
        with pytest.raises(ValueError):
            _config(tiny_dataset, tiny_token_cache, tmp_path, **bad)
    with pytest.raises(ValueError, match="cannot fill"):  # the tiny train split has fewer distinct names
        train(_config(tiny_dataset, tiny_token_cache, tmp_path, batch_size=64))


def test_the_lite_config_file_parses_and_help_prints(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_args(["--config", str(REPO / "training/configs/series-names-lite.yaml"), "--token-cache", "cache",
                         "--steps", "7"])
    assert config.model == "prima-lite" and config.batch_size == 32 and config.steps == 7
    assert config.token_cache == "cache"
    with pytest.raises(SystemExit):
        parse_args(["--help"])  # every field comment must survive argparse's %-formatting
    assert "distinct names (one series each) per step" in capsys.readouterr().out


def test_the_loss_goes_down_on_the_tiny_set(tiny_dataset: Path, tiny_token_cache: Path, tmp_path: Path) -> None:
    train(_config(tiny_dataset, tiny_token_cache, tmp_path, steps=30, warmup=5, eval_every=30))
    losses = [record["loss"] for record in _log(tmp_path)]
    # Below log(4) too: a series view collapsed to a constant (what too high a learning rate does) sits at
    # exactly the chance loss of a 4-pair batch.
    assert np.mean(losses[-5:]) < min(np.mean(losses[:5]) - 0.05, np.log(4) - 0.03), losses


def test_two_processes_give_the_losses_of_one(tiny_dataset: Path, tiny_token_cache: Path, tmp_path: Path) -> None:
    settings = _config(tiny_dataset, tiny_token_cache, tmp_path / "one", steps=3, eval_every=3)
    train(settings)
    flags = ["--manifest", settings.manifest, "--token-cache", settings.token_cache, "--out", str(tmp_path / "two"),
             "--steps", "3", "--batch-size", "4", "--max-tokens", "16", "--lr", "1e-4", "--warmup", "20",
             "--eval-every", "3", "--log-every", "1", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    result = run_torchrun(["-m", "training.series_names", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "two" / SUMMARY_FILE).read_text())["processes"] == 2
