"""Generate a synthetic data set: ``python -m training.synth --n 2000 --out data/synth --seed 0``.

Studies are generated in parallel (spawned worker processes, by default one per available core) and
written as they finish; the manifest lists them in study order, and every study depends only on
``(seed, index)``, so the output is identical for any ``--workers``. After writing, the positives per
label per split are printed (minimum, median and the rarest labels), for the release log.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prima.manifest import KNOWN_SPLITS
from training.synth.study import DEFAULT_PROTOCOL_BLIND, PROTOCOL_BLIND_SPLITS
from training.synth.writers import FORMATS, available_cores, label_count_summary, label_counts, write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of studies")
    parser.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="data-set seed")
    parser.add_argument("--format", choices=FORMATS, default="nifti", help="series file format")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"worker processes (default: one per available core, here {available_cores()})")
    parser.add_argument("--spacing", type=float, default=1.5, help="phantom voxel size in mm (coarser = faster)")
    parser.add_argument("--max-series", type=int, default=8, help="most series per study (2-8)")
    parser.add_argument("--protocol-blind", choices=sorted(PROTOCOL_BLIND_SPLITS), default=DEFAULT_PROTOCOL_BLIND,
                        help="splits whose protocol and series are drawn independently of the labels: heldout "
                             "(val and test; train follows the indication), all or none")
    parser.add_argument("--metadata-only", action="store_true",
                        help="write only manifest.jsonl, without images (e.g. for training.metadata_baseline)")
    parser.add_argument("--balance", type=float, default=0.0,
                        help="label balancing of the primary diagnosis: 0 = clinical frequencies, 1 = uniform "
                             "over the 52 labels, weights ** (1 - balance) in between")
    parser.add_argument("--shift", type=float, default=0.0,
                        help="draw pose, size, deformation, contrast, bias, noise and resolution this many range "
                             "widths beyond the training ranges (0-1; 0 = training), for a shifted test set")
    parser.add_argument("--primary", nargs="+", metavar="KEY", default=None,
                        help="draw every study's primary diagnosis among these diagnosis keys (no normal studies), "
                             "e.g. a test set of focal lesions for LIME localisation")
    parser.add_argument("--stratify", action="store_true",
                        help="share the primary diagnoses out over each split's abnormal studies in proportion to "
                             "their weights (every label has positives in a split of >= 52 abnormal studies) "
                             "instead of drawing them independently")
    parser.add_argument("--split-fractions", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"), default=None,
                        help="fractions of the train, val and test splits (default 0.8 0.1 0.1); with --stratify, "
                             "a test split of >= 260 abnormal studies has >= 5 positives of every label")
    parser.add_argument("--only-split", choices=KNOWN_SPLITS, default=None,
                        help="write only this split's studies of the --n-study data set, each as the whole set "
                             "would have it (e.g. training studies drawn again to read a model on them)")
    parser.add_argument("--first", type=int, default=None, metavar="N",
                        help="write only the first N of the studies chosen (in study order)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = write_dataset(a.n, a.out, seed=a.seed, fmt=a.format, workers=a.workers, spacing=a.spacing,
                                 max_series=a.max_series, protocol_blind=a.protocol_blind,
                                 metadata_only=a.metadata_only, progress=not a.no_progress, balance=a.balance,
                                 shift=a.shift, primary=a.primary, stratify=a.stratify,
                                 split_fractions=a.split_fractions, only_split=a.only_split, first=a.first)
    except ValueError as error:
        parser.error(str(error))
    elapsed = time.perf_counter() - start
    written = len(manifest.read_text(encoding="utf-8").splitlines())
    print(f"{written} studies in {elapsed:.1f} s ({60.0 * written / elapsed:.1f} studies/min) -> {manifest}",
          file=sys.stderr)
    for line in label_count_summary(label_counts(manifest)):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
