"""The hostile-input corpus (tests/helpers/hostile.py) through ``prima.io`` and the ``prima`` CLI.

Every case either is refused with a ``StudyLoadError`` naming the problem, or loads what is usable and
lists what it skipped with the reason; nothing is written outside the temp area, which is empty after
every case (``guarded_tmp``). The app's upload path runs the same corpus in
tests/app/test_hostile_uploads.py.
"""

from __future__ import annotations

import json

import pytest

from helpers.hostile import GOOD_SERIES, LOADED, PARTIAL, REFUSED, HostileCase, build_corpus
from prima.cli import main as prima_cli
from prima.errors import StudyLoadError
from prima.io import load_study

MIN_CASES = 25


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[HostileCase]:
    return build_corpus(tmp_path_factory.mktemp("inputs"))


def _source(case: HostileCase):
    return case.sources[0] if len(case.sources) == 1 else case.sources


def check_loaded(case: HostileCase, names: list[str], skipped: list[tuple[str, str]]) -> str | None:
    """What is wrong with a load of ``case`` (None: it is what the case expects)."""
    if case.outcome == REFUSED:
        return f"loaded {names} instead of being refused"
    if case.outcome == PARTIAL and (GOOD_SERIES not in names or not any(case.match in f"{n}: {r}" for n, r in skipped)):
        return f"expected {GOOD_SERIES} loaded and {case.match!r} skipped, got {names} / {skipped}"
    if case.outcome == LOADED and not any(case.match in name for name in names):
        return f"expected a series named like {case.match!r}, got {names}"
    return None


def test_the_corpus_is_large_enough(corpus):
    assert len(corpus) >= MIN_CASES
    assert len({case.name for case in corpus}) == len(corpus)


def test_every_case_through_prima_io(corpus, guarded_tmp):
    area, _ = guarded_tmp
    failures = []
    for case in corpus:
        try:
            study = load_study(_source(case))
            problem = check_loaded(case, [s.name for s in study.series], [(s.name, s.reason) for s in study.skipped])
        except StudyLoadError as error:
            problem = None if case.outcome == REFUSED and case.match in str(error) else f"refused: {error}"
        except Exception as error:  # anything else is the defect this test exists to find
            problem = f"crashed with {type(error).__name__}: {error}"
        if list(area.iterdir()):
            problem = f"left temporary files: {list(area.iterdir())}"
        if problem:
            failures.append(f"{case.name}: {problem}")
    assert failures == [], "\n".join(failures)


def test_every_case_through_the_cli(corpus, guarded_tmp, capsys):
    failures = []
    for case in corpus:
        code = prima_cli(["inspect", "--json", *map(str, case.sources)])
        out, err = capsys.readouterr()
        if case.outcome == REFUSED:
            if code != 2 or "prima inspect: error:" not in err or case.match not in err or "Traceback" in err:
                failures.append(f"{case.name}: exit {code}, stderr {err[-300:]!r}")
            continue
        if code != 0:
            failures.append(f"{case.name}: exit {code}, stderr {err[-300:]!r}")
            continue
        doc = json.loads(out)
        problem = check_loaded(case, [s["name"] for s in doc["series"]], [(s["name"], s["reason"]) for s in doc["skipped"]])
        if problem:
            failures.append(f"{case.name}: {problem}")
    assert failures == [], "\n".join(failures)
