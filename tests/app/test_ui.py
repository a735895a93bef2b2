"""app.ui: the handlers behind the interface, called as plain functions (no server, no browser)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.session import StudySession
from app.ui import Handlers, build_demo, example_studies, model_card, target_choices

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def no_progress(fraction, desc=None):
    pass


@pytest.fixture(scope="module")
def handlers(lite_release):
    return Handlers(lite_release)


def test_examples_come_from_the_catalogue():
    examples = example_studies(EXAMPLES)
    assert {e.path.name for e in examples} == {"glioma_high_grade.zip", "glioma_after_resection.zip", "normal_dwi.zip"}
    assert {e.role for e in examples} == {"pre", "post", ""}
    assert all(e.title for e in examples)
    assert example_studies(EXAMPLES / "missing") == []


def test_study_without_upload_says_what_to_do(handlers):
    with pytest.raises(gr.Error, match="Upload a study first"):
        handlers.study(None, "", None, progress=no_progress)


def test_a_file_that_is_not_an_image_gives_a_plain_error(handlers, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(gr.Error, match="Could not load this study"):
        handlers.study([str(bad)], "", None, progress=no_progress)


def test_too_many_loose_files_are_refused(lite_release, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"IM{i}.dcm")
        files[-1].write_bytes(b"x")
    with pytest.raises(gr.Error, match="3 files uploaded; the limit is 2"):
        Handlers(lite_release, max_files=2).study([str(f) for f in files], "", None, progress=no_progress)


def test_study_fills_every_output(handlers):
    outputs = handlers.study([str(EXAMPLES / "normal_dwi.zip")], "", None, progress=no_progress)
    session, summary, description, priority, *_, target, series = outputs
    try:
        assert isinstance(session, StudySession)
        assert "2 series loaded" in summary and description == session.prediction.study["description"]
        assert target["value"] == session.prediction.differential[0].key
        assert target["choices"] == target_choices(session)
        figure, figure_3d, info, contribution = handlers.explore(session, target["value"], series["value"], "axial",
                                                                 0.5, progress=no_progress)
        assert "surrogate R²" in info and figure.layout.sliders[0].steps
        assert len(session.explanations) == 1
        handlers.view(session, target["value"], series["value"], "sagittal", 0.2)
        assert len(session.explanations) == 1  # a plane change never reruns LIME
        assert Path(handlers.export("heatmap", session, target["value"], series["value"], "axial", 0.5, -1)).is_file()
        assert "Nearest diagnoses" in handlers.ask(session, "ring-enhancing lesion")
    finally:
        session.close()


def test_an_edited_description_overrides_the_dicom_one(handlers):
    outputs = handlers.study([str(EXAMPLES / "normal_dwi.zip")], "MR HEAD TRAUMA", None, progress=no_progress)
    outputs[0].close()
    assert outputs[2] == "MR HEAD TRAUMA"


def test_handlers_refuse_work_without_a_study(handlers):
    with pytest.raises(gr.Error, match="Analyse a study first"):
        handlers.explore(None, "x", 0, "axial", 0.5, progress=no_progress)
    with pytest.raises(gr.Error, match="Analyse a study first"):
        handlers.ask(None, "mass")
    with pytest.raises(gr.Error, match="Compare two studies first"):
        handlers.compare_view(None, "x", "axial", progress=no_progress)
    with pytest.raises(gr.Error, match="both studies"):
        handlers.compare(None, [str(EXAMPLES / "normal_dwi.zip")], None, progress=no_progress)


def test_empty_question_and_missing_heatmap_are_explained(handlers, normal_session):
    with pytest.raises(gr.Error, match="Type a finding"):
        handlers.ask(normal_session, "  ")
    with pytest.raises(gr.Error, match="Explain a diagnosis first"):
        handlers.export("heatmap", normal_session, "structural_edema", 99, "axial", 0.5, -1)


def test_dicom_export_needs_dicom_files_still_on_the_server(handlers, normal_session, lite_release, tmp_path):
    import dataclasses

    import nibabel as nib
    import numpy as np

    from app.session import analyse
    from prima.explain import explain

    (target, series), _ = next(iter(normal_session.explanations.items()))
    path = Path(handlers.export("dicom", normal_session, target, series, "axial", 0.5, -1))
    assert path.suffix == ".zip" and path.is_file()
    gone = dataclasses.replace(normal_session, sources=[str(tmp_path / "swept.zip")])
    with pytest.raises(gr.Error, match="upload the study again"):
        handlers.export("dicom", gone, target, series, "axial", 0.5, -1)
    nifti = tmp_path / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 44, 10)).astype(np.float32),
                             np.diag([2.0, 2.0, 5.0, 1.0])), nifti)
    session = analyse([str(nifti)], lite_release)
    try:
        key = session.prediction.differential[0].key
        session.explanations[(key, 0)] = explain(session.prediction.tokens, lite_release, key, 0, num_samples=16)
        with pytest.raises(gr.Error, match="No DICOM export for this series: .*loaded from NIfTI"):
            handlers.export("dicom", session, key, 0, "axial", 0.5, -1)
    finally:
        session.close()


def test_compare_charts_the_change_and_shows_both(handlers):
    pair, chart, target = handlers.compare([str(EXAMPLES / "glioma_high_grade.zip")],
                                           [str(EXAMPLES / "glioma_after_resection.zip")], None, progress=no_progress)
    try:
        changes = [abs(v) for v in chart.data[0].x]
        assert changes == sorted(changes) and target["value"]
        figure = handlers.compare_view(pair, target["value"], "axial", progress=no_progress)
        assert len([t for t in figure.data if t.type == "image"]) == 2
    finally:
        for session in pair:
            session.close()


def test_missing_weights_give_an_explanatory_page(tmp_path):
    demo = build_demo(tmp_path / "no-such-release")
    texts = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("could not be loaded" in text and "PRIMA_WEIGHTS" in text for text in texts)


def test_the_app_has_its_four_tabs_and_a_notice_on_each(lite_release):
    demo = build_demo(lite_release.path)
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Explore", "Compare pre/post", "Ask in words", "About"]
    notices = [b for b in demo.blocks.values() if isinstance(b, gr.Markdown) and "not for clinical use" in (b.value or "")]
    assert len(notices) >= 4


def test_model_card_drops_the_front_matter(lite_release):
    card = model_card(lite_release)
    assert not card.startswith("---") and "Research demo" in card
