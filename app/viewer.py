"""The slice viewer and the 3D view: pure functions from volumes to images and plotly figures.

Slicing must feel instant, so a viewer figure carries every slice of the chosen plane as a small
JPEG and its plotly slider swaps the image source in the browser: moving the slider never calls the
server, and LIME is never recomputed for a slice or plane change. A new figure is built only when
the series, plane, opacity or explained output changes.

Volumes are on a series' preprocessed grid (array axes towards L, P, S; ``SeriesTokens.affine``
maps voxels to RAS mm). Slices are shown in radiological convention: the patient's right on the
screen's left, anterior up in axial views, superior up in coronal and sagittal views.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from matplotlib import colormaps
from PIL import Image
from plotly.subplots import make_subplots
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import marching_cubes

from prima.patching import DEFAULT_PATCH_SIZE, patch_extent

PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # array axis a plane's slices step along
HEAT_COLORSCALE = "RdBu_r"  # red: the token supports the output, blue: it argues against it
_HEAT_LUT = (colormaps[HEAT_COLORSCALE](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)
TOP_K_RGB = np.array([255, 221, 0], dtype=np.float32)  # outline of the top-k LIME tokens
MAX_SLIDER_STEPS = 128  # a plane with more slices is stepped every few slices: keeps a figure < ~2 MB
JPEG_QUALITY = 88
MESH_GRID = 64  # the 3D surface is extracted on a grid of at most this many voxels per axis


@dataclass
class ViewVolume:
    """What one viewer shows of one series."""

    image: np.ndarray  # (X, Y, Z) uint8 preprocessed series, axes towards L, P, S
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of that grid
    heat: np.ndarray | None = None  # (X, Y, Z) float32 LIME weight of each voxel's token, or None
    top_k: np.ndarray | None = None  # (X, Y, Z) int16: rank (1 = largest) of a top-k token there, else 0

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """A preprocessed volume (intensities in [0, 1]) as 8-bit grey levels."""
    return np.clip(np.rint(np.asarray(volume, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def top_k_volume(shape: tuple[int, int, int], through_axis: int, coords: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    """(X, Y, Z) int16 with the rank (1 = largest weight) of each top-k token over its patch, 0 elsewhere.

    Args:
        shape: the series' preprocessed grid shape.
        through_axis: the series' through-plane array axis (sets the patch extent per axis).
        coords: (K, 3) patch-grid coordinates of the series' tokens, array-axis order.
        top_k: indices into ``coords`` of the top tokens, largest weight first.
    """
    ranks = np.zeros(shape, dtype=np.int16)
    extent = np.array(patch_extent(through_axis, DEFAULT_PATCH_SIZE))
    for rank, token in enumerate(np.asarray(top_k, dtype=np.int64), start=1):
        start = coords[token] * extent
        stop = np.minimum(start + extent, shape)
        ranks[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = rank
    return ranks


def slice_count(volume: ViewVolume, plane: str) -> int:
    return volume.image.shape[_plane_axis(plane)]


def _plane_axis(plane: str) -> int:
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
    return PLANE_AXIS[plane]


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice as displayed: rows top to bottom, columns left to right on the screen."""
    axis = _plane_axis(plane)
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"slice {index} is outside 0..{volume.shape[axis] - 1} of the {plane} plane")
    if plane == "axial":
        return volume[:, :, index].T  # rows towards posterior, columns towards the patient's left
    section = volume[:, index, :] if plane == "coronal" else volume[index, :, :]
    return section.T[::-1]  # superior up


def pixel_size(volume: ViewVolume, plane: str) -> tuple[float, float]:
    """(width, height) in mm of one displayed pixel."""
    sx, sy, sz = (float(v) for v in volume.spacing)
    return {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}[plane]


def heat_limit(heat: np.ndarray | None) -> float:
    """The symmetric colour range of a heatmap: its largest absolute weight (1 when there is none)."""
    if heat is None:
        return 1.0
    peak = float(np.abs(heat).max())
    return peak if peak > 0 else 1.0


def render_slice(volume: ViewVolume, plane: str, index: int, opacity: float = 0.5) -> np.ndarray:
    """One displayed slice as (H, W, 3) uint8: grey image, the heatmap blended in by ``opacity`` times
    each voxel's |weight| / the largest |weight|, and the top-k tokens outlined."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    grey = plane_slice(volume.image, plane, index).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if volume.heat is not None and opacity > 0:
        limit = heat_limit(volume.heat)
        weights = np.clip(plane_slice(volume.heat, plane, index) / limit, -1.0, 1.0)
        colours = _HEAT_LUT[np.rint((weights + 1.0) * 127.5).astype(np.int64)]
        alpha = (opacity * np.abs(weights))[..., None]
        rgb = rgb * (1.0 - alpha) + colours * alpha
    if volume.top_k is not None:
        ranks = plane_slice(volume.top_k, plane, index)
        inner = ndimage.grey_erosion(ranks, size=3, mode="constant") == ndimage.grey_dilation(ranks, size=3, mode="constant")
        rgb[(ranks > 0) & ~inner] = TOP_K_RGB
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def view_png(volume: ViewVolume, plane: str, index: int, opacity: float = 0.5) -> bytes:
    """One displayed slice as a PNG with square pixels (the slice axis stretched to its size in mm)."""
    rgb = render_slice(volume, plane, index, opacity)
    dx, dy = pixel_size(volume, plane)
    image = Image.fromarray(rgb)
    if not np.isclose(dx, dy):
        image = image.resize((rgb.shape[1], max(1, round(rgb.shape[0] * dy / dx))), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def slider_slices(count: int) -> list[int]:
    """The slice indices a slider steps through: all of them, or every n-th for a very deep plane."""
    stride = -(-count // MAX_SLIDER_STEPS)
    return list(range(0, count, stride))


def default_slice(volume: ViewVolume, plane: str) -> int:
    """Where a viewer opens: the slice through the top LIME token, else the middle slice."""
    axis = _plane_axis(plane)
    if volume.top_k is not None and (volume.top_k == 1).any():
        return int(np.nonzero(volume.top_k == 1)[axis].mean())
    return volume.image.shape[axis] // 2


def _nearest_step(steps: list[int], index: int) -> int:
    return int(np.argmin(np.abs(np.asarray(steps) - index)))


def _colour_bar_trace(limit: float, x: float) -> go.Scatter:
    """An invisible trace that only draws the heatmap's colour bar."""
    return go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                      marker=dict(colorscale=HEAT_COLORSCALE, cmin=-limit, cmax=limit, color=[0], showscale=True,
                                  colorbar=dict(title=dict(text="LIME weight", side="right"), x=x, thickness=12,
                                                len=0.8)))


def _image_axes(figure: go.Figure, count: int) -> None:
    for i in range(1, count + 1):
        suffix = "" if i == 1 else str(i)
        figure.layout[f"xaxis{suffix}"].update(visible=False, constrain="domain")
        figure.layout[f"yaxis{suffix}"].update(visible=False, autorange="reversed", scaleanchor=f"x{suffix}",
                                              constrain="domain")


def _slider(steps: list[list[str]], labels: list[str], active: int, traces: list[int]) -> dict:
    return dict(active=active, currentvalue=dict(prefix="slice ", font=dict(size=12)), pad=dict(t=8, b=4),
                len=0.95, x=0.025,
                steps=[dict(method="restyle", label=label, args=[{"source": sources}, traces])
                       for sources, label in zip(steps, labels)])


def viewer_figure(volume: ViewVolume, plane: str, opacity: float = 0.5, title: str = "",
                  slice_index: int | None = None) -> go.Figure:
    """A slice viewer of one series: every slice of ``plane`` precomputed, a plotly slider to step
    through them in the browser, the heatmap's colour bar when there is a heatmap."""
    count = slice_count(volume, plane)
    steps = slider_slices(count)
    active = _nearest_step(steps, default_slice(volume, plane) if slice_index is None else slice_index)
    sources = [[data_uri(render_slice(volume, plane, k, opacity))] for k in steps]
    dx, dy = pixel_size(volume, plane)
    figure = go.Figure(go.Image(source=sources[active][0], dx=dx, dy=dy, hoverinfo="skip"))
    if volume.heat is not None:
        figure.add_trace(_colour_bar_trace(heat_limit(volume.heat), 1.0))
    _image_axes(figure, 1)
    figure.update_layout(title=dict(text=title, font=dict(size=13)), margin=dict(l=0, r=0, t=36, b=0), height=520,
                         plot_bgcolor="black", sliders=[_slider(sources, [str(k) for k in steps], active, [0])])
    return figure


def compare_figure(pre: ViewVolume, post: ViewVolume, plane: str, opacity: float = 0.5,
                   titles: tuple[str, str] = ("pre", "post")) -> go.Figure:
    """Two viewers side by side with one slider; it steps both through the same relative depth."""
    count = max(slice_count(pre, plane), slice_count(post, plane))
    steps = slider_slices(count)

    def at(volume: ViewVolume, k: int) -> int:
        return round(k * (slice_count(volume, plane) - 1) / max(count - 1, 1))

    sources = [[data_uri(render_slice(v, plane, at(v, k), opacity)) for v in (pre, post)] for k in steps]
    active = _nearest_step(steps, default_slice(pre, plane) * (count - 1) // max(slice_count(pre, plane) - 1, 1))
    figure = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.02)
    for column, volume in enumerate((pre, post), start=1):
        dx, dy = pixel_size(volume, plane)
        figure.add_trace(go.Image(source=sources[active][column - 1], dx=dx, dy=dy, hoverinfo="skip"), 1, column)
    limit = max(heat_limit(pre.heat), heat_limit(post.heat))
    if pre.heat is not None or post.heat is not None:
        figure.add_trace(_colour_bar_trace(limit, 1.0))
    _image_axes(figure, 2)
    labels = [f"{k + 1}/{count}" for k in steps]
    figure.update_layout(margin=dict(l=0, r=0, t=40, b=0), height=480,
                         sliders=[_slider(sources, labels, active, [0, 1])])
    return figure


def _world(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def surface_mesh(volume: ViewVolume) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) in RAS mm, faces (F, 3)) of the series' foreground surface: marching cubes at the
    Otsu level on a grid decimated to at most ``MESH_GRID`` voxels per axis."""
    stride = np.maximum(1, -(-np.asarray(volume.image.shape) // MESH_GRID))
    coarse = volume.image[::stride[0], ::stride[1], ::stride[2]].astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 1.0)
    level = float(threshold_otsu(coarse)) if coarse.max() > coarse.min() else float(coarse.max())
    padded = np.pad(coarse, 1)  # closes the surface where the head touches the grid's edge
    vertices, faces, _, _ = marching_cubes(padded, level=level)
    vertices = (vertices - 1.0) * stride
    return _world(vertices, volume.affine), faces


def _box_mesh(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[lower[0] if i & 1 == 0 else upper[0], lower[1] if i & 2 == 0 else upper[1],
                         lower[2] if i & 4 == 0 else upper[2]] for i in range(8)], dtype=np.float64)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return corners, faces


def three_d_figure(volume: ViewVolume, title: str = "") -> go.Figure:
    """The brain surface, translucent, with the top-k LIME tokens as boxes coloured by rank (RAS mm)."""
    vertices, faces = surface_mesh(volume)
    figure = go.Figure(go.Mesh3d(x=vertices[:, 0], y=vertices[:, 1], z=vertices[:, 2], i=faces[:, 0], j=faces[:, 1],
                                 k=faces[:, 2], color="lightgrey", opacity=0.18, name="head surface",
                                 hoverinfo="skip", flatshading=False))
    if volume.top_k is not None:
        ranks = [r for r in range(1, int(volume.top_k.max()) + 1) if (volume.top_k == r).any()]
        colours = colormaps["autumn"](np.linspace(0.0, 0.85, max(len(ranks), 1)))
        for rank, colour in zip(ranks, colours):
            where = np.argwhere(volume.top_k == rank)
            corners, box_faces = _box_mesh(where.min(axis=0) - 0.5, where.max(axis=0) + 0.5)
            corners = _world(corners, volume.affine)
            figure.add_trace(go.Mesh3d(x=corners[:, 0], y=corners[:, 1], z=corners[:, 2], i=box_faces[:, 0],
                                       j=box_faces[:, 1], k=box_faces[:, 2], opacity=0.75, name=f"token #{rank}",
                                       color=f"rgb({int(colour[0] * 255)},{int(colour[1] * 255)},{int(colour[2] * 255)})",
                                       hovertext=f"LIME token #{rank}", hoverinfo="text", showlegend=True))
    figure.update_layout(title=dict(text=title, font=dict(size=13)), height=520, margin=dict(l=0, r=0, t=36, b=0),
                         scene=dict(xaxis_title="x mm (+ right)", yaxis_title="y mm (+ anterior)",
                                    zaxis_title="z mm (+ superior)", aspectmode="data"),
                         legend=dict(orientation="h"))
    return figure
