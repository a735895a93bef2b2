"""Training augmentations for the tokenizer: each draws its parameters, then calls a pure transform."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from prima.patching import select_tokens

# The six orders of the three patch axes; with a (32, 32, 4) patch they give the paper's three shapes.
AXIS_PERMUTATIONS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations(range(3)))


def orient_patches(
    patches: torch.Tensor, permutation: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> torch.Tensor:
    """Flip the chosen axes of (N, a, b, c) patches, then reorder the three axes by ``permutation``."""
    if patches.dim() != 4:
        raise ValueError(f"patches must be (N, a, b, c), got {tuple(patches.shape)}")
    if sorted(permutation) != [0, 1, 2] or len(flips) != 3:
        raise ValueError(f"permutation must order (0, 1, 2) and flips have 3 entries, got {permutation}, {flips}")
    flipped_dims = [1 + axis for axis, flip in enumerate(flips) if flip]
    if flipped_dims:
        patches = patches.flip(flipped_dims)
    return patches.permute(0, *(1 + axis for axis in permutation))


def random_orientation(generator: torch.Generator) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """One axis permutation (uniform over the six) and three independent coin-flip axis flips."""
    flips = torch.randint(0, 2, (3,), generator=generator)
    permutation = AXIS_PERMUTATIONS[int(torch.randint(len(AXIS_PERMUTATIONS), (1,), generator=generator))]
    return permutation, tuple(bool(flip) for flip in flips)


def random_token_selection(
    fractions: np.ndarray, rng: np.random.Generator, low: float, high: float, min_tokens: int = 25
) -> np.ndarray:
    """The paper's varying background filter: a minimum foreground fraction drawn in [low, high], then applied."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got {low}, {high}")
    return select_tokens(fractions, float(rng.uniform(low, high)), min_tokens)
