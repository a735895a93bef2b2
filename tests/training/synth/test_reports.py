"""Report writer: every diagnosis is named in its sentence, items are itemised and varied, one item per
lesion, no item mentions a sequence the study did not acquire, normal studies get a normal sentence."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from prima.labels import default_label_space
from training.synth.anatomy import make_subject
from training.synth.pathology import GLIOMA, SUBTYPES, apply_findings, reported_findings
from training.synth.phantom import Finding
from training.synth.reports import NORMAL_REPORTS, TEMPLATES, describe, format_size, shown_by, write_report
from training.synth.sequences import SEQUENCES
from training.synth.study import plan_study

KEYS = default_label_space().diagnosis_keys

# Words (any one, case-insensitive) a report sentence must contain to name the diagnosis.
REPORT_WORDS: dict[str, tuple[str, ...]] = {
    "cyst_arachnoid_cyst": ("arachnoid",), "cyst_colloid_cyst": ("colloid",),
    "developmental_dandy_walker_malformation": ("dandy-walker",),
    "developmental_dysgenesis_corpus_callosum": ("corpus callosum", "callosal"),
    "developmental_heterotopia": ("heterotopia",), "infectious_brain_abscess": ("abscess",),
    "infectious_viral_encephalitis": ("encephalitis",),
    "inflammatory_multiple_sclerosis": ("multiple sclerosis", "demyelinat"), "inflammatory_neurosarcoid": ("sarcoid",),
    "sellar_craniopharyngioma": ("craniopharyngioma",), "sellar_pituitary_adenoma": ("adenoma",),
    "sellar_rathkes_cleft_cyst": ("rathke",), "spine_syrinx": ("syrinx", "syring"),
    "structural_brain_herniation": ("herniation",), "structural_cephaloceles": ("cephalocele",),
    "structural_cerebral_atrophy": ("atrophy", "volume loss"), "structural_chiari_malformation": ("chiari",),
    "structural_edema": ("edema",), "structural_encephalomalacia": ("encephalomalacia",),
    "structural_mass_effect": ("mass effect",), "structural_midline_shift": ("midline",),
    "surgical_catheter": ("catheter",), "surgical_craniotomy": ("craniotomy", "craniectomy"),
    "surgical_resection_cavity": ("resection cavity", "surgical cavity"), "trauma_brain_contusion": ("contusion",),
    "trauma_diffuse_axonal_injury": ("axonal",), "trauma_subdural_hematoma": ("subdural",),
    "tumor_adult_brain_metastasis": ("metasta",), "tumor_adult_glioma": ("glioma", "glial"),
    "tumor_adult_high_grade_glioma": ("high-grade glioma",), "tumor_adult_low_grade_glioma": ("low-grade glioma",),
    "tumor_adult_lymphoma": ("lymphoma",), "tumor_adult_meningioma": ("meningioma",),
    "tumor_adult_pineal_tumor": ("pineal",), "tumor_adult_schwannoma": ("schwannoma", "acoustic neuroma"),
    "tumor_pediatric_brainstem_glioma": ("brainstem glioma", "pontine glioma"),
    "tumor_pediatric_ependymoma": ("ependymoma",), "tumor_pediatric_germ_cell_tumor": ("germ cell", "germinoma"),
    "tumor_pediatric_medulloblastoma": ("medulloblastoma",),
    "tumor_pediatric_pilocytic_astrocytoma": ("pilocytic astrocytoma",),
    "vascular_hemorrhagic_intracranial_hemorrhage": ("hemorrhage", "hematoma"),
    "vascular_hemorrhagic_intraventricular_hemorrhage": ("intraventricular hemorrhage",),
    "vascular_hemorrhagic_subarachnoid_hemorrahage": ("subarachnoid",),
    "vascular_ischemic_lacunar_stroke": ("lacunar",), "vascular_ischemic_large_vessel_stroke": ("infarct", "stroke"),
    "vascular_ischemic_moyamoya": ("moyamoya",), "vascular_ischemic_small_vessel_disease": ("small vessel",),
    "vascular_malformation_arteriovenous_malformation": ("arteriovenous malformation", "avm"),
    "vascular_malformation_cavernoma": ("cavernoma", "cavernous"), "vascular_malformation_cerebral_aneurysm":
        ("aneurysm",),
    "ventricular_intracranial_hypotension": ("intracranial hypotension",),
    "ventricular_ventriculomegaly": ("ventriculomegaly",),
}


@pytest.fixture(scope="module")
def findings_by_key():
    """Real findings: each diagnosis painted into a coarse (3 mm) subject."""
    subject = make_subject(np.random.default_rng(2), spacing=3.0, age=50.0)
    out = {}
    for i, key in enumerate(KEYS):
        phantom = copy.deepcopy(subject)
        apply_findings(phantom, [key], np.random.default_rng(i))
        out[key] = phantom.findings
    return out


def test_every_label_has_templates_and_words():
    assert set(TEMPLATES) == set(KEYS) == set(REPORT_WORDS)


@pytest.mark.parametrize("key", KEYS)
def test_report_names_the_finding_in_every_variant(key, findings_by_key):
    finding = next(f for f in findings_by_key[key] if f.key == key)
    for sequences in (SEQUENCES, ()):  # every series, or none that shows anything particular
        sentences = {describe(finding, np.random.default_rng(seed), sequences) for seed in range(30)}
        for sentence in sentences:
            assert any(w in sentence.lower() for w in REPORT_WORDS[key]), sentence
            assert "{" not in sentence and "}" not in sentence, sentence
    assert len({describe(finding, np.random.default_rng(seed), SEQUENCES) for seed in range(30)}) >= 2, (
        f"{key}: no variation in phrasing")


def test_every_diagnosis_has_a_template_that_needs_no_particular_sequence():
    for key, templates in TEMPLATES.items():
        assert any(shown_by(t, ()) for t in templates), key


def test_report_is_itemised_shuffled_and_mentions_sizes(findings_by_key):
    findings = findings_by_key["tumor_adult_high_grade_glioma"]
    reports = {write_report(findings, np.random.default_rng(s), SEQUENCES) for s in range(20)}
    for report in reports:
        lines = report.splitlines()
        assert len(lines) == len(findings) - 1  # the implied glioma label is the same lesion
        assert [line.split(".")[0] for line in lines] == [str(i + 1) for i in range(len(lines))]
    first_items = {r.splitlines()[0] for r in reports}
    assert len(first_items) > 1  # item order and phrasing vary
    glioma = next(f for f in findings if f.key == "tumor_adult_high_grade_glioma")
    assert any(format_size(glioma.size_mm) in r for r in reports)


def test_normal_study_report():
    texts = {write_report([], np.random.default_rng(s), SEQUENCES) for s in range(40)}
    assert texts <= set(NORMAL_REPORTS) and len(texts) > 3


def test_format_size_and_unknown_key():
    assert format_size(23.4) == "2.3 cm" and format_size(7.2) == "7 mm"
    with pytest.raises(ValueError):
        describe(Finding("nonexistent", "left frontal lobe", 5.0), np.random.default_rng(0), SEQUENCES)
    with pytest.raises(ValueError):
        describe(Finding("spine_syrinx", "cervical spinal cord", 5.0), np.random.default_rng(0), ["t3"])


# What an item may say only when the study acquired one of these sequences (written out here from the
# clinical rule, independently of reports.SEQUENCE_TERMS).
NEEDS = (
    (r"enhanc", {"t1_post", "mprage_post"}),
    (r"diffusion|\bADC\b|\bDWI\b", {"dwi", "adc"}),
    (r"\bSWI\b|susceptibility|blooming|microbleed|microhemorrhage", {"swi", "t2star"}),
    (r"FLAIR", {"flair"}),
    (r"\bT1\b", {"t1", "mprage"}),
    (r"\bT2\b(?!\*)", {"t2"}),
)


def check_report(plan) -> None:
    acquired = {s.spec.sequence for s in plan.series}
    lines = plan.report.splitlines() if plan.findings else []
    for line in lines:
        for pattern, showing in NEEDS:
            if re.search(pattern, line, re.IGNORECASE):
                assert acquired & showing, f"{line!r} but the study acquired only {sorted(acquired)}"
    keys = {f.key for f in plan.findings}
    covered = [k for k, subtypes in SUBTYPES.items() if k in keys and keys & set(subtypes)]
    assert len(lines) == len(plan.findings) - len(covered)  # one item per lesion


def test_generated_reports_mention_only_acquired_sequences_one_item_per_lesion():
    # The cheap metadata-only path (coarse phantom): sampled studies, indication-driven and blind, and
    # every diagnosis forced into a blind study (often without its key sequences).
    for index in range(150):
        check_report(plan_study(11, index, spacing=6.0, protocol_blind=index % 2 == 0))
    for index, key in enumerate(KEYS):
        for blind in (True, False):
            plan = plan_study(12, index, spacing=6.0, keys=[key], protocol_blind=blind)
            check_report(plan)
            assert any(w in plan.report.lower() for w in REPORT_WORDS[key])  # the diagnosis is still named


def test_graded_glioma_is_one_item(findings_by_key):
    findings = findings_by_key["tumor_adult_high_grade_glioma"]
    assert {GLIOMA, "tumor_adult_high_grade_glioma"} <= {f.key for f in findings}
    assert GLIOMA not in {f.key for f in reported_findings(findings)}
    assert [f.key for f in reported_findings(findings_by_key[GLIOMA])].count(GLIOMA) == 1  # ungraded: its own item
