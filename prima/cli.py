"""The ``prima`` command line: ``inspect``, ``predict``, ``explain``, ``embed``, ``predict-batch`` (docs/cli.md).

Heavy modules (torch, the model) are imported inside the commands that need them, so ``prima inspect``
and ``prima --help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prima.config import GRIDS
from prima.errors import PrimaError, ReleaseError

if TYPE_CHECKING:  # the model modules load torch, which `prima inspect` and `--help` do without
    from prima.explain import Explanation
    from prima.io import Series, Study
    from prima.predict import Prediction
    from prima.tokens import SeriesTokens, StudyTokens

# The release the repository ships (added by the training work); ``PRIMA_WEIGHTS`` or ``--weights`` win over it.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "weights" / "prima-lite"
WEIGHTS_ENV = "PRIMA_WEIGHTS"
DEVICES = ("auto", "cpu", "cuda")


def _fmt_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in spacing)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, header first."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [headers, *rows]]


def _study_source(paths: Sequence[str]) -> str | Sequence[str]:
    """One path as itself (a folder or zip), several as a list (NIfTI or loose DICOM files)."""
    return paths if len(paths) > 1 else paths[0]


def _inspect(args: argparse.Namespace) -> int:
    from prima.io import load_study
    from prima.preprocess import PreprocessConfig, grid_anchor, preprocess_series

    study = load_study(_study_source(args.study))
    config = PreprocessConfig(in_plane_size=args.in_plane_size, min_slice_spacing_mm=args.min_slice_spacing,
                              grid=args.grid)
    head_centre = grid_anchor(study.series, config) if args.preprocessed else None
    rows = []
    for series in study.series:
        row = {"name": series.name, "plane": series.plane, "shape": list(series.shape),
               "spacing_mm": [round(v, 4) for v in series.spacing], "orientation": series.source_orientation,
               "source": series.source}
        if args.preprocessed:
            processed = preprocess_series(series, config, head_centre)
            row["preprocessed_shape"] = list(processed.shape)
            row["preprocessed_spacing_mm"] = [round(v, 4) for v in processed.spacing]
        rows.append(row)
    skipped = [{"name": s.name, "reason": s.reason, "source": s.source} for s in study.skipped]
    if args.json:
        print(json.dumps({"study": {"description": study.description, "source": study.source},
                          "series": rows, "skipped": skipped}, indent=2))
        return 0
    print(f"Study: {study.description or '(no description)'}  [{study.source}]")
    headers = ["name", "plane", "shape", "spacing (mm)", "orientation"]
    if args.preprocessed:
        headers += ["preprocessed shape", "preprocessed spacing (mm)"]
    table = []
    for row in rows:
        cells = [row["name"], row["plane"], " x ".join(map(str, row["shape"])), _fmt_spacing(row["spacing_mm"]),
                 row["orientation"]]
        if args.preprocessed:
            cells += [" x ".join(map(str, row["preprocessed_shape"])), _fmt_spacing(row["preprocessed_spacing_mm"])]
        table.append(cells)
    print("\n".join(_table(headers, table)))
    if skipped:
        print(f"\nSkipped ({len(skipped)}):")
        for item in skipped:
            print(f"  {item['name']}: {item['reason']}  [{item['source']}]")
    return 0


def _weights(args: argparse.Namespace) -> str:
    """``--weights``, else ``$PRIMA_WEIGHTS``, else the repository's release; a clear error without any."""
    if args.weights:
        return args.weights
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    if DEFAULT_WEIGHTS.is_dir():
        return str(DEFAULT_WEIGHTS)
    raise ReleaseError(f"no model weights: pass --weights PATH (a release folder) or --weights "
                       f"hf://owner/repo[@revision], or set {WEIGHTS_ENV}; the repository ships no release at "
                       f"{DEFAULT_WEIGHTS} yet")


def _prob(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def _prediction_lines(prediction: Prediction, top: int) -> list[str]:
    """The readable report of a ``prima.predict.Prediction``: study, series, differential, priority,
    referrals, timings. Thresholds are shown as probabilities so they compare with ``prob``."""
    model = prediction.model
    lines = [f"Study: {prediction.study['description'] or '(no description)'}",
             f"Model: {model['name']}" + (f" @ {model['revision']}" if model["revision"] else ""), ""]
    lines += _table(["series", "plane", "tokens kept"],
                    [[s.name, s.plane, f"{s.tokens_kept:,} of {s.tokens_total:,}"] for s in prediction.series])
    if prediction.skipped:
        lines += ["", f"Skipped ({len(prediction.skipped)}):"]
        lines += [f"  {s['name']}: {s['reason']}" for s in prediction.skipped]
    if prediction.abnormal is not None:
        lines += ["", f"Abnormal: {prediction.abnormal:.3f} (probability of any abnormality)"]
    positives = prediction.positives
    shown = prediction.differential[: max(top, len(positives))]
    lines += ["", f"Differential: top {len(shown)} of {len(prediction.diagnoses)}, {len(positives)} positive (*)"]
    lines += _table(["", "diagnosis", "key", "prob", "threshold"],
                    [["*" if d.positive else "", d.name, d.key, f"{d.prob:.3f}", f"{_prob(d.threshold):.3f}"]
                     for d in shown])
    probs = ", ".join(f"{tier} {p:.2f}" for tier, p in prediction.priority.probs.items())
    referrals = [f"{r.name} ({r.key})" for r in prediction.referrals if r.positive]
    priority = prediction.priority
    lines += ["", f"Priority: {priority.worklist_tier} (priority head: {probs})"]
    if priority.raised_by:
        names = ", ".join(prediction.raised_by_names)
        lines += [f"  raised from the priority head's {priority.tier} by positive {priority.worklist_tier}-tier "
                  f"findings: {names}; the outputs disagree, check these findings"]
    lines += [
              f"Referrals: {', '.join(referrals) if referrals else 'none'}",
              "Timings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in prediction.timings_s.items())]
    return lines


def _explanation_lines(explanation: Explanation, tokens: SeriesTokens) -> list[str]:
    """The readable summary of a LIME explanation: what was explained, how well the surrogate fits, and
    the tokens that pushed the output up most (grid coordinates and the voxel block they cover)."""
    lines = ["", f"Explanation: {explanation.target} ({explanation.target_kind}) on series {explanation.series!r}",
             f"  output {explanation.base_value:.4f}, surrogate R^2 {explanation.r2:.3f}, "
             f"{explanation.num_samples} samples, kernel width {explanation.kernel_width}, seed {explanation.seed}, "
             f"{explanation.elapsed_s:.1f} s",
             f"  top {len(explanation.top_k)} of {len(explanation.weights)} tokens (weight, patch-grid coordinate):"]
    lines += [f"    {explanation.weights[i]:+.4f}  {tuple(int(c) for c in explanation.coords[i])}"
              for i in explanation.top_k]
    return lines


def _write_heatmap(path: str, explanation: Explanation, tokens: SeriesTokens) -> Path:
    """The explanation's heatmap as NIfTI on the series' preprocessed grid (opens over the series in viewers)."""
    import nibabel as nib
    import numpy as np

    from prima.explain import heatmap

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(heatmap(explanation, tokens).astype(np.float32), np.asarray(tokens.affine)), str(out))
    return out


def input_grid_path(path: str | Path) -> Path:
    """Where the heatmap on a NIfTI input's own grid goes beside ``--heatmap PATH``: ``NAME_input_grid.nii.gz``."""
    path = Path(path)
    for suffix in (".nii.gz", ".nii"):
        if path.name.lower().endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + "_input_grid" + path.name[-len(suffix):])
    return path.with_name(path.name + "_input_grid.nii.gz")


def _heatmap_lines(path: str, explanation: Explanation, tokens: SeriesTokens, series: Series) -> list[str]:
    """Write the heatmap NIfTI on the preprocessed grid and, for a NIfTI series, also on the input file's own
    grid (same shape and affine as the input, so it overlays it voxel for voxel)."""
    lines = [f"Heatmap (NIfTI on the preprocessed series grid): {_write_heatmap(path, explanation, tokens)}"]
    if series.meta.get("format") == "nifti":
        import nibabel as nib

        from prima.explain import heatmap
        from prima.export import heatmap_on_input_grid

        array, affine = heatmap_on_input_grid(heatmap(explanation, tokens), tokens.affine, series)
        out = input_grid_path(path)
        nib.save(nib.Nifti1Image(array, affine), str(out))
        lines.append(f"Heatmap (NIfTI on the input's own grid): {out}")
    return lines


def _check_output_options(args: argparse.Namespace) -> None:
    """Refuse output options that do not go together, and a DICOM folder in the way, before any work."""
    if args.deidentify and args.dicom_out is None:
        raise ValueError("--deidentify goes with --dicom-out DIR")
    if args.dicom_out is not None:
        from prima.export import check_output_folder

        check_output_folder(args.dicom_out)


def _check_dicom_source(args: argparse.Namespace, study: Study, tokens: StudyTokens) -> None:
    """With --dicom-out: the explained series must have DICOM files to reference (checked before LIME runs)."""
    if args.dicom_out is None:
        return
    from prima.explain import _resolve_series
    from prima.export import read_source_series

    read_source_series(_study_source(args.study), study.series[_resolve_series(tokens, _series_arg(args))])


def _dicom_lines(args: argparse.Namespace, study: Study, explanation: Explanation, tokens: SeriesTokens,
                 prediction: Prediction) -> list[str]:
    from prima.export import export_dicom

    written = export_dicom(args.dicom_out, _study_source(args.study), study.series[explanation.series_index],
                           explanation, tokens, prediction, deidentify=args.deidentify)
    kinds = "parametric map, segmentation, SR" if written.segmentation is not None else "parametric map, SR"
    extra = f", de-identified with a copy of the source series ({len(written.source)} files)" if args.deidentify else ""
    return [f"DICOM ({kinds}{extra}): {written.folder}"]


def _series_arg(args: argparse.Namespace) -> str | int:
    return 0 if args.series is None else args.series


def _load_timed(args: argparse.Namespace) -> tuple[Study, float]:
    import time

    from prima.io import load_study

    started = time.perf_counter()
    study = load_study(_study_source(args.study))
    return study, time.perf_counter() - started


def _predict(args: argparse.Namespace) -> int:
    if args.embedding and args.out is None:
        raise ValueError("--embedding needs --out: the embedding is written to the prediction JSON")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    if args.explain is None and (args.series is not None or args.heatmap is not None or args.dicom_out is not None):
        raise ValueError("--series, --heatmap and --dicom-out go with --explain KEY")
    _check_output_options(args)
    from tqdm import tqdm

    from prima.distributed import resolve_device
    from prima.predict import predict, ready_release

    device = resolve_device(args.device)
    release = ready_release(_weights(args), device)
    with tqdm(total=100, file=sys.stderr, bar_format="{desc:<40.40}{percentage:3.0f}%|{bar}| {elapsed}") as bar:
        def progress(fraction: float, stage: str) -> None:
            bar.set_description_str(stage, refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        study, load_s = None, 0.0
        if args.explain is not None:  # the explained series' grid and files are needed: load here, keep the study
            progress(0.0, "loading the study")
            study, load_s = _load_timed(args)
        prediction = predict(study if study is not None else _study_source(args.study), release, device=device,
                             precision=args.precision, return_embedding=args.embedding, progress=progress)
    if study is not None:
        timings = prediction.timings_s
        prediction.timings_s = {"load": round(load_s, 4), **timings,
                                "total": round(timings.get("total", 0.0) + load_s, 4)}
    lines = _prediction_lines(prediction, args.top)
    if args.explain is not None:
        from prima.explain import explain

        _check_dicom_source(args, study, prediction.tokens)
        explanation = explain(prediction.tokens, release, args.explain, _series_arg(args),
                              num_samples=args.samples, seed=args.seed, device=device, precision=args.precision)
        tokens = prediction.tokens.series[explanation.series_index]
        prediction.explanations.append(explanation.to_dict())
        lines += _explanation_lines(explanation, tokens)
        if args.heatmap is not None:
            lines += _heatmap_lines(args.heatmap, explanation, tokens, study.series[explanation.series_index])
        if args.dicom_out is not None:
            lines += _dicom_lines(args, study, explanation, tokens, prediction)
    print("\n".join(lines))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(prediction.to_json() + "\n", encoding="utf-8")
        print(f"Prediction JSON: {out}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    _check_output_options(args)
    from prima.distributed import resolve_device
    from prima.explain import explain
    from prima.predict import predict_tokens, ready_release
    from prima.tokens import tokenize_study

    device = resolve_device(args.device)
    release = ready_release(_weights(args), device)
    study, _ = _load_timed(args)
    tokens = tokenize_study(study, release)
    _check_dicom_source(args, study, tokens)
    explanation = explain(tokens, release, args.target, _series_arg(args),
                          num_samples=args.samples, seed=args.seed, device=device, precision=args.precision)
    series_tokens = tokens.series[explanation.series_index]
    lines = _explanation_lines(explanation, series_tokens)[1:]
    if args.heatmap is not None:
        lines += _heatmap_lines(args.heatmap, explanation, series_tokens, study.series[explanation.series_index])
    if args.dicom_out is not None:  # the report needs the prediction: the model on the tokens already made
        prediction = predict_tokens(tokens, release, precision=args.precision)
        prediction.skipped = [{"name": s.name, "reason": s.reason} for s in study.skipped]
        lines += _dicom_lines(args, study, explanation, series_tokens, prediction)
    print("\n".join(lines))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(explanation.to_dict(), indent=1) + "\n", encoding="utf-8")
        print(f"Explanation JSON: {out}")
    return 0


def _series_choice(text: str) -> str | int:
    """A series given on the command line: a position when it is a number, else a name."""
    return int(text) if text.isdigit() else text


def _add_explain_options(parser: argparse.ArgumentParser) -> None:
    """LIME options shared by ``predict --explain`` and ``explain``."""
    parser.add_argument("--series", metavar="NAME", type=_series_choice,
                        help="the series to explain, by name or position (0 = first; default: the first series)")
    parser.add_argument("--samples", type=int, metavar="N", help="LIME samples (default: 3000 on a GPU, 1000 on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seeds LIME's samples (default 0)")
    parser.add_argument("--heatmap", metavar="HEATMAP.nii.gz",
                        help="write the heatmap as NIfTI on the preprocessed series grid (for a NIfTI series also "
                             "HEATMAP_input_grid.nii.gz, on the input file's own grid)")
    parser.add_argument("--dicom-out", metavar="DIR",
                        help="write DICOM objects over the explained series' own slices into the new folder DIR: "
                             "the heatmap as a parametric map, the top tokens as a segmentation and the prediction as "
                             "a structured report (DICOM series of single-frame slices only)")
    parser.add_argument("--deidentify", action="store_true",
                        help="with --dicom-out: replace patient identifiers, dates and UIDs in every written object "
                             "and add a de-identified copy of the source series (default: copy the patient and "
                             "study from the source, as a PACS needs to file the objects)")


def _embed(args: argparse.Namespace) -> int:
    from prima.batch import DEFAULT_WORKERS, embed_manifest, ids_path

    summary = embed_manifest(args.manifest, args.out, _weights(args), splits=args.splits,
                             workers=DEFAULT_WORKERS if args.workers is None else args.workers, device=args.device,
                             precision=args.precision)
    if summary.is_main:
        print(f"{args.out} + {ids_path(Path(args.out))}: {summary.describe()}")
    return 0


def _predict_batch(args: argparse.Namespace) -> int:
    from prima.batch import DEFAULT_WORKERS, predict_manifest

    summary = predict_manifest(args.manifest, args.out, _weights(args), splits=args.splits,
                               workers=DEFAULT_WORKERS if args.workers is None else args.workers, device=args.device,
                               precision=args.precision, return_embedding=args.embedding)
    if summary.is_main:
        print(f"{args.out}: {summary.describe()}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command that runs the model."""
    parser.add_argument("--weights", metavar="WEIGHTS",
                        help=f"release folder or hf://owner/repo[@revision] (default: ${WEIGHTS_ENV}, else the "
                             "repository's assets/weights/prima-lite)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else CPU")
    # the choices of prima.precision.PRECISIONS, not imported here: it pulls in torch, and --help should not
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Options of the manifest commands (``embed``, ``predict-batch``)."""
    parser.add_argument("manifest", help="manifest.jsonl (docs/design.md section 7)")
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"),
                        help="only these splits (default: all)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes that load studies and cut them into patches (default: min(4, CPU cores); "
                             "0: this process)")
    _add_model_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prima", description="Prima brain-MRI vision-language model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="list the series of a study (DICOM folder, zip or NIfTI)")
    inspect.add_argument("study", nargs="+", help="study folder, .zip, or NIfTI file(s)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--preprocessed", action="store_true",
                         help="also show the shape and spacing after preprocessing (resampling)")
    inspect.add_argument("--in-plane-size", type=int, default=256, help="in-plane size for --preprocessed")
    inspect.add_argument("--min-slice-spacing", type=float, default=4.0,
                         help="minimum through-plane spacing (mm) for --preprocessed")
    inspect.add_argument("--grid", choices=GRIDS, default="field_of_view",
                         help="for --preprocessed: each series' own field of view (paper), or a box on the head")
    inspect.set_defaults(handler=_inspect)

    predict = commands.add_parser("predict", help="diagnoses, priority and referrals of one study")
    predict.add_argument("study", nargs="+", help="study folder, .zip, NIfTI file(s) or loose DICOM files")
    predict.add_argument("--out", metavar="PRED.json", help="also write the prediction JSON here")
    predict.add_argument("--embedding", action="store_true",
                         help="include the study embedding in the JSON (needs --out)")
    predict.add_argument("--top", type=int, default=10, metavar="N",
                         help="diagnoses to list: the top N of the differential, and every positive (default 10)")
    predict.add_argument("--explain", metavar="KEY",
                         help="also explain this diagnosis or referral key (or 'priority') with LIME")
    _add_explain_options(predict)
    _add_model_options(predict)
    predict.set_defaults(handler=_predict)

    explain = commands.add_parser("explain", help="LIME over the volume tokens of one series for one output")
    explain.add_argument("study", nargs="+", help="study folder, .zip, NIfTI file(s) or loose DICOM files")
    explain.add_argument("--target", required=True, metavar="KEY",
                         help="a diagnosis or referral key, or 'priority'")
    explain.add_argument("--out", metavar="EXPLANATION.json", help="also write the explanation JSON here")
    _add_explain_options(explain)
    _add_model_options(explain)
    explain.set_defaults(handler=_explain)

    embed = commands.add_parser("embed", help="study embeddings of every study of a manifest (.npy + ids)")
    embed.add_argument("--out", required=True, metavar="EMBEDDINGS.npy",
                       help="(N, D) float32 rows in manifest order; the study ids go to <stem>.ids.json beside it")
    _add_batch_options(embed)
    embed.set_defaults(handler=_embed)

    batch = commands.add_parser("predict-batch", help="predictions of every study of a manifest (JSON lines)")
    batch.add_argument("--out", required=True, metavar="PREDS.jsonl",
                       help="one prediction JSON per line, with its study_id, in manifest order")
    batch.add_argument("--embedding", action="store_true", help="include each study embedding")
    _add_batch_options(batch)
    batch.set_defaults(handler=_predict_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied DICOM module is noise
    try:
        return args.handler(args)
    except (PrimaError, ValueError) as error:
        message = " ".join(str(error).split())
        print(f"prima {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
