"""prima.precision: the precision choice ("auto" picks bf16 only on hardware with native bf16), the
PRIMA_CPU_BF16 override, the capability gate and timing probe, and the autocast helper."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from prima import precision
from prima.precision import autocast, autocast_dtype, cpu_has_fast_bf16

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="the AVX2 emulation needs an x86 CPU")


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Set what the probe says (no timing) and clear PRIMA_CPU_BF16."""
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)

    def set_fast(fast: bool) -> None:
        monkeypatch.setattr(precision, "bf16_probe", lambda: precision.Bf16Probe("AVX512", fast=fast))

    return set_fast


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda", "cuda:1", "meta"])
def test_explicit_precisions_are_taken_as_given(device, cpu_bf16):
    cpu_bf16(False)
    assert autocast_dtype(device, "fp32") is None
    assert autocast_dtype(device, "bf16") is torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_follows_the_probe(fast, cpu_bf16):
    cpu_bf16(fast)
    expected = torch.bfloat16 if fast else None
    assert autocast_dtype("cpu") is expected and autocast_dtype(torch.device("cpu"), "auto") is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_needs_native_bf16(native, cpu_bf16, monkeypatch):
    cpu_bf16(not native)  # the CPU's answer must not matter
    seen = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: seen.append(
        including_emulation) or native)
    assert autocast_dtype("cuda:0") is (torch.bfloat16 if native else None)
    assert seen == [False]


def test_auto_elsewhere_is_fp32(cpu_bf16):
    cpu_bf16(True)
    assert autocast_dtype("meta") is None


@pytest.mark.parametrize("bad", ["fp16", "float32", "BF16", "", None])
def test_unknown_precision_names_the_choices(bad):
    with pytest.raises(ValueError, match="'auto', 'fp32', 'bf16'"):
        autocast_dtype("cpu", bad)


def test_env_override_skips_the_probe(monkeypatch):
    def no_probe():
        raise AssertionError("the probe ran despite PRIMA_CPU_BF16")

    monkeypatch.setattr(precision, "bf16_probe", no_probe)
    monkeypatch.setenv("PRIMA_CPU_BF16", "1")
    assert cpu_has_fast_bf16() is True and autocast_dtype("cpu") is torch.bfloat16
    assert "PRIMA_CPU_BF16=1" in precision.describe_cpu_bf16()
    monkeypatch.setenv("PRIMA_CPU_BF16", " 0 ")
    assert cpu_has_fast_bf16() is False and autocast_dtype("cpu") is None


def test_empty_env_override_means_measure(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    monkeypatch.setenv("PRIMA_CPU_BF16", "")
    assert cpu_has_fast_bf16() is True


@pytest.mark.parametrize("bad", ["yes", "true", "2"])
def test_bad_env_override_raises(bad, monkeypatch):
    monkeypatch.setenv("PRIMA_CPU_BF16", bad)
    with pytest.raises(ValueError, match="PRIMA_CPU_BF16 must be 0 or 1"):
        cpu_has_fast_bf16()


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT", "NO AVX", "VSX", "Z VECTOR"])
def test_capabilities_without_bf16_are_slow_without_timing(capability):
    def no_timer(dtype):
        raise AssertionError("timed a matmul on a CPU that cannot have native bf16")

    probe = precision._run_probe(capability, no_timer)
    assert not probe.fast and probe.ratio is None
    assert probe.describe() == f"this CPU ({capability}) has no native bf16"


@pytest.mark.parametrize(("capability", "bf16_s", "fast"), [
    ("AVX512", 0.25e-3, True),   # native AVX512-BF16 (measured here: 0.2-0.3 x fp32)
    ("AVX512", 1.0e-3, True),    # exactly as fast as fp32: FAST_BF16_MAX_RATIO
    ("AVX512", 1.5e-3, False),   # AVX512 without BF16: oneDNN converts to fp32
    ("AVX512", 40e-3, False),    # the reference path (AVX2 emulation here: ~40x)
    ("SVE256", 0.5e-3, True),
])
def test_capable_cpus_are_decided_by_timing(capability, bf16_s, fast):
    times = {torch.float32: 1e-3, torch.bfloat16: bf16_s}
    probe = precision._run_probe(capability, times.__getitem__)
    assert probe.fast is fast and probe.ratio == pytest.approx(bf16_s / 1e-3)
    assert ("has native bf16" if fast else "has no native bf16") in probe.describe()


def test_a_failing_bf16_matmul_means_slow():
    def timer(dtype):
        if dtype is torch.bfloat16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'\nmore")
        return 1e-3

    probe = precision._run_probe("AVX512", timer)
    assert not probe.fast and "not implemented" in probe.describe()


def test_probe_is_cheap_cached_and_leaves_no_trace(monkeypatch):
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    seconds = precision._best_matmul_seconds(torch.bfloat16)
    assert 0 < seconds < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast does not leak into the probe
        assert precision._best_matmul_seconds(torch.float32) > 0
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert precision.bf16_probe() is precision.bf16_probe()


def test_autocast_helper():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("cpu", None):  # fp32 even inside an outer autocast
        assert (a @ b).dtype == torch.float32


REPORT = """
import json, sys, time
start = time.perf_counter()
import prima.precision as p
loaded = sorted(m for m in sys.modules if m.startswith("prima") or m in ("transformers", "gradio", "scipy"))
probed_at_import = p.bf16_probe.cache_info().currsize
start = time.perf_counter()
fast = p.cpu_has_fast_bf16()
print(json.dumps({"fast": fast, "why": p.describe_cpu_bf16(), "capability": p.cpu_capability(),
                  "probe_s": time.perf_counter() - start, "loaded": loaded, "probed_at_import": probed_at_import}))
"""


def report(extra_env: dict[str, str]) -> dict:
    env = {key: value for key, value in os.environ.items() if key != precision.ENV_OVERRIDE} | extra_env
    done = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_import_is_cheap_and_this_cpu_is_reported():
    """Not asserted either way: CI may run on an AVX2-only CPU. Shown with ``pytest -s`` or ``-rA``."""
    result = report({})
    assert result["loaded"] == ["prima", "prima.precision"] and result["probed_at_import"] == 0
    assert isinstance(result["fast"], bool) and result["probe_s"] < 1.0
    print(f"\nthis CPU: cpu_has_fast_bf16() = {result['fast']} ({result['why']}; probe {result['probe_s']:.3f} s)")


@x86_only
def test_emulated_avx2_cpu_has_no_fast_bf16():
    result = report(AVX2_ONLY)
    assert result["capability"] == "AVX2" and result["fast"] is False
    print(f"\nAVX2 emulation: {result['why']} (decided in {result['probe_s']:.3f} s)")


@x86_only
def test_the_probe_catches_slow_bf16_behind_an_avx512_capability():
    """oneDNN limited to AVX2 while torch still reports AVX512 (like an AVX512 CPU without BF16):
    the capability gate passes, the timing must say no, within the probe's budget."""
    result = report({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result["fast"] is False and result["probe_s"] < 1.0
    print(f"\noneDNN limited to AVX2: {result['why']} (probe {result['probe_s']:.3f} s)")
