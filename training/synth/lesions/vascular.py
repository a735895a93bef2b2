"""Vascular and traumatic lesions: infarcts, haemorrhage in every compartment, malformations."""

from __future__ import annotations

import numpy as np

from training.synth.lesions.base import BLOOD, BRAIN, INTRACRANIAL, PROPS, Ctx, Mass, Tissue, distance_to
from training.synth.lesions.tumors import draw_diameter, hemispheric_point, offset, paint_edema, paint_mass

# Arterial territories as head-frame predicates for one hemisphere (|x| is the distance from midline).
TERRITORIES = {
    "middle cerebral artery": lambda ax, y, z: (ax > 22) & (z > -30) & (z < 62) & (y > -75) & (y < 50),
    "anterior cerebral artery": lambda ax, y, z: (ax < 20) & (y > -45) & (z > 5),
    "posterior cerebral artery": lambda ax, y, z: ((y < -62) & (z > -25)) | ((y < -25) & (z < -5) & (z > -30)),
}
TERRITORY_WEIGHTS = (0.65, 0.15, 0.2)


def blood_stage(ctx: Ctx) -> str:
    return str(ctx.rng.choice(list(BLOOD), p=[0.1, 0.4, 0.25, 0.15, 0.1]))


def large_vessel_stroke(ctx: Ctx, key: str = "vascular_ischemic_large_vessel_stroke") -> None:
    territory = str(ctx.rng.choice(list(TERRITORIES), p=TERRITORY_WEIGHTS))
    sign = float(ctx.rng.choice([-1.0, 1.0]))
    inside = TERRITORIES[territory]
    c = ctx.sample_point((Tissue.WM, Tissue.CORTICAL_GM),
                         lambda x, y, z: inside(np.abs(x), y, z) & (np.sign(x) == sign))
    extent = draw_diameter(ctx, 15, 80) / 2
    box, r = ctx.blob(c, (extent,) * 3, irregularity=0.3, margin=1.2)
    h = ctx.to_head(box.xyz)
    labels = ctx.labels(box)
    wedge = (r < 1) & inside(np.abs(h[0]), h[1], h[2]) & (np.sign(h[0]) == sign) & np.isin(
        labels, (Tissue.WM, Tissue.CORTICAL_GM, Tissue.DEEP_GM))
    if not wedge.any():
        wedge = (r < 1) & np.isin(labels, BRAIN)
    acute = ctx.rng.random() < 0.8
    if acute:  # cytotoxic edema: diffusion restricted, T2 rising over hours
        ctx.scale_props(box, wedge, {"adc": ctx.rng.uniform(0.4, 0.65), "t2": ctx.rng.uniform(1.05, 1.5), "pd": 1.05})
    else:  # subacute: T2 bright, pseudonormalising ADC, gyral enhancement
        ctx.scale_props(box, wedge, {"adc": 0.85, "t2": 1.8, "t1": 1.2, "enhancement": 0.3})
    ctx.add_mask(key, box, wedge)
    size = 2 * extent
    ctx.record(key, f"{ctx.side(c)} {territory} territory", size, phase="acute" if acute else "subacute")
    if size > 50:
        ctx.masses.append(Mass(key, c, extent * 0.6))
    if ctx.rng.random() < 0.1:  # haemorrhagic transformation: petechial T2* foci
        for _ in range(4):
            p = c + ctx.rng.normal(0, extent / 3, 3)
            b = ctx.box(p, 4)
            ctx.paint(b, ctx.ellipsoid_radius(b, p, (2, 2, 2)) < 1, {"t2star": 8.0})


def lacunar_stroke(ctx: Ctx, key: str = "vascular_ischemic_lacunar_stroke") -> None:
    if ctx.rng.random() < 0.2:
        c = offset(ctx, "fourth_ventricle", (ctx.rng.uniform(-5, 5), 16, ctx.rng.uniform(-8, 8)))
    elif ctx.rng.random() < 0.6:
        c = ctx.sample_point((Tissue.DEEP_GM,))
    else:
        c = hemispheric_point(ctx, (Tissue.WM,), deep=True)
    d = ctx.rng.uniform(3, 15)
    box, r = ctx.blob(c, (d / 2, d / 2, d / 1.6), 0.1)
    m = ctx.at_least_centre(box, r < 1, c)
    acute = ctx.rng.random() < 0.6
    if acute:
        ctx.scale_props(box, m, {"adc": ctx.rng.uniform(0.45, 0.7), "t2": 1.3})
    else:  # chronic lacune: CSF cavity with a gliotic rim
        ctx.paint(box, r < 0.7, PROPS["csf"])
        ctx.paint(box, m & (r >= 0.7), PROPS["gliosis"])
    ctx.add_mask(key, box, m)
    ctx.record(key, ctx.location(c), d, phase="acute" if acute else "chronic")


def small_vessel_disease(ctx: Ctx, key: str = "vascular_ischemic_small_vessel_disease") -> None:
    grade = int(ctx.rng.integers(1, 4))  # Fazekas
    vent = ctx.phantom.labels == Tissue.VENTRICLE
    margin = int(round(25.0 / ctx.spacing))  # deep white matter reaches ~25 mm beyond the ventricles
    sl = tuple(slice(max(0, int(a.min()) - margin), int(a.max()) + margin + 1) for a in np.nonzero(vent))
    middle = np.array([(s.start + s.stop) / 2 for s in sl])
    box = ctx.box(ctx.phantom.affine[:3, :3] @ middle + ctx.phantom.affine[:3, 3],
                  np.array([(s.stop - s.start) / 2 for s in sl]) * ctx.spacing)
    dist = distance_to(ctx.labels(box) == Tissue.VENTRICLE, ctx.spacing)
    wm = ctx.labels(box) == Tissue.WM
    reach = {1: 3.0, 2: 7.0, 3: 14.0}[grade]
    field = reach * (1 + 0.4 * ctx.noise(box.shape, 6.0)) - dist
    lesion = wm & (field > 0)
    # Punctate and confluent deep white matter foci.
    deep = wm & (ctx.noise(box.shape, 3.0) > {1: 2.2, 2: 1.8, 3: 1.3}[grade])
    lesion |= deep
    strength = ctx.rng.uniform(0.6, 1.0)
    ctx.scale_props(box, lesion * strength, {"t2": 1.9, "t1": 1.2, "adc": 1.25, "pd": 1.08})
    ctx.add_mask(key, box, lesion)
    ctx.record(key, "periventricular and deep white matter", 0.0, fazekas=grade)


def intracranial_hemorrhage(ctx: Ctx, key: str = "vascular_hemorrhagic_intracranial_hemorrhage") -> None:
    deep = ctx.rng.random() < 0.5
    c = ctx.sample_point((Tissue.DEEP_GM,)) if deep else hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
    d = draw_diameter(ctx, 6, 60)
    stage = blood_stage(ctx)
    paint_mass(ctx, key, c, d / 2, BLOOD[stage], pattern="none", irregularity=0.15, restrict=BRAIN,
               edema_mm=ctx.rng.uniform(3, 12) if stage != "chronic" else 0.0, record=False)
    box, r = ctx.blob(c, (d / 2,) * 3, 0.0)
    ctx.paint(box, (r > 0.85) & (r < 1.05) & np.isin(ctx.labels(box), BRAIN), {"t2star": 6.0})  # haemosiderin/deoxy rim
    ctx.record(key, ctx.location(c), d, stage=stage)


def intraventricular_hemorrhage(ctx: Ctx, key: str = "vascular_hemorrhagic_intraventricular_hemorrhage") -> None:
    vent = ctx.phantom.labels == Tissue.VENTRICLE
    idx = np.nonzero(vent)
    world = ctx.phantom.affine[:3, :3] @ np.stack(idx) + ctx.phantom.affine[:3, 3:4]
    y = ctx.to_head(world)[1]
    cast = ctx.rng.random() < 0.25
    # Supine patient: blood layers in the most dependent (posterior) parts, the occipital horns.
    level = np.quantile(y, 0.6 if cast else ctx.rng.uniform(0.03, 0.15))
    sel = y <= level
    mask = np.zeros(ctx.phantom.shape, bool)
    mask[tuple(i[sel] for i in idx)] = True
    stage = str(ctx.rng.choice(["acute", "early subacute", "hyperacute"]))
    for name, value in BLOOD[stage].items():
        getattr(ctx.phantom, name)[mask] = value
    ctx.phantom.lesion_masks[key] = ctx.phantom.lesion_masks.get(key, np.zeros_like(mask)) | mask
    ctx.record(key, "lateral ventricles" if not cast else "ventricular system", 0.0,
               pattern="cast" if cast else "layering in the occipital horns", stage=stage)


def subarachnoid_hemorrhage(ctx: Ctx, key: str = "vascular_hemorrhagic_subarachnoid_hemorrahage") -> None:
    basal = ctx.rng.random() < 0.5
    if basal:
        c = offset(ctx, "sella", (0, 8, 10))
        radius = ctx.rng.uniform(20, 35)
        where = "basal cisterns and sylvian fissures"
    else:
        c, _ = ctx.skull_point((ctx.rng.choice([-1, 1]) * ctx.rng.uniform(0.5, 1), ctx.rng.uniform(-0.5, 0.7), 0.6))
        radius = ctx.rng.uniform(15, 35)
        where = f"{ctx.side(c)} cerebral convexity sulci"
    box, r = ctx.blob(c, (radius,) * 3, 0.3, margin=1.1)
    labels = ctx.labels(box)
    csf = (labels == Tissue.CSF) & (r < 1)
    near_brain = distance_to(np.isin(labels, BRAIN), ctx.spacing) <= 2.5 * ctx.spacing
    blood = csf & near_brain
    # Blood in CSF shortens T1 (no nulling on FLAIR) and T2*.
    ctx.paint(box, blood, {"t1": ctx.rng.uniform(1200, 2200), "t2": 300.0, "t2star": 20.0, "pd": 0.95})
    ctx.add_mask(key, box, blood)
    ctx.record(key, where, 0.0)


def subdural_hematoma(ctx: Ctx, key: str = "trauma_subdural_hematoma") -> None:
    sign = float(ctx.rng.choice([-1.0, 1.0]))
    base, normal = ctx.skull_point((sign, ctx.rng.uniform(-0.5, 0.5), ctx.rng.uniform(0.0, 0.6)))
    thickness = draw_diameter(ctx, 3, 25)
    span = ctx.rng.uniform(45, 80)
    box = ctx.box(base, span)
    labels = ctx.labels(box)
    dist_skull = distance_to(labels == Tissue.SKULL, ctx.spacing)
    along = np.linalg.norm(box.xyz - base.astype(np.float32)[:, None, None, None], axis=0)
    local = thickness * np.clip(1 - (along / span) ** 2, 0, 1)
    h = ctx.to_head(box.xyz)
    same_side = np.sign(h[0]) == sign
    crescent = np.isin(labels, INTRACRANIAL) & (dist_skull <= local + ctx.spacing * 0.5) & same_side & (h[2] > -20)
    stage = blood_stage(ctx)
    ctx.paint(box, crescent, BLOOD[stage], tissue=Tissue.CSF)
    ctx.add_mask(key, box, crescent)
    ctx.record(key, f"{ctx.side(base)} cerebral convexity", thickness, stage=stage)
    if thickness > 8:
        ctx.masses.append(Mass(key, base - normal * thickness, thickness * 1.5))


def contusion(ctx: Ctx, key: str = "trauma_brain_contusion") -> None:
    sign = float(ctx.rng.choice([-1.0, 1.0]))
    poles = {"frontal": (sign * 20, 45, -15), "temporal": (sign * 45, 5, -30)}
    n = int(ctx.rng.integers(1, 4))
    sizes = []
    for i in range(n):
        pole = str(ctx.rng.choice(list(poles)))
        target = np.array(poles[pole]) + ctx.rng.normal(0, 6, 3)
        c = ctx.sample_point((Tissue.CORTICAL_GM,), lambda x, y, z, t=target: np.linalg.norm(
            np.stack([x - t[0], y - t[1], z - t[2]]), axis=0) < 18)
        d = draw_diameter(ctx, 5, 30)
        sizes.append(d)
        paint_mass(ctx, key, c, d / 2, BLOOD[str(ctx.rng.choice(["acute", "early subacute"]))], pattern="none",
                   irregularity=0.35, restrict=BRAIN, record=False, mass=False)
        paint_edema(ctx, c, d / 2, d * 0.5, key)
        if i == 0:
            location = f"{ctx.side(c)} {pole} lobe"
    ctx.record(key, location, max(sizes), count=n)


def diffuse_axonal_injury(ctx: Ctx, key: str = "trauma_diffuse_axonal_injury") -> None:
    n = int(ctx.rng.integers(3, 20))
    for i in range(n):
        where = ctx.rng.random()
        if where < 0.2:
            c = offset(ctx, "corpus_callosum_splenium", ctx.rng.normal(0, 3, 3))
        elif where < 0.3:
            c = offset(ctx, "fourth_ventricle", (ctx.rng.uniform(-6, 6), 8, 18))
        else:  # grey-white junction
            c = hemispheric_point(ctx, (Tissue.WM,))
        d = ctx.rng.uniform(1.5, 5)
        box = ctx.box(c, d)
        m = ctx.ellipsoid_radius(box, c, (d / 2,) * 3) < 1
        if not m.any():
            m[tuple(np.array(m.shape) // 2)] = True
        ctx.paint(box, m, {"t2star": ctx.rng.uniform(3, 10), "t2": 70.0})
        ctx.add_mask(key, box, m)
    ctx.record(key, "grey-white junction and corpus callosum", 0.0, count=n)


def cavernoma(ctx: Ctx, key: str = "vascular_malformation_cavernoma") -> None:
    n = 1 if ctx.rng.random() < 0.85 else int(ctx.rng.integers(2, 6))
    sizes = []
    for i in range(n):
        anywhere = ctx.rng.random() < 0.25
        c = ctx.sample_point(BRAIN) if anywhere else hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
        d = draw_diameter(ctx, 3, 30)
        sizes.append(d)
        box, r = ctx.blob(c, (d / 2,) * 3, 0.25)
        m = r < 1
        # "Popcorn": mixed-age blood locules inside a haemosiderin rim that blooms on T2*.
        locules = ctx.noise(box.shape, max(d / 6, 1.5))
        ctx.paint(box, m & (locules > 0), BLOOD["late subacute"])
        ctx.paint(box, m & (locules <= 0), BLOOD["early subacute"])
        ctx.paint(box, (r > 0.75) & m, {"t2": 35.0, "t2star": 3.0})
        ctx.add_mask(key, box, m)
        if i == 0:
            location = ctx.location(c)
    ctx.record(key, location if n == 1 else "multiple, both hemispheres", max(sizes), count=n)


def vessel_tube(ctx: Ctx, key: str, points: np.ndarray, radius: float, props: dict, restrict=None) -> None:
    """Paint a tube through consecutive world points (a vessel or a catheter), within ``restrict`` tissues."""
    for a, b in zip(points[:-1], points[1:]):
        box = ctx.box((a + b) / 2, np.linalg.norm(b - a) / 2 + radius + ctx.spacing)
        ab = (b - a).astype(np.float32)
        rel = box.xyz - a.astype(np.float32)[:, None, None, None]
        t = np.clip(np.tensordot(ab, rel, axes=1) / max(float(ab @ ab), 1e-6), 0, 1)
        dist = np.linalg.norm(rel - ab[:, None, None, None] * t, axis=0)
        m = dist <= max(radius, ctx.spacing * 0.6)
        if restrict is not None:
            m &= np.isin(ctx.labels(box), restrict)
        ctx.paint(box, m, props)
        ctx.add_mask(key, box, m)


def arteriovenous_malformation(ctx: Ctx, key: str = "vascular_malformation_arteriovenous_malformation") -> None:
    c = hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
    d = draw_diameter(ctx, 12, 55)
    # Nidus: a tangle of serpiginous flow voids.
    for _ in range(int(8 + d / 2)):
        p0 = c + ctx.rng.normal(0, d / 4, 3)
        steps = np.cumsum(ctx.rng.normal(0, 3.0, (4, 3)), axis=0)
        vessel_tube(ctx, key, np.vstack([p0, p0 + steps]), ctx.rng.uniform(0.8, 1.8), PROPS["flow_void"], BRAIN)
    # Draining vein to the nearest convexity.
    out = ctx.to_head(c)
    surface, _ = ctx.skull_point(out - np.array([0, -18.0, 15.0]))
    path = np.linspace(c, surface, 6) + np.vstack([np.zeros(3), ctx.rng.normal(0, 3, (4, 3)), np.zeros(3)])
    vessel_tube(ctx, key, path, ctx.rng.uniform(2.0, 3.5), PROPS["flow_void"], INTRACRANIAL)
    ctx.record(key, ctx.location(c), d, draining_vein="cortical")


ANEURYSM_SITES = {
    "anterior communicating artery": (0, 12, -14), "left posterior communicating artery": (-14, -2, -22),
    "right posterior communicating artery": (14, -2, -22), "left middle cerebral artery bifurcation": (-40, 8, -14),
    "right middle cerebral artery bifurcation": (40, 8, -14), "basilar tip": (0, -16, -24),
}


def cerebral_aneurysm(ctx: Ctx, key: str = "vascular_malformation_cerebral_aneurysm") -> None:
    site = str(ctx.rng.choice(list(ANEURYSM_SITES), p=[0.3, 0.12, 0.12, 0.15, 0.15, 0.16]))
    d = draw_diameter(ctx, 3, 25)
    c = ctx.to_world(ANEURYSM_SITES[site])
    box = ctx.box(c, d)
    r = ctx.ellipsoid_radius(box, c, (d / 2,) * 3)
    m = r < 1
    if not m.any():
        m[tuple(np.array(m.shape) // 2)] = True
    ctx.paint(box, m, PROPS["flow_void"], tissue=Tissue.VESSEL)
    if d > 15:  # giant aneurysm: laminated thrombus in the periphery
        ctx.paint(box, m & (r > 0.6), BLOOD["late subacute"])
    ctx.add_mask(key, box, m)
    ctx.record(key, site, d)


def moyamoya(ctx: Ctx, key: str = "vascular_ischemic_moyamoya") -> None:
    # Basal collaterals: "puff of smoke" flow voids in both basal ganglia/thalami.
    for sign in (-1.0, 1.0):
        for _ in range(int(ctx.rng.integers(10, 25))):
            h = np.array([sign * ctx.rng.uniform(8, 28), ctx.rng.uniform(-20, 15), ctx.rng.uniform(-12, 10)])
            p = ctx.to_world(h)
            box = ctx.box(p, 2.5)
            m = ctx.ellipsoid_radius(box, p, (1.7, 1.7, 1.7)) < 1
            if not m.any():
                m[tuple(np.array(m.shape) // 2)] = True
            ctx.paint(box, m, PROPS["flow_void"])
            ctx.add_mask(key, box, m)
    # Chronic deep watershed infarcts (centrum semiovale).
    for _ in range(int(ctx.rng.integers(0, 4))):
        sign = ctx.rng.choice([-1.0, 1.0])
        p = ctx.to_world((sign * ctx.rng.uniform(20, 30), ctx.rng.uniform(-30, 20), ctx.rng.uniform(20, 35)))
        box, r = ctx.blob(p, (ctx.rng.uniform(3, 7),) * 3, 0.2)
        m = (r < 1) & np.isin(ctx.labels(box), BRAIN)
        ctx.paint(box, m, PROPS["gliosis"])
        ctx.add_mask(key, box, m)
    ctx.record(key, "bilateral basal ganglia", 0.0, collaterals=True)
