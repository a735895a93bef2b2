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

    Buffers (filled by ``training.place_normal`` or a release's weights):
        kind_centre, kind_scale: (256,) standardisation of a series' mean latent before its nearest centroid.
        centroids: (kinds, 256) k-means centroids of the standardised series mean latents.
        keys: (places,) int64 sorted place keys (``place_keys``).
        mean, sd: (places, 256) the normal tokens' latent mean and spread at each place (sd > 0).
    """

    def __init__(self, kinds: int, places: int) -> None:
        super().__init__()
        if kinds < 1 or places < 1:
            raise ValueError(f"kinds and places must be >= 1, got {kinds} and {places}")
        self.register_buffer("kind_centre", torch.zeros(LATENT_DIM))
        self.register_buffer("kind_scale", torch.ones(LATENT_DIM))
        self.register_buffer("centroids", torch.zeros(kinds, LATENT_DIM))
        self.register_buffer("keys", torch.arange(places, dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(places, LATENT_DIM))
        self.register_buffer("sd", torch.ones(places, LATENT_DIM))

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
        z = (latents.float() - self.mean[row].float()) / self.sd[row].float()
        return torch.where(modelled[:, None], torch.log1p(z.abs()), torch.zeros_like(z))
