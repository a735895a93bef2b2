import pytest
import torch

from prima.config import TextConfig
from prima.models.text import EOS_TOKEN, ReportTokenizer, TextTower, train_report_tokenizer

CORPUS = [
    "No acute intracranial abnormality.",
    "Extra-axial dural-based enhancing mass along the left frontal convexity, consistent with meningioma.",
    "Restricted diffusion in the right MCA territory compatible with acute infarct.",
    "Mild chronic small vessel ischemic change. Ventricles are normal in size.",
] * 10


@pytest.fixture(scope="module")
def tokenizer() -> ReportTokenizer:
    return train_report_tokenizer(CORPUS, vocab_size=320)


def test_tokenizer_round_trip_and_eos(tokenizer):
    ids, mask = tokenizer(["acute infarct", "No acute intracranial abnormality."], context_length=64)
    assert ids.shape[0] == 2 and ids.dtype == torch.long
    lengths = mask.sum(-1)
    assert ids[0, lengths[0] - 1] == ids[1, lengths[1] - 1] == tokenizer.eos_id
    assert (ids[0, lengths[0]:] == tokenizer.pad_id).all()
    assert tokenizer.decode(ids[1, : lengths[1]].tolist()) == "No acute intracranial abnormality."
    # merges learnt from the corpus: a frequent word costs fewer tokens than its bytes
    assert lengths[1] < len("No acute intracranial abnormality.")


def test_any_byte_is_encodable(tokenizer):
    ids, mask = tokenizer(["ñ 日本 ≥5 mm"], context_length=64)
    assert tokenizer.decode(ids[0, : mask.sum()].tolist()) == "ñ 日本 ≥5 mm"


def test_context_length_cuts_and_keeps_eos(tokenizer):
    ids, mask = tokenizer([" ".join(CORPUS)], context_length=16)
    assert ids.shape == (1, 16) and mask.all() and ids[0, -1] == tokenizer.eos_id


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.json")
    loaded = ReportTokenizer.load(tmp_path / "t.json")
    assert torch.equal(loaded(CORPUS[:3], 64)[0], tokenizer(CORPUS[:3], 64)[0])


def test_embedding_is_the_eos_state_and_ignores_padding(tokenizer):
    torch.manual_seed(0)
    tower = TextTower(TextConfig(vocab_size=320, context_length=64, width=32, depth=2, heads=2)).eval()
    ids, mask = tokenizer(["acute infarct", CORPUS[1]], context_length=64)
    both = tower(ids, mask)
    alone_ids, alone_mask = tokenizer(["acute infarct"], context_length=64)
    assert both.shape == (2, 32)
    torch.testing.assert_close(both[:1], tower(alone_ids, alone_mask), atol=1e-5, rtol=0)
    assert tower.lm_logits(ids, mask).shape == (2, ids.shape[1], 320)


def test_bad_arguments_raise_value_error(tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        train_report_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(["x"], context_length=1)
    with pytest.raises(ValueError, match="divisible"):
        TextTower(TextConfig(width=30, heads=4))
    tower = TextTower(TextConfig(vocab_size=320, context_length=8, width=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="context_length"):
        tower(*tokenizer([CORPUS[1]], context_length=64))
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match=EOS_TOKEN.replace("|", r"\|")):
        ReportTokenizer(Tokenizer(models.BPE()))
