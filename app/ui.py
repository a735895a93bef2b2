"""The Gradio interface: layout and event handlers over ``app.session``, ``app.charts`` and ``app.viewer``.

Per-user data lives in ``gr.State`` only; the one module-level object a handler reaches is the
release (model weights, shared by every user and never written to). Every handler is a plain
function of its inputs, testable without a browser; bad input raises ``gr.Error`` with a message a
person can act on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import gradio as gr
from fastapi.responses import PlainTextResponse

from prima.errors import ExportError, ReleaseError, StudyLoadError
from prima.predict import ready_release
from prima.release import Release

from app import charts, viewer
from app.session import (StudySession, analyse, ask, close_session, default_series, default_target, explanation,
                         export_dicom_zip, export_heatmap, export_prediction, export_view, view_volume)

log = logging.getLogger("prima.app")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO / "assets" / "examples"
DEFAULT_WEIGHTS = REPO / "assets" / "weights" / "prima-lite"
NOTICE = ("**Research demo — not for clinical use.** Prima here is trained on synthetic studies only and has "
          "not been validated on patients.")
SERIES_COLUMNS = ["Series", "Plane", "Shape (L x P x S)", "Spacing (mm)", "Tokens kept"]
SKIPPED_COLUMNS = ["Skipped series", "Reason"]
MAX_UPLOAD_FILES = int(os.environ.get("PRIMA_MAX_FILES", "5000"))  # loose files in one upload (a zip counts 1)
# Uploads live in Gradio's cache, one copy per distinct file shared by every user who uploads the same
# bytes, so a request cannot delete its upload without breaking another user's: a sweep removes
# uploads (and every other cached file) this long after they arrived.
UPLOAD_SECONDS = int(os.environ.get("PRIMA_UPLOAD_TTL", "600"))
SESSION_SECONDS = 2 * 3600  # a user's state (and exported files) is dropped after this long unused
# Reads the viewer's slider position in the browser for "Download view (PNG)": the slider lives in
# the plotly figure (slicing never calls the server), so the server only learns it on export.
ACTIVE_SLICE_JS = """(...args) => {
  const plot = document.querySelector('#viewer .js-plotly-plot');
  const slider = plot && plot.layout && plot.layout.sliders && plot.layout.sliders[0];
  const step = slider ? slider.steps[slider.active || 0] : null;
  args[args.length - 1] = step ? Number(step.label) : -1;
  return args;
}"""


@dataclass(frozen=True)
class ExampleStudy:
    path: Path
    title: str  # what it shows
    role: str  # "pre", "post" or ""


def example_studies(folder: Path = EXAMPLES_DIR) -> list[ExampleStudy]:
    """The example studies listed in ``folder/examples.json`` (written with them by the synthetic engine)."""
    catalogue = folder / "examples.json"
    if not catalogue.is_file():
        return []
    return [ExampleStudy(folder / e["file"], e["title"], e.get("role", ""))
            for e in json.loads(catalogue.read_text(encoding="utf-8")) if (folder / e["file"]).is_file()]


def _as_paths(files: str | Sequence[str] | None) -> list[str]:
    if not files:
        return []
    return [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


def series_rows(session: StudySession) -> list[list]:
    return [[s.name, s.plane, " x ".join(map(str, s.shape)), " x ".join(f"{v:.2f}" for v in s.spacing_mm),
             f"{s.tokens_kept} / {s.tokens_total}"] for s in session.prediction.series]


def skipped_rows(session: StudySession) -> list[list[str]]:
    return [[s["name"], s["reason"]] for s in session.prediction.skipped]


def study_summary(session: StudySession) -> str:
    prediction = session.prediction
    positives = ", ".join(d.name for d in prediction.positives[:5]) or "none above threshold"
    text = (f"**{prediction.study['description'] or '(no study description)'}** — {len(prediction.series)} series "
            f"loaded")
    if prediction.skipped:
        text += f", {len(prediction.skipped)} skipped"
    if prediction.abnormal is not None:
        text += f" · abnormal: **{prediction.abnormal:.0%}**"
    return (text + f" · top finding: **{prediction.differential[0].name}** · positives: {positives} · "
            f"{prediction.timings_s.get('total', 0):.1f} s")


def target_choices(session: StudySession) -> list[tuple[str, str]]:
    return [(f"{d.name} (p={d.prob:.3g}{', positive' if d.positive else ''})", d.key)
            for d in session.prediction.differential]


def _check_present(paths: Sequence[str]) -> None:
    if not all(Path(p).is_file() for p in paths):
        raise gr.Error(f"The upload is no longer on the server (uploads are kept {UPLOAD_SECONDS // 60} minutes): "
                       "upload the study again.")


def _gradio_progress(progress: gr.Progress):
    return lambda fraction, stage: progress(min(max(fraction, 0.0), 1.0), desc=stage)


def _need(session: StudySession | None) -> StudySession:
    if not isinstance(session, StudySession):
        raise gr.Error("Analyse a study first: upload one or pick an example.")
    return session


class Handlers:
    """The event handlers, bound to the process's release (the only shared object)."""

    def __init__(self, release: Release, max_files: int = MAX_UPLOAD_FILES):
        self.release = release
        self.max_files = max_files

    def _check_upload(self, paths: Sequence[str]) -> None:
        if len(paths) > self.max_files:
            raise gr.Error(f"{len(paths)} files uploaded; the limit is {self.max_files}. Zip the study folder and "
                           "upload the zip instead.")
        _check_present(paths)

    def study(self, files, description: str | None, previous: StudySession | None,
              progress: gr.Progress = gr.Progress()):
        paths = _as_paths(files)
        if not paths:
            raise gr.Error("Upload a study first: a .zip of a DICOM folder, DICOM files, or NIfTI files.")
        self._check_upload(paths)
        try:
            session = analyse(paths, self.release, description,
                              _gradio_progress(progress))
        except StudyLoadError as error:
            raise gr.Error(f"Could not load this study: {error}") from error
        close_session(previous)
        target = default_target(session.prediction)
        series = default_series(session, target)
        return (session, study_summary(session), session.prediction.study["description"] or "",
                charts.priority_badge(session.prediction), charts.diagnosis_chart(session.prediction),
                charts.referral_chart(session.prediction), series_rows(session), skipped_rows(session),
                gr.update(choices=target_choices(session), value=target),
                gr.update(choices=[(name, i) for i, name in enumerate(session.series_names)], value=series))

    def explore(self, session, target: str, series: int, plane: str, opacity: float,
                progress: gr.Progress = gr.Progress()):
        """LIME (computed once per output and series) -> viewer, 3D view, surrogate fit, contribution."""
        session = _need(session)
        if series is None or target is None:
            raise gr.Error("Choose a diagnosis and a series to explain.")
        lime = explanation(session, self.release, target, int(series), _gradio_progress(progress))
        volume = view_volume(session, int(series), lime)
        name = session.prediction.diagnosis(target).name
        title = f"{session.series_names[int(series)]} · LIME for {name}"
        info = (f"LIME for **{name}** over **{lime.series}**: {len(lime.weights)} tokens, {lime.num_samples} samples, "
                f"surrogate R² = **{lime.r2:.3f}**, {lime.elapsed_s:.1f} s. Red: the token raises the logit; "
                f"yellow outlines: the top {len(lime.top_k)} tokens.")
        return (viewer.viewer_figure(volume, plane, opacity, title), viewer.three_d_figure(volume, title), info,
                charts.contribution_chart(session.contribution, target, name))

    def view(self, session, target: str, series: int, plane: str, opacity: float):
        """Plane or opacity changed: redraw the viewer from the stored explanation."""
        session = _need(session)
        lime = session.explanations.get((target, int(series)))
        title = f"{session.series_names[int(series)]} · LIME for {session.prediction.diagnosis(target).name}"
        return viewer.viewer_figure(view_volume(session, int(series), lime), plane, opacity, title)

    def diagnoses(self, session, show_all: bool):
        return charts.diagnosis_chart(_need(session).prediction, show_all)

    def export(self, kind: str, session, target: str, series: int, plane: str, opacity: float, slice_index: float):
        session = _need(session)
        lime = session.explanations.get((target, int(series)))
        if kind == "prediction":
            return str(export_prediction(session))
        if lime is None:
            raise gr.Error("Explain a diagnosis first: there is no heatmap to export yet.")
        if kind == "heatmap":
            return str(export_heatmap(session, lime))
        if kind == "dicom":
            _check_present(session.sources)
            try:
                return str(export_dicom_zip(session, lime))
            except ExportError as error:
                raise gr.Error(f"No DICOM export for this series: {error}") from error
        volume = view_volume(session, int(series), lime)
        count = viewer.slice_count(volume, plane)
        index = int(slice_index) if slice_index is not None and 0 <= slice_index < count else viewer.default_slice(
            volume, plane)
        return str(export_view(session, volume, plane, index, opacity))

    def ask(self, session, text: str) -> str:
        session = _need(session)
        if not text or not text.strip():
            raise gr.Error("Type a finding, e.g. 'ring-enhancing lesion with surrounding edema'.")
        return charts.zero_shot_markdown(ask(session, self.release, text))

    def compare(self, pre_files, post_files, previous, progress: gr.Progress = gr.Progress()):
        pre_paths, post_paths = _as_paths(pre_files), _as_paths(post_files)
        if not pre_paths or not post_paths:
            raise gr.Error("Upload both studies: the one before and the one after.")
        self._check_upload(pre_paths)
        self._check_upload(post_paths)
        sessions = []
        report = _gradio_progress(progress)
        for label, paths, start in (("pre", pre_paths, 0.0), ("post", post_paths, 0.5)):
            try:
                sessions.append(analyse(paths, self.release, None,
                                        lambda f, s, start=start, label=label: report(start + 0.5 * f, f"{label}: {s}")))
            except StudyLoadError as error:
                raise gr.Error(f"Could not load the {label} study: {error}") from error
        for old in previous or ():
            close_session(old)
        pre, post = sessions
        pre_logits = {d.key: d.logit for d in pre.prediction.diagnoses}
        target = max(post.prediction.diagnoses, key=lambda d: abs(d.logit - pre_logits[d.key])).key
        choices = [(d.name, d.key) for d in post.prediction.differential]
        return (tuple(sessions), charts.change_chart(pre.prediction, post.prediction),
                gr.update(choices=choices, value=target))

    def compare_view(self, pair, target: str, plane: str, progress: gr.Progress = gr.Progress()):
        if not pair:
            raise gr.Error("Compare two studies first.")
        report = _gradio_progress(progress)
        volumes, titles = [], []
        for i, (label, session) in enumerate(zip(("pre", "post"), pair)):
            series = default_series(session, target)
            lime = explanation(session, self.release, target, series,
                               lambda f, s, i=i, label=label: report(0.5 * i + 0.5 * f, f"{label}: {s}"))
            volumes.append(view_volume(session, series, lime))
            titles.append(f"{label}: {session.series_names[series]}")
        return viewer.compare_figure(volumes[0], volumes[1], plane, 0.5, tuple(titles))


STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # disk full, file-size limit, quota


def storage_error_response(request, error: OSError) -> PlainTextResponse:
    """FastAPI exception handler: a write that fails while the server receives or stores data (above all
    an upload: Gradio writes it before any handler of ours runs) answers in plain words, not with a
    traceback and a bare 500."""
    if error.errno in STORAGE_ERRNOS:
        log.error("no room to store a request's data (%s)", error.strerror)
        return PlainTextResponse("The server has no room to store this upload (its disk is full). Try again later "
                                 "or upload a smaller study.", status_code=507)
    log.error("request failed with an OS error (%s)", error.strerror or type(error).__name__)
    return PlainTextResponse("The server could not complete this request.", status_code=500)


def model_card(release: Release) -> str:
    """The release's model card without its Hub front matter."""
    card = Path(release.path) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {release.config.name}\n\n(no model card)"
    return re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)


def _notice() -> None:
    gr.Markdown(NOTICE, elem_classes=["notice"])


def _explore_tab(handlers: Handlers, examples: list[ExampleStudy]):
    session = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=close_session)
    _notice()
    with gr.Row():
        with gr.Column(scale=3):
            upload = gr.File(label="MRI study: a .zip of a DICOM folder, DICOM files, or NIfTI files",
                             file_count="multiple", elem_id="study-upload")
            description = gr.Textbox(label="Study description (prefilled from DICOM; edit to override)",
                                     elem_id="study-description")
            analyse_button = gr.Button("Analyse study", variant="primary", elem_id="analyse")
        with gr.Column(scale=2):
            gr.Markdown("**Example studies** (synthetic, with known findings)")
            example_buttons = [(gr.Button(e.title, elem_id=f"example-{e.path.stem}", size="sm"), e) for e in examples]
    summary = gr.Markdown(elem_id="study-summary")
    priority = gr.HTML(elem_id="priority")
    with gr.Row():
        with gr.Column(scale=3):
            diagnosis_plot = gr.Plot(elem_id="diagnosis-chart", show_label=False)
            show_all = gr.Checkbox(label="Show all 52 diagnoses", value=False, elem_id="show-all")
        with gr.Column(scale=2):
            referral_plot = gr.Plot(elem_id="referral-chart", show_label=False)
    with gr.Row():
        target = gr.Dropdown(label="Explained diagnosis", choices=[], elem_id="explain-target")
        series = gr.Dropdown(label="Series", choices=[], elem_id="explain-series")
        plane = gr.Radio(list(viewer.PLANES), value="axial", label="Plane", elem_id="plane")
        opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
    lime_info = gr.Markdown(elem_id="lime-info")
    with gr.Row():
        view = gr.Plot(elem_id="viewer", show_label=False)
        view_3d = gr.Plot(elem_id="view-3d", show_label=False)
    contribution = gr.Plot(elem_id="contribution", show_label=False)
    with gr.Row():
        export_buttons = {kind: gr.Button(label, size="sm", elem_id=f"export-{kind}") for kind, label in
                          (("prediction", "Download prediction (JSON)"), ("heatmap", "Download heatmap (NIfTI)"),
                           ("view", "Download view (PNG)"),
                           ("dicom", "Download DICOM (SEG + parametric map + SR, zip)"))}
        export_file = gr.File(label="Export", elem_id="export-file", interactive=False)
    series_table = gr.Dataframe(headers=SERIES_COLUMNS, label="Series", interactive=False, elem_id="series-table")
    skipped_table = gr.Dataframe(headers=SKIPPED_COLUMNS, label="Skipped series", interactive=False,
                                 elem_id="skipped-table")

    study_outputs = [session, summary, description, priority, diagnosis_plot, referral_plot, series_table,
                     skipped_table, target, series]
    explore_inputs = [session, target, series, plane, opacity]
    explore_outputs = [view, view_3d, lime_info, contribution]
    model_work = dict(concurrency_id="model")
    analysed = analyse_button.click(handlers.study, [upload, description, session], study_outputs, api_name="analyse",
                                    **model_work)
    analysed.success(handlers.explore, explore_inputs, explore_outputs, api_name="explain", **model_work)
    for button, example in example_buttons:
        button.click(partial(_example_files, example.path), None, [upload, description], api_visibility="private").then(
            handlers.study, [upload, description, session], study_outputs, api_visibility="private",
            **model_work).success(handlers.explore, explore_inputs, explore_outputs, api_visibility="private",
                                  **model_work)
    for control in (target, series):
        control.input(handlers.explore, explore_inputs, explore_outputs, api_visibility="private", **model_work)
    for control in (plane, opacity):
        control.input(handlers.view, explore_inputs, view, api_name=f"view_{control.elem_id}")
    upload.upload(lambda: "", None, description, api_visibility="private")  # a new study: its own description
    show_all.input(handlers.diagnoses, [session, show_all], diagnosis_plot, api_visibility="private")
    slice_index = gr.Number(visible=False, value=-1)
    for kind, button in export_buttons.items():
        button.click(partial(handlers.export, kind), [session, target, series, plane, opacity, slice_index],
                     export_file, api_name=f"export_{kind}", js=ACTIVE_SLICE_JS if kind == "view" else None)
    return session


def _example_files(path: Path) -> tuple[list[str], str]:
    """An example's file for the upload box, and an empty description (the example's own is used)."""
    return [str(path)], ""


def _compare_tab(handlers: Handlers, examples: list[ExampleStudy]):
    _notice()
    pair = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=lambda p: [close_session(s) for s in p or ()])
    with gr.Row():
        pre = gr.File(label="Before (pre)", file_count="multiple", elem_id="compare-pre")
        post = gr.File(label="After (post)", file_count="multiple", elem_id="compare-post")
    with gr.Row():
        compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
        roles = {e.role: e for e in examples if e.role}
        pair_button = None
        if {"pre", "post"} <= roles.keys():
            pair_button = gr.Button(f"Example pair: {roles['pre'].title} → {roles['post'].title}", size="sm",
                                    elem_id="example-pair")
    change_plot = gr.Plot(elem_id="change-chart", show_label=False)
    with gr.Row():
        target = gr.Dropdown(label="Diagnosis shown on both", choices=[], elem_id="compare-target")
        plane = gr.Radio(list(viewer.PLANES), value="axial", label="Plane", elem_id="compare-plane")
    compare_view = gr.Plot(elem_id="compare-viewer", show_label=False)
    compared = compare_button.click(handlers.compare, [pre, post, pair], [pair, change_plot, target], api_name="compare",
                                    concurrency_id="model")
    compared.success(handlers.compare_view, [pair, target, plane], compare_view, api_name="compare_view",
                     concurrency_id="model")
    if pair_button is not None:
        pair_button.click(lambda: ([str(roles["pre"].path)], [str(roles["post"].path)]), None, [pre, post],
                          api_visibility="private").then(
            handlers.compare, [pre, post, pair], [pair, change_plot, target], api_visibility="private",
            concurrency_id="model").success(handlers.compare_view, [pair, target, plane], compare_view,
                                            api_visibility="private", concurrency_id="model")
    for control in (target, plane):
        control.input(handlers.compare_view, [pair, target, plane], compare_view, api_visibility="private",
                      concurrency_id="model")


def _ask_tab(handlers: Handlers, session: gr.State):
    _notice()
    gr.Markdown("Score a finding in your own words against the study analysed in **Explore**, through the CLIP "
                "text tower (zero-shot), and see which diagnoses its wording is nearest to.")
    text = gr.Textbox(label="Finding", placeholder="ring-enhancing lesion with surrounding edema", elem_id="ask-text")
    button = gr.Button("Ask", variant="primary", elem_id="ask-button")
    answer = gr.Markdown(elem_id="ask-result")
    button.click(handlers.ask, [session, text], answer, api_name="ask")
    text.submit(handlers.ask, [session, text], answer, api_visibility="private")


def _about_tab(release: Release):
    _notice()
    gr.Markdown(f"Model **{release.config.name}** (revision `{release.revision or 'local'}`), loaded from "
                f"`{Path(release.path).name}`.\n\n" + model_card(release), elem_id="model-card")
    calibration = Path(release.path) / "evaluation" / "reliability.png"
    if calibration.is_file():
        gr.Image(str(calibration), label="Calibration (reliability diagram, test split)", interactive=False)


def build_demo(weights: str | Path | None = None) -> gr.Blocks:
    """The app. ``weights``: a release folder or ``hf://owner/repo``; default ``PRIMA_WEIGHTS``, else the
    bundled prima-lite release. A release that cannot be loaded gives a page that says why."""
    source = weights or os.environ.get("PRIMA_WEIGHTS") or DEFAULT_WEIGHTS
    try:
        release = ready_release(source)
    except (ReleaseError, OSError, ValueError) as error:
        return error_demo(source, error)
    handlers = Handlers(release)
    examples = example_studies()
    with gr.Blocks(title="Prima — brain MRI", delete_cache=(max(1, min(60, UPLOAD_SECONDS // 4)), UPLOAD_SECONDS)) as demo:
        gr.Markdown("# Prima\nA brain-MRI vision-language model: 52 diagnoses, a worklist priority, referrals and "
                    "LIME heatmaps over 3D volume tokens, from a whole study.")
        with gr.Tab("Explore", elem_id="tab-explore"):
            session = _explore_tab(handlers, examples)
        with gr.Tab("Compare pre/post", elem_id="tab-compare"):
            _compare_tab(handlers, examples)
        with gr.Tab("Ask in words", elem_id="tab-ask"):
            _ask_tab(handlers, session)
        with gr.Tab("About", elem_id="tab-about"):
            _about_tab(release)
    return demo


def error_demo(source: str | Path, error: Exception) -> gr.Blocks:
    """The page served when the weights cannot be loaded: what failed and how to fix it."""
    with gr.Blocks(title="Prima — weights unavailable") as demo:
        gr.Markdown(f"# Prima cannot start its model\n\nThe weights at `{source}` could not be loaded:\n\n"
                    f"> {error}\n\nSet `PRIMA_WEIGHTS` to a release folder (for example the bundled "
                    f"`assets/weights/prima-lite`) or to `hf://owner/repo`, then restart the app.\n\n{NOTICE}",
                    elem_id="weights-error")
    return demo
