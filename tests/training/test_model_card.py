"""The model card's build-target rows: the release's wall time and the data stage's synthesis rate."""

from __future__ import annotations

from training.model_card import build_rows


def provenance(data_section: dict, **stage_seconds: float) -> dict:
    return {"stage_seconds": stage_seconds, "config": {"data": data_section}}


def test_build_time_adds_every_stage_and_is_judged_against_two_hours():
    rows = build_rows(provenance({"manifest": "m.jsonl"}, data=1.0, clip=3600.0, scaling=3599.0))
    assert rows == ["| Release build time, every stage (minutes) | <= 120 | 120 | met |"]
    assert "**not met**" in build_rows(provenance({"manifest": "m.jsonl"}, clip=7261.0))[0]


def test_synthesis_rate_is_the_data_stage_studies_per_minute():
    fast, slow = (build_rows(provenance({"n": 900}, data=seconds, clip=60.0))[1] for seconds in (1800.0, 1869.0))
    assert fast == "| Synthesis (studies per minute, data stage) | >= 30 | 30.0 | met |"
    assert slow == "| Synthesis (studies per minute, data stage) | >= 30 | 28.9 | **not met** |"


def test_a_given_manifest_has_no_synthesis_row():
    assert len(build_rows(provenance({"manifest": "m.jsonl"}, data=0.1, clip=60.0))) == 1
