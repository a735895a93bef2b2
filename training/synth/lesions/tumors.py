"""Masses: intra- and extra-axial tumours, sellar and ventricular lesions, abscess.

Each painter places one diagnosis (and the vasogenic edema it brings) in a ``Ctx`` and records it.
Offsets from landmarks are in head-frame mm (x right, y anterior, z superior).
"""

from __future__ import annotations

import numpy as np

from training.synth.lesions.base import BRAIN, INTRACRANIAL, PROPS, Ctx, Mass, Tissue, distance_to

EDEMA = "structural_edema"


def draw_diameter(ctx: Ctx, lo: float, hi: float) -> float:
    """Diameter (mm) skewed towards the small end so subtle lesions are common."""
    return float(lo + (hi - lo) * ctx.rng.beta(1.3, 2.0))


def offset(ctx: Ctx, landmark: str, head_offset) -> np.ndarray:
    """A world point ``head_offset`` mm (head frame) away from a landmark."""
    return ctx.landmark(landmark) + ctx.scale * ctx.frame @ np.asarray(head_offset, float)


def hemispheric_point(ctx: Ctx, tissues=(Tissue.WM,), deep: bool = False) -> np.ndarray:
    """A point in the cerebral hemispheres (deep: periventricular/central)."""
    if deep:
        return ctx.sample_point(tissues, lambda x, y, z: (np.abs(x) < 28) & (z > -5) & (z < 32) & (y > -45) & (y < 30))
    return ctx.sample_point(tissues, lambda x, y, z: (z > -25) & (y > -85) & (y < 55) & (np.abs(x) > 12) & (z < 60))


def paint_edema(ctx: Ctx, center, radius: float, extent_mm: float, source: str) -> None:
    """Finger-like vasogenic edema around a lesion: white matter long-T2, cortex spared."""
    if extent_mm <= 0:
        return
    box, r = ctx.blob(center, (radius + extent_mm,) * 3, irregularity=0.25, margin=1.2)
    labels = ctx.labels(box)
    inner = ctx.ellipsoid_radius(box, center, (radius,) * 3)
    weight = np.clip((1.0 - r) / 0.15, 0, 1) * (inner >= 0.9)
    weight = weight * np.where(labels == Tissue.WM, 1.0, np.where(np.isin(labels, (Tissue.DEEP_GM, Tissue.BRAINSTEM,
                                                                                    Tissue.CEREBELLUM)), 0.7, 0.15))
    strength = ctx.rng.uniform(0.6, 1.0)
    ctx.scale_props(box, weight * strength, {"t2": 2.0, "t1": 1.3, "pd": 1.12, "t2star": 1.6, "adc": 1.5})
    mask = weight > 0.5
    if mask.any():
        ctx.add_mask(EDEMA, box, mask)
        ctx.record(EDEMA, ctx.location(center), 2 * (radius + extent_mm), cause=source, type="vasogenic")


def paint_mass(ctx: Ctx, key: str, center, radius: float, core: dict, *, pattern: str = "solid",
               enhancement: float = 0.7, rim: float = 0.3, irregularity: float = 0.2, elongation=(1.0, 1.0, 1.0),
               edema_mm: float = 0.0, restrict=INTRACRANIAL, record: bool = True, mass: bool = True) -> np.ndarray:
    """Paint a mass, add it to ``key``'s mask, register it for mass effect; returns its box mask.

    pattern: "solid" (homogeneous), "ring" (necrotic/cystic core + enhancing rim), "heterogeneous",
    "none" (no enhancement).
    """
    radii = tuple(radius * e for e in elongation)
    box, r = ctx.blob(center, radii, irregularity, margin=1.4)
    allowed = np.isin(ctx.labels(box), restrict)
    lesion = ctx.at_least_centre(box, (r < 1.0) & allowed, center)
    soft = np.clip((1.08 - r) / 0.16, 0, 1) * allowed
    ctx.paint(box, np.maximum(soft, lesion), core)
    if pattern == "ring":
        inner = r < 1.0 - rim
        ctx.paint(box, inner & lesion, PROPS["necrosis"] if core is not PROPS["pus"] else PROPS["pus"])
        ctx.paint(box, lesion & ~inner, {"enhancement": enhancement})
    elif pattern == "solid":
        ctx.paint(box, lesion * (0.85 + 0.15 * ctx.noise(box.shape, 3.0).clip(-1, 1)), {"enhancement": enhancement})
    elif pattern == "heterogeneous":
        patchy = np.clip(0.5 + 0.6 * ctx.noise(box.shape, max(radius / 3, 2.0)), 0.1, 1.0)
        ctx.paint(box, lesion * patchy, {"enhancement": enhancement})
    ctx.add_mask(key, box, lesion)
    if record:
        ctx.record(key, ctx.location(center), 2 * max(radii), enhancement=pattern)
    if mass:
        ctx.masses.append(Mass(key, np.asarray(center, float), float(max(radii))))
    paint_edema(ctx, center, max(radii), edema_mm, key)
    return lesion


def speckles(ctx: Ctx, key: str, center, radius: float, n: int, props: dict, size_mm: float = 1.5) -> None:
    """Small foci (calcification, blood) scattered inside a ball, added to ``key``'s mask."""
    for _ in range(n):
        p = np.asarray(center) + ctx.rng.normal(0, radius / 2, 3)
        box = ctx.box(p, size_mm * 2)
        m = ctx.ellipsoid_radius(box, p, (size_mm,) * 3) < 1
        ctx.paint(box, m, props)
        ctx.add_mask(key, box, m)


def tumor_props(ctx: Ctx, **override) -> dict:
    props = dict(PROPS["tumor"])
    props["t2"] *= ctx.rng.uniform(0.85, 1.3)
    props.update(override)
    return props


def high_grade_glioma(ctx: Ctx, key: str = "tumor_adult_high_grade_glioma") -> None:
    c = hemispheric_point(ctx)
    d = draw_diameter(ctx, 20, 65)
    paint_mass(ctx, key, c, d / 2, tumor_props(ctx), pattern="ring", enhancement=ctx.rng.uniform(0.35, 0.9),
               rim=ctx.rng.uniform(0.2, 0.45), irregularity=0.3, elongation=ctx.rng.uniform(0.75, 1.0, 3),
               edema_mm=ctx.rng.uniform(6, 25))


def low_grade_glioma(ctx: Ctx, key: str = "tumor_adult_low_grade_glioma") -> None:
    c = hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
    d = draw_diameter(ctx, 15, 60)
    props = dict(pd=0.9, t1=ctx.rng.uniform(1400, 1800), t2=ctx.rng.uniform(150, 240), t2star=110.0, adc=1.3)
    pattern = "heterogeneous" if ctx.rng.random() < 0.15 else "none"
    paint_mass(ctx, key, c, d / 2, props, pattern=pattern, enhancement=0.15, irregularity=0.15,
               restrict=BRAIN)


def glioma(ctx: Ctx, key: str = "tumor_adult_glioma") -> None:
    c = hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
    d = draw_diameter(ctx, 15, 55)
    paint_mass(ctx, key, c, d / 2, tumor_props(ctx, t2=ctx.rng.uniform(140, 220), adc=1.1), pattern="heterogeneous",
               enhancement=ctx.rng.uniform(0.15, 0.5), irregularity=0.25, edema_mm=ctx.rng.uniform(0, 10),
               restrict=BRAIN)


def metastasis(ctx: Ctx, key: str = "tumor_adult_brain_metastasis") -> None:
    n = 1 if ctx.rng.random() < 0.4 else int(ctx.rng.integers(2, 9))
    biggest, first = 0.0, None
    for _ in range(n):
        if ctx.rng.random() < 0.2:
            c = ctx.sample_point((Tissue.CEREBELLUM,))
        else:
            c = hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
        d = draw_diameter(ctx, 4, 30)
        pattern = "ring" if d > 12 else "solid"
        paint_mass(ctx, key, c, d / 2, tumor_props(ctx), pattern=pattern, enhancement=ctx.rng.uniform(0.4, 0.9),
                   rim=0.35, irregularity=0.1, edema_mm=d * ctx.rng.uniform(0.3, 1.5), restrict=BRAIN, record=False)
        if d > biggest:
            biggest, first = d, c
    location = ctx.location(first) if n == 1 else "both cerebral hemispheres"
    ctx.record(key, location, biggest, count=n)


def lymphoma(ctx: Ctx, key: str = "tumor_adult_lymphoma") -> None:
    n = 1 if ctx.rng.random() < 0.75 else int(ctx.rng.integers(2, 4))
    props = tumor_props(ctx, t2=ctx.rng.uniform(75, 100), adc=ctx.rng.uniform(0.45, 0.65), t1=1300.0)
    sizes, centers = [], []
    for _ in range(n):
        centers.append(hemispheric_point(ctx, (Tissue.WM, Tissue.DEEP_GM), deep=True))
        sizes.append(draw_diameter(ctx, 12, 45))
        paint_mass(ctx, key, centers[-1], sizes[-1] / 2, props, pattern="solid", enhancement=ctx.rng.uniform(0.6, 0.95),
                   irregularity=0.12, edema_mm=ctx.rng.uniform(4, 12), restrict=BRAIN, record=False)
    location = ctx.location(centers[0]) if n == 1 else "periventricular white matter"
    ctx.record(key, location, max(sizes), count=n, enhancement="homogeneous")


def meningioma(ctx: Ctx, key: str = "tumor_adult_meningioma") -> None:
    site = ctx.rng.choice(["convexity", "parasagittal", "sphenoid wing", "falx"], p=[0.45, 0.25, 0.15, 0.15])
    sx = ctx.rng.choice([-1.0, 1.0])
    if site == "convexity":
        direction, start = (sx * ctx.rng.uniform(0.5, 1.0), ctx.rng.uniform(-0.6, 0.8), ctx.rng.uniform(0.0, 0.8)), None
    elif site == "parasagittal":
        direction, start = (sx * 0.15, ctx.rng.uniform(-0.5, 0.6), 1.0), None
    elif site == "sphenoid wing":
        direction, start = (sx * 0.9, 0.45, -0.1), (0.0, 10.0, -15.0)
    else:
        direction, start = (sx, 0.0, 0.0), (0.0, ctx.rng.uniform(-40, 30), 30.0)
    d = draw_diameter(ctx, 8, 55)
    r = d / 2
    if site == "falx":  # falcine: the dural base is the midline, the mass grows laterally
        base = ctx.to_world(start)
        normal = -ctx.head_dir(direction)
    else:
        base, normal = ctx.skull_point(direction, start if start is not None else (0.0, -18.0, 15.0))
    center = base - normal * r * 0.55
    props = dict(pd=0.82, t1=1250.0, t2=ctx.rng.uniform(80, 140), t2star=60.0, adc=0.8)
    paint_mass(ctx, key, center, r, props, pattern="solid", enhancement=ctx.rng.uniform(0.6, 1.0), irregularity=0.06,
               edema_mm=ctx.rng.uniform(5, 20) if r > 12 and ctx.rng.random() < 0.5 else 0.0, record=False)
    # Dural tail: enhancing dura tapering away from the base.
    box = ctx.box(base, r + 18)
    labels = ctx.labels(box)
    near_dura = distance_to(np.isin(labels, (Tissue.SKULL,)), ctx.spacing) <= 2.0 * ctx.spacing
    dist = np.linalg.norm(box.xyz - base.astype(np.float32)[:, None, None, None], axis=0)
    tail = near_dura & np.isin(labels, INTRACRANIAL) & (dist > r * 0.7) & (dist < r + ctx.rng.uniform(8, 18))
    ctx.paint(box, tail, {"enhancement": 0.5})
    ctx.add_mask(key, box, tail)
    ctx.record(key, f"{ctx.side(center)} {site}" if site != "falx" else "falx", d, enhancement="homogeneous",
               dural_tail=True)


def pineal_tumor(ctx: Ctx, key: str = "tumor_adult_pineal_tumor") -> None:
    d = draw_diameter(ctx, 10, 38)
    c = offset(ctx, "pineal", (0, -d / 4, 0))
    paint_mass(ctx, key, c, d / 2, tumor_props(ctx), pattern="heterogeneous", enhancement=ctx.rng.uniform(0.4, 0.8),
               irregularity=0.12)
    speckles(ctx, key, c, d / 4, int(ctx.rng.integers(0, 4)), PROPS["calcification"])
    ctx.phantom.findings[-1].location = "pineal region"


def schwannoma(ctx: Ctx, key: str = "tumor_adult_schwannoma") -> None:
    side = ctx.rng.choice(["left", "right"])
    iac = ctx.landmark(f"iac_{side}")
    sign = 1.0 if side == "right" else -1.0
    d = draw_diameter(ctx, 4, 35)
    canal = iac + ctx.scale * ctx.frame @ np.array([sign * 4.0, 0, 0])
    paint_mass(ctx, key, canal, min(d / 2, 3.0), tumor_props(ctx), pattern="solid", enhancement=0.85,
               elongation=(2.0, 0.8, 0.8), irregularity=0.05, restrict=tuple(Tissue), record=False, mass=False)
    if d > 8:  # cisternal component: the "ice cream" on the intracanalicular "cone"
        c = iac + ctx.scale * ctx.frame @ np.array([-sign * d * 0.45, 0, 0])
        pattern = "ring" if d > 25 and ctx.rng.random() < 0.4 else "solid"
        paint_mass(ctx, key, c, d / 2, tumor_props(ctx), pattern=pattern, enhancement=ctx.rng.uniform(0.6, 0.95),
                   irregularity=0.08, record=False)
    ctx.record(key, f"{side} cerebellopontine angle", d, enhancement="avid", intracanalicular=d <= 8)


def brainstem_glioma(ctx: Ctx, key: str = "tumor_pediatric_brainstem_glioma") -> None:
    d = draw_diameter(ctx, 15, 40)
    c = offset(ctx, "fourth_ventricle", (ctx.rng.uniform(-3, 3), 16, -3))
    props = dict(pd=0.9, t1=1700.0, t2=ctx.rng.uniform(170, 240), t2star=110.0, adc=1.4)
    paint_mass(ctx, key, c, d / 2, props, pattern="heterogeneous" if ctx.rng.random() < 0.25 else "none",
               enhancement=0.25, irregularity=0.1, restrict=(Tissue.BRAINSTEM,), record=False)
    ctx.record(key, "pons", d, expansile=True)


def ependymoma(ctx: Ctx, key: str = "tumor_pediatric_ependymoma") -> None:
    d = draw_diameter(ctx, 18, 45)
    c = offset(ctx, "fourth_ventricle", (0, 0, -d * 0.15))
    paint_mass(ctx, key, c, d / 2, tumor_props(ctx), pattern="heterogeneous", enhancement=ctx.rng.uniform(0.3, 0.7),
               elongation=(0.8, 0.9, 1.4), irregularity=0.2, record=False)
    speckles(ctx, key, c, d / 3, int(ctx.rng.integers(1, 5)), PROPS["calcification"])
    ctx.record(key, "fourth ventricle", d, extension="foramen magnum" if d > 30 else "")


def germ_cell_tumor(ctx: Ctx, key: str = "tumor_pediatric_germ_cell_tumor") -> None:
    sites = {"pineal": ["pineal"], "suprasellar": ["sella"], "bifocal": ["pineal", "sella"]}
    site = ctx.rng.choice(list(sites), p=[0.5, 0.3, 0.2])
    d = draw_diameter(ctx, 8, 35)
    for lm in sites[site]:
        c = offset(ctx, lm, (0, -d / 4, 0) if lm == "pineal" else (0, 2, 8 + d / 4))
        paint_mass(ctx, key, c, d / 2, tumor_props(ctx, adc=0.6, t2=95.0), pattern="solid",
                   enhancement=ctx.rng.uniform(0.6, 0.9), irregularity=0.1, record=False)
    ctx.record(key, {"pineal": "pineal region", "suprasellar": "suprasellar cistern",
                     "bifocal": "pineal and suprasellar regions"}[site], d)


def medulloblastoma(ctx: Ctx, key: str = "tumor_pediatric_medulloblastoma") -> None:
    d = draw_diameter(ctx, 20, 50)
    c = offset(ctx, "fourth_ventricle", (0, -6, 2))
    paint_mass(ctx, key, c, d / 2, tumor_props(ctx, adc=ctx.rng.uniform(0.45, 0.65), t2=105.0),
               pattern="heterogeneous", enhancement=ctx.rng.uniform(0.3, 0.8), irregularity=0.15, record=False)
    ctx.record(key, "cerebellar vermis and fourth ventricle", d, diffusion="restricted")


def pilocytic_astrocytoma(ctx: Ctx, key: str = "tumor_pediatric_pilocytic_astrocytoma") -> None:
    c = ctx.sample_point((Tissue.CEREBELLUM,), lambda x, y, z: np.abs(x) > 10)
    d = draw_diameter(ctx, 20, 50)
    cyst = dict(PROPS["protein_cyst"], t1=ctx.rng.uniform(1800, 3000))
    paint_mass(ctx, key, c, d / 2, cyst, pattern="none", irregularity=0.05, record=False)
    direction = ctx.rng.normal(size=3)
    nodule = c + direction / np.linalg.norm(direction) * d * 0.4
    nd = ctx.rng.uniform(6, 18)
    paint_mass(ctx, key, nodule, nd / 2, tumor_props(ctx), pattern="solid", enhancement=ctx.rng.uniform(0.6, 0.95),
               irregularity=0.1, record=False, mass=False)
    ctx.record(key, ctx.location(c), d, enhancement="mural nodule", cystic=True)


def abscess(ctx: Ctx, key: str = "infectious_brain_abscess") -> None:
    c = hemispheric_point(ctx, (Tissue.WM, Tissue.CORTICAL_GM))
    d = draw_diameter(ctx, 10, 45)
    paint_mass(ctx, key, c, d / 2, dict(PROPS["gliosis"], t2=60.0, t2star=25.0), pattern="ring",
               enhancement=ctx.rng.uniform(0.5, 0.9), rim=ctx.rng.uniform(0.12, 0.22), irregularity=0.05,
               edema_mm=ctx.rng.uniform(8, 25), record=False)
    box, r = ctx.blob(c, (d / 2,) * 3, 0.0)
    core = (r < 0.8) & np.isin(ctx.labels(box), INTRACRANIAL)
    ctx.paint(box, core, PROPS["pus"])
    ctx.record(key, ctx.location(c), d, enhancement="smooth ring", diffusion="restricted")


# -- sellar and ventricular -------------------------------------------------------------------------


def pituitary_adenoma(ctx: Ctx, key: str = "sellar_pituitary_adenoma") -> None:
    if ctx.rng.random() < 0.4:
        d = ctx.rng.uniform(3, 9)
        c = offset(ctx, "sella", ctx.rng.uniform(-2, 2, 3))
        paint_mass(ctx, key, c, d / 2, tumor_props(ctx, t2=ctx.rng.uniform(90, 130)), pattern="solid",
                   enhancement=ctx.rng.uniform(0.1, 0.3), irregularity=0.05, mass=False, record=False)
        ctx.record(key, "sella turcica", d, kind="microadenoma", enhancement="hypoenhancing")
        return
    d = draw_diameter(ctx, 10, 38)
    enh = ctx.rng.uniform(0.3, 0.55)
    for lift, scale in ((0.0, 0.7), (d * 0.45, 1.0)):  # intrasellar waist + suprasellar lobe: "snowman"
        paint_mass(ctx, key, offset(ctx, "sella", (0, 0, lift)), d / 2 * scale, tumor_props(ctx),
                   pattern="heterogeneous", enhancement=enh, irregularity=0.08, record=False)
    ctx.record(key, "sella turcica with suprasellar extension", d, kind="macroadenoma")


def craniopharyngioma(ctx: Ctx, key: str = "sellar_craniopharyngioma") -> None:
    d = draw_diameter(ctx, 15, 45)
    c = offset(ctx, "sella", (0, 2, 6 + d * 0.3))
    cyst = dict(PROPS["protein_cyst"], t1=ctx.rng.uniform(400, 1500))
    paint_mass(ctx, key, c, d / 2, cyst, pattern="ring", enhancement=ctx.rng.uniform(0.4, 0.8), rim=0.15,
               irregularity=0.15, record=False)
    box, r = ctx.blob(c, (d / 2,) * 3, 0.0)
    ctx.paint(box, r < 0.85, cyst)  # the rim enhances, the cyst contents do not
    speckles(ctx, key, c, d / 2.5, int(ctx.rng.integers(2, 7)), PROPS["calcification"])
    ctx.record(key, "suprasellar region", d, cystic=True, calcified=True)


def rathkes_cleft_cyst(ctx: Ctx, key: str = "sellar_rathkes_cleft_cyst") -> None:
    d = ctx.rng.uniform(4, 18)
    c = offset(ctx, "sella", (0, 0, ctx.rng.uniform(0, d / 3)))
    bright_t1 = ctx.rng.random() < 0.5
    props = dict(pd=0.95, t1=500.0 if bright_t1 else 2500.0, t2=ctx.rng.uniform(300, 900), t2star=200.0, adc=2.2,
                 enhancement=0.0)
    paint_mass(ctx, key, c, d / 2, props, pattern="none", irregularity=0.03, mass=False, record=False)
    ctx.record(key, "sella turcica", d, t1="hyperintense" if bright_t1 else "hypointense", enhancement="none")


def colloid_cyst(ctx: Ctx, key: str = "cyst_colloid_cyst") -> None:
    d = ctx.rng.uniform(5, 20)
    c = offset(ctx, "anterior_commissure", (0, -4, 8 + d / 3))
    props = dict(pd=0.85, t1=ctx.rng.uniform(350, 800), t2=ctx.rng.uniform(50, 250), t2star=60.0, adc=1.0,
                 enhancement=0.0)
    paint_mass(ctx, key, c, d / 2, props, pattern="none", irregularity=0.02, mass=False, record=False)
    ctx.record(key, "anterior third ventricle at the foramen of Monro", d)
