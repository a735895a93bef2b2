"""The ``prima`` command line. Subcommands are added by later features (``predict``, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from prima.errors import PrimaError


def _fmt_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in spacing)


def _inspect(args: argparse.Namespace) -> int:
    from prima.io import load_study
    from prima.preprocess import PreprocessConfig, preprocess_series

    study = load_study(args.study if len(args.study) > 1 else args.study[0])
    config = PreprocessConfig(in_plane_size=args.in_plane_size, min_slice_spacing_mm=args.min_slice_spacing)
    rows = []
    for series in study.series:
        row = {"name": series.name, "plane": series.plane, "shape": list(series.shape),
               "spacing_mm": [round(v, 4) for v in series.spacing], "orientation": series.source_orientation,
               "source": series.source}
        if args.preprocessed:
            processed = preprocess_series(series, config)
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
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if skipped:
        print(f"\nSkipped ({len(skipped)}):")
        for item in skipped:
            print(f"  {item['name']}: {item['reason']}  [{item['source']}]")
    return 0


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
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (PrimaError, ValueError) as error:
        message = " ".join(str(error).split())
        print(f"prima {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
