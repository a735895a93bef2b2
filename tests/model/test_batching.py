import pytest
import torch

from prima.models.batching import pack_studies


def test_pack_layout_and_masks(random_study):
    g = torch.Generator().manual_seed(0)
    studies = [random_study(g, [3, 5]), random_study(g, [2, 0, 4])]
    batch = pack_studies(studies, ["MRI BRAIN", None], name_max_length=16, description_max_length=16)
    assert batch.tokens.shape == (5, 5, 289)
    assert batch.token_mask.sum(-1).tolist() == [3, 5, 2, 0, 4]
    assert torch.equal(batch.tokens[1], studies[0][1][0])
    assert batch.tokens[0, 3:].abs().sum() == 0
    assert batch.series_study.tolist() == [0, 0, 1, 1, 1]
    assert batch.series_slot.tolist() == [0, 1, 0, 1, 2]
    assert batch.num_studies == 2 and batch.max_series == 3

    vectors = torch.arange(5.0)[:, None].expand(5, 2)
    layout, mask = batch.study_layout(vectors)
    assert layout[:, :, 0].tolist() == [[0, 1, 0], [2, 3, 4]]
    # the empty series (no tokens) and the padding slot are not usable
    assert mask.tolist() == [[True, True, False], [True, False, True]]


def test_bad_arguments_raise_value_error(random_study):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="descriptions"):
        pack_studies([random_study(g, [2])], [], 8, 8)
    with pytest.raises(ValueError, match="empty"):
        pack_studies([], [], 8, 8)
    with pytest.raises(ValueError, match="289"):
        pack_studies([[(torch.zeros(3, 100), "AX")]], ["x"], 8, 8)
