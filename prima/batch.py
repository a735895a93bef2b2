"""Batch inference over a manifest: ``prima predict-batch`` and ``prima embed``.

    manifest.jsonl -> DataLoader workers: load, preprocess, 32x32x4 patches, background filter (CPU)
                   -> this process: VQ-VAE codes of the kept patches, hViT, heads (the model's device)
                   -> one output record per study, in manifest order

The worker / main split is ``prima.tokens.tokenize_series`` cut in its two halves: the numpy/scipy
half (``series_patches``, ``filter_patches``) runs in ``workers`` processes, so the model's device never
waits on one CPU core, and the torch half (``encode_filtered``, ``predict_tokens``) runs here on the same
code path as ``prima.predict.predict``, so a batch result equals ``predict`` on the same study. Only the
kept patches travel from a worker to this process.

Under ``torchrun`` (``WORLD_SIZE`` > 1) process ``rank`` takes every ``world_size``-th study, writes its
records to a part file next to the output (``preds.part0-of-2.jsonl``), and after a barrier rank 0
merges the parts in manifest order and removes them. Processes talk through ``torch.distributed``
(gloo on CPUs, NCCL on GPUs, each process on ``cuda:<LOCAL_RANK>``); on several machines the output
folder must be on a file system they share.

A study that cannot be loaded or preprocessed is reported on stderr and becomes an error record
(``{"study_id", "error"}``); the run goes on.

    summary = predict_manifest("manifest.jsonl", "preds.jsonl", "path/to/release", workers=4)
    summary = embed_manifest("manifest.jsonl", "embeddings.npy", "path/to/release")
    print(summary.describe())
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from prima.config import PrimaConfig
from prima.distributed import DistributedContext, distributed
from prima.errors import ManifestError, ReleaseError
from prima.manifest import StudyEntry, load_entry_study, read_manifest
from prima.precision import autocast_dtype
from prima.predict import Prediction, get_release, predict_tokens, ready_release, series_outputs, study_embedding
from prima.preprocess import grid_anchor
from prima.release import Release
from prima.tokens import FilteredPatches, StudyTokens, encode_filtered, filter_patches, read_by_model, series_patches

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


@dataclass
class PreparedStudy:
    """What a worker hands over for one manifest study: its prepared series, or why it failed."""

    study_id: str
    description: str  # study description
    series: list[FilteredPatches]  # usable series after the background filter, in load order
    skipped: list[dict]  # series that could not be loaded: {"name", "reason"}
    timings_s: dict[str, float]  # worker seconds: "load" (reading files), "patches" (preprocess + patches + filter)
    error: str | None = None  # set when the study could not be loaded or preprocessed


class PreparedStudies(Dataset):
    """Manifest studies -> ``PreparedStudy`` (run inside DataLoader workers: numpy/scipy only, no model);
    ``min_fraction`` is the background-filter threshold (``prima.tokens.filter_patches``; default the
    config's)."""

    def __init__(self, entries: Sequence[StudyEntry], config: PrimaConfig, min_fraction: float | None = None) -> None:
        self.entries = list(entries)
        self.config = config
        self.min_fraction = min_fraction

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PreparedStudy:
        entry = self.entries[index]
        started = time.perf_counter()
        try:
            study = load_entry_study(entry)
            loaded = time.perf_counter()
            head_centre = grid_anchor(study.series, self.config.preprocess)
            series = [filter_patches(series_patches(s, self.config, head_centre), self.config, self.min_fraction)
                      for s in study.series]
        # Any reader's error (a truncated file, odd geometry) is one study's problem: it must not end a run
        # over thousands of studies, so it is caught whatever its type, and the type is reported.
        except Exception as error:  # noqa: BLE001
            return PreparedStudy(entry.study_id, entry.study_description, [], [], {},
                                 error=f"{type(error).__name__}: {' '.join(str(error).split())}")
        return PreparedStudy(entry.study_id, study.description, series,
                             [{"name": s.name, "reason": s.reason} for s in study.skipped],
                             {"load": round(loaded - started, 4), "patches": round(time.perf_counter() - loaded, 4)})


def _as_is(item: PreparedStudy) -> PreparedStudy:
    """DataLoader ``collate_fn``: hand a study over unchanged (the default would turn arrays into tensors)."""
    return item


@dataclass
class BatchSummary:
    """Counts and wall time of a batch run, summed over all torchrun processes."""

    studies: int  # studies with a result
    failed: int  # studies that could not be loaded or preprocessed
    series: int  # series of the studies with a result
    tokens: int  # volume tokens encoded (kept patches)
    seconds: float  # wall time of the slowest process, from its first study to its last
    processes: int = 1  # torchrun world size
    is_main: bool = True  # True on the process that wrote the output (rank 0)

    def describe(self) -> str:
        """One line, e.g. "12 studies (1 failed), 30 series, 9,120 tokens in 4.1 s: 2.9 studies/s, ..."."""
        rate = 1.0 / max(self.seconds, 1e-9)
        where = f" on {self.processes} processes" if self.processes > 1 else ""
        return (f"{self.studies} studies ({self.failed} failed), {self.series} series, {self.tokens:,} tokens in "
                f"{self.seconds:.1f} s{where}: {self.studies * rate:.2f} studies/s, {self.series * rate:.2f} series/s, "
                f"{self.tokens * rate:,.0f} tokens/s")


def part_path(out: Path, context: DistributedContext, rank: int | None = None) -> Path:
    """Where a rank writes its records: ``out`` itself in a single process, else a part file beside it."""
    if context.world_size == 1:
        return out
    rank = context.rank if rank is None else rank
    return out.with_name(f"{out.stem}.part{rank}-of-{context.world_size}{out.suffix}")


def total(summary: BatchSummary, context: DistributedContext) -> BatchSummary:
    """``summary`` summed over all processes (counts) with the slowest process's time."""
    studies, failed, series, tokens = (int(v) for v in context.sum(
        [summary.studies, summary.failed, summary.series, summary.tokens]))
    return BatchSummary(studies, failed, series, tokens, context.max(summary.seconds), context.world_size,
                        context.is_main)


def _selected(manifest: str | Path, splits: Iterable[str] | None, workers: int) -> list[StudyEntry]:
    """The manifest's studies (only ``splits`` when given; at least one), after checking the arguments that
    need no model, so a mistake stops the run before the release loads."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    splits = None if splits is None else list(splits)
    entries = read_manifest(manifest, splits)
    if not entries:
        where = "" if splits is None else f" in splits {', '.join(splits)}"
        raise ManifestError(f"{manifest}: no study{where}")
    return entries


def prepared_studies(entries: Sequence[StudyEntry], config: PrimaConfig, workers: int,
                     min_fraction: float | None = None) -> DataLoader:
    """Manifest studies prepared by ``workers`` DataLoader processes (0: in this process), in manifest order."""
    return DataLoader(PreparedStudies(entries, config, min_fraction), batch_size=None, num_workers=workers,
                      collate_fn=_as_is)


def _study_tokens(entries: Sequence[StudyEntry], release: Release, context: DistributedContext, workers: int,
                  precision: str, progress: bool,
                  counts: BatchSummary, desc: str) -> Iterator[tuple[PreparedStudy, StudyTokens | None, float]]:
    """(prepared study, its tokens or None when it failed, encode seconds) for each of ``entries`` in order;
    failures are reported on stderr and counted, successes counted in ``counts``."""
    studies = prepared_studies(entries, release.config, workers)
    prefix = f"[rank {context.rank}] " if context.world_size > 1 else ""
    with tqdm(total=len(entries), desc=desc, unit="study", disable=not progress or context.rank != 0) as bar:
        for prepared in studies:
            if prepared.error is not None:
                tqdm.write(f"{prefix}study {prepared.study_id} failed: {prepared.error}", file=sys.stderr)
                counts.failed += 1
                yield prepared, None, 0.0
            else:
                started = time.perf_counter()
                series = [encode_filtered(s, release.volume_tokenizer, precision=precision)
                          for s in prepared.series]
                counts.studies += 1
                counts.series += len(series)
                counts.tokens += sum(len(s) for s in series)
                yield prepared, read_by_model(StudyTokens(prepared.description, series), release), \
                    time.perf_counter() - started
            bar.update()  # after the caller ran the model on it


def _finish(context: DistributedContext, counts: BatchSummary, merge: Callable[[], None]) -> BatchSummary:
    """After every rank closed its part: totals, and on rank 0 the merge of the parts."""
    summary = total(counts, context)
    context.barrier()  # every part file is complete
    if context.world_size > 1 and context.rank == 0:
        merge()
    return summary


# --------------------------------------------------------------------------------------------------
# predict-batch: one JSON line per study.

class PredictionLines:
    """``predict-batch`` output: one JSON object per line, ``{"study_id", **prediction}`` or
    ``{"study_id", "error"}``; written as results arrive, so a stopped run keeps what it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("w", encoding="utf-8")

    def add(self, study_id: str, prediction: Prediction) -> None:
        self._write({"study_id": study_id, **prediction.to_dict()})

    def add_error(self, study_id: str, error: str) -> None:
        self._write({"study_id": study_id, "error": error})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def merge(parts: Sequence[Path], out: Path, count: int) -> None:
        """Interleave the lines of the ``parts`` of ``count`` studies into ``out`` and delete the parts: part
        ``r`` holds studies ``r, r + world_size, ...`` (``DistributedContext.shard``), one line each, so line ``i`` of the
        output is the next line of part ``i % world_size``. Streamed: lines with embeddings are large."""
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(part.open(encoding="utf-8")) for part in parts]
            merged = stack.enter_context(out.open("w", encoding="utf-8"))
            for index in range(count):
                merged.write(files[index % len(files)].readline())
        for part in parts:
            part.unlink()


def predict_manifest(manifest: str | Path, out: str | Path, weights: Release | str | Path, *,
                     splits: Iterable[str] | None = None, workers: int = DEFAULT_WORKERS, device: str = "auto",
                     precision: str = "auto", return_embedding: bool = False, progress: bool = True) -> BatchSummary:
    """Predict every study of a manifest into a JSON-lines file, in manifest order (sharded under torchrun).

    Args:
        manifest: a ``manifest.jsonl`` (docs/design.md section 7).
        out: the ``.jsonl`` to write (its folder is created).
        weights: a release folder, ``hf://owner/repo[@revision]`` or a loaded ``Release``.
        splits: only the studies of these splits (default all).
        workers: DataLoader processes that load and cut studies into patches (0: this process).
        device, precision: as for ``prima.predict.predict``; under torchrun CUDA means ``cuda:<LOCAL_RANK>``.
        return_embedding: include each study embedding in its line.
        progress: a tqdm bar on stderr (rank 0 only).

    Each line's ``timings_s``: ``load`` and ``patches`` (worker: read, preprocess + patches + filter),
    ``tokens`` (VQ-VAE encoding) and ``model`` (hViT + heads).

    Raises:
        ManifestError: unreadable manifest or no study selected.
        ReleaseError: the release cannot be loaded or cannot predict.
        ValueError: negative ``workers``; CUDA asked for but absent.
    """
    entries = _selected(manifest, splits, workers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with distributed(device) as context:
        release = ready_release(weights, context.device)
        lines = PredictionLines(part_path(out, context))
        counts = BatchSummary(0, 0, 0, 0, 0.0)
        started = time.perf_counter()
        studies = _study_tokens(context.shard(entries), release, context, workers, precision, progress, counts,
                                "predict-batch")
        for prepared, tokens, tokens_s in studies:
            if tokens is None:
                lines.add_error(prepared.study_id, prepared.error)
                continue
            prediction = predict_tokens(tokens, release, precision=precision, return_embedding=return_embedding)
            prediction.skipped = prepared.skipped
            prediction.timings_s = {**prepared.timings_s, "tokens": round(tokens_s, 4), **prediction.timings_s}
            lines.add(prepared.study_id, prediction)
        lines.close()
        counts.seconds = time.perf_counter() - started
        return _finish(context, counts, lambda: PredictionLines.merge(
            [part_path(out, context, rank) for rank in range(context.world_size)], out, len(entries)))


# --------------------------------------------------------------------------------------------------
# embed: an (N, D) float32 array plus the study ids of its rows.

def ids_path(out: Path) -> Path:
    """The study-id file of an embeddings file: ``embeddings.npy`` -> ``embeddings.ids.json``."""
    return out.with_name(f"{out.stem}.ids.json")


@dataclass
class Embeddings:
    """``embed`` output: ``<out>.npy`` holds one float32 row per study with a result, ``<out stem>.ids.json``
    ``{"study_ids": [row order], "failed": [{"study_id", "error"}], "model": {"name", "revision"}}``."""

    dim: int  # study embedding width
    model: dict  # {"name", "revision"} of the release
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # study id -> (dim,) float32, in arrival order
    failed: dict[str, str] = field(default_factory=dict)  # study id -> error

    def write(self, out: Path, order: Sequence[str] | None = None) -> None:
        """Write the array and its id file; ``order`` (study ids) sorts rows and failures, default arrival order."""
        ids = [i for i in (order if order is not None else self.rows) if i in self.rows]
        failed = [i for i in (order if order is not None else self.failed) if i in self.failed]
        array = np.stack([self.rows[i] for i in ids]) if ids else np.zeros((0, self.dim), np.float32)
        with out.open("wb") as file:  # a file object: np.save would append ".npy" to other names
            np.save(file, array.astype(np.float32, copy=False))
        ids_path(out).write_text(json.dumps({"study_ids": ids,
                                             "failed": [{"study_id": i, "error": self.failed[i]} for i in failed],
                                             "model": self.model}, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, out: Path) -> Embeddings:
        """An embeddings file and its id file as written by :meth:`write`."""
        array = np.load(out)
        doc = json.loads(ids_path(out).read_text(encoding="utf-8"))
        return cls(array.shape[1], doc["model"], dict(zip(doc["study_ids"], array)),
                   {f["study_id"]: f["error"] for f in doc["failed"]})

    @classmethod
    def merge(cls, parts: Sequence[Path], out: Path, order: Sequence[str]) -> None:
        """Write the rows of ``parts`` to ``out`` in ``order`` (study ids) and delete the parts."""
        loaded = [cls.read(part) for part in parts]
        merged = cls(loaded[0].dim, loaded[0].model)
        for part in loaded:
            merged.rows.update(part.rows)
            merged.failed.update(part.failed)
        merged.write(out, order)
        for part in parts:
            part.unlink()
            ids_path(part).unlink()


def embed_manifest(manifest: str | Path, out: str | Path, weights: Release | str | Path, *,
                   splits: Iterable[str] | None = None, workers: int = DEFAULT_WORKERS, device: str = "auto",
                   precision: str = "auto", progress: bool = True) -> BatchSummary:
    """The study embedding (``visual.study_dim`` values, what the task heads read) of every study of a
    manifest, as ``out`` (``.npy``, (N, D) float32, manifest order) plus ``ids_path(out)``.

    Arguments as for :func:`predict_manifest`; the release needs a volume tokenizer but no heads. Studies
    that fail have no row; they are listed under ``failed`` in the id file.
    """
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"the embeddings file must end in .npy, got {str(out)!r}")
    entries = _selected(manifest, splits, workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with distributed(device) as context:
        release = get_release(weights, context.device)
        if release.volume_tokenizer is None:
            raise ReleaseError(f"release {release.path} cannot embed studies: it ships no volume tokenizer")
        dtype = autocast_dtype(context.device, precision)
        embeddings = Embeddings(release.model.visual.study_dim, {"name": release.config.name,
                                                                 "revision": release.revision})
        counts = BatchSummary(0, 0, 0, 0, 0.0)
        started = time.perf_counter()
        studies = _study_tokens(context.shard(entries), release, context, workers, precision, progress, counts,
                                "embed")
        for prepared, tokens, _ in studies:
            if tokens is None:
                embeddings.failed[prepared.study_id] = prepared.error
                continue
            vectors = series_outputs(release, tokens, dtype).vectors
            embedding = study_embedding(release, vectors[None], tokens.description, dtype)[0]
            embeddings.rows[prepared.study_id] = embedding.cpu().numpy()
        embeddings.write(part_path(out, context))
        counts.seconds = time.perf_counter() - started
        return _finish(context, counts, lambda: Embeddings.merge(
            [part_path(out, context, rank) for rank in range(context.world_size)], out, [e.study_id for e in entries]))
