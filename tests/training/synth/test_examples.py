"""The example studies shipped in assets/examples: loadable, within budget, reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest

from prima.io import load_study
from training.synth.examples import EXAMPLES, build_example

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
