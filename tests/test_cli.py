"""`prima inspect` through the real entry point (``prima.cli.main``) and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
