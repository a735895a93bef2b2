from __future__ import annotations

from pathlib import Path

import pytest

from prima.labels import default_label_space
from prima.manifest import SeriesEntry, StudyEntry
from training.labeler import (
    IMPLIES,
    KEYWORDS,
    NEGATED,
    POSITIVE,
    RESOLVED,
    UNCERTAIN,
    ReportLabeler,
    RuleJudge,
    keyword_prefilter,
    labels_for,
    report_mentions,
)
from training.synth.pathology import IMPLIES as SYNTH_IMPLIES
from training.synth.study import plan_study

ICH = "vascular_hemorrhagic_intracranial_hemorrhage"
SDH = "trauma_subdural_hematoma"
MENINGIOMA = "tumor_adult_meningioma"
GLIOMA = "tumor_adult_glioma"


def positives(labels: dict[str, int]) -> set[str]:
    return {key for key, value in labels.items() if value}


def test_every_key_has_keywords_that_find_it_in_its_display_name() -> None:
    space = default_label_space()
    assert set(KEYWORDS) == set(space.diagnosis_keys)
    labeler = ReportLabeler()
    for diagnosis in space.diagnoses:
        assert diagnosis.key in keyword_prefilter(diagnosis.name), diagnosis.name
        # The name labels its own key (and what it implies) and nothing else.
        assert positives(labeler.label(diagnosis.name)) == {diagnosis.key, *IMPLIES.get(diagnosis.key, ())}


@pytest.mark.parametrize("phrase,key", [
    ("Right convexity SDH.", SDH), ("Glioblastoma of the left temporal lobe.", "tumor_adult_high_grade_glioma"),
    ("Grade 4 astrocytoma.", "tumor_adult_high_grade_glioma"), ("Oligodendroglioma.", GLIOMA),
    ("Left frontal burr hole.", "surgical_craniotomy"), ("Leukoaraiosis.", "vascular_ischemic_small_vessel_disease"),
    ("White matter hyperintensities of presumed vascular origin.", "vascular_ischemic_small_vessel_disease"),
    ("Communicating hydrocephalus.", "ventricular_ventriculomegaly"), ("Acoustic neuroma.", "tumor_adult_schwannoma"),
    ("Acute left MCA territory infarct.", "vascular_ischemic_large_vessel_stroke"),
])
def test_typical_phrases_are_labelled(phrase: str, key: str) -> None:
    assert ReportLabeler().label(phrase)[key] == 1


def test_mentions_are_numbered_items_else_sentences() -> None:
    report = ("IMPRESSION:\n1. Large meningioma\n   with edema.\n2. No hydrocephalus.\n\n"
              "No hemorrhage. Normal flow voids.")
    assert report_mentions(report) == ["IMPRESSION:", "Large meningioma with edema.", "No hydrocephalus.",
                                       "No hemorrhage.", "Normal flow voids."]
    found = keyword_prefilter(report, keys=[MENINGIOMA, ICH, SDH])
    assert found == {MENINGIOMA: ["Large meningioma with edema."], ICH: ["No hemorrhage."]}
    with pytest.raises(ValueError, match="no keywords"):
        keyword_prefilter(report, keys=["not_a_key"])


@pytest.mark.parametrize("report,key,expected", [
    ("No evidence of hemorrhage.", ICH, 0),
    ("No acute infarct.", "vascular_ischemic_large_vessel_stroke", 0),
    ("Negative for metastatic disease.", "tumor_adult_brain_metastasis", 0),
    ("Ventricles free of hydrocephalus.", "ventricular_ventriculomegaly", 0),
    ("Meningioma without surrounding edema.", "structural_edema", 0),
    ("Hemorrhage is ruled out.", ICH, 0),
    ("The left subdural hematoma has resolved.", SDH, 0),
    ("Interval resolution of the subdural hematoma.", SDH, 0),
    ("Subdural hematoma, no longer seen.", SDH, 0),
    ("Cannot exclude a small hemorrhage.", ICH, 1),
    ("Early hemorrhage cannot be excluded.", ICH, 1),
    ("Possible small meningioma.", MENINGIOMA, 1),
    ("No interval change in the size of the meningioma.", MENINGIOMA, 1),
    ("Acute subdural hematoma.", SDH, 1),
])
def test_negation_resolution_and_uncertainty(report: str, key: str, expected: int) -> None:
    assert ReportLabeler().label(report)[key] == expected


def test_uncertain_policy_is_configurable() -> None:
    strict = ReportLabeler(RuleJudge(uncertain_positive=False))
    for report in ("Cannot exclude a small hemorrhage.", "Findings may represent hemorrhage.",
                   "Questionable hemorrhage in the left thalamus."):
        assert ReportLabeler().label(report)[ICH] == 1
        assert strict.label(report)[ICH] == 0
    assert strict.label("Cannot exclude hemorrhage. Acute hemorrhage in the right thalamus.")[ICH] == 1


def test_negation_scope_ends_at_clause_boundary() -> None:
    labels = ReportLabeler().label("No hemorrhage, but a large meningioma.")
    assert labels[ICH] == 0 and labels[MENINGIOMA] == 1
    labels = ReportLabeler().label("No hemorrhage; large meningioma. However, there is a subdural hematoma.")
    assert positives(labels) == {MENINGIOMA, SDH}
    labels = ReportLabeler().label("No hemorrhage, mass effect, or midline shift.")
    assert positives(labels) == set()
    # A "compatible with" phrase asserts the diagnosis the negated description leads to.
    labels = ReportLabeler().label("CSF-signal cyst without restricted diffusion, compatible with an arachnoid cyst.")
    assert positives(labels) == {"cyst_arachnoid_cyst"}


def test_assertions_per_occurrence() -> None:
    judge = RuleJudge()
    mention = "No hemorrhage; possible hemorrhage; resolved hemorrhage; hemorrhage in the pons."
    assert judge.assertions(mention, ICH) == [NEGATED, UNCERTAIN, RESOLVED, POSITIVE]
    with pytest.raises(ValueError, match="no keywords"):
        judge.assertions(mention, "not_a_key")


def test_hierarchy() -> None:
    labeler = ReportLabeler()
    assert positives(labeler.label("Low-grade glioma of the insula.")) == {GLIOMA, "tumor_adult_low_grade_glioma"}
    assert positives(labeler.label("Post-operative resection cavity.")) == {"surgical_resection_cavity",
                                                                           "surgical_craniotomy"}
    assert positives(labeler.label("No residual high-grade glioma.")) == set()
    # The labeler's implications are clinical co-occurrences the synthetic engine also enforces.
    for key, implied in IMPLIES.items():
        assert set(implied) <= set(SYNTH_IMPLIES[key])


def test_reproduces_synthetic_labels() -> None:
    space = default_label_space()
    # Each diagnosis once as the forced primary finding (rare keys included), plus a sampled data set.
    plans = [plan_study(7, i, protocol_blind=False, spacing=6.0, max_series=8, keys=[key])
             for i, key in enumerate(space.diagnosis_keys)]
    plans += [plan_study(0, i, protocol_blind=False, spacing=6.0, max_series=8) for i in range(48)]
    predicted = ReportLabeler().label_many([plan.report for plan in plans])
    pairs = [(plan.labels[key], labels[key]) for plan, labels in zip(plans, predicted) for key in space.diagnosis_keys]
    missed = [(plan.study_id, key) for plan, labels in zip(plans, predicted) for key in space.diagnosis_keys
              if plan.labels[key] and not labels[key]]
    assert missed == []  # every synthetic diagnosis is found in its report
    assert sum(truth == guess for truth, guess in pairs) / len(pairs) >= 0.995
    for key in space.diagnosis_keys:
        agreement = sum(plan.labels[key] == labels[key] for plan, labels in zip(plans, predicted)) / len(plans)
        assert agreement >= 0.97, key


class CountingJudge:
    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    def __call__(self, report: str, key: str, mentions: list[str]) -> bool:
        self.asked.append((key, mentions))
        return key == MENINGIOMA


def test_judge_is_asked_only_about_prefiltered_keys() -> None:
    judge = CountingJudge()
    labels = ReportLabeler(judge).label("1. No hemorrhage.\n2. Meningioma of the falx.\n3. Normal ventricles.")
    assert sorted(key for key, _ in judge.asked) == [MENINGIOMA, ICH]
    assert dict(judge.asked)[MENINGIOMA] == ["Meningioma of the falx."]
    assert positives(labels) == {MENINGIOMA}
    judge.asked.clear()
    ReportLabeler(judge).label("Unremarkable MRI of the brain.")
    assert judge.asked == []


def test_custom_judge_and_keywords_plug_in() -> None:
    def says_yes(report: str, key: str, mentions: list[str]) -> bool:
        return True  # e.g. an LLM that ignores the negation

    labeler = ReportLabeler(says_yes, keywords={ICH: (r"bleed\w*",)})
    labels = labeler.label("No bleeding. Meningioma.")
    assert positives(labels) == {ICH} and len(labels) == len(default_label_space().diagnosis_keys)
    with pytest.raises(ValueError, match="unknown diagnosis"):
        ReportLabeler(keywords={"not_a_key": ("x",)})
    with pytest.raises(ValueError, match="empty"):
        ReportLabeler(keywords={ICH: ()})
    with pytest.raises(ValueError, match="implies"):
        ReportLabeler(implies={ICH: ("not_a_key",)})


def test_labels_for_prefers_known_labels() -> None:
    series = (SeriesEntry("AX T1", Path("t1.nii.gz")),)
    known = StudyEntry("S1", "P1", "train", "", series, "Large meningioma.", {MENINGIOMA: 0, ICH: 1})
    assert labels_for(known, ReportLabeler()) == {MENINGIOMA: 0, ICH: 1}
    unlabelled = StudyEntry("S2", "P2", "train", "", series, "Large meningioma.", {})
    assert positives(labels_for(unlabelled, ReportLabeler())) == {MENINGIOMA}
