"""hViT study forward on this CPU: 4 series x 400 tokens at prima-paper and prima-lite, fp32 and bf16.

For each model and thread count it prints the median forward time, the FLOPs of one forward, the
achieved GFLOP/s and their ratio to the FLOP-bound ceiling (a 2048^3 matmul in the same dtype and
thread count, timed in the same process around the model), and the peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh process per case, so cases do not share a
peak. docs/design.md §8: the reference takes 1.45 s at paper size, fp32, 2 threads.

bf16 is timed by default only where the CPU has native bf16 (``prima.precision.cpu_has_fast_bf16``;
without it a bf16 matmul runs ~40x slower than fp32); ``--dtypes fp32 bf16`` forces both.

    python benchmarks/bench_model.py [--series 4] [--tokens 400] [--runs 5] [--threads 1 2]
                                     [--models prima-paper prima-lite] [--dtypes fp32 bf16] [--ceiling-size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from timing import DTYPES, add_dtypes_option, choose_dtypes, counted_flops, matmul_gflops, median_seconds

from prima.precision import autocast


def bench_model(name: str, series: int, tokens: int, runs: int, threads: int, dtypes: list[str],
                ceiling_size: int) -> dict:
    from prima.factory import get_model_config
    from prima.models.clip import PrimaCLIP

    torch.set_num_threads(threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = PrimaCLIP(get_model_config(name)).eval()
    study = [(torch.randn(tokens, 289), f"AX T{i}") for i in range(series)]
    batch = model.pack([study], ["MRI BRAIN WITH AND WITHOUT CONTRAST"])
    flops = counted_flops(model.visual, lambda: model.visual(batch))
    result = {"model": name, "flops": flops, "rss_start_mb": rss_start / 1024, "times": {}, "ceiling": {}}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]

        def forward():
            with torch.no_grad(), autocast("cpu", dtype):
                model.visual(batch)

        # the machine is shared: time the ceiling just before and after the model and average
        before = matmul_gflops(dtype, size=ceiling_size)
        result["times"][dtype_name] = median_seconds(forward, runs)
        result["ceiling"][dtype_name] = (before + matmul_gflops(dtype, size=ceiling_size)) / 2
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["prima-paper", "prima-lite"])
    # a shared machine punishes multi-threaded small ops (OpenMP barriers wait for a busy core): show both
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()])
    add_dtypes_option(parser)
    parser.add_argument("--ceiling-size", type=int, default=2048, help="N of the N^3 matmul ceiling")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: bench one model in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(bench_model(args.child, args.series, args.tokens, args.runs, args.threads[0],
                                     list(choose_dtypes(args.dtypes)[0]), args.ceiling_size)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    dtypes, skipped = choose_dtypes(args.dtypes)  # decided once here, passed to every child
    if skipped:
        print(skipped)
    print(f"study: {args.series} series x {args.tokens} tokens, median of {args.runs} runs after a warm-up")
    print(f"ceiling: {args.ceiling_size}^3 matmul in the same dtype, timed right before and after the model, "
          "averaged\n")
    header = (
        f"{'model':<12} {'thr':>3} {'dtype':<5} {'GFLOP':>7} {'median s':>9} {'GFLOP/s':>8} {'ceiling':>8} "
        f"{'of ceiling':>10} {'peak RSS MB':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, threads in [(name, threads) for name in args.models for threads in args.threads]:
        child = [sys.executable, __file__, "--child", name, "--series", str(args.series), "--tokens", str(args.tokens),
                 "--runs", str(args.runs), "--threads", str(threads), "--dtypes", *dtypes,
                 "--ceiling-size", str(args.ceiling_size)]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        for dtype_name, seconds in result["times"].items():
            achieved = result["flops"] / seconds / 1e9
            ceiling = result["ceiling"][dtype_name]
            print(
                f"{name:<12} {threads:>3} {dtype_name:<5} {result['flops'] / 1e9:>7.1f} {seconds:>9.3f} "
                f"{achieved:>8.1f} {ceiling:>8.1f} {achieved / ceiling:>10.1%} {result['peak_rss_mb']:>12.0f}"
            )
    print(
        "\npeak RSS: ru_maxrss of a fresh process per model and thread count (Python + torch + model + "
        f"activations, every dtype timed); the process baseline before building the model is "
        f"~{result['rss_start_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
