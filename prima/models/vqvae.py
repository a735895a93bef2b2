"""The 3D VQ-VAE volume tokenizer: a 32x32x4 patch <-> an 8x8x2 latent with 2 channels (docs/design.md §2).

The encoder first repeats every voxel of the short (4-voxel) axis twice, so two stride-2 stages give a
latent grid of 8x8x2 whatever axis the short one is: the network is a plain 3D CNN with cubic kernels,
so the three axis permutations of a patch (32x32x4, 32x4x32, 4x32x32) all pass through it, as the
paper's random-permutation training requires. The decoder mirrors the encoder and averages the voxel
pairs of the short axis back to 4 (the exact inverse of the repetition).

Token layout: ``encode`` returns the quantised latent of a patch in its canonical (32, 32, 4) layout,
shape (C=2, 8, 8, 2) = (channel, in-plane axis 1, in-plane axis 2, through-plane), flattened as
``einops.rearrange(latent, "n c x y z -> n (x y z c)")``: the two channels of a latent position are
adjacent, then the through-plane position, then the in-plane positions, in C order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from scipy.spatial import cKDTree
from torch import nn

from prima.config import VolumeTokenizerConfig

# The encoder repeats the short axis this many times and the decoder averages it back.
_SHORT_AXIS_UPSAMPLING = 2
# Vectors per chunk when searching the nearest code, to bound the (vectors x codes) distance matrix.
_NEAREST_CODE_CHUNK = 8192


class QuantizerOutput(NamedTuple):
    """What :class:`EMAVectorQuantizer` returns for a batch of latents (N, D, *grid)."""

    quantized: torch.Tensor  # (N, D, *grid) codes, with straight-through gradients to the latent
    codes: torch.Tensor  # (N, *grid) int64 code index of every latent position
    commitment_loss: torch.Tensor  # scalar, beta * mean squared latent-to-code distance
    perplexity: torch.Tensor  # scalar, exp(entropy) of the batch's code histogram
    used_codes: torch.Tensor  # scalar int64, distinct codes used in the batch


class VQVAEOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns for a batch of patches."""

    reconstruction: torch.Tensor  # same shape as the input patches
    latent: torch.Tensor  # (N, latent_channels, *grid) encoder output before quantisation
    quantized: torch.Tensor  # (N, latent_channels, *grid) after quantisation
    codes: torch.Tensor  # (N, *grid) code indices
    commitment_loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar
    used_codes: torch.Tensor  # scalar


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _lowest_rank_with(has: bool, device: torch.device) -> int | None:
    """The lowest process rank where ``has`` is true (the same answer on every process), or None.

    A collective: every process must call it at the same point.
    """
    if not _distributed():
        return 0 if has else None
    world = dist.get_world_size()
    rank = torch.tensor(dist.get_rank() if has else world, device=device)
    dist.all_reduce(rank, op=dist.ReduceOp.MIN)
    return int(rank) if int(rank) < world else None


class EMAVectorQuantizer(nn.Module):
    """Nearest-code quantiser with EMA codebook updates and dead-code restarts.

    The codebook is not a parameter: in training mode each forward moves every code towards the mean
    of the latents assigned to it (exponential moving average, statistics all-reduced under DDP) and
    restarts the codes that no latent chose in the step and whose recent usage fell below
    ``dead_code_threshold`` times the uniform share, on latents drawn from the batch. The first
    training batch initialises the codebook on its latents.

    Under DDP every process runs the same collectives whatever its local batch (an empty one
    included): the uniform share comes from the global batch, dead codes are chosen from all-reduced
    statistics only, and new codes are drawn by the lowest rank that has latents and broadcast from it.

    Args:
        codebook_size: number of codes K.
        code_dim: dimension D of a code (= latent channels).
        ema_decay: decay of the moving averages, in (0, 1).
        commitment_beta: weight of the commitment term.
        dead_code_threshold: fraction of the uniform share (batch latents / K) below which a code's
            recent usage counts as dead.
        dead_code_window: steps over which recent usage is averaged (EMA with decay 1 - 1/window); much
            shorter than the codebook EMA so a dead code is found within tens of steps, not hundreds.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        ema_decay: float = 0.99,
        commitment_beta: float = 0.25,
        dead_code_threshold: float = 0.03,
        dead_code_window: int = 20,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or code_dim < 1:
            raise ValueError(f"codebook_size and code_dim must be >= 1, got {codebook_size}, {code_dim}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if commitment_beta < 0 or dead_code_threshold < 0 or dead_code_window < 1:
            raise ValueError("commitment_beta and dead_code_threshold must be >= 0 and dead_code_window >= 1")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.ema_decay = ema_decay
        self.commitment_beta = commitment_beta
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = 1.0 - 1.0 / dead_code_window
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("recent_usage", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """(M, D) vectors -> (M,) int64 index of the nearest code in Euclidean distance.

        On a GPU: chunked ``cdist`` + ``argmin``. On a CPU the codes are few-dimensional points (D = 2),
        where a k-d tree finds the nearest of 8192 codes ~60x faster than the distance matrix (exact
        distances in float64; the two can differ only on near-ties, about 1 vector in 10,000).
        """
        if not len(vectors):
            return torch.zeros(0, dtype=torch.long, device=vectors.device)
        if vectors.device.type == "cpu":
            tree = cKDTree(self.codebook.double().numpy())
            _, index = tree.query(vectors.detach().double().numpy(), workers=torch.get_num_threads())
            return torch.from_numpy(index.astype(np.int64))
        codebook = self.codebook.to(vectors.dtype)
        return torch.cat([torch.cdist(chunk, codebook).argmin(dim=1) for chunk in vectors.split(_NEAREST_CODE_CHUNK)])

    def assign(self, latent: torch.Tensor) -> torch.Tensor:
        """(N, D, *grid) latents -> (N, *grid) int64 index of each vector's nearest code."""
        channels_last = latent.movedim(1, -1)
        return self.nearest_codes(channels_last.reshape(-1, self.code_dim).float()).reshape(channels_last.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, *grid) code indices -> (N, D, *grid) code vectors."""
        return self.codebook[codes].movedim(-1, 1)

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        """Quantise (N, D, *grid) latents; updates the codebook when the module is training."""
        if latent.dim() < 2 or latent.shape[1] != self.code_dim:
            raise ValueError(f"latent must be (N, {self.code_dim}, ...), got {tuple(latent.shape)}")
        channels_last = latent.movedim(1, -1)
        vectors = channels_last.reshape(-1, self.code_dim).float()
        if self.training and not bool(self.initialized):
            self._initialise(vectors.detach())
        codes = self.nearest_codes(vectors.detach())
        histogram = torch.bincount(codes, minlength=self.codebook_size).float()
        if self.training:
            # a copy: the update all-reduces the counts in place, the statistics below are per process
            self._ema_update(vectors.detach(), codes, histogram.clone())
        quantized_vectors = self.codebook[codes]
        # A process with an empty batch gets 0 rather than mse_loss's NaN, which DDP would average in.
        squared_error = (vectors - quantized_vectors).pow(2).sum() / max(vectors.numel(), 1)
        commitment = self.commitment_beta * squared_error
        straight_through = vectors + (quantized_vectors - vectors).detach()
        quantized = straight_through.to(latent.dtype).reshape(channels_last.shape).movedim(-1, 1)
        probabilities = histogram / histogram.sum().clamp_min(1.0)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
        return QuantizerOutput(
            quantized=quantized,
            codes=codes.reshape(channels_last.shape[:-1]),
            commitment_loss=commitment,
            perplexity=entropy.exp(),
            used_codes=(histogram > 0).sum(),
        )

    @torch.no_grad()
    def _initialise(self, vectors: torch.Tensor) -> None:
        total = _all_reduce_sum(torch.tensor(len(vectors), device=self.codebook.device))
        drawn = self._draw_shared(vectors, self.codebook_size, jitter=1e-3)
        if drawn is None:
            return  # no process has a latent yet: the next batch initialises
        self.codebook.copy_(drawn)
        uniform_share = float(total) / self.codebook_size
        self.ema_count.fill_(uniform_share)
        self.recent_usage.fill_(uniform_share)
        self.ema_sum.copy_(self.codebook * uniform_share)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, vectors)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        self.recent_usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        # Laplace smoothing keeps codes with a tiny count from dividing by ~0.
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.codebook_size * 1e-5) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        uniform_share = float(counts.sum()) / self.codebook_size  # every vector has one code: all vectors
        self.restart_dead_codes(vectors, counts, self.dead_code_threshold * uniform_share, fresh_count=uniform_share)

    @torch.no_grad()
    def restart_dead_codes(
        self, vectors: torch.Tensor, step_counts: torch.Tensor, usage_floor: float, fresh_count: float
    ) -> int:
        """Move every code unused in this step and with recent usage below ``usage_floor`` onto a random vector.

        A restarted code gets a usage and EMA count of ``fresh_count``, so it has time to attract
        latents before it can be declared dead again. Under DDP every process must call this at the
        same point, with all-reduced ``step_counts``.

        Args:
            vectors: (M, D) this process's latents of the step; may be empty.
            step_counts: (K,) latents assigned to each code in this step, over all processes.
            usage_floor: recent usage below which an unused code is dead.
            fresh_count: usage and EMA count given to a restarted code.

        Returns:
            How many codes were restarted (the same on every process).
        """
        # All-reduced statistics only: every process finds the same dead codes and runs the same collectives.
        dead = (step_counts == 0) & (self.recent_usage < usage_floor)
        n_dead = int(dead.sum())
        if not n_dead:
            return 0
        chosen = self._draw_shared(vectors, n_dead)
        if chosen is None:
            return 0
        self.codebook[dead] = chosen
        self.ema_count[dead] = fresh_count
        self.recent_usage[dead] = fresh_count
        self.ema_sum[dead] = chosen * fresh_count
        return n_dead

    def _draw_shared(self, vectors: torch.Tensor, n: int, jitter: float = 0.0) -> torch.Tensor | None:
        """(n, D) random rows of ``vectors``, the same on every process, or None when no process has any.

        The lowest rank with vectors draws and broadcasts, so a process with an empty batch still takes
        part. ``jitter`` times the vectors' std of Gaussian noise separates codes drawn on one vector.
        """
        device = self.codebook.device
        source = _lowest_rank_with(len(vectors) > 0, device)
        if source is None:
            return None
        if not _distributed() or dist.get_rank() == source:
            drawn = vectors[torch.randint(len(vectors), (n,), device=vectors.device)].to(self.codebook)
            if jitter:
                drawn += jitter * vectors.std() * torch.randn_like(drawn)
        else:
            drawn = torch.empty(n, self.code_dim, dtype=self.codebook.dtype, device=device)
        if _distributed():
            dist.broadcast(drawn, src=source)
        return drawn


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3x3(relu(x)))), the classic VQ-VAE residual unit."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _short_axis(spatial_shape: torch.Size | tuple[int, ...]) -> int:
    """Index (0, 1 or 2) of the smallest spatial axis."""
    return min(range(3), key=lambda axis: spatial_shape[axis])


class VQVAE(nn.Module):
    """3D CNN VQ-VAE volume tokenizer.

    Args:
        config: a :class:`~prima.config.VolumeTokenizerConfig`; ``channels`` sets the width, ``res_layers``
            the residual blocks at each of the two downsampled resolutions.

    Shapes: ``forward`` takes (N, *p) where p is any axis permutation of ``config.patch_size``
    (for (32, 32, 4): 32x32x4, 32x4x32 or 4x32x32) and the latent grid is the same permutation of
    (8, 8, 2). ``encode`` takes canonical (N, 32, 32, 4) patches and returns (N, 256) tokens;
    ``decode`` inverts it. See the module docstring for the token layout.
    """

    def __init__(self, config: VolumeTokenizerConfig) -> None:
        super().__init__()
        patch = tuple(int(p) for p in config.patch_size)
        if len(patch) != 3 or patch[0] % 4 or patch[1] % 4 or (patch[2] * _SHORT_AXIS_UPSAMPLING) % 4:
            raise ValueError(f"patch_size must be 3 sizes whose (short axis x2) halves twice, got {config.patch_size}")
        if config.channels < 4 or config.channels % 4:
            raise ValueError(f"channels must be a positive multiple of 4, got {config.channels}")
        if config.res_layers < 0 or config.latent_channels < 1:
            raise ValueError("res_layers must be >= 0 and latent_channels >= 1")
        self.config = config
        width, stem = config.channels, config.channels // 4
        self.encoder = nn.Sequential(
            nn.Conv3d(1, stem, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv3d(stem, width, kernel_size=4, stride=2, padding=1),
            *[ResidualBlock(width) for _ in range(config.res_layers)],
            nn.ReLU(),
            nn.Conv3d(width, width, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv3d(width, width, kernel_size=3, padding=1),
            *[ResidualBlock(width) for _ in range(config.res_layers)],
            nn.ReLU(),
            nn.Conv3d(width, config.latent_channels, kernel_size=1),
        )
        self.quantizer = EMAVectorQuantizer(
            codebook_size=config.codebook_size,
            code_dim=config.latent_channels,
            ema_decay=config.ema_decay,
            commitment_beta=config.commitment_beta,
            dead_code_threshold=config.dead_code_threshold,
            dead_code_window=config.dead_code_window,
        )
        self.decoder = nn.Sequential(
            nn.Conv3d(config.latent_channels, width, kernel_size=3, padding=1),
            *[ResidualBlock(width) for _ in range(config.res_layers)],
            nn.ReLU(),
            nn.ConvTranspose3d(width, width, kernel_size=4, stride=2, padding=1),
            *[ResidualBlock(width) for _ in range(config.res_layers)],
            nn.ReLU(),
            nn.ConvTranspose3d(width, stem, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv3d(stem, 1, kernel_size=3, padding=1),
        )

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """Latent positions of a canonical patch: (8, 8, 2) for 32x32x4."""
        p = self.config.patch_size
        return p[0] // 4, p[1] // 4, p[2] * _SHORT_AXIS_UPSAMPLING // 4

    @property
    def token_dim(self) -> int:
        """Length of a token: latent channels x latent grid positions (256 for the paper)."""
        return self.config.latent_channels * math.prod(self.latent_grid)

    def _check_patches(self, patches: torch.Tensor) -> None:
        if patches.dim() != 4 or sorted(patches.shape[1:]) != sorted(self.config.patch_size):
            raise ValueError(
                f"patches must be (N, *p) with p a permutation of {tuple(self.config.patch_size)}, "
                f"got {tuple(patches.shape)}"
            )

    def encode_latent(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, *p) patches -> (N, latent_channels, *grid) encoder output before quantisation."""
        self._check_patches(patches)
        x = patches.unsqueeze(1).repeat_interleave(_SHORT_AXIS_UPSAMPLING, dim=2 + _short_axis(patches.shape[1:]))
        return self.encoder(x)

    def decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """(N, latent_channels, *grid) -> (N, *p) patches; the grid's short axis marks the patch's."""
        if quantized.dim() != 5 or quantized.shape[1] != self.config.latent_channels:
            channels = self.config.latent_channels
            raise ValueError(f"latent must be (N, {channels}, a, b, c), got {tuple(quantized.shape)}")
        short = _short_axis(quantized.shape[2:])
        upsampled = self.decoder(quantized).squeeze(1)
        pairs = upsampled.unflatten(1 + short, (-1, _SHORT_AXIS_UPSAMPLING))
        return pairs.mean(dim=2 + short)

    def forward(self, patches: torch.Tensor) -> VQVAEOutput:
        """Encode, quantise (updating the codebook in training mode) and decode a batch of patches."""
        latent = self.encode_latent(patches)
        quantized = self.quantizer(latent)
        return VQVAEOutput(
            reconstruction=self.decode_latent(quantized.quantized),
            latent=latent,
            quantized=quantized.quantized,
            codes=quantized.codes,
            commitment_loss=quantized.commitment_loss,
            perplexity=quantized.perplexity,
            used_codes=quantized.used_codes,
        )

    def _check_canonical(self, patches: torch.Tensor) -> None:
        if patches.dim() != 4 or tuple(patches.shape[1:]) != tuple(self.config.patch_size):
            expected = ", ".join(map(str, self.config.patch_size))
            raise ValueError(f"patches must be (N, {expected}), got {tuple(patches.shape)}")

    def quantized_latent(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, *p) patches -> (N, latent_channels, *grid) quantised latents, any permutation."""
        return self.quantizer.lookup(self.codes(patches))

    def codes(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, *p) patches -> (N, *grid) int64 code indices (no codebook update)."""
        return self.quantizer.assign(self.encode_latent(patches))

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 32, 32, 4) patches -> (N, 256) float tokens: the flattened quantised latents."""
        self._check_canonical(patches)
        return self.tokens_from_codes(self.codes(patches))

    def tokens_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of canonical patches, (N, 8, 8, 2) or flattened (N, 128), -> (N, 256) tokens, exactly
        what :meth:`encode` returns for those patches (a token is its codes' codebook vectors)."""
        grid = self.latent_grid
        if codes.dim() == 2 and codes.shape[1] == math.prod(grid):
            codes = codes.reshape(len(codes), *grid)
        if codes.dim() != 4 or tuple(codes.shape[1:]) != grid:
            raise ValueError(f"codes must be (N, {', '.join(map(str, grid))}) or (N, {math.prod(grid)}), "
                             f"got {tuple(codes.shape)}")
        return rearrange(self.quantizer.lookup(codes.long()), "n c x y z -> n (x y z c)")

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 256) tokens from :meth:`encode` -> (N, 32, 32, 4) reconstructed patches."""
        if tokens.dim() != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"tokens must be (N, {self.token_dim}), got {tuple(tokens.shape)}")
        x, y, _ = self.latent_grid
        latent = rearrange(tokens, "n (x y z c) -> n c x y z", x=x, y=y, c=self.config.latent_channels)
        return self.decode_latent(latent)
