"""The sequence ViT: one series (registers + encoded name + volume tokens) -> one series vector.

Weights are shared by every series of every study. The registers' final states, concatenated along
features and linearly projected, form the series vector (paper: 20 x 289 -> 1024).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor, nn

from prima.config import TOKEN_DIM, SequenceViTConfig
from prima.models.transformer import Transformer


class SequenceViT(nn.Module):
    """Args:
        config: depth, heads, MLP width, number of registers and series-vector width.
    """

    def __init__(self, config: SequenceViTConfig) -> None:
        super().__init__()
        if config.registers <= 0:
            raise ValueError(f"registers must be positive, got {config.registers}")
        self.config = config
        self.registers = nn.Parameter(torch.randn(config.registers, TOKEN_DIM) * 0.02)
        self.transformer = Transformer(TOKEN_DIM, config.depth, config.heads, config.head_dim, config.mlp_dim)
        self.proj = nn.Linear(config.registers * TOKEN_DIM, config.out_dim)

    def forward(self, tokens: Tensor, token_mask: Tensor, name_embedding: Tensor) -> Tensor:
        """Encode a batch of series.

        Args:
            tokens: (S, T, 289) token features, padded along T.
            token_mask: (S, T) bool, True for real tokens.
            name_embedding: (S, 289) encoded series names.

        Returns:
            (S, out_dim) series vectors.
        """
        return self.encode_with_tokens(tokens, token_mask, name_embedding)[0]

    def encode_with_tokens(self, tokens: Tensor, token_mask: Tensor, name_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """``forward``, also returning every token's output state.

        Args: as ``forward``.

        Returns:
            (S, out_dim) series vectors and (S, T, 289) token outputs (padded positions are not meaningful).
        """
        if tokens.ndim != 3 or tokens.shape[-1] != TOKEN_DIM:
            raise ValueError(f"tokens must have shape (S, T, {TOKEN_DIM}), got {tuple(tokens.shape)}")
        if token_mask.shape != tokens.shape[:2]:
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != tokens {tuple(tokens.shape[:2])}")
        n_series, n_registers = tokens.shape[0], self.config.registers
        registers = repeat(self.registers, "r d -> s r d", s=n_series).to(tokens.dtype)
        x = torch.cat([registers, name_embedding[:, None].to(tokens.dtype), tokens], dim=1)
        always = token_mask.new_ones(n_series, n_registers + 1)
        x = self.transformer(x, torch.cat([always, token_mask.bool()], dim=1))
        return self.proj(x[:, :n_registers].flatten(1)), x[:, n_registers + 1:]
