"""Patches for tokenizer training and evaluation, drawn from a study manifest (SPEC section 7).

Each series of each study goes load -> ``preprocess_series`` -> ``patchify`` -> foreground filter.
Extraction is the slow part, so a :class:`PatchSet` is cached as one ``.npz`` in the run folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prima.config import TokenizerConfig
from prima.io import Series, load_study
from prima.patching import foreground_fractions, patchify, select_tokens
from prima.preprocess import preprocess_series
from training.manifest import StudyEntry, read_manifest
from training.tokenizer.augment import random_token_selection

# Checked in order, so "T1 POST" wins over "T1" and "FLAIR" over "T2" ("T2 FLAIR").
_SEQUENCE_PATTERNS = (
    ("T1_POST", r"T1.*(POST|\+C|GAD|CONTRAST|\bC\+)|(POST|GAD).*T1|MPRAGE.*POST"),
    ("FLAIR", r"FLAIR"),
    ("DWI", r"DWI|DIFFUSION|\bTRACE\b|\bADC\b"),
    ("SWI", r"SWI|SWAN|\bGRE\b|T2\*|HEMO"),
    ("T2", r"T2"),
    ("T1", r"T1|MPRAGE|SPGR|BRAVO"),
)


def sequence_type(series_name: str) -> str:
    """Coarse sequence family of a series description ("AX T2 FLAIR" -> "FLAIR"), else "OTHER"."""
    name = series_name.upper().replace("_", " ")
    for family, pattern in _SEQUENCE_PATTERNS:
        if re.search(pattern, name):
            return family
    return "OTHER"


@dataclass
class PatchSet:
    """Foreground patches of many series, aligned row by row."""

    patches: np.ndarray  # (N, 32, 32, 4) float16 in [0, 1], canonical layout (through-plane last)
    coords: np.ndarray  # (N, 3) int64 patch-grid coordinates in array-axis order
    series_index: np.ndarray  # (N,) int32 row of ``series_names`` / ``planes`` the patch comes from
    series_names: list[str]  # one per series
    planes: list[str]  # "axial" | "coronal" | "sagittal", one per series

    def __len__(self) -> int:
        return len(self.patches)

    def save(self, path: Path | str) -> None:
        np.savez(
            path,
            patches=self.patches,
            coords=self.coords,
            series_index=self.series_index,
            series_names=np.array(self.series_names, dtype=str),
            planes=np.array(self.planes, dtype=str),
        )

    @classmethod
    def load(cls, path: Path | str) -> "PatchSet":
        with np.load(path) as saved:
            return cls(
                patches=saved["patches"],
                coords=saved["coords"],
                series_index=saved["series_index"],
                series_names=[str(name) for name in saved["series_names"]],
                planes=[str(plane) for plane in saved["planes"]],
            )


def load_preprocessed(path: Path | str, name: str) -> Series:
    """The one series at ``path`` (NIfTI file or DICOM series folder), preprocessed (SPEC section 2)."""
    study = load_study(path, series_names=[name])
    if not study.series:
        raise ValueError(f"no usable series at {path}: {[skipped.reason for skipped in study.skipped]}")
    return preprocess_series(study.series[0])


def series_patches(series: Series, config: TokenizerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All patches of a preprocessed series: (patches (N, 32, 32, 4), coords (N, 3), foreground fractions (N,))."""
    patches, coords = patchify(series.array, series.through_axis, config.patch_size)
    return patches, coords, foreground_fractions(series.array, series.through_axis, config.patch_size)


def extract_patch_set(
    studies: list[StudyEntry],
    config: TokenizerConfig,
    fraction_range: tuple[float, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PatchSet:
    """Patches of every series of ``studies``.

    Args:
        fraction_range: when given, each series gets its own minimum foreground fraction drawn
            uniformly in this range (the paper's filtering augmentation); otherwise the config's.
        seed: seeds those draws.
        progress: show a progress bar over series on stderr (extraction takes minutes).
    """
    rng = np.random.default_rng(seed)
    chunks, coords, series_index, names, planes = [], [], [], [], []
    entries = [entry for study in studies for entry in study.series]
    for entry in tqdm(entries, desc="extracting patches", unit="series", disable=not progress):
        series = load_preprocessed(entry.path, entry.name)
        patches, grid, fractions = series_patches(series, config)
        if fraction_range is None:
            kept = select_tokens(fractions, config.min_foreground_fraction, config.min_tokens)
        else:
            kept = random_token_selection(fractions, rng, *fraction_range, min_tokens=config.min_tokens)
        chunks.append(patches[kept].astype(np.float16))
        coords.append(grid[kept])
        series_index.append(np.full(len(kept), len(names), dtype=np.int32))
        names.append(entry.name)
        planes.append(series.plane)
    if not chunks:
        raise ValueError("no usable series in the given studies")
    return PatchSet(np.concatenate(chunks), np.concatenate(coords), np.concatenate(series_index), names, planes)


def cached_patch_set(
    manifest: Path | str,
    splits: list[str],
    cache: Path | str,
    config: TokenizerConfig,
    fraction_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> PatchSet:
    """The patches of the manifest's ``splits``, read from ``cache`` or extracted and saved there."""
    cache = Path(cache)
    if cache.exists():
        return PatchSet.load(cache)
    studies = read_manifest(manifest, splits)
    if not studies:
        raise ValueError(f"{manifest}: no study in splits {splits}")
    patch_set = extract_patch_set(studies, config, fraction_range, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.stem + ".partial.npz")
    patch_set.save(partial)
    partial.replace(cache)
    return patch_set
