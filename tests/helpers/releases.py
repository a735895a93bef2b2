"""A release with random weights, as ``prima`` must handle any release: the shipped lite volume tokenizer
(so tokens are real), a randomly initialised CLIP model and heads, a report tokenizer trained on a
few report lines, and for a model reading place deviations a place-normal model of random centroids
modelling every patch of the head grid."""

from __future__ import annotations

from pathlib import Path

import torch

from prima.config import PLANES
from prima.factory import create_heads, create_model, get_model_config
from prima.models.place_normal import PlaceNormalModel, place_keys
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
    place_normal = random_place_normal() if config.vision.token_values == "place_deviation" else None
    return save_release(folder, create_model(config), report_tokenizer=train_report_tokenizer(REPORTS, 300),
                        volume_tokenizer=load_volume_tokenizer(SHIPPED_VOLUME_TOKENIZER), heads=create_heads(config),
                        place_normal=place_normal, model_card=f"# {model} (random weights, for tests)\n")


def random_place_normal(kinds: int = 2, patches: int = 768) -> PlaceNormalModel:
    """Random centroids; every place (kind, plane, patch index below ``patches``: the lite head grid's 8 x 8 x 12)
    modelled with a random mean and sd."""
    places = torch.cat([place_keys(torch.tensor(kind), plane, torch.arange(patches))
                        for kind in range(kinds) for plane in range(len(PLANES))])
    model = PlaceNormalModel(kinds, len(places))
    model.centroids.normal_()
    model.set_places(places, torch.randn(len(places), model.centroids.shape[1]) * 0.1,
                     torch.rand(len(places), model.centroids.shape[1]) * 0.15 + 0.05)
    return model
