"""`prima inspect` through the real entry point (``prima.cli.main``) and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.studies import NIBABEL_DATA, PYDICOM_FILES, rewrite_at_positions
from prima.cli import main


def test_inspect_zip_lists_three_series_with_planes(three_plane_study, capsys):
    assert main(["inspect", str(three_plane_study.zip_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if line[:3] in ("AX ", "SAG", "COR")}
    assert "axial" in lines["AX T1"] and "sagittal" in lines["SAG T1"] and "coronal" in lines["COR T2"]
    assert "3-PLANE LOC: slices have different orientations" in out


def test_inspect_json_parses_and_lists_skipped_broken_series(tmp_path, capsys, three_plane_study):
    import pydicom

    study = tmp_path / "study"
    shutil.copytree(three_plane_study.folder, study)
    broken = rewrite_at_positions(PYDICOM_FILES / "MR_small.dcm", study / "broken", [0.0, 2.0, 4.0],
                                  SeriesDescription="BROKEN T2")
    ds = pydicom.dcmread(broken[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(broken[0])
    assert main(["inspect", str(study), "--json", "--preprocessed"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(s["plane"] for s in report["series"]) == ["axial", "coronal", "sagittal"]
    assert all(s["preprocessed_shape"].count(256) == 2 for s in report["series"])
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert "different orientations" in skipped["BROKEN T2"]
    assert report["study"]["description"] == "MRI BRAIN WO CONTRAST"
    assert main(["inspect", str(study), "--json", "--preprocessed", "--grid", "head"]) == 0
    on_head = json.loads(capsys.readouterr().out)["series"]
    assert all(sorted(s["preprocessed_shape"]) == [48, 256, 256] for s in on_head)
    assert all(sorted(s["preprocessed_spacing_mm"]) == [0.9375, 0.9375, 4.0] for s in on_head)


def test_inspect_without_usable_series_fails_with_one_line(capsys):
    assert main(["inspect", str(NIBABEL_DATA / "example4d.nii.gz")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4D image" in err


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "prima"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([str(script), "inspect", str(NIBABEL_DATA / "anatomical.nii"), "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["series"][0]["name"] == "anatomical"


EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "normal_dwi.zip"


def test_predict_prints_the_table_and_writes_the_json(random_release_path, tmp_path, capsys):
    out = tmp_path / "pred.json"
    argv = ["predict", str(EXAMPLE), "--weights", str(random_release_path), "--out", str(out), "--device", "cpu",
            "--precision", "fp32"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    lines = captured.out.splitlines()
    assert lines[0] == f"Study: {doc['study']['description']}" and lines[1] == "Model: prima-lite"
    for series in doc["series"]:
        assert any(line.split() == [series["name"], series["plane"], str(series["tokens_kept"]), "of",
                                    f"{series['tokens_total']:,}"] for line in lines)
    positives = [d for d in doc["diagnoses"] if d["positive"]]
    listed = lines[lines.index(next(l for l in lines if l.startswith("Differential:"))) + 2:][: max(10, len(positives))]
    assert [line.split()[-3] for line in listed] == doc["differential"][: len(listed)]
    assert sum(line.startswith("*") for line in listed) == len(positives)
    assert f"Priority: {doc['priority']['worklist_tier']} (priority head: " in captured.out
    assert any(line.startswith("Referrals: ") for line in lines)
    assert any(line.startswith("Timings: load") for line in lines)
    assert "embedding" not in doc and "100%" in captured.err  # the progress bar ran to the end on stderr


def test_predict_prints_the_abnormal_probability_of_token_pooling_heads(pooling_release, tmp_path, capsys):
    out = tmp_path / "pred.json"
    assert main(["predict", str(EXAMPLE), "--weights", str(pooling_release.path), "--out", str(out), "--device",
                 "cpu", "--precision", "fp32"]) == 0
    abnormal = json.loads(out.read_text())["abnormal"]
    assert 0 < abnormal < 1
    assert f"Abnormal: {abnormal:.3f} (probability of any abnormality)" in capsys.readouterr().out.splitlines()


def test_predict_takes_the_weights_from_the_environment(random_release_path, monkeypatch, capsys):
    monkeypatch.setenv("PRIMA_WEIGHTS", str(random_release_path))
    assert main(["predict", str(EXAMPLE), "--top", "0", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Differential:"))
    shown = lines[header + 2 : lines.index("", header)]
    assert shown == [line for line in shown if line.startswith("*")]  # --top 0: only the positives


def test_predict_without_weights_says_how_to_give_them(monkeypatch, tmp_path, capsys):
    import prima.cli

    monkeypatch.setattr(prima.cli, "DEFAULT_WEIGHTS", tmp_path / "no-release")
    monkeypatch.delenv("PRIMA_WEIGHTS", raising=False)
    assert main(["predict", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prima predict: error: no model weights")
    assert "--weights" in err and "hf://owner/repo" in err and "PRIMA_WEIGHTS" in err


def test_predict_embedding_needs_out(capsys):
    assert main(["predict", str(EXAMPLE), "--embedding"]) == 2
    assert "--embedding needs --out" in capsys.readouterr().err


def test_predict_explain_adds_the_explanation_and_its_heatmap(random_release_path, tmp_path, capsys):
    import nibabel as nib

    out, heat = tmp_path / "pred.json", tmp_path / "heat.nii.gz"
    argv = ["predict", str(EXAMPLE), "--weights", str(random_release_path), "--out", str(out), "--device", "cpu",
            "--explain", "vascular_ischemic_large_vessel_stroke", "--series", "1", "--samples", "64",
            "--heatmap", str(heat)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    (explanation,) = json.loads(out.read_text())["explanations"]
    assert explanation["target"] == "vascular_ischemic_large_vessel_stroke" and explanation["num_samples"] == 64
    assert explanation["series_index"] == 1 and f"on series {explanation['series']!r}" in printed
    image = nib.load(heat)
    doc = json.loads(out.read_text())
    assert list(image.shape) == doc["series"][1]["shape"]  # the preprocessed grid of the explained series
    assert float(abs(image.get_fdata()).max()) > 0


def test_explain_command_writes_the_explanation_json(random_release_path, tmp_path, capsys):
    out = tmp_path / "explanation.json"
    assert main(["explain", str(EXAMPLE), "--target", "priority", "--samples", "32", "--weights",
                 str(random_release_path), "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["target_kind"] == "priority" and doc["series_index"] == 0 and len(doc["weights"]) == len(doc["coords"])
    assert main(["explain", str(EXAMPLE), "--target", "no_such_key", "--weights", str(random_release_path)]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_series_without_explain_is_refused(capsys):
    assert main(["predict", str(EXAMPLE), "--series", "AX DWI"]) == 2
    assert "go with --explain" in capsys.readouterr().err


def test_predict_dicom_out_writes_the_objects_over_the_explained_series(random_release_path, tmp_path, capsys):
    import pydicom

    from prima.io import load_study

    out = tmp_path / "dicom"
    argv = ["predict", str(EXAMPLE), "--weights", str(random_release_path), "--device", "cpu", "--precision", "fp32",
            "--explain", "priority", "--series", "1", "--samples", "16", "--dicom-out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"DICOM (parametric map, segmentation, SR): {out}" in printed
    assert "Timings: load " in printed  # the study is loaded by the command, its time still reported
    series = load_study(EXAMPLE).series[1]
    manifest = json.loads((out / "prima-dicom.json").read_text())
    assert manifest["series"] == series.name and manifest["source"]["series_instance_uid"] == series.meta["series_uid"]
    slices = series.shape[series.through_axis]
    assert len(manifest["source"]["sop_instance_uids"]) == slices and not manifest["deidentified"]
    pm = pydicom.dcmread(out / "parametric_map.dcm")
    assert int(pm.NumberOfFrames) == slices and pm.StudyInstanceUID == series.meta["study_uid"]
    assert pydicom.dcmread(out / "report.dcm").Modality == "SR"


def test_explain_dicom_out_deidentified(random_release_path, tmp_path, capsys):
    from prima.io import load_study

    out = tmp_path / "dicom"
    assert main(["explain", str(EXAMPLE), "--target", "priority", "--samples", "16", "--weights",
                 str(random_release_path), "--device", "cpu", "--dicom-out", str(out), "--deidentify"]) == 0
    assert "de-identified with a copy of the source series" in capsys.readouterr().out
    manifest = json.loads((out / "prima-dicom.json").read_text())
    assert manifest["deidentified"] and len(manifest["source"]["files"]) == len(manifest["source"]["sop_instance_uids"])
    originals = {load_study(EXAMPLE).series[0].meta[key] for key in ("study_uid", "series_uid")}
    for path in out.rglob("*"):
        if path.is_file():
            assert not any(uid.encode() in path.read_bytes() for uid in originals)


def test_dicom_out_options_are_checked_before_any_work(tmp_path, capsys):
    assert main(["predict", str(EXAMPLE), "--dicom-out", str(tmp_path / "d")]) == 2
    assert "go with --explain" in capsys.readouterr().err
    assert main(["explain", str(EXAMPLE), "--target", "priority", "--deidentify"]) == 2
    assert "--deidentify goes with --dicom-out" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    assert main(["explain", str(EXAMPLE), "--target", "priority", "--dicom-out", str(busy),
                 "--weights", str(tmp_path / "no-such-release")]) == 2  # refused before the weights are read
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]


def test_a_nifti_series_gets_its_heatmap_on_the_input_grid_and_no_dicom(random_release_path, tmp_path, capsys):
    import nibabel as nib

    source = NIBABEL_DATA / "anatomical.nii"  # stored L,A,S; prima works on L,P,S
    common = [str(source), "--target", "priority", "--samples", "16", "--weights", str(random_release_path),
              "--device", "cpu"]
    out = tmp_path / "dicom"
    assert main(["explain", *common, "--dicom-out", str(out)]) == 2
    assert "loaded from NIfTI" in capsys.readouterr().err and not out.exists()
    heat = tmp_path / "heat.nii.gz"
    assert main(["explain", *common, "--heatmap", str(heat)]) == 0
    on_input = tmp_path / "heat_input_grid.nii.gz"
    assert f"Heatmap (NIfTI on the input's own grid): {on_input}" in capsys.readouterr().out
    image, original = nib.load(on_input), nib.load(source)
    assert image.shape == original.shape and np.allclose(image.affine, original.affine, atol=1e-5)
    assert float(np.abs(image.get_fdata()).max()) > 0
