import pytest
import torch

from prima.config import SequenceViTConfig
from prima.models.sequence_vit import SequenceViT

CONFIG = SequenceViTConfig(depth=2, heads=2, head_dim=16, mlp_dim=32, registers=3, out_dim=24)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return SequenceViT(CONFIG).eval()


def test_series_vector_comes_from_the_concatenated_registers(vit):
    assert vit.proj.in_features == 3 * 289
    tokens, mask, name = torch.randn(2, 5, 289), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 289)
    assert vit(tokens, mask, name).shape == (2, 24)


def test_token_outputs_come_with_the_series_vector(vit):
    tokens, mask, name = torch.randn(2, 5, 289), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 289)
    mask[1, 3:] = False
    series, token_outputs = vit.encode_with_tokens(tokens, mask, name)
    torch.testing.assert_close(series, vit(tokens, mask, name), atol=0, rtol=0)
    assert token_outputs.shape == (2, 5, 289)
    changed = tokens.clone()
    changed[0, 2] += torch.randn(289)  # only the changed token's own output moves beyond the others' share
    moved = (vit.encode_with_tokens(changed, mask, name)[1][0] - token_outputs[0]).abs().sum(-1)
    assert int(moved.argmax()) == 2


def test_the_name_and_only_real_tokens_matter(vit):
    tokens, mask, name = torch.randn(1, 6, 289), torch.ones(1, 6, dtype=torch.bool), torch.randn(1, 289)
    mask[0, 4:] = False
    reference = vit(tokens, mask, name)
    changed_padding = tokens.clone()
    changed_padding[0, 4:] = 50.0
    torch.testing.assert_close(vit(changed_padding, mask, name), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(vit(tokens, mask, torch.randn(1, 289)), reference, atol=1e-3)
    changed_real = tokens.clone()
    changed_real[0, 0] += torch.randn(289)  # a constant shift would vanish in the LayerNorm
    assert not torch.allclose(vit(changed_real, mask, name), reference, atol=1e-3)


def test_bad_arguments_raise_value_error(vit):
    with pytest.raises(ValueError, match="registers"):
        SequenceViT(SequenceViTConfig(registers=0))
    with pytest.raises(ValueError, match="289"):
        vit(torch.randn(1, 4, 288), torch.ones(1, 4, dtype=torch.bool), torch.randn(1, 289))
    with pytest.raises(ValueError, match="token_mask"):
        vit(torch.randn(1, 4, 289), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 289))
