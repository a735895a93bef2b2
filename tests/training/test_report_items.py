"""training.report_items: itemised reports split, join back exactly and shuffle as whole items."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from training.report_items import is_itemised, join_items, shuffle_items, split_items
from training.synth.study import plan_study


@pytest.fixture(scope="module")
def synthetic_reports() -> list[str]:
    # Plans only (no images): ~15 ms a study at 6 mm.
    return [plan_study(0, index, protocol_blind=False, spacing=6.0, max_series=8).report for index in range(50)]


def test_synthetic_reports_round_trip(synthetic_reports: list[str]) -> None:
    assert any(not is_itemised(r) for r in synthetic_reports)  # both forms are covered
    assert any(len(split_items(r)) == 1 and is_itemised(r) for r in synthetic_reports)
    assert any(len(split_items(r)) >= 3 for r in synthetic_reports)
    for report in synthetic_reports:
        items = split_items(report)
        assert all(re.match(r"\d+\. ", item) is None for item in items), items
        assert join_items(items, numbered=is_itemised(report)) == report


def test_split_drops_numbers_and_blank_lines_and_keeps_continuations() -> None:
    report = "\n1. Meningioma of the left convexity\n   measuring 4.2 cm.\n\n2. Mild edema.\n"
    assert split_items(report) == ["Meningioma of the left convexity\nmeasuring 4.2 cm.", "Mild edema."]
    assert split_items("Normal brain MRI for age.") == ["Normal brain MRI for age."]
    assert split_items("2.5 cm mass in the pons.") == ["2.5 cm mass in the pons."]  # a size, not a number
    assert split_items(" \n") == [] and join_items([]) == ""
    assert join_items(["Mild edema."]) == "1. Mild edema."
    assert join_items(["Normal brain MRI for age."], numbered=False) == "Normal brain MRI for age."


@pytest.mark.parametrize(("items", "numbered"), [(["a", " "], True), (["a", "b"], False)])
def test_join_refuses_bad_items(items: list[str], numbered: bool) -> None:
    with pytest.raises(ValueError):
        join_items(items, numbered=numbered)


def test_shuffle_keeps_the_items_and_is_deterministic(synthetic_reports: list[str]) -> None:
    long = max(synthetic_reports, key=lambda r: len(split_items(r)))
    count = len(split_items(long))
    assert count >= 4
    draws = {shuffle_items(long, np.random.default_rng(seed)) for seed in range(20)}
    assert len(draws) > 5  # the order really changes
    for shuffled in draws:
        assert Counter(split_items(shuffled)) == Counter(split_items(long))
        assert [line.split(". ")[0] for line in shuffled.splitlines()] == [str(n) for n in range(1, count + 1)]
    assert shuffle_items(long, np.random.default_rng(7)) == shuffle_items(long, np.random.default_rng(7))
    normal = next(r for r in synthetic_reports if not is_itemised(r))
    assert shuffle_items(normal, np.random.default_rng(0)) == normal
