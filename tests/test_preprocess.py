"""Preprocessing: plane detection, reorientation, resampling geometry, intensity normalisation."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from helpers import fuzz
from prima.io import Series, load_study
from prima.preprocess import (
    PreprocessConfig,
    detect_plane,
    find_head_centre,
    grid_anchor,
    head_grid,
    linear_resize_axis,
    normalize_intensity,
    preprocess_series,
    reorient_to_lps,
    resample_onto,
    resample_series,
)


def _lps_affine(spacing, origin=(10.0, -20.0, 30.0)):
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("spacing,shape,expected", [
    ((1.0, 1.0, 5.0), (256, 256, 30), ("axial", 2)),
    ((4.0, 0.9, 0.9), (40, 256, 256), ("sagittal", 0)),
    ((0.5, 6.0, 0.5), (400, 20, 400), ("coronal", 1)),
    ((1.0, 1.0, 1.05), (176, 256, 256), ("sagittal", 0)),  # tie within 10%: fewest voxels wins
    ((1.0, 1.0, 1.0), (50, 50, 50), ("axial", 2)),  # complete tie: axial
])
def test_detect_plane(spacing, shape, expected):
    assert detect_plane(_lps_affine(spacing), shape) == expected


def test_reorient_to_lps_keeps_world_positions():
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, 2.0, -5], [-1.5, 0, 0, 8], [0, -3.0, 0, 2], [0, 0, 0, 1]])  # a "PIR"-like layout
    out, out_affine = reorient_to_lps(array, affine)
    assert nib.aff2axcodes(out_affine) == ("L", "P", "S")
    for index in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        world = affine @ [*index, 1]
        new_index = np.round(np.linalg.inv(out_affine) @ world).astype(int)[:3]
        assert out[tuple(new_index)] == array[index]


def test_resample_geometry_and_values():
    shape, spacing = (100, 120, 40), (2.0, 1.5, 1.0)
    affine = _lps_affine(spacing)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    ramp = (world[..., 0] * 0.3 + world[..., 1] * 0.2).astype(np.float32)  # linear in-plane, constant along S
    out, out_affine = resample_series(ramp, affine, through_axis=2, in_plane_size=256, min_slice_spacing_mm=4.0)
    assert out.shape == (256, 256, 10)
    new_spacing = np.linalg.norm(out_affine[:3, :3], axis=0)
    np.testing.assert_allclose(new_spacing, [200 / 256, 180 / 256, 4.0], rtol=1e-9)
    # The field of view (outer voxel edges) is unchanged.
    corner = lambda a, n: a @ [-0.5, -0.5, -0.5, 1]  # noqa: E731
    far = lambda a, n: a @ [n[0] - 0.5, n[1] - 0.5, n[2] - 0.5, 1]  # noqa: E731
    np.testing.assert_allclose(corner(out_affine, out.shape), corner(affine, shape), atol=1e-9)
    np.testing.assert_allclose(far(out_affine, out.shape), far(affine, shape), atol=1e-9)
    # Values agree with the ramp evaluated at the new voxel centres (interior; edges are clamped).
    new_index = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
    new_world = new_index @ out_affine[:3, :3].T + out_affine[:3, 3]
    expected = new_world[..., 0] * 0.3 + new_world[..., 1] * 0.2
    interior = (slice(4, -4), slice(4, -4), slice(None))
    np.testing.assert_allclose(out[interior], expected[interior], atol=1e-3)


fuzz.keep_hypothesis_out_of_the_repo()


@settings(derandomize=True, database=None, deadline=None, max_examples=150)
@given(shape=st.tuples(*[st.integers(1, 24)] * 3), axis=st.integers(0, 2), new_size=st.integers(1, 70),
       scale=st.sampled_from([1e-3, 1.0, 4095.0]), seed=st.integers(0, 2**16))
def test_linear_resize_is_scipy_zoom_bit_for_bit(shape, axis, new_size, scale, seed):
    array = (np.random.default_rng(seed).random(shape) * scale).astype(np.float32)
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = new_size / shape[axis]
    expected = ndimage.zoom(array, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    resized = linear_resize_axis(array, axis, new_size)
    assert resized.dtype == np.float32 and resized.flags.c_contiguous
    np.testing.assert_array_equal(resized, expected)


def test_coarse_slices_are_kept():
    out, out_affine = resample_series(np.zeros((64, 64, 12), np.float32), _lps_affine((1, 1, 6.5)), 2,
                                      in_plane_size=32, min_slice_spacing_mm=4.0)
    assert out.shape == (32, 32, 12)
    assert np.linalg.norm(out_affine[:3, 2]) == pytest.approx(6.5)


def test_resample_rejects_bad_arguments():
    with pytest.raises(ValueError):
        resample_series(np.zeros((4, 4)), np.eye(4), 2)
    with pytest.raises(ValueError):
        resample_series(np.zeros((4, 4, 4)), np.eye(4), 3)
    with pytest.raises(ValueError):
        resample_series(np.zeros((4, 4, 4)), np.eye(4), 2, min_slice_spacing_mm=0)


def test_normalize_intensity_is_robust_to_outliers_and_nan():
    rng = np.random.default_rng(0)
    array = np.zeros((40, 40, 40), np.float32)
    array[10:30, 10:30, 10:30] = rng.normal(500, 50, size=(20, 20, 20))
    clean = normalize_intensity(array)
    spiked = array.copy()
    spiked[15, 15, 15] = 1e9  # one hot pixel must not squash the contrast
    spiked[0, 0, 0] = np.nan
    spiked[0, 0, 1] = -np.inf
    out = normalize_intensity(spiked)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
    assert out[15, 15, 15] == 1.0 and out[0, 0, 0] == 0.0 and out[0, 0, 1] == 0.0
    mask = np.ones(array.shape, bool)
    mask[15, 15, 15] = mask[0, 0, 0] = mask[0, 0, 1] = False
    assert np.abs(out[mask] - clean[mask]).max() < 0.01
    brain = out[10:30, 10:30, 10:30]
    assert 0.4 < np.median(brain) < 0.6  # median of the foreground sits mid-range
    np.testing.assert_array_equal(normalize_intensity(np.full((3, 3, 3), 7.0)), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError):
        normalize_intensity(array, lower_percentile=99, upper_percentile=1)


def test_config_validation():
    with pytest.raises(ValueError):
        PreprocessConfig(in_plane_size=0)
    with pytest.raises(ValueError):
        PreprocessConfig(min_slice_spacing_mm=-1)
    with pytest.raises(ValueError):
        PreprocessConfig(intensity_low_percentile=50, intensity_high_percentile=50)
    with pytest.raises(ValueError, match="grid must be one of"):
        PreprocessConfig(grid="brain")
    with pytest.raises(ValueError, match="head_box_mm"):
        PreprocessConfig(head_box_mm=(240.0, 0.0, 192.0))


def test_preprocess_three_plane_study(three_plane_study):
    config = PreprocessConfig(in_plane_size=128, min_slice_spacing_mm=5.0)
    for series in load_study(three_plane_study.folder).series:
        out = preprocess_series(series, config)
        assert out.plane == series.plane and out.through_axis == series.through_axis
        in_plane = [axis for axis in range(3) if axis != series.through_axis]
        assert [out.shape[a] for a in in_plane] == [128, 128]
        assert out.spacing[series.through_axis] >= 5.0 - 1e-9
        assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
        assert 0.0 <= out.array.min() and out.array.max() <= 1.0
        assert out.meta["preprocessing"]["original_shape"] == list(series.shape)


def test_one_preprocess_config_class():
    from prima.config import PreprocessConfig as ModelPreprocessConfig

    assert PreprocessConfig is ModelPreprocessConfig


def test_preprocess_series_not_in_lps_is_reoriented_with_its_axis():
    array = np.random.default_rng(1).random((30, 20, 8)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 5.0, 1.0])  # RAS
    series = Series(name="x", array=array, affine=affine, plane="axial", through_axis=2,
                    source_orientation="RAS", source="memory", meta={})
    out = preprocess_series(series, PreprocessConfig(in_plane_size=16))
    assert out.shape == (16, 16, 8) and out.through_axis == 2
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    sagittal = dataclasses.replace(series, array=array.transpose(2, 0, 1).copy(),
                                   affine=np.diag([5.0, 1.0, 1.0, 1.0]), plane="sagittal", through_axis=0)
    assert preprocess_series(sagittal, PreprocessConfig(in_plane_size=16)).shape == (8, 16, 16)


def _phantom_series(name: str, centre_mm, spacing, shape, through_axis: int, plane: str, offset_mm=(0.0, 0.0, 0.0)
                    ) -> Series:
    """A head-like phantom in an L,P,S series: an ellipsoid (radii 70, 85, 60 mm) centred on ``centre_mm`` with a
    bright ball (radius 20 mm) 30 mm left, 20 mm anterior and 15 mm up of that centre; the grid's centre moved by
    ``offset_mm``."""
    affine = _lps_affine(spacing, origin=(0.0, 0.0, 0.0))
    affine[:3, 3] = np.asarray(centre_mm) + np.asarray(offset_mm) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3] - np.asarray(centre_mm)
    head = ((world / [70.0, 85.0, 60.0]) ** 2).sum(-1) < 1
    ball = np.linalg.norm(world - [-30.0, 20.0, 15.0], axis=-1) < 20
    array = (100.0 * head + 200.0 * ball).astype(np.float32)
    return Series(name=name, array=array, affine=affine, plane=plane, through_axis=through_axis,
                  source_orientation="LPS", source="memory", meta={})


def test_find_head_centre_is_the_foreground_centroid_of_the_largest_series():
    centre = np.array([4.0, -18.0, 11.0])
    whole = _phantom_series("whole", centre, (1.0, 1.0, 5.0), (220, 220, 36), 2, "axial")
    slab = _phantom_series("slab", centre, (0.8, 3.0, 0.8), (250, 12, 250), 1, "coronal", offset_mm=(0, 30, 0))
    found = find_head_centre([slab, whole])
    # the bright ball pulls the centroid a little toward it; the slab, off centre, does not decide it
    assert np.linalg.norm(found - centre) < 3.0
    assert np.linalg.norm(find_head_centre([slab]) - centre) > 10.0
    with pytest.raises(ValueError, match="no series has a foreground"):
        find_head_centre([dataclasses.replace(whole, array=np.zeros_like(whole.array))])
    assert grid_anchor([whole], PreprocessConfig()) is None
    assert np.array_equal(grid_anchor([slab, whole], PreprocessConfig(grid="head")), found)


def test_head_grid_is_the_config_box_centred_on_the_head():
    config = PreprocessConfig(in_plane_size=64, min_slice_spacing_mm=4.0, grid="head", head_box_mm=(256, 192, 160))
    centre = np.array([5.0, -7.0, 9.0])
    shape, affine = head_grid(_lps_affine((0.9, 0.9, 6.0)), 2, centre, config)
    assert shape == (64, 64, 40)
    assert np.allclose(np.abs(np.diag(affine)[:3]), [4.0, 3.0, 4.0])
    assert np.allclose(affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3], centre)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    sagittal, _ = head_grid(_lps_affine((5.0, 1.0, 1.0)), 0, centre, config)
    assert sagittal == (40, 64, 64)


def test_resample_onto_its_own_grid_is_the_identity_and_outside_is_background():
    array = np.random.default_rng(2).random((12, 10, 6)).astype(np.float32) + 1.0
    affine = _lps_affine((2.0, 2.0, 4.0))
    assert np.allclose(resample_onto(array, affine, array.shape, affine), array, atol=1e-5)
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, :3] @ [100.0, 0.0, 0.0]  # a grid beside the array's field of view
    assert np.all(resample_onto(array, affine, array.shape, shifted) == array.min())


def test_the_head_grid_puts_the_same_anatomy_at_the_same_voxel():
    """Two studies of one phantom head, placed 9 / -13 / 6 mm apart, scanned with other fields of view,
    spacings and grid offsets: on the head grid their voxels hold the same anatomy; over each series' own
    field of view (the paper's grid) they do not."""
    config = PreprocessConfig(in_plane_size=128, min_slice_spacing_mm=4.0, grid="head", head_box_mm=(240, 240, 192))
    first = _phantom_series("a", (0.0, 0.0, 0.0), (0.9, 0.9, 5.0), (256, 256, 34), 2, "axial")
    second = _phantom_series("b", (9.0, -13.0, 6.0), (1.2, 1.2, 3.0), (200, 190, 60), 2, "axial",
                             offset_mm=(14.0, -8.0, 10.0))
    on_head = [preprocess_series(s, config, grid_anchor([s], config)).array for s in (first, second)]
    assert on_head[0].shape == on_head[1].shape == (128, 128, 48)
    head_voxels = (on_head[0] > 0.2) | (on_head[1] > 0.2)
    assert np.abs(on_head[0] - on_head[1])[head_voxels].mean() < 0.02
    paper = PreprocessConfig(in_plane_size=128, min_slice_spacing_mm=4.0)
    own = [preprocess_series(s, paper).array for s in (first, second)]
    common = tuple(min(a, b) for a, b in zip(*(o.shape for o in own)))
    crop = [o[:common[0], :common[1], :common[2]] for o in own]
    assert np.abs(crop[0] - crop[1])[(crop[0] > 0.2) | (crop[1] > 0.2)].mean() > 0.1
    with pytest.raises(ValueError, match="needs the study's head centre"):
        preprocess_series(first, config)
    assert preprocess_series(first, config, np.zeros(3)).meta["preprocessing"]["head_centre_mm"] == [0.0, 0.0, 0.0]
