import pytest
import torch

from prima.models.transformer import Attention, Transformer


def test_masked_keys_do_not_change_real_outputs():
    torch.manual_seed(0)
    model = Transformer(dim=24, depth=2, heads=3, head_dim=8, mlp_dim=32).eval()
    x = torch.randn(1, 5, 24)
    padded = torch.cat([x, 100 * torch.randn(1, 4, 24)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    torch.testing.assert_close(model(padded, mask)[:, :5], model(x), atol=1e-5, rtol=0)


def test_inner_width_may_differ_from_model_width():
    attention = Attention(dim=289, heads=16, head_dim=64)
    assert attention.to_qkv.weight.shape == (3 * 1024, 289)
    assert attention.to_out.weight.shape == (289, 1024)
    assert attention(torch.randn(2, 7, 289)).shape == (2, 7, 289)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=1, heads=2, head_dim=16, mlp_dim=32).eval()
    x = torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    torch.testing.assert_close(low.float(), model(x), atol=0.1, rtol=0.05)  # bf16 has ~3 significant digits


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError):
        Attention(dim=8, heads=0, head_dim=4)
    with pytest.raises(ValueError):
        Transformer(dim=8, depth=0, heads=1, head_dim=8, mlp_dim=8)
