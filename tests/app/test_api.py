"""The Gradio API (gradio_client) drives the app's flows without a browser, one client per user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from prima.predict import predict

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def analyse(client: Client, name: str) -> list:
    """The /analyse outputs; the dropdowns come back as updates: their chosen value is taken."""
    outputs = list(client.predict([handle_file(str(EXAMPLES / name))], "", api_name="/analyse"))
    outputs[7], outputs[8] = outputs[7]["value"], outputs[8]["value"]
    return outputs


def test_analyse_explain_export_and_ask(client, lite_release):
    summary, description, priority, _, _, series_table, _, target, series = analyse(client, "normal_dwi.zip")
    expected = predict(EXAMPLES / "normal_dwi.zip", lite_release)
    assert f"top finding: **{expected.differential[0].name}**" in summary
    assert f'data-tier="{expected.priority.worklist_tier}"' in priority
    assert description == expected.study["description"]
    assert [row[0] for row in series_table["data"]] == [s.name for s in expected.series]
    assert target == expected.differential[0].key
    viewer, view_3d, info, contribution = client.predict(target, series, "axial", 0.5, api_name="/explain")
    assert "surrogate R²" in info and json.loads(viewer["plot"])["layout"]["sliders"]
    document = json.loads(Path(client.predict(target, series, "axial", 0.5, -1, api_name="/export_prediction"))
                          .read_text())
    assert [d["logit"] for d in document["diagnoses"]] == [d.logit for d in expected.diagnoses]
    assert document["explanations"][0]["target"] == target
    assert Path(client.predict(target, series, "coronal", 0.5, 3, api_name="/export_view")).name == \
        "prima-view-coronal-3.png"
    assert "Nearest diagnoses" in client.predict("acute infarct", api_name="/ask")


def test_compare_the_pair(client):
    chart, update = client.predict([handle_file(str(EXAMPLES / "glioma_high_grade.zip"))],
                                   [handle_file(str(EXAMPLES / "glioma_after_resection.zip"))], api_name="/compare")
    assert "post minus pre" in chart["plot"]
    target = update["value"]
    figure = json.loads(client.predict(target, "coronal", api_name="/compare_view")["plot"])
    assert sum(trace["type"] == "image" for trace in figure["data"]) == 2


def test_bad_input_is_an_error_message(client, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AppError, match="Could not load this study"):
        client.predict([handle_file(str(bad))], "", api_name="/analyse")
    fresh = Client(client.src, verbose=False)  # another user: nothing analysed in its session
    with pytest.raises(AppError, match="Analyse a study first"):
        fresh.predict("ring-enhancing", api_name="/ask")


def test_sessions_are_per_user(app_url):
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    glioma = analyse(first, "glioma_high_grade.zip")
    normal = analyse(second, "normal_dwi.zip")
    first_doc = json.loads(Path(first.predict(glioma[7], glioma[8], "axial", 0.5, -1, api_name="/export_prediction"))
                           .read_text())
    second_doc = json.loads(Path(second.predict(normal[7], normal[8], "axial", 0.5, -1,
                                                api_name="/export_prediction")).read_text())
    assert len(first_doc["series"]) == 3 and len(second_doc["series"]) == 2
