"""Gallery: every diagnosis on its key sequences with the lesion-mask outline, for a person to judge.

    python -m training.synth.gallery --out gallery.png [--seed 0] [--spacing 1.5] [--keys k1 k2 ...]

Each diagnosis gets a fresh subject, the pathology engine applies that one finding (plus the findings
it brings along), and each of its key sequences is simulated in the plane that shows it best; the
slice with the largest lesion area is drawn with the mask outline in red (co-occurring findings in
yellow).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from prima.labels import default_label_space
from training.synth.anatomy import make_subject
from training.synth.pathology import KEY_SEQUENCES, apply_findings
from training.synth.protocols import SERIES_KINDS, make_series_spec
from training.synth.sequences import SeriesSpec, simulate_series

# Diagnoses seen best off the axial plane (midline and craniocervical anatomy).
SAGITTAL = ("sellar_", "structural_chiari_malformation", "spine_syrinx", "structural_cephaloceles",
            "developmental_dysgenesis_corpus_callosum", "developmental_dandy_walker_malformation",
            "tumor_adult_pineal_tumor", "ventricular_intracranial_hypotension", "structural_brain_herniation")
CORONAL = ("trauma_subdural_hematoma", "structural_midline_shift", "tumor_adult_schwannoma")
MAX_SEQUENCES = 2  # panels per diagnosis


def gallery_plane(key: str) -> str:
    if any(key.startswith(p) for p in SAGITTAL):
        return "sagittal"
    if any(key.startswith(p) for p in CORONAL):
        return "coronal"
    return "axial"


def gallery_spec(rng: np.random.Generator, sequence: str, plane: str) -> SeriesSpec:
    """A routine series of ``sequence`` in ``plane`` (thin slices so small lesions are visible)."""
    kinds = [k for k, (seq, pl) in SERIES_KINDS.items() if seq == sequence]
    exact = [k for k in kinds if SERIES_KINDS[k][1] == plane]
    spec = make_series_spec(rng, (exact or kinds)[0], "ge")
    # Without a routine series of this sequence in this plane, the vendor name (e.g. "AX T2") would
    # contradict the image shown, so name the panel by what it is.
    name = spec.name if exact else f"{sequence.upper()} {plane}"
    return replace(spec, name=name, plane=plane, matrix=(256, 256), fov_mm=(230.0, 230.0),
                   slice_thickness_mm=min(spec.slice_thickness_mm, 3.0), slice_gap_mm=0.0, target="", coverage_mm=0.0)


def render_diagnosis(
    key: str, seed: int, index: int, spacing: float
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Panels ``(title, image, key mask, other masks)`` of ``key`` on its key sequences (2D slices)."""
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence([seed, index]).spawn(3)]
    phantom = make_subject(rngs[0], spacing=spacing, age=float(rngs[0].uniform(30, 70)))
    apply_findings(phantom, [key], rngs[1])
    sequences = list(KEY_SEQUENCES.get(key, ("flair",)))[:MAX_SEQUENCES]
    panels = []
    for sequence in sequences:
        spec = gallery_spec(rngs[2], sequence, gallery_plane(key))
        volume, _, masks = simulate_series(phantom, spec, rngs[2])
        mask = masks.get(key, np.zeros(volume.shape, bool))
        others = np.zeros(volume.shape, bool)
        for other, m in masks.items():
            if other != key:
                others |= m
        area = mask.sum(axis=(0, 1))
        k = int(np.argmax(area)) if area.any() else volume.shape[2] // 2
        panels.append((f"{spec.name}", volume[:, :, k], mask[:, :, k], others[:, :, k]))
    return panels


def make_gallery(out: str | Path, *, seed: int = 0, spacing: float = 1.5, keys: list[str] | None = None,
                 columns: int = 4) -> Path:
    """Render the gallery PNG to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    space = default_label_space()
    keys = list(space.diagnosis_keys) if keys is None else keys
    unknown = [k for k in keys if k not in space.diagnosis_keys]
    if unknown:
        raise ValueError(f"unknown diagnosis keys {unknown}")
    rows = int(np.ceil(len(keys) / columns))
    fig, axes = plt.subplots(rows, columns * MAX_SEQUENCES, figsize=(2.2 * columns * MAX_SEQUENCES, 2.5 * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, key in enumerate(keys):
        panels = render_diagnosis(key, seed, space.diagnosis_keys.index(key), spacing)
        for j, (series_name, image, mask, others) in enumerate(panels):
            ax = axes[n // columns, (n % columns) * MAX_SEQUENCES + j]
            # Display as radiologists do: image rows top to bottom, patient's right on the left.
            ax.imshow(image.T, cmap="gray", vmin=0, vmax=np.percentile(image, 99.5), interpolation="bilinear")
            if others.any():
                ax.contour(others.T, levels=[0.5], colors="yellow", linewidths=0.6)
            if mask.any():
                ax.contour(mask.T, levels=[0.5], colors="red", linewidths=0.8)
            title = f"{space.diagnosis(key).name}\n{series_name}" if j == 0 else f"\n{series_name}"
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synth.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gallery.png"), help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subjects and lesions")
    parser.add_argument("--spacing", type=float, default=1.5, help="phantom voxel size in mm")
    parser.add_argument("--keys", nargs="*", default=None, help="diagnosis keys (default: all 52)")
    a = parser.parse_args(argv)
    try:
        print(make_gallery(a.out, seed=a.seed, spacing=a.spacing, keys=a.keys))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
