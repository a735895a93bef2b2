"""VQ-VAE ``encode`` throughput on this CPU at the paper and lite widths, fp32 and bf16 autocast.

For each case it prints the median patches/second over several runs, the FLOPs of encoding one patch
(``torch.utils.flop_counter.FlopCounterMode``), the achieved GFLOP/s and its ratio to the FLOP-bound
ceiling of this machine, measured in the same run as a 2048^3 matmul in the same dtype.
docs/design.md §8: the reference encodes 12.6 patches/s at paper size, fp32, on this machine.

bf16 is timed by default only where the CPU has native bf16 (``prima.precision.cpu_has_fast_bf16``;
without it a bf16 matmul runs ~40x slower than fp32); ``--dtypes fp32 bf16`` forces both.

    python benchmarks/bench_volume_tokenizer.py [--batch 32] [--runs 3] [--threads N] [--dtypes fp32 bf16]
                                         [--widths paper lite] [--ceiling-size 2048]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from timing import add_dtypes_option, choose_dtypes, matmul_gflops, median_seconds

from prima.config import VolumeTokenizerConfig
from prima.models.vqvae import VQVAE
from prima.precision import autocast

# (name, channels, residual blocks per level): the paper's width and the lite tokenizer's (docs/volume_tokenizer.md).
WIDTHS = (("paper", 256, 2), ("lite", 32, 1))


@torch.no_grad()
def encode_case(channels: int, res_layers: int, dtype, batch: int, runs: int) -> dict:
    torch.manual_seed(0)
    model = VQVAE(VolumeTokenizerConfig(channels=channels, res_layers=res_layers)).eval()
    patches = torch.rand(batch, 32, 32, 4)

    def encode():
        with autocast("cpu", dtype):
            return model.encode(patches)

    with FlopCounterMode(display=False) as counter:
        encode()
    seconds = median_seconds(encode, runs)
    return {
        "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        "total_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_per_patch": counter.get_total_flops() / batch / 1e9,
        "patches_per_s": batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="patches per encode call")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    add_dtypes_option(parser)
    parser.add_argument("--widths", nargs="+", choices=[w[0] for w in WIDTHS], default=[w[0] for w in WIDTHS],
                        help="tokenizer widths to encode (paper: ~12 GFLOP per patch, lite: ~0.13)")
    parser.add_argument("--ceiling-size", type=int, default=2048, help="N of the N^3 matmul ceiling")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.runs}")
    dtypes, skipped = choose_dtypes(args.dtypes)
    if skipped:
        print(skipped)
    results = []
    for dtype_name, dtype in dtypes.items():
        ceiling = matmul_gflops(dtype, args.runs, args.ceiling_size)
        print(f"{dtype_name}: {args.ceiling_size}^3 matmul ceiling {ceiling:.1f} GFLOP/s")
        for name, channels, res_layers in [w for w in WIDTHS if w[0] in args.widths]:
            case = encode_case(channels, res_layers, dtype, args.batch, args.runs)
            achieved = case["gflop_per_patch"] * case["patches_per_s"]
            case.update(width=name, channels=channels, dtype=dtype_name, ceiling_gflops=ceiling,
                        achieved_gflops=achieved, ratio_to_ceiling=achieved / ceiling)
            results.append(case)
            print(
                f"  {name:5s} C={channels:3d}: {case['patches_per_s']:8.1f} patches/s, "
                f"{case['gflop_per_patch']:.3f} GFLOP/patch, {achieved:6.1f} GFLOP/s = "
                f"{achieved / ceiling:.2f} x ceiling (encoder {case['encoder_params_m']:.2f} M params, "
                f"total {case['total_params_m']:.2f} M)"
            )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
