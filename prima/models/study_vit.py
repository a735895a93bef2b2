"""The study ViT: registers + encoded study description + projected series vectors -> study embedding.

The registers' final states concatenated along features are the study embedding (paper:
10 x 1024 = 10240). Series enter as an unordered set (no position embedding), so the embedding does
not depend on the order in which the series were listed.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor, nn

from prima.config import StudyViTConfig
from prima.models.transformer import Transformer


class StudyViT(nn.Module):
    """Args:
        config: width, depth, heads, MLP width and number of registers.
        series_dim: width of the incoming series vectors.
    """

    def __init__(self, config: StudyViTConfig, series_dim: int) -> None:
        super().__init__()
        if config.registers <= 0:
            raise ValueError(f"registers must be positive, got {config.registers}")
        self.config = config
        self.registers = nn.Parameter(torch.randn(config.registers, config.width) * 0.02)
        self.series_proj = nn.Linear(series_dim, config.width)
        self.transformer = Transformer(config.width, config.depth, config.heads, config.head_dim, config.mlp_dim)

    @property
    def out_dim(self) -> int:
        """Width of the study embedding (registers x width)."""
        return self.config.out_dim

    def forward(self, series_vectors: Tensor, series_mask: Tensor, description_embedding: Tensor) -> Tensor:
        """Encode a batch of studies.

        Args:
            series_vectors: (B, S, series_dim) series vectors, padded along S.
            series_mask: (B, S) bool, True for real series.
            description_embedding: (B, width) encoded study descriptions.

        Returns:
            (B, registers * width) study embeddings.
        """
        if series_vectors.ndim != 3 or series_mask.shape != series_vectors.shape[:2]:
            raise ValueError(
                f"series_vectors (B, S, D) and series_mask (B, S) expected, got "
                f"{tuple(series_vectors.shape)} and {tuple(series_mask.shape)}"
            )
        n_studies, n_registers = series_vectors.shape[0], self.config.registers
        series = self.series_proj(series_vectors)
        registers = repeat(self.registers, "r d -> b r d", b=n_studies).to(series.dtype)
        x = torch.cat([registers, description_embedding[:, None].to(series.dtype), series], dim=1)
        always = series_mask.new_ones(n_studies, n_registers + 1)
        x = self.transformer(x, torch.cat([always, series_mask.bool()], dim=1))
        return x[:, :n_registers].flatten(1)
