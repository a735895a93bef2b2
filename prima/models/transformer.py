"""The pre-norm transformer shared by the name encoders, the sequence ViT and the study ViT.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with a key-padding mask,
so a padded batch gives the same outputs for its real tokens as the unpadded sequences would. On
CUDA with half-precision inputs and ``flash-attn`` installed, the varlen kernel is used instead: it
skips the padded tokens altogether rather than masking them.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def _flash_varlen_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Attention over the real tokens only; q, k, v: (B, H, T, Dh), key_mask: (B, T) True = real."""
    from flash_attn import flash_attn_varlen_func

    batch, heads, length, head_dim = q.shape
    lengths = key_mask.sum(-1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    real = key_mask.flatten().nonzero().squeeze(-1)

    def unpad(t: Tensor) -> Tensor:
        return rearrange(t, "b h t d -> (b t) h d")[real]

    out = flash_attn_varlen_func(
        unpad(q), unpad(k), unpad(v), cu_seqlens, cu_seqlens, int(lengths.max()), int(lengths.max())
    )
    padded = q.new_zeros(batch * length, heads, head_dim)
    padded[real] = out
    return rearrange(padded, "(b t) h d -> b h t d", b=batch)


def _flash_usable(q: Tensor, key_mask: Tensor | None) -> bool:
    return (
        FLASH_ATTN_AVAILABLE
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and key_mask is not None
    )


class Attention(nn.Module):
    """Multi-head self-attention whose inner width (heads x head_dim) may differ from the model width.

    Args:
        dim: model width of the input and output features.
        heads: number of attention heads.
        head_dim: width of one head; the inner width is ``heads * head_dim``.
        use_flash: allow the flash-attn varlen kernel when it is installed and applicable.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, use_flash: bool = True) -> None:
        super().__init__()
        if min(dim, heads, head_dim) <= 0:
            raise ValueError(f"dim, heads and head_dim must be positive, got {dim}, {heads}, {head_dim}")
        self.heads = heads
        self.use_flash = use_flash
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); key_mask: (B, T) bool, True for real tokens. Returns (B, T, dim)."""
        q, k, v = rearrange(self.to_qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if self.use_flash and _flash_usable(q, key_mask):
            out = _flash_varlen_attention(q, k, v, key_mask)
        else:
            attn_mask = None if key_mask is None else key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "b h t d -> b t (h d)"))


class FeedForward(nn.Module):
    """Two-layer GELU MLP ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"hidden width must be positive, got {hidden}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; arguments as ``Transformer``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), key_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks followed by a final LayerNorm.

    Args:
        dim: token width.
        depth: number of blocks.
        heads, head_dim: attention heads and their width (inner width ``heads * head_dim``).
        mlp_dim: hidden width of each block's MLP.
    """

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        self.blocks = nn.ModuleList(Block(dim, heads, head_dim, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); key_mask: (B, T) bool, True = attend to this token. Returns (B, T, dim)."""
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)
