"""One synthetic study end to end: subject -> pathology -> protocol -> series -> report and labels.

Every random draw comes from a ``numpy.random.SeedSequence`` built from ``(seed, study_index)`` and
split into independent streams (subject, pathology, protocol, series, report), so a study depends only
on the seed and its index, never on which worker made it or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from prima.labels import default_label_space
from training.synth.anatomy import make_subject
from training.synth.pathology import KEY_SEQUENCES, apply_findings, sample_diagnoses
from training.synth.phantom import Finding
from training.synth.protocols import (
    VENDORS,
    choose_protocol,
    draw_series_kinds,
    make_series_spec,
    wanted_sequences,
)
from training.synth.reports import write_report
from training.synth.sequences import SeriesSpec, simulate_series

SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))  # by patient


@dataclass
class SimulatedSeries:
    """One series of a synthetic study, on its own grid."""

    name: str  # series description (unique within the study)
    kind: str  # protocol series kind, e.g. "ax_flair"
    spec: SeriesSpec  # contrast, geometry and timing it was simulated with
    volume: np.ndarray  # float32 (columns, rows, slices)
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    masks: dict[str, np.ndarray]  # diagnosis key -> bool mask on this grid (empty dict for normal studies)


@dataclass
class SyntheticStudy:
    """Everything the writers need for one study."""

    study_id: str  # e.g. "S0000042"
    patient_id: str  # e.g. "P0000042" (one study per synthetic patient)
    split: str  # "train", "val" or "test", drawn per patient
    study_description: str  # e.g. "MRI BRAIN WITH AND WITHOUT CONTRAST"
    protocol: str  # protocol key, e.g. "brain_w_wo"
    vendor: str  # naming style of the series descriptions
    series: list[SimulatedSeries]
    findings: list[Finding]  # placed diagnoses, including co-occurring ones pathology added
    report: str  # itemised findings text
    labels: dict[str, int]  # all 52 diagnosis keys -> 0/1
    priority: str  # "low" | "medium" | "high"
    referrals: list[str]  # referral keys
    subject: dict = field(default_factory=dict)  # the subject's random draws (age, sex, ...)


def study_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators of study ``index`` under ``seed``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    names = ("subject", "pathology", "protocol", "series", "report", "split")
    children = np.random.SeedSequence([seed, index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def _split_of(rng: np.random.Generator) -> str:
    u = rng.random()
    for name, fraction in SPLIT_FRACTIONS:
        if u < fraction:
            return name
        u -= fraction
    return SPLIT_FRACTIONS[-1][0]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def generate_study(
    seed: int, index: int, *, spacing: float = 1.5, keys: list[str] | None = None, max_series: int = 8,
    full_resolution: bool = False,
) -> SyntheticStudy:
    """Generate study ``index`` of the data set drawn with ``seed``.

    Args:
        seed: data-set seed.
        index: study number within the data set (>= 0).
        spacing: phantom voxel size in mm (1.5 by default; coarser is faster, for tests).
        keys: force these diagnosis keys instead of sampling them (``[]`` forces a normal study).
        max_series: most series in the study (2..8).
        full_resolution: scanner-native matrices and 1 mm 3D series instead of the modest default.
    """
    if not 2 <= max_series <= 8:
        raise ValueError(f"max_series must be in [2, 8], got {max_series}")
    space = default_label_space()
    if keys is not None:
        unknown = [k for k in keys if k not in space.diagnosis_keys]
        if unknown:
            raise ValueError(f"unknown diagnosis keys {unknown}")
    rngs = study_streams(seed, index)
    phantom = make_subject(rngs["subject"], spacing=spacing)
    requested = list(keys) if keys is not None else list(sample_diagnoses(rngs["pathology"]))
    if requested:
        apply_findings(phantom, requested, rngs["pathology"])
    positives = sorted({f.key for f in phantom.findings} | set(requested), key=space.diagnosis_keys.index)

    vendor = VENDORS[int(rngs["protocol"].integers(len(VENDORS)))]
    protocol = choose_protocol(rngs["protocol"], positives)
    sequences = wanted_sequences([KEY_SEQUENCES[k] for k in positives])
    kinds = draw_series_kinds(rngs["protocol"], protocol, sequences, max_series=max_series)
    description = protocol.descriptions[int(rngs["protocol"].integers(len(protocol.descriptions)))]

    series: list[SimulatedSeries] = []
    taken: set[str] = set()
    dwi: SimulatedSeries | None = None
    for kind in kinds:
        spec = make_series_spec(rngs["protocol"], kind, vendor, full_resolution)
        geometry = None
        if kind == "ax_adc" and dwi is not None:
            # The ADC map is computed from the DWI acquisition: same grid and timing, its own name.
            geometry = (dwi.affine, dwi.volume.shape)
            spec = replace(dwi.spec, name=spec.name, sequence="adc")
        volume, affine, masks = simulate_series(phantom, spec, rngs["series"], geometry=geometry)
        series.append(SimulatedSeries(_unique(spec.name, taken), kind, spec, volume, affine, masks))
        if kind == "ax_dwi":
            dwi = series[-1]

    return SyntheticStudy(
        study_id=f"S{index:07d}",
        patient_id=f"P{index:07d}",
        split=_split_of(rngs["split"]),
        study_description=description,
        protocol=protocol.key,
        vendor=vendor,
        series=series,
        findings=list(phantom.findings),
        report=write_report(list(phantom.findings), rngs["report"]),
        labels={k: int(k in positives) for k in space.diagnosis_keys},
        priority=space.priority_of(positives),
        referrals=space.referrals_of(positives),
        subject=dict(phantom.subject),
    )

