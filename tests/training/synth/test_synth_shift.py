"""Shifted data sets: shift 0 is today's engine bit for bit, shift > 0 draws every moved factor beyond its
training range (and keeps the other draws), shifted studies simulate and write, bad shifts raise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from prima.io import load_study
from training.synth.anatomy import (
    AXIS_SCALE_RANGE,
    ELASTIC_RANGE_MM,
    PROPERTY_JITTER_RANGE,
    ROTATION_SD_DEG,
    SIZE_RANGE,
    TRANSLATION_SD_MM,
    draw_subject_params,
)
from training.synth.protocols import DWI_SNR_RANGE, SNR_RANGE, TIMING_RANGES_MS, make_series_spec, resolution_range
from training.synth.sequences import BIAS_STRENGTH_RANGE, bias_strength
from training.synth.shift import MAX_SHIFT, NORMAL_RANGE_SD, beyond, beyond_normal
from training.synth.study import generate_study, plan_study
from training.synth.writers import write_dataset, write_study

SPACING = 6.0
N_PLANS = 50
SUBJECT_KEYS = ("age", "sex", "atrophy_mm", "ventricle_growth_mm", "skull_mm", "scalp_mm")  # never shifted

# Fingerprints of the engine before the shift option existed (seed 3, 6 mm phantom): per planned study
# the sum of the subject's float draws and of its series' numeric parameters, and the voxel sums of the
# series of generated study 1. A draw changed, added or reordered at shift 0 moves them.
GOLDEN_PLANS = [(63.215662986255474, 43752.40417481311), (128.17150096777132, 34780.5684211335),
                (100.53160693718289, 25563.50773837251), (66.25895539033637, 31917.833360370154),
                (85.66467048670339, 35406.252916515565), (89.6773388484548, 23078.080237016144)]
GOLDEN_VOLUMES = [252637459.4392462, 467271663.5012443, 161178304.48948202, 258891930.2267679, 295141869.05317694]


def fingerprint(plan) -> tuple[float, float]:
    subject = plan.subject
    draws = [v for v in subject.values() if isinstance(v, float)] + [x for v in subject.values()
                                                                     if isinstance(v, tuple) for x in v]
    params = 0.0
    for series in plan.series:
        spec = dataclasses.asdict(series.spec)
        params += sum(float(v) for v in spec.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        params += sum(series.spec.matrix) + sum(series.spec.fov_mm)
    return sum(draws), params


def test_shift_zero_is_the_engine_before_the_option():
    plans = [fingerprint(plan_study(3, i, spacing=SPACING, shift=0.0)) for i in range(6)]
    np.testing.assert_allclose(plans, GOLDEN_PLANS, rtol=1e-12)
    default, zero = generate_study(3, 1, spacing=SPACING), generate_study(3, 1, spacing=SPACING, shift=0.0)
    np.testing.assert_allclose([s.volume.astype(np.float64).sum() for s in zero.series], GOLDEN_VOLUMES, rtol=1e-6)
    assert [s.spec for s in zero.series] == [s.spec for s in default.series]
    for a, b in zip(default.series, zero.series):
        np.testing.assert_array_equal(a.volume, b.volume)
        np.testing.assert_array_equal(a.affine, b.affine)


def test_band_rules():
    draws = np.array([0.93, 0.99, 1.0, 1.07])
    assert beyond(draws, 0.93, 1.07, 0.0, "both") is draws  # the training draw itself
    np.testing.assert_allclose(beyond(draws, 0.93, 1.07, 1.0, "both"), [0.86, 0.92, 1.07, 1.14])
    assert beyond(1.0, 1.0, 3.0, 0.5) == 3.0 and beyond(3.0, 1.0, 3.0, 0.5) == 4.0
    # An SNR's band is one of noise level: the cleanest training SNR lands on the noisiest, the noisiest beyond.
    assert beyond(45.0, 20.0, 45.0, 1.0, scale="inverse") == pytest.approx(20.0)
    assert 1.0 / beyond(20.0, 20.0, 45.0, 1.0, scale="inverse") == pytest.approx(2 / 20 - 1 / 45)
    assert beyond(8.0, 8.0, 15.0, 1.0, "both", "log") == pytest.approx(8.0 * math.sqrt(8.0 / 15.0))
    # A normal draw's magnitude moves from [0, 3 SD] to [3 SD, (1 + shift) 3 SD], its sign kept.
    assert beyond_normal(-1e-9, 5.0, 1.0) == pytest.approx(-15.0)
    assert beyond_normal(np.array([50.0, -5.0]), 5.0, 1.0) == pytest.approx([30.0, -15.0 * (1 + math.erf(2 ** -0.5))])


@pytest.mark.parametrize("call", [
    lambda: beyond(1.0, 0.0, 2.0, -0.1), lambda: beyond(1.0, 0.0, 2.0, MAX_SHIFT + 0.1),
    lambda: beyond(1.0, 0.0, 2.0, float("nan")), lambda: beyond(1.0, 0.0, 2.0, 1.0, "low"),
    lambda: beyond(1.0, 0.0, 2.0, 1.0, scale="cubic"), lambda: beyond(1.0, 2.0, 2.0, 1.0),
    lambda: beyond_normal(1.0, 0.0, 1.0), lambda: plan_study(0, 0, spacing=SPACING, shift=-0.5),
    lambda: draw_subject_params(np.random.default_rng(0), shift=-1.0),
    lambda: make_series_spec(np.random.default_rng(0), "ax_t2", "ge", shift=1.5),
])
def test_bad_shift_raises(call):
    with pytest.raises(ValueError):
        call()


def test_write_dataset_rejects_a_negative_shift_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_dataset(2, tmp_path / "ds", shift=-1.0, workers=1, progress=False)
    assert not (tmp_path / "ds").exists()


@pytest.fixture(scope="module")
def plans() -> dict[float, list]:
    # Protocol-blind, so both shifts acquire the same series and they can be compared one to one.
    return {shift: [plan_study(9, i, spacing=SPACING, protocol_blind=True, shift=shift) for i in range(N_PLANS)]
            for shift in (0.0, 1.0)}


def inside(values, low: float, high: float) -> bool:
    return bool(np.all((np.asarray(values) >= low - 1e-9) & (np.asarray(values) <= high + 1e-9)))


def test_subject_pose_deformation_and_jitter_leave_the_training_ranges(plans):
    for key, (low, high) in (("elastic_mm", ELASTIC_RANGE_MM), ("property_jitter", PROPERTY_JITTER_RANGE)):
        assert inside([p.subject[key] for p in plans[0.0]], low, high)
        assert inside([p.subject[key] for p in plans[1.0]], high, 2 * high - low)
    for key, sd in (("rotation_deg", ROTATION_SD_DEG), ("translation_mm", TRANSLATION_SD_MM)):
        limit = NORMAL_RANGE_SD * np.array(sd)
        training = np.abs([p.subject[key] for p in plans[0.0]])
        assert (training <= limit).mean() > 0.98  # a normal draw: 99.7% of them within 3 SD
        shifted = np.abs([p.subject[key] for p in plans[1.0]])
        assert np.all((shifted >= limit) & (shifted <= 2 * limit)), key
    for a, b in zip(*plans.values()):
        assert {k: a.subject[k] for k in SUBJECT_KEYS} == {k: b.subject[k] for k in SUBJECT_KEYS}
        assert a.split == b.split and a.study_description == b.study_description


def test_head_size_leaves_its_range_and_keeps_its_proportions():
    # With the age given, the head size factor is the generator's first draw.
    low, high = SIZE_RANGE
    for seed in range(N_PLANS):
        size = np.random.default_rng(seed).uniform(low, high)
        training, shifted = (draw_subject_params(np.random.default_rng(seed), age=40.0, shift=s) for s in (0.0, 1.0))
        ratio = np.array(shifted.scale) / np.array(training.scale)
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)  # the per-axis factors are the training draws
        assert inside(np.array(training.scale) / size, *AXIS_SCALE_RANGE)
        moved, half_band = size * ratio[0], (high - low) / 2
        assert inside(moved, low - half_band, low) or inside(moved, high, high + half_band), moved


def test_series_contrast_noise_and_resolution_leave_the_training_ranges(plans):
    pairs = [(a, b) for p0, p1 in zip(*plans.values()) for a, b in zip(p0.series, p1.series)]
    assert len(pairs) > 150 and all((a.name, a.kind) == (b.name, b.kind) for a, b in pairs)
    for a, b in pairs:
        training, shifted = a.spec, b.spec
        sequence = training.sequence
        # Untouched: plane, field of view, gap, slab, flip angle, inversion time (FLAIR's follows its TR).
        moved = {"matrix", "slice_thickness_mm", "snr", "tr_ms", "te_ms", *(["ti_ms"] if sequence == "flair" else [])}
        kept = [f.name for f in dataclasses.fields(training) if f.name not in moved]
        assert [getattr(shifted, k) for k in kept] == [getattr(training, k) for k in kept]
        low, high = DWI_SNR_RANGE if sequence in ("dwi", "adc") else SNR_RANGE
        assert inside(training.snr, low, high)
        assert inside(1.0 / shifted.snr, 1.0 / low, 2.0 / low - 1.0 / high)
        span = resolution_range(sequence)
        assert inside(training.slice_thickness_mm, *span.thickness_mm)
        thin, thick = span.thickness_mm
        assert inside(shifted.slice_thickness_mm, thick, 2 * thick - thin)
        assert inside(max(training.pixel_spacing), *span.pixel_mm)
        # The matrix is rounded down, so a pixel can be a little coarser than its band.
        assert inside(max(shifted.pixel_spacing), span.pixel_mm[1], 1.02 * (2 * span.pixel_mm[1] - span.pixel_mm[0]))
        for parameter, (low, high) in TIMING_RANGES_MS.get(sequence, {}).items():
            value, factor = getattr(shifted, parameter), math.sqrt(high / low)
            assert inside(getattr(training, parameter), low, high)
            assert inside(value, low / factor, low) or inside(value, high, high * factor), (parameter, value)


def test_bias_strength_leaves_its_range():
    low, high = BIAS_STRENGTH_RANGE
    assert inside([bias_strength(np.random.default_rng(i)) for i in range(N_PLANS)], low, high)
    assert inside([bias_strength(np.random.default_rng(i), 1.0) for i in range(N_PLANS)], high, 2 * high - low)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_most_shifted_study_simulates_writes_and_loads(tmp_path, fmt):
    study = generate_study(1, 0, spacing=SPACING, shift=MAX_SHIFT)
    entry = write_study(study, tmp_path, fmt, uid_seed="test")
    loaded = load_study(tmp_path / "studies" / study.study_id)
    assert loaded.skipped == [] and len(loaded.series) == len(entry.series) == len(study.series)
    for series in study.series:
        assert series.volume.shape[:2] == series.spec.matrix and np.isfinite(series.volume).all()
        assert series.volume.max() > 0
        assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(series.spec.slice_spacing)
