"""One synthetic study end to end: subject -> pathology -> protocol -> series -> report and labels.

Every random draw comes from a ``numpy.random.SeedSequence`` built from ``(seed, study_index)`` and
split into independent streams (subject, pathology, protocol, series, report, split), so a study depends
only on the seed and its index, never on which worker made it or in which order. A stratified data set
(``stratified_primaries``) fixes each abnormal study's primary diagnosis beforehand from the draws of all
``n`` studies, so there a study depends on the seed, its index and ``n``.

``plan_study`` draws everything but the images (the painted phantom, labels, split, protocol, series
names and parameters, report); ``generate_study`` simulates the planned series. Both take the same
arguments, so a plan is exactly the metadata of the study ``generate_study`` makes from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import numpy as np

from prima.labels import default_label_space
from prima.manifest import unique_series_name
from training.synth.anatomy import make_subject
from training.synth.pathology import (
    DIAGNOSES,
    KEY_SEQUENCES,
    apply_findings,
    check_primary,
    draws_unremarkable,
    primary_weights,
    sample_diagnoses,
)
from training.synth.phantom import Finding, Phantom
from training.synth.protocols import (
    VENDORS,
    choose_protocol,
    draw_series_kinds,
    make_series_spec,
    wanted_sequences,
)
from training.synth.reports import write_report
from training.synth.sequences import SeriesSpec, simulate_series
from training.synth.shift import check_shift

SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))  # by patient; the default of ``split_fractions``

# Data-set setting -> the splits whose studies are drawn protocol-blind. Real protocols follow the
# indication, which training may learn from; evaluation splits must not be readable off the metadata.
PROTOCOL_BLIND_SPLITS: dict[str, frozenset[str]] = {
    "heldout": frozenset({"val", "test"}),
    "all": frozenset({"train", "val", "test"}),
    "none": frozenset(),
}
DEFAULT_PROTOCOL_BLIND = "heldout"


@dataclass
class PlannedSeries:
    """One series of a study before it is simulated."""

    name: str  # series description (unique within the study)
    kind: str  # protocol series kind, e.g. "ax_flair"
    spec: SeriesSpec  # contrast, geometry and timing it will be simulated with


@dataclass
class SimulatedSeries:
    """One series of a synthetic study, on its own grid."""

    name: str  # series description (unique within the study)
    kind: str  # protocol series kind, e.g. "ax_flair"
    spec: SeriesSpec  # contrast, geometry and timing it was simulated with
    volume: np.ndarray  # float32 (columns, rows, slices)
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    masks: dict[str, np.ndarray]  # diagnosis key -> bool mask on this grid (empty dict for normal studies)


@dataclass(kw_only=True)
class StudyMetadata:
    """What a study's manifest line says: the same for its plan and for the generated study."""

    study_id: str  # e.g. "S0000042"
    patient_id: str  # e.g. "P0000042" (one study per synthetic patient)
    split: str  # "train", "val" or "test", drawn per patient
    study_description: str  # e.g. "MRI BRAIN WITH AND WITHOUT CONTRAST"
    protocol: str  # protocol key, e.g. "brain_w_wo"
    vendor: str  # naming style of the series descriptions
    findings: list[Finding]  # placed diagnoses, including co-occurring ones pathology added
    report: str  # itemised findings text
    labels: dict[str, int]  # all 52 diagnosis keys -> 0/1
    priority: str  # "low" | "medium" | "high"
    referrals: list[str]  # referral keys
    subject: dict = field(default_factory=dict)  # the subject's random draws (age, sex, ...)
    protocol_blind: bool = False  # protocol and series drawn independently of the labels


@dataclass(kw_only=True)
class StudyPlan(StudyMetadata):
    """A study without its images: its metadata, its series to simulate and the phantom to image."""

    series: list[PlannedSeries]
    phantom: Phantom  # the painted subject the series are simulated from


@dataclass(kw_only=True)
class SyntheticStudy(StudyMetadata):
    """Everything the writers need for one study."""

    series: list[SimulatedSeries]


def study_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators of study ``index`` under ``seed``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    names = ("subject", "pathology", "protocol", "series", "report", "split")
    children = np.random.SeedSequence([seed, index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def split_table(split_fractions: Sequence[float] | None = None) -> tuple[tuple[str, float], ...]:
    """``(("train", f), ("val", f), ("test", f))`` from three fractions (None: ``SPLIT_FRACTIONS``).

    A larger test fraction is how a data set of modest size gets enough positives of every label in its test
    split (with ``stratify``, about 52 x 5 abnormal test studies for 5 positives a label); ``(0, 0, 1)`` makes
    a test-only set.

    Raises:
        ValueError: not three fractions, a negative one, or a sum other than 1.
    """
    if split_fractions is None:
        return SPLIT_FRACTIONS
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != len(SPLIT_FRACTIONS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {split_fractions}")
    return tuple((name, fraction) for (name, _), fraction in zip(SPLIT_FRACTIONS, fractions))


def _split_of(rng: np.random.Generator, split_fractions: Sequence[float] | None = None) -> str:
    table = split_table(split_fractions)
    u = rng.random()
    for name, fraction in table:
        if u < fraction:
            return name
        u -= fraction
    return table[-1][0]


def study_split(seed: int, index: int, split_fractions: Sequence[float] | None = None) -> str:
    """The split of study ``index`` under ``seed``: its own stream, so no other setting changes it (only the
    fractions move the boundaries)."""
    return _split_of(study_streams(seed, index)["split"], split_fractions)


def stratified_primaries(seed: int, n: int, *, balance: float = 0.0, primary: Sequence[str] | None = None,
                         split_fractions: Sequence[float] | None = None) -> list[str | None]:
    """The primary diagnosis of each of the ``n`` studies of a stratified data set (None for a normal one).

    Drawn independently, a label of expected count 1 in a split has no positive there one time in three
    (e^-1), and a rare label can miss the training split. Here the abnormal studies of each split share out
    the labels in proportion to ``primary_weights(balance, primary)``: a label gets its expected count
    rounded down, the largest remainders one more (ties in a random order), so with uniform weights every
    label is the primary diagnosis of a split as soon as the split has as many abnormal studies as there
    are labels. The labels are then dealt to the split's abnormal studies in a random order. Which studies
    are normal and in which split a study lies are the draws of the unstratified data set.

    Args:
        seed: data-set seed.
        n: number of studies in the data set.
        balance: label balancing (``pathology.primary_weights``).
        primary: only these diagnosis keys as primary diagnoses, every study abnormal (as in ``plan_study``).
        split_fractions: train, val and test fractions (``split_table``; None: ``SPLIT_FRACTIONS``).

    Returns:
        ``n`` entries, in study order: a diagnosis key for an abnormal study, None for a normal one.

    Raises:
        ValueError: ``n < 1``, a bad ``balance``, ``primary`` or ``split_fractions``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    table = split_table(split_fractions)
    probabilities = primary_weights(balance, primary)
    keys = list(DIAGNOSES)
    by_split: dict[str, list[int]] = {}
    for index in range(n):
        streams = study_streams(seed, index)
        split = _split_of(streams["split"], split_fractions)
        if primary is not None or not draws_unremarkable(streams["pathology"]):
            by_split.setdefault(split, []).append(index)
    primaries: list[str | None] = [None] * n
    for number, (split, _) in enumerate(table):
        abnormal = by_split.get(split, [])
        rng = np.random.default_rng(np.random.SeedSequence([seed, n, number]))
        expected = probabilities * len(abnormal)
        counts = np.floor(expected).astype(int)
        remainders = expected - counts
        order = rng.permutation(len(keys))  # ties between equal remainders in a random order
        ranked = order[np.argsort(-remainders[order], kind="stable")]
        counts[ranked[: len(abnormal) - counts.sum()]] += 1
        dealt = rng.permutation(np.repeat(np.arange(len(keys)), counts))
        for index, key in zip(abnormal, dealt):
            primaries[index] = keys[key]
    return primaries


def is_protocol_blind(setting: str, split: str) -> bool:
    """Whether a study of ``split`` is drawn protocol-blind under the data-set ``setting``.

    Args:
        setting: a key of ``PROTOCOL_BLIND_SPLITS`` ("heldout", "all" or "none").
        split: "train", "val" or "test".

    Returns:
        True when ``split`` is one of the setting's blind splits.
    """
    if setting not in PROTOCOL_BLIND_SPLITS:
        raise ValueError(f"protocol-blind setting must be one of {sorted(PROTOCOL_BLIND_SPLITS)}, got {setting!r}")
    return split in PROTOCOL_BLIND_SPLITS[setting]


def plan_study(
    seed: int, index: int, *, protocol_blind: bool = False, spacing: float = 1.5, keys: list[str] | None = None,
    max_series: int = 8, full_resolution: bool = False, balance: float = 0.0, shift: float = 0.0,
    primary: Sequence[str] | None = None, primary_key: str | None = None,
    split_fractions: Sequence[float] | None = None,
) -> StudyPlan:
    """Plan study ``index`` of the data set drawn with ``seed``: everything but the images.

    The labels depend on the painted phantom (edema and mass effect follow the lesions' drawn size and
    grid), so the subject is built and painted at ``spacing``; a coarse one (6 mm) makes this cheap
    (~15 ms) and gives exactly the plan of ``generate_study`` at that spacing.

    Args:
        seed: data-set seed.
        index: study number within the data set (>= 0).
        protocol_blind: draw protocol, series kinds and series count from the base protocol weights,
            without the findings' key sequences, so that they say nothing about the labels.
        spacing: phantom voxel size in mm (1.5 by default; coarser is faster).
        keys: force these diagnosis keys instead of sampling them (``[]`` forces a normal study).
        max_series: most series in the study (2..8).
        full_resolution: scanner-native matrices and 1 mm 3D series instead of the modest default.
        balance: label balancing of the sampled primary diagnosis, 0 (clinical frequencies) .. 1
            (uniform over the labels); see ``pathology.primary_weights``. Ignored with ``keys``.
        primary: draw the primary diagnosis among these keys only, every study abnormal
            (``pathology.sample_diagnoses``). Ignored with ``keys``.
        primary_key: the primary diagnosis if the study is abnormal, from ``stratified_primaries``
            (whether it is normal stays its own draw; ``pathology.sample_diagnoses``). Ignored with ``keys``.
        split_fractions: train, val and test fractions of the data set (``split_table``; None: 0.8, 0.1, 0.1).
        shift: 0 draws the training ranges; > 0 draws pose, size, elastic deformation, property jitter,
            SNR, TR/TE and resolution (and, when generated, the bias field) beyond them, by that many range
            widths (``training.synth.shift``). The same random draws are made: split, age, sex and the
            other subject draws are those of ``shift == 0``, and so are a protocol-blind study's protocol
            and series; lesions are placed on the shifted head, so their place, the report and (rarely)
            the labels, with an indication-driven protocol, can differ.

    Returns:
        The plan; ``generate_study`` with the same arguments simulates exactly these series.

    Raises:
        ValueError: ``max_series`` outside [2, 8], ``balance`` outside [0, 1], ``shift`` outside
            [0, ``shift.MAX_SHIFT``], unknown ``keys``, a bad ``primary`` or ``primary_key``.
    """
    if not 2 <= max_series <= 8:
        raise ValueError(f"max_series must be in [2, 8], got {max_series}")
    primary_weights(balance)  # validates balance before any work
    check_primary(primary)
    check_shift(shift)
    space = default_label_space()
    if keys is not None:
        unknown = [k for k in keys if k not in space.diagnosis_keys]
        if unknown:
            raise ValueError(f"unknown diagnosis keys {unknown}")
    rngs = study_streams(seed, index)
    split = _split_of(rngs["split"], split_fractions)
    phantom = make_subject(rngs["subject"], spacing=spacing, shift=shift)
    requested = list(keys) if keys is not None else list(sample_diagnoses(rngs["pathology"], balance, primary,
                                                                                 primary_key))
    if requested:
        apply_findings(phantom, requested, rngs["pathology"])
    positives = sorted({f.key for f in phantom.findings} | set(requested), key=space.diagnosis_keys.index)

    # A blind study orders as for a normal one: no protocol affinity, no added key sequences. Every
    # draw below then comes from the protocol stream alone, whose use no longer depends on the labels.
    indication = [] if protocol_blind else positives
    vendor = VENDORS[int(rngs["protocol"].integers(len(VENDORS)))]
    protocol = choose_protocol(rngs["protocol"], indication)
    wanted = wanted_sequences([KEY_SEQUENCES[k] for k in indication])
    kinds = draw_series_kinds(rngs["protocol"], protocol, wanted, max_series=max_series)
    description = protocol.descriptions[int(rngs["protocol"].integers(len(protocol.descriptions)))]

    series: list[PlannedSeries] = []
    taken: set[str] = set()
    dwi: SeriesSpec | None = None
    for kind in kinds:
        spec = make_series_spec(rngs["protocol"], kind, vendor, full_resolution, shift)
        if kind == "ax_adc" and dwi is not None:
            # The ADC map is computed from the DWI acquisition: same grid and timing, its own name.
            spec = replace(dwi, name=spec.name, sequence="adc")
        series.append(PlannedSeries(unique_series_name(spec.name, taken), kind, spec))
        if kind == "ax_dwi":
            dwi = spec

    findings = list(phantom.findings)
    return StudyPlan(
        study_id=f"S{index:07d}",
        patient_id=f"P{index:07d}",
        split=split,
        protocol_blind=protocol_blind,
        study_description=description,
        protocol=protocol.key,
        vendor=vendor,
        series=series,
        findings=findings,
        report=write_report(findings, rngs["report"], {s.spec.sequence for s in series}),
        labels={k: int(k in positives) for k in space.diagnosis_keys},
        priority=space.priority_of(positives),
        referrals=space.referrals_of(positives),
        subject=dict(phantom.subject),
        phantom=phantom,
    )


def generate_study(
    seed: int, index: int, *, protocol_blind: bool = False, spacing: float = 1.5, keys: list[str] | None = None,
    max_series: int = 8, full_resolution: bool = False, balance: float = 0.0, shift: float = 0.0,
    primary: Sequence[str] | None = None, primary_key: str | None = None,
    split_fractions: Sequence[float] | None = None,
) -> SyntheticStudy:
    """Generate study ``index`` of the data set drawn with ``seed``: ``plan_study``, then its images.

    Args:
        seed: data-set seed.
        index: study number within the data set (>= 0).
        protocol_blind: protocol and series independent of the labels (see ``plan_study``).
        spacing: phantom voxel size in mm (1.5 by default; coarser is faster, for tests).
        keys: force these diagnosis keys instead of sampling them (``[]`` forces a normal study).
        max_series: most series in the study (2..8).
        full_resolution: scanner-native matrices and 1 mm 3D series instead of the modest default.
        balance: label balancing of the sampled primary diagnosis (see ``plan_study``).
        primary: the primary diagnosis among these keys only (see ``plan_study``).
        primary_key: the primary diagnosis if the study is abnormal (see ``plan_study``).
        shift: draws beyond the training ranges (see ``plan_study``), the bias field's strength included.
        split_fractions: train, val and test fractions (see ``plan_study``).

    Returns:
        The study with its simulated series and masks.
    """
    plan = plan_study(seed, index, protocol_blind=protocol_blind, spacing=spacing, keys=keys,
                      max_series=max_series, full_resolution=full_resolution, balance=balance, shift=shift,
                      primary=primary, primary_key=primary_key, split_fractions=split_fractions)
    rng = study_streams(seed, index)["series"]
    series: list[SimulatedSeries] = []
    dwi: SimulatedSeries | None = None
    for planned in plan.series:
        geometry = None
        if planned.kind == "ax_adc" and dwi is not None:
            geometry = (dwi.affine, dwi.volume.shape)  # the ADC map shares its DWI's grid
        volume, affine, masks = simulate_series(plan.phantom, planned.spec, rng, geometry=geometry, shift=shift)
        series.append(SimulatedSeries(planned.name, planned.kind, planned.spec, volume, affine, masks))
        if planned.kind == "ax_dwi":
            dwi = series[-1]
    metadata = {item.name: getattr(plan, item.name) for item in fields(StudyMetadata)}
    return SyntheticStudy(**metadata, series=series)
