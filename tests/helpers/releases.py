"""A release with random weights, as ``prima`` must handle any release: the shipped lite volume tokenizer
(so tokens are real), a randomly initialised CLIP model and heads, and a report tokenizer trained on a
few report lines."""

from __future__ import annotations

from pathlib import Path

import torch

from prima.factory import create_heads, create_model, get_model_config
from prima.models.text import train_report_tokenizer
from prima.release import VOLUME_TOKENIZER_FILE, load_volume_tokenizer, save_release

SHIPPED_VOLUME_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "volume-tokenizer-lite" / VOLUME_TOKENIZER_FILE
REPORTS = [
    "1. Ring-enhancing mass in the left frontal lobe with surrounding vasogenic edema.",
    "1. Acute infarct in the right MCA territory with restricted diffusion.",
    "No acute intracranial abnormality.",
    "1. Extra-axial dural-based enhancing mass, compatible with meningioma.",
] * 4


def write_random_release(folder: Path, model: str = "prima-lite", seed: int = 0) -> Path:
    """Write a random-weights release of ``model`` (with the shipped lite volume tokenizer) to ``folder``."""
    torch.manual_seed(seed)
    config = get_model_config(model)
    return save_release(folder, create_model(config), report_tokenizer=train_report_tokenizer(REPORTS, 300),
                        volume_tokenizer=load_volume_tokenizer(SHIPPED_VOLUME_TOKENIZER), heads=create_heads(config),
                        model_card=f"# {model} (random weights, for tests)\n")
