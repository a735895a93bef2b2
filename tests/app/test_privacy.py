"""A study with fake patient identifiers through the running app: analyse, explain, every export.

None of the identifiers may appear in what the user gets back, in the server's log, or in any file the
server leaves in its temp folder (other than the user's own upload, which keeps its name until the
cache sweep). The upload is named after the patient, as exports often are: the log must not name it.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

from gradio_client import Client, handle_file

from helpers.privacy import SECRETS, write_identified_study


def _text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".zip":  # the DICOM export: every member's bytes and name
        with zipfile.ZipFile(path) as archive:
            return "\n".join(archive.read(name).decode("latin-1") + name for name in archive.namelist())
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("latin-1")


def test_no_identifier_leaves_the_server(app_server, mni_template, tmp_path):
    study = write_identified_study(tmp_path, *mni_template, zip_name="DOEXAMPLE_JANEQUIRK_PID99887766.zip")
    client = Client(app_server.url, verbose=False)
    outputs = client.predict([handle_file(str(study))], "", api_name="/analyse")
    target, series = outputs[7]["value"], outputs[8]["value"]
    explained = client.predict(target, series, "axial", 0.5, api_name="/explain")
    answers = [json.dumps(outputs, default=str), json.dumps(explained, default=str),
               client.predict("mass", api_name="/ask")]
    exported = [Path(client.predict(target, series, "axial", 0.5, 5, api_name=f"/export_{kind}"))
                for kind in ("prediction", "heatmap", "view", "dicom")]
    texts = answers + [_text(path) for path in exported]
    texts += [_text(path) for path in app_server.temp.rglob("*") if path.is_file() and path.name != study.name]
    texts.append(app_server.log.read_text(encoding="utf-8", errors="replace"))
    leaks = [(secret, text[max(0, text.index(secret) - 60):text.index(secret) + 60]) for secret in SECRETS
             for text in texts if secret in text]
    assert leaks == []
    assert "MRI BRAIN" in outputs[0]  # the study description is shown: it is not an identifier
