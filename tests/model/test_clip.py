"""The CLIP model: shapes, padding and order invariance, cached-encoder reuse, gradient flow, text embedding."""

import math

import pytest
import torch

from prima.factory import create_model, get_model_config
from prima.losses import ClipLoss, PatientDiscriminationLoss
from prima.models.batching import pack_studies
from prima.models.clip import PrimaCLIP, PrimaVisual, zero_shot_prompt
from prima.models.text import train_report_tokenizer

ATOL = 1e-5  # fp32; padding only changes which masked entries enter the softmax


@pytest.fixture
def model(tiny):
    torch.manual_seed(0)
    return PrimaCLIP(tiny).eval()


def _text(model, n, length=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.text.vocab_size, (n, length), generator=g)
    return ids, torch.ones(n, length, dtype=torch.bool)


def test_forward_shapes_tiny(model, random_study):
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [4, 7]), random_study(g, [5, 3, 2])], ["MRI BRAIN", "MRI BRAIN W WO"])
    out = model(batch, *_text(model, 2))
    assert out.image_features.shape == out.text_features.shape == (2, 128)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    assert out.series_features.shape == (5, 16)
    assert out.study_embedding.shape == (2, 2 * 32)  # registers x study width
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.patdis_logit_scale.item() == pytest.approx(10.0, rel=1e-5)
    assert out.series_study.tolist() == [0, 0, 1, 1, 1]
    assert out.series_valid.tolist() == [True] * 5


def test_series_valid_marks_series_without_real_tokens(model, random_study):
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [4, 7]), random_study(g, [5, 3])], ["MRI BRAIN", "MRI HEAD"])
    batch.token_mask[1] = False  # series dropout removed every token of the second series
    out = model(batch, *_text(model, 2))
    assert out.series_valid.dtype == torch.bool and out.series_valid.tolist() == [True, False, True, True]


def test_logit_scales_are_capped_at_100(model, random_study):
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [4, 7])], ["MRI BRAIN"])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        model.patdis_logit_scale.fill_(math.log(1000.0))
    out = model(batch, *_text(model, 1))
    assert out.logit_scale.item() == pytest.approx(100.0) and out.patdis_logit_scale.item() == pytest.approx(100.0)


def test_forward_shapes_lite(random_study):
    torch.manual_seed(0)
    model = create_model("prima-lite").eval()
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [30, 20, 10, 5])], ["MRI BRAIN"])
    with torch.no_grad():
        study, series = model.visual(batch)
        text = model.encode_text(*_text(model, 1))
    assert study.shape == (1, 4 * 256) and series.shape == (4, 256) and text.shape == (1, 128)


def test_forward_shapes_paper_few_tokens(random_study):
    torch.manual_seed(0)
    config = get_model_config("prima-paper")
    visual = PrimaVisual(config.vision).eval()  # the 98 M-parameter text tower is not needed here
    g = torch.Generator().manual_seed(0)
    batch = pack_studies([random_study(g, [6, 4])], ["MRI BRAIN WITH AND WITHOUT CONTRAST"], 64, 128)
    with torch.no_grad():
        study, series = visual(batch)
    assert study.shape == (1, 10240) and series.shape == (2, 1024)


def test_padding_tokens_and_an_all_masked_series_change_nothing(model, random_study):
    g = torch.Generator().manual_seed(0)
    study = random_study(g, [4, 7, 3])
    reference, _ = model.visual(model.pack([study], ["MRI BRAIN"]))

    # a neighbour study with many more tokens forces heavy padding of this study's series
    neighbour = random_study(g, [40, 2])
    padded, _ = model.visual(model.pack([study, neighbour], ["MRI BRAIN", "OTHER"]))
    torch.testing.assert_close(padded[:1], reference, atol=ATOL, rtol=0)

    # an extra series whose tokens are all masked is ignored by the study ViT
    batch = model.pack([study + [(torch.randn(5, 289, generator=g), "AX DWI")]], ["MRI BRAIN"])
    batch.token_mask[-1] = False
    with_empty, _ = model.visual(batch)
    torch.testing.assert_close(with_empty, reference, atol=ATOL, rtol=0)


def test_study_embedding_ignores_series_order(model, random_study):
    g = torch.Generator().manual_seed(0)
    study = random_study(g, [4, 7, 3, 5])
    forward, _ = model.visual(model.pack([study], ["MRI BRAIN"]))
    backward, _ = model.visual(model.pack([study[::-1]], ["MRI BRAIN"]))
    torch.testing.assert_close(backward, forward, atol=ATOL, rtol=0)


def test_cached_series_vectors_reproduce_the_study(model, random_study):
    """LIME re-encodes one series and reuses the cached vectors of the others."""
    g = torch.Generator().manual_seed(0)
    study = random_study(g, [4, 7, 3])
    batch = model.pack([study], ["MRI BRAIN"])
    reference, cached = model.visual(batch)

    one = model.pack([[study[1]]], ["MRI BRAIN"])
    fresh = model.visual.encode_series(one.tokens, one.token_mask, one.name_ids, one.name_mask)
    vectors = torch.stack([cached[0], fresh[0], cached[2]])[None]
    study_embedding = model.visual.encode_study(
        vectors, torch.ones(1, 3, dtype=torch.bool), batch.description_ids, batch.description_mask
    )
    torch.testing.assert_close(study_embedding, reference, atol=ATOL, rtol=0)


def test_every_trainable_parameter_gets_a_gradient(tiny, random_study):
    torch.manual_seed(0)
    model = PrimaCLIP(tiny).train()
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [4, 6]), random_study(g, [3, 5, 2])], ["MRI BRAIN", "MRI HEAD"])
    out = model(batch, *_text(model, 2))
    loss = ClipLoss()(out.image_features, out.text_features, out.logit_scale)
    loss = loss + tiny.patdis_weight * PatientDiscriminationLoss()(
        out.series_features, out.series_study, out.patdis_logit_scale, out.series_valid
    )
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []


def test_bf16_autocast_forward(model, random_study):
    g = torch.Generator().manual_seed(0)
    batch = model.pack([random_study(g, [4, 7])], ["MRI BRAIN"])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        low = model.encode_image(batch)
    torch.testing.assert_close(low.float(), model.encode_image(batch).detach(), atol=0.05, rtol=0.05)


def test_studies_whose_series_have_no_tokens(model):
    batch = model.pack([[(torch.zeros(0, 289), "AX T1")], []], ["MRI BRAIN", "MRI HEAD"])
    study, series = model.visual(batch)
    assert study.shape == (2, 64) and series.shape == (1, 48) and torch.isfinite(study).all()
    # without usable series a study embedding depends only on its description
    only_description, _ = model.visual(model.pack([[]], ["MRI BRAIN"]))
    torch.testing.assert_close(study[:1], only_description, atol=ATOL, rtol=0)


def test_embed_texts_is_encode_text_normalised_in_fp32_in_batches(model):
    texts = [f"finding {i}: {'enhancing ' * (i % 4)}mass in the left frontal lobe." for i in range(7)]
    tokenizer = train_report_tokenizer(texts * 3, 300)
    embedded = model.embed_texts(tokenizer, texts, batch_size=3)  # three forwards, the last of one text
    assert embedded.shape == (7, 128) and embedded.dtype == torch.float32 and not embedded.requires_grad
    torch.testing.assert_close(embedded.norm(dim=-1), torch.ones(7))
    for i, text in enumerate(texts):
        ids, mask = tokenizer([text], model.config.text.context_length)
        with torch.no_grad():
            torch.testing.assert_close(embedded[i], model.encode_text(ids, mask)[0], atol=ATOL, rtol=0)
    assert model.embed_texts(tokenizer, []).shape == (0, 128)
    bf16 = model.embed_texts(tokenizer, texts, torch.bfloat16)
    assert bf16.dtype == torch.float32 and (bf16 * embedded).sum(-1).min() > 0.99  # normalised in fp32
    with pytest.raises(ValueError, match="batch_size"):
        model.embed_texts(tokenizer, texts, batch_size=0)


def test_zero_shot_prompt_is_the_display_name_as_a_sentence():
    assert zero_shot_prompt("Meningioma") == "Meningioma."
    with pytest.raises(ValueError, match="display name"):
        zero_shot_prompt("  ")
