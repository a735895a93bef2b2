"""One user's analysed study and the work on it: plain functions over ``prima``'s public API.

A :class:`StudySession` lives in the user's ``gr.State`` only (never in a module global): the
prediction with the tokens the model read, the series' display volumes, the series-drop analysis and
the LIME explanations computed so far (so switching back to an output, a slice or a plane never
recomputes anything), and a private folder for exported files, removed with the session.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from prima.explain import Explanation, SeriesContribution, explain, heatmap, series_contribution, zero_shot
from prima.export import SeriesGeometry, export_dicom
from prima.io import load_study
from prima.predict import Prediction, Progress, predict
from prima.preprocess import grid_anchor, preprocess_series
from prima.release import Release

from app.viewer import PLANES, ViewVolume, to_uint8, top_k_volume, view_png

log = logging.getLogger("prima.app")

TOP_K = 10  # tokens outlined in the viewer and boxed in the 3D view
# Keys of a prediction document that are not the model's outputs; with them the JSON stays free of
# patient identifiers (prima's Prediction never holds names, IDs, dates, institutions or accessions).
EXPORT_KEYS = ("study", "series", "skipped", "diagnoses", "differential", "priority", "referrals", "model",
               "explanations")


@dataclass
class StudySession:
    """What the app keeps of one analysed study, for one user."""

    prediction: Prediction  # with .tokens: the model's input, reused by every explanation
    volumes: list[np.ndarray]  # per series: (X, Y, Z) uint8 preprocessed image (the grid the heatmap is on)
    contribution: SeriesContribution  # the series-drop analysis of every diagnosis
    explanations: dict[tuple[str, int], Explanation] = field(default_factory=dict)  # (target, series) -> LIME
    sources: list[str] = field(default_factory=list)  # what the study was loaded from (the DICOM export reads it)
    geometry: list[SeriesGeometry] = field(default_factory=list)  # per series: its grid and source, no voxels
    _workdir: Path | None = None  # exported files, made on the first export

    @property
    def series_names(self) -> list[str]:
        return [s.name for s in self.prediction.series]

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="prima-app-"))
        return self._workdir

    def close(self) -> None:
        """Remove the session's exported files."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)


def close_session(session: StudySession | None) -> None:
    """``gr.State``'s delete callback: the session's files go when the user leaves or it expires."""
    if isinstance(session, StudySession):
        session.close()


def default_target(prediction: Prediction) -> str:
    """The diagnosis explained first: the top positive, else the one closest to its threshold."""
    return prediction.differential[0].key


def default_series(session: StudySession, target: str) -> int:
    """The series explained first for a diagnosis: the one whose removal lowers its logit most."""
    column = session.contribution.diagnosis_keys.index(target)
    return int(np.argmax(session.contribution.deltas[:, column]))


def analyse(sources: str | Path | Sequence[str | Path], release: Release, description: str | None = None,
            progress: Progress | None = None) -> StudySession:
    """Load, tokenize and predict a study, and prepare what the viewer needs.

    Args:
        sources: what ``prima.io.load_study`` accepts (a zip, a folder, DICOM or NIfTI files).
        release: a loaded release that can predict.
        description: overrides the study description (DICOM StudyDescription) when not empty.
        progress: (fraction, stage) callback.

    Raises:
        StudyLoadError: the study cannot be loaded.
    """
    report = progress or (lambda fraction, stage: None)
    report(0.0, "loading the study")
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(source) for source in sources]
    study = load_study(sources, study_description=description.strip() if description and description.strip() else None)
    prediction = predict(study, release, return_embedding=True,
                         progress=lambda fraction, stage: report(0.05 + 0.85 * fraction, stage))
    report(0.9, "preparing the viewer")
    head_centre = grid_anchor(study.series, release.config.preprocess)
    volumes = [to_uint8(preprocess_series(series, release.config.preprocess, head_centre).array)
               for series in study.series]
    report(0.95, "leaving out each series in turn")
    contribution = series_contribution(prediction.tokens, release)
    log.info("analysed a study: %d series, %d skipped, %.1f s", len(prediction.series), len(prediction.skipped),
             prediction.timings_s.get("total", 0.0))
    return StudySession(prediction, volumes, contribution, sources=sources,
                        geometry=[SeriesGeometry.of(series) for series in study.series])


def explanation(session: StudySession, release: Release, target: str, series: int,
                progress: Progress | None = None) -> Explanation:
    """LIME of ``target`` over ``series``' tokens, computed once per session and then reused."""
    key = (target, int(series))
    if key not in session.explanations:
        session.explanations[key] = explain(session.prediction.tokens, release, target, int(series), top_k=TOP_K,
                                            progress=progress)
        log.info("explained one output over %d tokens in %.1f s", len(session.explanations[key].weights),
                 session.explanations[key].elapsed_s)
    return session.explanations[key]


def view_volume(session: StudySession, series: int, lime: Explanation | None) -> ViewVolume:
    """The viewer's volume of one series, with the heatmap and top-k tokens of ``lime`` when given."""
    tokens = session.prediction.tokens.series[series]
    volume = ViewVolume(session.volumes[series], tokens.affine)
    if lime is not None:
        volume.heat = heatmap(lime, tokens)
        volume.top_k = top_k_volume(tokens.shape, tokens.through_axis, tokens.coords, lime.top_k)
    return volume


def ask(session: StudySession, release: Release, text: str):
    """A free-text finding scored zero-shot against the session's study (its stored embedding)."""
    return zero_shot(session.prediction.embedding, release, text)


def prediction_document(session: StudySession) -> dict:
    """The prediction as exported: the model's outputs and the explanations made, nothing else."""
    doc = session.prediction.to_dict()
    doc["explanations"] = [lime.to_dict() for lime in session.explanations.values()]
    doc["series_contribution"] = session.contribution.to_dict()
    return {key: doc[key] for key in (*EXPORT_KEYS, "series_contribution") if key in doc}


def export_prediction(session: StudySession) -> Path:
    path = session.workdir / "prima-prediction.json"
    path.write_text(json.dumps(prediction_document(session), indent=1), encoding="utf-8")
    return path


def export_heatmap(session: StudySession, lime: Explanation) -> Path:
    """The heatmap as a NIfTI volume on the series' preprocessed grid: its affine is the series' world
    geometry, so it opens aligned over the series in FSLeyes, ITK-SNAP or 3D Slicer."""
    tokens = session.prediction.tokens.series[lime.series_index]
    image = nib.Nifti1Image(heatmap(lime, tokens), tokens.affine)
    image.header["descrip"] = f"LIME {lime.target}"[:79].encode("ascii", "replace")
    path = session.workdir / f"prima-lime-{lime.target}-series{lime.series_index}.nii.gz"
    nib.save(image, path)
    return path


def export_view(session: StudySession, volume: ViewVolume, plane: str, index: int, opacity: float) -> Path:
    """The current slice as shown (heatmap and outlines included) as a PNG."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    path = session.workdir / f"prima-view-{plane}-{index}.png"
    path.write_bytes(view_png(volume, plane, index, opacity))
    return path


def export_dicom_zip(session: StudySession, lime: Explanation) -> Path:
    """The explanation and the prediction as DICOM (parametric map, segmentation, SR over the source series'
    own slices), **de-identified** (the app returns no identifier, docs/app.md), with the de-identified copy
    of the source series the objects reference, zipped.

    Raises:
        ExportError: the series cannot be exported (NIfTI, enhanced multi-frame, its files are gone or changed).
    """
    name = f"prima-dicom-{lime.target}-series{lime.series_index}"
    staging = Path(tempfile.mkdtemp(prefix="dicom-", dir=session.workdir))
    try:
        written = export_dicom(staging / name, session.sources, session.geometry[lime.series_index], lime,
                               session.prediction.tokens.series[lime.series_index], session.prediction, deidentify=True)
        path = session.workdir / f"{name}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in written.files:
                archive.write(file, f"{name}/{file.relative_to(written.folder).as_posix()}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported DICOM objects of one explanation (%d files)", len(written.files))
    return path
