import pytest
import torch

from prima.config import StudyViTConfig
from prima.models.study_vit import StudyViT

CONFIG = StudyViTConfig(width=32, depth=2, heads=2, head_dim=16, mlp_dim=32, registers=4)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return StudyViT(CONFIG, series_dim=24).eval()


def test_study_embedding_is_the_concatenated_registers(vit):
    assert vit.out_dim == 4 * 32
    out = vit(torch.randn(3, 5, 24), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 32))
    assert out.shape == (3, 128)


def test_series_order_and_masked_series_do_not_matter(vit):
    series, description = torch.randn(1, 4, 24), torch.randn(1, 32)
    mask = torch.tensor([[True, True, True, False]])
    reference = vit(series, mask, description)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(vit(series[:, order], mask[:, order], description), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(vit(series[:, :3], mask[:, :3], description), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(vit(series, mask, torch.randn(1, 32)), reference, atol=1e-3)


def test_bad_arguments_raise_value_error(vit):
    with pytest.raises(ValueError, match="registers"):
        StudyViT(StudyViTConfig(registers=0), series_dim=8)
    with pytest.raises(ValueError, match="series_mask"):
        vit(torch.randn(1, 4, 24), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 32))
