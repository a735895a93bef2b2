"""Pathology of the synthetic study engine: which diagnoses a study has and how they look.

``sample_diagnoses`` draws a study's diagnosis keys (about 40% of studies are unremarkable), and
``apply_findings`` paints them into a ``Phantom``: property maps, labels, ``lesion_masks`` and
``findings``. Every diagnosis has a painter in ``training.synth.lesions`` and one row in
``DIAGNOSES`` (sampling weight, key sequences, key property, compartment). Clinical co-occurrence
is data, in ``IMPLIES`` (always together), ``ASSOCIATED`` (drawn with a probability),
``CAUSES`` (what produces a secondary finding) and ``MASS_CONSEQUENCES`` (by lesion size).
The per-label signatures are documented in ``docs/synth_labels.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from prima.labels import default_label_space
from training.synth.lesions import structural as st
from training.synth.lesions import tumors as tu
from training.synth.lesions import vascular as va
from training.synth.lesions.base import Ctx
from training.synth.phantom import Finding, Phantom

UNREMARKABLE_FRACTION = 0.4  # docs/design.md §6
INCIDENTAL_PROBABILITY = 0.12  # chance of an unrelated second finding in an abnormal study

MASS_EFFECT = "structural_mass_effect"
MIDLINE_SHIFT = "structural_midline_shift"
HERNIATION = "structural_brain_herniation"
EDEMA = "structural_edema"
GLIOMA = "tumor_adult_glioma"


@dataclass(frozen=True)
class Diagnosis:
    """How one diagnosis key is sampled, painted and checked."""

    painter: Callable[[Ctx], None] | None  # None: produced by the mass-effect warp
    weight: float  # relative frequency as the primary diagnosis of an abnormal study
    sequences: tuple[str, ...]  # sequences that show it best (protocols add them; gallery shows them)
    key_property: str  # the property map its signature changes most (tests check it)
    compartment: str  # where its mask lies: hemispheric, deep, extra_axial, sellar, ventricular,
    #                   posterior_fossa, skull, spine, vascular, diffuse
    stage: int = 1  # painting order: 0 anatomy changes, 1 lesions, 2 post-surgical, 3 secondary


DIAGNOSES: dict[str, Diagnosis] = {
    "cyst_arachnoid_cyst": Diagnosis(st.arachnoid_cyst, 1.5, ("t2", "flair", "dwi"), "t2", "extra_axial"),
    "cyst_colloid_cyst": Diagnosis(tu.colloid_cyst, 1.3, ("t1", "flair", "t2"), "t1", "ventricular"),
    "developmental_dandy_walker_malformation": Diagnosis(st.dandy_walker, 1.3, ("t1", "t2"), "t2",
                                                         "posterior_fossa", 0),
    "developmental_dysgenesis_corpus_callosum": Diagnosis(st.dysgenesis_corpus_callosum, 1.3, ("t1", "t2", "flair"),
                                                          "t1", "midline", 0),
    "developmental_heterotopia": Diagnosis(st.heterotopia, 1.3, ("t1", "mprage", "t2"), "t1", "ventricular", 0),
    "infectious_brain_abscess": Diagnosis(tu.abscess, 1.5, ("dwi", "adc", "t1_post", "flair"), "adc", "hemispheric"),
    "infectious_viral_encephalitis": Diagnosis(st.viral_encephalitis, 1.2, ("flair", "t2", "dwi"), "t2",
                                               "hemispheric"),
    "inflammatory_multiple_sclerosis": Diagnosis(st.multiple_sclerosis, 3.0, ("flair", "t2", "t1_post"), "t2",
                                                 "deep"),
    "inflammatory_neurosarcoid": Diagnosis(st.neurosarcoid, 1.3, ("t1_post", "flair"), "enhancement", "extra_axial"),
    "sellar_craniopharyngioma": Diagnosis(tu.craniopharyngioma, 1.3, ("t1", "t1_post", "t2"), "t2", "sellar"),
    "sellar_pituitary_adenoma": Diagnosis(tu.pituitary_adenoma, 2.0, ("t1_post", "t1", "t2"), "t2", "sellar"),
    "sellar_rathkes_cleft_cyst": Diagnosis(tu.rathkes_cleft_cyst, 1.3, ("t1", "t2", "t1_post"), "t2", "sellar"),
    "spine_syrinx": Diagnosis(st.syrinx, 1.3, ("t2", "t1"), "t2", "spine"),
    "structural_brain_herniation": Diagnosis(None, 1.3, ("flair", "t2", "t1"), "t2", "hemispheric", 3),
    "structural_cephaloceles": Diagnosis(st.cephalocele, 1.3, ("t1", "t2"), "t1", "skull"),
    "structural_cerebral_atrophy": Diagnosis(st.cerebral_atrophy, 2.5, ("mprage", "flair", "t1"), "t2", "diffuse", 0),
    "structural_chiari_malformation": Diagnosis(st.chiari_malformation, 1.2, ("t1", "t2"), "t1", "posterior_fossa", 0),
    "structural_edema": Diagnosis(st.cerebral_edema, 1.3, ("flair", "t2"), "t2", "hemispheric", 3),
    "structural_encephalomalacia": Diagnosis(st.encephalomalacia, 1.5, ("flair", "t2", "t1"), "t2", "hemispheric"),
    "structural_mass_effect": Diagnosis(None, 1.3, ("flair", "t2", "t1"), "t2", "hemispheric", 3),
    "structural_midline_shift": Diagnosis(None, 1.3, ("flair", "t2", "t1"), "t2", "midline", 3),
    "surgical_catheter": Diagnosis(st.catheter, 1.2, ("t2", "t1", "swi"), "pd", "ventricular", 2),
    "surgical_craniotomy": Diagnosis(st.craniotomy, 1.3, ("t1", "t2", "t1_post"), "t1", "skull", 2),
    "surgical_resection_cavity": Diagnosis(st.resection_cavity, 1.5, ("t2", "flair", "t1_post"), "t2", "hemispheric"),
    "trauma_brain_contusion": Diagnosis(va.contusion, 1.5, ("swi", "flair", "t2"), "t2star", "hemispheric"),
    "trauma_diffuse_axonal_injury": Diagnosis(va.diffuse_axonal_injury, 1.3, ("swi", "t2star", "flair"), "t2star",
                                              "deep"),
    "trauma_subdural_hematoma": Diagnosis(va.subdural_hematoma, 2.0, ("flair", "t2", "t1", "swi"), "t2",
                                          "extra_axial"),
    "tumor_adult_brain_metastasis": Diagnosis(tu.metastasis, 3.0, ("t1_post", "flair"), "enhancement", "brain"),
    "tumor_adult_glioma": Diagnosis(tu.glioma, 1.3, ("flair", "t2", "t1_post"), "t2", "hemispheric"),
    "tumor_adult_high_grade_glioma": Diagnosis(tu.high_grade_glioma, 2.5, ("t1_post", "flair", "t2", "dwi"),
                                               "enhancement", "hemispheric"),
    "tumor_adult_low_grade_glioma": Diagnosis(tu.low_grade_glioma, 1.5, ("flair", "t2"), "t2", "hemispheric"),
    "tumor_adult_lymphoma": Diagnosis(tu.lymphoma, 1.3, ("t1_post", "dwi", "adc", "flair"), "enhancement", "deep"),
    "tumor_adult_meningioma": Diagnosis(tu.meningioma, 3.0, ("t1_post", "t2", "flair"), "enhancement", "extra_axial"),
    "tumor_adult_pineal_tumor": Diagnosis(tu.pineal_tumor, 1.3, ("t1_post", "t2", "t1"), "enhancement", "pineal"),
    "tumor_adult_schwannoma": Diagnosis(tu.schwannoma, 1.5, ("t1_post", "ssfp", "t2"), "enhancement", "cpa"),
    "tumor_pediatric_brainstem_glioma": Diagnosis(tu.brainstem_glioma, 1.3, ("t2", "flair"), "t2", "posterior_fossa"),
    "tumor_pediatric_ependymoma": Diagnosis(tu.ependymoma, 1.3, ("t1_post", "t2"), "enhancement", "posterior_fossa"),
    "tumor_pediatric_germ_cell_tumor": Diagnosis(tu.germ_cell_tumor, 1.3, ("t1_post", "t2", "dwi"), "enhancement",
                                                 "pineal"),
    "tumor_pediatric_medulloblastoma": Diagnosis(tu.medulloblastoma, 1.3, ("dwi", "adc", "t1_post", "t2"), "adc",
                                                 "posterior_fossa"),
    "tumor_pediatric_pilocytic_astrocytoma": Diagnosis(tu.pilocytic_astrocytoma, 1.3, ("t1_post", "t2"), "t2",
                                                       "posterior_fossa"),
    "vascular_hemorrhagic_intracranial_hemorrhage": Diagnosis(va.intracranial_hemorrhage, 2.5,
                                                              ("swi", "t2", "t1", "flair"), "t2star", "hemispheric"),
    "vascular_hemorrhagic_intraventricular_hemorrhage": Diagnosis(va.intraventricular_hemorrhage, 1.2,
                                                                  ("flair", "swi", "t2"), "t2star", "ventricular"),
    "vascular_hemorrhagic_subarachnoid_hemorrahage": Diagnosis(va.subarachnoid_hemorrhage, 1.5, ("flair", "swi"),
                                                               "t1", "extra_axial"),
    "vascular_ischemic_lacunar_stroke": Diagnosis(va.lacunar_stroke, 2.0, ("dwi", "adc", "flair"), "adc", "deep"),
    "vascular_ischemic_large_vessel_stroke": Diagnosis(va.large_vessel_stroke, 3.0, ("dwi", "adc", "flair"), "adc",
                                                       "hemispheric"),
    "vascular_ischemic_moyamoya": Diagnosis(va.moyamoya, 1.3, ("t2", "flair", "dwi"), "pd", "deep"),
    "vascular_ischemic_small_vessel_disease": Diagnosis(va.small_vessel_disease, 3.0, ("flair", "t2"), "t2", "deep"),
    "vascular_malformation_arteriovenous_malformation": Diagnosis(va.arteriovenous_malformation, 1.3,
                                                                  ("t2", "swi", "t1_post"), "pd", "hemispheric"),
    "vascular_malformation_cavernoma": Diagnosis(va.cavernoma, 1.5, ("swi", "t2star", "t2"), "t2star", "brain"),
    "vascular_malformation_cerebral_aneurysm": Diagnosis(va.cerebral_aneurysm, 1.5, ("t2", "ssfp", "t1_post"), "pd",
                                                         "vascular"),
    "ventricular_intracranial_hypotension": Diagnosis(st.intracranial_hypotension, 1.3, ("t1_post", "t1"),
                                                      "enhancement", "extra_axial", 3),
    "ventricular_ventriculomegaly": Diagnosis(st.ventriculomegaly, 2.0, ("t2", "flair", "t1"), "t2", "ventricular", 0),
}
KEY_SEQUENCES: dict[str, tuple[str, ...]] = {k: d.sequences for k, d in DIAGNOSES.items()}

# A general label -> its subtypes. A subtype's lesion is also the general label's lesion: one mask,
# one finding per key, but one report item, the subtype's (``reported_findings``).
SUBTYPES: dict[str, tuple[str, ...]] = {GLIOMA: ("tumor_adult_high_grade_glioma", "tumor_adult_low_grade_glioma")}

# Always present together: the first implies each of the others (glioma grades are gliomas).
IMPLIES: dict[str, tuple[str, ...]] = {
    "tumor_adult_high_grade_glioma": (GLIOMA,),
    "tumor_adult_low_grade_glioma": (GLIOMA,),
    HERNIATION: (MASS_EFFECT, MIDLINE_SHIFT),
    MIDLINE_SHIFT: (MASS_EFFECT,),
    "surgical_resection_cavity": ("surgical_craniotomy",),
}

# Drawn with a probability when the first key is present.
ASSOCIATED: dict[str, tuple[tuple[str, float], ...]] = {
    "structural_chiari_malformation": (("spine_syrinx", 0.3), ("ventricular_ventriculomegaly", 0.1)),
    "spine_syrinx": (("structural_chiari_malformation", 0.4),),
    "vascular_hemorrhagic_intraventricular_hemorrhage": (("ventricular_ventriculomegaly", 0.4),
                                                         ("vascular_hemorrhagic_intracranial_hemorrhage", 0.25),
                                                         ("vascular_hemorrhagic_subarachnoid_hemorrahage", 0.2)),
    "surgical_catheter": (("ventricular_ventriculomegaly", 0.6),),
    "cyst_colloid_cyst": (("ventricular_ventriculomegaly", 0.4),),
    "tumor_adult_pineal_tumor": (("ventricular_ventriculomegaly", 0.5),),
    "tumor_pediatric_germ_cell_tumor": (("ventricular_ventriculomegaly", 0.3),),
    "tumor_pediatric_medulloblastoma": (("ventricular_ventriculomegaly", 0.6),),
    "tumor_pediatric_ependymoma": (("ventricular_ventriculomegaly", 0.5),),
    "tumor_pediatric_pilocytic_astrocytoma": (("ventricular_ventriculomegaly", 0.4),),
    "developmental_dandy_walker_malformation": (("ventricular_ventriculomegaly", 0.6),),
    "vascular_hemorrhagic_subarachnoid_hemorrahage": (("vascular_malformation_cerebral_aneurysm", 0.3),
                                                      ("vascular_hemorrhagic_intraventricular_hemorrhage", 0.15)),
    "vascular_malformation_cerebral_aneurysm": (("vascular_hemorrhagic_subarachnoid_hemorrahage", 0.2),),
    "trauma_brain_contusion": (("trauma_subdural_hematoma", 0.3), ("vascular_hemorrhagic_subarachnoid_hemorrahage",
                                                                   0.3), ("trauma_diffuse_axonal_injury", 0.2)),
    "trauma_diffuse_axonal_injury": (("trauma_brain_contusion", 0.3), ("trauma_subdural_hematoma", 0.2)),
    "trauma_subdural_hematoma": (("trauma_brain_contusion", 0.2), ("surgical_craniotomy", 0.1)),
    "vascular_ischemic_small_vessel_disease": (("structural_cerebral_atrophy", 0.3),
                                               ("vascular_ischemic_lacunar_stroke", 0.25)),
    "vascular_ischemic_lacunar_stroke": (("vascular_ischemic_small_vessel_disease", 0.5),),
    "vascular_ischemic_large_vessel_stroke": (("vascular_ischemic_small_vessel_disease", 0.2),),
    "vascular_ischemic_moyamoya": (("vascular_ischemic_large_vessel_stroke", 0.15),),
    "structural_cerebral_atrophy": (("vascular_ischemic_small_vessel_disease", 0.3),),
    "structural_encephalomalacia": (("surgical_craniotomy", 0.15),),
    "inflammatory_multiple_sclerosis": (("structural_cerebral_atrophy", 0.1),),
    "surgical_resection_cavity": (("tumor_adult_high_grade_glioma", 0.15),),
}

# A secondary finding drawn as the primary diagnosis needs a cause; one is drawn from these.
_MASS_CAUSES = ("tumor_adult_high_grade_glioma", "vascular_hemorrhagic_intracranial_hemorrhage",
                "trauma_subdural_hematoma", "tumor_adult_meningioma", "infectious_brain_abscess",
                "tumor_adult_brain_metastasis", "vascular_ischemic_large_vessel_stroke")
CAUSES: dict[str, tuple[str, ...]] = {MASS_EFFECT: _MASS_CAUSES, MIDLINE_SHIFT: _MASS_CAUSES,
                                      HERNIATION: _MASS_CAUSES, EDEMA: _MASS_CAUSES + (
                                          "trauma_brain_contusion", "infectious_viral_encephalitis")}

# (minimum diameter mm of the dominant supratentorial mass, consequence, probability).
MASS_CONSEQUENCES: tuple[tuple[float, str, float], ...] = (
    (30.0, MASS_EFFECT, 0.7), (40.0, MIDLINE_SHIFT, 0.5), (55.0, HERNIATION, 0.3))


def _closure(keys) -> list[str]:
    """``keys`` plus everything they imply, in label order."""
    out, todo = set(), list(keys)
    while todo:
        k = todo.pop()
        if k not in out:
            out.add(k)
            todo.extend(IMPLIES.get(k, ()))
    order = default_label_space().diagnosis_keys
    return sorted(out, key=order.index)


def primary_weights(balance: float = 0.0, primary: Sequence[str] | None = None) -> np.ndarray:
    """Probabilities of the primary diagnosis of an abnormal study, in ``DIAGNOSES`` order.

    Args:
        balance: 0 draws with the clinical weights (``Diagnosis.weight``), 1 uniformly over all
            labels, in between with ``weight ** (1 - balance)``: rare labels gain positives.
        primary: only these keys (the others get 0, the rest is renormalised); None = all.

    Returns:
        Probabilities summing to 1.

    Raises:
        ValueError: ``balance`` outside [0, 1] or a bad ``primary`` (``check_primary``).
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    check_primary(primary)
    # x ** 1.0 == x exactly, so balance 0 gives the clinical probabilities bit for bit.
    weights = np.array([d.weight for d in DIAGNOSES.values()]) ** (1.0 - balance)
    probabilities = weights / weights.sum()
    if primary is not None:
        probabilities = np.where(np.isin(list(DIAGNOSES), list(primary)), probabilities, 0.0)
        probabilities /= probabilities.sum()
    return probabilities


def check_primary(primary: Sequence[str] | None) -> None:
    """Raises ``ValueError`` unless ``primary`` is None or a non-empty list of known diagnosis keys."""
    if primary is None:
        return
    unknown = [k for k in primary if k not in DIAGNOSES]
    if not primary or unknown:
        raise ValueError(f"primary must name known diagnosis keys, got {list(primary)}")


def draws_unremarkable(rng: np.random.Generator) -> bool:
    """The first draw of ``sample_diagnoses``: whether the study has no finding (``UNREMARKABLE_FRACTION``)."""
    return bool(rng.random() < UNREMARKABLE_FRACTION)


def sample_diagnoses(rng: np.random.Generator, balance: float = 0.0,
                     primary: Sequence[str] | None = None, primary_key: str | None = None) -> list[str]:
    """Diagnosis keys of one study (empty for about 40% of studies), co-occurrences included.

    An abnormal study has one primary diagnosis (``primary_weights(balance)``), its causes,
    implications and associations, and with ``INCIDENTAL_PROBABILITY`` an unrelated second finding
    (drawn with the clinical weights: balancing changes which label a study is about, not how often
    incidental findings come along). ``balance`` changes only the probabilities of the primary draw,
    which takes one uniform number either way, so balance 0 makes exactly the clinical draws.

    ``primary`` restricts the primary diagnosis to these keys (``primary_weights(balance)`` renormalised
    over them) and makes every study abnormal, e.g. for a test set of focal lesions to score LIME
    localisation on; the same random numbers are drawn.

    ``primary_key`` is the primary diagnosis of the study if it is abnormal, chosen beforehand (a stratified
    data set, ``study.stratified_primaries``); the primary draw is still made, so whether the study is normal
    is that of the unstratified study (what follows the primary diagnosis depends on it).

    Raises:
        ValueError: ``balance`` outside [0, 1], ``primary`` empty or with unknown keys, or ``primary_key``
            unknown or outside ``primary``.
    """
    primary_p = primary_weights(balance, primary)
    if primary_key is not None and (primary_key not in DIAGNOSES or (primary is not None and primary_key not in primary)):
        raise ValueError(f"primary_key must be a diagnosis key{' of primary' if primary else ''}, got {primary_key!r}")
    if draws_unremarkable(rng) and primary is None:
        return []
    keys = list(DIAGNOSES)
    weights = np.array([DIAGNOSES[k].weight for k in keys])
    drawn = keys[int(rng.choice(len(keys), p=primary_p))]
    first = drawn if primary_key is None else primary_key
    chosen = [first]
    if first in CAUSES:
        causes = CAUSES[first]
        chosen.append(causes[int(rng.integers(len(causes)))])
    if rng.random() < INCIDENTAL_PROBABILITY:
        chosen.append(keys[int(rng.choice(len(keys), p=weights / weights.sum()))])
    for key in list(chosen):
        for other, p in ASSOCIATED.get(key, ()):
            if rng.random() < p:
                chosen.append(other)
    return _closure(chosen)


def apply_findings(phantom: Phantom, keys, rng: np.random.Generator) -> None:
    """Paint the diagnoses ``keys`` into ``phantom`` (in place).

    Every key ends up with a non-empty ``phantom.lesion_masks[key]`` and a ``Finding``; keys the
    lesions bring along (their edema, mass effect by size, implied keys) are added the same way.

    Args:
        phantom: a subject from ``anatomy.make_subject`` (any grid spacing).
        keys: diagnosis keys from ``prima/data/labels.json``.
        rng: the only source of randomness.
    """
    unknown = [k for k in keys if k not in DIAGNOSES]
    if unknown:
        raise ValueError(f"unknown diagnosis keys {unknown}")
    wanted = _closure(keys)
    ctx = Ctx(phantom, rng)
    graded = [k for k in SUBTYPES[GLIOMA] if k in wanted]
    for key in sorted(wanted, key=lambda k: DIAGNOSES[k].stage):
        d = DIAGNOSES[key]
        if d.painter is None or (key == GLIOMA and graded) or (key == EDEMA and ctx.has(EDEMA)):
            continue
        d.painter(ctx)
    for key in graded:  # a graded glioma is also a glioma: same lesion
        mask = phantom.lesion_masks[key]
        phantom.lesion_masks[GLIOMA] = phantom.lesion_masks.get(GLIOMA, np.zeros_like(mask)) | mask
        f = next(f for f in phantom.findings if f.key == key)
        ctx.record(GLIOMA, f.location, f.size_mm, grade="high" if "high" in key else "low")

    secondary = {k for k in wanted if DIAGNOSES[k].painter is None}
    supratentorial = [m for m in ctx.masses if ctx.to_head(m.center)[2] > -15]
    if supratentorial:
        diameter = 2 * max(m.radius_mm for m in supratentorial)
        for min_diameter, key, p in MASS_CONSEQUENCES:
            if diameter >= min_diameter and rng.random() < p:
                secondary.add(key)
    secondary = set(_closure(secondary))
    if secondary:
        st.apply_mass_effect(ctx, secondary)

    missing = [k for k in _closure(set(wanted) | secondary) if not ctx.has(k)
               or not any(f.key == k for f in phantom.findings)]
    if missing:
        raise RuntimeError(f"pathology painters left no mask or finding for {missing}")
    order = default_label_space().diagnosis_keys
    phantom.findings.sort(key=lambda f: order.index(f.key))


def reported_findings(findings: list[Finding]) -> list[Finding]:
    """The findings a report itemises: one per lesion.

    A general label whose subtype is also present (``SUBTYPES``: a high-grade glioma is labelled
    glioma too) describes the subtype's lesion, so only the subtype gets an item. Secondary findings
    (edema, mass effect, midline shift, herniation) stay separate items, as radiologists list them.

    Args:
        findings: a study's findings (``Phantom.findings``).

    Returns:
        ``findings`` without the general labels covered by a subtype, order kept.
    """
    present = {f.key for f in findings}
    return [f for f in findings if not present.intersection(SUBTYPES.get(f.key, ()))]
