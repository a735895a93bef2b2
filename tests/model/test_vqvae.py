"""prima.models.vqvae: shapes, token layout, nearest-code quantisation, EMA and dead-code restarts."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from einops import rearrange

from prima.config import VolumeTokenizerConfig
from prima.models.vqvae import VQVAE, EMAVectorQuantizer

SMALL = VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=64)


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


def test_a_code_used_in_the_step_is_not_restarted() -> None:
    quantizer = EMAVectorQuantizer(codebook_size=5, code_dim=2, dead_code_threshold=0.5, dead_code_window=20)
    quantizer.initialized.fill_(True)
    quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [100.0, 100.0]]))
    quantizer.ema_count.fill_(2.0)
    quantizer.ema_sum.copy_(quantizer.codebook * 2.0)
    quantizer.recent_usage.copy_(torch.tensor([0.0, 2.0, 2.0, 2.0, 0.0]))  # codes 0 and 4 look dead
    # two vectors next to each of the codes 0-3, none near code 4
    near = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]).repeat_interleave(2, dim=0)
    latent = (near + torch.tensor([0.1, -0.1]).repeat(4)[:, None]).T.reshape(1, 2, 8)
    quantizer(latent)
    # uniform share 8 / 5 = 1.6, floor 0.5 * 1.6 = 0.8; code 0's usage only rose to 2 * 0.05 = 0.1, but the
    # batch used it: it keeps its EMA statistics; the unused code 4 is restarted onto a batch vector
    assert quantizer.recent_usage[0].item() == pytest.approx(0.1)
    assert quantizer.ema_count[0].item() == pytest.approx(2.0 * 0.99 + 2 * 0.01)
    assert quantizer.codebook[0].abs().max() < 0.2
    assert quantizer.recent_usage[4].item() == pytest.approx(1.6)
    assert torch.cdist(quantizer.codebook[4:], latent.reshape(2, 8).T).min() < 1e-6


_DDP_TIMEOUT_S = 60.0  # a rank that misses a collective hangs the others; gloo gives up after 20 s


def _quantizer_rank(rank: int, world: int, init_file: str, scenario: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    torch.manual_seed(rank)  # ranks draw different random numbers, as real processes do
    quantizer = EMAVectorQuantizer(codebook_size=16, code_dim=2, dead_code_threshold=0.5, dead_code_window=5)
    # first training step: 40 vectors on rank 0, 24 on rank 1
    quantizer(torch.rand(5 if rank == 0 else 3, 2, 8))
    results = {"after_init": {name: buffer.clone() for name, buffer in quantizer.named_buffers()}}
    if scenario == "empty_rank":
        for empty_rank in (0, 1, None):  # None: no process has a vector at all
            # codes 0-11 far from the data (the same on every rank) and with no recent usage: dead
            quantizer.codebook[:12] = 100.0 + torch.arange(24.0).reshape(12, 2)
            quantizer.ema_sum[:12] = quantizer.codebook[:12] * quantizer.ema_count[:12, None]
            quantizer.recent_usage[:12] = 0.0
            empty = empty_rank is None or rank == empty_rank
            out = quantizer(torch.zeros(0, 2, 8) if empty else torch.rand(4, 2, 8))
            results[f"empty {empty_rank}"] = {
                "codebook": quantizer.codebook.clone(), "commitment": out.commitment_loss.clone()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _run_two_ranks(tmp_path, scenario: str) -> list[dict]:
    context = mp.spawn(_quantizer_rank, args=(2, str(tmp_path / "init"), scenario, str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.monotonic() + _DDP_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the 2-process quantizer run ({scenario}) did not finish in {_DDP_TIMEOUT_S:.0f} s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def test_ddp_initialisation_uses_the_global_uniform_share(tmp_path) -> None:
    ranks = _run_two_ranks(tmp_path, "init")
    for name in ("codebook", "ema_count", "ema_sum", "recent_usage"):
        torch.testing.assert_close(ranks[0]["after_init"][name], ranks[1]["after_init"][name], rtol=0, atol=0)
    # ema_count starts at the uniform share 64 / 16 = 4 and moves towards the all-reduced histogram of the
    # step: its sum stays the global number of vectors, whatever the split between the ranks
    assert ranks[0]["after_init"]["ema_count"].sum().item() == pytest.approx(64.0)


def test_ddp_restart_with_an_empty_rank_finishes_with_identical_codebooks(tmp_path) -> None:
    ranks = _run_two_ranks(tmp_path, "empty_rank")
    for empty_rank in (0, 1):
        step = f"empty {empty_rank}"
        torch.testing.assert_close(ranks[0][step]["codebook"], ranks[1][step]["codebook"], rtol=0, atol=0)
        # the dead codes were restarted onto the vectors of the rank that had some (the unit square)
        assert ranks[0][step]["codebook"][:12].max() <= 1.0
        assert ranks[empty_rank][step]["commitment"].item() == 0.0
    # without any vector anywhere nothing is restarted (the EMA's smoothing barely moves the codes)
    far = 100.0 + torch.arange(24.0).reshape(12, 2)
    for rank in ranks:
        torch.testing.assert_close(rank["empty None"]["codebook"][:12], far, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VQVAE(VolumeTokenizerConfig(channels=6)),
        lambda: VQVAE(VolumeTokenizerConfig(patch_size=(30, 32, 4))),
        lambda: VQVAE(VolumeTokenizerConfig(res_layers=-1)),
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
