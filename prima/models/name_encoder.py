"""Character-level name encoder: a series name (``AX_T2_FLAIR``) or a study description -> one vector.

Characters are UTF-8 bytes, so any name a scanner writes has a code and the vocabulary is fixed
(256 bytes + pad, unk, cls). An unknown or missing name becomes the single ``unk`` code, which is
also what the CLIP augmentation substitutes. The output is the final state of a leading ``cls``
code, projected to the width of the ViT that reads it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from prima.config import NameEncoderConfig
from prima.models.transformer import Transformer

PAD_ID, UNK_ID, CLS_ID = 0, 1, 2
_BYTE_OFFSET = 3
VOCAB_SIZE = 256 + _BYTE_OFFSET
UNK_NAME = "unk"  # the name every missing or augmented-away name is replaced with


def encode_names(names: Sequence[str | None], max_length: int) -> tuple[Tensor, Tensor]:
    """Byte codes of names, padded to the longest one.

    Args:
        names: names; ``None``, ``""`` and ``"unk"`` (any case) all become the ``unk`` code.
        max_length: codes kept per name including the leading ``cls`` (longer names are cut).

    Returns:
        ids (len(names), L) int64 and mask (len(names), L) bool (True = real code), L <= max_length.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (cls + one code), got {max_length}")
    rows = []
    for name in names:
        if name is None or not name.strip() or name.strip().lower() == UNK_NAME:
            codes = [UNK_ID]
        else:
            codes = [b + _BYTE_OFFSET for b in name.strip().encode("utf-8")][: max_length - 1]
        rows.append([CLS_ID, *codes])
    length = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, ids != PAD_ID


class NameEncoder(nn.Module):
    """Transformer over byte codes whose ``cls`` output is projected to ``config.out_dim``.

    Args:
        config: width, depth, heads, MLP width, maximum length and output width.
    """

    def __init__(self, config: NameEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.width, padding_idx=PAD_ID)
        self.position = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        self.transformer = Transformer(config.width, config.depth, config.heads, config.head_dim, config.mlp_dim)
        self.proj = nn.Linear(config.width, config.out_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (N, L) from ``encode_names``. Returns (N, out_dim)."""
        if ids.shape[-1] > self.config.max_length:
            raise ValueError(f"names have {ids.shape[-1]} codes, more than max_length={self.config.max_length}")
        x = self.embed(ids) + self.position[: ids.shape[-1]]
        x = self.transformer(x, mask)
        return self.proj(x[:, 0])

    def encode(self, names: Sequence[str | None]) -> Tensor:
        """Convenience: encode raw names on this module's device. Returns (len(names), out_dim)."""
        ids, mask = encode_names(names, self.config.max_length)
        device = self.position.device
        return self(ids.to(device), mask.to(device))
