"""dcm2niix as an independent geometry oracle for prima's DICOM reader.

dcm2niix (Chris Rorden) shares no code with prima: it parses DICOM in C, orders slices, builds the
NIfTI sform itself and flips rows to its own storage order. If prima and dcm2niix agree voxel for voxel
and on every affine once both are brought to one axis order, a sign or axis error in either is
ruled out; a disagreement means one of them is wrong and the DICOM standard decides which.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

# The pinned wheel installs the binary next to the interpreter; prefer it over any other on PATH.
_NEXT_TO_PYTHON = Path(sys.executable).parent / "dcm2niix"
DCM2NIIX = str(_NEXT_TO_PYTHON) if _NEXT_TO_PYTHON.exists() else shutil.which("dcm2niix")

# Flags: uncompressed .nii (-z n), no sidecar (-b n), one file per series named by its
# SeriesInstanceUID (-f %j) so outputs map to prima's series without guessing, no cropping (-x n),
# keep derived/localizer images (-i n), integers as stored (-l o), and Philips *display* scaling
# (-p n): RescaleSlope/Intercept as the DICOM standard defines them, which is what prima applies
# (dcm2niix's default uses Philips' private "precise" floating point scale instead).
FLAGS = ("-z", "n", "-b", "n", "-f", "%j", "-x", "n", "-i", "n", "-l", "o", "-p", "n", "-w", "1")


@dataclass
class Conversion:
    """What one dcm2niix run wrote: NIfTI files by stem (the SeriesInstanceUID plus any suffix)."""

    out_dir: Path
    log: str
    files: dict[str, Path] = field(default_factory=dict)

    def image(self, series_uid: str, suffix: str = "") -> nib.Nifti1Image:
        """The output for one series; fails loudly (listing what was written) when it is missing,
        so a test can never pass because dcm2niix produced nothing."""
        stem = series_uid + suffix
        if stem not in self.files:
            raise AssertionError(f"dcm2niix wrote no {stem}.nii; it wrote {sorted(self.files)}\n{self.log}")
        return nib.load(self.files[stem])

    def outputs_of(self, series_uid: str) -> list[str]:
        """Every stem written for a series (the plain one plus suffixed variants such as _Tilt_1)."""
        return sorted(stem for stem in self.files if stem.startswith(series_uid))


def run_dcm2niix(in_dir: Path, out_dir: Path, timeout_s: float = 60.0) -> Conversion:
    """Convert every series under ``in_dir`` into ``out_dir`` (created)."""
    if DCM2NIIX is None:
        raise RuntimeError("dcm2niix not found; it is pinned in requirements-test.txt")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([DCM2NIIX, *FLAGS, "-o", str(out_dir), str(in_dir)],
                            capture_output=True, text=True, timeout=timeout_s, check=False)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"dcm2niix exited with {result.returncode}:\n{log}")
    files = {p.name.removesuffix(".nii"): p for p in out_dir.glob("*.nii")}
    if not files:
        raise AssertionError(f"dcm2niix wrote no NIfTI file for {in_dir}:\n{log}")
    return Conversion(out_dir, log, files)


def dicom_rescale_step(path: Path) -> float:
    """The world-value step between consecutive stored integers (RescaleSlope) of a DICOM file,
    from the enhanced functional groups when present: the unit of the voxel tolerance."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in header.get(groups, [])[:1]:
            for transform in item.get("PixelValueTransformationSequence", [])[:1]:
                if "RescaleSlope" in transform:
                    return abs(float(transform.RescaleSlope))
    return abs(float(header.get("RescaleSlope", 1.0) or 1.0))


def oracle_volume(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """dcm2niix's 3D volume (first volume of a 4D file) with its scaling applied, and its affine.

    The sform is used (dcm2niix writes sform_code 1); the qform must tell the same story.
    """
    header = image.header
    if int(header["sform_code"]) == 0:
        raise AssertionError("dcm2niix wrote no sform")
    array = np.asarray(image.dataobj, dtype=np.float64)
    if array.ndim == 4:
        array = array[..., 0]
    return array, np.asarray(image.affine, dtype=np.float64)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip to the RAS-closest axis order with nibabel (no resampling), independently of prima."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float64), affine))
    return np.asarray(image.dataobj, dtype=np.float64), np.asarray(image.affine, dtype=np.float64)


@dataclass
class Agreement:
    """How far prima and dcm2niix are apart on one series."""

    shape_prima: tuple[int, ...]
    shape_oracle: tuple[int, ...]
    max_voxel_diff_steps: float  # |prima - dcm2niix| / rescale step, worst voxel
    max_affine_diff_mm: float  # worst element of the 4x4 difference (rotation/zoom part in mm per voxel)

    def agrees(self, voxel_tol_steps: float, affine_tol_mm: float) -> bool:
        return (self.shape_prima == self.shape_oracle and self.max_voxel_diff_steps <= voxel_tol_steps
                and self.max_affine_diff_mm <= affine_tol_mm)


def compare(prima_array: np.ndarray, prima_affine: np.ndarray, oracle_array: np.ndarray,
            oracle_affine: np.ndarray, step: float) -> Agreement:
    """Bring both to nibabel's canonical order and measure voxel and affine differences."""
    a, a_aff = to_canonical(prima_array, prima_affine)
    b, b_aff = to_canonical(oracle_array, oracle_affine)
    voxel = float(np.abs(a - b).max()) / step if a.shape == b.shape else float("inf")
    return Agreement(a.shape, b.shape, voxel, float(np.abs(a_aff - b_aff).max()))


def world_of_brightest(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm of the single brightest voxel (the planted marker)."""
    index = np.unravel_index(int(np.argmax(array)), array.shape)
    return (affine @ np.array([*index, 1.0]))[:3]


def sample_along_one_axis(array: np.ndarray, affine: np.ndarray, world: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of ``array`` at world points that fall on its grid in two axes.

    Used for gantry tilt: dcm2niix's corrected volume moves each slice along the image rows only, so
    its voxel centres land on integer prima columns and slices and between rows. Returns
    (values, inside, gradient): ``inside`` marks points within the array, ``gradient`` is the value
    change between the two voxels interpolated, per voxel (how much a tiny position error moves a value).
    """
    voxel = np.linalg.solve(affine, np.vstack([world, np.ones(world.shape[1])]))[:3]
    fraction = np.abs(voxel - np.round(voxel)).max(axis=1)
    off_grid = [axis for axis in range(3) if fraction[axis] > 1e-3]
    if len(off_grid) > 1:
        raise AssertionError(f"oracle voxel centres fall between prima voxels along axes {off_grid}")
    axis = off_grid[0] if off_grid else 0
    index = np.round(voxel).astype(np.int64)
    position = voxel[axis]
    inside = (position >= 0) & (position <= array.shape[axis] - 1)
    for other in range(3):
        if other != axis:
            inside &= (index[other] >= 0) & (index[other] < array.shape[other])
    low = np.clip(np.floor(position).astype(np.int64), 0, array.shape[axis] - 2)
    weight = position - low
    lo_index, hi_index = index.copy(), index.copy()
    lo_index[axis], hi_index[axis] = low, low + 1
    lo_index = np.clip(lo_index, 0, np.array(array.shape)[:, None] - 1)
    hi_index = np.clip(hi_index, 0, np.array(array.shape)[:, None] - 1)
    low_values, high_values = array[tuple(lo_index)], array[tuple(hi_index)]
    values = low_values * (1 - weight) + high_values * weight
    return values, inside, np.abs(high_values - low_values)
