"""The benchmark scripts run end to end on tiny sizes (their figures are not checked: speed is for
benchmarks, not tests), so they do not rot between releases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_model_benchmark_prints_ratio_and_peak_memory():
    out = run_benchmark("bench_model.py", "--models", "prima-lite", "--series", "2", "--tokens", "16",
                        "--runs", "1", "--threads", "1")
    assert "prima-lite" in out and "%" in out and "peak RSS" in out


def test_tokenizer_benchmark_prints_throughput_against_the_ceiling():
    out = run_benchmark("bench_tokenizer.py", "--batch", "2", "--runs", "1", "--threads", "1")
    assert out.count("x ceiling") == 4
    assert "patches/s" in out
