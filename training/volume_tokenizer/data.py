"""Patches for volume tokenizer training and evaluation, drawn from a study manifest (docs/design.md section 7).

Each series goes through ``prima.tokens.series_patches`` (load -> the model config's preprocessing ->
patches -> foreground fractions), the path inference uses, then the background filter. Extraction is the
slow part, so a :class:`PatchSet` is cached as one ``.npz`` in the run folder, named by a key of
everything it was built from (manifest bytes, splits, preprocessing, patch size, filter settings, seed).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prima.config import PrimaConfig
from prima.manifest import StudyEntry, load_entry_study, manifest_digest, read_manifest
from prima.patching import patchify, select_tokens
from prima.preprocess import grid_anchor
from prima.tokens import series_patches
from training.lesion_masks import lesion_mask_on_grid
from training.runtime import cache_key
from training.volume_tokenizer.augment import random_token_selection

# Checked in order, so "T1 POST" wins over "T1" and "FLAIR" over "T2" ("T2 FLAIR").
_SEQUENCE_PATTERNS = (
    ("T1_POST", r"T1.*(POST|\+C|GAD|CONTRAST|\bC\+)|(POST|GAD).*T1|MPRAGE.*POST"),
    ("FLAIR", r"FLAIR"),
    ("DWI", r"DWI|DIFFUSION|\bTRACE\b|\bADC\b"),
    ("SWI", r"SWI|SWAN|\bGRE\b|T2\*|HEMO"),
    ("T2", r"T2"),
    ("T1", r"T1|MPRAGE|SPGR|BRAVO"),
)
_PATCH_SET_VERSION = 2  # bump when what a patch set holds changes, so older caches are not reused


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
    lesions: np.ndarray | None = None  # (N, 32, 32, 4) bool lesion voxels, as ``patches`` (extract_patch_set's
    #                                    ``lesions=True``; all False where the study has no lesion mask)
    lesions_known: np.ndarray | None = None  # (N,) bool: the patch's study records its lesion masks

    def __len__(self) -> int:
        return len(self.patches)

    def save(self, path: Path | str) -> None:
        lesions = {} if self.lesions is None else {"lesions": np.packbits(self.lesions, axis=None),
                                                    "lesions_known": self.lesions_known}
        np.savez(
            path,
            patches=self.patches,
            coords=self.coords,
            series_index=self.series_index,
            series_names=np.array(self.series_names, dtype=str),
            planes=np.array(self.planes, dtype=str),
            **lesions,
        )

    @classmethod
    def load(cls, path: Path | str) -> "PatchSet":
        with np.load(path) as saved:
            patches = saved["patches"]
            lesions = None
            if "lesions" in saved:
                lesions = np.unpackbits(saved["lesions"], count=patches.size).astype(bool).reshape(patches.shape)
            return cls(
                patches=patches,
                coords=saved["coords"],
                series_index=saved["series_index"],
                series_names=[str(name) for name in saved["series_names"]],
                planes=[str(plane) for plane in saved["planes"]],
                lesions=lesions,
                lesions_known=saved["lesions_known"] if lesions is not None else None,
            )


def extract_patch_set(
    studies: list[StudyEntry],
    config: PrimaConfig,
    fraction_range: tuple[float, float] | None = None,
    seed: int = 0,
    progress: bool = True,
    lesions: bool = False,
) -> PatchSet:
    """Patches of every series of ``studies``, preprocessed as ``config`` says.

    Args:
        config: the model config (preprocessing, patch size, background filter).
        fraction_range: when given, each series gets its own minimum foreground fraction drawn
            uniformly in this range (the paper's filtering augmentation); otherwise the config's.
        seed: seeds those draws.
        progress: show a progress bar over studies on stderr (extraction takes minutes).
        lesions: also cut each series' lesion masks (the manifest's ``lesion_masks``, every lesion of the
            series at once) into patches, for the evaluation's lesion fidelity.
    """
    rng = np.random.default_rng(seed)
    filter_config = config.volume_tokenizer
    chunks, coords, series_index, names, planes = [], [], [], [], []
    lesion_chunks, known = [], []
    for study in tqdm(studies, desc="extracting patches", unit="study", disable=not progress):
        loaded = load_entry_study(study)
        for skipped in loaded.skipped:
            warnings.warn(f"{study.study_id}: series {skipped.name!r} skipped: {skipped.reason}", stacklevel=2)
        head_centre = grid_anchor(loaded.series, config.preprocess)
        for series in loaded.series:
            patches = series_patches(series, config, head_centre)
            if fraction_range is None:
                kept = select_tokens(patches.fractions, filter_config.min_foreground_fraction, filter_config.min_tokens)
            else:
                kept = random_token_selection(patches.fractions, rng, *fraction_range, min_tokens=filter_config.min_tokens)
            chunks.append(patches.patches[kept].astype(np.float16))
            if lesions:
                mask = lesion_mask_on_grid(study, series.name, None, patches, config.preprocess)
                lesion_chunks.append(np.zeros(chunks[-1].shape, dtype=bool) if mask is None else
                                     patchify(mask, patches.through_axis, config.volume_tokenizer.patch_size)[0][kept])
                known.append(np.full(len(kept), study.lesion_masks is not None))
            coords.append(patches.coords[kept])
            series_index.append(np.full(len(kept), len(names), dtype=np.int32))
            names.append(series.name)
            planes.append(patches.plane)
    if not chunks:
        raise ValueError("no usable series in the given studies")
    return PatchSet(np.concatenate(chunks), np.concatenate(coords), np.concatenate(series_index), names, planes,
                    np.concatenate(lesion_chunks) if lesions else None, np.concatenate(known) if lesions else None)


def patch_set_key(manifest: Path | str, splits: list[str], config: PrimaConfig,
                  fraction_range: tuple[float, float] | None, seed: int) -> str:
    """What a patch set is built from, hashed: a changed manifest or setting gives another cache file."""
    tokenizer = config.volume_tokenizer
    return cache_key(version=_PATCH_SET_VERSION, manifest=manifest_digest(manifest), splits=sorted(splits),
                     preprocess=dataclasses.asdict(config.preprocess), patch_size=list(tokenizer.patch_size),
                     min_fraction=tokenizer.min_foreground_fraction, min_tokens=tokenizer.min_tokens,
                     fraction_range=list(fraction_range) if fraction_range else None,
                     seed=seed if fraction_range else None)


def cached_patch_set(
    manifest: Path | str,
    splits: list[str],
    folder: Path | str,
    config: PrimaConfig,
    fraction_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> PatchSet:
    """The patches of the manifest's ``splits``, read from ``folder/patches-<key>.npz`` or extracted and
    saved there (the key covers everything the patch set depends on, see :func:`patch_set_key`)."""
    cache = Path(folder) / f"patches-{patch_set_key(manifest, splits, config, fraction_range, seed)}.npz"
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
