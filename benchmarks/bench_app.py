"""The app's targets, measured in a real browser: example click -> first heatmap, slice change, server memory.

Starts ``python app.py`` on a free localhost port (the bundled prima-lite release), drives it with
playwright and Debian's chromium, and prints per example the seconds from the click to the first
heatmap on screen (the first one in a fresh server is cold), the median milliseconds from a press on
the viewer's slider to the new slice on screen (the page's own clock), and the server's peak resident
memory (VmHWM) after the studies. Targets on a 2-core CPU: <= 20 s, <= 150 ms, <= 2 GB.

    python benchmarks/bench_app.py [--examples glioma_high_grade normal_dwi] [--clicks 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from timing import machine_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.browser import WATCH_VIEWER_JS, click_slider  # noqa: E402
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app exited with {server.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"app did not start within 180 s:\n{log.read_text()}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slice_times(page, clicks: int) -> list[float]:
    rail = page.locator("#viewer .slider-rail-rect").first
    rail.scroll_into_view_if_needed()
    box = rail.bounding_box()
    page.evaluate(WATCH_VIEWER_JS)
    for i in range(clicks):
        fraction = 0.05 + 0.9 * ((i * 7) % clicks) / max(clicks - 1, 1)
        click_slider(page, box, fraction, i + 1)
    return page.evaluate("window.__sliceMs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", nargs="+", default=["glioma_high_grade", "normal_dwi"],
                        help="example study stems (assets/examples) to click, in order")
    parser.add_argument("--clicks", type=int, default=20, help="slider presses per example")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(machine_line(torch.get_num_threads(), "cpu"), "(the server: prima-lite, device auto)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(port, Path(tmp) / "server.log")
        try:
            print(f"server started, peak RSS {peak_rss_mb(server.pid):.0f} MB")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
                for stem in args.examples:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.goto(f"http://127.0.0.1:{port}/")
                    button = page.locator(f"#example-{stem}")
                    button.wait_for(timeout=60_000)
                    started = time.perf_counter()
                    button.click()
                    page.locator("#viewer image").first.wait_for(timeout=300_000)
                    first_heatmap = time.perf_counter() - started
                    times = slice_times(page, args.clicks)
                    median = statistics.median(times) if times else float("nan")
                    print(f"{stem}: example -> first heatmap {first_heatmap:.1f} s (target <= 20); slice change "
                          f"median {median:.0f} ms over {len(times)}/{args.clicks} presses (target <= 150), max "
                          f"{max(times, default=float('nan')):.0f} ms; server peak RSS {peak_rss_mb(server.pid):.0f} MB "
                          "(target <= 2048)")
                    page.close()
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
