"""Safe extraction of a study archive (``.zip``) into a private temporary folder.

Refused (``UnsafeArchiveError``): entries that would land outside the folder (absolute paths, ``..``,
drive letters: "zip slip"), symbolic-link entries, encrypted entries, more entries or more uncompressed
bytes than the configured bounds, and entries that expand far more than images do (a zip bomb that
stays under the byte bound still costs minutes of inflating). The bounds are checked on the central
directory, before anything is extracted. Sizes in a hostile
archive can lie, but ``zipfile`` never returns more than an entry's declared size (the entry's CRC check
then fails and the archive is reported corrupt), so nothing beyond the checked total is ever written.
The folder is removed when the context exits, also on error.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from prima.errors import StudyLoadError, UnsafeArchiveError

logger = logging.getLogger("prima.io")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 2 * 1024**3  # uncompressed bytes over all entries (a large study is < 1 GiB)
    max_files: int = 20_000  # entries (a 3000-slice study has 3000 files)
    # Uncompressed / compressed size of one entry. Deflated DICOM slices shrink 1.5-10x, slices that
    # are mostly zero padding up to ~50x; 16 MiB of zeros deflates ~1000x. Entries under
    # ``ratio_min_bytes`` are not checked (tiny files compress well and cost nothing).
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 << 20


def _safe_relative_path(name: str) -> PurePosixPath:
    """The entry's path inside the extraction folder, or UnsafeArchiveError."""
    normalised = name.replace("\\", "/")
    path = PurePosixPath(normalised)
    if normalised.startswith("/") or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute path (zip slip)")
    if any(part == ".." for part in path.parts):
        raise UnsafeArchiveError(f"archive entry {name!r} points outside the archive folder (zip slip)")
    return PurePosixPath(*[part for part in path.parts if part not in ("", ".")])


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


@contextlib.contextmanager
def extracted_zip(archive: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> Iterator[Path]:
    """Extract ``archive`` into a fresh temporary folder, yield the folder, remove it afterwards."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise StudyLoadError(f"{archive.name}: not a readable zip archive ({error})") from error
    with zf:
        infos = zf.infolist()
        files = [info for info in infos if not info.is_dir()]
        if len(infos) > limits.max_files:
            raise UnsafeArchiveError(f"{archive.name} has {len(infos)} entries, more than the limit of "
                                     f"{limits.max_files}")
        declared = sum(info.file_size for info in files)
        if declared > limits.max_total_bytes:
            raise UnsafeArchiveError(f"{archive.name} would expand to {declared} bytes, more than the limit of "
                                     f"{limits.max_total_bytes} (zip bomb?)")
        for info in files:
            if info.file_size > limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise UnsafeArchiveError(
                    f"{archive.name}: entry {info.filename!r} would expand {info.file_size / max(info.compress_size, 1):.0f}x "
                    f"({info.file_size} bytes), a compression ratio above the limit of {limits.max_ratio:.0f} (zip bomb?)")
        targets = []
        for info in infos:
            if _is_symlink(info):
                raise UnsafeArchiveError(f"archive entry {info.filename!r} is a symbolic link; links are refused")
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"archive entry {info.filename!r} is encrypted")
            targets.append((info, _safe_relative_path(info.filename)))
        if not files:
            raise StudyLoadError(f"{archive.name} is empty: no files to load")
        folder = Path(tempfile.mkdtemp(prefix="prima-study-"))
        try:
            written = 0
            for info, relative in targets:
                if not relative.parts:
                    continue
                target = folder.joinpath(*relative.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    sink = open(target, "xb")  # exclusive: a duplicate entry never overwrites
                except (OSError, ValueError) as error:
                    raise StudyLoadError(f"{archive.name}: entry {info.filename!r} cannot be extracted "
                                         f"({error})") from error
                try:
                    with zf.open(info) as source, sink:
                        shutil.copyfileobj(source, sink, _CHUNK)
                        written += sink.tell()
                except OSError as error:  # a full disk (ENOSPC), a file-size limit (EFBIG), a quota
                    raise StudyLoadError(f"{archive.name}: no room to extract {info.filename!r} into the temporary "
                                         f"folder ({error.strerror or error}); free disk space and try again") from error
            logger.info("extracted %d files (%d bytes) from %s", len(files), written, archive.name)
            yield folder
        except zipfile.BadZipFile as error:
            raise StudyLoadError(f"{archive.name}: corrupt zip archive ({error})") from error
        finally:
            shutil.rmtree(folder, ignore_errors=True)
