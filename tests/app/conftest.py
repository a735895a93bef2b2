"""Fixtures for the app tests: a running app server and a headless Debian chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """Start `python app.py` as a user would and yield its URL; stop it afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app exited with {server.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"app did not answer on {url} within 120 s:\n{log.read_text()}")
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by playwright (`playwright install` cannot download here)."""
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: `make test` should have installed it")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def lite_release():
    """The bundled prima-lite release, the app's default."""
    from prima.predict import ready_release

    return ready_release(REPO / "assets" / "weights" / "prima-lite", device="cpu")


@pytest.fixture(scope="session")
def normal_session(lite_release):
    """The app's session of the shipped normal example (2 series), with one explanation."""
    from app.session import analyse, default_series, default_target, explanation

    session = analyse(REPO / "assets" / "examples" / "normal_dwi.zip", lite_release)
    target = default_target(session.prediction)
    explanation(session, lite_release, target, default_series(session, target))
    yield session
    session.close()
