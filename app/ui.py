"""The Gradio interface. A thin layer: every function here calls ``prima``'s public API and is a
plain function testable without a browser; per-user data lives in ``gr.State``, never in globals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import gradio as gr

from prima.errors import StudyLoadError
from prima.io import Study, load_study

SERIES_COLUMNS = ["Series", "Plane", "Shape (L x P x S)", "Spacing (mm)", "Stored orientation"]
SKIPPED_COLUMNS = ["Skipped series", "Reason"]
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


def example_studies(folder: Path = EXAMPLES_DIR) -> list[str]:
    """Paths of the example studies shipped in ``assets/examples`` (zips and NIfTI files)."""
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix in {".zip", ".nii", ".gz"})


def load_uploaded_study(paths: str | Sequence[str] | None) -> Study:
    """Load what a user uploaded: one zip or folder, or several DICOM / NIfTI files.

    Raises:
        gr.Error: with a message a person can act on when nothing usable was uploaded.
    """
    if not paths:
        raise gr.Error("Upload a study first: a .zip of a DICOM folder, DICOM files, or NIfTI files.")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources = [str(p) for p in paths]
    try:
        return load_study(sources[0] if len(sources) == 1 else sources)
    except StudyLoadError as error:
        raise gr.Error(f"Could not load this study: {error}") from error


def series_rows(study: Study) -> list[list[str]]:
    """One table row per loaded series."""
    return [
        [
            s.name,
            s.plane,
            " x ".join(str(n) for n in s.array.shape),
            " x ".join(f"{v:.2f}" for v in s.spacing),
            s.source_orientation,
        ]
        for s in study.series
    ]


def skipped_rows(study: Study) -> list[list[str]]:
    """One table row per series that could not be used, with the reason."""
    return [[s.name, s.reason] for s in study.skipped]


def study_summary(study: Study) -> str:
    description = study.description or "(no study description)"
    text = f"**{description}** — {len(study.series)} series loaded"
    if study.skipped:
        text += f", {len(study.skipped)} skipped"
    return text


def on_load(paths: str | Sequence[str] | None):
    study = load_uploaded_study(paths)
    return study, study_summary(study), series_rows(study), skipped_rows(study)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Prima — brain MRI") as demo:
        gr.Markdown(
            "# Prima\nUpload a whole brain MRI study — a `.zip` of a DICOM folder, DICOM files or "
            "NIfTI files — to see its series. Research software: not for clinical use."
        )
        study_state = gr.State(None)  # the loaded Study of this browser session only
        with gr.Row():
            upload = gr.File(label="MRI study", file_count="multiple", elem_id="study-upload")
        load_button = gr.Button("Load study", variant="primary", elem_id="load-study")
        examples = example_studies()
        if examples:
            gr.Examples(examples=[[[p]] for p in examples], inputs=[upload], label="Example studies")
        summary = gr.Markdown(elem_id="study-summary")
        series_table = gr.Dataframe(headers=SERIES_COLUMNS, label="Series", interactive=False,
                                    elem_id="series-table")
        skipped_table = gr.Dataframe(headers=SKIPPED_COLUMNS, label="Skipped", interactive=False,
                                     elem_id="skipped-table")
        load_button.click(on_load, inputs=[upload],
                          outputs=[study_state, summary, series_table, skipped_table])
    return demo
