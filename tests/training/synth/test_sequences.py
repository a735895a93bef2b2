"""Sequence simulation: tissue contrast per sequence, series geometry, noise and lesion-mask resampling."""

from __future__ import annotations

import numpy as np
import pytest

from training.synth.anatomy import make_subject
from training.synth.phantom import Tissue
from training.synth.protocols import SERIES_KINDS, VENDORS, make_series_spec
from training.synth.sequences import PLANE_AXES, SeriesSpec, signal_map, simulate_series

SPACING = 3.0  # mm phantom grid; contrast and geometry do not depend on it


@pytest.fixture(scope="module")
def phantom():
    return make_subject(np.random.default_rng(5), spacing=SPACING, age=50.0)


def spec(sequence: str, plane: str = "axial", **kw) -> SeriesSpec:
    timing = {
        "t1": dict(tr_ms=550, te_ms=12), "t1_post": dict(tr_ms=550, te_ms=12), "t2": dict(tr_ms=4000, te_ms=100),
        "flair": dict(tr_ms=9000, te_ms=120, ti_ms=2400), "dwi": dict(tr_ms=5000, te_ms=80),
        "adc": dict(tr_ms=5000, te_ms=80), "swi": dict(tr_ms=30, te_ms=25, flip_deg=15),
        "t2star": dict(tr_ms=600, te_ms=20, flip_deg=20), "mprage": dict(tr_ms=2300, te_ms=3, ti_ms=1000, flip_deg=9),
        "mprage_post": dict(tr_ms=2300, te_ms=3, ti_ms=1000, flip_deg=9), "ssfp": dict(tr_ms=6, te_ms=3, flip_deg=60),
    }[sequence]
    geometry = dict(matrix=(96, 96), fov_mm=(230.0, 230.0), slice_thickness_mm=5.0, slice_gap_mm=1.0)
    geometry.update(kw)
    return SeriesSpec(name=f"test {sequence}", sequence=sequence, plane=plane, **geometry, **timing)


def tissue_signal(phantom, s: SeriesSpec) -> dict[Tissue, float]:
    signal = signal_map(phantom, s)
    return {t: float(np.median(signal[phantom.labels == t])) for t in Tissue}


@pytest.mark.parametrize(
    "sequence, brighter, darker",
    [
        ("t1", Tissue.WM, Tissue.CORTICAL_GM),
        ("t1", Tissue.CORTICAL_GM, Tissue.VENTRICLE),
        ("mprage", Tissue.WM, Tissue.CORTICAL_GM),
        ("mprage", Tissue.CORTICAL_GM, Tissue.VENTRICLE),
        ("t2", Tissue.VENTRICLE, Tissue.CORTICAL_GM),
        ("t2", Tissue.CORTICAL_GM, Tissue.WM),
        ("flair", Tissue.CORTICAL_GM, Tissue.VENTRICLE),  # CSF nulled
        ("flair", Tissue.WM, Tissue.VENTRICLE),
        ("dwi", Tissue.WM, Tissue.VENTRICLE),
        ("ssfp", Tissue.VENTRICLE, Tissue.WM),
        ("t1_post", Tissue.PITUITARY, Tissue.CORTICAL_GM),  # enhances
        ("swi", Tissue.WM, Tissue.VESSEL),  # venous flow void / susceptibility
    ],
)
def test_sequence_contrast_follows_the_physics(phantom, sequence, brighter, darker):
    values = tissue_signal(phantom, spec(sequence))
    assert values[brighter] > 1.1 * values[darker], (sequence, values[brighter], values[darker])


def test_contrast_agent_brightens_only_enhancing_tissue(phantom):
    pre, post = tissue_signal(phantom, spec("t1")), tissue_signal(phantom, spec("t1_post"))
    assert post[Tissue.PITUITARY] > 1.3 * pre[Tissue.PITUITARY]
    assert post[Tissue.VESSEL] > 1.3 * pre[Tissue.VESSEL]
    assert post[Tissue.WM] == pytest.approx(pre[Tissue.WM], rel=1e-6)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_series_grid_has_the_requested_plane_matrix_and_spacing(phantom, plane):
    s = spec("t2", plane, matrix=(80, 64), fov_mm=(240.0, 192.0), slice_thickness_mm=4.0, slice_gap_mm=0.5)
    volume, affine, masks = simulate_series(phantom, s, np.random.default_rng(0))
    assert volume.shape[:2] == (80, 64) and volume.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [3.0, 3.0, 4.5], rtol=1e-6)
    normal = affine[:3, 2] / 4.5
    # Slices follow the head (a few degrees oblique) but stay in the requested plane.
    assert abs(normal @ PLANE_AXES[plane][:, 2]) > np.cos(np.deg2rad(20))
    # The stack covers the brain: its extent along the normal is at least 100 mm.
    assert volume.shape[2] * 4.5 >= 100
    assert masks == {}


def test_series_shows_the_head_with_rician_background(phantom):
    volume, _, _ = simulate_series(phantom, spec("t2", snr=20.0), np.random.default_rng(1))
    mid = volume[:, :, volume.shape[2] // 2]
    corner = volume[:8, :8, :].ravel()
    centre = mid[40:56, 40:56].ravel()
    assert corner.min() >= 0.0  # magnitude images are non-negative
    assert corner.mean() > 0.0  # Rician noise floor
    assert centre.mean() > 5 * corner.mean()


def test_adc_is_in_physical_units_and_shares_the_dwi_grid(phantom):
    rng = np.random.default_rng(2)
    dwi, affine, _ = simulate_series(phantom, spec("dwi"), rng)
    adc, adc_affine, _ = simulate_series(phantom, spec("adc"), rng, geometry=(affine, dwi.shape))
    assert adc.shape == dwi.shape
    np.testing.assert_array_equal(adc_affine, affine)
    centre = adc[40:56, 40:56, adc.shape[2] // 2]
    assert 400 < np.median(centre) < 1500  # brain tissue ~0.7-1.0e-3 mm^2/s
    assert adc.max() <= 4000


def test_same_rng_gives_the_same_series(phantom):
    a = simulate_series(phantom, spec("flair"), np.random.default_rng(9))
    b = simulate_series(phantom, spec("flair"), np.random.default_rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_lesion_mask_follows_onto_the_series_grid(phantom):
    # A 20 mm sphere in the left hemisphere, written as pathology would fill lesion_masks.
    centre_mm = np.asarray(phantom.landmarks["anterior_commissure"]) + np.array([-35.0, 0.0, 15.0])
    ijk = np.indices(phantom.shape).reshape(3, -1).T
    world = ijk @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    sphere = (np.linalg.norm(world - centre_mm, axis=1) <= 10.0).reshape(phantom.shape)
    phantom.lesion_masks["tumor_adult_glioma"] = sphere
    try:
        s = spec("t2", "coronal", matrix=(128, 128), slice_thickness_mm=3.0, slice_gap_mm=0.0)
        volume, affine, masks = simulate_series(phantom, s, np.random.default_rng(3))
    finally:
        del phantom.lesion_masks["tumor_adult_glioma"]
    mask = masks["tumor_adult_glioma"]
    assert mask.shape == volume.shape and mask.dtype == bool and mask.any()
    mask_centre = np.argwhere(mask).mean(0) @ affine[:3, :3].T + affine[:3, 3]
    assert np.linalg.norm(mask_centre - centre_mm) < 3.0
    voxel_mm3 = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    volume_mm3 = mask.sum() * voxel_mm3
    assert 0.6 * 4188 < volume_mm3 < 1.6 * 4188  # sphere of radius 10 mm


def test_bad_series_specs_raise_value_error():
    with pytest.raises(ValueError):
        spec("t2", "oblique")
    with pytest.raises(ValueError):
        SeriesSpec(name="x", sequence="pd", plane="axial", matrix=(64, 64), fov_mm=(200, 200), slice_thickness_mm=5)
    with pytest.raises(ValueError):
        spec("t2", slice_thickness_mm=0.0)
    with pytest.raises(ValueError):
        make_series_spec(np.random.default_rng(0), "ax_t5", "ge")


@pytest.mark.parametrize("kind", sorted(SERIES_KINDS))
def test_every_series_kind_draws_a_valid_spec_for_every_vendor(kind):
    rng = np.random.default_rng(0)
    for vendor in VENDORS:
        modest = make_series_spec(np.random.default_rng(1), kind, vendor)
        full = make_series_spec(np.random.default_rng(1), kind, vendor, full_resolution=True)
        assert modest.name == full.name and modest.sequence == full.sequence == SERIES_KINDS[kind][0]
        assert max(modest.matrix) <= 256 and max(full.matrix) <= 512
        assert 0.4 <= min(modest.pixel_spacing) and max(modest.pixel_spacing) <= 2.0
        make_series_spec(rng, kind, vendor)


def test_targeted_series_is_a_slab_around_its_landmark(phantom):
    s = spec("t1_post", "coronal", matrix=(128, 128), fov_mm=(180.0, 180.0), slice_thickness_mm=3.0,
             slice_gap_mm=0.0, target="sella", coverage_mm=42.0)
    volume, affine, _ = simulate_series(phantom, s, np.random.default_rng(4))
    assert volume.shape[2] == 14  # 42 mm of 3 mm slices
    centre = affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2.0) + affine[:3, 3]
    assert np.linalg.norm(centre - np.asarray(phantom.landmarks["sella"])) < 8.0
