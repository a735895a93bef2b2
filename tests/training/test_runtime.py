"""training.runtime: stage configs (file, then flags), schedule, checkpoints that carry their config,
run logs with throughput, the step loop every trainer shares, cache keys."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prima.errors import ConfigError
from training.runtime import (
    HALF_PRECISION_CPU_FLAGS,
    RunLog,
    StepLoop,
    add_config_arguments,
    attention_kernel,
    cache_key,
    distributed,
    load_stage_config,
    machine_description,
    resume,
    save_checkpoint,
    warmup_cosine,
)


@dataclass
class StageConfig:
    manifest: str  # the studies
    steps: int = 10  # optimiser steps
    lr: float = 1e-3  # peak learning rate
    splits: tuple[str, ...] = ("train",)  # splits to read
    window: tuple[float, float] = (0.1, 0.2)  # a range
    limit: float | None = None  # optional limit
    shuffle: bool = True  # shuffle the data


def _load(argv: list[str]) -> StageConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, StageConfig)
    return load_stage_config(StageConfig, parser.parse_args(argv))


def test_file_then_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "stage.yaml"
    yaml_file.write_text("# a comment\nmanifest: m.jsonl\nsteps: 50\nsplits: [train, val]\nwindow: [0.3, 0.4]\n")
    config = _load(["--config", str(yaml_file), "--steps", "7", "--no-shuffle"])
    assert config == StageConfig("m.jsonl", 7, 1e-3, ("train", "val"), (0.3, 0.4), None, False)
    json_file = tmp_path / "stage.json"
    json_file.write_text(json.dumps({"manifest": "j.jsonl", "lr": 0.5}))
    assert _load(["--config", str(json_file), "--splits", "test", "--limit", "2.5"]) == StageConfig(
        "j.jsonl", 10, 0.5, ("test",), (0.1, 0.2), 2.5, True)
    assert _load(["--manifest", "x"]).manifest == "x"  # no file: defaults, then flags


def test_flag_help_is_the_field_comment() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, StageConfig)
    assert "optimiser steps" in parser.format_help() and "shuffle the data" in parser.format_help()


@pytest.mark.parametrize(("text", "message"), [
    ("manifest: m\nstepz: 3\n", "unknown keys"),
    ("steps: 3\n", "manifest"),  # a required field nobody set
    ("- a list\n", "mapping"),
    ("manifest: [unclosed\n", "YAML"),
])
def test_bad_config_files_raise_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        _load(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        _load(["--config", str(tmp_path / "absent.yaml")])


def test_warmup_then_cosine_to_the_floor() -> None:
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.55)  # half way down from 1.0 to 0.1
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_checkpoint_carries_its_config_and_refuses_another(tmp_path: Path) -> None:
    config = StageConfig("m.jsonl", steps=5)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "last.pt", {"step": 3}, config)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    state = resume(tmp_path / "last.pt", StageConfig("m.jsonl", steps=9), may_differ=("steps",))
    assert state["step"] == 3 and state["config"]["splits"] == ["train"]
    assert torch.equal(torch.rand(3), expected_next)  # the random streams continue where they were
    with pytest.raises(ConfigError, match=r"lr: 0\.001 -> 0\.1"):
        resume(tmp_path / "last.pt", StageConfig("m.jsonl", steps=5, lr=0.1))
    assert resume(tmp_path / "absent.pt", config) is None


def test_run_log_lines_hold_means_step_time_and_throughput(tmp_path: Path) -> None:
    log = RunLog(tmp_path, total_steps=4, unit="studies")
    for loss in (1.0, 3.0):
        log.update(8, loss=loss)
    record = log.write(2)
    log.close()
    assert record["loss"] == 2.0 and record["step"] == 2 and record["step_s"] > 0 and record["studies_per_s"] > 0
    assert json.loads((tmp_path / "log.jsonl").read_text()) == record
    silent = RunLog(tmp_path / "absent", total_steps=1, enabled=False)  # other ranks write nothing
    silent.update(1, loss=1.0)
    assert silent.write(1) is None


def test_cache_key_changes_with_any_part() -> None:
    key = cache_key(manifest="abc", config={"a": 1, "b": [1, 2]})
    assert key == cache_key(config={"b": [1, 2], "a": 1}, manifest="abc")
    assert key != cache_key(manifest="abd", config={"a": 1, "b": [1, 2]})
    assert key != cache_key(manifest="abc", config={"a": 1, "b": [2, 1]})


def test_single_process_context() -> None:
    with distributed("cpu") as context:
        assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
        assert context.any(True) and not context.any(False)
        context.barrier()
    with pytest.raises(ValueError, match="device"):
        with distributed("tpu"):
            pass


def test_weights_digest_ignores_the_order_safetensors_writes_metadata_in(tmp_path):
    from safetensors.torch import save_file

    from training.runtime import weights_digest

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64), "scale": torch.tensor(2.5)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    digests = set()
    for n in range(6):  # several writes: the header's map order may differ, the content does not
        path = tmp_path / f"w{n}.safetensors"
        save_file(tensors, path, metadata=metadata)
        digests.add(weights_digest(path))
    assert len(digests) == 1
    save_file({**tensors, "a": tensors["a"] + 1}, tmp_path / "other.safetensors", metadata=metadata)
    assert weights_digest(tmp_path / "other.safetensors") not in digests


def test_git_commit_is_dirty_for_changed_code_but_not_for_an_ignored_output_folder(tmp_path):
    import subprocess

    from training.runtime import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "weights.bin").write_text("old")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "out" / "weights.bin").write_text("new")
    assert git_commit(tmp_path, ignore=(tmp_path / "out",)) == sha
    assert git_commit(tmp_path) == f"{sha}-dirty"
    (tmp_path / "code.py").write_text("x = 2")
    assert git_commit(tmp_path, ignore=(tmp_path / "out",)) == f"{sha}-dirty"


def test_machine_description_names_the_bf16_kernels_and_serialises() -> None:
    machine = machine_description("cpu")
    assert json.loads(json.dumps(machine)) == machine
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(machine["cpu_half_precision_flags"]) <= set(HALF_PRECISION_CPU_FLAGS)
    assert machine["torch"] == torch.__version__ and "cuda" not in machine


@pytest.mark.parametrize("choice,device,expected", [("auto", "cpu", "MATH"), ("math", "cpu", "MATH"),
                                                    ("torch", "cpu", "FLASH_ATTENTION")])
def test_attention_kernel_picks_the_sdpa_backend(choice: str, device: str, expected: str) -> None:
    from torch.nn.attention import SDPBackend

    q = torch.rand(2, 4, 9, 8)
    with attention_kernel(choice, device):
        assert torch._fused_sdp_choice(q, q, q) == int(getattr(SDPBackend, expected))
    with pytest.raises(ValueError, match="attention"):
        attention_kernel("flash", device)


def _run_steps(folder: Path, steps: int, *, start: int = 0, **options) -> tuple[list[dict], list[int], list[int]]:
    """Run ``StepLoop`` over steps ``start + 1 ..`` like a trainer: (log lines, steps saved, steps evaluated)."""
    saved, evaluated, step = [], [], start
    folder.mkdir()

    def evaluate() -> dict:
        evaluated.append(step)
        return {"val": float(step)}

    with distributed("cpu") as context:
        log = RunLog(folder, steps, start)
        loop = StepLoop(context, log, steps, save=lambda: saved.append(step),
                        **({"evaluate": evaluate} if "eval_every" in options else {}), **options)
        while step < steps:
            step += 1
            log.update(2, loss=float(step))
            if loop.end_step(step):
                break
        loop.finish()
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return lines, saved, evaluated


def test_step_loop_logs_evaluates_and_saves_on_its_cadence(tmp_path: Path) -> None:
    lines, saved, evaluated = _run_steps(tmp_path / "a", 7, log_every=3, checkpoint_every=4, eval_every=5)
    assert [line["step"] for line in lines] == [3, 5, 6, 7]  # every 3rd, every evaluation, the last
    assert [line.get("val") for line in lines] == [None, 5.0, None, 7.0]  # evaluations travel in their line
    assert lines[0]["loss"] == 2.0 and lines[1]["loss"] == 4.5  # running means since the previous line
    assert evaluated == [5, 7] and saved == [4, 7]  # every 4th, then the final save after the loop
    lines, saved, evaluated = _run_steps(tmp_path / "b", 4, start=2, log_every=10, checkpoint_every=10)
    assert [line["step"] for line in lines] == [4] and saved == [4] and evaluated == []  # resumed, no evaluation
    assert _run_steps(tmp_path / "c", 0, log_every=1, checkpoint_every=1)[1] == [0]  # nothing left: saved once


@pytest.mark.parametrize("evaluate_at_time_limit", [True, False])
def test_step_loop_stops_every_process_at_the_time_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         evaluate_at_time_limit: bool) -> None:
    lines, saved, evaluated = _run_steps(tmp_path / "late", 10, log_every=5, checkpoint_every=5, eval_every=5,
                                         time_limit_min=1.0, started=time.perf_counter() - 61.0,
                                         evaluate_at_time_limit=evaluate_at_time_limit)
    assert [line["step"] for line in lines] == [1] and saved == [1]  # a log line and the final save
    assert evaluated == ([1] if evaluate_at_time_limit else [])
    assert "time limit reached at step 1" in capsys.readouterr().out
    lines, _, _ = _run_steps(tmp_path / "in_time", 3, log_every=5, checkpoint_every=5, time_limit_min=1.0)
    assert [line["step"] for line in lines] == [3]  # well within the limit: runs to the end


@pytest.mark.parametrize("options, message", [
    ({"log_every": 0}, "log_every"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"eval_every": 0, "evaluate": dict}, "eval_every"), ({"eval_every": 5}, "evaluate function"),
    ({"time_limit_min": 0.0}, "time_limit_min"), ({"steps": -1}, "steps")])
def test_step_loop_refuses_bad_arguments(tmp_path: Path, options: dict, message: str) -> None:
    settings = {"steps": 10, "log_every": 1, "checkpoint_every": 1, **options}
    with distributed("cpu") as context:
        log = RunLog(tmp_path, 10, enabled=False)
        with pytest.raises(ValueError, match=message):
            StepLoop(context, log, settings.pop("steps"), save=lambda: None, **settings)
