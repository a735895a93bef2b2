"""Property-based fuzzing of the loaders (fixed seed): corrupt DICOM/NIfTI either loads or raises StudyLoadError.

The seeds, mutations and the property live in ``tests/helpers/fuzz.py`` (shared with the long run
``benchmarks/bench_fuzz.py``). Each example writes one mutated study and calls ``load_study`` and
the format's reader under a wall-clock bound and an address-space budget; any other exception, a
timeout, an allocation beyond the budget or an unusable result fails the test (and hypothesis shrinks
it to a minimal list of mutations). ``derandomize=True``: the same examples on every run;
``database=None``: no ``.hypothesis`` folder in the repo; ``deadline=None``: the per-call timer
bounds a hang, hypothesis' deadline would only time finished examples and flake on a busy CPU.

The regression cases below are the failures the fuzzer found, each fixed in ``prima/io``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from helpers import fuzz
from helpers.fuzz import ByteMutation, Case, NiftiFieldMutation, TagMutation
from prima.errors import SeriesLoadError
from prima.io import load_study, read_dicom, read_nifti

fuzz.keep_hypothesis_out_of_the_repo()
FUZZ_SETTINGS = settings(derandomize=True, database=None, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_property(case: Case) -> fuzz.CaseOutcome:
    outcome = fuzz.run_case(case)
    assert not outcome.failures, outcome.report()
    return outcome


@settings(FUZZ_SETTINGS, max_examples=120)
@given(fuzz.cases(fuzz.DICOM_SEEDS, ("tags", "files")))
def test_dicom_element_mutations_load_or_raise_study_load_error(case: Case) -> None:
    _assert_property(case)


@settings(FUZZ_SETTINGS, max_examples=80)
@given(fuzz.cases(fuzz.DICOM_SEEDS, ("bytes", "files")))
def test_dicom_byte_damage_loads_or_raises_study_load_error(case: Case) -> None:
    _assert_property(case)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(fuzz.cases(fuzz.NIFTI_SEEDS, ("bytes", "nifti")))
def test_nifti_header_and_byte_mutations_load_or_raise_study_load_error(case: Case) -> None:
    _assert_property(case)


@pytest.mark.parametrize("name", sorted(fuzz.seeds()))
def test_every_seed_loads_unmutated(name: str) -> None:
    """A seed that did not load would make every case an error and the fuzzing vacuous."""
    outcome = fuzz.run_case(Case(name, ()))
    assert [call.label for call in outcome.calls] == ["loaded"] * len(outcome.calls), outcome.report()


def test_mutations_change_the_files() -> None:
    """Each mutation family really alters the seed (a no-op family would test nothing)."""
    original = dict(fuzz.seeds()["dicom-series"].files)
    for mutation in (TagMutation("Rows", "set", b"abc", "LO"), TagMutation("PixelSpacing", "delete"),
                     ByteMutation(0, "truncate", 100, b""), fuzz.FileMutation("drop", 0)):
        assert Case("dicom-series", (mutation,)).files() != original, mutation
    nifti = dict(fuzz.seeds()["nifti-int-gz"].files)
    assert Case("nifti-int-gz", (NiftiFieldMutation("dim", 1, 4096),)).files() != nifti


def test_bounds_turn_a_hang_and_a_huge_allocation_into_failures() -> None:
    """The guards themselves: a sleep past the limit is interrupted, a 64 GiB allocation is refused."""
    start = time.monotonic()
    with pytest.raises(fuzz.CaseTimeout):
        with fuzz.bounded(0.2, fuzz.DEFAULT_MEMORY_BUDGET):
            time.sleep(5)
    assert time.monotonic() - start < 2
    if fuzz._address_space() is None:
        pytest.skip("no /proc/self/statm: the address-space cap is Linux-only")
    with pytest.raises(MemoryError):
        with fuzz.bounded(5, fuzz.DEFAULT_MEMORY_BUDGET):
            np.ones(1 << 36, dtype=np.uint8)
    np.ones(1 << 28, dtype=np.uint8)  # the cap is lifted again afterwards


def test_property_flags_unusable_volumes() -> None:
    assert fuzz._check_volume(np.zeros((2, 2, 2), np.float32), np.eye(4), True) is None
    assert "not a finite" in fuzz._check_volume(np.zeros((2, 2, 2), np.float32), np.full((4, 4), np.nan), True)
    assert "not invertible" in fuzz._check_volume(np.zeros((2, 2, 2), np.float32), np.diag([1, 0, 1, 1.0]), True)
    assert "NaN" in fuzz._check_volume(np.full((2, 2, 2), np.nan, np.float32), np.eye(4), True)
    assert "float32" in fuzz._check_volume(np.zeros((2, 2, 2)), np.eye(4), True)


# Failures found by the fuzzer (before the fixes: the exception type, or the allocation, in the comment),
# with the plain reason each now gives.
HUGE_TRAILING_ELEMENT = b"\x09\x00\x10\x00OB\x00\x00\x00\x00\x00\xf0"  # private OB element declaring 3.75 GiB
REGRESSIONS = [
    # ValueError: invalid literal for int() with base 10: 'abc'
    (Case("dicom-series", (TagMutation("Rows", "set", b"abc", "LO"),)), "unusable image matrix"),
    # TypeError: int() argument must be ... not 'NoneType'
    (Case("dicom-enhanced", (TagMutation("Rows", "set", b""),)), "unusable image matrix"),
    # TypeError: int() of a two-valued Rows (MultiValue)
    (Case("dicom-series", (TagMutation("Rows", "set", b"\x10\x00\x10\x00"),)), "unusable image matrix"),
    # ValueError: cannot convert float NaN to integer (InstanceNumber)
    (Case("dicom-series", (TagMutation("InstanceNumber", "set", b"nan"),)), None),
    # ValueError in series_meta: int(NaN) of SeriesNumber
    (Case("dicom-series", (TagMutation("SeriesNumber", "set", b"nan"),)), None),
    # OverflowError raised by pydicom converting NumberOfFrames 'inf'
    (Case("dicom-enhanced", (TagMutation("NumberOfFrames", "set", b"inf"),)), "per-frame geometry"),
    # OSError (struct.error) parsing a garbled PerFrameFunctionalGroupsSequence
    (Case("dicom-enhanced", (TagMutation("PerFrameFunctionalGroupsSequence", "set", b"\xff\xff", "UN"),)),
     "per-frame geometry"),
    # nibabel ValueError (ornt_transform) / singular affine from PixelSpacing 0
    (Case("dicom-enhanced", (TagMutation("PixelSpacing", "set", b"0\\0"),)), "PixelSpacing"),
    (Case("dicom-series", (TagMutation("PixelSpacing", "set", b"nan\\1"),)), "PixelSpacing"),
    # MemoryError: pydicom allocates the declared length of an element (3.75 GiB) before reading it
    (Case("dicom-series", (ByteMutation(0, "insert", -1, HUGE_TRAILING_ELEMENT),)), None),
    # MemoryError: reading a deferred element (PixelData) whose inserted bytes make its length huge
    (Case("dicom-enhanced", (ByteMutation(1, "insert", 1024, b"\xe3yb\xbd\xc7UQ+"),) * 2), "pixel data declares"),
    # numpy LinAlgError (SVD did not converge) on an sform holding NaN / Inf
    (Case("nifti-float", (NiftiFieldMutation("srow_x", 0, float("nan")),)), "no usable affine"),
    (Case("nifti-float", (NiftiFieldMutation("srow_y", 2, float("inf")), NiftiFieldMutation("sform_code", None, 2))),
     "no usable affine"),
    # ValueError: min() arg is an empty sequence (plane detection) / ornt_transform: a zero-length voxel axis
    (Case("nifti-float", (NiftiFieldMutation("srow_y", 0, 0.0),)), "no usable affine"),
    # MemoryError: a declared 4096^3 volume was allocated before the (tiny) file was read
    (Case("nifti-float", tuple(NiftiFieldMutation("dim", i, 4096) for i in (1, 2, 3))), "header declares"),
    (Case("nifti-int-gz", tuple(NiftiFieldMutation("dim", i, 4096) for i in (1, 2, 3))), "header declares"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the planted values
@pytest.mark.parametrize("case, reason", REGRESSIONS, ids=[str(i) for i in range(len(REGRESSIONS))])
def test_fuzzer_regressions(case: Case, reason: str | None, tmp_path: Path) -> None:
    """Each found failure now satisfies the property; the reader gives the expected plain reason."""
    outcome = _assert_property(case)
    folder = fuzz.write_files(case.files(), tmp_path / "study")
    if reason is None:  # the damaged element is ignored: the series still loads, whole
        assert outcome.label == "loaded", outcome.calls
        assert min(load_study(folder).series[0].shape) >= 4
        return
    with pytest.raises(SeriesLoadError, match=reason):
        if fuzz.seeds()[case.seed].kind == "nifti":
            read_nifti(next(folder.iterdir()))
        else:
            read_dicom(folder)
