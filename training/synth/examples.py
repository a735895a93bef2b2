"""Build the example studies shipped in ``assets/examples`` for the app.

``python -m training.synth.examples --out assets/examples``

Each example is a synthetic study written as DICOM and zipped, so the app's example buttons exercise
the same loader a clinician's upload does. The set is fixed (seed, diagnoses, series count) so the
files are reproducible; the total stays under the 10 MB the project allows for examples.

``examples.json`` beside the zips tells the app what each example shows and which two form the
pre/post pair of its Compare tab (the app reads it; it never imports ``training``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from training.synth.study import generate_study
from training.synth.writers import write_study


@dataclass(frozen=True)
class Example:
    """One shipped example study."""

    file_name: str  # zip name shown on the app's example button
    index: int  # study index within the examples data set (changes the subject and protocol)
    keys: tuple[str, ...]  # forced diagnoses; empty for a normal study
    max_series: int  # series kept, few so the zips stay within the 10 MB budget
    title: str  # what the example shows, as the app's button says it
    role: str = ""  # "pre" or "post" for the Compare tab's example pair, else empty


EXAMPLES = (
    # FLAIR, DWI and its ADC map of a high-grade glioma: 4 MB.
    Example("glioma_high_grade.zip", 1, ("tumor_adult_high_grade_glioma",), 3,
            "High-grade glioma (FLAIR, DWI, ADC)", "pre"),
    # The same subject (same study index, so the same deformed anatomy) after resection: cavity and
    # craniotomy, no tumour. 4 MB.
    Example("glioma_after_resection.zip", 1, ("surgical_resection_cavity", "surgical_craniotomy"), 3,
            "After resection: cavity and craniotomy (FLAIR, DWI, ADC)", "post"),
    # DWI and its ADC map of a normal head: 1 MB.
    Example("normal_dwi.zip", 2, (), 2, "Normal (DWI, ADC)"),
)
CATALOGUE = "examples.json"  # the app's list of examples, written beside the zips
SEED = 20261123  # data-set seed of the examples
SPACING_MM = 2.0  # phantom voxel size: coarse keeps generation and the zips small


def build_example(example: Example, out_dir: Path) -> Path:
    """Generate ``example``, write it as DICOM and zip it into ``out_dir``; return the zip path."""
    study = generate_study(SEED, example.index, spacing=SPACING_MM, keys=list(example.keys),
                           max_series=example.max_series)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / example.file_name
    with tempfile.TemporaryDirectory() as tmp:
        write_study(study, tmp, "dicom", uid_seed=f"example-{SEED}")
        studies = Path(tmp) / "studies"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in studies.rglob("*") if p.is_file()):
                # Fixed timestamps so rebuilding gives byte-identical zips.
                info = zipfile.ZipInfo(path.relative_to(studies).as_posix(), (2026, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return target


def write_catalogue(out_dir: Path) -> Path:
    """``examples.json``: per example its file, title, forced findings and pre/post role."""
    entries = [{"file": e.file_name, "title": e.title, "findings": list(e.keys), "role": e.role} for e in EXAMPLES]
    target = out_dir / CATALOGUE
    target.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/examples"), help="output folder")
    args = parser.parse_args(argv)
    for example in EXAMPLES:
        path = build_example(example, args.out)
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB  {', '.join(example.keys) or 'normal'}")
    print(write_catalogue(args.out))


if __name__ == "__main__":
    main()
