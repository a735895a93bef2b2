"""Structural, developmental, inflammatory, post-surgical and CSF-space findings, and the warps of
mass effect, midline shift and herniation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from training.synth.lesions.base import (BRAIN, INTRACRANIAL, PROPS, Ctx, Mass, Tissue, distance_to, smoothstep,
                                         warp_intracranial)
from training.synth.lesions.tumors import EDEMA, draw_diameter, hemispheric_point, offset, paint_edema
from training.synth.lesions.vascular import vessel_tube


def _grid_world(ctx: Ctx, idx) -> np.ndarray:
    return ctx.phantom.affine[:3, :3] @ np.stack(idx).astype(float) + ctx.phantom.affine[:3, 3:4]


def _ventricle_box(ctx: Ctx, margin_mm: float):
    idx = np.nonzero(ctx.phantom.labels == Tissue.VENTRICLE)
    lo, hi = _grid_world(ctx, [[i.min()] for i in idx])[:, 0], _grid_world(ctx, [[i.max()] for i in idx])[:, 0]
    return ctx.box((lo + hi) / 2, np.abs(hi - lo) / 2 + margin_mm)


def grow_ventricles(ctx: Ctx, grow_mm: float, key: str | None) -> None:
    """Enlarge the lateral and third ventricles into the surrounding white and deep grey matter."""
    box = _ventricle_box(ctx, grow_mm + 6)
    labels = ctx.labels(box)
    vent = labels == Tissue.VENTRICLE
    h = ctx.to_head(box.xyz)
    dist = distance_to(vent & (h[2] > -20), ctx.spacing)
    reach = grow_mm * (1 + 0.2 * ctx.noise(box.shape, 6.0))
    new = (dist > 0) & (dist <= reach) & np.isin(labels, (Tissue.WM, Tissue.DEEP_GM, Tissue.CSF)) & (h[2] > -20)
    ctx.paint(box, new, PROPS["csf"], tissue=Tissue.VENTRICLE)
    if key is None:
        return
    if ctx.rng.random() < 0.3:  # transependymal CSF flow: a periventricular FLAIR halo
        halo = (dist > reach) & (dist <= reach + 3) & np.isin(labels, (Tissue.WM,))
        ctx.scale_props(box, halo, {"t2": 1.7, "pd": 1.08, "adc": 1.3})
    ctx.add_mask(key, box, ctx.labels(box) == Tissue.VENTRICLE)


def ventriculomegaly(ctx: Ctx, key: str = "ventricular_ventriculomegaly") -> None:
    grow = draw_diameter(ctx, 2.5, 10)
    grow_ventricles(ctx, grow, key)
    ctx.record(key, "lateral and third ventricles", grow, enlargement_mm=round(grow, 1))


def cerebral_atrophy(ctx: Ctx, key: str = "structural_cerebral_atrophy") -> None:
    p = ctx.phantom
    loss = ctx.rng.uniform(1.0, 3.5)
    csf = np.isin(p.labels, (Tissue.CSF, Tissue.VENTRICLE, Tissue.BACKGROUND, Tissue.SKULL))
    depth = distance_to(csf, ctx.spacing)
    field = loss * (1 + 0.3 * ndimage.zoom(ctx.rng.standard_normal((6, 6, 6)), np.array(p.shape) / 6, order=1))
    # The outermost cortical layer always goes: a voxel is the smallest visible widening.
    new = (p.labels == Tissue.CORTICAL_GM) & (depth <= np.maximum(field[: p.shape[0], : p.shape[1], : p.shape[2]],
                                                                  ctx.spacing))
    for name, value in PROPS["csf"].items():
        getattr(p, name)[new] = value
    p.labels[new] = Tissue.CSF
    grow_ventricles(ctx, loss, None)  # ex vacuo, proportionate to the sulcal widening
    p.lesion_masks[key] = p.lesion_masks.get(key, np.zeros(p.shape, bool)) | new
    ctx.record(key, "diffuse", 0.0, severity=["mild", "moderate", "severe"][min(int(loss // 1.2), 2)])


def cerebral_edema(ctx: Ctx, key: str = EDEMA) -> None:
    c = hemispheric_point(ctx)
    extent = draw_diameter(ctx, 15, 70) / 2
    paint_edema(ctx, c, 3.0, extent, "")
    if not ctx.has(key):  # edema that found no white matter still marks its centre
        box = ctx.box(c, ctx.spacing)
        ctx.scale_props(box, np.ones(box.shape), {"t2": 1.8})
        ctx.add_mask(key, box, np.ones(box.shape, bool))
        ctx.record(key, ctx.location(c), 2 * extent)
    ctx.masses.append(Mass(key, c, extent * 0.7))


def encephalomalacia(ctx: Ctx, key: str = "structural_encephalomalacia") -> None:
    c = ctx.sample_point((Tissue.CORTICAL_GM,), lambda x, y, z: (z > -30))
    d = draw_diameter(ctx, 10, 60)
    box, r = ctx.blob(c, (d / 2,) * 3, 0.3)
    brain = np.isin(ctx.labels(box), BRAIN)
    core = (r < 0.75) & brain
    rim = (r >= 0.75) & (r < 1) & brain
    ctx.paint(box, core, PROPS["csf"], tissue=Tissue.CSF)
    ctx.paint(box, rim, PROPS["gliosis"])
    ctx.add_mask(key, box, core | rim)
    ctx.record(key, ctx.location(c), d, gliosis=True)


def _ovoid(ctx: Ctx, key: str, center, long_dir, length: float, ratio: float, factors: dict,
           enhancement: float = 0.0) -> None:
    a = long_dir / np.linalg.norm(long_dir)
    b = np.cross(a, [0.0, 0.0, 1.0] if abs(a[2]) < 0.9 else [1.0, 0.0, 0.0])
    b /= np.linalg.norm(b)
    axes = np.stack([a, b, np.cross(a, b)], axis=1)
    radii = (length / 2, length * ratio / 2, length * ratio / 2)
    box = ctx.box(center, length)
    r = ctx.ellipsoid_radius(box, center, radii, axes)
    m = (r < 1) & np.isin(ctx.labels(box), BRAIN)
    if not m.any():
        return
    ctx.scale_props(box, m, factors)
    if enhancement:
        ctx.paint(box, m & (r > 0.6), {"enhancement": enhancement})
    ctx.add_mask(key, box, m)


def multiple_sclerosis(ctx: Ctx, key: str = "inflammatory_multiple_sclerosis") -> None:
    n = int(ctx.rng.integers(3, 25))
    vent_idx = np.nonzero(ctx.phantom.labels == Tissue.VENTRICLE)
    vent = ctx.to_head(_grid_world(ctx, vent_idx))
    lateral = vent[:, vent[2] > 0]
    enhancing = 0
    for _ in range(n):
        where = ctx.rng.random()
        length = ctx.rng.uniform(3, 12)
        if where < 0.6 and lateral.shape[1]:  # periventricular, perpendicular to the ventricle (Dawson finger)
            v = lateral[:, int(ctx.rng.integers(lateral.shape[1]))]
            side_centre = np.array([np.sign(v[0]) * 12.0, v[1], 12.0])
            direction = (v - side_centre) * np.array([1.0, 0.15, 1.0])
            direction /= max(np.linalg.norm(direction), 1e-6)
            center = ctx.to_world(v + direction * (length / 2 + 1.5))
            long_dir = ctx.frame @ direction
        else:
            center = (ctx.sample_point((Tissue.BRAINSTEM, Tissue.CEREBELLUM)) if where > 0.85
                      else hemispheric_point(ctx, (Tissue.WM,)))
            long_dir = ctx.rng.normal(size=3)
        active = ctx.rng.random() < 0.15
        enhancing += active
        black_hole = ctx.rng.random() < 0.2
        _ovoid(ctx, key, center, long_dir, length, ctx.rng.uniform(0.4, 0.7),
               {"t2": ctx.rng.uniform(1.6, 2.6), "t1": 1.6 if black_hole else 1.15, "adc": 1.3, "pd": 1.08},
               enhancement=ctx.rng.uniform(0.3, 0.6) if active else 0.0)
    if not ctx.has(key):
        _ovoid(ctx, key, hemispheric_point(ctx, (Tissue.WM,)), np.ones(3), 8.0, 0.8, {"t2": 2.2, "adc": 1.3})
    ctx.record(key, "periventricular and juxtacortical white matter", 0.0, count=n, enhancing=int(enhancing))


def neurosarcoid(ctx: Ctx, key: str = "inflammatory_neurosarcoid") -> None:
    basal = ctx.rng.random() < 0.7
    if basal:
        c, radius, where = offset(ctx, "sella", (0, 6, 12)), ctx.rng.uniform(18, 30), "basal leptomeninges"
    else:
        c, _ = ctx.skull_point((ctx.rng.choice([-1, 1]) * 0.8, ctx.rng.uniform(-0.5, 0.5), 0.6))
        radius, where = ctx.rng.uniform(15, 30), f"{ctx.side(c)} convexity leptomeninges"
    box, r = ctx.blob(c, (radius,) * 3, 0.3, margin=1.1)
    labels = ctx.labels(box)
    surface = (labels == Tissue.CSF) & (distance_to(np.isin(labels, BRAIN), ctx.spacing) <= 2.5 * ctx.spacing)
    nodular = np.clip(0.6 + 0.5 * ctx.noise(box.shape, 3.0), 0.3, 1.0)
    m = surface & (r < 1)
    ctx.paint(box, m * nodular, {"enhancement": ctx.rng.uniform(0.5, 0.9), "t1": 1500.0})
    ctx.add_mask(key, box, m)
    if basal:  # thickened, enhancing infundibulum
        stalk = [offset(ctx, "sella", (0, 0, 2)), offset(ctx, "sella", (0, 2, 12))]
        vessel_tube(ctx, key, np.array(stalk), ctx.rng.uniform(2.0, 3.5),
                    {"enhancement": 0.8, "t1": 1000.0, "pd": 0.8, "t2": 90.0})
    ctx.record(key, where, 2 * radius, enhancement="leptomeningeal nodular")


def viral_encephalitis(ctx: Ctx, key: str = "infectious_viral_encephalitis") -> None:
    sides = [ctx.rng.choice([-1.0, 1.0])]
    if ctx.rng.random() < 0.35:
        sides.append(-sides[0])
    for i, sign in enumerate(sides):
        for h, radii in (((sign * 27, -12, -22), (10, 22, 10)), ((sign * 37, 2, 0), (7, 14, 12))):
            if i > 0 and h[1] > 0:
                continue
            c = ctx.to_world(h)
            box, r = ctx.blob(c, radii, 0.25)
            m = (r < 1) & np.isin(ctx.labels(box), (Tissue.CORTICAL_GM, Tissue.WM, Tissue.DEEP_GM))
            w = m * ctx.rng.uniform(0.6, 1.0) * (1 if i == 0 else 0.6)
            ctx.scale_props(box, w, {"t2": 2.1, "t1": 1.2, "adc": 0.75, "pd": 1.08})
            ctx.add_mask(key, box, m)
    side = "bilateral" if len(sides) == 2 else ("right" if sides[0] > 0 else "left")
    ctx.record(key, f"{side} mesial temporal lobe and insula", 45.0, laterality=side)


def chiari_malformation(ctx: Ctx, key: str = "structural_chiari_malformation") -> None:
    descent = draw_diameter(ctx, 5, 20)
    fm = ctx.to_head(ctx.landmark("foramen_magnum"))
    for sign in (-1.0, 1.0):
        c = ctx.to_world(fm + np.array([sign * 5.0, -7.0, -descent / 2 + 2]))
        box = ctx.box(c, descent / 2 + 8)
        r = ctx.ellipsoid_radius(box, c, (4.0, 5.0, descent / 2 + 3))
        m = (r < 1) & np.isin(ctx.labels(box), (Tissue.CSF, Tissue.CEREBELLUM))
        ctx.paint(box, m, PROPS["gm"], tissue=Tissue.CEREBELLUM)
        h = ctx.to_head(box.xyz)
        ctx.add_mask(key, box, m & (h[2] < fm[2] + 2))
    if not ctx.has(key):
        box = ctx.box(ctx.to_world(fm + np.array([0, -7.0, -3.0])), ctx.spacing)
        ctx.add_mask(key, box, np.ones(box.shape, bool))
    ctx.record(key, "cerebellar tonsils below the foramen magnum", descent, tonsillar_descent_mm=round(descent, 1))


def syrinx(ctx: Ctx, key: str = "spine_syrinx") -> None:
    fm = ctx.to_head(ctx.landmark("foramen_magnum"))
    box = ctx.box(ctx.to_world(fm + np.array([0, 0, -25.0])), 30.0)
    h = ctx.to_head(box.xyz)
    cord = (ctx.labels(box) == Tissue.BRAINSTEM) & (h[2] < fm[2] - 2)
    if not cord.any():
        cord = (ctx.labels(box) == Tissue.BRAINSTEM) & (h[2] < fm[2] + 5)
    ch = h[:, cord]
    # Cord centreline: x(z), y(z) fitted linearly; the cavity is a central canal dilatation.
    A = np.stack([ch[2], np.ones_like(ch[2])], axis=1)
    fx, fy = (np.linalg.lstsq(A, ch[i], rcond=None)[0] for i in (0, 1))
    radial = np.hypot(h[0] - (fx[0] * h[2] + fx[1]), h[1] - (fy[0] * h[2] + fy[1]))
    cord_radius = float(np.quantile(radial[cord], 0.9))
    top = fm[2] - ctx.rng.uniform(0, 6)
    length = draw_diameter(ctx, 8, 35)
    cavity = cord & (radial <= max(cord_radius * ctx.rng.uniform(0.4, 0.7), ctx.spacing * 0.8)) & \
        (h[2] <= top) & (h[2] >= top - length)
    if not cavity.any():
        cavity = cord & (radial <= radial[cord].min() + ctx.spacing)
    ctx.paint(box, cavity, PROPS["csf"])
    ctx.add_mask(key, box, cavity)
    ctx.record(key, "cervical spinal cord", length, width_mm=round(2 * cord_radius * 0.55, 1))


def cephalocele(ctx: Ctx, key: str = "structural_cephaloceles") -> None:
    site = str(ctx.rng.choice(["occipital", "frontal", "parietal"], p=[0.7, 0.15, 0.15]))
    direction = {"occipital": (0, -1.0, -0.15), "frontal": (0, 1.0, 0.1), "parietal": (0, -0.4, 1.0)}[site]
    p, d = ctx.skull_point(direction)
    defect_r = ctx.rng.uniform(4, 10)
    sac_r = draw_diameter(ctx, 8, 22)
    wall = 14.0
    box = ctx.box(p + d * (wall + sac_r) / 2, (wall + 2 * sac_r) / 2 + sac_r)
    rel = box.xyz - p.astype(np.float32)[:, None, None, None]
    along = np.tensordot(d.astype(np.float32), rel, axes=1)
    lateral = np.linalg.norm(rel - d.astype(np.float32)[:, None, None, None] * along, axis=0)
    labels = ctx.labels(box)
    extracranial = np.isin(labels, (Tissue.SKULL, Tissue.SCALP, Tissue.BACKGROUND))
    neck = extracranial & (lateral <= defect_r) & (along > -2) & (along <= wall)
    sac_center = p + d * (wall + sac_r * 0.7)
    sac_radius = np.linalg.norm(box.xyz - sac_center.astype(np.float32)[:, None, None, None], axis=0)
    sac = extracranial & (sac_radius <= sac_r) & (along > 0)
    contents = (neck & (lateral <= defect_r * 0.6)) | (sac & (sac_radius <= sac_r * 0.65))
    ctx.paint(box, neck | sac, PROPS["csf"], tissue=Tissue.CSF)
    ctx.paint(box, contents, PROPS["gm"], tissue=Tissue.CORTICAL_GM)
    ctx.add_mask(key, box, neck | sac)
    ctx.record(key, site, 2 * sac_r, contents="brain and meninges")


def dysgenesis_corpus_callosum(ctx: Ctx, key: str = "developmental_dysgenesis_corpus_callosum") -> None:
    genu = ctx.to_head(ctx.landmark("corpus_callosum_genu"))
    splenium = ctx.to_head(ctx.landmark("corpus_callosum_splenium"))
    complete = ctx.rng.random() < 0.6
    y_front = genu[1] + 8 if complete else ctx.rng.uniform(splenium[1] + 10, genu[1] - 10)
    c = ctx.to_world((genu + splenium) / 2 + np.array([0, 0, 6.0]))
    box = ctx.box(c, (genu[1] - splenium[1]) / 2 + 20)
    h = ctx.to_head(box.xyz)
    labels = ctx.labels(box)
    band = (np.abs(h[0]) < 7) & (h[1] <= y_front) & (h[1] >= splenium[1] - 10) & (h[2] > -2) & (h[2] < 32)
    missing = band & (labels == Tissue.WM)
    ctx.paint(box, missing, PROPS["csf"], tissue=Tissue.CSF)
    if not missing.any():
        missing = band & np.isin(labels, BRAIN)
    ctx.add_mask(key, box, missing)
    ctx.record(key, "corpus callosum", float(genu[1] - splenium[1]), extent="complete agenesis" if complete else
               "partial (posterior) agenesis")


def dandy_walker(ctx: Ctx, key: str = "developmental_dandy_walker_malformation") -> None:
    v4 = ctx.to_head(ctx.landmark("fourth_ventricle"))
    size = draw_diameter(ctx, 30, 60)
    c = ctx.to_world(v4 + np.array([0, -size * 0.3, -4]))
    box = ctx.box(c, size)
    r = ctx.ellipsoid_radius(box, c, (size * 0.4, size / 2, size * 0.45))
    h = ctx.to_head(box.xyz)
    cyst = (r < 1) & np.isin(ctx.labels(box), (Tissue.CEREBELLUM, Tissue.CSF, Tissue.VENTRICLE)) & (h[2] < v4[2] + 18)
    ctx.paint(box, cyst, PROPS["csf"], tissue=Tissue.VENTRICLE)
    ctx.add_mask(key, box, cyst)
    ctx.record(key, "posterior fossa", size, vermis="hypoplastic")


def heterotopia(ctx: Ctx, key: str = "developmental_heterotopia") -> None:
    idx = np.nonzero(ctx.phantom.labels == Tissue.VENTRICLE)
    world = _grid_world(ctx, idx)
    lateral = world[:, ctx.to_head(world)[2] > 2]
    n = int(ctx.rng.integers(1, 7))
    for _ in range(n):
        c = lateral[:, int(ctx.rng.integers(lateral.shape[1]))]
        rad = ctx.rng.uniform(3, 7)
        box = ctx.box(c, rad + 2)
        m = (ctx.ellipsoid_radius(box, c, (rad,) * 3) < 1) & np.isin(ctx.labels(box), (Tissue.VENTRICLE, Tissue.WM))
        ctx.paint(box, m, PROPS["gm"], tissue=Tissue.CORTICAL_GM)
        ctx.add_mask(key, box, m)
    ctx.record(key, "subependymal, along the lateral ventricles", 0.0, count=n, type="periventricular nodular")


def arachnoid_cyst(ctx: Ctx, key: str = "cyst_arachnoid_cyst") -> None:
    d = draw_diameter(ctx, 15, 60)
    if ctx.rng.random() < 0.75:
        sign = ctx.rng.choice([-1.0, 1.0])
        c = ctx.to_world((sign * 40, 14 + d * 0.1, -30))
        where = f"{'right' if sign > 0 else 'left'} middle cranial fossa"
    else:
        c = offset(ctx, "fourth_ventricle", (0, -35, -12))
        where = "retrocerebellar posterior fossa"
    box, r = ctx.blob(c, (d * 0.35, d / 2, d * 0.4), 0.05)
    m = (r < 1) & np.isin(ctx.labels(box), INTRACRANIAL)
    ctx.paint(box, m, PROPS["csf"], tissue=Tissue.CSF)
    ctx.add_mask(key, box, m)
    ctx.record(key, where, d)


def craniotomy(ctx: Ctx, key: str = "surgical_craniotomy") -> None:
    direction = ctx.hints.get("craniotomy_direction")
    if direction is None:
        direction = (ctx.rng.choice([-1, 1]) * ctx.rng.uniform(0.4, 1.0), ctx.rng.uniform(-0.6, 0.8),
                     ctx.rng.uniform(0.1, 0.8))
    p, d = ctx.skull_point(direction)
    radius = ctx.rng.uniform(18, 35)
    box = ctx.box(p, radius + 12)
    rel = box.xyz - p.astype(np.float32)[:, None, None, None]
    along = np.tensordot(d.astype(np.float32), rel, axes=1)
    lateral = np.linalg.norm(rel - d.astype(np.float32)[:, None, None, None] * along, axis=0)
    bone = ctx.labels(box) == Tissue.SKULL
    craniectomy = ctx.rng.random() < 0.25
    if craniectomy:
        defect = bone & (lateral <= radius)
    else:  # bone flap replaced: saw kerf and burr holes
        defect = bone & (np.abs(lateral - radius) <= 1.5)
        for angle in ctx.rng.uniform(0, 2 * np.pi, 3):
            hole = p + radius * (np.cos(angle) * _perp(d)[0] + np.sin(angle) * _perp(d)[1])
            defect |= bone & (np.linalg.norm(box.xyz - hole.astype(np.float32)[:, None, None, None], axis=0) <= 5)
    ctx.paint(box, defect, dict(pd=0.9, t1=1800.0, t2=250.0, t2star=80.0, adc=2.0, enhancement=0.1),
              tissue=Tissue.SCALP)
    dura = (ctx.labels(box) == Tissue.CSF) & (lateral <= radius) & (along > -4)
    ctx.paint(box, dura, {"enhancement": 0.35})  # post-operative dural enhancement
    if not defect.any():
        defect = bone & (lateral <= radius)
    ctx.add_mask(key, box, defect)
    ctx.record(key, ctx.location(p - d * 15), 2 * radius, type="craniectomy" if craniectomy else "craniotomy")


def _perp(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.cross(d, [0.0, 0.0, 1.0] if abs(d[2]) < 0.9 else [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    return a, np.cross(d, a)


def catheter(ctx: Ctx, key: str = "surgical_catheter") -> None:
    sign = float(ctx.rng.choice([-1.0, 1.0]))
    frontal = ctx.rng.random() < 0.7
    target_h = np.array([sign * 11, 10, 14]) if frontal else np.array([sign * 20, -35, 14])
    direction = (sign * 0.35, 0.3, 0.9) if frontal else (sign * 0.3, -0.8, 0.5)
    inner, d = ctx.skull_point(direction, start_head=target_h)
    outer = inner + d * 14.0
    tip = ctx.to_world(target_h)
    along_scalp = outer + ctx.head_dir((0, -0.7, -0.7)) * 25 + d * 3
    vessel_tube(ctx, key, np.array([along_scalp, outer, inner, tip]), ctx.rng.uniform(1.2, 1.8), PROPS["device"])
    side = "right" if sign > 0 else "left"
    ctx.record(key, f"{side} {'frontal' if frontal else 'parieto-occipital'} approach, tip in the {side} lateral "
               f"ventricle", 0.0)


def resection_cavity(ctx: Ctx, key: str = "surgical_resection_cavity") -> None:
    c = hemispheric_point(ctx, (Tissue.CORTICAL_GM,))
    d = draw_diameter(ctx, 15, 50)
    box, r = ctx.blob(c, (d / 2,) * 3, 0.2)
    brain = np.isin(ctx.labels(box), (*BRAIN, Tissue.CSF))
    cavity = (r < 0.8) & brain
    rim = (r >= 0.8) & (r < 1.0) & brain
    ctx.paint(box, cavity, PROPS["csf"] if ctx.rng.random() < 0.7 else PROPS["protein_cyst"], tissue=Tissue.CSF)
    ctx.paint(box, rim, PROPS["gliosis"])
    ctx.paint(box, rim * ctx.rng.uniform(0.1, 0.3), {"enhancement": 0.5})
    ctx.paint(box, rim & (ctx.noise(box.shape, 2.0) > 1.2), {"t2star": 10.0})  # blood products along the margin
    ctx.add_mask(key, box, cavity | rim)
    ctx.record(key, ctx.location(c), d)
    ctx.hints["craniotomy_direction"] = ctx.to_head(c) - np.array([0.0, -18.0, 15.0])


def intracranial_hypotension(ctx: Ctx, key: str = "ventricular_intracranial_hypotension") -> None:
    p = ctx.phantom
    skull = p.labels == Tissue.SKULL
    rim = ndimage.binary_dilation(skull, iterations=max(1, int(round(2.0 / ctx.spacing)))) & (p.labels == Tissue.CSF)
    p.enhancement[rim] = np.maximum(p.enhancement[rim], ctx.rng.uniform(0.45, 0.85))
    p.t2[rim] = np.minimum(p.t2[rim], 400.0)
    p.t1[rim] = np.minimum(p.t1[rim], 1500.0)
    sag = ctx.rng.uniform(2, 7)
    # Brain sag: the brainstem and cerebellum drop towards the foramen magnum.
    center = ctx.landmark("fourth_ventricle")
    down = -ctx.frame[:, 2].astype(np.float32)

    def displacement(xyz):
        dist = np.linalg.norm(xyz - center.astype(np.float32)[:, None, None, None], axis=0)
        return down[:, None, None, None] * (sag * np.exp(-(dist**2) / (2 * 30.0**2)))[None]

    warp_intracranial(ctx, displacement, center - 60, center + 60)
    p.lesion_masks[key] = p.lesion_masks.get(key, np.zeros(p.shape, bool)) | rim
    ctx.record(key, "diffuse pachymeninges", 0.0, brain_sag_mm=round(sag, 1))


# -- mass effect ------------------------------------------------------------------------------------

def _driver(ctx: Ctx) -> Mass:
    """The largest supratentorial mass; paints a region of edema when nothing else occupies space."""
    supra = [m for m in ctx.masses if ctx.to_head(m.center)[2] > -15]
    if not supra:
        cerebral_edema(ctx)
        supra = [ctx.masses[-1]]
    return max(supra, key=lambda m: m.radius_mm)


def apply_mass_effect(ctx: Ctx, keys: set[str]) -> None:
    """Mass effect, midline shift and herniation as one warp pushing away from the dominant mass."""
    mass = _driver(ctx)
    c = mass.center.astype(np.float32)
    ch = ctx.to_head(mass.center)
    sign = 1.0 if ch[0] >= 0 else -1.0
    R = max(mass.radius_mm, 8.0)
    sigma = R + 10
    push = min(2.0 + 0.15 * R, 8.0)
    shift = 0.0
    if "structural_midline_shift" in keys or "structural_brain_herniation" in keys:
        shift = draw_diameter(ctx, 3, 14) + (4 if "structural_brain_herniation" in keys else 0)
    uncal = 5.0 if "structural_brain_herniation" in keys else 0.0
    x_axis = ctx.frame[:, 0].astype(np.float32)
    uncus = ctx.to_world((sign * 24, -12, -28)).astype(np.float32)

    def displacement(xyz):
        rel = xyz - c[:, None, None, None]
        r = np.linalg.norm(rel, axis=0) + 1e-3
        g = np.where(r < R, r / R, np.exp(-((r - R) ** 2) / (2 * sigma**2)))
        d = push * rel / r * g
        if shift or uncal:
            h = ctx.to_head(xyz).astype(np.float32)
            lateral = shift * np.exp(-(h[0] ** 2) / (2 * 28.0**2)) * np.exp(-((h[1] - ch[1]) ** 2) / (2 * 45.0**2))
            lateral = lateral * smoothstep((h[2] + 20) / 15) * smoothstep((80 - h[2]) / 25)
            du = np.linalg.norm(xyz - uncus[:, None, None, None], axis=0)
            lateral = lateral + uncal * np.exp(-(du**2) / (2 * 9.0**2))
            d = d - sign * x_axis[:, None, None, None] * lateral[None]
        return d

    reach = R + 2.5 * sigma
    lo = np.minimum(mass.center - reach, ctx.to_world((-45, ch[1] - 90, -40)))
    hi = np.maximum(mass.center + reach, ctx.to_world((45, ch[1] + 90, 80)))
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    magnitude = warp_intracranial(ctx, displacement, lo, hi)
    p = ctx.phantom
    brain = np.isin(p.labels, BRAIN)
    side = "right" if sign > 0 else "left"
    other = "left" if sign > 0 else "right"
    if "structural_mass_effect" in keys:
        box = ctx.box(mass.center, R + 15)
        region = np.zeros(p.shape, bool)
        near_mass = ctx.ellipsoid_radius(box, mass.center, (R + 15,) * 3) < 1
        region[box.slices] = near_mass & (magnitude[box.slices] >= 1.0)
        region &= brain
        own = [m for k, m in p.lesion_masks.items() if k not in ("structural_mass_effect",)]
        for m in own:
            region &= ~m
        # Effaced sulci next to the mass: sulcal CSF replaced by swollen cortex.
        box = ctx.box(mass.center, R + 12)
        near = ctx.ellipsoid_radius(box, mass.center, (R + 12,) * 3) < 1
        effaced = near & (ctx.labels(box) == Tissue.CSF) & (distance_to(ctx.labels(box) == Tissue.SKULL, ctx.spacing)
                                                             > 2 * ctx.spacing)
        ctx.paint(box, effaced, PROPS["gm"], tissue=Tissue.CORTICAL_GM)
        region[box.slices] |= effaced
        if not region.any():
            region[box.slices] |= near & np.isin(ctx.labels(box), BRAIN)
        p.lesion_masks["structural_mass_effect"] = region
        ctx.record("structural_mass_effect", f"{side} cerebral hemisphere", 2 * R, sulcal_effacement=True)
    if shift:
        box = ctx.box(ctx.to_world((0, ch[1], 15)), 45)
        h = ctx.to_head(box.xyz)
        midline = (np.abs(h[0] + sign * shift * np.exp(-((h[1] - ch[1]) ** 2) / (2 * 45.0**2))) < 4) & \
            (h[2] > -5) & (h[2] < 45) & np.isin(ctx.labels(box), INTRACRANIAL)
        ctx.add_mask("structural_midline_shift", box, midline)
        ctx.record("structural_midline_shift", "septum pellucidum", shift, shift_mm=round(shift, 1),
                   direction=f"{other}ward")
    if uncal:
        target = ctx.to_world((sign * 16, -12, -28))
        box = ctx.box(target, 12)
        region = (ctx.ellipsoid_radius(box, target, (9, 9, 9)) < 1) & np.isin(ctx.labels(box), BRAIN)
        if not region.any():
            region = ctx.ellipsoid_radius(box, target, (9, 9, 9)) < 1
        ctx.add_mask("structural_brain_herniation", box, region)
        ctx.record("structural_brain_herniation", f"{side} uncal and subfalcine", shift,
                   types="subfalcine and uncal (transtentorial)")
