"""prima.models.vqvae: shapes, token layout, nearest-code quantisation, EMA and dead-code restarts."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from prima.config import TokenizerConfig
from prima.models.vqvae import VQVAE, EMAVectorQuantizer

SMALL = TokenizerConfig(channels=8, res_layers=1, codebook_size=64)


@pytest.fixture
def model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(SMALL)


@pytest.mark.parametrize(
    ("patch_shape", "grid"), [((32, 32, 4), (8, 8, 2)), ((32, 4, 32), (8, 2, 8)), ((4, 32, 32), (2, 8, 8))]
)
def test_forward_shapes_for_every_permutation(model: VQVAE, patch_shape, grid) -> None:
    patches = torch.rand(3, *patch_shape)
    out = model(patches)
    assert out.reconstruction.shape == patches.shape
    assert out.latent.shape == out.quantized.shape == (3, 2, *grid)
    assert out.codes.shape == (3, *grid) and out.codes.dtype == torch.int64
    assert out.commitment_loss.dim() == 0 and out.commitment_loss >= 0
    out.reconstruction.abs().mean().add(out.commitment_loss).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())  # straight-through reaches the encoder


def test_encode_decode_and_token_layout(model: VQVAE) -> None:
    model.eval()
    patches = torch.rand(5, 32, 32, 4)
    tokens = model.encode(patches)
    assert tokens.shape == (5, 256) and tokens.dtype == torch.float32 and model.token_dim == 256
    latent = model.quantized_latent(patches)  # (N, channel, x, y, z)
    assert torch.equal(tokens, rearrange(latent, "n c x y z -> n (x y z c)"))
    assert torch.equal(tokens[:, :2], latent[:, :, 0, 0, 0])  # the two channels of a position are adjacent
    assert model.decode(tokens).shape == (5, 32, 32, 4)
    torch.testing.assert_close(model.decode(tokens), model.decode_latent(latent))
    # every token value is a codebook entry
    codebook_values = model.quantizer.codebook
    pairs = tokens.reshape(-1, 2)
    assert torch.cdist(pairs, codebook_values).min(dim=1).values.max() < 1e-6


def test_quantizer_picks_the_nearest_code() -> None:
    torch.manual_seed(1)
    quantizer = EMAVectorQuantizer(codebook_size=50, code_dim=2).eval()
    quantizer.codebook.copy_(torch.randn(50, 2))
    latent = torch.randn(4, 2, 3, 3, 3)
    out = quantizer(latent)
    vectors = latent.movedim(1, -1).reshape(-1, 2)
    brute_force = ((vectors[:, None, :] - quantizer.codebook[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(out.codes.reshape(-1), brute_force)
    torch.testing.assert_close(out.quantized.movedim(1, -1).reshape(-1, 2), quantizer.codebook[brute_force])


def test_ema_moves_a_code_to_the_mean_of_its_latents() -> None:
    quantizer = EMAVectorQuantizer(codebook_size=2, code_dim=2, ema_decay=0.5, dead_code_threshold=0.0)
    quantizer.initialized.fill_(True)
    quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    quantizer.ema_sum.copy_(quantizer.codebook)
    latent = torch.tensor([[1.0, 1.0], [1.0, 3.0], [9.0, 9.0]]).T.reshape(1, 2, 3)
    for _ in range(30):
        quantizer(latent)
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[1.0, 2.0], [9.0, 9.0]]), atol=1e-3, rtol=0)


def test_restart_revives_unused_codes() -> None:
    torch.manual_seed(2)
    quantizer = EMAVectorQuantizer(codebook_size=64, code_dim=2, dead_code_threshold=0.1, dead_code_window=5)
    data = lambda: torch.rand(8, 2, 4, 4, 4)  # noqa: E731 - latents uniform in the unit square
    quantizer(data())  # first training batch initialises the codebook on the data
    quantizer.codebook[:48] = 100.0 + torch.rand(48, 2)  # 48 codes far from every latent: never chosen
    quantizer.ema_sum[:48] = quantizer.codebook[:48] * quantizer.ema_count[:48, None]
    assert int(quantizer(data()).used_codes) <= 16
    for _ in range(40):
        out = quantizer(data())
    assert float(quantizer.codebook[:48].max()) <= 1.0 + 1e-4  # every far code was moved onto the data
    assert int(out.used_codes) > 40


@pytest.mark.parametrize(
    "make",
    [
        lambda: VQVAE(TokenizerConfig(channels=6)),
        lambda: VQVAE(TokenizerConfig(patch_size=(30, 32, 4))),
        lambda: VQVAE(TokenizerConfig(res_layers=-1)),
        lambda: EMAVectorQuantizer(codebook_size=0, code_dim=2),
        lambda: EMAVectorQuantizer(codebook_size=8, code_dim=2, ema_decay=1.0),
    ],
)
def test_bad_config_raises_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m(torch.rand(2, 32, 32, 8)),
        lambda m: m(torch.rand(32, 32, 4)),
        lambda m: m.encode(torch.rand(2, 4, 32, 32)),  # tokens are defined for the canonical layout only
        lambda m: m.decode(torch.rand(2, 255)),
        lambda m: m.decode_latent(torch.rand(2, 3, 8, 8, 2)),
    ],
)
def test_bad_inputs_raise_value_error(model: VQVAE, call) -> None:
    with pytest.raises(ValueError):
        call(model)
