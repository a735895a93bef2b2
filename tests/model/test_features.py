import math

import pytest
import torch

from prima.config import PLANES, TOKEN_DIM
from prima.models.features import sinusoidal_position, token_features


def test_token_layout_is_latent_position_plane():
    latents = torch.randn(5, 256)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [4, 5, 6], [7, 7, 7], [2, 0, 9]])
    features = token_features(latents, coords, "coronal")
    assert features.shape == (5, 289) and TOKEN_DIM == 289
    assert torch.equal(features[:, :256], latents)
    assert torch.equal(features[:, 256:286], sinusoidal_position(coords))
    assert torch.equal(features[:, 286:], torch.tensor([[0.0, 1.0, 0.0]]).expand(5, 3))


def test_sinusoid_matches_hand_computed_values():
    coords = torch.tensor([[3, 0, 10]])
    pos = sinusoidal_position(coords)[0]
    # axis 0 (coordinate 3): 5 sines then 5 cosines of 3 * 10000**(-k/5)
    for k in range(5):
        angle = 3 * 10000 ** (-k / 5)
        assert pos[k].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pos[5 + k].item() == pytest.approx(math.cos(angle), abs=1e-6)
    # axis 1 is at coordinate 0: sin = 0, cos = 1
    assert torch.equal(pos[10:20], torch.tensor([0.0] * 5 + [1.0] * 5))
    assert pos[20].item() == pytest.approx(math.sin(10), abs=1e-6)


def test_distinct_coordinates_get_distinct_positions():
    grid = torch.cartesian_prod(torch.arange(8), torch.arange(8), torch.arange(10))
    pos = sinusoidal_position(grid)
    assert torch.unique(pos, dim=0).shape[0] == grid.shape[0]


@pytest.mark.parametrize("plane", PLANES)
def test_plane_one_hot_order(plane):
    features = token_features(torch.zeros(2, 256), torch.zeros(2, 3, dtype=torch.long), plane)
    assert features[:, 286:].argmax(-1).tolist() == [PLANES.index(plane)] * 2


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="plane"):
        token_features(torch.zeros(1, 256), torch.zeros(1, 3), "oblique")
    with pytest.raises(ValueError, match="latents"):
        token_features(torch.zeros(1, 255), torch.zeros(1, 3), "axial")
    with pytest.raises(ValueError, match="coordinates"):
        token_features(torch.zeros(2, 256), torch.zeros(1, 3), "axial")
    with pytest.raises(ValueError, match="coords"):
        sinusoidal_position(torch.zeros(4, 2))
