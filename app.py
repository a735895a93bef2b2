"""Entry point for `make run` and Hugging Face Spaces: serves the Prima app.

Gradio's own variables choose the address: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default
127.0.0.1:7860, so `make run` stays local; Spaces sets them itself). PRIMA_WEIGHTS picks the
release (a folder or hf://owner/repo; default the bundled prima-lite). PRIMA_MAX_UPLOAD bounds an
upload (default 2gb), PRIMA_CONCURRENCY the model calls run at once (default 1: a CPU gains nothing
from more), PRIMA_QUEUE_SIZE the requests waiting (default 32).
"""

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls at run time

from app.ui import EXAMPLES_DIR, build_demo, storage_error_response  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    logging.getLogger("prima.io").setLevel(logging.WARNING)  # its INFO lines name the uploaded files
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name the DICOM objects' UIDs
    demo = build_demo()
    demo.queue(max_size=int(os.environ.get("PRIMA_QUEUE_SIZE", "32")),
               default_concurrency_limit=int(os.environ.get("PRIMA_CONCURRENCY", "1")))
    demo.launch(ssr_mode=False, max_file_size=os.environ.get("PRIMA_MAX_UPLOAD", "2gb"),
                allowed_paths=[str(EXAMPLES_DIR)], app_kwargs={"exception_handlers": {OSError: storage_error_response}})
