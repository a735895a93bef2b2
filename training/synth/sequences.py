"""MR sequence simulation: a phantom's property maps -> one series in its own geometry.

Each sequence turns the maps into a signal with its textbook equation (spin echo, inversion recovery,
diffusion, gradient echo, MPRAGE, balanced SSFP), then the signal is sampled on the series grid
(plane, matrix, pixel spacing, slice thickness with partial volume across the slice, field of view),
multiplied by a smooth coil bias field and corrupted by Rician noise. Lesion masks follow onto the
same grid. Everything random comes from the ``rng`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from training.synth.anatomy import BRAIN_TISSUES, rotation_matrix
from training.synth.phantom import Phantom, Tissue
from training.synth.shift import beyond

# Sequence kinds simulate_series understands (the "contrast" of a series). Pathology's key-sequence
# table uses these names.
SEQUENCES = (
    "t1",  # 2D spin-echo T1
    "t2",  # 2D fast spin-echo T2
    "flair",  # 2D T2 FLAIR (CSF nulled by inversion)
    "dwi",  # diffusion-weighted trace, b = 1000 s/mm^2
    "adc",  # apparent diffusion coefficient map, 1e-6 mm^2/s
    "swi",  # susceptibility-weighted (magnitude x phase mask)
    "t2star",  # 2D gradient echo T2*
    "t1_post",  # 2D spin-echo T1 after gadolinium
    "mprage",  # 3D inversion-prepared gradient echo T1
    "mprage_post",  # 3D T1 after gadolinium
    "ssfp",  # 3D heavily T2-weighted balanced SSFP (CISS / FIESTA) for the IAC
)
POST_CONTRAST = ("t1_post", "mprage_post")
PLANES = ("axial", "coronal", "sagittal")
PROFILE_TRUNCATE = 2.5  # the slice profile's Gaussian kernel reaches this many standard deviations

# Voxel index axes (i = image column, j = image row, k = slice) as RAS+ unit vectors, following the
# DICOM display convention (axial: columns run to the patient's left, rows to posterior).
PLANE_AXES = {
    "axial": np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T,
    "coronal": np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]]).T,
    "sagittal": np.array([[0, -1.0, 0], [0, 0, -1.0], [1.0, 0, 0]]).T,
}


@dataclass(frozen=True)
class SeriesSpec:
    """What one series acquires: contrast, geometry and timing."""

    name: str  # series description as the scanner writes it, e.g. "AX T2 FLAIR"
    sequence: str  # one of SEQUENCES
    plane: str  # "axial", "coronal" or "sagittal"
    matrix: tuple[int, int]  # reconstructed image size (columns, rows)
    fov_mm: tuple[float, float]  # field of view along columns and rows, mm
    slice_thickness_mm: float  # nominal slice thickness, mm
    slice_gap_mm: float = 0.0  # gap between slices, mm (slice spacing = thickness + gap)
    tr_ms: float = 500.0  # repetition time
    te_ms: float = 12.0  # echo time
    ti_ms: float = 0.0  # inversion time (FLAIR, MPRAGE), 0 if none
    flip_deg: float = 90.0  # excitation flip angle
    fat_sat: bool = False  # fat suppression
    snr: float = 30.0  # white-matter signal / noise standard deviation
    target: str = ""  # landmark a targeted series centres on ("sella", "iac"); "" = whole brain
    coverage_mm: float = 0.0  # extent of a targeted slice stack, mm; 0 = cover the whole brain
    extra: dict = field(default_factory=dict)  # free vendor-ish details kept for the DICOM header

    def __post_init__(self) -> None:
        if self.sequence not in SEQUENCES:
            raise ValueError(f"unknown sequence {self.sequence!r}; expected one of {SEQUENCES}")
        if self.plane not in PLANES:
            raise ValueError(f"unknown plane {self.plane!r}; expected one of {PLANES}")
        if min(self.matrix) < 8 or min(self.fov_mm) <= 0 or self.slice_thickness_mm <= 0 or self.slice_gap_mm < 0:
            raise ValueError(f"bad geometry in series {self.name!r}: {self.matrix}, {self.fov_mm}, "
                             f"{self.slice_thickness_mm}, {self.slice_gap_mm}")

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return (self.fov_mm[0] / self.matrix[0], self.fov_mm[1] / self.matrix[1])

    @property
    def slice_spacing(self) -> float:
        return self.slice_thickness_mm + self.slice_gap_mm

    @property
    def contrast_agent(self) -> bool:
        return self.sequence in POST_CONTRAST


def _fat_fraction(phantom: Phantom) -> np.ndarray:
    """Fat in scalp and marrow, recognised by its short T1 (the phantom has no fat map)."""
    extra_cranial = np.isin(phantom.labels, (Tissue.SCALP, Tissue.SKULL))
    return np.where(extra_cranial, np.clip((450.0 - phantom.t1) / 120.0, 0.0, 1.0), 0.0).astype(np.float32)


def _spin_echo(pd, t1, t2, tr, te):
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def signal_map(phantom: Phantom, spec: SeriesSpec) -> np.ndarray:
    """Noise-free signal of ``spec``'s sequence on the phantom grid (float32, white matter ~ 1 scale)."""
    pd, t1, t2, t2s = phantom.pd, phantom.t1, phantom.t2, phantom.t2star
    if spec.contrast_agent:
        t1 = t1 * (1.0 - np.clip(phantom.enhancement, 0.0, 0.95))
    seq = spec.sequence
    tr, te, ti = spec.tr_ms, spec.te_ms, spec.ti_ms
    if seq in ("t1", "t2", "t1_post"):
        s = _spin_echo(pd, t1, t2, tr, te)
    elif seq == "flair":
        s = pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
    elif seq in ("dwi", "adc"):
        # Diffusion is a long-TR spin-echo EPI: T2 shine-through is part of the b=1000 image.
        s = pd * np.exp(-te / t2) * np.exp(-1.0 * phantom.adc)
    elif seq in ("t2star", "swi"):
        a = np.deg2rad(spec.flip_deg)
        e1 = np.exp(-tr / t1)
        s = pd * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1) * np.exp(-te / t2s)
        if seq == "swi":
            # Phase-mask weighting darkens short-T2* tissue (veins, blood products, calcium) further.
            s = s * np.exp(-te / t2s) ** 1.5
    elif seq in ("mprage", "mprage_post"):
        # Inversion-prepared gradient echo, magnitude of the recovered longitudinal magnetisation.
        recovery = 2.0 * np.exp(-ti / t1) / (1.0 + np.exp(-tr / t1))
        s = pd * np.abs(1.0 - recovery) * np.exp(-te / t2s)
    elif seq == "ssfp":
        s = pd * np.sqrt(t2 / t1) * np.exp(-te / t2s)
    else:  # pragma: no cover - guarded by SeriesSpec
        raise ValueError(seq)
    if spec.fat_sat or seq in ("dwi", "adc"):
        s = s * (1.0 - 0.9 * _fat_fraction(phantom))
    return s.astype(np.float32)


def series_geometry(
    phantom: Phantom, spec: SeriesSpec, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (voxel -> RAS+ mm) and shape of the series grid, placed on the head like a technologist.

    The slice stack is tilted towards the head's own orientation (e.g. axial along the AC-PC line) with
    some residual obliquity, centred on the head with a small random offset, and covers the brain
    (vertex to foramen magnum for axial) plus a margin.
    """
    head_rotation = np.array(phantom.subject.get("rotation_deg", (0.0, 0.0, 0.0)))
    tilt = head_rotation * rng.uniform(0.5, 1.0) + rng.normal(0.0, 1.5, 3)
    axes = rotation_matrix(tilt) @ PLANE_AXES[spec.plane]
    spacing = np.array([*spec.pixel_spacing, spec.slice_spacing])

    # Every second voxel along each axis is enough to find the brain's extent and centre.
    vox = np.argwhere(np.isin(phantom.labels[::2, ::2, ::2], (*BRAIN_TISSUES, Tissue.VENTRICLE))) * 2
    world = vox @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    along = world @ axes[:, 2]
    lo, hi = along.min() - 3.0, along.max() + 3.0
    if spec.plane == "axial":
        # Axial stacks start at the foramen magnum, not at the bottom of the cord.
        fm = phantom.landmarks.get("foramen_magnum")
        if fm is not None:
            lo = max(lo, float(np.asarray(fm) @ axes[:, 2]) - 8.0)
    centre = world.mean(0) + rng.normal(0.0, 3.0, 3)
    if spec.target:
        # Targeted series (sella, internal auditory canals): a slab around the structure.
        point = _target_point(phantom, spec.target)
        along_point = float(point @ axes[:, 2])
        lo, hi = along_point - spec.coverage_mm / 2.0, along_point + spec.coverage_mm / 2.0
        centre = point + rng.normal(0.0, 2.0, 3)
    n_slices = max(int(np.ceil((hi - lo) / spec.slice_spacing)), 3)
    centre_along = (lo + hi) / 2.0
    centre = centre + (centre_along - centre @ axes[:, 2]) * axes[:, 2]
    shape = (spec.matrix[0], spec.matrix[1], n_slices)
    affine = np.eye(4)
    affine[:3, :3] = axes * spacing
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine, shape


def _target_point(phantom: Phantom, target: str) -> np.ndarray:
    if target == "iac":
        return (np.asarray(phantom.landmarks["iac_left"]) + np.asarray(phantom.landmarks["iac_right"])) / 2.0
    if target not in phantom.landmarks:
        raise ValueError(f"unknown series target {target!r}; expected 'iac' or one of {sorted(phantom.landmarks)}")
    return np.asarray(phantom.landmarks[target], dtype=np.float64)


def _slice_blur(phantom: Phantom, affine: np.ndarray, thickness_mm: float) -> tuple[int, float] | None:
    """``(phantom axis, sigma in voxels)`` of the slice profile of a series, None when too thin to matter."""
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    axis_dirs = phantom.affine[:3, :3] / phantom.spacing
    axis = int(np.argmax(np.abs(normal @ axis_dirs)))
    sigma_vox = thickness_mm / 2.355 / float(phantom.spacing[axis])
    return None if sigma_vox < 0.4 else (axis, sigma_vox)


def slice_profile(volume: np.ndarray, phantom: Phantom, affine: np.ndarray, thickness_mm: float) -> np.ndarray:
    """Blur ``volume`` across the slice direction so one sample per slice integrates its thickness.

    The slice profile is a Gaussian whose FWHM equals the slice thickness, applied along the phantom
    axis closest to the slice normal (slice stacks are only a few degrees oblique).
    """
    blur = _slice_blur(phantom, affine, thickness_mm)
    if blur is None:
        return volume
    return ndimage.gaussian_filter1d(volume, blur[1], axis=blur[0], mode="constant", truncate=PROFILE_TRUNCATE)


def resample_to_series(
    volume: np.ndarray, phantom_affine: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], order: int = 1
) -> np.ndarray:
    """``volume`` (on the phantom grid) sampled at the series voxel centres (float32, 0 outside)."""
    m = np.linalg.inv(phantom_affine) @ affine
    return ndimage.affine_transform(
        volume, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=order, mode="constant", cval=0.0,
        prefilter=False, output=np.float32,
    )


def _interpolation_matrix(n: int, n_coarse: int) -> np.ndarray:
    """(n, n_coarse) linear interpolation from ``n_coarse`` to ``n`` pixels spanning the same extent."""
    position = np.clip((np.arange(n) + 0.5) * n_coarse / n - 0.5, 0.0, n_coarse - 1.0)
    lower = np.minimum(np.floor(position).astype(int), max(n_coarse - 2, 0))
    frac = position - lower
    weights = np.zeros((n, n_coarse), np.float32)
    weights[np.arange(n), lower] = 1.0 - frac
    if n_coarse > 1:
        weights[np.arange(n), lower + 1] += frac
    return weights


def image_on_series(
    signal: np.ndarray, phantom: Phantom, affine: np.ndarray, shape: tuple[int, int, int], thickness_mm: float
) -> np.ndarray:
    """Noise-free image of a phantom-grid ``signal`` on the series grid (slice profile included).

    In-plane pixels finer than the phantom carry no extra detail, so the signal is sampled on a grid
    about as fine as the phantom and interpolated up to the series matrix (as scanners interpolate a
    reconstruction to a larger display matrix); this is several times faster than sampling every pixel.
    """
    signal = slice_profile(signal, phantom, affine, thickness_mm)
    finest = float(phantom.spacing.min())
    pixel = np.linalg.norm(affine[:3, :2], axis=0)
    coarse = [min(n, max(8, int(np.ceil(n * p / finest)))) for n, p in zip(shape[:2], pixel)]
    if coarse == list(shape[:2]):
        return resample_to_series(signal, phantom.affine, affine, shape)
    coarse_affine = affine.copy()
    for axis in range(2):
        step = shape[axis] / coarse[axis]  # coarse pixel in series pixels
        coarse_affine[:3, axis] = affine[:3, axis] * step
        coarse_affine[:3, 3] += affine[:3, axis] * (step - 1.0) / 2.0  # same field-of-view edges
    sampled = resample_to_series(signal, phantom.affine, coarse_affine, (coarse[0], coarse[1], shape[2]))
    w0, w1 = _interpolation_matrix(shape[0], coarse[0]), _interpolation_matrix(shape[1], coarse[1])
    return np.einsum("ia,abk,jb->ijk", w0, sampled, w1, optimize=True).astype(np.float32)


BIAS_STRENGTH_RANGE = (0.05, 0.25)  # training range of the bias field's strength


def bias_strength(rng: np.random.Generator, shift: float = 0.0) -> float:
    """Draw a series' bias-field strength: ``BIAS_STRENGTH_RANGE``, or the band above it for ``shift`` > 0
    (``training.synth.shift``; one draw either way)."""
    return float(beyond(rng.uniform(*BIAS_STRENGTH_RANGE), *BIAS_STRENGTH_RANGE, shift))


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative coil sensitivity: exp of a random quadratic polynomial over the grid."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    log_field = sum(rng.normal(0.0, strength / 2.0) * t for t in terms)
    return np.exp(log_field - np.mean(log_field)).astype(np.float32)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma``."""
    # In place: a series is millions of voxels, and temporaries cost as much as the arithmetic.
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    real *= real
    imag *= imag
    real += imag
    return np.sqrt(real, out=real)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest block holding every True voxel of a 3D ``mask`` (None if it has none)."""
    rows = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(rows) == 0:
        return None
    slab = mask[rows[0]:rows[-1] + 1]  # the other two extents need only the lesion's slab of the grid
    extents = (rows, np.flatnonzero(slab.any(axis=(0, 2))), np.flatnonzero(slab.any(axis=(0, 1))))
    return tuple(slice(int(e[0]), int(e[-1]) + 1) for e in extents)


def _resample_masks(phantom: Phantom, affine, shape, thickness_mm: float) -> dict[str, np.ndarray]:
    """Each lesion mask on the series grid: voxels at least half covered by the lesion.

    A lesion thinner than half a slice still shows where it covers the most (its partial volume is
    what the images show), so it does not vanish from thick-slice series it intersects.
    """
    masks = {}
    inv_series = np.linalg.inv(affine)
    blur = _slice_blur(phantom, affine, thickness_mm)
    for key, mask in phantom.lesion_masks.items():
        found = _bounding_box(mask)
        if found is None:
            masks[key] = np.zeros(shape, bool)
            continue
        # Only resample the series sub-box the lesion can reach.
        corners = np.array([[a, b, c] for a in (found[0].start - 1, found[0].stop)
                            for b in (found[1].start - 1, found[1].stop)
                            for c in (found[2].start - 1, found[2].stop)], float)
        world = corners @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
        sv = world @ inv_series[:3, :3].T + inv_series[:3, 3]
        lo = np.clip(np.floor(sv.min(0)).astype(int) - 1, 0, np.array(shape))
        hi = np.clip(np.ceil(sv.max(0)).astype(int) + 2, 0, np.array(shape))
        out = np.zeros(shape, bool)
        if np.all(hi > lo):
            sub_affine = affine.copy()
            sub_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
            # The mask is zero outside its bounding box, so blurring the box (grown by the kernel's
            # reach along the blurred axis) gives the whole grid's profile at a fraction of the cost.
            box = list(found)
            if blur is not None:
                axis, sigma = blur
                reach = int(PROFILE_TRUNCATE * sigma + 0.5)  # scipy's kernel radius
                box[axis] = slice(max(box[axis].start - reach, 0), min(box[axis].stop + reach, mask.shape[axis]))
            box = tuple(box)
            profile = np.zeros(mask.shape, np.float32)
            profile[box] = slice_profile(mask[box].astype(np.float32), phantom, affine, thickness_mm)
            frac = resample_to_series(profile, phantom.affine, sub_affine, tuple(hi - lo))
            peak = float(frac.max())
            if peak > 0.05:
                out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = frac >= min(0.5, 0.5 * peak)
        masks[key] = out
    return masks


def simulate_series(
    phantom: Phantom,
    spec: SeriesSpec,
    rng: np.random.Generator,
    geometry: tuple[np.ndarray, tuple[int, int, int]] | None = None,
    shift: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Image ``phantom`` with ``spec``.

    Args:
        phantom: the subject (with any pathology already applied).
        spec: the series' contrast and geometry.
        rng: source of the placement jitter, bias field and noise.
        geometry: ``(affine, shape)`` to reuse another series' grid (an ADC map shares its DWI's);
            placed by ``series_geometry`` when ``None``.
        shift: bias-field strength beyond its training range (``bias_strength``); 0 = training.

    Returns:
        ``(volume, affine, masks)``: float32 volume of shape (columns, rows, slices) in scanner-like
        units (ADC in 1e-6 mm^2/s; others scaled so white matter is 350-700, as scanner gains differ), its
        4x4 voxel -> RAS+ affine,
        and ``{diagnosis key: bool mask}`` on the same grid for every lesion mask of the phantom.
    """
    affine, shape = series_geometry(phantom, spec, rng) if geometry is None else geometry
    wm = phantom.labels == Tissue.WM
    bias = bias_field(rng, shape, strength=bias_strength(rng, shift))
    if spec.sequence == "adc":
        volume = _adc_map(phantom, spec, affine, shape, bias, rng)
    else:
        signal = signal_map(phantom, spec)
        reference = float(np.median(signal[wm])) if wm.any() else float(signal.max())
        image = image_on_series(signal, phantom, affine, shape, spec.slice_thickness_mm) * bias
        sigma = reference / spec.snr
        volume = _rician(rng, image, sigma) * np.float32(rng.uniform(350.0, 700.0) / reference)
    return volume.astype(np.float32), affine, _resample_masks(phantom, affine, shape, spec.slice_thickness_mm)


def _adc_map(phantom, spec, affine, shape, bias, rng) -> np.ndarray:
    """ADC computed as a scanner does, from noisy b=0 and b=1000 images, zero where b=0 is noise."""
    pd_t2 = (phantom.pd * np.exp(-spec.te_ms / phantom.t2) * (1.0 - 0.9 * _fat_fraction(phantom))).astype(np.float32)
    b0, b1000 = (image_on_series(s, phantom, affine, shape, spec.slice_thickness_mm) * bias
                 for s in (pd_t2, pd_t2 * np.exp(-phantom.adc)))
    wm = phantom.labels == Tissue.WM
    reference = float(np.median(pd_t2[wm])) if wm.any() else float(pd_t2.max())
    sigma = reference / spec.snr
    b0n, b1000n = _rician(rng, b0, sigma), _rician(rng, b1000, sigma)
    adc = np.log(np.maximum(b0n, 1e-6) / np.maximum(b1000n, 1e-6)) * 1000.0  # b = 1000 s/mm^2 -> 1e-6 mm^2/s
    adc = np.clip(adc, 0.0, 4000.0)
    return np.where(b0n > 5.0 * sigma, adc, 0.0).astype(np.float32)
