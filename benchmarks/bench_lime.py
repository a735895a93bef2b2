"""LIME over one series: the batched, token-dropping ``prima.explain`` against the serial baseline.

The serial baseline is what the paper's reference does: one full-model forward per perturbed sample
(every series through the sequence ViT, the study ViT, the heads), timed on the first ``--serial``
samples and scaled to the sample count. Same model, same study, same samples. Also printed: the FLOPs
of the batched forwards, the achieved GFLOP/s and its ratio to the matmul ceiling measured in the same
run, in the precision ``auto`` picks. The project's targets (docs/design.md section 8): prima-lite with
1000 samples <= 15 s on a 2-core CPU; prima-paper batched >= 20x the serial baseline at equal samples.

    python benchmarks/bench_lime.py [--models prima-lite prima-paper] [--samples 1000] [--serial 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from timing import DTYPES, counted_flops, machine_line, matmul_gflops, median_seconds
from workloads import study_workdir, write_release

from prima.explain import DEFAULT_BATCH_SIZE, explain, keep_masks, masked_outputs
from prima.io import load_study
from prima.precision import autocast_dtype
from prima.predict import predict_tokens
from prima.release import load_release
from prima.tokens import StudyTokens, tokenize_study

TARGET = "tumor_adult_high_grade_glioma"


def serial_seconds_per_sample(tokens: StudyTokens, release, series_index: int, masks: np.ndarray,
                              precision: str) -> float:
    """Median seconds of one full-model forward of a perturbed study (the reference's LIME loop)."""
    times = []
    for mask in masks:
        perturbed = list(tokens.series)
        perturbed[series_index] = tokens.series[series_index].subset(np.flatnonzero(mask))
        started = time.perf_counter()
        predict_tokens(StudyTokens(tokens.description, perturbed), release, precision=precision)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def bench(name: str, study_path: Path, workdir: Path, samples: int, serial: int, runs: int, device: str,
          ceiling_size: int) -> dict:
    release = load_release(write_release(workdir / name, name), device=device)
    tokens = tokenize_study(load_study(study_path), release)
    series_index = int(np.argmax([len(s) for s in tokens.series]))  # the longest series: the costliest case
    target_device = release.model.logit_scale.device
    dtype = autocast_dtype(target_device, "auto")
    batch_size = DEFAULT_BATCH_SIZE["cuda" if target_device.type == "cuda" else "cpu"]

    def batched():
        return explain(tokens, release, TARGET, series_index, num_samples=samples, device=device)

    batched_s = median_seconds(batched, runs)
    masks = keep_masks(len(tokens.series[series_index]), samples, seed=0)
    serial_masks = masks[1 : serial + 1]
    serial_seconds_per_sample(tokens, release, series_index, serial_masks[:1], "auto")  # warm-up
    per_sample = serial_seconds_per_sample(tokens, release, series_index, serial_masks, "auto")
    flops = counted_flops(release.model, lambda: masked_outputs(tokens, release, series_index, masks, TARGET,
                                                                batch_size=batch_size, dtype=dtype))
    result = {"model": name, "device": str(target_device), "precision": str(dtype or "fp32"),
              "series_tokens": len(tokens.series[series_index]), "series": len(tokens.series), "samples": samples,
              "batched_s": batched_s, "serial_s_per_sample": per_sample, "serial_s_estimate": per_sample * samples,
              "speedup": per_sample * samples / batched_s, "gflop": flops / 1e9,
              "achieved_gflops": flops / 1e9 / batched_s}
    if target_device.type == "cpu":
        result["ceiling_gflops"] = matmul_gflops(DTYPES["bf16" if dtype is not None else "fp32"], size=ceiling_size)
        result["of_ceiling"] = result["achieved_gflops"] / result["ceiling_gflops"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["prima-lite", "prima-paper"])
    parser.add_argument("--series", type=int, default=4, help="series in the synthetic study")
    parser.add_argument("--samples", type=int, default=1000, help="LIME samples of the batched explanation")
    parser.add_argument("--serial", type=int, default=20, help="samples timed one forward each (then scaled)")
    parser.add_argument("--runs", type=int, default=3, help="batched explanations timed (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ceiling-size", type=int, default=2048, help="N of the N^3 matmul ceiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads, args.device))
    header = (f"{'model':<12} {'precision':<14} {'tokens':>6} {'samples':>7} {'batched s':>9} {'serial s':>9} "
              f"{'speedup':>8} {'GFLOP/s':>8} {'of ceiling':>10}")
    with study_workdir(args.series, header) as (workdir, study_path):
        for name in args.models:
            r = bench(name, study_path, workdir, args.samples, args.serial, args.runs, args.device, args.ceiling_size)
            ceiling = f"{r['of_ceiling']:.0%}" if "of_ceiling" in r else "n/a"
            print(f"{name:<12} {r['precision']:<14} {r['series_tokens']:>6} {r['samples']:>7} {r['batched_s']:>9.2f} "
                  f"{r['serial_s_estimate']:>9.1f} {r['speedup']:>7.1f}x {r['achieved_gflops']:>8.1f} {ceiling:>10}")
            print(json.dumps(r))
    print("\nserial = one full-model forward per sample (the reference's loop), timed on --serial samples and scaled; "
          "batched includes the surrogate fit")


if __name__ == "__main__":
    main()
