"""Fixtures for the app tests: a running app server and a headless Debian chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers.app_server import running_app

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The app the browser and API tests share."""
    with running_app(tmp_path_factory.mktemp("app")) as server:
        yield server


@pytest.fixture(scope="session")
def app_url(app_server) -> str:
    return app_server.url


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
