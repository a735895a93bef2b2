"""The benchmark scripts run end to end on tiny sizes (their figures are not checked: speed is for
benchmarks, not tests), so they do not rot between releases.

Tiny on any CPU: the lite model and tokenizer only, one run, a 256^3 matmul ceiling instead of
2048^3 (at bf16 without native support one 2048^3 matmul takes ~7 s, and the paper-width tokenizer
encodes 12 GFLOP per patch). bf16 is timed only where ``prima.precision`` says the CPU does it natively.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from prima.precision import ENV_OVERRIDE, cpu_has_fast_bf16

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

MODEL_SMOKE = ("bench_model.py", "--models", "prima-lite", "--series", "2", "--tokens", "16", "--runs", "1",
               "--threads", "1", "--ceiling-size", "256")
TOKENIZER_SMOKE = ("bench_volume_tokenizer.py", "--widths", "lite", "--batch", "2", "--runs", "1", "--threads", "1",
                   "--ceiling-size", "256")
PREDICT_SMOKE = ("bench_predict.py", "--models", "prima-lite", "--series", "2", "--runs", "1", "--threads", "1")
LIME_SMOKE = ("bench_lime.py", "--models", "prima-lite", "--series", "2", "--samples", "16", "--serial", "2", "--runs",
              "1", "--threads", "1", "--ceiling-size", "256")
SKIPPED = "bf16: skipped:"

# An AVX2-only CPU, emulated on any x86 one: torch dispatches AVX2 kernels and oneDNN may not use
# AVX512-BF16/AMX, so a bf16 matmul takes its slow path (~40x slower than fp32).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="the AVX2 emulation needs an x86 CPU")


def run_benchmark(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def pinned_env() -> tuple[dict[str, str], list[str]]:
    """This CPU's decision, made here once and pinned for the benchmark (a second probe in another
    process could disagree on a CPU where bf16 and fp32 are about as fast), and the dtypes it implies."""
    fast = cpu_has_fast_bf16()
    return {**os.environ, ENV_OVERRIDE: str(int(fast))}, ["fp32", "bf16"] if fast else ["fp32"]


def model_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith("prima-lite")]


def test_model_benchmark_prints_ratio_and_peak_memory():
    env, dtypes = pinned_env()
    out = run_benchmark(*MODEL_SMOKE, env=env)
    assert "%" in out and "peak RSS" in out
    assert [row[2] for row in model_rows(out)] == dtypes  # one row (with its ratio to the ceiling) per dtype timed
    assert (SKIPPED in out) == ("bf16" not in dtypes)


def test_tokenizer_benchmark_prints_throughput_against_the_ceiling():
    env, dtypes = pinned_env()
    out = run_benchmark(*TOKENIZER_SMOKE, env=env)
    assert out.count("x ceiling") == len(dtypes)
    assert "patches/s" in out
    assert (SKIPPED in out) == ("bf16" not in dtypes)


def test_dtypes_option_forces_the_choice():
    out = run_benchmark(*TOKENIZER_SMOKE, "--dtypes", "fp32", "bf16", env={**os.environ, ENV_OVERRIDE: "0"})
    assert out.count("x ceiling") == 2 and "bf16: 256^3 matmul ceiling" in out and SKIPPED not in out
    out = run_benchmark(*MODEL_SMOKE, "--dtypes", "fp32")
    assert [row[2] for row in model_rows(out)] == ["fp32"] and SKIPPED not in out


@x86_only
def test_benchmarks_skip_bf16_on_a_cpu_without_native_bf16():
    """Under the AVX2 emulation both smoke runs leave bf16 out, say so, and finish well within
    their budget (timing bf16 there is what made the old smoke runs exceed 300 s)."""
    env = {key: value for key, value in os.environ.items() if key != ENV_OVERRIDE} | AVX2_ONLY
    model = run_benchmark(*MODEL_SMOKE, env=env, timeout=120)
    assert SKIPPED in model and "pass --dtypes fp32 bf16 to force" in model
    assert [row[2] for row in model_rows(model)] == ["fp32"]
    tokenizer = run_benchmark(*TOKENIZER_SMOKE, env=env, timeout=120)
    assert SKIPPED in tokenizer and tokenizer.count("x ceiling") == 1 and "bf16: 256" not in tokenizer


def test_predict_benchmark_splits_the_time_and_compares_the_naive_path():
    out = run_benchmark(*PREDICT_SMOKE)
    (row,) = model_rows(out)
    assert row[-1].endswith("x") and "speedup = naive path" in out


def test_preprocess_benchmark_checks_the_resize_against_scipy():
    out = run_benchmark("bench_preprocess.py", "--series", "2", "--runs", "1", "--threads", "1")
    assert "identical on 2/2 series" in out and "scipy zoom / linear_resize_axis" in out


def test_lime_benchmark_compares_batched_and_serial():
    out = run_benchmark(*LIME_SMOKE)
    (row,) = model_rows(out)
    assert row[3] == "16" and row[-3].endswith("x") and row[-1].endswith("%")


@pytest.mark.browser
def test_app_benchmark_reports_the_three_targets():
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    out = run_benchmark("bench_app.py", "--examples", "normal_dwi", "--clicks", "3", timeout=400)
    line = next(line for line in out.splitlines() if line.startswith("normal_dwi:"))
    assert "first heatmap" in line and "over 3/3 presses" in line and "peak RSS" in line


def test_load_benchmark_checks_every_answer():
    out = run_benchmark("bench_load.py", "--clients", "2", "--studies", "2", timeout=600)
    assert "2 clients x 2 studies: 12 requests" in out and ", 0 failures;" in out
    assert "p95" in out and "peak RSS" in out


def test_load_dicom_benchmark_times_load_study_against_dcm2niix():
    out = run_benchmark("bench_load_dicom.py", "--series", "2", "--slices", "8", "--matrix", "32", "--runs", "1",
                        "--threads", "1", "2", timeout=600)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["synthetic_2x8_32"], ["enhanced"],
                                                                              ["mosaic"], ["all"])]
    assert [(row[0], row[1]) for row in rows] == [(name, threads) for threads in ("1", "2")
                                                  for name in ("synthetic_2x8_32", "enhanced", "mosaic", "all")]
    assert all(row[-1].endswith("x") for row in rows) and "target <= 1.0" in out and "CPU:" in out


def test_fuzz_benchmark_reports_cases_and_failures():
    out = run_benchmark("bench_fuzz.py", "--cases", "20", "--seed", "0")
    assert "cases tried: 20" in out and "failing cases: 0" in out


def test_release_cuda_script_runs_every_stage_and_predicts(tmp_path):
    """benchmarks/release_cuda.sh with DEVICE=cpu on a tiny synthetic release: the script itself, which a
    GPU session runs in one call, must not be the part that fails there."""
    import json

    volume_tokenizer = BENCHMARKS.parent / "assets/volume-tokenizer-lite/volume_tokenizer.safetensors"
    steps = {"steps": 2, "batch_size": 4, "warmup": 1, "eval_every": 2, "log_every": 1, "precision": "fp32"}
    config = {
        "out": str(tmp_path / "unused"), "work": str(tmp_path / "unused"), "seed": 0,
        "data": {"n": 12, "seed": 3, "spacing": 6.0, "max_series": 3, "workers": 1},  # as tests/training's tiny_dataset
        "volume_tokenizer": {"weights": str(volume_tokenizer)},
        "token_cache": {"min_fraction": 0.02, "precision": "fp32", "workers": 0},
        "report_lm": steps, "series_names": {**steps, "max_tokens": 32}, "clip": {**steps, "max_tokens": 32},
        "heads": {"train_views": 1, "epochs": 2, "precision": "fp32"},
        "evaluate": {"n_boot": 5, "lime_samples": 8, "lime_max": 1, "precision": "fp32"},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "CONFIG": str(tmp_path / "tiny.json"),
           "WORK": str(tmp_path / "work"), "REPORT_DIR": str(tmp_path / "report")}
    done = subprocess.run(["bash", str(BENCHMARKS / "release_cuda.sh")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "== release built in " in done.stdout and "example predicted in " in done.stdout
    assert "## Evaluation on the test split" in done.stdout
    stages = json.loads((tmp_path / "report" / "stages.json").read_text())
    assert {"data", "token cache", "clip", "heads", "evaluate"} <= set(stages)
    prediction = json.loads((tmp_path / "report" / "prediction.json").read_text())
    assert len(prediction["diagnoses"]) == 52


def test_dicom_outputs_checks_every_object(tmp_path):
    out = run_benchmark("dicom_outputs.py", "--out", str(tmp_path / "out"), "--studies", "normal_dwi",
                        "three_plane_fixture", "--max-series", "1", "--num-samples", "16", timeout=600)
    rows = [line for line in out.splitlines() if line.startswith("| normal_dwi") or line.startswith("| three_plane")]
    assert [row.split(" | ")[3] for row in rows] == ["parametric map", "segmentation", "report (Comprehensive SR)"] * 2
    assert all(" | NO" not in row and row.endswith("| yes |") for row in rows)
