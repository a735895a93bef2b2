"""Shared machinery of the lesion painters: a head frame, local boxes, shapes, property edits, warps.

Lesions are placed in MNI-like head coordinates (mm, x right, y anterior, z superior, origin near
the anterior commissure), mapped into each subject's world space through a frame fitted to the
subject's own landmarks, so a painter never assumes the grid spacing, orientation or head position.
All per-lesion work happens in a small box around the lesion; only the structural keys warp the
whole intracranial content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from training.synth.phantom import Finding, Phantom, Tissue

BRAIN = (Tissue.CORTICAL_GM, Tissue.WM, Tissue.DEEP_GM, Tissue.BRAINSTEM, Tissue.CEREBELLUM)
INTRACRANIAL = (*BRAIN, Tissue.CSF, Tissue.VENTRICLE, Tissue.PITUITARY, Tissue.VESSEL)
RELAXATION = ("t1", "t2", "t2star")  # mix geometrically

# Landmark positions (MNI mm) the head frame is fitted to; they match anatomy.TEMPLATE_LANDMARKS.
_FRAME_POINTS = {"anterior_commissure": (0.0, 2.0, -4.0), "posterior_commissure": (0.0, -26.0, -2.0),
                 "vertex": (0.0, -20.0, 78.0)}

# Tissue-like property sets: pd, t1 (ms), t2 (ms), t2* (ms), adc (1e-3 mm^2/s), enhancement.
PROPS: dict[str, dict[str, float]] = {
    "csf": dict(pd=1.0, t1=4000.0, t2=2000.0, t2star=1500.0, adc=3.0, enhancement=0.0),
    "gm": dict(pd=0.80, t1=1300.0, t2=100.0, t2star=65.0, adc=0.85, enhancement=0.0),
    "tumor": dict(pd=0.85, t1=1500.0, t2=130.0, t2star=80.0, adc=1.0, enhancement=0.0),
    "necrosis": dict(pd=0.95, t1=2600.0, t2=450.0, t2star=250.0, adc=2.2, enhancement=0.0),
    "pus": dict(pd=0.92, t1=1400.0, t2=250.0, t2star=120.0, adc=0.45, enhancement=0.0),
    "protein_cyst": dict(pd=0.95, t1=600.0, t2=400.0, t2star=200.0, adc=2.5, enhancement=0.0),
    "flow_void": dict(pd=0.05, t1=1600.0, t2=60.0, t2star=8.0, adc=0.5, enhancement=0.0),
    "calcification": dict(pd=0.15, t1=700.0, t2=30.0, t2star=4.0, adc=0.3, enhancement=0.0),
    "gliosis": dict(pd=0.86, t1=1350.0, t2=170.0, t2star=100.0, adc=1.2, enhancement=0.0),
    "device": dict(pd=0.02, t1=1000.0, t2=20.0, t2star=3.0, adc=0.1, enhancement=0.0),
    "soft_tissue": dict(pd=0.75, t1=1000.0, t2=70.0, t2star=40.0, adc=1.2, enhancement=0.1),
}

# Blood products by age (T1 bright from methaemoglobin, T2/T2* dark from deoxy-Hb and haemosiderin).
BLOOD: dict[str, dict[str, float]] = {
    "hyperacute": dict(pd=0.90, t1=1200.0, t2=160.0, t2star=25.0, adc=0.6, enhancement=0.0),
    "acute": dict(pd=0.85, t1=1100.0, t2=45.0, t2star=8.0, adc=0.5, enhancement=0.0),
    "early subacute": dict(pd=0.85, t1=320.0, t2=45.0, t2star=8.0, adc=0.6, enhancement=0.0),
    "late subacute": dict(pd=0.90, t1=350.0, t2=280.0, t2star=30.0, adc=0.9, enhancement=0.0),
    "chronic": dict(pd=0.97, t1=3000.0, t2=700.0, t2star=300.0, adc=2.6, enhancement=0.0),
}


@dataclass
class Box:
    """A sub-block of the phantom grid and the world (mm) coordinates of its voxel centres."""

    slices: tuple[slice, slice, slice]
    xyz: np.ndarray  # (3, nx, ny, nz) float32 world mm

    @property
    def shape(self) -> tuple[int, ...]:
        return self.xyz.shape[1:]


@dataclass
class Mass:
    """A space-occupying lesion, recorded so mass effect can be derived from it."""

    key: str
    center: np.ndarray  # world mm
    radius_mm: float


@dataclass
class Ctx:
    """One apply_findings call: the phantom, the random stream and the placements made so far."""

    phantom: Phantom
    rng: np.random.Generator
    masses: list[Mass] = field(default_factory=list)
    hints: dict = field(default_factory=dict)  # placements one painter leaves for another (e.g. craniotomy site)
    _label_index: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = self.phantom
        self.inv_affine = np.linalg.inv(p.affine)
        self.spacing = float(np.mean(p.spacing))
        lm = {k: np.asarray(p.landmarks[k], float) for k in _FRAME_POINTS}
        ac, pc, vertex = lm["anterior_commissure"], lm["posterior_commissure"], lm["vertex"]
        y = ac - pc
        y /= np.linalg.norm(y)
        up = vertex - ac
        z = up - y * (up @ y)
        z /= np.linalg.norm(z)
        x = np.cross(y, z)
        self.frame = np.stack([x, y, z], axis=1)  # columns: head axes in world
        mni = {k: np.asarray(v) for k, v in _FRAME_POINTS.items()}
        ratios = [np.linalg.norm(ac - pc) / np.linalg.norm(mni["anterior_commissure"] - mni["posterior_commissure"]),
                  np.linalg.norm(vertex - ac) / np.linalg.norm(mni["vertex"] - mni["anterior_commissure"])]
        self.scale = float(np.mean(ratios))
        self.origin_world, self.origin_head = ac, mni["anterior_commissure"]

    # -- coordinates ------------------------------------------------------------------------
    def to_world(self, head_mm) -> np.ndarray:
        """Head (MNI-like) mm -> subject world mm; works on (3,) or (3, ...) arrays."""
        h = np.asarray(head_mm, float)
        flat = h.reshape(3, -1) - self.origin_head[:, None]
        return (self.origin_world[:, None] + self.scale * self.frame @ flat).reshape(h.shape)

    def to_head(self, world_mm) -> np.ndarray:
        w = np.asarray(world_mm, float)
        flat = w.reshape(3, -1) - self.origin_world[:, None]
        return (self.frame.T @ flat / self.scale + self.origin_head[:, None]).reshape(w.shape)

    def head_dir(self, direction) -> np.ndarray:
        """A head-frame direction as a unit world vector."""
        d = self.frame @ np.asarray(direction, float)
        return d / np.linalg.norm(d)

    def landmark(self, name: str) -> np.ndarray:
        return np.asarray(self.phantom.landmarks[name], float)

    def voxel(self, world) -> np.ndarray:
        return (self.inv_affine @ np.r_[np.asarray(world, float), 1.0])[:3]

    def box(self, center_world, radius_mm) -> Box:
        """The grid block covering a ball (or per-axis half-widths) around ``center_world``."""
        corners = [self.voxel(np.asarray(center_world) + np.array(s) * radius_mm)
                   for s in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T]
        lo = np.floor(np.min(corners, axis=0)).astype(int)
        hi = np.ceil(np.max(corners, axis=0)).astype(int) + 1
        shape = self.phantom.shape
        lo = np.clip(lo, 0, np.array(shape) - 1)
        hi = np.clip(hi, lo + 1, np.array(shape))
        slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        idx = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in slices], indexing="ij")
        a = self.phantom.affine.astype(np.float32)
        xyz = np.stack([a[i, 0] * idx[0] + a[i, 1] * idx[1] + a[i, 2] * idx[2] + a[i, 3] for i in range(3)])
        return Box(slices, xyz)

    def labels(self, box: Box) -> np.ndarray:
        return self.phantom.labels[box.slices]

    # -- sampling ---------------------------------------------------------------------------
    def sample_point(self, tissues, head_ok=None, tries: int = 4000) -> np.ndarray:
        """World position of a random voxel of ``tissues`` whose head coordinates pass ``head_ok``."""
        key = tuple(int(t) for t in tissues)
        if key not in self._label_index:
            self._label_index[key] = np.flatnonzero(np.isin(self.phantom.labels, key))
        flat = self._label_index[key]
        pick = flat[self.rng.integers(0, len(flat), size=min(tries, len(flat)))]
        vox = np.stack(np.unravel_index(pick, self.phantom.shape)).astype(float)
        world = self.phantom.affine[:3, :3] @ vox + self.phantom.affine[:3, 3:4]
        if head_ok is not None:
            h = self.to_head(world)
            ok = head_ok(h[0], h[1], h[2])
            if ok.any():
                world = world[:, ok]
        return world[:, 0]

    def skull_point(self, head_direction, start_head=(0.0, -18.0, 15.0)) -> tuple[np.ndarray, np.ndarray]:
        """Inner-table point on the ray from ``start_head`` along ``head_direction`` and the outward normal."""
        d = self.head_dir(head_direction)
        p = self.to_world(start_head)
        last_inside = p
        for _ in range(200):
            p = p + d * 0.5 * self.spacing
            v = np.round(self.voxel(p)).astype(int)
            if np.any(v < 0) or np.any(v >= self.phantom.shape):
                break
            if self.phantom.labels[tuple(v)] in (Tissue.SKULL, Tissue.SCALP, Tissue.BACKGROUND):
                break
            last_inside = p
        return last_inside, d

    # -- shapes -----------------------------------------------------------------------------
    def noise(self, shape, smooth_mm: float) -> np.ndarray:
        """Smooth Gaussian noise with unit standard deviation on a box."""
        field_ = ndimage.gaussian_filter(self.rng.standard_normal(shape).astype(np.float32),
                                         max(smooth_mm / self.spacing, 0.5))
        return field_ / max(float(field_.std()), 1e-6)

    def ellipsoid_radius(self, box: Box, center, radii, axes=None) -> np.ndarray:
        """Normalised ellipsoidal radius (1 on the surface) of every box voxel; ``axes`` columns in world."""
        rel = box.xyz - np.asarray(center, np.float32)[:, None, None, None]
        axes = self.frame if axes is None else axes
        local = np.tensordot(np.asarray(axes, np.float32).T, rel, axes=1)
        return np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))

    def blob(self, center, radii, irregularity: float = 0.15, margin: float = 1.6) -> tuple[Box, np.ndarray]:
        """An irregular ellipsoid: normalised radius perturbed by smooth noise (surface at 1)."""
        box = self.box(center, max(radii) * margin)
        r = self.ellipsoid_radius(box, center, radii)
        if irregularity > 0:
            r = r * (1.0 + irregularity * self.noise(box.shape, max(min(radii) / 2.0, 2.0)))
        return box, r

    # -- property edits ---------------------------------------------------------------------
    def paint(self, box: Box, weight: np.ndarray, props: dict[str, float], tissue: Tissue | None = None) -> None:
        """Blend the property maps towards ``props`` with ``weight`` (0..1 or bool) inside ``box``."""
        w = np.clip(np.asarray(weight, np.float32), 0.0, 1.0)
        for name, value in props.items():
            view = getattr(self.phantom, name)[box.slices]
            if name in RELAXATION:
                view[...] = np.exp((1 - w) * np.log(np.maximum(view, 1e-3)) + w * np.log(value))
            else:
                view[...] = (1 - w) * view + w * value
        if tissue is not None:
            self.phantom.labels[box.slices][w >= 0.5] = tissue

    def scale_props(self, box: Box, weight: np.ndarray, factors: dict[str, float]) -> None:
        """Multiply property maps by ``factors`` (faded by ``weight``), keeping the underlying structure."""
        w = np.clip(np.asarray(weight, np.float32), 0.0, 1.0)
        for name, f in factors.items():
            view = getattr(self.phantom, name)[box.slices]
            if name == "enhancement":
                view += w * f  # an uptake, not a factor
            else:
                view *= np.exp(w * np.log(f))

    def at_least_centre(self, box: Box, mask: np.ndarray, center) -> np.ndarray:
        """``mask``, or else the box voxel nearest ``center``: a lesion smaller than a coarse grid's
        voxels still has one (and so a label, a mask and a finding)."""
        if mask.any():
            return mask
        mask = mask.copy()
        mask[tuple(np.clip(np.round(self.voxel(center)).astype(int) - [s.start for s in box.slices], 0,
                           np.array(box.shape) - 1))] = True
        return mask

    def add_mask(self, key: str, box: Box, mask: np.ndarray) -> None:
        full = self.phantom.lesion_masks.setdefault(key, np.zeros(self.phantom.shape, bool))
        full[box.slices] |= mask

    def record(self, key: str, location: str, size_mm: float, **attributes) -> None:
        """Add (or enrich) the Finding of ``key``."""
        for f in self.phantom.findings:
            if f.key == key:
                f.attributes.update(attributes)
                return
        self.phantom.findings.append(Finding(key, location, round(float(size_mm), 1), dict(attributes)))

    def has(self, key: str) -> bool:
        m = self.phantom.lesion_masks.get(key)
        return m is not None and bool(m.any())

    # -- naming -----------------------------------------------------------------------------
    def side(self, world) -> str:
        return "right" if self.to_head(world)[0] >= 0 else "left"

    def location(self, world) -> str:
        """A radiological location for a world point (lobe, deep structure or compartment)."""
        x, y, z = self.to_head(world)
        v = np.round(self.voxel(world)).astype(int)
        v = np.clip(v, 0, np.array(self.phantom.shape) - 1)
        tissue = int(self.phantom.labels[tuple(v)])
        side = "right" if x >= 0 else "left"
        if tissue == Tissue.BRAINSTEM:
            return "midbrain" if z > -15 else ("pons" if z > -42 else "medulla")
        if tissue == Tissue.CEREBELLUM or (z < -20 and y < -45):
            return "cerebellar vermis" if abs(x) < 8 else f"{side} cerebellar hemisphere"
        if tissue == Tissue.DEEP_GM:
            return f"{side} thalamus" if y < -8 else f"{side} basal ganglia"
        if tissue == Tissue.VENTRICLE and abs(x) < 5:
            return "third ventricle"
        if y > 0 and z > -15 or y > 25:
            lobe = "frontal"
        elif z < -5 and y > -60 and abs(x) > 25:
            lobe = "temporal"
        elif y < -65:
            lobe = "occipital"
        else:
            lobe = "parietal"
        return f"{side} {lobe} lobe"


def distance_to(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm) of every voxel to ``mask`` (0 inside)."""
    if not mask.any():
        return np.full(mask.shape, 1e3, np.float32)
    return (ndimage.distance_transform_edt(~mask) * spacing).astype(np.float32)


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def warp_intracranial(ctx: Ctx, displacement, lo_world, hi_world) -> np.ndarray:
    """Move intracranial content by ``displacement(xyz) -> (3, ...) mm`` inside a world-space box.

    Backward mapping (new(x) = old(x - d(x))); the skull, scalp and anything that would pull bone
    inside stays put. Moves the property maps, labels and lesion masks together. Returns the
    displacement magnitude (mm) over the full grid (zero outside the box).
    """
    p = ctx.phantom
    center = (np.asarray(lo_world) + np.asarray(hi_world)) / 2
    box = ctx.box(center, (np.asarray(hi_world) - np.asarray(lo_world)) / 2)
    d = displacement(box.xyz).astype(np.float32)
    src = box.xyz - d
    vox = np.tensordot(ctx.inv_affine[:3, :3].astype(np.float32), src, axes=1) + \
        ctx.inv_affine[:3, 3].astype(np.float32)[:, None, None, None]
    labels_new = ndimage.map_coordinates(p.labels, vox, order=0, mode="nearest")
    inside = np.isin(ctx.labels(box), INTRACRANIAL) & np.isin(labels_new, INTRACRANIAL)
    for name, arr in p.property_maps().items():
        moved = ndimage.map_coordinates(arr, vox, order=1, mode="nearest")
        arr[box.slices][inside] = moved[inside]
    p.labels[box.slices][inside] = labels_new[inside]
    for mask in p.lesion_masks.values():
        moved = ndimage.map_coordinates(mask.astype(np.uint8), vox, order=0, mode="nearest").astype(bool)
        view = mask[box.slices]
        moving = int(view[inside].sum())
        if moving and moving == int(mask.sum()) and not moved[inside].any():
            continue  # a lesion smaller than a coarse grid's voxel would fall between samples: it stays put
        view[inside] = moved[inside]
    magnitude = np.zeros(p.shape, np.float32)
    magnitude[box.slices] = np.where(inside, np.linalg.norm(d, axis=0), 0.0)
    return magnitude
