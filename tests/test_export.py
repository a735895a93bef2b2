"""prima.export: the heatmap, the top tokens and the prediction as DICOM objects over the source series.

Geometry is checked on tiny written series (axial, coronal, sagittal, oblique, 15-degree gantry tilt) with a
planted heatmap, so no model runs there: every parametric-map and segmentation frame must sit exactly where
its source slice sits, and a marker on the patient's left must land on the same patient-space point in the
source and in both objects. Independent readers: dcm2niix turns the parametric map into a NIfTI whose affine
must equal the source series' (and highdicom's own volume reader must agree); highdicom parses the
segmentation and the SR back; dcmtk's ``dsrdump`` renders the SR as text where it is installed. The end to
end tests run a real (random-weights) release on a tiny study carrying fake patient identifiers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from helpers.dcm2niix import oracle_volume, run_dcm2niix, to_canonical
from helpers.dicom_objects import frame_geometry
from helpers.enhanced import write_enhanced_mr
from helpers.privacy import IDENTIFIERS, PATIENT_ID, SECRETS, STUDY_DATE
from helpers.studies import rotation_matrix
from prima import export
from prima.config import PreprocessConfig
from prima.errors import ExportError
from prima.io import load_study, write_dicom_series
from prima.preprocess import preprocess_series

MARKER_RAS = np.array([-22.0, 8.0, 6.0])  # on the patient's LEFT (RAS x < 0), anterior, superior
AFFINE_TOL_MM = 1e-3
MODEL = {"name": "prima-test", "revision": "r1"}


# (through axis of the RAS grid, voxel sizes mm, rotation in degrees about x, y, z, shape)
PLANES = {
    "axial": (2, (2.0, 2.2, 4.0), (0.0, 0.0, 0.0), (36, 34, 11)),
    "coronal": (1, (2.1, 5.0, 2.0), (0.0, 0.0, 0.0), (36, 9, 34)),
    "sagittal": (0, (4.5, 2.0, 2.2), (0.0, 0.0, 0.0), (10, 38, 32)),
    "oblique": (2, (2.0, 2.4, 3.5), (17.0, -11.0, 23.0), (36, 34, 12)),
}


def _write_marked(folder: Path, plane: str) -> None:
    """A noisy volume with one bright voxel near MARKER_RAS, written as a DICOM series in ``plane``."""
    through_axis, spacing, degrees, shape = PLANES[plane]
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(degrees) @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    volume = np.random.default_rng(len(plane)).uniform(0.0, 300.0, size=shape).astype(np.float32)
    volume[tuple(np.round(np.linalg.solve(affine, [*MARKER_RAS, 1.0])[:3]).astype(int))] = 4000.0
    write_dicom_series(volume, affine, folder, series_description=f"MARKED {plane}", through_axis=through_axis,
                       uid_seed=plane)


def _write_tilted(folder: Path) -> None:
    """15 degrees of gantry tilt: image planes tilted about L-R while the positions step along S."""
    _write_marked(folder, "axial")
    tilt = np.deg2rad(15.0)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(tilt):.8f}", f"{-np.sin(tilt):.8f}"]
        ds.save_as(path)


def _pixel_world_ras(ds: Dataset, rows: np.ndarray, columns: np.ndarray, position=None, orientation=None,
                     spacing=None) -> np.ndarray:
    """RAS mm of pixels by the DICOM standard's equation (pydicom values only, no prima code)."""
    position = np.array([float(v) for v in (position if position is not None else ds.ImagePositionPatient)])
    orientation = np.array([float(v) for v in (orientation if orientation is not None else ds.ImageOrientationPatient)])
    spacing = [float(v) for v in (spacing if spacing is not None else ds.PixelSpacing)]
    lps = (position + np.outer(columns, orientation[:3] * spacing[1]) + np.outer(rows, orientation[3:] * spacing[0]))
    return lps * [-1.0, -1.0, 1.0]


Dataset = pydicom.Dataset


class Planted:
    """One written source series, its planted heatmap exported as a parametric map and a segmentation."""

    def __init__(self, root: Path, plane: str):
        self.folder = root / "series"
        (_write_tilted if plane == "tilt" else lambda f: _write_marked(f, plane))(self.folder)
        self.series = load_study(self.folder).series[0]
        ready = preprocess_series(self.series, PreprocessConfig())
        # The heatmap: 0 everywhere but the preprocessed voxel holding the source's marker; the label map:
        # rank 1 there too. The marker's world point comes from the source files by the standard's equation.
        self.source = export.read_source_series(self.folder, self.series, pixels=True)
        brightest = [(float(ds.pixel_array.max()), k) for k, ds in enumerate(self.source.datasets)]
        self.marker_slice = max(brightest)[1]
        ds = self.source.datasets[self.marker_slice]
        self.marker_row, self.marker_column = np.unravel_index(int(np.argmax(ds.pixel_array)), ds.pixel_array.shape)
        self.marker_ras = _pixel_world_ras(ds, np.array([self.marker_row]), np.array([self.marker_column]))[0]
        self.heat_affine = ready.affine
        self.marker_voxel = np.round(np.linalg.solve(ready.affine, [*self.marker_ras, 1.0])[:3]).astype(int)
        heat = np.zeros(ready.shape, dtype=np.float32)
        heat[tuple(self.marker_voxel)] = 0.75
        weights = export.resample_to_source(heat, ready.affine, self.source)
        labels = export.resample_to_source((heat > 0).astype(np.uint8), ready.affine, self.source)
        self.pm_path, self.seg_path = root / "pm" / "pm.dcm", root / "seg.dcm"
        self.pm_path.parent.mkdir()
        export.parametric_map(self.source.datasets, weights, target="demo", series_name=self.series.name,
                              model=MODEL).save_as(self.pm_path)
        export.segmentation(self.source.datasets, labels, [0.75], target="demo", model=MODEL).save_as(self.seg_path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    cache: dict[str, Planted] = {}

    def get(plane: str) -> Planted:
        if plane not in cache:
            cache[plane] = Planted(tmp_path_factory.mktemp(plane), plane)
        return cache[plane]

    return get


ALL_PLANES = [*PLANES, "tilt"]


@pytest.mark.parametrize("plane", ALL_PLANES)
def test_frames_sit_on_their_source_slices(planted, plane):
    case = planted(plane)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in case.source.datasets}
    pm = pydicom.dcmread(case.pm_path)
    assert int(pm.NumberOfFrames) == len(case.source.datasets)  # one frame per source slice, none dropped
    for path in (case.pm_path, case.seg_path):
        obj = pydicom.dcmread(path)
        assert obj.StudyInstanceUID == case.source.study_uid
        assert obj.FrameOfReferenceUID == case.source.frame_of_reference_uid
        assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == case.source.series_uid
        referenced = {str(i.ReferencedSOPInstanceUID) for i in obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced <= set(by_uid)
        for uid, position, orientation, spacing in frame_geometry(obj):
            source = by_uid[uid]  # every frame references a slice of the source
            assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
            assert np.allclose(orientation, [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
            assert np.allclose(spacing, [float(v) for v in source.PixelSpacing], atol=1e-6)
    if plane == "tilt":  # the tilt survived: positions step along S, not along the planes' normal
        orientation = np.array([float(v) for v in case.source.datasets[0].ImageOrientationPatient])
        assert abs(np.degrees(np.arccos(orientation[4])) - 15.0) < 1e-3


@pytest.mark.parametrize("plane", ALL_PLANES)
def test_a_marker_on_the_left_lands_on_the_same_point(planted, plane):
    case = planted(plane)
    assert case.marker_ras[0] < 0, "the marker must be on the patient's left"
    # Parametric map (highdicom parses it; pydicom decodes its float frames) through its real-world mapping
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(case.pm_path))
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pm.pixel_array * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    seg = hd.seg.segread(case.seg_path)
    by_uid = {uid: k for k, uid in enumerate(case.source.sop_instance_uids)}
    for obj, hits in ((pm, values == np.float32(0.75)), (seg, None)):
        frames = frame_geometry(obj)
        if hits is None:  # segmentation: the pixels of segment 1 in each stored frame
            hits = np.stack([seg.get_frame(i + 1) > 0 for i in range(int(seg.NumberOfFrames))])
        points = []
        for (uid, position, orientation, spacing), frame_hits in zip(frames, hits):
            rows, columns = np.nonzero(frame_hits)
            points += list(_pixel_world_ras(None, rows, columns, position, orientation, spacing))
            if by_uid[uid] == case.marker_slice:
                assert frame_hits[case.marker_row, case.marker_column], "the marker pixel is not marked"
        points = np.array(points)
        # every marked pixel lies inside the one preprocessed voxel that holds the marker, and one of them is
        # the source's marker pixel itself
        voxels = np.linalg.solve(case.heat_affine, np.vstack([points.T, np.ones(len(points))]))[:3].T
        assert np.abs(voxels - case.marker_voxel).max() <= 0.5 + 1e-6
        assert np.linalg.norm(points - case.marker_ras, axis=1).min() < 1e-3
        assert (points[:, 0] < 0).all(), "marked on the patient's right"


@pytest.mark.parametrize("plane", list(PLANES))
def test_an_independent_reader_puts_the_map_on_the_source_grid(planted, plane, tmp_path):
    """dcm2niix converts the parametric map (and the source): same affine as prima's loaded series within
    1e-3 mm in nibabel's canonical order, and the marker value at the marker's world point. highdicom's
    volume reader agrees on the affine."""
    case = planted(plane)
    converted = run_dcm2niix(case.pm_path.parent, tmp_path / "pm")
    (image,) = [converted.image(stem) for stem in converted.files]
    array, affine = oracle_volume(image)
    pm_array, canonical_pm = to_canonical(array, affine)
    series_array, canonical_series = to_canonical(case.series.array, case.series.affine)
    assert pm_array.shape == series_array.shape
    assert np.abs(canonical_pm - canonical_series).max() < AFFINE_TOL_MM
    index = np.round(np.linalg.solve(affine, [*case.marker_ras, 1.0])[:3]).astype(int)
    assert array[tuple(index)] == pytest.approx(0.75)
    source_volume = hd.get_volume_from_series(case.source.datasets)
    pm_volume = hd.imread(case.pm_path).get_volume()
    assert np.abs(pm_volume.affine - source_volume.affine).max() < AFFINE_TOL_MM


def test_nifti_heatmap_on_the_input_grid(tmp_path):
    """A NIfTI input stored L,A,S (not prima's L,P,S): the heatmap comes back with the input's own shape and
    affine, the marker on the same world point."""
    shape, affine = (30, 34, 12), np.diag([-2.0, 2.2, 4.0, 1.0])  # x runs towards the left: L,A,S storage
    affine[:3, 3] = [28.0, -36.0, -22.0]
    path = tmp_path / "AX_T2.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), affine), path)
    series = load_study(path).series[0]
    assert series.source_orientation == "LAS"
    ready = preprocess_series(series, PreprocessConfig())
    marker = affine @ [20, 9, 5, 1]
    assert marker[0] < 0
    heat = np.zeros(ready.shape, dtype=np.float32)
    heat[tuple(np.round(np.linalg.solve(ready.affine, marker)[:3]).astype(int))] = 1.0
    array, out_affine = export.heatmap_on_input_grid(heat, ready.affine, series)
    assert array.shape == shape and np.allclose(out_affine, affine, atol=1e-6)
    assert array[20, 9, 5] == 1.0
    hits = np.argwhere(array > 0)
    assert all(np.linalg.norm((affine @ [*h, 1])[:3] - marker[:3]) < 6.0 for h in hits)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def explained(tmp_path_factory, random_release):
    """A tiny one-series study carrying fake patient identifiers, predicted and explained (random weights)."""
    from prima.explain import explain
    from prima.predict import predict

    root = tmp_path_factory.mktemp("identified")
    folder = root / "study"
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    affine[:3, 3] = [-40.0, -48.0, -25.0]
    volume = np.random.default_rng(3).uniform(0, 500, size=(40, 48, 10)).astype(np.float32)
    volume[8:30, 10:40, 2:8] += 800.0  # a "head" in the middle for the background filter to keep
    write_dicom_series(volume, affine, folder / "ax", series_description="AX T2", study_description="MRI BRAIN",
                       patient_id=PATIENT_ID, study_date=STUDY_DATE, uid_seed="export", extra_tags=IDENTIFIERS)
    study = load_study(folder)
    prediction = predict(study, random_release, device="cpu", precision="fp32")
    lime = explain(prediction.tokens, random_release, "priority", 0, num_samples=16, device="cpu",
                   precision="fp32")
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((folder / "ax").iterdir())]
    uids = {str(ds.SOPInstanceUID) for ds in originals} | {str(originals[0].StudyInstanceUID),
                                                           str(originals[0].SeriesInstanceUID),
                                                           str(originals[0].FrameOfReferenceUID)}
    return folder, study, prediction, lime, uids


def _export(explained, out: Path, **kwargs) -> export.DicomExport:
    folder, study, prediction, lime, _ = explained
    return export.export_dicom(out, folder, study.series[0], lime, prediction.tokens.series[0], prediction, **kwargs)


def test_objects_read_back_and_reference_the_source(explained, tmp_path):
    folder, study, prediction, lime, uids = explained
    written = _export(explained, tmp_path / "dicom")
    assert sorted(p.name for p in written.folder.iterdir()) == sorted(
        ["parametric_map.dcm", "segmentation.dcm", "report.dcm", "prima-dicom.json"])
    source = export.read_source_series(folder, study.series[0])
    for path in (written.parametric_map, written.segmentation, written.report):
        ds = pydicom.dcmread(path)
        # the patient and study are the source's (what a PACS needs to file the objects with the study)
        assert ds.PatientName == IDENTIFIERS["PatientName"] and ds.PatientID == PATIENT_ID
        assert ds.AccessionNumber == IDENTIFIERS["AccessionNumber"] and ds.StudyInstanceUID == source.study_uid
    seg = hd.seg.segread(written.segmentation)
    assert 1 <= seg.number_of_segments <= len(lime.top_k)
    assert seg.get_segment_description(1).segment_label.startswith("LIME token rank 1")
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(written.parametric_map))
    assert int(pm.NumberOfFrames) == len(source.datasets)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "LIME" and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    for path in (written.parametric_map, written.segmentation):
        referenced = [uid for uid, *_ in frame_geometry(pydicom.dcmread(path))]
        assert set(referenced) <= set(source.sop_instance_uids)
    # the report: highdicom parses it, it names the model and the priority, references the study, the map
    # and the segmentation, and carries the research-use statement
    sr = hd.sr.srread(written.report)
    text = export.report_text(sr)
    assert f"Algorithm Name: {prediction.model['name']}" in text and export.RESEARCH_USE in text
    assert f"Worklist priority: {prediction.priority.worklist_tier.capitalize()} priority" in text
    for d in prediction.differential[: export.DEFAULT_DIFFERENTIAL]:
        assert f"Finding: {d.name}\n" in text + "\n"
    assert sr.StudyInstanceUID == source.study_uid
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert {pydicom.dcmread(written.parametric_map).SOPInstanceUID,
            pydicom.dcmread(written.segmentation).SOPInstanceUID} <= evidence
    manifest = json.loads(written.manifest.read_text())
    assert manifest["source"]["sop_instance_uids"] == source.sop_instance_uids and not manifest["deidentified"]
    assert [o["file"] for o in manifest["objects"]] == ["parametric_map.dcm", "segmentation.dcm", "report.dcm"]


def test_an_sr_text_viewer_renders_the_report(explained, tmp_path):
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        if os.environ.get("CI"):
            pytest.fail("dcmtk is missing on CI: `make test` should have installed it")
        pytest.skip("dcmtk's dsrdump is not installed (`make dcmtk` installs it)")
    written = _export(explained, tmp_path / "dicom")
    result = subprocess.run([dsrdump, str(written.report)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert "Comprehensive SR Document" in result.stdout and '"Worklist priority"' in result.stdout
    assert '"Research use only.' in result.stdout


def test_deidentified_output_carries_no_identifier(explained, tmp_path):
    folder, study, prediction, lime, original_uids = explained
    written = _export(explained, tmp_path / "dicom", deidentify=True)
    files = sorted(p for p in written.folder.rglob("*") if p.is_file())
    assert set(files) == set(written.files) and len(written.source) == study.series[0].shape[2]
    for path in files:
        data = path.read_bytes()
        for secret in (*SECRETS, *original_uids):
            assert secret.encode() not in data, f"{secret} in {path.name}"
            assert secret not in str(path.relative_to(tmp_path))
    # one pseudonym and one set of UIDs throughout: the objects, the source copy and the manifest agree
    datasets = [pydicom.dcmread(p) for p in files if p.suffix == ".dcm"]
    assert len({str(ds.PatientID) for ds in datasets}) == 1 and len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert all(ds.PatientIdentityRemoved == "YES" for ds in datasets)
    copies = [pydicom.dcmread(p) for p in written.source]
    manifest = json.loads(written.manifest.read_text())
    assert manifest["deidentified"] and manifest["study_instance_uid"] == datasets[0].StudyInstanceUID
    assert manifest["source"]["sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in copies]
    copy_uids = set(manifest["source"]["sop_instance_uids"])
    for path in (written.parametric_map, written.segmentation):
        assert {uid for uid, *_ in frame_geometry(pydicom.dcmread(path))} <= copy_uids  # the references resolve
    # the copy is the same series: prima loads it on the same grid with the same voxels
    reloaded = load_study(written.folder / export.SOURCE_FOLDER).series[0]
    assert np.allclose(reloaded.affine, study.series[0].affine, atol=1e-6)
    assert np.array_equal(reloaded.array, study.series[0].array)


def test_bad_input_is_refused_and_leaves_nothing(explained, tmp_path):
    folder, study, prediction, lime, _ = explained
    # a slice removed since the study was loaded
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    files = sorted((changed / "ax").iterdir())
    files[4].unlink()
    out = tmp_path / "out" / "dicom"
    out.parent.mkdir()
    with pytest.raises(ExportError, match="no longer match the loaded series"):
        _export((changed, *explained[1:]), out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []
    # a series with a missing slice does not load at all (uneven gaps), so it is never explained
    (skipped,) = load_study([changed, folder]).skipped
    assert "uneven slice gaps" in skipped.reason
    # burned-in annotation cannot be de-identified by attributes
    burned = tmp_path / "burned"
    shutil.copytree(folder, burned)
    for path in (burned / "ax").iterdir():
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(path)
    with pytest.raises(ExportError, match="burned-in"):
        _export((burned, *explained[1:]), out, deidentify=True)
    assert list((tmp_path / "out").iterdir()) == []
    # an output folder that is not empty is left as it is
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        _export(explained, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # the tokens of another series
    with pytest.raises(ValueError, match="tokens are of series"):
        export.export_dicom(tmp_path / "x", folder, study.series[0], lime,
                            dataclasses.replace(prediction.tokens.series[0], name="OTHER"), prediction)


def test_unsupported_sources_say_why(tmp_path):
    nifti = tmp_path / "AX_T1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((20, 22, 8)).astype(np.float32), np.eye(4)), nifti)
    with pytest.raises(ExportError, match="loaded from NIfTI"):
        export.read_source_series(nifti, load_study(nifti).series[0])
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    stored = np.random.default_rng(2).integers(0, 400, size=(8, 30, 32)).astype(np.uint16)
    write_enhanced_mr(stored, (3.0, 1.0, 1.0), np.zeros(3), enhanced / "enhanced.dcm")
    with pytest.raises(ExportError, match="enhanced multi-frame"):
        export.read_source_series(enhanced, load_study(enhanced).series[0])
