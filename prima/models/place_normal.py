"""The place-normal model: what a normal study's token looks like at each place of the head grid.

On the head grid (docs/design.md §2) a patch index is the same anatomy in every study, so the normal
training studies give, per place, the mean and spread of the latent of the tokens found there. A place is
(series kind, acquisition plane, patch index); the series kind is the nearest of k-means centroids of the
series' mean latent, so no series name is needed to find it. A token then enters the sequence ViT as its
deviation ``log1p(|latent - mean| / sd)`` instead of its latent: a lesion stands out where the anatomy is
normal elsewhere (docs/design.md, "Departures"; docs/training.md for the measurements).

The model is fitted by ``training.place_normal`` and not learnt by gradients; it is a module so that a
release saves, loads and moves it like its other parts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prima.config import LATENT_DIM, PLANES

# A place's key: (kind * len(PLANES) + plane) * PLACE_STRIDE + patch index; larger than any grid's patches.
PLACE_STRIDE = 1 << 24


def place_keys(kind: Tensor, plane: int, patch_indices: Tensor) -> Tensor:
    """(K,) int64 place keys of the tokens at ``patch_indices`` (K,) of one series of kind ``kind`` (a 0-d or
    (K,) tensor) acquired in plane index ``plane`` (into ``PLANES``)."""
    if not 0 <= plane < len(PLANES):
        raise ValueError(f"plane index must be in [0, {len(PLANES)}), got {plane}")
    return (kind.long() * len(PLANES) + plane) * PLACE_STRIDE + patch_indices.long()


class PlaceNormalModel(nn.Module):
    """Args:
        kinds: number of series kinds (k-means centroids).
        places: number of modelled places.

    Buffers (filled by ``training.place_normal`` through ``set_places``, or by a release's weights):
        kind_centre, kind_scale: (256,) standardisation of a series' mean latent before its nearest centroid.
        centroids: (kinds, 256) k-means centroids of the standardised series mean latents.
        keys: (places,) int64 sorted place keys (``place_keys``).
        mean_codes, mean_offset, mean_step: each place's latent mean, 8 bits a value (``offset + step * code``
            per latent value), which keeps a release within its size budget.
        log_sd_codes, log_sd_offset, log_sd_step: each place's latent s.d., as the mean but in log space.
    """

    def __init__(self, kinds: int, places: int) -> None:
        super().__init__()
        if kinds < 1 or places < 1:
            raise ValueError(f"kinds and places must be >= 1, got {kinds} and {places}")
        self.register_buffer("kind_centre", torch.zeros(LATENT_DIM))
        self.register_buffer("kind_scale", torch.ones(LATENT_DIM))
        self.register_buffer("centroids", torch.zeros(kinds, LATENT_DIM))
        self.register_buffer("keys", torch.arange(places, dtype=torch.int64))
        for name in ("mean", "log_sd"):
            self.register_buffer(f"{name}_codes", torch.zeros(places, LATENT_DIM, dtype=torch.uint8))
            self.register_buffer(f"{name}_offset", torch.zeros(LATENT_DIM))
            self.register_buffer(f"{name}_step", torch.zeros(LATENT_DIM))

    def set_places(self, keys: Tensor, mean: Tensor, sd: Tensor) -> None:
        """Store the modelled places: sorted unique ``keys`` (places,) and their latent ``mean`` and ``sd`` (places,
        256), each latent value quantised to 256 levels over its range across the places."""
        if keys.shape != self.keys.shape or mean.shape != self.mean_codes.shape or sd.shape != mean.shape:
            raise ValueError(f"{len(self.keys)} places expected: keys (P,), mean and sd (P, {LATENT_DIM}), got "
                             f"{tuple(keys.shape)}, {tuple(mean.shape)} and {tuple(sd.shape)}")
        if len(keys) > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("place keys must be sorted and unique")
        if not bool((sd > 0).all()):
            raise ValueError("every s.d. must be > 0")
        self.keys.copy_(keys)
        for name, values in (("mean", mean.double()), ("log_sd", sd.double().log())):
            low, high = values.amin(0), values.amax(0)
            step = (high - low) / 255
            codes = torch.where(step > 0, (values - low) / step.clamp(min=1e-12), torch.zeros_like(values))
            getattr(self, f"{name}_codes").copy_(codes.round().clamp(0, 255).to(torch.uint8))
            getattr(self, f"{name}_offset").copy_(low)
            getattr(self, f"{name}_step").copy_(step)

    def normal_of(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(K, 256) float32 latent mean and s.d. of the places at ``rows`` (K,) (indices into ``keys``)."""
        mean = self.mean_offset + self.mean_step * self.mean_codes[rows].float()
        sd = torch.exp(self.log_sd_offset + self.log_sd_step * self.log_sd_codes[rows].float())
        return mean, sd

    @classmethod
    def for_state(cls, state: dict[str, Tensor]) -> "PlaceNormalModel":
        """An empty model shaped like a saved state dict (load it with ``load_state_dict``)."""
        try:
            return cls(len(state["centroids"]), len(state["keys"]))
        except KeyError as exc:
            raise ValueError(f"not a place-normal model's state: it has no {exc.args[0]!r}") from exc

    @property
    def kinds(self) -> int:
        return len(self.centroids)

    def kind_of(self, mean_latents: Tensor) -> Tensor:
        """(S,) int64 series kind of series mean latents (S, 256): the nearest centroid once standardised."""
        if mean_latents.ndim != 2 or mean_latents.shape[1] != LATENT_DIM:
            raise ValueError(f"mean latents must have shape (S, {LATENT_DIM}), got {tuple(mean_latents.shape)}")
        standard = (mean_latents.float() - self.kind_centre) / self.kind_scale
        return torch.cdist(standard, self.centroids).argmin(1)

    def deviations(self, latents: Tensor, kind: Tensor, plane: str, patch_indices: Tensor) -> Tensor:
        """(K, 256) float32 ``log1p(|z|)`` of one series' token latents (K, 256) against the normal model of their
        places; 0 for a token whose place is not modelled (too few normal tokens were seen there).

        Args:
            latents: (K, 256) the tokens' latents.
            kind: 0-d int64, the series' kind (``kind_of`` of the series' mean latent).
            plane: the series' acquisition plane, one of ``PLANES``.
            patch_indices: (K,) grid index of each token.
        """
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
        if latents.ndim != 2 or latents.shape[1] != LATENT_DIM or len(patch_indices) != len(latents):
            raise ValueError(f"latents (K, {LATENT_DIM}) and patch_indices (K,) expected, got "
                             f"{tuple(latents.shape)} and {tuple(patch_indices.shape)}")
        keys = place_keys(kind.to(self.keys.device), PLANES.index(plane), patch_indices.to(self.keys.device))
        row = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        modelled = self.keys[row] == keys
        mean, sd = self.normal_of(row)
        z = (latents.float() - mean) / sd
        return torch.where(modelled[:, None], torch.log1p(z.abs()), torch.zeros_like(z))
