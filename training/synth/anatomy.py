"""Subject anatomy: the ICBM152 2009 template turned into a randomised digital head phantom.

The template (bundled in the ``nilearn`` wheel, no download) gives a T1 image, grey- and
white-matter probability maps and a brain mask on a 1 mm MNI grid. ``base_anatomy`` derives, once
per process and resolution, everything that does not vary between subjects (tissue regions, an
upper cervical cord below the template's field of view, distance maps). ``make_subject`` then draws
one subject: age effects (atrophy, ventricle size), a skull/scalp shell of random thickness, a random
global affine (rotation, scale, head position) and a smooth elastic deformation, and fills the
physical property maps with per-subject variation.

All region rules are stated in MNI millimetres of the undeformed template; see ``docs/synth.md``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from training.synth.phantom import Phantom, Tissue
from training.synth.shift import beyond, beyond_normal, check_shift

# Template-space box (MNI mm, inclusive lower corner) that holds the head, skull and upper neck.
BOX_LO = np.array([-96.0, -130.0, -100.0])
BOX_HI = np.array([96.0, 96.0, 106.0])

# The ICBM152 2009 maps nilearn bundles; nilearn.datasets.load_mni152_{template,gm_template,wm_template}
# read these files and rescale them to 0..1. Reading them directly skips importing nilearn.datasets,
# which pulls in scikit-learn and scipy.stats (~2 s in every worker process).
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
BRAIN_MASK_THRESHOLD = 0.2  # on the rescaled T1: nilearn.datasets.load_mni152_brain_mask's default

# Anatomical points in MNI mm of the undeformed template; make_subject maps them into each
# subject's world space (Phantom.landmarks) so pathology can place lesions without a template.
TEMPLATE_LANDMARKS: dict[str, tuple[float, float, float]] = {
    "sella": (0.0, 0.0, -32.0),  # centre of the pituitary gland in the sella turcica
    "pineal": (0.0, -33.0, 1.0),  # pineal gland, behind the third ventricle
    "anterior_commissure": (0.0, 2.0, -4.0),
    "posterior_commissure": (0.0, -26.0, -2.0),
    "fourth_ventricle": (0.0, -44.0, -30.0),
    "foramen_magnum": (0.0, -42.0, -62.0),  # centre of the cord at the cranio-cervical junction
    "cerebellar_tonsil_left": (-8.0, -48.0, -52.0),
    "cerebellar_tonsil_right": (8.0, -48.0, -52.0),
    "iac_left": (-30.0, -28.0, -35.0),  # internal auditory canal / cerebellopontine angle
    "iac_right": (30.0, -28.0, -35.0),
    "corpus_callosum_genu": (0.0, 26.0, 8.0),
    "corpus_callosum_splenium": (0.0, -38.0, 12.0),
    "vertex": (0.0, -20.0, 78.0),  # top of the brain in the midline
}

# Tissue property means at 1.5-3 T: (pd, t1 ms, t2 ms, t2* ms, adc 1e-3 mm^2/s, enhancement).
TISSUE_PROPERTIES: dict[str, tuple[float, float, float, float, float, float]] = {
    "wm": (0.69, 800.0, 80.0, 55.0, 0.75, 0.0),
    "gm": (0.80, 1300.0, 100.0, 65.0, 0.85, 0.0),
    "deep_gm": (0.78, 1150.0, 88.0, 40.0, 0.80, 0.0),  # iron in pallidum/putamen shortens T2*
    "csf": (1.00, 4000.0, 2000.0, 1500.0, 3.0, 0.0),
    "cortical_bone": (0.05, 500.0, 5.0, 1.0, 0.1, 0.0),
    "marrow": (0.85, 380.0, 70.0, 30.0, 0.2, 0.05),  # fatty diploe
    "fat": (0.90, 300.0, 80.0, 50.0, 0.05, 0.0),
    "muscle": (0.70, 900.0, 45.0, 30.0, 1.4, 0.1),
    "vessel": (0.10, 1600.0, 60.0, 15.0, 0.5, 0.8),  # flow void; venous blood enhances
    "pituitary": (0.75, 900.0, 80.0, 50.0, 0.8, 0.6),  # no blood-brain barrier: enhances
    "vitreous": (0.98, 3800.0, 1500.0, 1000.0, 2.9, 0.0),
    "background": (0.0, 1.0, 1.0, 1.0, 0.0, 0.0),
}
PROPERTY_NAMES = ("pd", "t1", "t2", "t2star", "adc", "enhancement")

ORBITAL_FAT, VITREOUS = 1, 2  # values of BaseAnatomy.orbit

BRAIN_TISSUES = (Tissue.CORTICAL_GM, Tissue.WM, Tissue.DEEP_GM, Tissue.BRAINSTEM, Tissue.CEREBELLUM)


@dataclass(frozen=True)
class BaseAnatomy:
    """Subject-independent anatomy on a regular template-space grid (arrays share ``affine``)."""

    affine: np.ndarray  # 4x4 voxel -> MNI mm
    labels: np.ndarray  # int16 Tissue inside the intracranial space (+ pituitary, vessels); 0 elsewhere
    gm: np.ndarray  # float32 grey-matter fraction
    wm: np.ndarray  # float32 white-matter fraction (CSF is the rest of the intracranial space)
    signed_distance: np.ndarray  # float32 mm to the intracranial surface, negative inside
    depth_to_csf: np.ndarray  # float32 mm from brain tissue to the nearest CSF voxel (atrophy)
    depth_to_ventricle: np.ndarray  # float32 mm to the nearest ventricle voxel (ventricle size)
    orbit: np.ndarray  # uint8 ORBITAL_FAT / VITREOUS inside the orbits (labelled SCALP), 0 elsewhere

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)


def world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World (mm) coordinates of every voxel centre of an axis-aligned grid, as three float32 arrays."""
    axes = [affine[i, i] * np.arange(n, dtype=np.float32) + affine[i, 3] for i, n in enumerate(shape)]
    return np.meshgrid(*axes, indexing="ij", sparse=False)


def template_map(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One bundled ICBM152 map (a key of ``TEMPLATE_FILES``) scaled to a maximum of 1, as nilearn
    loads it: ``(float32 array, voxel -> MNI mm affine)``.

    Raises:
        ModuleNotFoundError: nilearn (the data's wheel) is not installed.
    """
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the ICBM152 template ships in the nilearn wheel: pip install nilearn")
    image = nib.load(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / TEMPLATE_FILES[name])
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data /= data.max()
    return data, image.affine


def _resample_template(data: np.ndarray, data_affine: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                       order: int) -> np.ndarray:
    """Sample a template map on an axis-aligned grid given by ``affine``/``shape`` (zero outside)."""
    src_to_dst = np.linalg.inv(data_affine) @ affine
    return ndimage.affine_transform(
        data, src_to_dst[:3, :3], offset=src_to_dst[:3, 3], output_shape=shape, order=order, mode="constant", cval=0.0
    ).astype(np.float32)


def _edt_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm) from every voxel outside ``mask`` to the mask (0 inside)."""
    return (ndimage.distance_transform_edt(~mask) * spacing).astype(np.float32)


def _largest_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= min_voxels) + 1
    return np.isin(lab, keep)


@lru_cache(maxsize=2)
def base_anatomy(spacing: float = 1.5) -> BaseAnatomy:
    """Derive the subject-independent anatomy at ``spacing`` mm (cached per process).

    Args:
        spacing: isotropic voxel size in mm of the template-space grid, > 0.
    """
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    shape = tuple(int(np.floor((hi - lo) / spacing)) + 1 for lo, hi in zip(BOX_LO, BOX_HI))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = BOX_LO
    gm = _resample_template(*template_map("gm"), affine, shape, 1)
    wm = _resample_template(*template_map("wm"), affine, shape, 1)
    t1, t1_affine = template_map("t1")
    brain = _resample_template((t1 > BRAIN_MASK_THRESHOLD).astype(np.float32), t1_affine, affine, shape, 1) > 0.5
    x, y, z = world_grid(affine, shape)

    # Upper cervical cord: the template stops at z = -72 mm, so continue the medulla downward as an
    # elliptic cord (12 x 8 mm) in a CSF sleeve, tilting slightly forward as the cervical lordosis does.
    cord_y = -42.0 - 0.15 * np.minimum(z + 62.0, 0.0)
    below = z < -62.0
    ell = ((x / 6.0) ** 2 + ((y - cord_y) / 4.0) ** 2) <= 1.0
    sleeve = ((x / 9.5) ** 2 + ((y - cord_y) / 7.5) ** 2) <= 1.0
    brain[below] = False
    cord = below & ell
    intracranial = brain | (below & sleeve)
    intracranial = ndimage.binary_closing(intracranial, iterations=1) | intracranial
    wm[below] = np.where(cord[below], 0.9, 0.0)
    gm[below] = np.where(cord[below], 0.1, 0.0)
    gm[~intracranial] = 0.0
    wm[~intracranial] = 0.0
    tissue = np.clip(gm + wm, 0.0, 1.0)
    scale = np.where(gm + wm > 1.0, 1.0 / np.maximum(gm + wm, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.where(intracranial, 1.0 - tissue, 0.0).astype(np.float32)

    labels = np.zeros(shape, np.int16)
    labels[intracranial] = Tissue.CSF
    labels[intracranial & (wm >= gm) & (csf < 0.5)] = Tissue.WM
    labels[intracranial & (gm > wm) & (csf < 0.5)] = Tissue.CORTICAL_GM
    depth = ndimage.distance_transform_edt(intracranial) * spacing  # mm inside, 0 outside

    # Ventricles: CSF-dominant voxels deep in the brain, in the central region, in large components
    # (lateral + third ventricle) or in the midline of the posterior fossa (fourth ventricle).
    csf_dom = intracranial & (csf >= 0.5)
    supra = csf_dom & (np.abs(x) < 32) & (y > -50) & (y < 40) & (z > -12) & (z < 38) & (depth > 12)
    supra = _largest_components(supra, int(800 / spacing**3))
    third = csf_dom & (np.abs(x) < 3.5) & (y > -28) & (y < 2) & (z > -10) & (z < 14) & (depth > 10)
    fourth = csf_dom & (np.abs(x) < 10) & (y > -55) & (y < -34) & (z > -45) & (z < -18) & (depth > 8)
    ventricles = supra | third | fourth
    labels[ventricles] = Tissue.VENTRICLE

    # Deep grey matter: grey-dominant voxels in the basal ganglia / thalamus box, far from the cortex.
    deep = (
        (labels == Tissue.CORTICAL_GM) & (np.abs(x) > 3) & (np.abs(x) < 32) & (y > -38) & (y < 26)
        & (z > -10) & (z < 24) & (depth > 18)
    )
    labels[deep] = Tissue.DEEP_GM

    # Posterior fossa below the tentorium: the tentorial surface rises from the transverse sinuses
    # (z ~ -20 mm laterally/posteriorly) to the incisura (z ~ -6 mm at y ~ -45 mm in the midline).
    tentorium_z = -6.0 - 0.30 * np.abs(x) + 0.35 * np.minimum(y + 50.0, 0.0)
    infratentorial = (y < -30) & (z < tentorium_z)
    tissue_lab = np.isin(labels, (Tissue.CORTICAL_GM, Tissue.WM))
    brainstem = (
        tissue_lab & (np.abs(x) < 14 - 0.1 * np.maximum(z + 20.0, 0.0)) & (y > -42) & (y < -8) & (z < -6)
    ) | (cord & tissue_lab)
    labels[brainstem] = Tissue.BRAINSTEM
    labels[tissue_lab & infratentorial & ~brainstem] = Tissue.CEREBELLUM

    # Structures outside the intracranial mask that the shell must not overwrite.
    sd = (_edt_mm(intracranial, spacing) - depth).astype(np.float32)
    pit = (((x - 0.0) / 6.0) ** 2 + ((y - 0.0) / 4.5) ** 2 + ((z + 32.0) / 3.5) ** 2) <= 1.0
    labels[pit & ~intracranial] = Tissue.PITUITARY
    # Superior sagittal sinus in the midline just outside the brain, over the convexity.
    sss = (np.abs(x) < 4.0) & (sd > 0) & (sd < 5.0) & ((z > 5) | (y < -85)) & (z > -25)
    # Basilar artery in front of the pons.
    basilar = (((x / 2.0) ** 2 + ((y + 12.0) / 2.0) ** 2) <= 1.0) & (z > -45) & (z < -12)
    labels[(sss | basilar) & (labels == Tissue.BACKGROUND) | (basilar & (labels == Tissue.CSF))] = Tissue.VESSEL

    # Orbits (labelled SCALP: extracranial soft tissue): a 24 mm globe of vitreous in a cone of
    # orbital fat under the frontal lobes, kept 4 mm clear of the brain for the orbital roof.
    orbit = np.zeros(shape, np.uint8)
    for side in (-1.0, 1.0):
        fat = (((x - side * 28.0) / 15.0) ** 2 + ((y - 46.0) / 24.0) ** 2 + ((z + 33.0) / 13.0) ** 2) <= 1.0
        globe = (((x - side * 32.0) ** 2 + (y - 60.0) ** 2 + (z + 33.0) ** 2) <= 12.0**2)
        orbit[fat & (sd > 4.0)] = ORBITAL_FAT
        orbit[globe & (sd > 4.0)] = VITREOUS
    labels[orbit > 0] = Tissue.SCALP

    tissue_mask = np.isin(labels, BRAIN_TISSUES)
    csf_like = np.isin(labels, (Tissue.CSF, Tissue.VENTRICLE))
    depth_to_csf = ndimage.distance_transform_edt(~csf_like) * spacing
    depth_to_ventricle = ndimage.distance_transform_edt(labels != Tissue.VENTRICLE) * spacing
    depth_to_csf[~tissue_mask] = 0.0
    return BaseAnatomy(
        affine=affine,
        labels=labels,
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        signed_distance=sd,
        depth_to_csf=depth_to_csf.astype(np.float32),
        depth_to_ventricle=depth_to_ventricle.astype(np.float32),
        orbit=orbit,
    )


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about x (pitch), y (roll), z (yaw), applied in that order, angles in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _linear_weights(n: int, control: int) -> np.ndarray:
    """(n, control) matrix that interpolates ``control`` evenly spread points linearly onto ``n``."""
    position = np.linspace(0.0, control - 1.0, n)
    lower = np.minimum(np.floor(position).astype(int), control - 2)
    frac = position - lower
    weights = np.zeros((n, control), np.float32)
    weights[np.arange(n), lower] = 1.0 - frac
    weights[np.arange(n), lower + 1] = frac
    return weights


def smooth_random_field(rng: np.random.Generator, shape: tuple[int, int, int], control: int, std: float) -> np.ndarray:
    """A smooth random field on ``shape``: Gaussian noise on a ``control``^3 lattice, upsampled trilinearly."""
    if control < 2:
        raise ValueError(f"control must be >= 2, got {control}")
    coarse = rng.normal(0.0, std, size=(control,) * 3).astype(np.float32)
    w0, w1, w2 = (_linear_weights(n, control) for n in shape)
    # Separable interpolation: three small matrix products instead of a per-voxel lookup.
    along_0 = np.einsum("ai,ijk->ajk", w0, coarse)
    return np.einsum("ajk,bj,ck->abc", along_0, w1, w2, optimize=True).astype(np.float32)


@dataclass(frozen=True)
class SubjectParams:
    """The random draws that define one subject (recorded so a subject can be described)."""

    age: float  # years
    sex: str  # "F" or "M"
    rotation_deg: tuple[float, float, float]  # head rotation about x, y, z
    scale: tuple[float, float, float]  # head size factor per axis
    translation_mm: tuple[float, float, float]  # head position relative to the scanner isocentre
    elastic_mm: float  # standard deviation of the elastic displacement control points
    atrophy_mm: float  # tissue rim converted to CSF next to sulci and ventricles
    ventricle_growth_mm: float  # outward growth of the ventricles
    skull_mm: float  # mean calvarial thickness
    scalp_mm: float  # mean scalp thickness
    property_jitter: float  # relative per-subject variation of tissue properties


# Training distributions of the factors a shifted data set moves (``training.synth.shift``).
ROTATION_SD_DEG = (5.0, 2.5, 3.0)  # head rotation about x, y, z
TRANSLATION_SD_MM = (3.0, 6.0, 8.0)  # head position
SIZE_RANGE = (0.93, 1.07)  # global head size factor (before the children's smaller heads)
AXIS_SCALE_RANGE = (0.97, 1.03)  # per-axis size factor (the head's proportions, never shifted)
ELASTIC_RANGE_MM = (1.0, 3.0)  # SD of the elastic displacement control points
PROPERTY_JITTER_RANGE = (0.02, 0.06)  # relative per-subject variation of tissue properties


def draw_subject_params(rng: np.random.Generator, age: float | None = None, shift: float = 0.0) -> SubjectParams:
    """Draw the parameters of one subject.

    Args:
        rng: source of every draw.
        age: years; fixes the age instead of drawing it.
        shift: 0 draws the training distribution; > 0 moves pose (rotation, position, global size),
            elastic deformation and property jitter outside their training ranges (``training.synth.shift``),
            with the same draws.

    Raises:
        ValueError: ``age`` outside [0, 110] or a bad ``shift``.
    """
    check_shift(shift)
    if age is None:
        age = float(rng.choice([rng.uniform(2, 18), rng.uniform(18, 90)], p=[0.15, 0.85]))
    if not 0 <= age <= 110:
        raise ValueError(f"age must be in [0, 110] years, got {age}")
    ageing = float(np.clip((age - 45.0) / 40.0, 0.0, 1.0))
    size = beyond(rng.uniform(*SIZE_RANGE), *SIZE_RANGE, shift, "both") * (0.9 + 0.1 * min(age, 12.0) / 12.0)
    # Drawn in this order whatever the shift: the shifted data set differs only in the moved factors.
    sex = str(rng.choice(["F", "M"]))
    rotation = beyond_normal(rng.normal(0.0, ROTATION_SD_DEG), ROTATION_SD_DEG, shift)
    axis_scale = rng.uniform(*AXIS_SCALE_RANGE, size=3)  # the head's proportions: not shifted
    translation = beyond_normal(rng.normal(0.0, TRANSLATION_SD_MM), TRANSLATION_SD_MM, shift)
    return SubjectParams(
        age=age,
        sex=sex,
        rotation_deg=tuple(float(v) for v in rotation),
        scale=tuple(float(size * v) for v in axis_scale),
        translation_mm=tuple(float(v) for v in translation),
        elastic_mm=float(beyond(rng.uniform(*ELASTIC_RANGE_MM), *ELASTIC_RANGE_MM, shift)),
        atrophy_mm=float(ageing * rng.uniform(0.5, 2.0)),
        ventricle_growth_mm=float(ageing * rng.uniform(0.5, 4.0)),
        skull_mm=float(rng.uniform(5.0, 8.5)),
        scalp_mm=float(rng.uniform(4.0, 8.0)),
        property_jitter=float(beyond(rng.uniform(*PROPERTY_JITTER_RANGE), *PROPERTY_JITTER_RANGE, shift)),
    )


def _age_tissue(base: BaseAnatomy, params: SubjectParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template-space labels and GM/WM fractions after age effects (sulcal widening, ventricle growth).

    Lost tissue becomes CSF (the remainder 1 - gm - wm inside the intracranial space).
    """
    labels = base.labels.copy()
    gm, wm = base.gm.copy(), base.wm.copy()
    tissue = np.isin(labels, BRAIN_TISSUES)
    if params.atrophy_mm > 0:
        # Cortex next to CSF loses tissue in proportion to how close it is: sulci widen.
        rim = tissue & (base.depth_to_csf < base.spacing + params.atrophy_mm) & (labels != Tissue.BRAINSTEM)
        keep = np.clip((base.depth_to_csf[rim] - params.atrophy_mm) / base.spacing, 0.0, 1.0)
        gm[rim] *= keep
        wm[rim] *= keep
        now_csf = rim.copy()
        now_csf[rim] = keep < 0.5
        labels[now_csf] = Tissue.CSF
    if params.ventricle_growth_mm > 0:
        grow = (base.depth_to_ventricle > 0) & (base.depth_to_ventricle <= params.ventricle_growth_mm)
        grow &= np.isin(labels, (Tissue.WM, Tissue.DEEP_GM, Tissue.CORTICAL_GM, Tissue.CSF))
        labels[grow] = Tissue.VENTRICLE
        gm[grow], wm[grow] = 0.0, 0.0
    return labels, gm, wm


def _subject_transform(params: SubjectParams, base: BaseAnatomy) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Forward affine (template mm -> subject world mm), output grid affine and shape."""
    forward = np.eye(4)
    forward[:3, :3] = rotation_matrix(np.array(params.rotation_deg)) @ np.diag(params.scale)
    forward[:3, 3] = params.translation_mm
    # Output grid: axis-aligned box around the transformed template box, same spacing.
    corners = np.array([[a, b, c, 1.0] for a in (BOX_LO[0], BOX_HI[0]) for b in (BOX_LO[1], BOX_HI[1])
                        for c in (BOX_LO[2], BOX_HI[2])])
    world = (forward @ corners.T).T[:, :3]
    # Rotated box corners are empty air, so shrink the box by the rotation's overshoot (max 10%).
    centre = world.mean(0)
    half = (world.max(0) - world.min(0)) / 2.0
    half_template = (BOX_HI - BOX_LO) / 2.0 * np.array(params.scale)
    half = np.minimum(half, half_template * 1.04)
    spacing = base.spacing
    lo = centre - half
    shape = tuple(int(np.ceil(2 * h / spacing)) + 1 for h in half)
    grid = np.diag([spacing, spacing, spacing, 1.0])
    grid[:3, 3] = lo
    return forward, grid, shape


def make_subject(
    rng: np.random.Generator, *, spacing: float = 1.5, age: float | None = None, shift: float = 0.0
) -> Phantom:
    """Draw one subject's head phantom.

    Args:
        rng: the only source of randomness; the same generator state gives the same phantom.
        spacing: isotropic voxel size (mm) of the phantom grid; 1.5 mm by default, coarser for tests.
        age: subject age in years; drawn (15% children, 85% adults 18-90) when ``None``.
        shift: subject factors outside their training ranges (``draw_subject_params``); 0 = training.

    Returns:
        A ``Phantom`` on an axis-aligned RAS+ grid with ``labels``, the six property maps, empty
        ``lesion_masks``/``findings``, ``landmarks`` (world mm) and ``subject`` (``SubjectParams``).
    """
    base = base_anatomy(float(spacing))
    params = draw_subject_params(rng, age, shift)
    labels0, gm0, wm0 = _age_tissue(base, params)
    forward, grid_affine, shape = _subject_transform(params, base)

    # Backward map: subject world -> template mm -> template voxel, plus a smooth elastic field.
    backward = np.linalg.inv(base.affine) @ np.linalg.inv(forward) @ grid_affine
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    coords = [
        backward[i, 0] * idx[0] + backward[i, 1] * idx[1] + backward[i, 2] * idx[2] + backward[i, 3]
        + smooth_random_field(rng, shape, 6, params.elastic_mm / base.spacing)
        for i in range(3)
    ]
    coords = np.stack(coords)

    def warp(volume: np.ndarray, order: int, cval: float = 0.0, at: np.ndarray | None = None) -> np.ndarray:
        """``volume`` at the backward map of every voxel, or of the voxels where ``at`` is True (flat)."""
        points = coords if at is None else coords[:, at]
        return ndimage.map_coordinates(volume, points, order=order, mode="constant", cval=cval, prefilter=False)

    # Labels and orbit materials share one nearest-neighbour warp (labels < 16).
    packed = warp(labels0 + 16 * base.orbit.astype(np.int16), 0).astype(np.int16)
    labels, orbit = packed % 16, (packed // 16).astype(np.uint8)
    sd = warp(base.signed_distance, 1, cval=float(base.signed_distance.max()))

    # Extra-axial shell, by distance (mm) outside the intracranial surface, with a thickness that
    # varies smoothly over the head.
    thickness = 1.0 + smooth_random_field(rng, shape, 5, 0.15)
    skull_in = 1.5 * thickness

    # Tissue fractions are read only in the labelled head and the CSF rim the shell adds below: warping
    # them there alone skips two thirds of the grid (air, skull, scalp) and leaves every value used the same.
    fractions_at = (labels != Tissue.BACKGROUND) | (sd <= skull_in)
    gm, wm = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    gm[fractions_at], wm[fractions_at] = warp(gm0, 1, at=fractions_at), warp(wm0, 1, at=fractions_at)
    # Inside the intracranial space the three fractions sum to one (ageing keeps that true).
    csf = np.where(labels != Tissue.BACKGROUND, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)

    skull_out = skull_in + params.skull_mm * thickness
    scalp_out = skull_out + params.scalp_mm * thickness
    outside = labels == Tissue.BACKGROUND
    labels[outside & (sd <= skull_in)] = Tissue.CSF
    shell_bone = outside & (sd > skull_in) & (sd <= skull_out)
    labels[shell_bone] = Tissue.SKULL
    shell_scalp = outside & (sd > skull_out) & (sd <= scalp_out)
    labels[shell_scalp] = Tissue.SCALP
    in_brain_space = np.isin(labels, (Tissue.CSF, Tissue.VENTRICLE)) & (sd <= skull_in)
    csf = np.where(in_brain_space & (gm + wm < 1e-3), 1.0, csf).astype(np.float32)

    # Where in the bone and scalp a voxel sits, 0 (inner) .. 1 (outer): tables vs diploe, fat vs muscle.
    bone_pos = np.clip((sd - skull_in) / np.maximum(skull_out - skull_in, 1e-3), 0, 1)
    scalp_pos = np.clip((sd - skull_out) / np.maximum(scalp_out - skull_out, 1e-3), 0, 1)

    maps = _property_maps(rng, params, labels, gm, wm, csf, bone_pos, scalp_pos, orbit)
    points = _forward_points(np.array(list(TEMPLATE_LANDMARKS.values()), dtype=np.float64), forward, coords,
                             grid_affine, base.affine)
    landmarks = dict(zip(TEMPLATE_LANDMARKS, points))
    return Phantom(
        affine=grid_affine,
        labels=labels,
        **maps,
        landmarks=landmarks,
        subject=asdict(params),
    )


def _forward_points(
    template_mm: np.ndarray, forward: np.ndarray, coords: np.ndarray, grid_affine: np.ndarray, base_affine: np.ndarray
) -> list[np.ndarray]:
    """Subject world points (mm) that the backward map (affine + elastic) sends to ``template_mm`` (n, 3).

    Starts from the affine image and removes the elastic part by fixed-point iteration; the elastic
    field is small and smooth, so a few steps reach sub-voxel accuracy. Each step interpolates the
    backward map at all points in one call per coordinate field (a call per point costs more than the
    interpolation itself).
    """
    inv_grid = np.linalg.inv(grid_affine)
    qs = [(forward @ np.array([*p, 1.0]))[:3] for p in template_mm]
    for _ in range(8):
        v = np.array([(inv_grid @ np.array([*q, 1.0]))[:3] for q in qs])
        t_vox = np.stack([ndimage.map_coordinates(c, v.T, order=1, mode="nearest") for c in coords], axis=1)
        t_mms = [(base_affine @ np.array([*t, 1.0]))[:3] for t in t_vox]
        qs = [q + forward[:3, :3] @ (p - t_mm) for q, p, t_mm in zip(qs, template_mm, t_mms)]
    return qs


def _blend(values: dict[str, np.ndarray], weights: dict[str, np.ndarray], total: np.ndarray,
           geometric: bool) -> np.ndarray:
    """Mix ``values`` by ``weights`` (``total`` = their sum): geometrically or linearly."""
    if geometric:
        return np.exp(sum(w * np.log(values[k]) for k, w in weights.items()) / total)
    return sum(w * values[k] for k, w in weights.items()) / total


def _property_maps(
    rng: np.random.Generator,
    params: SubjectParams,
    labels: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    bone_pos: np.ndarray,
    scalp_pos: np.ndarray,
    orbit: np.ndarray,
) -> dict[str, np.ndarray]:
    """Fill the six property maps from labels and partial-volume fractions.

    Relaxation times mix geometrically (a voxel 20% CSF is not 20% of CSF's T2 brighter), proton
    density, ADC and enhancement linearly. Each tissue's means vary per subject by ``property_jitter``.
    """
    props = {}
    for tissue, means in TISSUE_PROPERTIES.items():
        jitter = 1.0 + params.property_jitter * rng.standard_normal(len(means))
        jitter[-1] = 1.0
        props[tissue] = np.asarray(means) * jitter
    props["csf"][0] = 1.0
    maps = {name: np.full(labels.shape, props["background"][i], np.float32) for i, name in enumerate(PROPERTY_NAMES)}

    def fill(mask: np.ndarray, weights: dict[str, np.ndarray]) -> None:
        total = sum(weights.values())
        for i, name in enumerate(PROPERTY_NAMES):
            values = {k: np.float32(props[k][i]) for k in weights}
            maps[name][mask] = _blend(values, weights, total, geometric=name in ("t1", "t2", "t2star"))

    # Mixing is done on the brain-space voxels only (a fifth of the grid); the rest is air, bone and scalp.
    brain_space = np.isin(labels, (*BRAIN_TISSUES, Tissue.CSF, Tissue.VENTRICLE))
    inside = labels[brain_space]
    # The template's probability maps are smooth; a real voxel's signal mixes linearly, which one
    # set of relaxation times cannot express. Sharpening the fractions keeps mixed voxels close to
    # their dominant tissue so FLAIR still nulls sulcal CSF and ventricles stay pure CSF.
    gm, wm, csf = gm[brain_space] ** 3, wm[brain_space] ** 3, csf[brain_space] ** 3
    ventricle = inside == Tissue.VENTRICLE
    csf = np.where(((gm + wm + csf) < 1e-6) | ventricle, 1.0, csf)
    gm = np.where(ventricle, 0.0, gm)
    wm = np.where(ventricle, 0.0, wm)
    deep_grid = labels == Tissue.DEEP_GM
    deep = deep_grid[brain_space]
    for grey, mask, sub in (("gm", brain_space & ~deep_grid, ~deep), ("deep_gm", brain_space & deep_grid, deep)):
        fill(mask, {grey: gm[sub] + 1e-6, "wm": wm[sub] + 1e-6, "csf": csf[sub] + 1e-6})
    bone = labels == Tissue.SKULL
    marrow = np.clip(1.0 - np.abs(bone_pos[bone] - 0.5) / 0.3, 0.0, 1.0)
    fill(bone, {"marrow": marrow + 1e-3, "cortical_bone": 1.0 - marrow + 1e-3})
    scalp = labels == Tissue.SCALP
    pos = scalp_pos[scalp]
    fat = np.clip((pos - 0.25) / 0.2, 0.0, 1.0) * np.clip((0.95 - pos) / 0.1, 0.0, 1.0)
    fill(scalp, {"fat": fat + 1e-3, "muscle": 1.0 - fat + 1e-3})
    for value, key in ((ORBITAL_FAT, "fat"), (VITREOUS, "vitreous")):
        mask = orbit == value
        fill(mask, {key: np.ones(int(mask.sum()), np.float32)})
    for tissue, key in ((Tissue.VESSEL, "vessel"), (Tissue.PITUITARY, "pituitary")):
        mask = labels == tissue
        fill(mask, {key: np.ones(int(mask.sum()), np.float32)})
    return maps
