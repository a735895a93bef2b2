"""Radiology-style report text for a synthetic study: an itemised list of the positive findings.

Each diagnosis has several templates (synonyms, word order, impression phrases); a template may use
``{size}`` (largest diameter as "2.3 cm"/"7 mm"), ``{loc}`` (the Finding's location), ``{cw}`` (a
"compatible with"-style phrase) and the Finding's attributes by name. Normal studies get a varied
"No acute intracranial abnormality."-style sentence. No comparisons, no normal findings listed.

A sentence mentions only what the study's acquired sequences can show (``SEQUENCE_TERMS``: no
enhancement without a post-contrast series, no diffusion without DWI/ADC, no susceptibility without
SWI/GRE, no FLAIR, T1 or T2 signal without that series); every diagnosis has a template that needs no
particular sequence, so its item always names it. There is one item per lesion
(``pathology.reported_findings``).
"""

from __future__ import annotations

import re
import string
from typing import Collection

import numpy as np

from training.synth.pathology import reported_findings
from training.synth.phantom import Finding
from training.synth.sequences import POST_CONTRAST, SEQUENCES

NORMAL_REPORTS = (
    "No acute intracranial abnormality.",
    "No acute intracranial process.",
    "Unremarkable MRI of the brain.",
    "Normal MRI of the brain. No acute intracranial abnormality.",
    "No intracranial abnormality identified.",
    "Normal brain MRI for age.",
    "No evidence of acute intracranial pathology.",
)

# Terms a sentence may use only when the study acquired one of the sequences that show them. A
# template's needs follow from its rendered text (attribute values included), so templates are not
# tagged by hand. "non-enhancing" needs contrast too: absent enhancement is a post-contrast finding.
SEQUENCE_TERMS: tuple[tuple[re.Pattern, frozenset[str]], ...] = (
    (re.compile(r"enhanc", re.I), frozenset(POST_CONTRAST)),
    (re.compile(r"diffusion|\bADC\b|\bDWI\b", re.I), frozenset({"dwi", "adc"})),
    (re.compile(r"\bSWI\b|susceptib|bloom|micro-?bleed|micro-?ha?emorrhag|\bT2\*|\bGRE\b", re.I),
     frozenset({"swi", "t2star"})),
    (re.compile(r"FLAIR", re.I), frozenset({"flair"})),
    (re.compile(r"\bT1\b"), frozenset({"t1", "mprage"})),  # pre-contrast T1 signal, not a post-contrast image
    (re.compile(r"\bT2\b(?!\*)"), frozenset({"t2"})),
)

COMPATIBLE = ("compatible with", "consistent with", "in keeping with", "most suggestive of", "likely representing")

# Templates per key. A template using {size} is used only when the finding has a size.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cyst_arachnoid_cyst": (
        "{size} CSF-signal extra-axial cyst in the {loc}, suppressing on FLAIR without restricted diffusion, {cw} "
        "arachnoid cyst.",
        "Arachnoid cyst in the {loc}.",
        "Extra-axial CSF-isointense lesion in the {loc} with mild mass effect on the adjacent brain, {cw} an "
        "arachnoid cyst."),
    "cyst_colloid_cyst": (
        "{size} T1-hyperintense round lesion in the {loc}, {cw} colloid cyst.",
        "Colloid cyst at the foramen of Monro measuring {size}.",
        "Small well-circumscribed non-enhancing lesion in the {loc}, {cw} a colloid cyst."),
    "developmental_dandy_walker_malformation": (
        "Cystic dilatation of the fourth ventricle with an enlarged posterior fossa and hypoplastic vermis, {cw} "
        "Dandy-Walker malformation.",
        "Dandy-Walker malformation: large posterior fossa CSF cyst communicating with the fourth ventricle.",
        "Hypoplastic inferior vermis with cystic enlargement of the fourth ventricle ({size}), {cw} Dandy-Walker "
        "malformation."),
    "developmental_dysgenesis_corpus_callosum": (
        "Corpus callosum dysgenesis ({extent}).",
        "Absence of the {extent_short} corpus callosum, {cw} callosal dysgenesis.",
        "Dysgenesis of the corpus callosum with parallel configuration of the lateral ventricles."),
    "developmental_heterotopia": (
        "{count} subependymal nodules isointense to grey matter along the lateral ventricles, {cw} periventricular "
        "nodular heterotopia.",
        "Grey matter heterotopia along the walls of the lateral ventricles.",
        "Subependymal grey matter heterotopia ({count} nodules)."),
    "infectious_brain_abscess": (
        "{size} smoothly ring-enhancing lesion in the {loc} with central restricted diffusion and surrounding "
        "vasogenic edema, {cw} cerebral abscess.",
        "Brain abscess in the {loc} measuring {size}, with a T2-hypointense rim and central diffusion restriction.",
        "Ring-enhancing lesion with restricted diffusion in the {loc}, {cw} pyogenic abscess.",
        "{size} rim-walled lesion in the {loc} with surrounding vasogenic edema, {cw} brain abscess."),
    "infectious_viral_encephalitis": (
        "T2/FLAIR hyperintensity and swelling of the {loc} with restricted diffusion, {cw} viral (herpes) "
        "encephalitis.",
        "Encephalitis involving the {loc}.",
        "Cortical and subcortical FLAIR signal abnormality in the {loc}, {cw} viral encephalitis."),
    "inflammatory_multiple_sclerosis": (
        "{count} ovoid T2/FLAIR hyperintense lesions in the {loc}, some oriented perpendicular to the ventricles, "
        "{cw} demyelinating disease (multiple sclerosis).",
        "Multiple sclerosis: {count} demyelinating plaques in the {loc}; {enhancing} enhancing.",
        "Periventricular and juxtacortical white matter lesions (Dawson fingers), {cw} multiple sclerosis."),
    "inflammatory_neurosarcoid": (
        "Nodular leptomeningeal enhancement of the {loc}, {cw} neurosarcoidosis.",
        "Leptomeningeal and infundibular enhancement, {cw} neurosarcoid.",
        "Abnormal nodular enhancement along the {loc}; neurosarcoidosis is favoured.",
        "Nodular leptomeningeal thickening along the {loc}, {cw} neurosarcoidosis."),
    "sellar_craniopharyngioma": (
        "{size} cystic and solid suprasellar mass with calcifications and rim enhancement, {cw} craniopharyngioma.",
        "Craniopharyngioma in the {loc} measuring {size}.",
        "Suprasellar mass with T1-hyperintense cystic component and calcification, {cw} craniopharyngioma."),
    "sellar_pituitary_adenoma": (
        "{size} {kind} of the pituitary gland in the {loc}.",
        "{size} sellar mass {cw} pituitary {kind}.",
        "Pituitary adenoma ({kind}), {size}, in the {loc}."),
    "sellar_rathkes_cleft_cyst": (
        "{size} non-enhancing T1-{t1} cyst in the {loc}, {cw} Rathke's cleft cyst.",
        "Rathke cleft cyst measuring {size}.",
        "Small non-enhancing midline sellar cyst, {cw} Rathke's cleft cyst."),
    "spine_syrinx": (
        "{size} syrinx of the {loc}.",
        "CSF-signal cavity within the {loc} ({size} craniocaudal), {cw} syringomyelia (syrinx).",
        "Syringohydromyelia of the upper cervical cord."),
    "structural_brain_herniation": (
        "Brain herniation: {types}.",
        "{loc} herniation with effacement of the basal cisterns.",
        "Subfalcine and transtentorial (uncal) herniation."),
    "structural_cephaloceles": (
        "{size} {loc} cephalocele: brain and meninges herniating through a calvarial defect.",
        "{loc} encephalocele through a skull defect.",
        "Calvarial defect with herniation of meninges and brain tissue ({loc} cephalocele)."),
    "structural_cerebral_atrophy": (
        "{severity} generalised cerebral atrophy with ex vacuo ventricular enlargement.",
        "{severity} diffuse volume loss (cerebral atrophy).",
        "Prominent sulci and ventricles, {cw} {severity} cerebral atrophy."),
    "structural_edema": (
        "Vasogenic edema in the {loc}.",
        "Surrounding T2/FLAIR hyperintense cerebral edema in the {loc}, approximately {size}.",
        "White matter edema in the {loc}."),
    "structural_encephalomalacia": (
        "{size} area of encephalomalacia with surrounding gliosis in the {loc}.",
        "Chronic encephalomalacia in the {loc}.",
        "Focal tissue loss with CSF signal and gliotic margins in the {loc}, {cw} encephalomalacia from remote "
        "injury."),
    "structural_chiari_malformation": (
        "Chiari I malformation with {size} tonsillar ectopia below the foramen magnum.",
        "Cerebellar tonsils extend {size} below the foramen magnum, {cw} Chiari malformation.",
        "Peg-like cerebellar tonsillar descent ({size}), Chiari I malformation."),
    "structural_mass_effect": (
        "Mass effect on the {loc} with sulcal effacement and compression of the ipsilateral lateral ventricle.",
        "Local mass effect with effacement of the adjacent sulci.",
        "Associated mass effect on the {loc}."),
    "structural_midline_shift": (
        "{shift_mm} mm {direction} midline shift.",
        "Midline shift of {shift_mm} mm at the level of the septum pellucidum.",
        "{direction} shift of the midline structures by {shift_mm} mm."),
    "surgical_catheter": (
        "Ventricular catheter via a {loc}.",
        "Ventriculostomy catheter (shunt) via a {loc}.",
        "Shunt catheter in place, {loc}."),
    "surgical_craniotomy": (
        "Post-surgical changes of {type} over the {loc}.",
        "Prior {type} ({size}) overlying the {loc}.",
        "Sequelae of {type} in the region of the {loc}."),
    "surgical_resection_cavity": (
        "{size} resection cavity in the {loc} with surrounding gliosis.",
        "Post-operative resection cavity in the {loc}.",
        "Surgical cavity in the {loc} ({size}) with thin marginal enhancement and blood products."),
    "trauma_brain_contusion": (
        "Hemorrhagic contusion of the {loc} measuring up to {size}, with surrounding edema.",
        "{count} cortical contusion(s) in the {loc}.",
        "Parenchymal contusions with blooming on SWI in the {loc}."),
    "trauma_diffuse_axonal_injury": (
        "{count} punctate foci of susceptibility at the {loc}, {cw} diffuse axonal injury.",
        "Diffuse axonal injury with microhemorrhages at the {loc}.",
        "Multiple microbleeds in a shear distribution, {cw} diffuse axonal injury (DAI).",
        "{count} punctate lesions at the {loc} in a shear distribution, {cw} diffuse axonal injury."),
    "trauma_subdural_hematoma": (
        "{size} thick {stage} subdural hematoma over the {loc}.",
        "{stage} subdural hematoma along the {loc}, measuring {size} in maximal thickness.",
        "Crescentic extra-axial collection over the {loc} ({size}), {cw} {stage} subdural hematoma."),
    "tumor_adult_brain_metastasis": (
        "{count} enhancing lesion(s) at the grey-white junction, the largest {size}, with disproportionate edema, {cw} "
        "metastases.",
        "Brain metastasis: {count} enhancing lesion(s) in the {loc}, largest {size}.",
        "Enhancing lesions in the {loc} ({count}), {cw} metastatic disease.",
        "{count} lesion(s) at the grey-white junction of the {loc} with surrounding edema, the largest {size}, {cw} "
        "metastases."),
    "tumor_adult_glioma": (
        "{size} infiltrative T2/FLAIR hyperintense mass in the {loc}, {cw} glioma.",
        "Glial neoplasm (glioma) in the {loc} measuring {size}.",
        "Intra-axial mass of the {loc}, {cw} a glioma."),
    "tumor_adult_high_grade_glioma": (
        "{size} ring-enhancing mass in the {loc} with central necrosis and surrounding vasogenic edema, {cw} "
        "high-grade glioma.",
        "High-grade glioma (glioblastoma) in the {loc}, {size}, with irregular thick rim enhancement.",
        "Heterogeneously enhancing necrotic intra-axial mass of the {loc}, {cw} high-grade glioma.",
        "{size} heterogeneous intra-axial mass in the {loc} with central necrosis and surrounding edema, {cw} "
        "high-grade glioma."),
    "tumor_adult_low_grade_glioma": (
        "{size} non-enhancing T2/FLAIR hyperintense expansile mass in the {loc}, {cw} low-grade glioma.",
        "Low-grade glioma in the {loc} measuring {size}.",
        "Homogeneous T2-hyperintense infiltrative lesion without enhancement in the {loc}, {cw} low-grade glioma."),
    "tumor_adult_lymphoma": (
        "{size} homogeneously enhancing mass in the {loc} with restricted diffusion, {cw} CNS lymphoma.",
        "Primary CNS lymphoma in the {loc}, {size}.",
        "Periventricular avidly enhancing lesion(s) with low ADC, {cw} lymphoma."),
    "tumor_adult_meningioma": (
        "{size} extra-axial dural-based homogeneously enhancing mass along the {loc} with a dural tail, {cw} "
        "meningioma.",
        "Meningioma of the {loc} measuring {size}.",
        "Avidly enhancing extra-axial mass with dural tail at the {loc}, {cw} meningioma."),
    "tumor_adult_pineal_tumor": (
        "{size} enhancing mass in the {loc}, {cw} pineal tumor.",
        "Pineal region tumor measuring {size}.",
        "Heterogeneous pineal mass with engulfed calcification, {cw} a pineal neoplasm."),
    "tumor_adult_schwannoma": (
        "{size} avidly enhancing mass in the {loc} extending into the internal auditory canal, {cw} vestibular "
        "schwannoma.",
        "Vestibular schwannoma in the {loc}, {size}.",
        "Enhancing {loc} lesion, {cw} schwannoma (acoustic neuroma)."),
    "tumor_pediatric_brainstem_glioma": (
        "{size} expansile T2-hyperintense mass of the {loc}, {cw} brainstem glioma (DIPG).",
        "Diffuse pontine glioma measuring {size}.",
        "Expansile non-enhancing pontine lesion, {cw} brainstem glioma."),
    "tumor_pediatric_ependymoma": (
        "{size} heterogeneously enhancing mass filling the {loc} with calcifications, {cw} ependymoma.",
        "Ependymoma of the {loc}, {size}.",
        "Fourth ventricular mass extending through its foramina, {cw} ependymoma."),
    "tumor_pediatric_germ_cell_tumor": (
        "{size} homogeneously enhancing mass in the {loc}, {cw} germ cell tumor (germinoma).",
        "Germ cell tumor in the {loc}, {size}.",
        "Enhancing midline mass in the {loc} with restricted diffusion, {cw} germinoma."),
    "tumor_pediatric_medulloblastoma": (
        "{size} midline posterior fossa mass in the {loc} with restricted diffusion, {cw} medulloblastoma.",
        "Medulloblastoma of the {loc} measuring {size}.",
        "Restricted-diffusion vermian mass effacing the fourth ventricle, {cw} medulloblastoma."),
    "tumor_pediatric_pilocytic_astrocytoma": (
        "{size} cystic mass with an enhancing mural nodule in the {loc}, {cw} pilocytic astrocytoma.",
        "Pilocytic astrocytoma of the {loc}, {size}.",
        "Cyst-with-nodule lesion in the {loc}, {cw} pilocytic astrocytoma."),
    "vascular_hemorrhagic_intracranial_hemorrhage": (
        "{size} {stage} intraparenchymal hemorrhage in the {loc} with surrounding edema.",
        "Intracerebral hematoma in the {loc} measuring {size}.",
        "{stage} parenchymal hemorrhage ({size}) of the {loc} with susceptibility blooming."),
    "vascular_hemorrhagic_intraventricular_hemorrhage": (
        "Intraventricular hemorrhage {pattern}.",
        "Blood products within the {loc}, {cw} intraventricular hemorrhage.",
        "Intraventricular hemorrhage in the {loc}."),
    "vascular_hemorrhagic_subarachnoid_hemorrahage": (
        "Subarachnoid hemorrhage in the {loc} (FLAIR sulcal hyperintensity and susceptibility).",
        "Sulcal FLAIR hyperintensity in the {loc}, {cw} subarachnoid hemorrhage.",
        "Subarachnoid blood within the {loc}."),
    "vascular_ischemic_lacunar_stroke": (
        "{size} {phase} lacunar infarct in the {loc}.",
        "{phase} lacunar stroke of the {loc} ({size}).",
        "Small {phase} infarct in the {loc}, {cw} lacunar stroke."),
    "vascular_ischemic_large_vessel_stroke": (
        "{phase} infarct in the {loc} with restricted diffusion, measuring {size}.",
        "Large vessel territory {phase} ischemic stroke involving the {loc}.",
        "Wedge-shaped diffusion restriction in the {loc}, {cw} {phase} large vessel infarct."),
    "vascular_ischemic_moyamoya": (
        "Numerous basal collateral flow voids in the {loc} with steno-occlusive changes, {cw} moyamoya.",
        "Moyamoya pattern with basal ganglia collaterals and deep watershed infarcts.",
        "Prominent lenticulostriate collaterals (puff of smoke), {cw} moyamoya disease."),
    "vascular_ischemic_small_vessel_disease": (
        "Periventricular and deep white matter T2/FLAIR hyperintensities (Fazekas {fazekas}), {cw} chronic small "
        "vessel ischemic disease.",
        "Chronic microvascular (small vessel) ischemic changes, Fazekas grade {fazekas}.",
        "Small vessel disease of the {loc}, Fazekas {fazekas}."),
    "vascular_malformation_arteriovenous_malformation": (
        "{size} nidus of serpiginous flow voids in the {loc} with an enlarged draining vein, {cw} arteriovenous "
        "malformation.",
        "Arteriovenous malformation (AVM) of the {loc}, nidus {size}.",
        "Tangle of flow voids in the {loc}, {cw} an AVM."),
    "vascular_malformation_cerebral_aneurysm": (
        "{size} saccular aneurysm of the {loc}.",
        "Round flow void at the {loc} measuring {size}, {cw} intracranial aneurysm.",
        "Cerebral aneurysm arising from the {loc} ({size})."),
    "vascular_malformation_cavernoma": (
        "{size} popcorn-like lesion with a hemosiderin rim and blooming on SWI in the {loc}, {cw} cavernous "
        "malformation (cavernoma).",
        "Cavernoma of the {loc} measuring {size}.",
        "Mixed-signal lesion with susceptibility blooming in the {loc}, {cw} cavernous angioma."),
    "ventricular_intracranial_hypotension": (
        "Diffuse smooth pachymeningeal enhancement with sagging of the brainstem, {cw} intracranial hypotension.",
        "Intracranial hypotension: dural enhancement and brain sag ({brain_sag_mm} mm).",
        "Smooth dural thickening and enhancement with descent of the brainstem, {cw} spontaneous intracranial "
        "hypotension.",
        "Sagging of the brainstem ({brain_sag_mm} mm) with effacement of the basal cisterns, {cw} intracranial "
        "hypotension."),
    "ventricular_ventriculomegaly": (
        "Ventriculomegaly involving the {loc}.",
        "Enlarged lateral and third ventricles out of proportion to the sulci (ventriculomegaly).",
        "Dilatation of the {loc}, {cw} hydrocephalus / ventriculomegaly."),
}


def format_size(size_mm: float) -> str:
    return f"{size_mm / 10:.1f} cm" if size_mm >= 10 else f"{max(size_mm, 1.0):.0f} mm"


def _fields(finding: Finding, rng: np.random.Generator) -> dict[str, str]:
    fields = {k: str(v) for k, v in finding.attributes.items()}
    fields["loc"] = finding.location
    fields["size"] = format_size(finding.size_mm)
    fields["cw"] = COMPATIBLE[int(rng.integers(len(COMPATIBLE)))]
    if "extent" in fields:
        fields["extent_short"] = "entire" if "complete" in fields["extent"] else "posterior"
    return fields


def _field_names(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def shown_by(text: str, sequences: Collection[str]) -> bool:
    """Whether the acquired ``sequences`` can show everything ``text`` says (``SEQUENCE_TERMS``)."""
    acquired = set(sequences)
    return all(acquired & showing for term, showing in SEQUENCE_TERMS if term.search(text))


def describe(finding: Finding, rng: np.random.Generator, sequences: Collection[str]) -> str:
    """One report sentence for a finding, saying only what the acquired sequences can show.

    Args:
        finding: a placed diagnosis (key, location, size, attributes).
        rng: picks the template and the "compatible with" phrase.
        sequences: the study's acquired sequences (``sequences.SEQUENCES`` names, e.g. {"flair", "dwi"}).

    Returns:
        The sentence, capitalised.
    """
    if finding.key not in TEMPLATES:
        raise ValueError(f"no report template for {finding.key!r}")
    unknown = set(sequences) - set(SEQUENCES)
    if unknown:
        raise ValueError(f"unknown sequences {sorted(unknown)}; expected names from {SEQUENCES}")
    templates = TEMPLATES[finding.key]
    fields = _fields(finding, rng)
    usable = [t.format(**fields) for t in templates
              if _field_names(t) <= fields.keys() and ("size" not in _field_names(t) or finding.size_mm > 0)]
    usable = [text for text in usable if shown_by(text, sequences)]
    if not usable:
        # Every template needs a field this finding lacks or a sequence the study lacks: the plainest
        # template that needs no particular sequence (every key has one; tested), missing fields blank.
        blanked = {**{n: "" for t in templates for n in _field_names(t)}, **fields}
        usable = [min((text for text in (t.format(**blanked) for t in templates) if shown_by(text, ())), key=len)]
    text = " ".join(usable[int(rng.integers(len(usable)))].split())
    return text[0].upper() + text[1:]


def write_report(findings: list[Finding], rng: np.random.Generator, sequences: Collection[str]) -> str:
    """Itemised report, one item per lesion (``pathology.reported_findings``), or a normal-study sentence.

    Args:
        findings: the study's findings (all positive labels).
        rng: shuffles the items and phrases them.
        sequences: the study's acquired sequences; no item mentions what none of them shows.

    Returns:
        Numbered lines ("1. ...") in shuffled order, or one normal-study sentence.
    """
    items = reported_findings(findings)
    if not items:
        return NORMAL_REPORTS[int(rng.integers(len(NORMAL_REPORTS)))]
    order = rng.permutation(len(items))
    return "\n".join(f"{i + 1}. {describe(items[j], rng, sequences)}" for i, j in enumerate(order))
