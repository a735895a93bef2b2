import pytest
import torch

from prima.config import NameEncoderConfig
from prima.models.name_encoder import CLS_ID, PAD_ID, UNK_ID, NameEncoder, encode_names


def test_names_become_cls_plus_utf8_bytes():
    ids, mask = encode_names(["AX", "T2é"], max_length=16)
    assert ids[0].tolist() == [CLS_ID, ord("A") + 3, ord("X") + 3, PAD_ID, PAD_ID]
    assert ids[1, 1:].tolist() == [b + 3 for b in "T2é".encode("utf-8")]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]


@pytest.mark.parametrize("missing", [None, "", "  ", "unk", "UNK"])
def test_missing_names_become_unk(missing):
    ids, _ = encode_names([missing], max_length=8)
    assert ids[0].tolist() == [CLS_ID, UNK_ID]


def test_long_names_are_cut_to_max_length():
    ids, mask = encode_names(["X" * 100], max_length=10)
    assert ids.shape == (1, 10) and mask.all()


def test_output_ignores_padding_and_batch_neighbours():
    torch.manual_seed(0)
    config = NameEncoderConfig(width=32, depth=2, heads=2, head_dim=16, mlp_dim=32, max_length=40, out_dim=20)
    encoder = NameEncoder(config)
    alone = encoder.encode(["AX_T1"])
    batched = encoder.encode(["AX_T1", "SAG T2 FLAIR WITH A LONG SUFFIX"])
    assert alone.shape == (1, 20)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)  # fp32, padding masked
    assert not torch.allclose(batched[0], batched[1])


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="max_length"):
        encode_names(["AX"], max_length=1)
    config = NameEncoderConfig(width=16, depth=1, heads=1, head_dim=16, mlp_dim=16, max_length=4, out_dim=8)
    encoder = NameEncoder(config)
    ids, mask = encode_names(["AXIAL"], max_length=10)
    with pytest.raises(ValueError, match="max_length"):
        encoder(ids, mask)
