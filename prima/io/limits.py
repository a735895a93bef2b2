"""Bounds on what one study may hold, checked from headers before any voxel is decoded.

A study that asks for more than a server can give (too many series, too many voxels, a field of view
no head has) is refused, or the series is skipped, with a message that names the bound, before the
loader allocates it. Archive bounds (entries, bytes, compression ratio) are ``ArchiveLimits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prima.errors import SeriesLoadError, StudyLoadError


@dataclass(frozen=True)
class StudyLimits:
    max_series: int = 64  # series in a study (a long clinical protocol has ~20; each costs a tokenizer pass)
    max_voxels_per_series: int = 2**27  # 134 M voxels = 512 MiB in float32 (a 512 x 512 x 512 volume)
    max_total_voxels: int = 2**29  # over every series of the study: 2 GiB in float32
    max_extent_mm: float = 1000.0  # field of view along any axis; preprocessing resamples to ~1 mm grids


class StudyBudget:
    """What a study being loaded has used of its ``StudyLimits``."""

    def __init__(self, limits: StudyLimits):
        self.limits = limits
        self.series = 0
        self.voxels = 0

    def claim(self, name: str, voxels: int) -> None:
        """Reserve one series of ``voxels``; SeriesLoadError over the per-series bound (the series is
        skipped), StudyLoadError over the study's bounds (the study is refused)."""
        if voxels > self.limits.max_voxels_per_series:
            raise SeriesLoadError(f"{voxels:,} voxels, more than the limit of {self.limits.max_voxels_per_series:,} "
                                  "per series", name)
        if self.series + 1 > self.limits.max_series:
            raise StudyLoadError(f"the study has more than {self.limits.max_series} series, the limit")
        if self.voxels + voxels > self.limits.max_total_voxels:
            raise StudyLoadError(f"the study holds more than {self.limits.max_total_voxels:,} voxels, the limit")
        self.series += 1
        self.voxels += voxels

    def check_extent(self, name: str, affine: np.ndarray, shape: tuple[int, ...]) -> None:
        """SeriesLoadError when the volume is wider than ``max_extent_mm`` along an axis."""
        extent = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)) * np.asarray(shape[:3])
        if not np.all(extent <= self.limits.max_extent_mm):
            shown = " x ".join(f"{e:.4g}" for e in extent)
            raise SeriesLoadError(f"field of view {shown} mm exceeds the limit of {self.limits.max_extent_mm:g} mm "
                                  "along an axis (implausible voxel size)", name)
