"""app.session: analysis, cached explanations, exports aligned with the series and free of identifiers."""

from __future__ import annotations

import gzip
import json
import logging
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.viewer import pixel_size
from app.session import (analyse, close_session, default_series, default_target, explanation, export_dicom_zip,
                         export_heatmap, export_prediction, export_view, prediction_document, view_volume)
from helpers.privacy import SECRETS, write_identified_study
from prima.explain import heatmap
from prima.io import load_study
from prima.predict import predict
from prima.preprocess import grid_anchor, preprocess_series

@pytest.fixture(scope="module")
def identified_study(tmp_path_factory, mni_template):
    return write_identified_study(tmp_path_factory.mktemp("identified"), *mni_template)


def test_the_session_predicts_what_prima_predicts(normal_session, lite_release):
    direct = predict(load_study(normal_session_source()), lite_release)
    assert [d.logit for d in normal_session.prediction.diagnoses] == [d.logit for d in direct.diagnoses]
    assert normal_session.prediction.priority == direct.priority


def normal_session_source() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "examples" / "normal_dwi.zip"


def test_display_volumes_are_on_the_token_grid(normal_session, lite_release):
    study = load_study(normal_session_source())
    for series, volume, tokens in zip(study.series, normal_session.volumes, normal_session.prediction.tokens.series):
        assert volume.shape == tuple(tokens.shape) and volume.dtype == np.uint8
        head_centre = grid_anchor(study.series, lite_release.config.preprocess)
        np.testing.assert_allclose(preprocess_series(series, lite_release.config.preprocess, head_centre).affine,
                                   tokens.affine)


def test_explanations_are_computed_once(normal_session, lite_release):
    target = default_target(normal_session.prediction)
    series = default_series(normal_session, target)
    first = explanation(normal_session, lite_release, target, series)
    assert explanation(normal_session, lite_release, target, series) is first


def test_default_series_is_the_one_the_diagnosis_leans_on(normal_session):
    target = default_target(normal_session.prediction)
    column = normal_session.contribution.diagnosis_keys.index(target)
    assert default_series(normal_session, target) == int(np.argmax(normal_session.contribution.deltas[:, column]))


def test_heatmap_export_is_aligned_with_the_series(normal_session):
    (target, series), lime = next(iter(normal_session.explanations.items()))
    tokens = normal_session.prediction.tokens.series[series]
    image = nib.load(export_heatmap(normal_session, lime))
    np.testing.assert_allclose(image.affine, tokens.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), heatmap(lime, tokens))
    # the hottest voxel lies inside the original series' field of view (same world space)
    original = load_study(normal_session_source()).series[series]
    hottest = np.unravel_index(np.argmax(np.asarray(image.dataobj)), image.shape)
    world = image.affine @ np.array([*hottest, 1.0])
    voxel = np.linalg.solve(original.affine, world)[:3]
    assert np.all(voxel > -1) and np.all(voxel < np.array(original.array.shape))


def test_view_export_is_the_rendered_slice(normal_session):
    from PIL import Image

    (target, series), lime = next(iter(normal_session.explanations.items()))
    volume = view_volume(normal_session, series, lime)
    path = export_view(normal_session, volume, "coronal", 100, 0.5)
    with Image.open(path) as png:
        # square pixels: the 5 mm slice axis is stretched to its physical height
        dx, dy = pixel_size(volume, "coronal")
        assert png.format == "PNG" and png.size == (volume.image.shape[0], round(volume.image.shape[2] * dy / dx))


def test_prediction_export_holds_outputs_and_explanations(normal_session):
    doc = json.loads(export_prediction(normal_session).read_text())
    assert len(doc["diagnoses"]) == 52 and doc["priority"]["tier"] in ("low", "medium", "high")
    assert len(doc["explanations"]) == len(normal_session.explanations)
    assert set(doc["series_contribution"]["deltas"]) == set(normal_session.series_names)
    assert "embedding" not in doc and "timings_s" not in doc


def test_dicom_export_is_a_deidentified_zip_over_the_source_slices(normal_session, tmp_path):
    import pydicom

    (target, series), lime = next(iter(normal_session.explanations.items()))
    path = export_dicom_zip(normal_session, lime)
    assert path.name == f"prima-dicom-{target}-series{series}.zip" and path.parent == normal_session.workdir
    assert [p.name for p in normal_session.workdir.iterdir() if p.is_dir()] == []  # no staging left behind
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path)
    folder = tmp_path / path.stem
    manifest = json.loads((folder / "prima-dicom.json").read_text())
    assert manifest["deidentified"] and manifest["target"] == target
    original = load_study(normal_session_source()).series[series]
    slices = original.shape[original.through_axis]
    pm = pydicom.dcmread(folder / "parametric_map.dcm")
    assert int(pm.NumberOfFrames) == slices == len(list((folder / "source").iterdir()))
    assert pm.StudyInstanceUID != original.meta["study_uid"] and pm.PatientIdentityRemoved == "YES"
    assert pydicom.dcmread(folder / "report.dcm").StudyInstanceUID == pm.StudyInstanceUID


def _zip_texts(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [archive.read(name).decode("latin-1") for name in archive.namelist()] + archive.namelist()


def test_exports_and_logs_carry_no_identifiers(identified_study, lite_release, caplog):
    caplog.set_level(logging.DEBUG)
    session = analyse(identified_study, lite_release)
    try:
        target = default_target(session.prediction)
        lime = explanation(session, lite_release, target, 0)
        files = [export_prediction(session), export_heatmap(session, lime),
                 export_view(session, view_volume(session, 0, lime), "axial", 10, 0.5)]
        assert session.prediction.study["description"] == "MRI BRAIN"
        texts = [json.dumps(prediction_document(session)), caplog.text]
        texts += [gzip.decompress(p.read_bytes()).decode("latin-1") if p.suffix == ".gz" else
                  p.read_bytes().decode("latin-1") for p in files]
        texts += _zip_texts(export_dicom_zip(session, lime))  # the DICOM export is always de-identified
        for text in texts:
            for secret in SECRETS:
                assert secret not in text
    finally:
        close_session(session)
    assert not session._workdir.exists()
