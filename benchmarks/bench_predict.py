"""``prima.predict`` latency on a 4-series synthetic DICOM study: load, tokens and model, per model config.

For each model (random weights; prima-lite uses the shipped lite volume tokenizer, prima-paper a
random paper-width one) it prints the median of ``--runs`` predictions after a warm-up, split into
load / tokens / model, in the precision ``auto`` picks on this machine, and the same study through the
naive path the paper's reference takes: every patch of every series (background included) encoded
one series at a time in fp32, then the model. The project's targets (docs/design.md section 8):
prima-lite <= 3 s per study on a 2-core CPU; prima-paper predict >= 3x faster than the naive path.

    python benchmarks/bench_predict.py [--models prima-lite prima-paper] [--runs 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from timing import machine_line
from workloads import study_workdir, write_release

from prima.io import load_study
from prima.precision import autocast_dtype
from prima.predict import predict, predict_tokens
from prima.release import load_release
from prima.tokens import SeriesTokens, StudyTokens, encode_patches, series_patches


def naive_prediction(study, release) -> dict[str, float]:
    """Every patch of every series encoded (background included), one series per VQ-VAE call, fp32."""
    started = time.perf_counter()
    tokens = []
    for series in study.series:
        patches = series_patches(series, release.config)
        codes, latents = encode_patches(release.volume_tokenizer, patches.patches, batch_size=len(patches.patches),
                                        precision="fp32")
        every = np.arange(len(patches.patches))
        tokens.append(SeriesTokens(patches.name, patches.plane, patches.through_axis, patches.shape, patches.affine,
                                   patches.fractions, every, patches.coords, codes, latents))
    tokens_s = time.perf_counter() - started
    prediction = predict_tokens(StudyTokens(study.description, tokens), release, precision="fp32")
    return {"tokens": tokens_s, "model": prediction.timings_s["model"], "total": time.perf_counter() - started}


def median_timings(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def bench(name: str, study_path: Path, workdir: Path, runs: int, device: str) -> dict:
    release = load_release(write_release(workdir / name, name), device=device)
    predict(study_path, release, device=device)  # warm-up: allocator, thread pool, kernel selection
    timings = median_timings([predict(study_path, release, device=device).timings_s for _ in range(runs)])
    study = load_study(study_path)
    prediction = predict(study, release, device=device)
    naive = median_timings([naive_prediction(study, release) for _ in range(max(1, runs // 2))])
    return {"model": name, "precision": str(autocast_dtype(release.model.logit_scale.device, "auto") or "fp32"),
            "series": len(prediction.series), "tokens_kept": sum(s.tokens_kept for s in prediction.series),
            "tokens_total": sum(s.tokens_total for s in prediction.series), "predict_s": timings,
            "naive_s": naive, "speedup": naive["total"] / (timings["total"] - timings.get("load", 0.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["prima-lite", "prima-paper"])
    parser.add_argument("--series", type=int, default=4, help="series in the synthetic study")
    parser.add_argument("--runs", type=int, default=3, help="timed predictions per model (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads, args.device))
    header = (f"{'model':<12} {'precision':<14} {'series':>6} {'tokens kept':>12} {'load s':>7} {'tokens s':>9} "
              f"{'model s':>8} {'total s':>8} {'naive s':>8} {'speedup':>8}")
    with study_workdir(args.series, header) as (workdir, study_path):
        for name in args.models:
            result = bench(name, study_path, workdir, args.runs, args.device)
            t = result["predict_s"]
            print(f"{name:<12} {result['precision']:<14} {result['series']:>6} "
                  f"{result['tokens_kept']:>5}/{result['tokens_total']:<6} {t.get('load', 0):>7.2f} {t['tokens']:>9.2f} "
                  f"{t['model']:>8.3f} {t['total']:>8.2f} {result['naive_s']['total']:>8.2f} {result['speedup']:>7.1f}x")
            print(json.dumps(result))
    print("\nspeedup = naive path (every patch, one series at a time, fp32) / predict without loading, same study")


if __name__ == "__main__":
    main()
