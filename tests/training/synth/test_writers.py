"""Writers: NIfTI and DICOM exports load back through ``prima.io`` with the right geometry, and the
lesion masks written beside the series line up with the lesion in the loaded images."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from prima.io import load_study
from prima.io.nifti import nifti_stem
from prima.io.orientation import reorient
from prima.labels import default_label_space
from training.synth.anatomy import make_subject
from training.synth.phantom import Finding, Tissue
from training.synth.protocols import make_series_spec
from training.synth.sequences import simulate_series
from training.synth.study import SimulatedSeries, SyntheticStudy, generate_study, plan_study
from prima.manifest import manifest_line, read_manifest
from training.synth.writers import (fortran_order, label_count_summary, label_counts, plan_entry, to_int16,
                                    write_dataset, write_study)

SPACING = 3.0


def lesion_study() -> SyntheticStudy:
    """A study with one T2/FLAIR-bright, T1-dark 24 mm lesion in the right hemisphere, in three planes.

    The lesion is made here (test data) so this test does not depend on the pathology catalogue.
    """
    phantom = make_subject(np.random.default_rng(21), spacing=SPACING, age=45.0)
    centre = np.asarray(phantom.landmarks["anterior_commissure"]) + np.array([30.0, 5.0, 20.0])
    ijk = np.indices(phantom.shape).reshape(3, -1).T
    world = ijk @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    lesion = (np.linalg.norm(world - centre, axis=1) <= 12.0).reshape(phantom.shape)
    lesion &= np.isin(phantom.labels, (Tissue.WM, Tissue.CORTICAL_GM, Tissue.DEEP_GM))
    phantom.t2[lesion] *= 2.5  # vasogenic oedema: long T2, long T1
    phantom.t1[lesion] *= 1.5
    phantom.lesion_masks["tumor_adult_low_grade_glioma"] = lesion
    phantom.findings.append(Finding("tumor_adult_low_grade_glioma", "right frontal lobe", 24.0))
    rng = np.random.default_rng(0)
    series = []
    for kind in ("ax_flair", "cor_t2", "sag_t1"):
        spec = make_series_spec(rng, kind, "ge")
        volume, affine, masks = simulate_series(phantom, spec, rng)
        series.append(SimulatedSeries(spec.name, kind, spec, volume, affine, masks))
    space = default_label_space()
    keys = ["tumor_adult_low_grade_glioma"]
    return SyntheticStudy(
        study_id="S0000001", patient_id="P0000001", split="train",
        study_description="MRI BRAIN WITHOUT CONTRAST", protocol="brain_wo", vendor="ge", series=series,
        findings=list(phantom.findings), report="1. Right frontal T2 hyperintense mass, 24 mm.",
        labels={k: int(k in keys) for k in space.diagnosis_keys}, priority=space.priority_of(keys),
        referrals=space.referrals_of(keys), subject=phantom.subject,
    )


@pytest.fixture(scope="module")
def study() -> SyntheticStudy:
    return lesion_study()


def contrast_inside_vs_around(array: np.ndarray, mask: np.ndarray) -> float:
    """Mean inside the mask over the mean of a 2-voxel shell around it (within the head)."""
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask & (array > 0.2 * array.max())
    return float(array[mask].mean() / array[shell].mean())


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_round_trip_planes_values_and_mask_alignment(study, tmp_path, fmt):
    entry = write_study(study, tmp_path, fmt, uid_seed="test")
    loaded = load_study(tmp_path / "studies" / study.study_id)
    assert loaded.skipped == []
    by_name = {s.name: s for s in loaded.series}
    # DICOM names come from SeriesDescription, NIfTI names from the file stem.
    expected = [s.name if fmt == "dicom" else nifti_stem(e.path) for s, e in zip(study.series, entry.series)]
    assert sorted(by_name) == sorted(expected)
    for series, name in zip(study.series, expected):
        got = by_name[name]
        assert got.plane == series.spec.plane
        # Stored values are the rounded int16 volume, permuted to L,P,S without interpolation.
        want, want_affine = reorient(to_int16(series.volume).astype(np.float32), series.affine)
        np.testing.assert_allclose(got.array, want, atol=0.5)
        np.testing.assert_allclose(got.affine, want_affine, atol=1e-3)
        # The mask written beside the series lands on the lesion of the loaded image.
        mask_info = entry.lesion_masks[series.name]
        assert mask_info.keys == ("tumor_adult_low_grade_glioma",)
        mask_image = nib.load(mask_info.path)
        assert mask_image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask_image.affine, series.affine, atol=1e-4)
        mask, _ = reorient(np.asarray(mask_image.dataobj)[..., 0], mask_image.affine)
        assert mask.shape == got.array.shape and mask.any()
        ratio = contrast_inside_vs_around(got.array, mask.astype(bool))
        if series.spec.sequence in ("flair", "t2"):
            assert ratio > 1.25, (series.name, ratio)  # oedema is bright on T2 and FLAIR
        else:
            # and darker on T1, less so (T1 contrast of oedema is weaker; the 3 mm test phantom blurs it)
            assert ratio < 0.93, (series.name, ratio)


def test_manifest_record_follows_the_spec(study, tmp_path):
    entry = write_study(study, tmp_path, "nifti")
    line = manifest_line(entry, tmp_path)
    assert line.endswith("\n") and "\n" not in line[:-1]
    parsed = json.loads(line)
    for key in ("study_id", "patient_id", "split", "study_description", "series", "report", "labels",
                "priority", "referrals", "lesion_masks", "subject", "findings", "protocol", "vendor",
                "protocol_blind"):
        assert key in parsed
    assert all(set(s) == {"name", "path", "sequence", "plane"} for s in parsed["series"])
    (tmp_path / "manifest.jsonl").write_text(line)
    assert read_manifest(tmp_path / "manifest.jsonl") == [entry]  # the library reads back what the engine wrote
    assert len(parsed["labels"]) == 52 and sum(parsed["labels"].values()) == 1
    assert parsed["priority"] == "medium" and parsed["referrals"] == ["ns_oncology"]
    for entry in parsed["series"]:
        image = nib.load(tmp_path / entry["path"])
        assert image.get_data_dtype() == np.int16


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_planned_entry_is_the_written_entry_without_masks(tmp_path, fmt):
    # The metadata-only path agrees with the full one by construction: same plan, same manifest line.
    args = dict(spacing=SPACING, keys=["tumor_adult_meningioma"], protocol_blind=True)
    written = write_study(generate_study(5, 2, **args), tmp_path, fmt, uid_seed="test")
    planned = plan_entry(plan_study(5, 2, **args), tmp_path, fmt)
    assert written.lesion_masks and planned.lesion_masks is None
    assert dataclasses.replace(written, lesion_masks=None) == planned
    assert all(s.path.exists() for s in written.series)
    assert written.extra["protocol_blind"] is True


def test_default_study_writes_and_loads_as_dicom(tmp_path):
    # The default path end to end once: 1.5 mm phantom, sampled diagnoses, DICOM export, prima.io load.
    study = generate_study(0, 1)
    entry = write_study(study, tmp_path, "dicom", uid_seed="seed0")
    loaded = load_study(tmp_path / "studies" / study.study_id)
    assert loaded.description == study.study_description
    assert [s.name for s in loaded.series] == [s.name for s in study.series]
    assert [s.plane for s in loaded.series] == [s.spec.plane for s in study.series]
    assert set(entry.lesion_masks) <= {s.name for s in study.series}
    if not any(study.labels.values()):
        assert entry.lesion_masks == {} and not (tmp_path / "masks").exists()


@pytest.mark.parametrize("key", ["tumor_adult_meningioma", "vascular_ischemic_large_vessel_stroke",
                                 "tumor_adult_high_grade_glioma"])
def test_pathology_lesion_stands_out_on_its_key_sequence_after_dicom_round_trip(tmp_path, key):
    from training.synth.pathology import KEY_SEQUENCES

    key_sequence = KEY_SEQUENCES[key][0]
    # The first of a few studies whose protocol includes the key sequence (deterministic search).
    study = next(s for s in (generate_study(2, i, spacing=SPACING, keys=[key]) for i in range(8))
                 if any(x.spec.sequence == key_sequence and x.masks.get(key) is not None and x.masks[key].any()
                        for x in s.series))
    entry = write_study(study, tmp_path, "dicom", uid_seed="test")
    loaded = {s.name: s for s in load_study(tmp_path / "studies" / study.study_id).series}
    checked = 0
    for series in study.series:
        if series.spec.sequence != key_sequence or series.name not in entry.lesion_masks:
            continue
        info = entry.lesion_masks[series.name]
        image = nib.load(info.path)
        mask, _ = reorient(np.asarray(image.dataobj)[..., info.keys.index(key)], image.affine)
        got = loaded[series.name]
        assert mask.shape == got.array.shape
        ratio = contrast_inside_vs_around(got.array, mask.astype(bool))
        assert abs(np.log(ratio)) > np.log(1.15), (key, series.name, ratio)
        checked += 1
    assert checked >= 1


def test_label_counts_per_split_and_summary(tmp_path):
    manifest = write_dataset(16, tmp_path, seed=2, workers=1, spacing=6.0, metadata_only=True, progress=False,
                             balance=0.5)
    assert json.loads((tmp_path / "synth_config.json").read_text())["balance"] == 0.5
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    counts = label_counts(manifest)
    splits = [s for s in ("train", "val", "test") if any(r["split"] == s for r in records)]
    assert list(counts) == splits
    keys = default_label_space().diagnosis_keys
    for split, per_label in counts.items():
        assert list(per_label) == list(keys)  # every label, zeros included
        assert per_label == {k: sum(r["labels"][k] for r in records if r["split"] == split) for k in keys}
    assert sum(sum(c.values()) for c in counts.values()) == sum(sum(r["labels"].values()) for r in records) > 0
    lines = label_count_summary(counts, fewest=2)
    train = counts["train"]
    rarest = sorted(train, key=train.get)[:2]
    assert lines[0] == (f"train: positives per label min {min(train.values())}, "
                        f"median {np.median(list(train.values())):g}; fewest: {rarest[0]} {train[rarest[0]]}, "
                        f"{rarest[1]} {train[rarest[1]]}")
    assert len(lines) == len(counts) and label_count_summary(counts, fewest=0)[0].endswith(
        f"median {np.median(list(train.values())):g}")
    with pytest.raises(ValueError):
        label_count_summary(counts, fewest=-1)


@pytest.mark.parametrize("bad", [dict(balance=-0.5), dict(balance=1.01), dict(workers=0), dict(n=0)])
def test_write_dataset_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        write_dataset(**{"n": 1, **bad}, out=tmp_path, spacing=6.0, metadata_only=True, progress=False)
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.parametrize("shape", [(70, 9, 5), (33, 4, 3, 2), (1, 2, 3)])
def test_fortran_order_copies_without_changing_values(shape):
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    copied = fortran_order(array, block=8)
    assert copied.flags.f_contiguous and copied.shape == shape
    np.testing.assert_array_equal(copied, array)
