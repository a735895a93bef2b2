"""app.viewer: slices in radiological orientation, heatmap blending, outlines, figures, the 3D mesh."""

from __future__ import annotations

import numpy as np
import pytest

from app.viewer import (MAX_SLIDER_STEPS, ViewVolume, compare_figure, default_slice, pixel_size, plane_slice,
                        render_slice, slider_slices, surface_mesh, three_d_figure, top_k_volume, viewer_figure)
from prima.patching import patch_extent


@pytest.fixture()
def volume() -> ViewVolume:
    """A 64 x 48 x 16 head-like blob, 1 x 1 x 4 mm, with a heatmap and two top tokens."""
    x, y, z = np.meshgrid(np.arange(64), np.arange(48), np.arange(16), indexing="ij")
    image = ((((x - 32) / 26) ** 2 + ((y - 24) / 20) ** 2 + ((z - 8) / 7) ** 2) < 1).astype(np.uint8) * 200
    coords = np.array([[0, 0, 1], [1, 0, 2], [0, 1, 0]])
    heat = np.zeros(image.shape, np.float32)
    heat[32:64, 0:32, 8:12] = 0.5
    heat[0:32, 32:48, 0:4] = -0.25
    return ViewVolume(image, np.diag([-1.0, -1.0, 4.0, 1.0]), heat, top_k_volume(image.shape, 2, coords, np.array([1, 0])))


def test_axial_slice_is_radiological():
    # array axes point to L, P, S: a voxel at high X (patient left) shows on the screen's right,
    # one at low Y (anterior) at the top.
    volume = np.zeros((10, 8, 3))
    volume[9, 0, 1] = 1
    shown = plane_slice(volume, "axial", 1)
    assert shown.shape == (8, 10)
    assert shown[0, 9] == 1


@pytest.mark.parametrize("plane, index, expected", [("coronal", 0, (0, 9)), ("sagittal", 9, (0, 0))])
def test_coronal_and_sagittal_show_superior_up(plane, index, expected):
    volume = np.zeros((10, 8, 3))
    volume[9, 0, 2] = 1  # left, anterior, top slice
    shown = plane_slice(volume, plane, index)
    assert shown.shape == ((3, 10) if plane == "coronal" else (3, 8))
    assert shown[expected] == 1


def test_plane_slice_rejects_bad_plane_and_index():
    with pytest.raises(ValueError, match="plane"):
        plane_slice(np.zeros((4, 4, 4)), "oblique", 0)
    with pytest.raises(ValueError, match="outside"):
        plane_slice(np.zeros((4, 4, 4)), "axial", 4)


def test_top_k_volume_covers_each_token_patch():
    ranks = top_k_volume((64, 48, 16), 2, np.array([[0, 0, 1], [1, 1, 3]]), np.array([1, 0]))
    extent = patch_extent(2)
    assert extent == (32, 32, 4)
    assert (ranks[32:64, 32:48, 12:16] == 1).all()  # token 1 ranked first, clipped at the grid edge
    assert (ranks[0:32, 0:32, 4:8] == 2).all()
    assert (ranks > 0).sum() == 32 * 16 * 4 + 32 * 32 * 4


def test_render_slice_blends_heat_and_outlines_tokens(volume):
    plain = render_slice(ViewVolume(volume.image, volume.affine), "axial", 9, 0.5)
    assert plain.shape == (48, 64, 3) and plain.dtype == np.uint8
    assert (plain[..., 0] == plain[..., 1]).all()  # grey only
    shown = render_slice(volume, "axial", 9, 0.8)
    centre = shown[16, 48]  # inside the positive patch (rows = Y, columns = X)
    assert centre[0] > centre[2]  # red: supports the output
    outline = shown[0, 33]  # the top token's patch border
    assert tuple(outline) == (255, 221, 0)
    with pytest.raises(ValueError, match="opacity"):
        render_slice(volume, "axial", 0, 1.5)


def test_pixel_size_follows_the_plane(volume):
    assert pixel_size(volume, "axial") == (1.0, 1.0)
    assert pixel_size(volume, "coronal") == (1.0, 4.0)
    assert pixel_size(volume, "sagittal") == (1.0, 4.0)


def test_viewer_figure_has_one_image_per_slice_and_a_colour_bar(volume):
    figure = viewer_figure(volume, "axial", 0.5, "T2")
    steps = figure.layout.sliders[0].steps
    assert len(steps) == 16
    sources = [step.args[0]["source"][0] for step in steps]
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert sources[9] != sources[3]  # the heatmap's slab differs from a slice without heat
    assert figure.data[0].type == "image" and (figure.data[0].dx, figure.data[0].dy) == (1.0, 1.0)
    assert figure.data[1].marker.showscale
    assert figure.layout.sliders[0].active == default_slice(volume, "axial") == 9  # the top token's slice


def test_deep_planes_are_stepped():
    assert len(slider_slices(300)) <= MAX_SLIDER_STEPS
    assert slider_slices(5) == [0, 1, 2, 3, 4]


def test_compare_figure_steps_both_viewers(volume):
    other = ViewVolume(volume.image[:, :, :8], volume.affine)
    figure = compare_figure(volume, other, "axial")
    steps = figure.layout.sliders[0].steps
    assert len(steps) == 16
    assert all(len(step.args[0]["source"]) == 2 and list(step.args[1]) == [0, 1] for step in steps)


def test_surface_mesh_lies_on_the_head(volume):
    vertices, faces = surface_mesh(volume)
    assert len(faces) > 100
    # world x = -voxel x, y = -voxel y, z = 4 * voxel z
    assert vertices[:, 0].min() >= -64 and vertices[:, 0].max() <= 1
    assert vertices[:, 2].min() >= -4 and vertices[:, 2].max() <= 64


def test_three_d_figure_has_a_box_per_top_token(volume):
    figure = three_d_figure(volume)
    assert [trace.name for trace in figure.data] == ["head surface", "token #1", "token #2"]
    box = figure.data[1]
    assert len(box.x) == 8 and len(box.i) == 12
