"""The label vocabulary and its clinical mapping (docs/design.md §5)."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest

from prima.labels import default_label_space, label_space_from_dict


def _doc() -> dict:
    return json.loads(resources.files("prima").joinpath("data/labels.json").read_text())


def test_vocabulary_sizes_and_order():
    space = default_label_space()
    assert len(space.diagnoses) == 52
    assert len(space.referral_keys) == 11
    assert space.priority_tiers == ("low", "medium", "high")
    assert space.diagnosis_keys[0] == "cyst_arachnoid_cyst"
    assert space.diagnosis_keys[51] == "ventricular_ventriculomegaly"
    # The reference's spelling is kept in the key, not in the display name.
    sah = space.diagnosis("vascular_hemorrhagic_subarachnoid_hemorrahage")
    assert sah.name == "Subarachnoid hemorrhage"
    assert len(set(space.diagnosis_keys)) == 52


def test_priority_is_highest_tier_of_positives():
    space = default_label_space()
    assert space.priority_of([]) == "low"
    assert space.priority_of(["cyst_arachnoid_cyst"]) == "low"
    assert space.priority_of(["cyst_arachnoid_cyst", "tumor_adult_meningioma"]) == "medium"
    assert space.priority_of(["tumor_adult_meningioma", "trauma_subdural_hematoma"]) == "high"


def test_referrals_follow_mapping_in_output_order():
    space = default_label_space()
    assert space.referrals_of([]) == []
    assert space.referrals_of(["infectious_brain_abscess"]) == ["ns_oncology", "neuro_infectious"]
    assert space.referrals_of(["surgical_craniotomy"]) == []
    both = space.referrals_of(["vascular_ischemic_moyamoya", "structural_chiari_malformation"])
    assert both == ["ns_vascular", "ns_pediatric", "ns_spine", "neuro_stroke"]


def test_positives_from_label_dict_rejects_unknown_keys():
    space = default_label_space()
    labels = {k: 0 for k in space.diagnosis_keys} | {"structural_edema": 1}
    assert space.positives(labels) == ["structural_edema"]
    with pytest.raises(KeyError, match="unknown diagnosis"):
        space.positives({"not_a_label": 1})


def test_inconsistent_mapping_is_refused():
    doc = copy.deepcopy(_doc())
    doc["diagnoses"][0]["tier"] = "urgent"
    with pytest.raises(ValueError, match="unknown tier"):
        label_space_from_dict(doc)
    doc = copy.deepcopy(_doc())
    doc["diagnoses"][0]["referrals"] = ["ns_nowhere"]
    with pytest.raises(ValueError, match="unknown referrals"):
        label_space_from_dict(doc)
