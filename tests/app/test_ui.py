"""The app's plain functions, without a browser."""

from __future__ import annotations

import gradio as gr
import nibabel as nib
import numpy as np
import pytest

from app.ui import example_studies, load_uploaded_study, on_load, series_rows, skipped_rows


@pytest.fixture()
def two_nifti_series(tmp_path):
    affine = np.diag([-1.0, -1.0, 4.0, 1.0])
    rng = np.random.default_rng(0)
    paths = []
    for name in ("AX_T2", "AX_FLAIR"):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((64, 64, 20), dtype=np.float32), affine), path)
        paths.append(str(path))
    return paths


def test_on_load_fills_state_and_tables(two_nifti_series):
    study, summary, rows, skipped = on_load(two_nifti_series)
    assert [r[0] for r in rows] == ["AX_T2", "AX_FLAIR"]
    assert all(r[1] == "axial" for r in rows)
    assert rows[0][2] == "64 x 64 x 20"
    assert skipped == []
    assert "2 series loaded" in summary
    assert study.series[0].name == "AX_T2"


def test_missing_upload_is_a_gradio_error():
    with pytest.raises(gr.Error, match="Upload a study first"):
        load_uploaded_study(None)


def test_unreadable_upload_is_a_gradio_error(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an MRI")
    with pytest.raises(gr.Error, match="Could not load this study"):
        load_uploaded_study([str(bogus)])


def test_rows_render_skipped_series(two_nifti_series):
    study = load_uploaded_study(two_nifti_series)
    assert skipped_rows(study) == []
    assert len(series_rows(study)) == 2


def test_examples_listing_ignores_other_files(tmp_path):
    (tmp_path / "study.zip").write_bytes(b"")
    (tmp_path / "README.md").write_text("x")
    assert example_studies(tmp_path) == [str(tmp_path / "study.zip")]
    assert example_studies(tmp_path / "missing") == []
