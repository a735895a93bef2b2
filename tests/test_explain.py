"""prima.explain: LIME over volume tokens, heatmaps, the sequence-drop analysis and zero-shot scoring.

The LIME and series-contribution checks with a known answer run on a toy release: a deep copy of the
random-weights release whose sequence ViT, study ViT and heads are replaced by small deterministic
modules (``ToySequenceViT``, ``ToyStudyViT``, ``ToyHeads``), so the explained output is an exact
linear function of which known tokens are kept. Everything else runs on the real random-weights
prima-lite release.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from prima.explain import (DEFAULT_KERNEL_WIDTH, Explanation, explain, heatmap, keep_masks, lime_kernel,
                           masked_outputs, series_contribution, zero_shot)
from prima.io import load_study
from prima.models.clip import zero_shot_prompt
from prima.models.heads import HeadOutput
from prima.patching import patch_extent
from prima.predict import predict_tokens, series_outputs, study_embedding
from prima.preprocess import preprocess_series
from prima.tokens import StudyTokens, series_patches, tokenize_study

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLE = EXAMPLES / "glioma_high_grade.zip"


@pytest.fixture(scope="module")
def tokens(random_release) -> StudyTokens:
    return tokenize_study(load_study(EXAMPLE), random_release)


@pytest.fixture(scope="module")
def key(random_release) -> str:
    return random_release.config.label_space.diagnosis_keys[0]


class ToySequenceViT(nn.Module):
    """Series vector: component 0 = sum of the weights of the known tokens present (matched by their
    exact features), every other component 0."""

    def __init__(self, known: Tensor, weights: list[float], out_dim: int) -> None:
        super().__init__()
        self.register_buffer("known", known)  # (M, 289)
        self.register_buffer("weights", torch.tensor(weights))  # (M,)
        self.out_dim = out_dim

    def encode_with_tokens(self, tokens: Tensor, token_mask: Tensor, name_embedding: Tensor) -> tuple[Tensor, Tensor]:
        hits = (tokens[:, :, None] == self.known[None, None]).all(-1) & token_mask[..., None]  # (S, T, M)
        out = tokens.new_zeros(len(tokens), self.out_dim)
        out[:, 0] = (hits.float() * self.weights).sum((1, 2))
        return out, tokens


class ToyStudyViT(nn.Module):
    """Study embedding: the sum of the present series' vectors."""

    def forward(self, series_vectors: Tensor, series_mask: Tensor, description_embedding: Tensor) -> Tensor:
        return (series_vectors * series_mask[..., None]).sum(1)


class ToyHeads(nn.Module):
    """Every diagnosis and referral logit is component 0 of the study embedding."""

    pools_tokens = False

    def __init__(self, n_diagnoses: int, n_referrals: int, n_tiers: int) -> None:
        super().__init__()
        self.sizes = n_diagnoses, n_referrals, n_tiers

    def forward(self, embedding: Tensor, series_scores: None = None) -> HeadOutput:
        value = embedding[:, :1]
        return HeadOutput(*(value.expand(-1, n) for n in self.sizes))


@pytest.fixture(scope="module")
def toy(random_release, tokens):
    """A release whose every diagnosis logit is 3 k_a + 2 k_b + 1 k_c, k = 1 when that token of series 1
    is kept, plus the explained tokens (a, b, c) as indices into series 1."""
    known = [17, 101, 60]
    space = random_release.config.label_space
    model = copy.deepcopy(random_release.model)
    model.visual.sequence_vit = ToySequenceViT(tokens.series[1].features[known], [3.0, 2.0, 1.0],
                                               model.visual.series_dim)
    model.visual.study_vit = ToyStudyViT()
    heads = ToyHeads(len(space.diagnosis_keys), len(space.referral_keys), len(space.priority_tiers))
    return dataclasses.replace(random_release, model=model, heads=heads), known


def test_lime_on_a_toy_ranks_the_known_tokens_first(toy, tokens, key):
    release, known = toy
    explanation = explain(tokens, release, key, tokens.series[1].name, num_samples=400, top_k=3, device="cpu",
                          precision="fp32")
    assert explanation.top_k.tolist() == known
    assert explanation.r2 > 0.99
    assert explanation.base_value == pytest.approx(6.0)
    others = np.delete(explanation.weights, known)
    assert np.abs(others).max() < 0.05
    assert explanation.weights[known] == pytest.approx([3.0, 2.0, 1.0], rel=0.06)  # lime's ridge (alpha 1) shrinks
    # the heatmap's hottest voxels are exactly token a's patch
    volume = heatmap(explanation, tokens.series[1])
    hottest = np.argwhere(volume == volume.max())
    extent = np.array(patch_extent(tokens.series[1].through_axis))
    assert (hottest // extent == tokens.series[1].coords[known[0]]).all()


def test_explanation_is_deterministic_for_a_seed(tokens, random_release, key):
    def run(seed: int) -> Explanation:
        return explain(tokens, random_release, key, 0, num_samples=48, seed=seed, batch_size=16, device="cpu",
                       precision="fp32")

    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first.weights, again.weights)
    assert (first.intercept, first.r2, first.base_value) == (again.intercept, again.r2, again.base_value)
    assert not np.array_equal(first.weights, other.weights)
    doc = json.loads(json.dumps(first.to_dict()))  # JSON-ready, as Prediction.explanations holds it
    assert len(doc["weights"]) == len(doc["coords"]) == len(doc["patch_indices"]) == len(tokens.series[0])
    assert doc["target_kind"] == "diagnosis" and doc["series"] == tokens.series[0].name
    assert doc["kernel_width"] == DEFAULT_KERNEL_WIDTH and doc["num_samples"] == 48


def test_the_locality_kernel_is_lime_s_and_is_used(tokens, random_release, key):
    masks = keep_masks(100, 5, 0)
    distances = 1 - np.sqrt(masks.sum(1) / 100)  # cosine distance of a 0/1 mask from the all-ones mask
    assert lime_kernel(distances, 0.25) == pytest.approx(np.exp(-(distances**2) / 0.25**2 / 2))
    narrow, wide = (explain(tokens, random_release, key, 0, num_samples=48, kernel_width=width, device="cpu",
                            precision="fp32") for width in (0.25, 100.0))
    assert not np.allclose(narrow.weights, wide.weights)  # a real kernel, not all-equal sample weights


def test_keep_masks():
    masks = keep_masks(40, 300, seed=1)
    assert masks.shape == (300, 40) and set(np.unique(masks)) == {0, 1}
    assert masks[0].all() and masks.sum(1).min() >= 1
    assert masks[1:].mean() == pytest.approx(0.5, abs=0.02)
    assert keep_masks(1, 50, seed=0).all()  # a one-token series keeps its token in every sample
    assert np.array_equal(keep_masks(40, 300, seed=1), masks)


@pytest.mark.parametrize("target", ["diagnosis", "referral", "priority"])
def test_batched_equals_masked_padding_equals_each_sample_alone(tokens, random_release, target):
    """Dropping tokens and packing the samples by kept count gives the output of each subset run alone."""
    space = random_release.config.label_space
    target = {"diagnosis": space.diagnosis_keys[5], "referral": space.referral_keys[2], "priority": "priority"}[target]
    index = 2
    series = tokens.series[index]
    masks = keep_masks(len(series), 11, seed=7)
    masks[1] = 0  # extremes: one token kept, and every token but one
    masks[1, 0] = 1
    masks[2, :] = 1
    masks[2, 0] = 0
    batched = masked_outputs(tokens, random_release, index, masks, target, batch_size=4, dtype=None)

    # masked padding: every sample keeps all K positions and masks the removed tokens
    model = random_release.model
    batch = model.pack([[(series.features, series.name)] * len(masks)], [None])
    with torch.no_grad():
        vectors = model.visual.encode_series(batch.tokens, torch.from_numpy(masks).bool(), batch.name_ids,
                                             batch.name_mask)
        study = series_outputs(random_release, tokens, None).vectors[None].repeat(len(masks), 1, 1)
        study[:, index] = vectors
        heads = random_release.heads(study_embedding(random_release, study, tokens.description, None))

    def output(logits_of: HeadOutput, row: int) -> float:
        if target in space.diagnosis_keys:
            return float(logits_of.diagnosis_logits[row, space.diagnosis_keys.index(target)])
        if target in space.referral_keys:
            return float(logits_of.referral_logits[row, space.referral_keys.index(target)])
        return float(logits_of.priority_logits[row].softmax(-1) @ torch.tensor([0.0, 0.5, 1.0]))

    padded = np.array([output(heads, row) for row in range(len(masks))])

    # alone: the whole prediction path on a study whose series holds only the kept tokens
    def alone(mask: np.ndarray) -> float:
        study_tokens = StudyTokens(tokens.description, list(tokens.series))
        study_tokens.series[index] = series.subset(np.flatnonzero(mask))
        prediction = predict_tokens(study_tokens, random_release, precision="fp32")
        if target == "priority":
            return sum(i / 2 * p for i, p in enumerate(prediction.priority.probs.values()))
        scores = prediction.diagnoses if target in space.diagnosis_keys else prediction.referrals
        return next(s.logit for s in scores if s.key == target)

    single = np.array([alone(mask) for mask in masks])
    assert np.abs(batched - padded).max() <= 1e-4
    assert np.abs(batched - single).max() <= 1e-4
    assert np.ptp(single) > 1e-3  # the perturbations do change the output


@pytest.fixture(scope="module")
def three_plane_tokens(three_plane_study, random_release):
    study = load_study(three_plane_study.folder)
    return study, tokenize_study(study, random_release)


def _hand_explanation(series, weights: np.ndarray) -> Explanation:
    return Explanation(target="x", target_kind="diagnosis", series=series.name, series_index=0, num_samples=2, seed=0,
                       kernel_width=0.25, weights=weights, coords=series.coords, patch_indices=series.patch_indices,
                       intercept=0.0, r2=1.0, base_value=0.0, top_k=np.zeros(0, dtype=np.int64), elapsed_s=0.0)


def test_heatmap_puts_each_weight_on_its_patch_in_every_plane(three_plane_tokens, random_release):
    study, study_tokens = three_plane_tokens
    assert {s.plane for s in study_tokens.series} == {"axial", "coronal", "sagittal"}
    for loaded, series in zip(study.series, study_tokens.series):
        weights = np.arange(1, len(series) + 1, dtype=np.float64)  # distinct, non-zero
        volume = heatmap(_hand_explanation(series, weights), series)
        assert volume.shape == tuple(series.shape) and volume.dtype == np.float32
        extent = patch_extent(series.through_axis)
        expected = np.zeros(series.shape, dtype=np.float32)
        for weight, coord in zip(weights, series.coords):
            expected[tuple(slice(c * e, (c + 1) * e) for c, e in zip(coord, extent))] = weight
        assert np.array_equal(volume, expected)
        # the voxels under a token's weight are the image content that token encoded
        image = preprocess_series(loaded, random_release.config.preprocess).array
        patches = series_patches(loaded, random_release.config).patches
        for token in (0, len(series) // 2, len(series) - 1):
            region = tuple(slice(c * e, (c + 1) * e) for c, e in zip(series.coords[token], extent))
            assert np.count_nonzero(volume == weights[token]) == volume[region].size
            cut = np.moveaxis(image[region], series.through_axis, -1)  # patches keep the through axis last
            patch = patches[series.patch_indices[token]]
            assert np.array_equal(cut, patch[: cut.shape[0], : cut.shape[1], : cut.shape[2]])


def test_heatmap_rejects_another_series_tokens(tokens):
    explanation = _hand_explanation(tokens.series[0], np.ones(len(tokens.series[0])))
    with pytest.raises(ValueError, match="not of these tokens"):
        heatmap(explanation, tokens.series[1])


def test_series_contribution_on_a_toy(toy, tokens):
    release, _ = toy
    contribution = series_contribution(tokens, release, device="cpu", precision="fp32")
    names = [s.name for s in tokens.series]
    assert contribution.series == names
    assert contribution.deltas[1] == pytest.approx(6.0)  # the toy's output lives in series 1 only
    assert np.array_equal(contribution.deltas[[0, 2]], np.zeros((2, len(contribution.diagnosis_keys))))
    doc = json.loads(json.dumps(contribution.to_dict()))
    assert list(doc["deltas"]) == names and doc["deltas"][names[1]][contribution.diagnosis_keys[0]] == 6.0


def test_series_contribution_is_full_minus_the_study_without_the_series(tokens, random_release):
    contribution = series_contribution(tokens, random_release, device="cpu", precision="fp32")
    full = predict_tokens(tokens, random_release, precision="fp32")
    without = predict_tokens(StudyTokens(tokens.description, tokens.series[:1] + tokens.series[2:]), random_release,
                             precision="fp32")
    np.testing.assert_allclose(contribution.logits, [d.logit for d in full.diagnoses], atol=1e-5)
    dropped = [f.logit - w.logit for f, w in zip(full.diagnoses, without.diagnoses)]
    np.testing.assert_allclose(contribution.deltas[1], dropped, atol=1e-5)
    one_series = StudyTokens(tokens.description, tokens.series[:1])
    single = series_contribution(one_series, random_release, device="cpu")
    assert single.deltas.shape == (1, len(contribution.diagnosis_keys))  # the study ViT without any series


def test_zero_shot_on_a_toy_ranks_the_matching_prompt_first(tokens, random_release):
    prompts = ["ring-enhancing mass in the left frontal lobe", "acute infarct with restricted diffusion",
               "no acute intracranial abnormality"]
    release = dataclasses.replace(random_release, model=copy.deepcopy(random_release.model))
    model = release.model
    ids, mask = release.report_tokenizer(prompts[:1], release.config.text.context_length)
    with torch.no_grad():  # the study's joint-space embedding is made to be the first prompt's
        model.image_proj.weight.zero_()
        model.image_proj.bias.copy_(model.encode_text(ids, mask, normalize=False)[0])
    scores = [zero_shot(tokens, release, text, device="cpu", precision="fp32") for text in prompts]
    assert max(scores, key=lambda s: s.cosine).text == prompts[0]
    assert scores[0].cosine == pytest.approx(1.0, abs=1e-5)
    scale = float(model.logit_scale.detach().exp())
    assert all(s.logit == pytest.approx(scale * s.cosine) for s in scores)


def test_zero_shot_nearest_diagnoses_and_embedding_input(tokens, random_release):
    space = random_release.config.label_space
    meningioma = space.diagnosis("tumor_adult_meningioma")
    prompt = zero_shot_prompt(meningioma.name)  # "Meningioma.": the text the diagnoses are embedded as
    result = zero_shot(tokens, random_release, prompt, top_k=3, device="cpu", precision="fp32")
    assert result.nearest[0]["key"] == meningioma.key and len(result.nearest) == 3
    assert result.nearest[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    embedding = predict_tokens(tokens, random_release, precision="fp32", return_embedding=True).embedding
    from_embedding = zero_shot(embedding, random_release, prompt, top_k=3, device="cpu", precision="fp32")
    assert from_embedding.cosine == pytest.approx(result.cosine, abs=1e-5)
    assert json.loads(json.dumps(result.to_dict()))["text"] == prompt
    with pytest.raises(ValueError, match=r"shape \(1024,\)"):
        zero_shot(embedding[:10], random_release, "mass", device="cpu")


def test_bad_arguments_name_the_valid_choices(tokens, random_release, key):
    with pytest.raises(ValueError, match="unknown target 'tumour'.*'priority'.*tumor_adult_meningioma.*ns_oncology"):
        explain(tokens, random_release, "tumour", 0, device="cpu")
    with pytest.raises(ValueError, match=r"unknown series 'AX T9'.*\[0, 3\).*t2_tirm_tra_dark-fluid_p2"):
        explain(tokens, random_release, key, "AX T9", device="cpu")
    with pytest.raises(ValueError, match=r"unknown series 3; valid: an index in \[0, 3\)"):
        explain(tokens, random_release, key, 3, device="cpu")
    empty = StudyTokens("MRI BRAIN", [])
    for call in (lambda: explain(empty, random_release, key, 0, device="cpu"),
                 lambda: series_contribution(empty, random_release, device="cpu"),
                 lambda: zero_shot(empty, random_release, "mass", device="cpu")):
        with pytest.raises(ValueError, match="no tokenized series"):
            call()
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        explain(tokens, random_release, key, 0, num_samples=1, device="cpu")
    with pytest.raises(ValueError, match="kernel_width must be > 0"):
        explain(tokens, random_release, key, 0, kernel_width=0, device="cpu")


def test_end_to_end_from_a_study_path(random_release_path, tokens):
    seen: list[tuple[float, str]] = []
    name = tokens.series[1].name
    explanation = explain(EXAMPLE, random_release_path, "priority", name, num_samples=40, batch_size=16,
                          device="cpu", precision="fp32", progress=lambda f, s: seen.append((f, s)))
    assert explanation.series == name and explanation.series_index == 1 and explanation.target_kind == "priority"
    assert len(explanation.weights) == len(tokens.series[1]) and 0.0 <= explanation.base_value <= 1.0
    assert np.array_equal(explanation.patch_indices, tokens.series[1].patch_indices)
    assert all(explanation.weights[i] > 0 for i in explanation.top_k) and len(explanation.top_k) <= 10
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("tokenizing" in stage for _, stage in seen) and any("40/40 samples" in s for _, s in seen)
    assert explanation.elapsed_s > 0


def test_a_token_pooling_release_explains_and_drops_series_as_its_prediction_reads(pooling_release):
    """With diagnoses pooled from token scores, LIME's batched samples equal each subset predicted alone, and the
    series-drop analysis starts from the prediction's own logits and equals predicting without each series."""
    tokens = tokenize_study(load_study(EXAMPLE), pooling_release, precision="fp32")
    key = pooling_release.config.label_space.diagnosis_keys[3]
    index = 1
    series = tokens.series[index]
    masks = keep_masks(len(series), 9, seed=2)
    masks[1] = 0
    masks[1, 0] = 1  # one token kept: fewer than the heads' top_tokens
    batched = masked_outputs(tokens, pooling_release, index, masks, key, batch_size=4, dtype=None)

    def logit(study_tokens: StudyTokens) -> np.ndarray:
        return np.array([d.logit for d in predict_tokens(study_tokens, pooling_release, precision="fp32").diagnoses])

    position = pooling_release.config.label_space.diagnosis_keys.index(key)
    alone = []
    for mask in masks:
        subset = StudyTokens(tokens.description, list(tokens.series))
        subset.series[index] = series.subset(np.flatnonzero(mask))
        alone.append(logit(subset)[position])
    assert np.abs(batched - np.array(alone)).max() <= 1e-4
    assert np.ptp(alone) > 1e-4

    contribution = series_contribution(tokens, pooling_release, device="cpu", precision="fp32")
    full = logit(tokens)
    assert np.abs(contribution.logits - full).max() <= 1e-4
    without = StudyTokens(tokens.description, [s for i, s in enumerate(tokens.series) if i != index])
    assert np.abs(contribution.deltas[index] - (full - logit(without))).max() <= 1e-4
