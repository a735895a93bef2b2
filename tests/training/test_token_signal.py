"""benchmarks/token_signal.py end to end on the tiny data set: every experiment runs and reports its figures
(which are not checked: a dozen studies measure nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "token_signal.py"


def _load():
    spec = importlib.util.spec_from_file_location("token_signal", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_experiment_runs_on_a_tiny_data_set(tiny_dataset, tiny_token_cache, tmp_path, capsys):
    token_signal = _load()
    common = ["--data", str(tiny_dataset.parent), "--cache", str(tiny_token_cache), "--out", str(tmp_path)]
    runs = [["footprint"], ["mil", "--features", "latent,position", "--epochs", "1"],
            ["normative", "--position-weight", "1", "--pool", "500"],
            ["probe", "--features", "pca,neighbours,centred,codes", "--clean", "200", "--cross-series"],
            ["probe", "--features", "intensity,latent,template", "--clean", "200"],
            ["normative", "--frame", "template", "--position-weight", "1", "--pool", "500"],
            ["grid", "--steps", "2", "--batch", "2", "--crop", "8", "8", "4", "--width", "4"],
            ["grid", "--supervision", "labels", "--steps", "1", "--batch", "2", "--width", "4"],
            ["atlas", "--normals", "3", "--spacing", "12", "--min-count", "1"],
            ["normative", "--frame", "grid", "--position-weight", "1", "--pool", "500"],
            ["latent-atlas", "--min-count", "1"],
            ["latent-atlas", "--min-count", "1", "--sequence", "clusters", "--clusters", "2"]]
    for run in runs:
        assert token_signal.main(common + run) == 0
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["experiment"] for line in lines] == [run[0] for run in runs]
    tokens = token_signal.Tokens(tmp_path)
    assert len(tokens.latent) == len(tokens.overlap) == len(tokens.study) and tokens.latent.shape[1] == 256
    assert set(lines[0]) >= {"train", "val", "test"} and "lesion_tokens" in lines[1]
    assert "cross_series" in lines[3]
    assert np.load(tmp_path / "intensity.npy").shape == (len(tokens.latent), 128)
    assert np.load(tmp_path / "template.npy").shape == tokens.ras.shape and lines[5]["frame"] == "template"
    assert {line["supervision"] for line in lines[6:8]} == {"masks", "labels"}
    assert all(0.0 <= line["lesion_positions"] <= 1.0 for line in lines[6:8] if line["lesion_positions"] is not None)
    assert set(lines[8]) >= {"template", "ras", "head"} and lines[8]["normals"] >= 1
    assert lines[9]["frame"] == "grid"
    assert 0.0 < lines[10]["modelled_tokens"] <= 1.0 and set(lines[10]) >= {"val", "test", "lesion_tokens"}
    assert lines[10]["agreement_with_sequence"] == 1.0 and lines[11]["kinds"] == 2
    assert -1.0 <= lines[11]["agreement_with_sequence"] <= 1.0 and lines[11]["sequence"] == "clusters"
    # another data set's training studies join the training split (here the same one again: twice as many)
    doubled = tmp_path / "doubled"
    assert token_signal.main([*common[:-1], str(doubled), "--extra-train", str(tiny_dataset.parent),
                              str(tiny_token_cache), "footprint"]) == 0
    again = json.loads((doubled / "results.jsonl").read_text())
    assert again["train"]["abnormal"] == 2 * lines[0]["train"]["abnormal"]
    assert again["test"] == lines[0]["test"]


def test_a_head_grid_cache_is_read_with_its_own_preprocessing(tiny_dataset, tiny_head_token_cache, tmp_path):
    """A cache built on the head grid (prima-lite-head): the lesion overlaps come from that grid (a mask resampled
    with the paper's preprocessing would not fit it and raise), and every token index lies in the box."""
    cache = tiny_head_token_cache
    token_signal = _load()
    out = tmp_path / "signal"
    for run in (["normative", "--frame", "grid", "--position-weight", "3", "--pool", "500"],
                ["latent-atlas", "--min-count", "1"]):
        assert token_signal.main(["--data", str(tiny_dataset.parent), "--cache", str(cache), "--out", str(out),
                                  *run]) == 0
    tokens = token_signal.Tokens(out)
    assert tokens.lesion.any()
    assert np.all(np.sort(tokens.grid.max(0)) < 12) and sorted(np.unique(tokens.plane)) == [0, 1, 2]
