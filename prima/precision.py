"""Which precision to compute in: fp32, or bf16 autocast where the hardware does bf16 natively.

bf16 autocast pays only on hardware with native bf16 arithmetic. On CUDA that is compute capability
8.0 and newer (Ampere on); on a CPU it is AVX512-BF16 or AMX (x86) or SVE with its BF16 extension
(Arm), where a bf16 matmul runs 2-4x faster than fp32. A CPU without it (AVX2-only, or
AVX512 without the BF16 extension) still *runs* bf16 matmuls through oneDNN's reference path, about
40x slower than fp32 (2.6 vs 110 GFLOP/s on one core here, emulated with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), so "auto" must not pick bf16 there.

No cheap flag says which case a CPU is in: ``torch.backends.cpu.get_cpu_capability()`` reports
"AVX512" for every AVX512 CPU, with or without BF16, and keeps reporting it when oneDNN is limited
with ``ONEDNN_MAX_CPU_ISA=AVX2``. :func:`cpu_has_fast_bf16` therefore combines the capability (a
gate) with a short timing probe (the decision), measured once per process and only when first asked:
``import prima.precision`` costs nothing beyond torch itself.

Environment: ``PRIMA_CPU_BF16=1`` (or ``0``) declares the CPU fast (or slow) at bf16 and skips the
probe, for people who know their hardware better than a 0.1 s measurement does; unset or empty means
"measure". Any other value raises ``ValueError``.

    dtype = autocast_dtype(device, precision)       # "auto" | "fp32" | "bf16" -> torch.bfloat16 or None
    with torch.no_grad(), autocast(device, dtype):  # None: autocast explicitly off, i.e. fp32
        model(batch)
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

PRECISIONS = ("auto", "fp32", "bf16")
ENV_OVERRIDE = "PRIMA_CPU_BF16"

# Capabilities torch reports (torch 2.13, ATen/native/DispatchStub.h): "DEFAULT", "AVX2", "AVX512"
# (x86), "SVE256"/"SVE128" (Arm with SVE), "VSX", "Z VECTOR", "NO AVX". Only these prefixes can
# have native bf16; "AMX" is listed for a future torch that reports it as a level of its own.
FAST_BF16_CAPABILITY_PREFIXES = ("AVX512", "AMX", "SVE")

# The probe: best-of time of a PROBE_SIZE^3 matmul (33.6 MFLOP) in fp32 and in bf16, each after one
# untimed warm-up call, stopping a dtype's timed calls once PROBE_BUDGET_S is spent: a slow bf16 path
# costs the warm-up, the budget and one call more (~0.1 s in all here at 12 ms a call; on a CPU ten
# times slower, warm-up plus one call, ~0.25 s). bf16 counts as fast when its time is at most
# FAST_BF16_MAX_RATIO x the fp32 time, i.e. "at least as fast as fp32". Measured here: 0.2-0.3 with
# native bf16, ~40 without; AVX512 CPUs without BF16 (oneDNN converts to fp32 and computes there)
# are expected around or above 1, where fp32 serves as well without the bf16 rounding.
PROBE_SIZE = 256
PROBE_RUNS = 5
PROBE_BUDGET_S = 0.05
FAST_BF16_MAX_RATIO = 1.0


@dataclass(frozen=True)
class Bf16Probe:
    """What :func:`bf16_probe` measured. Times are best-of seconds of one ``PROBE_SIZE``^3 matmul,
    None where not measured (a capability without bf16 needs no timing)."""

    capability: str
    fast: bool
    fp32_s: float | None = None
    bf16_s: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """bf16 time / fp32 time (below 1: bf16 is faster)."""
        if self.fp32_s is None or self.bf16_s is None:
            return None
        return self.bf16_s / self.fp32_s

    def describe(self) -> str:
        """One line on the decision, e.g. "this CPU (AVX2) has no native bf16"."""
        cpu = f"this CPU ({self.capability})"
        if self.error is not None:
            return f"{cpu} failed the bf16 matmul probe ({self.error})"
        if self.ratio is None:
            return f"{cpu} has no native bf16"
        timing = f"a {PROBE_SIZE}^3 bf16 matmul takes {self.ratio:.2f}x the fp32 time"
        return f"{cpu} has native bf16: {timing}" if self.fast else f"{cpu} has no native bf16: {timing}"


def cpu_capability() -> str:
    """The SIMD level torch dispatches CPU kernels for: "AVX2", "AVX512", "SVE256", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def _best_matmul_seconds(dtype: torch.dtype, size: int = PROBE_SIZE, runs: int = PROBE_RUNS,
                         budget_s: float = PROBE_BUDGET_S) -> float:
    """Best wall time of a size^3 matmul in ``dtype`` over at most ``runs`` calls after one warm-up
    call (oneDNN builds its kernel there), stopping once ``budget_s`` of timed calls is spent."""
    generator = torch.Generator().manual_seed(0)  # leave the global RNG alone
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    # One thread: the kernel's speed per core is the question, and on a busy machine OpenMP barriers
    # waiting for a loaded core make multi-threaded small matmuls 100x slower at random.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # an outer autocast would turn the fp32 matmul into a bf16 one
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            a @ b
            best, spent = math.inf, 0.0
            for _ in range(runs):
                start = time.perf_counter()
                a @ b
                seconds = time.perf_counter() - start
                best, spent = min(best, seconds), spent + seconds
                if spent >= budget_s:
                    break
    finally:
        torch.set_num_threads(threads)
    return best


def _run_probe(capability: str, timer: Callable[[torch.dtype], float] = _best_matmul_seconds) -> Bf16Probe:
    if not capability.upper().startswith(FAST_BF16_CAPABILITY_PREFIXES):
        return Bf16Probe(capability, fast=False)
    try:
        fp32_s = timer(torch.float32)
        bf16_s = timer(torch.bfloat16)
    except RuntimeError as error:  # a build without a CPU bf16 matmul
        return Bf16Probe(capability, fast=False, error=str(error).splitlines()[0])
    return Bf16Probe(capability, fast=bf16_s <= FAST_BF16_MAX_RATIO * fp32_s, fp32_s=fp32_s, bf16_s=bf16_s)


@functools.cache
def bf16_probe() -> Bf16Probe:
    """Measure (once per process) whether this CPU computes bf16 matmuls at least as fast as fp32.

    False without timing unless :func:`cpu_capability` can have native bf16 (AVX512*, AMX*, SVE*);
    otherwise a best-of timing of a 256^3 matmul in fp32 and bf16 on one thread (the caller's
    thread count is restored), bounded to well under 0.5 s. Ignores ``PRIMA_CPU_BF16``: see :func:`cpu_has_fast_bf16`.
    """
    return _run_probe(cpu_capability())


def _env_override() -> bool | None:
    value = os.environ.get(ENV_OVERRIDE, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_OVERRIDE} must be 0 or 1 (or unset to measure), got {value!r}")
    return value == "1"


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast speeds up this CPU: ``PRIMA_CPU_BF16`` when set to 0 or 1, else the
    cached :func:`bf16_probe` (the capability gate, then bf16 at least as fast as fp32)."""
    override = _env_override()
    return override if override is not None else bf16_probe().fast


def describe_cpu_bf16() -> str:
    """One line on why :func:`cpu_has_fast_bf16` says what it says (runs the probe if needed)."""
    override = _env_override()
    if override is not None:
        return f"{ENV_OVERRIDE}={int(override)} says this CPU ({cpu_capability()}) is {'fast' if override else 'slow'} at bf16"
    return bf16_probe().describe()


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means fp32 (autocast off).

    "fp32" -> None; "bf16" -> torch.bfloat16 wherever asked; "auto" -> bf16 on CUDA devices with
    native bf16 (compute capability 8.0+; checked on the current CUDA device) and on CPUs where
    :func:`cpu_has_fast_bf16`, else None (also on any other device type).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` on ``device``'s type to ``dtype``; for None an autocast explicitly
    *disabled*, so fp32 stays fp32 even inside an outer autocast."""
    kind = torch.device(device).type
    if dtype is None:
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=dtype)
