"""prima's DICOM geometry checked against an independent converter, dcm2niix.

Every DICOM series the tests can produce (written by prima's writer, by the synthetic engine, by a
pydicom-built enhanced multi-frame object, and vendor samples: a Philips enhanced MPRAGE and Siemens
mosaics) is loaded with ``prima.io.load_study`` and converted with dcm2niix. Both are brought to
nibabel's canonical axis order (permutation/flips only, done by nibabel, not prima); then the voxels
must agree within float rounding of the rescale (a fraction of one stored-integer step) and the
affines within 1e-3 mm. A marker planted on the patient's left must land on the same world point in
both. The module prints "dcm2niix oracle: N series checked, M disagreements" at its end.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers.dcm2niix import (
    Conversion,
    compare,
    dicom_rescale_step,
    oracle_volume,
    run_dcm2niix,
    sample_along_one_axis,
    world_of_brightest,
)
from helpers.enhanced import write_enhanced_mr
from helpers.studies import THREE_PLANE_SERIES, rotation_matrix, vendor_sample_with_pixels
from prima.io import Series, load_study, write_dicom_series

# Allowed voxel difference in units of the series' stored-integer step (RescaleSlope): float32
# rounding of slope and intercept only; one stored integer off would be 1.0.
VOXEL_TOL_STEPS = 0.05
AFFINE_TOL_MM = 1e-3
# dcm2niix's tilt correction interpolates along rows and rounds to the stored integer type (half a
# step), and places its samples within ~1e-5 voxel of the exact shift (float32 arithmetic): allow a
# position error of 1e-3 voxel (~1 micrometre) times the local value change per voxel.
TILT_ROUNDING_STEPS = 0.5
TILT_POSITION_TOL_VOXELS = 1e-3
SYNTH_STUDIES = (1, 2)  # generate_study(0, index, spacing=3.0, max_series=2): two series each
MARKER_RAS = np.array([-40.0, 12.0, 18.0])  # patient's left (RAS x < 0), anterior, superior


@dataclass
class Source:
    """A folder of DICOM files, what prima loaded from it and what dcm2niix wrote for it."""

    folder: Path
    series: list[Series]
    conversion: Conversion
    marker_ras: np.ndarray | None = None  # world point of a planted bright voxel, when there is one

    def one(self, name: str | None = None) -> Series:
        matches = [s for s in self.series if name is None or s.name == name]
        assert len(matches) == 1, f"expected one series {name!r}, prima loaded {[s.name for s in self.series]}"
        return matches[0]


# Per compared series: (agrees, what was measured); filled by the comparison tests.
RESULTS: dict[str, tuple[bool, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def oracle_summary(request: pytest.FixtureRequest):
    """Report how many series were compared and how many disagreed, once, after the module."""
    yield
    failed = [case for case, (agrees, _) in RESULTS.items() if not agrees]
    line = f"dcm2niix oracle: {len(RESULTS)} series checked, {len(failed)} disagreements"
    if failed:
        line += f" ({', '.join(failed)})"
    if request.config.option.verbose > 0:
        line += "".join(f"\n  {case}: {'agrees' if agrees else 'DISAGREES'}, {detail}"
                        for case, (agrees, detail) in RESULTS.items())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("\n" + line)


# ---------------------------------------------------------------------------------------------------
# Sources: each builds DICOM files in a folder; built once per module and converted by both tools.

def _marked_volume(affine: np.ndarray, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Float noise (so the writer uses a non-trivial RescaleSlope) with one bright voxel at MARKER_RAS."""
    volume = np.random.default_rng(seed).uniform(0.0, 300.0, size=shape).astype(np.float32)
    index = np.round(np.linalg.solve(affine, [*MARKER_RAS, 1.0])[:3]).astype(int)
    assert all(0 <= i < n for i, n in zip(index, shape)), "marker outside the volume"
    volume[tuple(index)] = 4000.0
    return volume


def _marked_affine(spacing: tuple[float, float, float], rotation: np.ndarray, shape: tuple[int, int, int]
                   ) -> np.ndarray:
    """RAS affine with the given voxel sizes and rotation, centred on the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


# (through axis of the RAS grid, voxel sizes, rotation in degrees about x, y, z)
MARKED_PLANES = {
    "marked_axial": (2, (0.9, 1.1, 3.0), (0.0, 0.0, 0.0)),
    "marked_coronal": (1, (1.0, 4.0, 0.8), (0.0, 0.0, 0.0)),
    "marked_sagittal": (0, (3.5, 0.9, 1.2), (0.0, 0.0, 0.0)),
    "marked_oblique": (2, (1.0, 1.2, 2.5), (17.0, -11.0, 23.0)),
}


def _write_marked(folder: Path, name: str) -> np.ndarray:
    through_axis, spacing, degrees = MARKED_PLANES[name]
    shape = (100, 96, 40) if through_axis == 2 else (100, 28, 110) if through_axis == 1 else (26, 110, 96)
    affine = _marked_affine(spacing, rotation_matrix(degrees), shape)
    write_dicom_series(_marked_volume(affine, shape, seed=len(name)), affine, folder, series_description=name,
                       through_axis=through_axis, uid_seed=name)
    return MARKER_RAS


def _write_enhanced(folder: Path, orientation: tuple[float, ...]) -> np.ndarray:
    """Enhanced MR with a marker: stored (frames, rows, columns) on a grid centred near the origin."""
    spacing = (3.0, 0.7, 0.8)
    stored = np.random.default_rng(2).integers(0, 400, size=(12, 60, 70)).astype(np.uint16)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    origin = -(row_dir * spacing[2] * 35 + col_dir * spacing[1] * 30 + normal * spacing[0] * 6)
    frame, row, column = 7, 22, 55
    stored[frame, row, column] = 9000
    marker_lps = origin + column * spacing[2] * row_dir + row * spacing[1] * col_dir + frame * spacing[0] * normal
    folder.mkdir(parents=True)
    write_enhanced_mr(stored, spacing, origin, folder / "enhanced.dcm", orientation=orientation)
    return marker_lps * [-1.0, -1.0, 1.0]  # DICOM LPS -> RAS


def _oblique_orientation() -> tuple[float, ...]:
    rotation = rotation_matrix((12.0, 8.0, -20.0))
    return (*rotation[:, 0], *rotation[:, 1])


def _write_synth(folder: Path, index: int) -> None:
    from training.synth.study import generate_study
    from training.synth.writers import write_study

    study = generate_study(0, index, spacing=3.0, max_series=2)
    write_study(study, folder, "dicom", uid_seed="oracle")


def _write_gantry_tilt(folder: Path) -> None:
    """A CT head with 15 degrees of gantry tilt: the image planes are tilted about the L-R axis while
    the table (and ImagePositionPatient) steps along S, so the slice stack is sheared."""
    shape = (64, 60, 14)
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [-28.0, -30.0, -20.0]
    volume = np.random.default_rng(5).integers(-1000, 2000, size=shape).astype(np.int16)
    files = write_dicom_series(volume, affine, folder, series_description="CT HEAD TILT", modality="CT",
                               through_axis=2, uid_seed="tilt")
    tilt = np.deg2rad(15.0)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(tilt):.8f}", f"{-np.sin(tilt):.8f}"]
        ds.GantryDetectorTilt = 15.0
        ds.save_as(path)


def _source_builders(request: pytest.FixtureRequest) -> dict[str, Callable[[Path], np.ndarray | None]]:
    def three_plane(folder: Path) -> None:
        shutil.copytree(request.getfixturevalue("three_plane_study").folder, folder)

    builders: dict[str, Callable[[Path], np.ndarray | None]] = {"three_plane": three_plane}
    for name in MARKED_PLANES:
        builders[name] = lambda folder, name=name: _write_marked(folder, name)
    builders["enhanced_axial"] = lambda folder: _write_enhanced(folder, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    builders["enhanced_oblique"] = lambda folder: _write_enhanced(folder, _oblique_orientation())
    builders["philips_mprage"] = lambda folder: vendor_sample_with_pixels(folder, "philips_mprage.dcm.gz")
    builders["siemens_mosaic_b0"] = lambda folder: vendor_sample_with_pixels(folder, "siemens_dwi_0.dcm.gz")
    builders["siemens_mosaic_b1000"] = lambda folder: vendor_sample_with_pixels(folder, "siemens_dwi_1000.dcm.gz")
    for index in SYNTH_STUDIES:
        builders[f"synth_{index}"] = lambda folder, index=index: _write_synth(folder, index)
    builders["ct_gantry_tilt"] = _write_gantry_tilt
    return builders


@pytest.fixture(scope="module")
def sources(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[[str], Source]:
    """Lazily build, load (prima) and convert (dcm2niix) a source by name; each only once."""
    builders = _source_builders(request)
    cache: dict[str, Source] = {}
    root = tmp_path_factory.mktemp("dcm2niix_oracle")

    def get(name: str) -> Source:
        if name not in cache:
            folder = root / name / "dicom"
            marker = builders[name](folder)
            study = load_study(folder)
            cache[name] = Source(folder, study.series, run_dcm2niix(folder, root / name / "nifti"), marker)
        return cache[name]

    return get


# (test id, source, series name in prima or None for the only one)
SERIES_CASES = [
    *[(f"three_plane-{plane}", "three_plane", name) for name, _, plane in THREE_PLANE_SERIES],
    *[(name, name, None) for name in MARKED_PLANES],
    ("enhanced_axial", "enhanced_axial", None),
    ("enhanced_oblique", "enhanced_oblique", None),
    ("philips_enhanced_mprage", "philips_mprage", None),
    ("siemens_mosaic_b0", "siemens_mosaic_b0", None),
    ("siemens_mosaic_b1000", "siemens_mosaic_b1000", None),
    *[(f"synth_{index}-series{position}", f"synth_{index}", position)
      for index in SYNTH_STUDIES for position in (1, 2)],
]
MARKED_SOURCES = [*MARKED_PLANES, "enhanced_axial", "enhanced_oblique"]


def _step_of(folder: Path, series_uid: str) -> float:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if str(header.get("SeriesInstanceUID", "")) == series_uid:
            return dicom_rescale_step(path)
    raise AssertionError(f"no file of series {series_uid} under {folder}")


def _pick(source: Source, which: str | int | None) -> Series:
    if isinstance(which, int):  # synthetic studies: the n-th series in SeriesNumber order
        assert len(source.series) >= which, f"study has {len(source.series)} series"
        return source.series[which - 1]
    return source.one(which)


@pytest.mark.parametrize("case,source_name,which", SERIES_CASES, ids=[c[0] for c in SERIES_CASES])
def test_prima_matches_dcm2niix(sources, case: str, source_name: str, which: str | int | None) -> None:
    """Voxels within a fraction of one stored step and affines within 1e-3 mm, in canonical order."""
    source = sources(source_name)
    series = _pick(source, which)
    uid = series.meta["series_uid"]
    # One plain output per series: no _Tilt / _Eq / _e2 variants are expected for these acquisitions.
    assert source.conversion.outputs_of(uid) == [uid], source.conversion.log
    oracle_array, oracle_affine = oracle_volume(source.conversion.image(uid))
    agreement = compare(series.array, series.affine, oracle_array, oracle_affine,
                        _step_of(source.folder, uid))
    RESULTS[case] = (agreement.agrees(VOXEL_TOL_STEPS, AFFINE_TOL_MM), repr(agreement))
    assert agreement.shape_prima == agreement.shape_oracle
    assert agreement.max_affine_diff_mm <= AFFINE_TOL_MM, agreement
    assert agreement.max_voxel_diff_steps <= VOXEL_TOL_STEPS, agreement
    assert series.array.std() > 0  # a blank volume would agree with anything of its shape


@pytest.mark.parametrize("source_name", MARKED_SOURCES)
def test_marker_on_patient_left_lands_on_the_same_world_point(sources, source_name: str) -> None:
    """Left-right: the planted voxel is where it was put (patient's left, RAS x < 0) in both tools."""
    source = sources(source_name)
    series = source.one()
    oracle_array, oracle_affine = oracle_volume(source.conversion.image(series.meta["series_uid"]))
    planted = source.marker_ras
    assert planted[0] < 0, "the marker must be on the patient's left"
    spacing = max(series.spacing)
    in_prima = world_of_brightest(series.array, series.affine)
    in_oracle = world_of_brightest(oracle_array, oracle_affine)
    np.testing.assert_allclose(in_prima, in_oracle, atol=AFFINE_TOL_MM)
    # Rounded to the nearest voxel when planted: within half a voxel diagonal of the planted point.
    assert np.linalg.norm(in_prima - planted) <= spacing * np.sqrt(3) / 2
    # In prima's L,P,S array the left side is the high end of axis 0.
    assert np.unravel_index(int(np.argmax(series.array)), series.shape)[0] > series.shape[0] / 2


def test_gantry_tilt_matches_dcm2niix_tilt_corrected_output(sources) -> None:
    """Gantry tilt: prima keeps the sheared grid the DICOM positions describe; dcm2niix's ``_Tilt_1``
    file resamples each slice along its rows onto an orthogonal grid. Every dcm2niix voxel centre must
    fall on a prima column and slice, and its value must be prima's, linearly interpolated along rows.

    dcm2niix's plain output is not comparable: it keeps the voxels but writes an orthogonal affine, which
    misplaces every slice but the first by the in-plane shift of the tilt.
    """
    source = sources("ct_gantry_tilt")
    series = source.one()
    uid = series.meta["series_uid"]
    assert source.conversion.outputs_of(uid) == [uid, uid + "_Tilt_1"], source.conversion.log
    corrected, corrected_affine = oracle_volume(source.conversion.image(uid, "_Tilt_1"))
    # Slice spacing of the corrected grid = distance between the tilted image planes = step . normal.
    shear_step = series.affine[:3, series.through_axis]
    in_plane_normal = np.cross(series.affine[:3, 0], series.affine[:3, 1])
    cosine = abs(shear_step @ in_plane_normal) / np.linalg.norm(shear_step) / np.linalg.norm(in_plane_normal)
    assert np.degrees(np.arccos(cosine)) == pytest.approx(15.0, abs=0.01), "prima's grid is not sheared by the tilt"
    normal_ras = np.cross(corrected_affine[:3, 0], corrected_affine[:3, 1])
    normal_ras /= np.linalg.norm(normal_ras)
    assert np.linalg.norm(corrected_affine[:3, 2]) == pytest.approx(abs(shear_step @ normal_ras), abs=AFFINE_TOL_MM)

    world = corrected_affine @ np.vstack([np.indices(corrected.shape).reshape(3, -1),
                                          np.ones(corrected.size)])
    expected, inside, gradient = sample_along_one_axis(series.array.astype(np.float64), series.affine, world[:3])
    assert inside.mean() > 0.5, "too few corrected voxels fall inside prima's volume"
    step = _step_of(source.folder, uid)
    difference = np.abs(corrected.reshape(-1) - expected)[inside]
    allowed = TILT_ROUNDING_STEPS * step + TILT_POSITION_TOL_VOXELS * gradient[inside]
    agrees = bool((difference <= allowed).all())
    RESULTS["ct_gantry_tilt"] = (agrees, f"worst {difference.max() / step:.3f} steps over {inside.sum()} voxels")
    assert agrees, f"{int((difference > allowed).sum())} voxels off; worst {difference.max() / step:.3f} steps"


def test_oracle_comparison_catches_a_left_right_flip(sources) -> None:
    """The comparison itself must not be blind: mirrored voxels, or an affine whose x axis is
    mirrored, must both be reported far outside the tolerances. (A mirrored affine shows up in the
    voxels: canonical reordering then flips the array the other way.)"""
    source = sources("marked_axial")
    series = source.one()
    uid = series.meta["series_uid"]
    oracle_array, oracle_affine = oracle_volume(source.conversion.image(uid))
    step = _step_of(source.folder, uid)
    mirrored = compare(series.array[::-1], series.affine, oracle_array, oracle_affine, step)
    assert mirrored.max_voxel_diff_steps > 1000 * VOXEL_TOL_STEPS
    flipped_affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ series.affine  # the same voxels called right, not left
    relabelled = compare(series.array, flipped_affine, oracle_array, oracle_affine, step)
    assert not relabelled.agrees(VOXEL_TOL_STEPS, AFFINE_TOL_MM)
    assert relabelled.max_voxel_diff_steps > 1000 * VOXEL_TOL_STEPS


def test_enhanced_without_frame_content_is_placed_by_positions(tmp_path: Path) -> None:
    """An enhanced object whose frames are shuffled and lack the (mandatory) FrameContentSequence:
    dcm2niix 1.0.20260724 then takes the slice step from the first and last frames *as stored* (2.18
    instead of 3 mm here), so it is no oracle for it; prima orders by ImagePositionPatient and must
    still put the marker where it was planted."""
    stored = np.random.default_rng(3).integers(0, 400, size=(12, 20, 24)).astype(np.uint16)
    stored[7, 5, 18] = 9000  # frame, row, column
    origin = np.array([-10.0, -8.0, -18.0])
    write_enhanced_mr(stored, (3.0, 0.7, 0.8), origin, tmp_path / "enhanced.dcm", frame_content=False)
    (series,) = load_study(tmp_path).series
    planted_lps = origin + [18 * 0.8, 5 * 0.7, 7 * 3.0]
    np.testing.assert_allclose(world_of_brightest(series.array, series.affine), planted_lps * [-1, -1, 1],
                               atol=AFFINE_TOL_MM)
    np.testing.assert_allclose(series.spacing, (0.8, 0.7, 3.0), atol=AFFINE_TOL_MM)


def test_gantry_tilt_affine_follows_each_slice_position(sources) -> None:
    """Which side is right for tilt: by the standard, pixel (c, r) of a slice is at
    ImagePositionPatient + c * column spacing * row cosines + r * row spacing * column cosines; prima's
    sheared affine must reproduce that for the first pixel of every file."""
    source = sources("ct_gantry_tilt")
    series = source.one()
    inverse = np.linalg.inv(series.affine)
    files = sorted(source.folder.iterdir())
    slices: list[float] = []
    assert len(files) == series.shape[series.through_axis]
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ras = np.array([float(v) for v in ds.ImagePositionPatient]) * [-1.0, -1.0, 1.0]
        index = (inverse @ [*ras, 1.0])[:3]
        # Row cosines 1\0\0 run towards L and column cosines towards P (and I): the first pixel is
        # prima's voxel (0, 0, k) on an integer slice k.
        np.testing.assert_allclose(index[:2], [0.0, 0.0], atol=1e-4)
        slices.append(index[2])
    np.testing.assert_allclose(sorted(slices), np.arange(len(files)), atol=1e-4)
