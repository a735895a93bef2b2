"""Entry point for `make run` and Hugging Face Spaces: serves the Prima app.

PRIMA_HOST / PRIMA_PORT choose the address (default 127.0.0.1:7860; Spaces sets
GRADIO_SERVER_NAME itself, which Gradio honours when PRIMA_HOST is unset).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls at run time

from app.ui import build_demo  # noqa: E402

if __name__ == "__main__":
    port = os.environ.get("PRIMA_PORT")
    build_demo().launch(
        server_name=os.environ.get("PRIMA_HOST"),
        server_port=int(port) if port else None,
        ssr_mode=False,
    )
