"""The 3D VQ-VAE volume tokenizer: a 32x32x4 patch <-> an 8x8x2 latent with 2 channels (SPEC section 2).

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

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from prima.config import TokenizerConfig

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


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class EMAVectorQuantizer(nn.Module):
    """Nearest-code quantiser with EMA codebook updates and dead-code restarts.

    The codebook is not a parameter: in training mode each forward moves every code towards the mean
    of the latents assigned to it (exponential moving average, statistics all-reduced under DDP) and
    restarts the codes whose EMA usage fell below ``dead_code_threshold`` times the uniform share on
    latents drawn from the batch. The first training batch initialises the codebook.

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
        """(M, D) vectors -> (M,) int64 index of the nearest code in Euclidean distance."""
        if not len(vectors):
            return torch.zeros(0, dtype=torch.long, device=vectors.device)
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
        commitment = self.commitment_beta * F.mse_loss(vectors, quantized_vectors)
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
        picks = torch.randint(len(vectors), (self.codebook_size,), device=vectors.device)
        self.codebook.copy_(vectors[picks] + 1e-3 * vectors.std() * torch.randn_like(self.codebook))
        self._broadcast_codebook()
        uniform_share = len(vectors) / self.codebook_size
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
        self.restart_dead_codes(vectors, self.dead_code_threshold * uniform_share, fresh_count=uniform_share)

    @torch.no_grad()
    def restart_dead_codes(self, vectors: torch.Tensor, usage_floor: float, fresh_count: float) -> int:
        """Move every code whose recent usage is below ``usage_floor`` onto a random vector of ``vectors``.

        A restarted code gets a usage and EMA count of ``fresh_count``, so it has time to attract
        latents before it can be declared dead again. Returns how many codes were restarted.
        """
        dead = self.recent_usage < usage_floor
        n_dead = int(dead.sum())
        if n_dead and len(vectors):
            picks = torch.randint(len(vectors), (n_dead,), device=vectors.device)
            chosen = vectors[picks]
            self.codebook[dead] = chosen
            self.ema_count[dead] = fresh_count
            self.recent_usage[dead] = fresh_count
            self.ema_sum[dead] = chosen * fresh_count
            self._broadcast_codebook()
        return n_dead

    def _broadcast_codebook(self) -> None:
        # Ranks restart from their own batches; rank 0's choice wins so the replicas stay identical.
        if dist.is_available() and dist.is_initialized():
            for buffer in (self.codebook, self.ema_count, self.ema_sum, self.recent_usage):
                dist.broadcast(buffer, src=0)


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
        config: a :class:`~prima.config.TokenizerConfig`; ``channels`` sets the width, ``res_layers``
            the residual blocks at each of the two downsampled resolutions.

    Shapes: ``forward`` takes (N, *p) where p is any axis permutation of ``config.patch_size``
    (for (32, 32, 4): 32x32x4, 32x4x32 or 4x32x32) and the latent grid is the same permutation of
    (8, 8, 2). ``encode`` takes canonical (N, 32, 32, 4) patches and returns (N, 256) tokens;
    ``decode`` inverts it. See the module docstring for the token layout.
    """

    def __init__(self, config: TokenizerConfig) -> None:
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
    def token_dim(self) -> int:
        """Length of a token: latent channels x latent grid voxels (256 for the paper)."""
        p = self.config.patch_size
        return self.config.latent_channels * (p[0] // 4) * (p[1] // 4) * (p[2] * _SHORT_AXIS_UPSAMPLING // 4)

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
        return rearrange(self.quantized_latent(patches), "n c x y z -> n (x y z c)")

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 256) tokens from :meth:`encode` -> (N, 32, 32, 4) reconstructed patches."""
        if tokens.dim() != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"tokens must be (N, {self.token_dim}), got {tuple(tokens.shape)}")
        p = self.config.patch_size
        latent = rearrange(
            tokens, "n (x y z c) -> n c x y z", x=p[0] // 4, y=p[1] // 4, c=self.config.latent_channels
        )
        return self.decode_latent(latent)
