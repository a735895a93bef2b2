"""Write the DICOM outputs of every bundled example and of a three-plane study, and check each object.

For every DICOM series of each study the shipped release predicts the study, LIME explains the top diagnosis
on that series, and ``prima.export.export_dicom`` writes the parametric map, the segmentation and the
Comprehensive SR twice: with the source's identity and with ``deidentify=True``. Each object is then checked:

- round trip: pydicom reads it; highdicom parses it (``hd.pm.ParametricMap.from_dataset``,
  ``hd.seg.segread``, ``hd.sr.srread``);
- frames: every parametric-map and segmentation frame references a source SOPInstanceUID and carries that
  slice's ImagePositionPatient and ImageOrientationPatient (largest difference in mm / direction cosine);
- independent readers: dcm2niix converts the parametric map, and its affine is compared (nibabel's canonical
  order) with the series as prima loaded it; highdicom's volume reader does the same for the segmentation;
- de-identification: none of the source's identifiers (patient name, ID and birth date, accession number,
  institution, referring physician, the study, series, frame-of-reference and instance UIDs) appears in the
  bytes or the names of any file written with ``deidentify=True``.

The three-plane study is the test suite's fixture (``tests/helpers/studies.py``: nilearn's MNI template
acquired axially, sagittally and coronally). Usage::

    .venv/bin/python benchmarks/dicom_outputs.py --out /tmp/dicom-outputs [--num-samples 128] [--json rows.json]
        [--studies normal_dwi three_plane_fixture] [--max-series 1]

It prints one Markdown table row per (study, series, object).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers.dcm2niix import oracle_volume, run_dcm2niix, to_canonical  # noqa: E402
from helpers.dicom_objects import frame_geometry  # noqa: E402
from helpers.studies import write_three_plane_study  # noqa: E402
from prima import export  # noqa: E402
from prima.explain import explain, series_contribution  # noqa: E402
from prima.io import load_study  # noqa: E402
from prima.predict import predict  # noqa: E402
from prima.release import load_release  # noqa: E402

IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                    "ReferringPhysicianName")
IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass
class ObjectCheck:
    """What one written object holds and which checks it passed."""

    study: str
    series: str
    plane: str
    object: str  # parametric map, segmentation or report
    content: str  # frames and size, segments, or findings
    round_trip: str  # the readers that parsed it
    frame_position_mm: float | None  # largest |IPP - source slice IPP| over the frames
    frame_orientation: float | None  # largest |IOP - source slice IOP| over the frames
    references_in_source: bool | None  # every referenced SOPInstanceUID is one of the source's
    reader: str  # the independent reader that rebuilt the volume ("" when none applies)
    affine_diff_mm: float | None  # its affine against the source's (the segmentation's: on the source grid)
    deidentified_clean: bool  # no source identifier in the de-identified copy's bytes or name


def _source_frames(source: export.SourceSeries) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {str(ds.SOPInstanceUID): (np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float))
            for ds in source.datasets}


def _frame_checks(path: Path, source: export.SourceSeries) -> tuple[float, float, bool]:
    slices = _source_frames(source)
    frames = frame_geometry(pydicom.dcmread(path))
    inside = all(uid in slices for uid, *_ in frames)
    position = max(float(np.abs(p - slices[uid][0]).max()) for uid, p, *_ in frames if uid in slices)
    orientation = max(float(np.abs(o - slices[uid][1]).max()) for uid, _, o, _ in frames if uid in slices)
    return position, orientation, inside


def _subgrid_diff_mm(affine: np.ndarray, source_affine: np.ndarray) -> float:
    """How far ``affine`` is from the source grid shifted by whole voxels (a segmentation stores only the
    slices its segments touch, so its volume starts at one of the source's voxels)."""
    shift = np.round(np.linalg.solve(source_affine, affine)[:3, 3])
    on_grid = source_affine.copy()
    on_grid[:3, 3] = (source_affine @ [*shift, 1.0])[:3]
    return float(np.abs(affine - on_grid).max())


def _identifiers(source: export.SourceSeries) -> set[str]:
    values = set()
    for ds in source.datasets:
        for keyword in (*IDENTIFYING_TAGS, *IDENTIFYING_UIDS, "SOPInstanceUID"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 3:
                values.add(value)
    return values


def _clean(files: list[Path], secrets: set[str]) -> bool:
    for path in files:
        data = path.read_bytes()
        if any(secret.encode() in data or secret in path.name for secret in secrets):
            return False
    return True


def check_series(name: str, folder: Path, study, prediction, release, index: int, out: Path,
                 num_samples: int) -> list[ObjectCheck]:
    series = study.series[index]
    # the diagnosis this series raises most: with token-pooled diagnoses a series whose tokens are not among the
    # study's top scores for the leading diagnosis would get no positive LIME weight and nothing to outline
    contribution = series_contribution(prediction.tokens, release, device="cpu")
    target = contribution.diagnosis_keys[int(contribution.deltas[index].argmax())]
    lime = explain(prediction.tokens, release, target, index, num_samples=num_samples, device="cpu")
    tokens = prediction.tokens.series[index]
    stem = f"{name}-{index:02d}"
    written = export.export_dicom(out / stem, folder, series, lime, tokens, prediction)
    private = export.export_dicom(out / f"{stem}-deidentified", folder, series, lime, tokens, prediction,
                                  deidentify=True)
    source = export.read_source_series(folder, series, pixels=True)
    clean = _clean(list(private.files), _identifiers(source))
    plane = series.plane
    rows = []

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(written.parametric_map))
    position, orientation, inside = _frame_checks(written.parametric_map, source)
    with tempfile.TemporaryDirectory() as tmp:
        converted = run_dcm2niix(written.parametric_map.parent, Path(tmp))
        pm_stems = [s for s in converted.files if s.startswith(str(pm.SeriesInstanceUID))] or list(converted.files)
        array, affine = oracle_volume(converted.image(pm_stems[0]))
    _, canonical_pm = to_canonical(array, affine)
    _, canonical_series = to_canonical(series.array, series.affine)
    rows.append(ObjectCheck(name, series.name, plane, "parametric map",
                            f"{int(pm.NumberOfFrames)} frames of {pm.Rows}x{pm.Columns} float32, LIME weights for "
                            f"{target}", "pydicom, highdicom ParametricMap", position, orientation, inside,
                            "dcm2niix", float(np.abs(canonical_pm - canonical_series).max()), clean))

    seg = hd.seg.segread(written.segmentation)
    position, orientation, inside = _frame_checks(written.segmentation, source)
    source_volume = hd.get_volume_from_series(source.datasets)
    seg_volume = seg.get_volume(combine_segments=True)
    rows.append(ObjectCheck(name, series.name, plane, "segmentation",
                            f"{seg.number_of_segments} segments (top-k token ranks), {int(seg.NumberOfFrames)} frames",
                            "pydicom, highdicom segread", position, orientation, inside, "highdicom volume",
                            _subgrid_diff_mm(seg_volume.affine, source_volume.affine), clean))

    sr = hd.sr.srread(written.report)
    text = export.report_text(sr)
    findings = text.count("Finding: ")
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
    refs = {str(pm.SOPInstanceUID), str(seg.SOPInstanceUID)} <= evidence and sr.StudyInstanceUID == source.study_uid
    rows.append(ObjectCheck(name, series.name, plane, "report (Comprehensive SR)",
                            f"{findings} findings, worklist priority {prediction.priority.worklist_tier} (head: "
                            f"{prediction.priority.tier}), "
                            f"{sum(r.positive for r in prediction.referrals)} referrals",
                            "pydicom, highdicom srread", None, None, refs, "", None, clean))
    return rows


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1e}" if value else "0"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", default=str(REPO / "assets" / "weights" / "prima-lite"), help="release folder or hf:// path")
    parser.add_argument("--examples", default=str(REPO / "assets" / "examples"), help="folder of example zips")
    parser.add_argument("--out", required=True, help="new folder for the written objects")
    parser.add_argument("--num-samples", type=int, default=128, help="LIME samples per explanation")
    parser.add_argument("--studies", nargs="+", help="only these (example zip stems, three_plane_fixture)")
    parser.add_argument("--max-series", type=int, help="only the first N series of each study")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    release = load_release(args.release)
    studies = [(p.stem, p) for p in sorted(Path(args.examples).glob("*.zip"))]
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=1)
    fixture = write_three_plane_study(out / "three_plane_fixture", np.asarray(image.dataobj, np.float32),
                                      np.asarray(image.affine, float))
    studies.append(("three_plane_fixture", fixture.folder))
    if args.studies:
        unknown = set(args.studies) - {name for name, _ in studies}
        if unknown:
            parser.error(f"unknown studies {sorted(unknown)}; known: {[name for name, _ in studies]}")
        studies = [(name, folder) for name, folder in studies if name in args.studies]

    rows: list[ObjectCheck] = []
    for name, folder in studies:
        study = load_study(folder)
        prediction = predict(study, release, device="cpu")
        for index in range(min(len(study.series), args.max_series or len(study.series))):
            print(f"{name}: series {index} ({study.series[index].name})", file=sys.stderr, flush=True)
            rows.extend(check_series(name, folder, study, prediction, release, index, out / "objects",
                                     args.num_samples))

    header = [f.name for f in ObjectCheck.__dataclass_fields__.values()]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_format(getattr(row, h)) for h in header) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    failed = [r for r in rows if r.references_in_source is False or not r.deidentified_clean
              or (r.affine_diff_mm or 0) > 1e-3 or (r.frame_position_mm or 0) > 1e-3]
    print(f"\n{len(rows)} objects, {len(failed)} failing a check", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
