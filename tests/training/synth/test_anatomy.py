"""Subject phantoms from the ICBM152 template: determinism, tissue layout, properties, age effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training.synth.anatomy import BRAIN_TISSUES, base_anatomy, make_subject, smooth_random_field
from training.synth.phantom import Tissue

SPACING = 3.0  # mm; coarse phantoms keep these tests fast


def centroid_mm(phantom, mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0) @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]


@pytest.fixture(scope="module")
def subject():
    return make_subject(np.random.default_rng(7), spacing=SPACING, age=40.0)


def test_same_seed_same_phantom_different_seed_different():
    a = make_subject(np.random.default_rng(3), spacing=SPACING)
    b = make_subject(np.random.default_rng(3), spacing=SPACING)
    c = make_subject(np.random.default_rng(4), spacing=SPACING)
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.labels, b.labels)
    for name, volume in a.property_maps().items():
        np.testing.assert_array_equal(volume, b.property_maps()[name])
    assert a.subject == b.subject
    assert a.subject != c.subject


def test_every_tissue_class_is_present(subject):
    present = set(np.unique(subject.labels).tolist())
    assert set(int(t) for t in Tissue) <= present
    for name, volume in subject.property_maps().items():
        assert volume.shape == subject.shape and volume.dtype == np.float32, name
        assert np.isfinite(volume).all(), name
    assert subject.lesion_masks == {} and subject.findings == []


def test_tissue_properties_are_ordered_like_real_tissue(subject):
    def median(name, tissue):
        return float(np.median(getattr(subject, name)[subject.labels == tissue]))

    # Literature order at 1.5-3 T: T1 and T2 rise from WM to GM to CSF; ADC of CSF ~ 3x tissue.
    assert median("t1", Tissue.WM) < median("t1", Tissue.CORTICAL_GM) < median("t1", Tissue.VENTRICLE)
    assert median("t2", Tissue.WM) < median("t2", Tissue.CORTICAL_GM) < median("t2", Tissue.VENTRICLE)
    assert median("adc", Tissue.VENTRICLE) > 2.5 * median("adc", Tissue.WM)
    assert median("pd", Tissue.SKULL) < 0.5 * median("pd", Tissue.WM)
    assert median("enhancement", Tissue.WM) == 0.0
    assert median("enhancement", Tissue.PITUITARY) > 0.3  # no blood-brain barrier
    assert float(subject.pd[subject.labels == Tissue.BACKGROUND].max()) == 0.0


def test_brain_is_enclosed_by_csf_skull_and_scalp(subject):
    brain = np.isin(subject.labels, (*BRAIN_TISSUES, Tissue.VENTRICLE))
    air = subject.labels == Tissue.BACKGROUND
    # Above the foramen magnum (the cord runs on out of the grid) no brain voxel is within 3 voxels
    # (9 mm) of air: CSF, bone and scalp surround it ...
    near_air = ndimage.binary_dilation(air, iterations=3)
    z_mm = subject.affine[2, 2] * np.arange(subject.shape[2]) + subject.affine[2, 3]
    intracranial = (z_mm > subject.landmarks["foramen_magnum"][2])[None, None, :]
    assert not (brain & near_air & intracranial).any()
    # ... and above the skull base the bone lies between brain and scalp along a vertical ray.
    column = subject.labels[subject.shape[0] // 2, subject.shape[1] // 2]
    top = [Tissue(v) for v in column[::-1] if v != Tissue.BACKGROUND]
    assert top[0] == Tissue.SCALP
    first_bone = top.index(Tissue.SKULL)
    first_brain = next(i for i, t in enumerate(top) if t in BRAIN_TISSUES)
    assert first_bone < first_brain


def test_regions_sit_where_anatomy_puts_them(subject):
    lm = subject.landmarks
    ac, pc = np.asarray(lm["anterior_commissure"]), np.asarray(lm["posterior_commissure"])
    centre = (ac + pc) / 2
    ventricles = centroid_mm(subject, subject.labels == Tissue.VENTRICLE)
    cerebellum = centroid_mm(subject, subject.labels == Tissue.CEREBELLUM)
    brainstem = centroid_mm(subject, subject.labels == Tissue.BRAINSTEM)
    pituitary = centroid_mm(subject, subject.labels == Tissue.PITUITARY)
    assert np.linalg.norm(ventricles - centre) < 25.0
    # Cerebellum is behind and below the commissures, brainstem below them in the midline.
    assert cerebellum[1] < centre[1] - 30 and cerebellum[2] < centre[2] - 20
    assert brainstem[2] < centre[2] - 15 and abs(brainstem[0] - centre[0]) < 6
    # The pituitary landmark and the pituitary label agree (within about one coarse voxel).
    assert np.linalg.norm(pituitary - np.asarray(lm["sella"])) < 1.5 * SPACING
    deep = centroid_mm(subject, subject.labels == Tissue.DEEP_GM)
    assert np.linalg.norm(deep - centre) < 25.0


def test_older_subjects_have_larger_ventricles_and_more_csf():
    young = make_subject(np.random.default_rng(11), spacing=SPACING, age=25.0)
    old = make_subject(np.random.default_rng(11), spacing=SPACING, age=88.0)
    assert young.subject["atrophy_mm"] == 0.0 and old.subject["atrophy_mm"] > 0.0
    assert (old.labels == Tissue.VENTRICLE).sum() >= (young.labels == Tissue.VENTRICLE).sum()
    # Same head (same draws apart from age): more of the intracranial space is CSF-like (long T2).
    brain_space = (*BRAIN_TISSUES, Tissue.CSF, Tissue.VENTRICLE)
    t2_young = young.t2[np.isin(young.labels, brain_space)].mean()
    t2_old = old.t2[np.isin(old.labels, brain_space)].mean()
    assert t2_old > 1.05 * t2_young


def test_base_anatomy_is_cached_and_validates_spacing():
    assert base_anatomy(SPACING) is base_anatomy(SPACING)
    with pytest.raises(ValueError):
        base_anatomy(0.0)
    with pytest.raises(ValueError):
        make_subject(np.random.default_rng(0), spacing=SPACING, age=-3.0)


def test_smooth_random_field_is_smooth_and_has_the_requested_scale():
    field = smooth_random_field(np.random.default_rng(0), (40, 50, 30), control=5, std=2.0)
    assert field.shape == (40, 50, 30)
    assert 0.5 < field.std() < 4.0
    # Neighbouring voxels differ far less than the field varies overall.
    assert np.abs(np.diff(field, axis=0)).max() < 0.5 * (field.max() - field.min())
