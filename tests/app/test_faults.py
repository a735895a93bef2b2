"""Faults: broken weights give a page that explains, one failing request leaves the others alone, a
cancelled request frees what it held."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.ui import build_demo
from helpers.app_server import free_port, running_app

REPO = Path(__file__).resolve().parents[2]
RELEASE = REPO / "assets" / "weights" / "prima-lite"
EXAMPLES = REPO / "assets" / "examples"


def page_texts(demo: gr.Blocks) -> list[str]:
    return [block.value or "" for block in demo.blocks.values() if isinstance(block, gr.Markdown)]


def test_corrupted_weights_give_an_explanatory_page(tmp_path):
    broken = tmp_path / "prima-lite"
    shutil.copytree(RELEASE, broken, ignore=shutil.ignore_patterns("evaluation"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    texts = page_texts(build_demo(broken))
    assert any("could not be loaded" in text and str(broken) in text and "PRIMA_WEIGHTS" in text for text in texts)


def test_a_server_without_weights_starts_and_says_why(tmp_path):
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               PRIMA_WEIGHTS=str(tmp_path / "missing-release"))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, config = time.monotonic() + 120, None
        while time.monotonic() < deadline and config is None:
            assert server.poll() is None, log.read_text()
            try:
                config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
        assert config is not None, log.read_text()
        assert "could not be loaded" in config and "missing-release" in config
        assert "Traceback" not in log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_failing_request_does_not_disturb_another(app_url, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 64)
    results = {}

    def run(name: str, path: Path) -> None:
        try:
            results[name] = Client(app_url, verbose=False).predict([handle_file(str(path))], "", api_name="/analyse")[0]
        except AppError as error:
            results[name] = error

    threads = [threading.Thread(target=run, args=("bad", bad)),
               threading.Thread(target=run, args=("good", EXAMPLES / "normal_dwi.zip"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results["bad"], AppError) and "Could not load this study" in str(results["bad"])
    assert "2 series loaded" in results["good"]


def test_a_cancelled_request_frees_its_resources(app_server, tmp_path):
    upload = tmp_path / "cancelled_upload.zip"
    shutil.copy(EXAMPLES / "glioma_high_grade.zip", upload)
    client = Client(app_server.url, verbose=False)
    job = client.submit([handle_file(str(upload))], "", api_name="/analyse")
    time.sleep(1.0)
    job.cancel()
    # The worker thread finishes what it started (Python threads cannot be killed); then the extracted
    # archive must be gone and the server must serve the next request. (The upload itself goes with
    # the cache sweep, tests/app/test_hostile_uploads.py.)
    deadline = time.monotonic() + 120
    while list(app_server.temp.glob("prima-study-*")):
        if time.monotonic() > deadline:
            pytest.fail(f"left behind after a cancelled request: {list(app_server.temp.glob('prima-study-*'))}")
        time.sleep(0.5)
    assert "2 series loaded" in client.predict([handle_file(str(EXAMPLES / "normal_dwi.zip"))], "",
                                               api_name="/analyse")[0]


def test_a_full_disk_during_an_upload_is_a_plain_error(tmp_path):
    """RLIMIT_FSIZE (2 MB per file) stands in for a disk that fills up while Gradio writes the upload."""
    import httpx

    with running_app(tmp_path, max_file_bytes=2_000_000) as server:
        client = Client(server.url, verbose=False)
        with pytest.raises(httpx.HTTPStatusError) as caught:
            client.predict([handle_file(str(EXAMPLES / "glioma_high_grade.zip"))], "", api_name="/analyse")  # 4 MB
        assert caught.value.response.status_code == 507
        assert "no room to store this upload" in caught.value.response.text
        assert "Traceback" not in server.log.read_text()
        assert "2 series loaded" in client.predict([handle_file(str(EXAMPLES / "normal_dwi.zip"))], "",
                                                   api_name="/analyse")[0]  # 1 MB: fits
