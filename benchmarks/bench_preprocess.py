"""The numpy half of the tokens path per series: resample, normalise, foreground fractions, next to the
VQ-VAE encoding, and its one-axis resizes against the scipy call it replaced.

For every series of a synthetic DICOM study (``workloads.write_study``) it prints the median of
``--runs`` timings (after a warm-up call) of ``prima.preprocess.resample_series`` on the reoriented
array; of its one-axis resizes (each axis it resizes, to its output size, applied alone to that
array) by ``linear_resize_axis`` and by ``scipy.ndimage.zoom`` (order 1, grid mode, nearest edges:
what ``linear_resize_axis`` reproduces bit for bit, checked here on every resize); of
``normalize_intensity``, ``foreground_fractions`` and of encoding the kept patches with the shipped
lite volume tokenizer in the precision ``auto`` picks. Exits non-zero when a resize differs from scipy's.

    python benchmarks/bench_preprocess.py [--series 4] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from scipy import ndimage

from timing import machine_line, median_seconds
from workloads import SHIPPED_LITE, study_workdir

from prima import preprocess
from prima.factory import get_model_config
from prima.io import load_study
from prima.patching import foreground_fractions, patchify, select_tokens
from prima.release import load_volume_tokenizer
from prima.tokens import encode_patches


def scipy_resize_axis(array: np.ndarray, axis: int, new_size: int) -> np.ndarray:
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = new_size / array.shape[axis]
    return ndimage.zoom(array, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)


def bench_series(series, config, volume_tokenizer, runs: int) -> dict:
    settings = config.preprocess
    array, affine = preprocess.reorient_to_lps(series.array, series.affine)
    through_axis = preprocess.detect_plane(affine, array.shape)[1]

    def resample():
        return preprocess.resample_series(array, affine, through_axis, settings.in_plane_size,
                                          settings.min_slice_spacing_mm)

    resampled, _ = resample()
    # each axis that resample_series resizes, to its output size, applied alone to the reoriented array
    sizes = {axis: size for axis, size in enumerate(resampled.shape) if size != array.shape[axis]}
    identical = all(np.array_equal(preprocess.linear_resize_axis(array, axis, size),
                                   scipy_resize_axis(array, axis, size)) for axis, size in sizes.items())
    resize_s, scipy_s = (sum(median_seconds(lambda: function(array, axis, size), runs) for axis, size in sizes.items())
                         for function in (preprocess.linear_resize_axis, scipy_resize_axis))
    normalised = preprocess.normalize_intensity(resampled, settings.intensity_low_percentile,
                                                settings.intensity_high_percentile, settings.foreground_only)
    patch_size = config.volume_tokenizer.patch_size
    patches, _ = patchify(normalised, through_axis, patch_size)
    fractions = foreground_fractions(normalised, through_axis, patch_size)
    kept = patches[select_tokens(fractions, config.volume_tokenizer.min_foreground_fraction,
                                 config.volume_tokenizer.min_tokens)]
    return {"series": series.name, "shape": list(array.shape), "resampled": list(resampled.shape),
            "identical": identical, "resample_s": median_seconds(resample, runs), "resize_s": resize_s,
            "scipy_resize_s": scipy_s,
            "normalize_s": median_seconds(lambda: preprocess.normalize_intensity(
                resampled, settings.intensity_low_percentile, settings.intensity_high_percentile,
                settings.foreground_only), runs),
            "fractions_s": median_seconds(lambda: foreground_fractions(normalised, through_axis, patch_size), runs),
            "tokens": len(kept), "encode_s": median_seconds(lambda: encode_patches(volume_tokenizer, kept), runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4, help="series in the synthetic study")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per step (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads, "cpu"))
    config = get_model_config("prima-lite")
    volume_tokenizer = load_volume_tokenizer(SHIPPED_LITE)
    header = (f"{'series':<22} {'resampled':>14} {'resample s':>10} {'resize s':>8} {'scipy s':>8} {'ratio':>6} "
              f"{'normalize s':>11} {'fractions s':>11} {'tokens':>6} {'encode s':>8}")
    rows = []
    with study_workdir(args.series, header) as (_, study_path):
        for series in load_study(study_path).series:
            row = bench_series(series, config, volume_tokenizer, args.runs)
            rows.append(row)
            ratio = f"{row['scipy_resize_s'] / row['resize_s']:>5.1f}x" if row["resize_s"] else f"{'-':>6}"
            print(f"{row['series'][:22]:<22} {'x'.join(map(str, row['resampled'])):>14} {row['resample_s']:>10.3f} "
                  f"{row['resize_s']:>8.3f} {row['scipy_resize_s']:>8.3f} {ratio} "
                  f"{row['normalize_s']:>11.3f} {row['fractions_s']:>11.3f} {row['tokens']:>6} {row['encode_s']:>8.3f}")
    print(json.dumps(rows))
    resize_s = sum(r["resize_s"] for r in rows)
    ratio = f"{sum(r['scipy_resize_s'] for r in rows) / resize_s:.1f}x" if resize_s else "- (no series needed one)"
    print(f"\none-axis resizes: scipy zoom / linear_resize_axis = {ratio} over the study; "
          f"identical on {sum(r['identical'] for r in rows)}/{len(rows)} series")
    if not all(r["identical"] for r in rows):
        print("linear_resize_axis differs from scipy.ndimage.zoom", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
