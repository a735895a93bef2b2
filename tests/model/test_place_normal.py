"""PlaceNormalModel: a token's deviation is log1p(|z|) against the mean and sd of its place, 0 where the place is
not modelled; a series' kind is the nearest centroid of its standardised mean latent."""

from __future__ import annotations

import pytest
import torch

from prima.config import LATENT_DIM
from prima.models.place_normal import PLACE_STRIDE, PlaceNormalModel, place_keys


@pytest.fixture
def model() -> PlaceNormalModel:
    """Two kinds; modelled places: kind 1, coronal (plane 1), patch indices 3 and 7."""
    normal = PlaceNormalModel(kinds=2, places=2)
    normal.kind_centre.fill_(1.0)
    normal.kind_scale.fill_(2.0)
    normal.centroids.copy_(torch.stack([torch.full((LATENT_DIM,), -1.0), torch.full((LATENT_DIM,), 1.0)]))
    normal.set_places(torch.tensor([(1 * 3 + 1) * PLACE_STRIDE + 3, (1 * 3 + 1) * PLACE_STRIDE + 7]),
                      torch.stack([torch.zeros(LATENT_DIM), torch.full((LATENT_DIM,), 5.0)]),
                      torch.stack([torch.ones(LATENT_DIM), torch.full((LATENT_DIM,), 2.0)]))
    return normal


def test_deviation_is_log1p_abs_z_at_modelled_places_and_zero_elsewhere(model):
    latents = torch.stack([torch.full((LATENT_DIM,), 2.0), torch.full((LATENT_DIM,), 1.0),
                           torch.full((LATENT_DIM,), 9.0)])
    got = model.deviations(latents, torch.tensor(1), "coronal", torch.tensor([3, 4, 7]))
    torch.testing.assert_close(got[0], torch.full((LATENT_DIM,), float(torch.log1p(torch.tensor(2.0)))))
    assert torch.all(got[1] == 0)  # patch 4 was never modelled
    torch.testing.assert_close(got[2], torch.full((LATENT_DIM,), float(torch.log1p(torch.tensor(2.0)))))
    # the same patch of another kind or plane is another place
    assert torch.all(model.deviations(latents, torch.tensor(0), "coronal", torch.tensor([3, 4, 7])) == 0)
    assert torch.all(model.deviations(latents, torch.tensor(1), "axial", torch.tensor([3, 4, 7])) == 0)


def test_kind_is_the_nearest_centroid_after_standardising(model):
    means = torch.stack([torch.full((LATENT_DIM,), 3.0), torch.full((LATENT_DIM,), -1.0)])  # standardised: 1, -1
    assert model.kind_of(means).tolist() == [1, 0]


def test_places_are_stored_at_8_bits_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(300, LATENT_DIM, generator=generator) * 3
    sd = torch.rand(300, LATENT_DIM, generator=generator) * 2 + 0.05
    normal = PlaceNormalModel(kinds=1, places=300)
    normal.set_places(torch.arange(300) * 5, mean, sd)
    got_mean, got_sd = normal.normal_of(torch.arange(300))
    assert normal.mean_codes.dtype == torch.uint8
    assert torch.all((got_mean - mean).abs() <= normal.mean_step / 2 + 1e-5)
    assert torch.all((got_sd.log() - sd.log()).abs() <= normal.log_sd_step / 2 + 1e-5)
    with pytest.raises(ValueError, match="sorted"):
        normal.set_places(torch.arange(300).flip(0), mean, sd)
    with pytest.raises(ValueError, match="> 0"):
        normal.set_places(torch.arange(300), mean, -sd)
    with pytest.raises(ValueError, match="300 places"):
        normal.set_places(torch.arange(3), mean[:3], sd[:3])


def test_a_saved_state_rebuilds_the_model(model):
    again = PlaceNormalModel.for_state(model.state_dict())
    again.load_state_dict(model.state_dict())
    latents = torch.randn(2, LATENT_DIM)
    torch.testing.assert_close(again.deviations(latents, torch.tensor(1), "coronal", torch.tensor([3, 7])),
                               model.deviations(latents, torch.tensor(1), "coronal", torch.tensor([3, 7])))


def test_bad_arguments_raise(model):
    with pytest.raises(ValueError, match="kinds and places"):
        PlaceNormalModel(0, 3)
    with pytest.raises(ValueError, match="plane"):
        model.deviations(torch.zeros(1, LATENT_DIM), torch.tensor(0), "oblique", torch.tensor([0]))
    with pytest.raises(ValueError, match="latents"):
        model.deviations(torch.zeros(2, LATENT_DIM), torch.tensor(0), "axial", torch.tensor([0]))
    with pytest.raises(ValueError, match="mean latents"):
        model.kind_of(torch.zeros(LATENT_DIM))
    with pytest.raises(ValueError, match="place-normal"):
        PlaceNormalModel.for_state({"weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="plane index"):
        place_keys(torch.tensor(0), 3, torch.tensor([1]))
