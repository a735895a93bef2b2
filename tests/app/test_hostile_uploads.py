"""The hostile-input corpus (tests/helpers/hostile.py) uploaded to the running app through its API.

Each upload gives a plain error (or a partial load naming what was skipped), never a traceback; the
server still answers afterwards; uploads and extracted archives are gone from the server's temp
folder; its memory is back near where it was.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from helpers.app_server import running_app
from helpers.hostile import GOOD_SERIES, LOADED, PARTIAL, REFUSED, build_corpus

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "normal_dwi.zip"
MEMORY_SLACK_MB = 300  # allocator caches and imported codecs; a leaked study would be far more


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def leftovers(temp: Path, names: set[str]) -> list[Path]:
    """Uploaded files (by name) and extracted archives still in the server's temp folder."""
    return [p for p in temp.rglob("*") if p.name in names or p.name.startswith("prima-study-")]


UPLOAD_SECONDS = 8  # this server's upload lifetime: short, so the test sees the sweep


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """An app of its own: a short upload lifetime, and no other test's files in its temp folder."""
    with running_app(tmp_path_factory.mktemp("hostile-app"), PRIMA_UPLOAD_TTL=str(UPLOAD_SECONDS)) as server:
        yield server


def test_hostile_uploads_give_plain_answers(app_server, tmp_path):
    client = Client(app_server.url, verbose=False)
    client.predict([handle_file(str(EXAMPLE))], "", api_name="/analyse")  # warm: first-call allocations
    baseline = rss_mb(app_server.pid)
    cases = [case for case in build_corpus(tmp_path / "corpus") if case.uploadable]
    failures = []
    for case in cases:
        try:
            outputs = client.predict([handle_file(str(path)) for path in case.sources], "", api_name="/analyse")
        except AppError as error:
            message = str(error)
            if case.outcome != REFUSED or "Could not load this study" not in message or case.match not in message:
                failures.append(f"{case.name}: error {message[:300]!r}")
            if "Traceback" in message:
                failures.append(f"{case.name}: a traceback reached the user")
            continue
        summary, skipped = outputs[0], [f"{row[0]}: {row[1]}" for row in outputs[6]["data"]]
        names = [row[0] for row in outputs[5]["data"]]
        if case.outcome == REFUSED:
            failures.append(f"{case.name}: loaded {names}")
        elif case.outcome == PARTIAL and (GOOD_SERIES not in names or not any(case.match in s for s in skipped)
                                          or "skipped" not in summary):
            failures.append(f"{case.name}: {names} / {skipped}")
        elif case.outcome == LOADED and not any(case.match in name for name in names):
            failures.append(f"{case.name}: {names}")
    assert failures == [], "\n".join(failures)
    # the server still answers, and for another user too
    assert "2 series loaded" in Client(app_server.url, verbose=False).predict(
        [handle_file(str(EXAMPLE))], "", api_name="/analyse")[0]
    assert list(app_server.temp.glob("prima-study-*")) == []  # extracted archives go with their request
    names = {path.name for case in cases for path in case.sources}
    deadline = time.monotonic() + 4 * UPLOAD_SECONDS
    while leftovers(app_server.temp, names) and time.monotonic() < deadline:
        time.sleep(1)
    assert leftovers(app_server.temp, names) == []  # uploads go with the cache sweep
    assert rss_mb(app_server.pid) < baseline + MEMORY_SLACK_MB
