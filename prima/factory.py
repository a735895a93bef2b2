"""Model factory: a model is a small JSON file in ``model_configs/`` named after it.

    >>> from prima.factory import create_model, list_models
    >>> model = create_model("prima-lite")
"""

from __future__ import annotations

import json
from pathlib import Path

from prima.config import PrimaConfig
from prima.errors import ConfigError
from prima.models.clip import PrimaCLIP

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def list_models() -> list[str]:
    """Names of the shipped model configs, sorted."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> PrimaConfig:
    """The config of a shipped model; an unknown name raises ``ConfigError`` listing the known ones."""
    known = list_models()
    if name not in known:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(known)}")
    text = (_CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config {name!r} is not valid JSON: {exc}") from exc
    return PrimaConfig.from_dict(doc)


def create_model(name_or_config: str | PrimaConfig) -> PrimaCLIP:
    """A randomly initialised CLIP model (``.visual`` = the hViT, ``.text`` = the GPT-2 tower)."""
    config = name_or_config if isinstance(name_or_config, PrimaConfig) else get_model_config(name_or_config)
    return PrimaCLIP(config)
