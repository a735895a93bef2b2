"""Study assembly: determinism, normal studies, labels/priority/referrals, protocol choice, protocol-blind
studies, truncation and splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from prima.labels import default_label_space
from training.synth.pathology import DIAGNOSES, KEY_SEQUENCES, UNREMARKABLE_FRACTION
from training.synth.protocols import PROTOCOLS, SERIES_KINDS, choose_protocol, draw_series_kinds, wanted_sequences
from training.synth.sequences import POST_CONTRAST
from training.synth.study import (
    PROTOCOL_BLIND_SPLITS,
    generate_study,
    is_protocol_blind,
    SPLIT_FRACTIONS,
    plan_study,
    stratified_primaries,
    split_table,
    study_split,
    study_streams,
    _split_of,
)
from training.synth.pathology import draws_unremarkable, primary_weights

SPACING = 3.0
KEYS = default_label_space().diagnosis_keys


def assert_same_study(a, b):
    assert (a.study_id, a.study_description, a.report, a.labels, a.priority, a.referrals) == (
        b.study_id, b.study_description, b.report, b.labels, b.priority, b.referrals)
    assert [s.name for s in a.series] == [s.name for s in b.series]
    for x, y in zip(a.series, b.series):
        np.testing.assert_array_equal(x.volume, y.volume)
        np.testing.assert_array_equal(x.affine, y.affine)
        assert sorted(x.masks) == sorted(y.masks)
        for key in x.masks:
            np.testing.assert_array_equal(x.masks[key], y.masks[key])


def test_same_seed_and_index_give_identical_studies():
    a = generate_study(3, 5, spacing=SPACING)
    b = generate_study(3, 5, spacing=SPACING)
    assert_same_study(a, b)
    c = generate_study(3, 6, spacing=SPACING)
    assert (a.subject, a.series[0].volume.shape) != (c.subject, c.series[0].volume.shape)


def test_normal_study_has_no_labels_masks_or_referrals():
    study = generate_study(0, 2, spacing=SPACING, keys=[])
    assert sum(study.labels.values()) == 0 and len(study.labels) == 52
    assert study.priority == "low" and study.referrals == [] and study.findings == []
    assert all(s.masks == {} for s in study.series)
    assert 2 <= len(study.series) <= 8
    assert study.report.strip()


@pytest.mark.parametrize("key", ["tumor_adult_meningioma", "vascular_ischemic_large_vessel_stroke"])
def test_forced_diagnosis_is_labelled_masked_and_triaged(key):
    space = default_label_space()
    study = generate_study(0, 4, spacing=SPACING, keys=[key])
    positives = [k for k, v in study.labels.items() if v]
    assert key in positives
    assert {f.key for f in study.findings} == set(positives)
    assert study.priority == space.priority_of(positives)
    assert study.referrals == space.referrals_of(positives)
    # The lesion shows up on at least one series' grid.
    assert any(s.masks.get(key) is not None and s.masks[key].any() for s in study.series)


def test_unknown_keys_and_bad_arguments_raise():
    with pytest.raises(ValueError):
        generate_study(0, 0, spacing=SPACING, keys=["not_a_diagnosis"])
    with pytest.raises(ValueError):
        generate_study(0, 0, spacing=SPACING, max_series=9)
    with pytest.raises(ValueError):
        study_streams(-1, 0)
    with pytest.raises(ValueError):
        plan_study(0, 0, spacing=6.0, balance=1.5)
    with pytest.raises(ValueError):
        plan_study(0, 0, spacing=6.0, primary=["not_a_diagnosis"])


def test_primary_keys_draw_the_studys_diagnosis_and_keep_its_split_and_subject():
    plain, focal = plan_study(0, 3, spacing=6.0), plan_study(0, 3, spacing=6.0, primary=["cyst_colloid_cyst"])
    assert focal.labels["cyst_colloid_cyst"] == 1
    assert (focal.split, focal.subject, focal.vendor) == (plain.split, plain.subject, plain.vendor)


def test_stratified_primaries_share_the_labels_out_within_each_split():
    n = 700
    primaries = stratified_primaries(0, n, balance=1.0)
    assert stratified_primaries(0, n, balance=1.0) == primaries  # deterministic
    for index, key in enumerate(primaries):  # normal studies stay those of the unstratified draw
        assert (key is None) == draws_unremarkable(study_streams(0, index)["pathology"])
    for split, _ in SPLIT_FRACTIONS:
        keys = [k for i, k in enumerate(primaries) if k is not None and study_split(0, i) == split]
        counts = Counter(keys)
        expected = len(keys) / len(KEYS)
        assert all(np.floor(expected) <= counts.get(k, 0) <= np.ceil(expected) for k in KEYS), split
        if len(keys) >= len(KEYS):
            assert set(counts) == set(KEYS)
    train = [k for i, k in enumerate(primaries) if k is not None and study_split(0, i) == "train"]
    assert train[:len(KEYS)] != sorted(train[:len(KEYS)], key=KEYS.index)  # dealt in a random order
    # Clinical weights: a common label gets its expected share, rounded.
    clinical = stratified_primaries(0, n, balance=0.0)
    weights = dict(zip(DIAGNOSES, primary_weights(0.0)))
    abnormal_train = [k for i, k in enumerate(clinical) if k is not None and study_split(0, i) == "train"]
    common = max(weights, key=weights.get)
    assert abs(abnormal_train.count(common) - weights[common] * len(abnormal_train)) < 1


def test_stratified_primaries_with_a_primary_list_and_their_plans():
    focal = ["tumor_adult_meningioma", "cyst_colloid_cyst", "tumor_adult_glioma"]
    primaries = stratified_primaries(3, 30, balance=1.0, primary=focal)
    assert all(key in focal for key in primaries)  # every study abnormal, with one of the keys
    plain = plan_study(3, 0, spacing=6.0, balance=1.0, primary=focal)
    fixed = plan_study(3, 0, spacing=6.0, balance=1.0, primary=focal, primary_key=primaries[0])
    assert fixed.labels[primaries[0]] == 1
    assert (fixed.split, fixed.subject, fixed.vendor) == (plain.split, plain.subject, plain.vendor)
    for bad in (dict(n=0), dict(n=5, balance=2.0), dict(n=5, primary=["not_a_diagnosis"])):
        with pytest.raises(ValueError):
            stratified_primaries(0, **bad)


def test_splits_are_drawn_80_10_10():
    counts = Counter(_split_of(study_streams(0, i)["split"]) for i in range(3000))
    assert abs(counts["train"] / 3000 - 0.8) < 0.03
    assert abs(counts["val"] / 3000 - 0.1) < 0.02 and abs(counts["test"] / 3000 - 0.1) < 0.02


def test_split_fractions_move_the_boundaries_and_give_the_test_split_its_positives():
    fractions = (0.3, 0.2, 0.5)
    counts = Counter(study_split(0, i, fractions) for i in range(3000))
    assert abs(counts["train"] / 3000 - 0.3) < 0.03 and abs(counts["test"] / 3000 - 0.5) < 0.03
    # the same uniform draw, so a study in the default test split (its draw above 0.9) stays in test
    assert all(study_split(0, i, fractions) == "test" for i in range(300) if study_split(0, i) == "test")
    # 900 studies, half of them test and stratified: every label the primary diagnosis of >= 5 test studies
    n = 900
    primaries = stratified_primaries(0, n, balance=1.0, split_fractions=fractions)
    test = Counter(k for i, k in enumerate(primaries) if k is not None and study_split(0, i, fractions) == "test")
    assert set(test) == set(KEYS) and min(test.values()) >= 5
    assert plan_study(0, 3, spacing=6.0, split_fractions=fractions).split == study_split(0, 3, fractions)
    for bad in ((0.5, 0.5), (0.8, 0.3, -0.1), (0.7, 0.1, 0.1)):
        with pytest.raises(ValueError, match="split fractions"):
            split_table(bad)
    # a test-only set: every study in test, and stratified, 460 studies make every label the primary of >= 5
    test_only = (0.0, 0.0, 1.0)
    assert {study_split(3, i, test_only) for i in range(200)} == {"test"}
    dealt = Counter(k for k in stratified_primaries(3, 460, balance=1.0, split_fractions=test_only) if k is not None)
    assert set(dealt) == set(KEYS) and min(dealt.values()) >= 5


def test_protocol_choice_follows_the_findings():
    rng = np.random.default_rng(0)
    sellar = Counter(choose_protocol(rng, ["sellar_pituitary_adenoma"]).key for _ in range(400))
    normal = Counter(choose_protocol(rng, []).key for _ in range(400))
    assert sellar["pituitary"] > 3 * normal["pituitary"]
    assert sellar["pituitary"] < 400  # not always: some are imaged with a routine brain protocol
    stroke = Counter(choose_protocol(rng, ["vascular_ischemic_lacunar_stroke"]).key for _ in range(400))
    assert stroke["stroke"] > 3 * normal["stroke"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_series_lists_are_realistic(protocol):
    rng = np.random.default_rng(1)
    for _ in range(50):
        kinds = draw_series_kinds(rng, PROTOCOLS[protocol], wanted_sequences([("dwi", "adc"), ("swi", "t2")]))
        assert 2 <= len(kinds) <= 8 and len(set(kinds)) == len(kinds)
        if "ax_dwi" in kinds and kinds.index("ax_dwi") < len(kinds) - 1:
            assert kinds[kinds.index("ax_dwi") + 1] == "ax_adc"
        post = [SERIES_KINDS[k][0] in ("t1_post", "mprage_post") for k in kinds]
        assert post == sorted(post)  # contrast series come last


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_contrast_series_only_in_contrast_protocols(protocol):
    rng = np.random.default_rng(2)
    wanted = wanted_sequences([("t1_post", "flair"), ("mprage_post",)])
    for _ in range(30):
        kinds = draw_series_kinds(rng, PROTOCOLS[protocol], wanted)
        has_post = any(SERIES_KINDS[k][0] in ("t1_post", "mprage_post") for k in kinds)
        # Contrast protocols always acquire a post-contrast series; the others never do.
        assert has_post == PROTOCOLS[protocol].contrast


def metadata(plan) -> tuple:
    """What a study's manifest says about how it was acquired."""
    return (plan.protocol, plan.vendor, plan.study_description,
            [(s.name, s.kind, s.spec) for s in plan.series])


def test_plan_is_the_generated_study_without_images():
    plan = plan_study(1, 3, spacing=SPACING, keys=["tumor_adult_high_grade_glioma"], protocol_blind=True)
    study = generate_study(1, 3, spacing=SPACING, keys=["tumor_adult_high_grade_glioma"], protocol_blind=True)
    assert metadata(plan) == (study.protocol, study.vendor, study.study_description,
                              [(s.name, s.kind, s.spec) for s in study.series])
    assert (plan.split, plan.report, plan.labels, plan.findings, plan.subject, plan.protocol_blind) == (
        study.split, study.report, study.labels, study.findings, study.subject, study.protocol_blind)


def test_protocol_blind_metadata_does_not_depend_on_the_diagnoses():
    # Same study, different forced diagnoses: a blind study's protocol, description, vendor and
    # series (names, kinds, count, parameters) are identical; an indication-driven one follows them.
    forced = ([], ["tumor_adult_schwannoma"], ["sellar_pituitary_adenoma"], ["vascular_ischemic_lacunar_stroke"],
              ["developmental_heterotopia", "vascular_malformation_cerebral_aneurysm"])
    for index in range(6):
        blind = [plan_study(7, index, spacing=6.0, keys=keys, protocol_blind=True) for keys in forced]
        assert all(metadata(p) == metadata(blind[0]) for p in blind)
        assert len({p.split for p in blind}) == 1
    driven = {plan_study(7, i, spacing=6.0, keys=["tumor_adult_schwannoma"]).protocol for i in range(12)}
    assert "iac" in driven  # the affinity is still there when not blind


def test_split_labels_and_findings_do_not_depend_on_the_mode():
    for index in range(12):
        blind, driven = (plan_study(2, index, spacing=6.0, protocol_blind=b) for b in (True, False))
        assert blind.split == driven.split == study_split(2, index)
        assert (blind.labels, blind.findings, blind.subject) == (driven.labels, driven.findings, driven.subject)


def test_protocol_blind_settings():
    assert PROTOCOL_BLIND_SPLITS["heldout"] == {"val", "test"}
    assert [is_protocol_blind("heldout", s) for s in ("train", "val", "test")] == [False, True, True]
    assert all(is_protocol_blind("all", s) for s in ("train", "val", "test"))
    assert not any(is_protocol_blind("none", s) for s in ("train", "val", "test"))
    with pytest.raises(ValueError):
        is_protocol_blind("sometimes", "test")


def is_post(kind: str) -> bool:
    return SERIES_KINDS[kind][0] in POST_CONTRAST


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_truncation_keeps_contrast_and_adc_with_dwi_and_drops_extras_first(protocol):
    wanted = wanted_sequences([KEY_SEQUENCES["tumor_adult_high_grade_glioma"], ("ssfp", "swi", "mprage", "t2")])
    spec = PROTOCOLS[protocol]
    optional = {k for k in spec.optional if not is_post(k)}
    for seed in range(60):
        for max_series in range(2, 9):
            kept = draw_series_kinds(np.random.default_rng(seed), spec, wanted, max_series=max_series)
            assert 2 <= len(kept) <= max_series
            if spec.contrast:  # the required post-contrast slot is never dropped
                assert any(k in kept for g in spec.required for k in g if is_post(k))
            assert ("ax_adc" in kept) == ("ax_dwi" in kept) or len(kept) == 2
            if any(not set(g) & set(kept) for g in spec.required):
                assert not optional & set(kept)  # optional extras go before required series


def test_truncation_prefers_keeping_the_adc_with_its_dwi():
    brain_wo = PROTOCOLS["brain_wo"]  # required: FLAIR, T2, DWI (+ ADC)
    seed = next(s for s in range(100)
                if draw_series_kinds(np.random.default_rng(s), brain_wo, {}) == ["ax_flair", "ax_t2", "ax_dwi", "ax_adc"])
    assert draw_series_kinds(np.random.default_rng(seed), brain_wo, {}, max_series=3) == ["ax_flair", "ax_dwi", "ax_adc"]
    assert draw_series_kinds(np.random.default_rng(seed), brain_wo, {}, max_series=2) == ["ax_flair", "ax_t2"]
    with pytest.raises(ValueError):
        draw_series_kinds(np.random.default_rng(0), brain_wo, {}, max_series=1)


def test_balanced_plans_have_more_positives_of_the_rare_labels():
    # The abnormal studies of seed 0 (the first draw of the pathology stream decides, whatever the balance),
    # planned on the 6 mm phantom with clinical and with uniform primary diagnoses.
    indices = [i for i in range(300) if study_streams(0, i)["pathology"].random() >= UNREMARKABLE_FRACTION][:100]
    weight = np.array([DIAGNOSES[k].weight for k in KEYS])
    # Rare labels: at or below the median clinical weight, secondary findings (edema, mass effect, midline
    # shift, herniation, painted from the other lesions) left out.
    rare = (weight <= np.median(weight)) & np.array([DIAGNOSES[k].stage != 3 for k in KEYS])
    labels, plans = {}, {}
    for balance in (0.0, 1.0):
        plans[balance] = [plan_study(0, i, spacing=6.0, balance=balance) for i in indices]
        labels[balance] = np.array([[p.labels[k] for k in KEYS] for p in plans[balance]])
    # Measured: 50 -> 60 positives of the 25 rare labels (seeds 1-4: 50 -> 62, 50 -> 70, 55 -> 60, 54 -> 59).
    assert labels[1.0][:, rare].sum() > labels[0.0][:, rare].sum() + 5
    # The clinical weight of the average positive falls (1.72 -> 1.67; 0.05-0.13 lower in seeds 0-4).
    mean_weight = {b: (labels[b] * weight).sum() / labels[b].sum() for b in labels}
    assert mean_weight[1.0] < mean_weight[0.0] - 0.03, mean_weight
    # Only the pathology stream sees the setting: subject and split stay.
    assert [(p.subject, p.split) for p in plans[0.0]] == [(p.subject, p.split) for p in plans[1.0]]
