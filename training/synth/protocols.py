"""Clinical MRI protocols: which series a study acquires, their geometry, timing and the names scanners
give them.

A study draws a scanner vendor (naming style), a protocol (study description + series list) and then
each series' parameters. Protocol choice leans on the study's findings the way ordering does in a
health system (sellar lesions get a pituitary protocol, acoustic schwannomas an IAC protocol, stroke a
stroke protocol, tumours contrast) but not always, so a finding is sometimes imaged without its best
sequence. A protocol-blind study (``study.plan_study(protocol_blind=True)``) passes no findings:
protocol, series kinds and series count are then drawn independently of its labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.sequences import POST_CONTRAST, SeriesSpec
from training.synth.shift import beyond, check_shift

VENDORS = ("ge", "siemens", "philips")

# Series kind -> vendor -> description variants. The kind fixes contrast and plane.
SERIES_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "ax_t1": {"ge": ("AX T1", "Ax T1 SE", "AX T1 FLAIR"), "siemens": ("t1_se_tra", "t1_tse_tra"),
              "philips": ("T1W_SE_TRA", "sT1W_SE_TRA")},
    "ax_t2": {"ge": ("AX T2 FSE", "Ax T2 FRFSE", "AX T2"), "siemens": ("t2_tse_tra", "t2_tse_tra_p2"),
              "philips": ("T2W_TSE_TRA", "T2_TSE_AX")},
    "ax_flair": {"ge": ("AX T2 FLAIR", "Ax FLAIR", "AX FLAIR"),
                 "siemens": ("t2_tirm_tra_dark-fluid", "t2_flair_tra", "t2_tirm_tra_dark-fluid_p2"),
                 "philips": ("T2W_FLAIR_TRA", "FLAIR_LongTR_TRA")},
    "ax_dwi": {"ge": ("AX DWI B1000", "Ax DWI 1000b", "AX DIFFUSION"),
               "siemens": ("ep2d_diff_3scan_trace_p2_TRACEW", "ep2d_diff_tra_TRACEW"),
               "philips": ("DWI_TRA_b1000", "DWI_SSh_TRA")},
    "ax_adc": {"ge": ("ADC", "Apparent Diffusion Coefficient (mm2/s)", "AX ADC"),
               "siemens": ("ep2d_diff_3scan_trace_p2_ADC", "ep2d_diff_tra_ADC"), "philips": ("dADC_TRA", "ADC_TRA")},
    "ax_swi": {"ge": ("AX SWAN", "Ax SWI"), "siemens": ("SWI_Images", "t2_swi_tra_p2_1.5mm"),
               "philips": ("SWIp_TRA", "SWI_TRA")},
    "ax_gre": {"ge": ("AX GRE T2*", "Ax T2* GRE"), "siemens": ("t2_fl2d_tra_hemo", "t2_de2d_tra"),
               "philips": ("T2_FFE_TRA", "T2*_FFE_AX")},
    "ax_t1_post": {"ge": ("AX T1 POST", "Ax T1 +C", "AX T1 SE POST"),
                   "siemens": ("t1_se_tra_post", "t1_tse_tra_KM"), "philips": ("T1W_SE_TRA_GD", "T1W_SE_TRA+C")},
    "sag_t1": {"ge": ("SAG T1", "Sag T1 FLAIR", "SAG T1 SE"), "siemens": ("t1_tse_sag", "t1_fl2d_sag"),
               "philips": ("T1W_TSE_SAG", "sT1W_SE_SAG")},
    "sag_mprage": {"ge": ("SAG 3D T1 BRAVO", "SAG T1 MPR", "Sag 3D T1"),
                   "siemens": ("t1_mprage_sag_p2_iso", "T1_MPRAGE_SAG"), "philips": ("T1W_3D_TFE_SAG", "3D_T1_SAG")},
    "sag_mprage_post": {"ge": ("SAG 3D T1 BRAVO +C", "SAG T1 MPR POST"),
                        "siemens": ("t1_mprage_sag_p2_iso_post", "T1_MPRAGE_SAG_KM"),
                        "philips": ("T1W_3D_TFE_SAG_GD", "3D_T1_SAG+C")},
    "cor_t2": {"ge": ("COR T2 FS", "Cor T2 FSE FS", "COR T2"), "siemens": ("t2_tse_cor_fs", "t2_tse_cor"),
               "philips": ("T2W_TSE_COR_SPAIR", "T2W_TSE_COR")},
    "cor_flair": {"ge": ("COR T2 FLAIR", "Cor FLAIR"), "siemens": ("t2_tirm_cor_dark-fluid", "t2_flair_cor"),
                  "philips": ("T2W_FLAIR_COR", "FLAIR_COR")},
    "cor_t1": {"ge": ("COR T1", "Cor T1 SE"), "siemens": ("t1_tse_cor", "t1_se_cor"), "philips": ("T1W_SE_COR",)},
    "cor_t1_post": {"ge": ("COR T1 POST", "Cor T1 +C FS", "COR T1 FS POST"),
                    "siemens": ("t1_tse_cor_fs_post", "t1_se_cor_KM"), "philips": ("T1W_SE_COR_GD", "T1W_SPIR_COR+C")},
    "sag_t1_post": {"ge": ("SAG T1 POST", "Sag T1 +C"), "siemens": ("t1_se_sag_post", "t1_tse_sag_KM"),
                    "philips": ("T1W_SE_SAG_GD",)},
    "ax_ssfp": {"ge": ("AX 3D FIESTA-C", "Ax FIESTA IAC"), "siemens": ("t2_ciss3d_tra", "t2_space_tra_iac"),
                "philips": ("3D_DRIVE_TRA", "T2W_DRIVE_IAC")},
}

# (sequence, plane) of each series kind.
SERIES_KINDS: dict[str, tuple[str, str]] = {
    "ax_t1": ("t1", "axial"), "ax_t2": ("t2", "axial"), "ax_flair": ("flair", "axial"), "ax_dwi": ("dwi", "axial"),
    "ax_adc": ("adc", "axial"), "ax_swi": ("swi", "axial"), "ax_gre": ("t2star", "axial"),
    "ax_t1_post": ("t1_post", "axial"), "sag_t1": ("t1", "sagittal"), "sag_mprage": ("mprage", "sagittal"),
    "sag_mprage_post": ("mprage_post", "sagittal"), "cor_t2": ("t2", "coronal"), "cor_flair": ("flair", "coronal"),
    "cor_t1": ("t1", "coronal"), "cor_t1_post": ("t1_post", "coronal"), "sag_t1_post": ("t1_post", "sagittal"),
    "ax_ssfp": ("ssfp", "axial"),
}


@dataclass(frozen=True)
class Protocol:
    """A study type: its description variants and series (required first, then optional)."""

    key: str  # short name, e.g. "brain_w_wo"
    descriptions: tuple[str, ...]  # study description variants
    required: tuple[tuple[str, ...], ...]  # groups of series kinds always acquired (one group drawn per slot)
    optional: tuple[str, ...]  # series kinds added with probability ``optional_p``
    optional_p: float = 0.5  # probability of each optional series
    contrast: bool = False  # gadolinium is given (post-contrast series may be added for findings)


# Alternatives inside a required slot are written as a tuple: ("sag_t1", "sag_mprage") = one of them.
PROTOCOLS: dict[str, Protocol] = {
    "brain_wo": Protocol(
        "brain_wo",
        ("MRI BRAIN WITHOUT CONTRAST", "MR BRAIN WO CONTRAST", "MRI HEAD WO", "MRI BRAIN WO"),
        (("ax_flair",), ("ax_t2",), ("ax_dwi",)),
        ("sag_t1", "ax_t1", "ax_swi", "cor_t2", "sag_mprage"),
        0.4,
    ),
    "brain_w_wo": Protocol(
        "brain_w_wo",
        ("MRI BRAIN WITH AND WITHOUT CONTRAST", "MR BRAIN W WO CONTRAST", "MRI BRAIN W/WO", "MRI HEAD W WO CONTRAST"),
        (("ax_flair",), ("ax_t1_post", "sag_mprage_post"), ("ax_t1", "sag_mprage")),
        ("ax_t2", "ax_dwi", "ax_swi", "cor_t1_post", "sag_t1"),
        0.5,
        True,
    ),
    "stroke": Protocol(
        "stroke",
        ("MRI BRAIN STROKE PROTOCOL", "MR STROKE BRAIN WO", "MRI BRAIN ACUTE STROKE"),
        (("ax_dwi",), ("ax_flair",), ("ax_swi", "ax_gre")),
        ("ax_t2", "sag_t1", "ax_t1"),
        0.4,
    ),
    "epilepsy": Protocol(
        "epilepsy",
        ("MRI BRAIN EPILEPSY PROTOCOL", "MR BRAIN SEIZURE PROTOCOL", "MRI BRAIN EPILEPSY WO"),
        (("sag_mprage",), ("cor_flair",), ("cor_t2",)),
        ("ax_flair", "ax_t2", "ax_dwi", "ax_swi"),
        0.5,
    ),
    "pituitary": Protocol(
        "pituitary",
        ("MRI PITUITARY W WO", "MR SELLA W WO CONTRAST", "MRI PITUITARY WITH AND WITHOUT CONTRAST"),
        (("cor_t1",), ("cor_t1_post",), ("sag_t1",)),
        ("cor_t2", "sag_t1_post", "ax_flair"),
        0.6,
        True,
    ),
    "iac": Protocol(
        "iac",
        ("MRI IAC W WO", "MR INTERNAL AUDITORY CANALS W WO", "MRI IAC WITH AND WITHOUT CONTRAST"),
        (("ax_ssfp",), ("ax_t1_post",), ("ax_flair",)),
        ("ax_t1", "cor_t1_post", "ax_dwi"),
        0.5,
        True,
    ),
}

BASE_PROTOCOL_WEIGHTS = {"brain_wo": 0.40, "brain_w_wo": 0.35, "stroke": 0.10, "epilepsy": 0.07, "pituitary": 0.04,
                         "iac": 0.04}

# Diagnosis-key prefixes (or keys) that make an ordering physician pick a protocol more often.
PROTOCOL_AFFINITY: dict[str, tuple[str, ...]] = {
    "pituitary": ("sellar_",),
    "iac": ("tumor_adult_schwannoma",),
    "stroke": ("vascular_ischemic_", "vascular_hemorrhagic_"),
    "epilepsy": ("developmental_", "structural_encephalomalacia"),
    "brain_w_wo": ("tumor_", "infectious_", "inflammatory_", "surgical_resection_cavity", "vascular_malformation_"),
}


AFFINITY_BOOST = 1.5  # added to a protocol's base weight when a finding matches its affinity


def choose_protocol(rng: np.random.Generator, finding_keys: list[str]) -> Protocol:
    """Pick a protocol for a study.

    Args:
        rng: source of the draw.
        finding_keys: the study's diagnoses, which raise the weight of the protocols they are usually
            ordered with (``PROTOCOL_AFFINITY``); [] draws from ``BASE_PROTOCOL_WEIGHTS`` alone (a
            normal study, or a protocol-blind one).

    Returns:
        The chosen protocol.
    """
    weights = dict(BASE_PROTOCOL_WEIGHTS)
    for protocol, prefixes in PROTOCOL_AFFINITY.items():
        if any(k.startswith(p) for k in finding_keys for p in prefixes):
            weights[protocol] += AFFINITY_BOOST
    keys = list(weights)
    p = np.array([weights[k] for k in keys])
    return PROTOCOLS[keys[int(rng.choice(len(keys), p=p / p.sum()))]]


PRIMARY_SEQUENCE_P = 0.8  # chance a finding's best sequence is added when the protocol lacks it
OTHER_SEQUENCE_P = 0.3  # the same for its other key sequences


def wanted_sequences(key_sequences: list[tuple[str, ...]]) -> dict[str, float]:
    """Chance of adding each sequence to a protocol that lacks it, from the findings' key sequences
    (each tuple best first)."""
    wanted: dict[str, float] = {}
    for sequences in key_sequences:
        for rank, sequence in enumerate(sequences):
            p = PRIMARY_SEQUENCE_P if rank == 0 else OTHER_SEQUENCE_P
            wanted[sequence] = max(wanted.get(sequence, 0.0), p)
    return wanted


# Truncation order when a study has more series than ``max_series`` (lowest rank dropped first, the
# latest-acquired first within a rank): optional non-contrast extras, optional extra post-contrast
# planes, series added for the findings, then the protocol's required non-contrast series. A
# contrast protocol's required post-contrast series is never dropped: the gadolinium was given.
_DROP_RANK: dict[tuple[str, bool], int | None] = {  # (role, post-contrast) -> rank; None = never dropped
    ("optional", False): 0, ("optional", True): 1, ("finding", False): 2, ("finding", True): 2,
    ("required", False): 3, ("required", True): None}


def _fit_series(units: list[tuple[list[str], int | None]], max_series: int) -> list[str]:
    """Drop whole units (a DWI with its ADC map is one unit) by ``_DROP_RANK`` until ``max_series`` fit.

    Within the lowest rank a single series goes before a DWI + ADC pair when one series is all that is
    over, so the ADC stays with its DWI where possible; the ADC alone goes only when dropping the pair
    would leave fewer than 2 series.
    """
    units = [(list(kinds), rank) for kinds, rank in units]
    while (total := sum(len(kinds) for kinds, _ in units)) > max_series:
        droppable = [i for i, (_, rank) in enumerate(units) if rank is not None]
        lowest = min(units[i][1] for i in droppable)
        same = [i for i in droppable if units[i][1] == lowest]
        fitting = [i for i in same if len(units[i][0]) <= total - max_series]
        victim = (fitting or same)[-1]
        if total - len(units[victim][0]) < 2:
            units[victim][0].pop()  # the ADC map of a DWI + ADC pair
        else:
            del units[victim]
    return [k for kinds, _ in units for k in kinds]


def draw_series_kinds(rng: np.random.Generator, protocol: Protocol, wanted: dict[str, float] | None = None,
                      max_series: int = 8) -> list[str]:
    """Series kinds of one study, in acquisition order (DWI brings its ADC map along).

    Args:
        rng: source of every draw.
        protocol: the study's protocol: its required slots are always filled, each optional series is
            added with ``protocol.optional_p``.
        wanted: sequences the findings are best seen on -> chance of adding them when the protocol
            lacks them (see ``wanted_sequences``), so findings are usually, not always, imaged with
            their best contrast; None or {} draws the protocol alone (label-blind).
        max_series: most series kept (2..8); extras are dropped first (``_DROP_RANK``), never the
            required post-contrast series of a contrast protocol.

    Returns:
        2 to ``max_series`` kinds, post-contrast series last and the ADC map right after its DWI.
    """
    if not 2 <= max_series <= 8:
        raise ValueError(f"max_series must be in [2, 8], got {max_series}")
    role: dict[str, str] = {}
    for group in protocol.required:
        role.setdefault(str(group[int(rng.integers(len(group)))]), "required")
    for k in protocol.optional:
        if rng.random() < protocol.optional_p:
            role.setdefault(k, "optional")
    have = {SERIES_KINDS[k][0] for k in role}
    for sequence, p in sorted((wanted or {}).items()):
        if sequence == "adc":
            sequence = "dwi"  # the ADC map comes with its DWI
        if sequence in have or (sequence in POST_CONTRAST and not protocol.contrast):
            continue  # no gadolinium in a non-contrast protocol
        candidates = [k for k, (seq, _) in SERIES_KINDS.items() if seq == sequence]
        if candidates and rng.random() < p:
            role.setdefault(candidates[int(rng.integers(len(candidates)))], "finding")
            have.add(sequence)
    # Contrast goes last, as it is acquired; ADC follows DWI.
    ordered = sorted(role, key=lambda k: SERIES_KINDS[k][0] in POST_CONTRAST)
    units = [(["ax_dwi", "ax_adc"] if k == "ax_dwi" else [k],
              _DROP_RANK[role[k], SERIES_KINDS[k][0] in POST_CONTRAST]) for k in ordered]
    return _fit_series(units, max_series)


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# Default ("modest") size: what preprocessing keeps anyway (256 in-plane, >= 4 mm through-plane), so
# in-plane matrices are capped at 256 and 3D/SWI stacks are reconstructed as thicker slices.
MODEST_MAX_MATRIX = 256
MODEST_MIN_3D_THICKNESS_MM = 3.0

# Training ranges of the draws a shifted data set moves (``training.synth.shift``).
SNR_RANGE = (20.0, 45.0)  # white-matter SNR
DWI_SNR_RANGE = (12.0, 22.0)  # the same for DWI (and its ADC map)
# Sequence -> drawn timing parameter -> its range, ms (SSFP's TR and TE are fixed).
_SPIN_ECHO_T1 = {"tr_ms": (400.0, 700.0), "te_ms": (8.0, 15.0)}
_DIFFUSION = {"tr_ms": (4000.0, 8000.0), "te_ms": (65.0, 95.0)}
_MPRAGE = {"tr_ms": (1900.0, 2400.0), "te_ms": (2.5, 4.0)}
TIMING_RANGES_MS: dict[str, dict[str, tuple[float, float]]] = {
    "t1": _SPIN_ECHO_T1, "t1_post": _SPIN_ECHO_T1, "t2": {"tr_ms": (3000.0, 6000.0), "te_ms": (85.0, 110.0)},
    "flair": {"tr_ms": (8000.0, 11000.0), "te_ms": (100.0, 140.0)}, "dwi": _DIFFUSION, "adc": _DIFFUSION,
    "swi": {"tr_ms": (27.0, 40.0), "te_ms": (20.0, 30.0)}, "t2star": {"tr_ms": (500.0, 800.0), "te_ms": (15.0, 25.0)},
    "mprage": _MPRAGE, "mprage_post": _MPRAGE,
}


@dataclass(frozen=True)
class ResolutionRange:
    """Training range of a family of series' final geometry: everything ``make_series_spec`` gives at shift 0."""

    thickness_mm: tuple[float, float]  # slice thickness
    pixel_mm: tuple[float, float]  # in-plane pixel size (the larger of the two, for a non-square pixel)


# Echo-planar diffusion (DWI, ADC): 128-192 matrices over 220-250 mm, 4-5 mm slices, either size.
EPI_RESOLUTION = ResolutionRange((4.0, 5.0), (220.0 / 192.0, 250.0 / 128.0))
# Every other series, (modest, full resolution): 2.5 mm sellar to 6 mm 2D slices (3D and SWI at >= 3 mm
# when modest, down to the 0.8 mm SSFP when not); pixels from a 160 mm field of view on 256 (512) to
# a 256 mm MPRAGE on 256.
RESOLUTION = {
    False: ResolutionRange((2.5, 6.0), (160.0 / 256.0, 1.0)),
    True: ResolutionRange((0.8, 6.0), (160.0 / 512.0, 1.0)),
}


def resolution_range(sequence: str, full_resolution: bool = False) -> ResolutionRange:
    """The training range of the geometry of ``sequence``'s series (``EPI_RESOLUTION`` or ``RESOLUTION``)."""
    return EPI_RESOLUTION if sequence in ("dwi", "adc") else RESOLUTION[full_resolution]


def _coarser(matrix: tuple[int, int], fov_mm: tuple[float, float], thickness: float, span: ResolutionRange,
             shift: float) -> tuple[tuple[int, int], float]:
    """Matrix and slice thickness moved beyond ``span`` (same field of view): pixel and slice of every
    shifted series are at least as coarse as those of the coarsest training series of its family."""
    pixel = max(f / m for f, m in zip(fov_mm, matrix))
    target = beyond(pixel, *span.pixel_mm, shift)
    # Rounding the matrix down keeps every pixel at least ``target``.
    return tuple(int(f // target) for f in fov_mm), float(beyond(thickness, *span.thickness_mm, shift))


def make_series_spec(rng: np.random.Generator, kind: str, vendor: str, full_resolution: bool = False,
                     shift: float = 0.0) -> SeriesSpec:
    """Draw one series' name, geometry and timing for ``kind`` in ``vendor``'s naming style.

    Args:
        rng: source of every draw (the same draws are made whatever ``full_resolution`` and ``shift`` are).
        kind: a key of ``SERIES_KINDS``.
        vendor: one of ``VENDORS``.
        full_resolution: keep 320-512 matrices and ~1 mm 3D slices; otherwise cap matrices at 256
            (same field of view) and 3D/SWI slice thickness at >= 3 mm (a thick reformat).
        shift: 0 draws the training ranges; > 0 moves SNR (down), TR and TE (both ways, log scale), slice
            thickness and pixel size (up, beyond ``resolution_range``) outside them (``training.synth.shift``).

    Raises:
        ValueError: an unknown ``kind`` or ``vendor``, or a bad ``shift``.
    """
    if kind not in SERIES_KINDS:
        raise ValueError(f"unknown series kind {kind!r}")
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; expected one of {VENDORS}")
    check_shift(shift)
    sequence, plane = SERIES_KINDS[kind]

    def timing(parameter: str) -> float:
        low, high = TIMING_RANGES_MS[sequence][parameter]
        return beyond(rng.uniform(low, high), low, high, shift, "both", "log")

    name = str(_choice(rng, SERIES_NAMES[kind][vendor]))
    fov = float(rng.uniform(220.0, 250.0))
    # Rectangular matrices put fewer columns across the narrower left-right extent of the head.
    matrix = _choice(rng, [(256, 256), (256, 256), (256, 256), (320, 320), (288, 384), (512, 512)])
    thickness = float(_choice(rng, [3.0, 4.0, 5.0, 5.0, 6.0]))
    gap = float(_choice(rng, [0.0, 0.5, 1.0, 1.0, 1.5]))
    timing_ms: dict = {}
    snr = float(beyond(rng.uniform(*SNR_RANGE), *SNR_RANGE, shift, scale="inverse"))
    if sequence in ("t1", "t1_post", "t2"):
        timing_ms = dict(tr_ms=timing("tr_ms"), te_ms=timing("te_ms"))
    elif sequence == "flair":
        tr = timing("tr_ms")
        # Inversion time chosen to null CSF (T1 ~ 4000 ms) at this TR, with scanner-to-scanner spread.
        ti = 4000.0 * np.log(2.0 / (1.0 + np.exp(-tr / 4000.0))) * rng.uniform(0.96, 1.04)
        timing_ms = dict(tr_ms=tr, te_ms=timing("te_ms"), ti_ms=ti)
    elif sequence in ("dwi", "adc"):
        matrix = _choice(rng, [(128, 128), (160, 160), (192, 192)])
        thickness, gap = float(_choice(rng, [4.0, 5.0])), 1.0
        timing_ms = dict(tr_ms=timing("tr_ms"), te_ms=timing("te_ms"))
        snr = float(beyond(rng.uniform(*DWI_SNR_RANGE), *DWI_SNR_RANGE, shift, scale="inverse"))
    elif sequence == "swi":
        matrix, thickness, gap = _choice(rng, [(256, 256), (256, 320)]), float(_choice(rng, [1.5, 2.0, 2.5])), 0.0
        timing_ms = dict(tr_ms=timing("tr_ms"), te_ms=timing("te_ms"), flip_deg=15.0)
    elif sequence == "t2star":
        timing_ms = dict(tr_ms=timing("tr_ms"), te_ms=timing("te_ms"), flip_deg=20.0)
    elif sequence in ("mprage", "mprage_post"):
        matrix, fov = (256, 256), float(rng.uniform(240, 256))
        thickness, gap = float(_choice(rng, [1.0, 1.0, 1.2])), 0.0
        timing_ms = dict(tr_ms=timing("tr_ms"), te_ms=timing("te_ms"), ti_ms=rng.uniform(900, 1100), flip_deg=9.0)
    elif sequence == "ssfp":
        matrix, fov, thickness, gap = (256, 256), float(rng.uniform(160, 200)), float(_choice(rng, [0.8, 1.0])), 0.0
        timing_ms = dict(tr_ms=6.0, te_ms=3.0, flip_deg=60.0)
    target, coverage = "", 0.0
    if kind in ("cor_t1", "cor_t1_post", "sag_t1_post"):
        # Sellar series: thin slices, small field of view, a slab around the sella.
        fov, thickness = float(rng.uniform(160, 200)), float(_choice(rng, [2.5, 3.0]))
        gap = float(_choice(rng, [0.0, 0.3]))
        target, coverage = "sella", float(rng.uniform(36.0, 50.0))
    if sequence == "ssfp":
        target, coverage = "iac", float(rng.uniform(30.0, 45.0))
    if kind == "ax_t1_post" and rng.random() < 0.3:
        thickness, gap = 3.0, 0.0
    if not full_resolution:
        if max(matrix) > MODEST_MAX_MATRIX:
            matrix = tuple(int(round(m * MODEST_MAX_MATRIX / max(matrix))) for m in matrix)
        if sequence in ("mprage", "mprage_post", "ssfp", "swi"):
            thickness = max(thickness, MODEST_MIN_3D_THICKNESS_MM)
    fov_mm = (fov * matrix[0] / max(matrix), fov * matrix[1] / max(matrix))
    if shift:  # (not at 0: the floor of fov / pixel need not give back the drawn matrix)
        matrix, thickness = _coarser(matrix, fov_mm, thickness, resolution_range(sequence, full_resolution), shift)
    fat_sat = kind in ("cor_t2", "cor_t1_post") and ("FS" in name or "fs" in name or "SPAIR" in name or "SPIR" in name)
    return SeriesSpec(
        name=name, sequence=sequence, plane=plane, matrix=tuple(int(m) for m in matrix), fov_mm=fov_mm,
        slice_thickness_mm=thickness, slice_gap_mm=gap, snr=snr, fat_sat=fat_sat, target=target, coverage_mm=coverage,
        **{k: float(v) for k, v in timing_ms.items()},
    )
