"""The project's exception hierarchy: every error a user can act on derives from ``PrimaError``.

Errors about what a user handed us also derive from ``ValueError`` so that generic callers that
catch bad input keep working.
"""

from __future__ import annotations


class PrimaError(Exception):
    """Base class of every error raised on purpose by ``prima``."""


class StudyLoadError(PrimaError, ValueError):
    """A study (folder, archive or files) could not be read as a whole."""


class UnsafeArchiveError(StudyLoadError):
    """An archive was refused: path traversal, links, too many files or too many bytes."""


class SeriesLoadError(StudyLoadError):
    """One series could not be turned into a volume; ``reason`` says why in plain words."""

    def __init__(self, reason: str, series_name: str | None = None) -> None:
        self.reason = reason
        self.series_name = series_name
        super().__init__(f"series {series_name!r}: {reason}" if series_name else reason)


class CodecUnavailableError(SeriesLoadError):
    """Pixel data is compressed with a transfer syntax no installed decoder handles."""


class NoUsableSeriesError(StudyLoadError):
    """Nothing in the study could be loaded; ``skipped`` lists each series with its reason."""

    def __init__(self, message: str, skipped: list | None = None) -> None:
        self.skipped = list(skipped or [])
        super().__init__(message)


class ConfigError(PrimaError, ValueError):
    """A model configuration is unknown or inconsistent."""


class ReleaseError(PrimaError):
    """A release folder or hub repository is missing files or holds corrupted or mismatched weights."""


class ExportError(PrimaError, ValueError):
    """A DICOM output cannot be written for this series (``prima.export``): NIfTI source, unsupported
    storage, source files that no longer match the loaded series, an output folder in the way."""


class ManifestError(PrimaError, ValueError):
    """A study manifest (``manifest.jsonl``) is missing, not JSON, or breaks the manifest contract."""
