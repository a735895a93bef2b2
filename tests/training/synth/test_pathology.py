"""Pathology engine: every diagnosis lands where it should and changes its key property; sampling
frequencies and co-occurrence rules hold."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from prima.labels import default_label_space
from training.synth.anatomy import make_subject
from training.synth.lesions.base import BRAIN, INTRACRANIAL, Ctx
from training.synth.pathology import (ASSOCIATED, DIAGNOSES, IMPLIES, KEY_SEQUENCES, UNREMARKABLE_FRACTION,
                                      apply_findings, primary_weights, sample_diagnoses)
from training.synth.phantom import Tissue

KEYS = default_label_space().diagnosis_keys
SEQUENCES = {"t1", "t2", "flair", "dwi", "adc", "swi", "t2star", "t1_post", "mprage", "ssfp"}
MIN_PROPERTY_CHANGE = 0.05  # mean |log ratio| (relaxation, pd, adc) or mean |difference| (enhancement) in the mask


@pytest.fixture(scope="module")
def subject():
    """One 2 mm adult subject (the smallest grid that still resolves a syrinx or a lacune)."""
    return make_subject(np.random.default_rng(11), spacing=2.0, age=45.0)


@pytest.fixture(scope="module")
def placed(subject):
    """Each diagnosis forced alone into a copy of the subject: key -> (phantom after, seed)."""
    out = {}
    for i, key in enumerate(KEYS):
        phantom = copy.deepcopy(subject)
        apply_findings(phantom, [key], np.random.default_rng(1000 + i))
        out[key] = phantom
    return out


def test_registry_covers_every_label_with_known_sequences():
    assert set(DIAGNOSES) == set(KEYS)
    for key, sequences in KEY_SEQUENCES.items():
        assert sequences and set(sequences) <= SEQUENCES, key


def _head(ctx: Ctx, mask: np.ndarray) -> np.ndarray:
    idx = np.stack(np.nonzero(mask)).astype(float)
    world = ctx.phantom.affine[:3, :3] @ idx + ctx.phantom.affine[:3, 3:4]
    return ctx.to_head(world)


def _mm_to(mask_of: np.ndarray, spacing: float) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask_of) * spacing


def check_compartment(compartment: str, key: str, mask: np.ndarray, before) -> None:
    ctx = Ctx(before, np.random.default_rng(0))
    labels = before.labels[mask]
    head = _head(ctx, mask)
    centroid = head.mean(axis=1)
    spacing = ctx.spacing
    landmark = {k: ctx.to_head(v) for k, v in before.landmarks.items()}
    intracranial = np.isin(labels, INTRACRANIAL).mean()
    if compartment in ("hemispheric", "deep", "brain", "diffuse", "midline"):
        assert intracranial > 0.8, f"{key}: only {intracranial:.0%} of the mask is intracranial"
        assert np.isin(labels, (*BRAIN, Tissue.VENTRICLE)).mean() > 0.4, key
        if compartment != "brain":
            assert centroid[2] > -45, f"{key}: centroid {centroid} too low for a cerebral lesion"
    if compartment == "deep":
        assert abs(centroid[0]) < 45, key
    if compartment == "midline":
        assert abs(centroid[0]) < 20, f"{key}: centroid {centroid} off the midline"
    if compartment == "extra_axial":
        assert intracranial > 0.7, key
        extra = np.isin(labels, (Tissue.CSF,)).mean()
        touches_dura = _mm_to(before.labels == Tissue.SKULL, spacing)[mask].min() <= 4.0
        touches_falx = np.abs(head[0]).min() <= 3.0
        assert extra > 0.5 or touches_dura or touches_falx, f"{key}: {extra:.0%} in CSF spaces and not dural-based"
    if compartment == "sellar":
        assert np.linalg.norm(centroid - landmark["sella"]) < 25, f"{key}: {centroid} vs sella {landmark['sella']}"
    if compartment == "ventricular":
        near = _mm_to(before.labels == Tissue.VENTRICLE, spacing)[mask]
        if key == "surgical_catheter":  # a transcranial tube: from the scalp into the ventricle
            assert near.min() <= spacing and np.isin(labels, (Tissue.SKULL, Tissue.SCALP)).any(), key
        else:
            assert (near <= 6.0).mean() > 0.5, f"{key}: only {(near <= 6).mean():.0%} near the ventricles"
    if compartment == "posterior_fossa":
        v4 = landmark["fourth_ventricle"]
        assert centroid[2] < v4[2] + 15 and centroid[1] < v4[1] + 22, f"{key}: {centroid} not infratentorial ({v4})"
    if compartment == "spine":
        assert centroid[2] < landmark["foramen_magnum"][2], f"{key}: {centroid} above the foramen magnum"
    if compartment == "skull":
        outside = np.isin(labels, (Tissue.SKULL, Tissue.SCALP, Tissue.BACKGROUND)).mean()
        assert outside > 0.5, f"{key}: {outside:.0%} of the mask in the skull/scalp"
    if compartment == "pineal":
        assert min(np.linalg.norm(centroid - landmark[p]) for p in ("pineal", "sella")) < 25, key
    if compartment == "cpa":
        assert min(np.linalg.norm(centroid - landmark[p]) for p in ("iac_left", "iac_right")) < 25, key
    if compartment == "vascular":
        assert np.linalg.norm(centroid - landmark["sella"]) < 55 and -50 < centroid[2] < 10, key


def property_change(before, after, name: str, mask: np.ndarray) -> float:
    a, b = getattr(before, name)[mask], getattr(after, name)[mask]
    if name == "enhancement":
        return float(np.abs(b - a).mean())
    return float(np.abs(np.log(np.maximum(b, 1e-3) / np.maximum(a, 1e-3))).mean())


@pytest.mark.parametrize("key", KEYS)
def test_forced_diagnosis_has_mask_finding_location_and_signature(key, subject, placed):
    after = placed[key]
    mask = after.lesion_masks.get(key)
    assert mask is not None and mask.any(), f"{key}: empty mask"
    assert mask.shape == subject.shape
    assert any(f.key == key for f in after.findings)
    diagnosis = DIAGNOSES[key]
    check_compartment(diagnosis.compartment, key, mask, subject)
    change = property_change(subject, after, diagnosis.key_property, mask)
    assert change > MIN_PROPERTY_CHANGE, f"{key}: {diagnosis.key_property} changed by only {change:.3f}"
    # Every finding the painters recorded has its own non-empty mask.
    for f in after.findings:
        assert after.lesion_masks[f.key].any(), f.key


def test_enhancing_lesions_enhance_and_blooming_lesions_bloom(subject, placed):
    for key in ("tumor_adult_meningioma", "tumor_adult_high_grade_glioma", "tumor_adult_lymphoma"):
        m = placed[key].lesion_masks[key]
        assert placed[key].enhancement[m].max() > 0.3, key
    for key in ("vascular_malformation_cavernoma", "trauma_diffuse_axonal_injury"):
        m = placed[key].lesion_masks[key]
        assert np.median(placed[key].t2star[m]) < 0.5 * np.median(subject.t2star[m]), key
    stroke = "vascular_ischemic_large_vessel_stroke"
    m = placed[stroke].lesion_masks[stroke]
    assert placed[stroke].adc[m].mean() != pytest.approx(subject.adc[m].mean(), rel=0.05)


def test_herniation_brings_mass_effect_shift_and_a_cause(placed):
    after = placed["structural_brain_herniation"]
    keys = {f.key for f in after.findings}
    assert {"structural_mass_effect", "structural_midline_shift", "structural_brain_herniation"} <= keys
    assert len(keys) >= 4  # the mass that causes it (edema when nothing else was asked for)
    shift = next(f for f in after.findings if f.key == "structural_midline_shift")
    assert shift.attributes["shift_mm"] >= 3


def test_resection_cavity_comes_with_a_craniotomy(placed):
    assert {f.key for f in placed["surgical_resection_cavity"].findings} >= {"surgical_craniotomy"}


def test_apply_findings_is_deterministic_and_rejects_unknown_keys(subject):
    a, b = copy.deepcopy(subject), copy.deepcopy(subject)
    keys = ["tumor_adult_meningioma", "vascular_ischemic_small_vessel_disease"]
    apply_findings(a, keys, np.random.default_rng(5))
    apply_findings(b, keys, np.random.default_rng(5))
    np.testing.assert_array_equal(a.t2, b.t2)
    assert [f.key for f in a.findings] == [f.key for f in b.findings]
    with pytest.raises(ValueError):
        apply_findings(copy.deepcopy(subject), ["not_a_diagnosis"], np.random.default_rng(0))


def test_sample_diagnoses_frequencies_and_cooccurrence():
    rng = np.random.default_rng(0)
    draws = [sample_diagnoses(rng) for _ in range(6000)]
    normal = sum(not d for d in draws) / len(draws)
    assert abs(normal - UNREMARKABLE_FRACTION) < 0.03, normal  # binomial sd ~0.006
    abnormal = [d for d in draws if d]
    counts = Counter(k for d in abnormal for k in d)
    rare = {k: counts[k] / len(abnormal) for k in KEYS}
    assert min(rare.values()) >= 0.01, sorted(rare.items(), key=lambda kv: kv[1])[:3]
    for d in abnormal:
        assert d == sorted(set(d), key=KEYS.index)
        for key in d:
            assert set(IMPLIES.get(key, ())) <= set(d), (key, d)
        secondary = {"structural_mass_effect", "structural_midline_shift", "structural_brain_herniation"}
        if set(d) <= secondary | {"structural_edema"}:
            pytest.fail(f"secondary findings without a cause: {d}")
    # Associations show up at roughly their stated rates (checked for the strongest one).
    with_catheter = [d for d in abnormal if d[0:] and "surgical_catheter" in d]
    rate = np.mean(["ventricular_ventriculomegaly" in d for d in with_catheter])
    assert rate > ASSOCIATED["surgical_catheter"][0][1] - 0.15, rate


def test_primary_weights_go_from_clinical_to_uniform():
    clinical = np.array([d.weight for d in DIAGNOSES.values()])
    assert np.array_equal(primary_weights(0.0), clinical / clinical.sum())  # bit for bit: balance 0 = today
    np.testing.assert_allclose(primary_weights(1.0), np.full(len(DIAGNOSES), 1 / len(DIAGNOSES)))
    spread = [np.ptp(primary_weights(b)) for b in (0.0, 0.5, 1.0)]
    assert spread[0] > spread[1] > spread[2]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            primary_weights(bad)
        with pytest.raises(ValueError):
            sample_diagnoses(np.random.default_rng(0), bad)


def test_balanced_sampling_raises_the_rarest_labels():
    rarest = [k for k, d in DIAGNOSES.items() if d.weight == min(x.weight for x in DIAGNOSES.values())]
    positives = {}
    for balance in (0.0, 1.0):
        rng = np.random.default_rng(1)
        draws = [sample_diagnoses(rng, balance) for _ in range(20000)]
        positives[balance] = Counter(k for d in draws for k in d)
        # Balancing picks which label a study is about, not whether it is abnormal.
        assert abs(sum(not d for d in draws) / len(draws) - UNREMARKABLE_FRACTION) < 0.03
    # The four labels of the lowest clinical weight: ~920 positives at balance 0 and ~1180 at 1 (x1.25-1.4 over
    # seeds, sd of the ratio ~0.05; associations dilute the x1.35 of the primary draw); the five most common
    # labels drop to ~0.68 of theirs.
    assert sum(positives[1.0][k] for k in rarest) > 1.12 * sum(positives[0.0][k] for k in rarest)
    common = [k for k, d in DIAGNOSES.items() if d.weight == 3.0]
    assert sum(positives[1.0][k] for k in common) < 0.8 * sum(positives[0.0][k] for k in common)


def test_a_primary_list_makes_every_study_abnormal_with_one_of_its_keys_first():
    focal = ["tumor_adult_meningioma", "vascular_malformation_cavernoma"]
    rng = np.random.default_rng(2)
    draws = [sample_diagnoses(rng, 1.0, focal) for _ in range(400)]
    assert all(d and set(d) & set(focal) for d in draws)
    counts = Counter(k for d in draws for k in d if k in focal)
    assert min(counts.values()) > 150  # uniform over the two keys at balance 1
    for bad in ([], ["not_a_diagnosis"]):
        with pytest.raises(ValueError):
            sample_diagnoses(np.random.default_rng(0), 0.0, bad)


def test_a_primary_key_replaces_only_the_primary_draw():
    for seed in range(200):
        drawn = sample_diagnoses(np.random.default_rng(seed), 1.0)
        given = sample_diagnoses(np.random.default_rng(seed), 1.0, primary_key="cyst_colloid_cyst")
        assert bool(drawn) == bool(given)  # whether a study is normal is still its own draw
        assert not given or "cyst_colloid_cyst" in given
    with pytest.raises(ValueError):
        sample_diagnoses(np.random.default_rng(0), 0.0, primary_key="not_a_diagnosis")
    with pytest.raises(ValueError):  # outside the primary list
        sample_diagnoses(np.random.default_rng(0), 0.0, ["tumor_adult_meningioma"], "cyst_colloid_cyst")
