"""Long fuzzing run of the study loaders: many hypothesis-generated mutations of small valid studies.

Uses the seeds, mutation strategies and the per-case property of ``tests/helpers/fuzz.py`` (the suite
test ``tests/io/test_fuzz_loaders.py`` runs a few hundred of the same cases). Each case writes a
mutated DICOM series or NIfTI file to a fresh folder and calls ``load_study`` on it and
``read_dicom`` / ``read_nifti``, each under a wall-clock bound and an address-space budget. A call
either loads a valid volume, raises a ``StudyLoadError`` subclass, or is a failure (another exception,
a timeout, an allocation beyond the budget, an invalid result).

Prints the number of cases tried, ``load_study``'s outcomes (loaded / each error class), the reader
calls' outcomes, timing, then one line per failing case (its mutations, the call and the failure) and
a traceback summary for each distinct failure site. Exits 1 when any case failed.

    python benchmarks/bench_fuzz.py [--cases 2000] [--seed 0] [--seeds dicom-series nifti-float ...]
                                    [--families bytes tags files nifti] [--time-limit 5] [--memory-mb 1024]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from helpers import fuzz  # noqa: E402


def run(cases: int, seed_value: int, seed_names: tuple[str, ...], families: tuple[str, ...], time_limit: float,
        memory_budget: int) -> list[fuzz.CaseOutcome]:
    """Draw ``cases`` cases with hypothesis (generation only: nothing to shrink, no database) and run each."""
    outcomes: list[fuzz.CaseOutcome] = []

    @seed(seed_value)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.cases(seed_names, families))
    def one(case: fuzz.Case) -> None:
        outcomes.append(fuzz.run_case(case, time_limit, memory_budget))

    one()
    return outcomes


def site(call: fuzz.CallOutcome) -> str:
    """Where a failure comes from: its label and the last ``File ...`` line of its traceback."""
    frames = [line.strip() for line in call.detail.splitlines() if line.strip().startswith("File ")]
    return f"{call.label} at {frames[-1] if frames else call.detail.splitlines()[0][:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="number of cases to generate")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)")
    parser.add_argument("--seeds", nargs="+", default=list(fuzz.DICOM_SEEDS + fuzz.NIFTI_SEEDS),
                        choices=list(fuzz.DICOM_SEEDS + fuzz.NIFTI_SEEDS), help="seed studies to mutate")
    parser.add_argument("--families", nargs="+", default=list(fuzz.FAMILIES), choices=list(fuzz.FAMILIES),
                        help="mutation families")
    parser.add_argument("--time-limit", type=float, default=fuzz.DEFAULT_TIME_LIMIT_S,
                        help="seconds one loader call may take")
    parser.add_argument("--memory-mb", type=int, default=fuzz.DEFAULT_MEMORY_BUDGET >> 20,
                        help="address space one loader call may add (MiB)")
    args = parser.parse_args()

    fuzz.keep_hypothesis_out_of_the_repo()
    start = time.monotonic()
    outcomes = run(args.cases, args.seed, tuple(args.seeds), tuple(args.families), args.time_limit,
                   args.memory_mb << 20)
    elapsed = time.monotonic() - start

    print(f"cases tried: {len(outcomes)} (seed {args.seed}; seeds {' '.join(args.seeds)}; families "
          f"{' '.join(args.families)}) in {elapsed:.1f} s, {1000 * elapsed / max(len(outcomes), 1):.1f} ms/case, "
          f"slowest {max((o.seconds for o in outcomes), default=0):.2f} s")
    by_seed = collections.Counter(o.case.seed for o in outcomes)
    print("cases per seed: " + ", ".join(f"{name} {count}" for name, count in sorted(by_seed.items())))
    failing = [o for o in outcomes if o.failures]
    load_labels = collections.Counter("FAILURE" if any(c.entry == "load_study" for c in o.failures) else o.label
                                      for o in outcomes)
    print("load_study outcomes:")
    for label, count in load_labels.most_common():
        print(f"  {label:<28} {count}")
    reader_labels = collections.Counter((c.entry.split("(")[0], c.label if c.status != "failure" else "FAILURE")
                                        for o in outcomes for c in o.calls[1:])
    print("reader outcomes:")
    for (entry, label), count in sorted(reader_labels.items()):
        print(f"  {entry:<12} {label:<28} {count}")
    print(f"failing cases: {len(failing)}")
    sites: dict[str, fuzz.CallOutcome] = {}
    for outcome in failing:
        for call in outcome.failures:
            print(f"  FAIL {call.entry}: {site(call)}\n       case {outcome.case}")
            sites.setdefault(site(call), call)
    for name, call in sites.items():
        print(f"\n=== {name}\n{call.detail}")
    sys.exit(1 if failing else 0)


if __name__ == "__main__":
    main()
