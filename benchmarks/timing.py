"""Timing helpers shared by the benchmarks: medians, which dtypes to time, FLOP counts and the matmul ceiling.

Autocast by dtype lives in ``prima.precision.autocast`` (the inference code uses the same helper).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prima.precision import cpu_capability, cpu_has_fast_bf16, describe_cpu_bf16

# The precisions the benchmarks can compare; None = plain fp32 (autocast off).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def add_dtypes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=None,
        help="precisions to time (default: fp32, plus bf16 where this CPU has native bf16; "
             "a bf16 matmul without it runs ~40x slower than fp32)",
    )


def choose_dtypes(requested: list[str] | None) -> tuple[dict[str, torch.dtype | None], str | None]:
    """The dtypes to time, in ``DTYPES`` order, and a line saying why bf16 was left out (or None).

    ``requested`` (``--dtypes``) is taken as given; by default fp32 always and bf16 only when
    ``prima.precision.cpu_has_fast_bf16()``."""
    if requested is not None:
        return {name: dtype for name, dtype in DTYPES.items() if name in requested}, None
    if cpu_has_fast_bf16():
        return dict(DTYPES), None
    skipped = f"bf16: skipped: {describe_cpu_bf16()}; pass --dtypes fp32 bf16 to force"
    return {name: dtype for name, dtype in DTYPES.items() if name != "bf16"}, skipped


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


def matmul_gflops(dtype: torch.dtype | None, runs: int = 5, size: int = 2048) -> float:
    """GFLOP/s of a size^3 matmul in ``dtype`` (fp32 when None): this machine's FLOP-bound ceiling."""
    a = torch.randn(size, size, dtype=dtype or torch.float32)
    b = torch.randn(size, size, dtype=dtype or torch.float32)
    return 2 * size**3 / median_seconds(lambda: a @ b, runs) / 1e9


def counted_flops(model: nn.Module, fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()``: matmuls counted by FlopCounterMode plus the attention products of ``model``'s
    attention layers (4 * B * H * T^2 * head_dim per call), which the counter does not see for CPU SDPA."""
    from prima.models.transformer import Attention

    attention = []

    def hook(module, args, output):
        x = args[0]
        head_dim = module.to_qkv.out_features // 3 // module.heads
        attention.append(4 * x.shape[0] * module.heads * x.shape[1] ** 2 * head_dim)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() + sum(attention)


def machine_line(threads: int, device: str) -> str:
    """What a benchmark ran on: torch, the CPU capability and its bf16 decision, threads, device."""
    return (f"torch {torch.__version__}, CPU capability {cpu_capability()}, {threads} threads, device {device}; "
            f"{describe_cpu_bf16()}")
