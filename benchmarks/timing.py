"""Timing helpers shared by the benchmarks: medians, autocast by name, and the matmul ceiling."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# The precisions every benchmark compares; None = plain fp32 (autocast off).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` over ``runs`` calls, after one untimed warm-up call
    (allocator, thread pool and kernel selection settle in the first call)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_autocast(dtype: torch.dtype | None):
    """CPU autocast to ``dtype``, or a disabled autocast for fp32."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def matmul_gflops(dtype: torch.dtype | None, runs: int = 5, size: int = 2048) -> float:
    """GFLOP/s of a size^3 matmul in ``dtype`` (fp32 when None): this machine's FLOP-bound ceiling."""
    a = torch.randn(size, size, dtype=dtype or torch.float32)
    b = torch.randn(size, size, dtype=dtype or torch.float32)
    return 2 * size**3 / median_seconds(lambda: a @ b, runs) / 1e9
