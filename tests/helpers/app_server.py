"""Starting the app as a user does (`python app.py`) for tests: a free port, a private temp folder."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    pid: int
    temp: Path  # the server's TMPDIR and GRADIO_TEMP_DIR: uploads, extracted archives, exports
    log: Path  # everything the server printed


@contextlib.contextmanager
def running_app(root: Path, max_file_bytes: int | None = None, **env: str) -> Iterator[AppServer]:
    """`python app.py` as a user starts it, on a free port with its own temp folder; stopped on exit.

    ``max_file_bytes`` caps every file the server writes (RLIMIT_FSIZE): a disk that fills up.
    """
    port = free_port()
    temp = root / "server-tmp"
    temp.mkdir(parents=True)
    log = root / "server.log"
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), TMPDIR=str(temp),
               GRADIO_TEMP_DIR=str(temp / "gradio"), **env)
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, preexec_fn=None if max_file_bytes is None else
                                  lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
    try:
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
            pytest.fail(f"app did not answer on {url} within 120 s:\n{log.read_text()}")
        yield AppServer(url, server.pid, temp, log)
    finally:
        server.terminate()
        server.wait(timeout=30)
