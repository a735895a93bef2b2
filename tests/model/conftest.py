"""Shared fixtures for the model tests: a tiny config so forward and backward passes take milliseconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prima.config import NameEncoderConfig, PrimaConfig, SequenceViTConfig, StudyViTConfig, TextConfig, VisionConfig
from prima.factory import get_model_config
from prima.config import TOKEN_DIM


def tiny_config() -> PrimaConfig:
    """prima-lite shrunk further; same architecture, every code path kept."""
    name = NameEncoderConfig(width=32, depth=1, heads=2, head_dim=16, mlp_dim=32, max_length=32, out_dim=TOKEN_DIM)
    return dataclasses.replace(
        get_model_config("prima-lite"),
        name="tiny",
        vision=VisionConfig(
            sequence=SequenceViTConfig(
                depth=2, heads=2, head_dim=16, mlp_dim=64, registers=3, out_dim=48, series_name=name
            ),
            study=StudyViTConfig(
                width=32, depth=2, heads=2, head_dim=16, mlp_dim=64, registers=2,
                description=dataclasses.replace(name, out_dim=32),
            ),
            patdis_hidden=32,
            patdis_dim=16,
        ),
        text=TextConfig(vocab_size=320, context_length=32, width=32, depth=2, heads=2),
    )


@pytest.fixture
def tiny() -> PrimaConfig:
    return tiny_config()


def _random_study(generator: torch.Generator, token_counts: list[int]) -> list[tuple[torch.Tensor, str]]:
    return [(torch.randn(n, TOKEN_DIM, generator=generator), f"AX T{i} FLAIR") for i, n in enumerate(token_counts)]


@pytest.fixture
def random_study():
    """``random_study(generator, token_counts)``: one study with a series of ``n`` random 289-d
    token features per entry of ``token_counts``."""
    return _random_study
