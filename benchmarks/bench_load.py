"""Concurrent users against the app: every request completes, correctly, and reaches its own client.

Starts ``python app.py`` (bundled prima-lite, the default queue) on a free localhost port and drives it
with ``--clients`` concurrent ``gradio_client`` clients, each analysing ``--studies`` different studies
(the shipped examples, then synthetic studies from the engine with other findings) and explaining
each one's top diagnosis. Every answer is checked against ``prima.predict`` run here on the same study:
the top finding in the summary and every logit of the exported prediction (bitwise: same CPU, same
precision), so a result that reached the wrong client cannot pass. Prints p50/p95 latency per call,
the errors, the server's peak RSS; exits non-zero on any failure.

    python benchmarks/bench_load.py [--clients 8] [--studies 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_app import free_port, peak_rss_mb, start_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prima.predict import predict, ready_release  # noqa: E402
from training.synth.examples import Example, build_example  # noqa: E402

# Synthetic studies beyond the shipped examples, chosen for findings the examples do not have.
QUEUE_BOUND = 32  # app.py's default PRIMA_QUEUE_SIZE
EXTRA_FINDINGS = (("vascular_ischemic_large_vessel_stroke",), ("trauma_subdural_hematoma",), ("tumor_adult_meningioma",),
                  ("infectious_brain_abscess",), ("ventricular_ventriculomegaly",), ("inflammatory_multiple_sclerosis",))


@dataclass
class Expected:
    path: Path
    top_name: str  # display name of the top finding prima.predict gives
    logits: list[float]  # every diagnosis logit


def study_pool(count: int, folder: Path, release) -> list[Expected]:
    """``count`` studies whose top findings differ from each other's (examples first)."""
    def candidates():
        for name in ("glioma_high_grade.zip", "normal_dwi.zip", "glioma_after_resection.zip"):
            yield REPO / "assets" / "examples" / name
        for i, keys in enumerate(EXTRA_FINDINGS):  # synthesised only when the examples are not enough
            yield build_example(Example(f"load_{i}.zip", 100 + i, keys, 2, keys[0]), folder)

    pool: list[Expected] = []
    for path in candidates():
        prediction = predict(path, release)
        top = prediction.differential[0].name
        if top not in {e.top_name for e in pool}:
            pool.append(Expected(path, top, [d.logit for d in prediction.diagnoses]))
        if len(pool) == count:
            return pool
    print(f"note: only {len(pool)} studies with distinct top findings; the others repeat", file=sys.stderr)
    return pool


def run_client(url: str, studies: list[Expected], latencies: dict[str, list[float]], failures: list[str]) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    for study in studies:
        try:
            started = time.perf_counter()
            outputs = client.predict([handle_file(str(study.path))], "", api_name="/analyse")
            latencies["analyse"].append(time.perf_counter() - started)
            summary, target, series = outputs[0], outputs[7]["value"], outputs[8]["value"]
            if f"top finding: **{study.top_name}**" not in summary:
                failures.append(f"{study.path.name}: summary {summary!r} does not name {study.top_name!r}")
            started = time.perf_counter()
            info = client.predict(target, series, "axial", 0.5, api_name="/explain")[2]
            latencies["explain"].append(time.perf_counter() - started)
            if "surrogate R²" not in info:
                failures.append(f"{study.path.name}: explain answered {info!r}")
            started = time.perf_counter()
            exported = client.predict(target, series, "axial", 0.5, -1, api_name="/export_prediction")
            latencies["export"].append(time.perf_counter() - started)
            logits = [d["logit"] for d in json.loads(Path(exported).read_text())["diagnoses"]]
            if logits != study.logits:
                failures.append(f"{study.path.name}: the exported prediction is not this study's")
        except Exception as error:  # a failed request is a finding of the benchmark, reported below
            failures.append(f"{study.path.name}: {type(error).__name__}: {error}")


def watch_queue(url: str, sizes: list[int], stop: threading.Event) -> None:
    """Poll Gradio's queue status: how many requests wait, every 0.25 s."""
    import urllib.request

    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}gradio_api/queue/status", timeout=2) as response:
                sizes.append(int(json.loads(response.read())["queue_size"]))
        except OSError:
            pass
        stop.wait(0.25)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent users")
    parser.add_argument("--studies", type=int, default=3, help="studies per user (distinct top findings)")
    args = parser.parse_args()
    release = ready_release(REPO / "assets" / "weights" / "prima-lite", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pool = study_pool(args.studies + max(0, min(args.clients, 3) - 1), Path(tmp), release)
        print(f"{len(pool)} studies: " + ", ".join(f"{e.path.name} -> {e.top_name}" for e in pool))
        port = free_port()
        server = start_server(port, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{port}/"
        try:
            baseline = peak_rss_mb(server.pid)
            latencies: dict[str, list[float]] = {"analyse": [], "explain": [], "export": []}
            failures: list[str] = []
            threads = [threading.Thread(target=run_client, args=(
                url, [pool[(c + k) % len(pool)] for k in range(args.studies)], latencies, failures))
                for c in range(args.clients)]
            queue_sizes: list[int] = []
            stop = threading.Event()
            watcher = threading.Thread(target=watch_queue, args=(url, queue_sizes, stop))
            watcher.start()
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            stop.set()
            watcher.join()
            if max(queue_sizes, default=0) > QUEUE_BOUND:
                failures.append(f"the queue grew to {max(queue_sizes)} waiting requests, beyond {QUEUE_BOUND}")
            requests = sum(len(v) for v in latencies.values())
            print(f"{args.clients} clients x {args.studies} studies: {requests} requests in {wall:.0f} s, "
                  f"{len(failures)} failures; server peak RSS {peak_rss_mb(server.pid):.0f} MB (idle {baseline:.0f})")
            print(f"  queue: at most {max(queue_sizes, default=0)} requests waiting over {len(queue_sizes)} polls "
                  f"(the app's bound {QUEUE_BOUND})")
            for name, values in latencies.items():
                print(f"  {name:8s} n={len(values):3d}  p50 {percentile(values, 0.5):6.1f} s  "
                      f"p95 {percentile(values, 0.95):6.1f} s")
            for failure in failures:
                print(f"  FAILED {failure}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
