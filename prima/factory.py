"""Builders, in one place: a model is a small JSON file in ``model_configs/`` named after it, and every
learnable part of a release (CLIP model, volume tokenizer, task heads) is built from its config here.

    >>> from prima.factory import create_model, create_volume_tokenizer, create_heads
    >>> model = create_model("prima-lite")
    >>> volume_tokenizer = create_volume_tokenizer("prima-lite")
    >>> heads = create_heads("prima-lite")
"""

from __future__ import annotations

import json
from pathlib import Path

from prima.config import PrimaConfig, VolumeTokenizerConfig
from prima.errors import ConfigError
from prima.models.clip import PrimaCLIP
from prima.models.heads import TaskHeads
from prima.models.vqvae import VQVAE

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


def _config(name_or_config: str | PrimaConfig) -> PrimaConfig:
    return name_or_config if isinstance(name_or_config, PrimaConfig) else get_model_config(name_or_config)


def create_model(name_or_config: str | PrimaConfig) -> PrimaCLIP:
    """A randomly initialised CLIP model (``.visual`` = the hViT, ``.text`` = the GPT-2 report tower)."""
    return PrimaCLIP(_config(name_or_config))


def create_volume_tokenizer(name_or_config: str | PrimaConfig | VolumeTokenizerConfig) -> VQVAE:
    """A randomly initialised VQ-VAE volume tokenizer from a model name, a model config or its own section."""
    if isinstance(name_or_config, VolumeTokenizerConfig):
        return VQVAE(name_or_config)
    return VQVAE(_config(name_or_config).volume_tokenizer)


def create_heads(name_or_config: str | PrimaConfig) -> TaskHeads:
    """Task heads on the study embedding, sized by the config's label space, carrying its thresholds."""
    config = _config(name_or_config)
    space = config.label_space
    return TaskHeads(
        config.vision.study.out_dim,
        config.heads,
        n_diagnoses=len(space.diagnoses),
        n_referrals=len(space.referral_keys),
        n_tiers=len(space.priority_tiers),
        diagnosis_thresholds=config.diagnosis_thresholds,
        referral_thresholds=config.referral_thresholds,
    )
