"""The example studies shipped in assets/examples: loadable, within budget, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prima.io import load_study
from training.synth.examples import CATALOGUE, EXAMPLES, build_example

ASSETS = Path(__file__).resolve().parents[3] / "assets" / "examples"


def test_examples_fit_the_ten_megabyte_budget():
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.file_name for e in EXAMPLES])
def test_shipped_example_loads_every_series(example):
    study = load_study(ASSETS / example.file_name)
    assert len(study.series) == example.max_series
    assert not study.skipped
    assert study.description


def test_rebuilt_example_matches_the_shipped_one(tmp_path):
    example = next(e for e in EXAMPLES if not e.keys)
    rebuilt = load_study(build_example(example, tmp_path))
    shipped = load_study(ASSETS / example.file_name)
    assert [(s.name, s.array.shape) for s in rebuilt.series] == [(s.name, s.array.shape) for s in shipped.series]


def test_the_catalogue_lists_every_example_with_its_role():
    entries = json.loads((ASSETS / CATALOGUE).read_text())
    assert [e["file"] for e in entries] == [e.file_name for e in EXAMPLES]
    assert all((ASSETS / e["file"]).is_file() and e["title"] for e in entries)
    assert sorted(e["role"] for e in entries if e["role"]) == ["post", "pre"]


def test_the_pair_is_one_subject_before_and_after_resection():
    pre, post = (next(e for e in EXAMPLES if e.role == role) for role in ("pre", "post"))
    assert pre.index == post.index  # same study index: the same deformed anatomy
    assert "tumor_adult_high_grade_glioma" in pre.keys and "surgical_resection_cavity" in post.keys
