"""Light real-anatomy tokenizer data (tests, quick runs): the MNI152 template deformed.

Each subject is the ICBM152 2009 template shipped in nilearn (no download) under a random affine and a
smooth elastic deformation; each of its series simulates one contrast (T1 from the template, T2 and
FLAIR from the grey/white-matter/CSF maps) with a random gamma, bias field and noise, acquired in one
plane with 4-6 mm slices. Series are written as NIfTI with a docs/design.md §7 manifest, so the tokenizer
trains through the same manifest path it will use on synthetic or real studies.

    python -m training.volume_tokenizer.mni_manifest --out data/mni --subjects 24 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn import datasets
from scipy import ndimage

from prima.labels import default_label_space
from prima.manifest import SeriesEntry, StudyEntry, write_manifest
from training.synth.anatomy import smooth_random_field

PLANES = {"AX": 2, "COR": 1, "SAG": 0}  # series-name prefix -> through-plane axis of the RAS template
CONTRASTS = ("T1", "T2", "FLAIR")
# Relative signal of (white matter, grey matter, CSF) for the contrasts built from tissue maps.
TISSUE_SIGNAL = {"T2": (0.35, 0.6, 1.0), "FLAIR": (0.55, 0.8, 0.12)}


def load_template() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The 1 mm template, its tissue maps and brain mask as float32 arrays, plus their RAS affine."""
    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    arrays = {name: np.asarray(image.dataobj, dtype=np.float32) for name, image in images.items()}
    # Crop to the brain plus a margin the deformation can move into: a third fewer voxels to warp.
    inside = np.argwhere(arrays["mask"] > 0)
    low = np.maximum(inside.min(axis=0) - 8, 0)
    high = np.minimum(inside.max(axis=0) + 9, arrays["mask"].shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    affine = images["t1"].affine.copy()
    affine[:3, 3] += affine[:3, :3] @ low
    return {name: np.ascontiguousarray(array[box]) for name, array in arrays.items()}, affine


def deform(maps: dict[str, np.ndarray], rng: np.random.Generator, elastic_mm: float = 3.0) -> dict[str, np.ndarray]:
    """Warp every map by one random affine (rotation <= 8 deg, scale 0.92-1.08, shift <= 6 mm) + elastic field."""
    shape = next(iter(maps.values())).shape
    angles = np.deg2rad(rng.uniform(-8, 8, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        plane = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[np.ix_(plane, plane)] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        rotation = rotation @ step
    matrix = rotation @ np.diag(rng.uniform(0.92, 1.08, size=3))
    center = (np.array(shape) - 1) / 2
    # The warp is smooth, so it is computed on a grid 4x coarser and upsampled linearly.
    coarse_shape = tuple(-(-size // 4) + 1 for size in shape)
    grid = np.indices(coarse_shape, dtype=np.float64).reshape(3, -1) * 4
    source = matrix @ (grid - center[:, None]) + center[:, None] + rng.uniform(-6, 6, size=(3, 1))
    elastic = rng.normal(0, elastic_mm, size=(3, 6, 7, 6))
    zoom_to_coarse = np.array(coarse_shape) / np.array(elastic.shape[1:])
    source += np.stack([ndimage.zoom(field, zoom_to_coarse, order=3) for field in elastic]).reshape(3, -1)
    coarse_source = source.reshape((3,) + coarse_shape).astype(np.float32)
    source = np.stack(
        [ndimage.zoom(field, 4, order=1)[: shape[0], : shape[1], : shape[2]] for field in coarse_source]
    )
    return {
        name: ndimage.map_coordinates(array, source, order=1, mode="constant", prefilter=False)
        for name, array in maps.items()
    }


def contrast(maps: dict[str, np.ndarray], sequence: str, rng: np.random.Generator) -> np.ndarray:
    """One sequence's image of a (deformed) subject, with gamma, a smooth bias field and noise."""
    if sequence == "T1":
        image = maps["t1"]
    else:
        white, grey, fluid = TISSUE_SIGNAL[sequence]
        csf = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0, 1)
        image = (white * maps["wm"] + grey * maps["gm"] + fluid * csf) * maps["mask"]
    image = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25)
    image = image * np.exp(smooth_random_field(rng, image.shape, control=3, std=0.08))
    image = image + rng.normal(0, rng.uniform(0.005, 0.02), size=image.shape) * (image > 0.02)
    return np.clip(image, 0, None).astype(np.float32)


def acquire(image: np.ndarray, affine: np.ndarray, through_axis: int, thickness: int) -> nib.Nifti1Image:
    """Thick slices along ``through_axis`` (mean of ``thickness`` 1 mm planes), as a NIfTI image."""
    n_slices = image.shape[through_axis] // thickness
    kept = np.take(image, np.arange(n_slices * thickness), axis=through_axis)
    new_shape = list(image.shape)
    new_shape[through_axis : through_axis + 1] = [n_slices, thickness]
    slices = kept.reshape(new_shape).mean(axis=through_axis + 1)
    new_affine = affine.copy()
    new_affine[:3, through_axis] *= thickness
    new_affine[:3, 3] += affine[:3, through_axis] * (thickness - 1) / 2
    scaled = np.round(slices / max(float(slices.max()), 1e-6) * 4000).astype(np.int16)
    return nib.Nifti1Image(scaled, new_affine)


def build_mni_manifest(out: Path | str, subjects: int, seed: int = 0, series_per_subject: int = 3) -> Path:
    """Write ``subjects`` deformed-template studies (NIfTI + ``manifest.jsonl``) under ``out``.

    Splits: subject i is ``val`` when i % 6 == 5, ``test`` when i % 12 == 10, else ``train``.
    Returns the manifest path.
    """
    if subjects < 1 or series_per_subject < 1:
        raise ValueError("subjects and series_per_subject must be >= 1")
    out = Path(out)
    rng = np.random.default_rng(seed)
    template, affine = load_template()
    empty_labels = {key: 0 for key in default_label_space().diagnosis_keys}
    studies = []
    for index in range(subjects):
        split = "val" if index % 6 == 5 else "test" if index % 12 == 10 else "train"
        maps = deform(template, rng)
        series = []
        for number in range(series_per_subject):
            plane = rng.choice(list(PLANES))
            sequence = CONTRASTS[(index + number) % len(CONTRASTS)]
            image = acquire(contrast(maps, sequence, rng), affine, PLANES[plane], int(rng.integers(4, 7)))
            path = out / f"sub{index:03d}" / f"{number}_{plane}_{sequence}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(image, path)
            series.append(SeriesEntry(name=f"{plane} {sequence}", path=path))
        studies.append(
            StudyEntry(
                study_id=f"mni{index:03d}",
                patient_id=f"mni{index:03d}",
                split=split,
                study_description="MRI BRAIN WITHOUT CONTRAST",
                series=tuple(series),
                report="",
                labels=dict(empty_labels),
            )
        )
    return write_manifest(studies, out / "manifest.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the NIfTI files and manifest.jsonl")
    parser.add_argument("--subjects", type=int, default=24, help="deformed template subjects (one study each)")
    parser.add_argument("--series", type=int, default=3, help="series per study")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    print(build_mni_manifest(args.out, args.subjects, args.seed, args.series))


if __name__ == "__main__":
    main()
