"""Writers: a ``SyntheticStudy`` on disk as a health-system export would be, plus its manifest line.

Layout under the output folder (paths in the manifest are relative to it)::

    manifest.jsonl                       one study per line (docs/design.md §7), in study order
    studies/<study_id>/<NN>_<name>.nii.gz       one int16 NIfTI per series   (--format nifti)
    studies/<study_id>/<NN>_<name>/IM0000.dcm   one DICOM folder per series  (--format dicom)
    masks/<study_id>/<NN>_<name>.nii.gz  uint8 lesion masks on that series' grid, 4D: one channel per
                                         positive diagnosis, channel order in the manifest

Masks live outside ``studies/`` so that loading a study folder with ``prima.io.load_study`` sees
only images. Normal studies have no mask files and ``lesion_masks == {}``. A metadata-only data set
(``write_dataset(metadata_only=True)``) has only ``manifest.jsonl`` and ``synth_config.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from prima.io import write_dicom_series
from prima.labels import default_label_space
from prima.manifest import KNOWN_SPLITS, LesionMask, SeriesEntry, StudyEntry, manifest_line, read_manifest
from training.synth.pathology import check_primary, primary_weights
from training.synth.shift import check_shift
from training.synth.study import (
    DEFAULT_PROTOCOL_BLIND,
    PROTOCOL_BLIND_SPLITS,
    SPLIT_FRACTIONS,
    SimulatedSeries,
    StudyPlan,
    SyntheticStudy,
    generate_study,
    is_protocol_blind,
    plan_study,
    split_table,
    stratified_primaries,
    study_split,
)

FORMATS = ("nifti", "dicom")
# gzip of the .nii.gz files: a series is mostly Rician noise, which LZ77 string matching cannot shorten,
# so run-length + Huffman coding (Z_RLE) writes it in ~60% of the time of level-1 gzip (nibabel's default)
# for ~3% more bytes per data set, and compresses masks (runs of zeros) better than level 1.
NIFTI_GZIP_LEVEL = 1
NIFTI_GZIP_STRATEGY = zlib.Z_RLE


def series_stem(position: int, name: str) -> str:
    """File-system-safe, ordered stem of a series, e.g. ``03_AX_T2_FLAIR``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "series"
    return f"{position:02d}_{slug}"


def series_path(root: Path, study_id: str, position: int, name: str, fmt: str) -> Path:
    """Where ``write_study`` puts a series: a NIfTI file or a DICOM folder under ``root/studies/<study_id>``."""
    stem = series_stem(position, name)
    return root / "studies" / study_id / (f"{stem}.nii.gz" if fmt == "nifti" else stem)


def to_int16(volume: np.ndarray) -> np.ndarray:
    """Scanner-like stored values: rounded, clipped to the int16 range."""
    return np.clip(np.round(volume), -32768, 32767).astype(np.int16)


def fortran_order(array: np.ndarray, block: int = 32) -> np.ndarray:
    """``array`` as a Fortran-ordered copy (first axis fastest, as NIfTI stores voxels).

    numpy's own reordering copy walks the source with its largest stride and runs ~6x slower than
    moving ``block``-wide slabs, each of which fits in the cache; writing a C-ordered array with
    nibabel makes the same slow copy slice by slice.
    """
    out = np.empty(array.shape[::-1], array.dtype)  # C order of the reversed shape = F order of the shape
    for start in range(0, array.shape[0], block):
        out[..., start:start + block] = array[start:start + block].T
    return out.T


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(fortran_order(array), affine)
    image.header.set_xyzt_units("mm")
    # Both forms carry the grid so any reader sees the same orientation.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    gzip = zlib.compressobj(NIFTI_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, strategy=NIFTI_GZIP_STRATEGY)
    with open(path, "wb") as f:
        f.write(gzip.compress(image.to_bytes()))
        f.write(gzip.flush())


def _write_masks(series: SimulatedSeries, path: Path) -> list[str] | None:
    keys = [k for k, m in series.masks.items() if m.any()]
    if not keys:
        return None
    stack = np.stack([series.masks[k] for k in keys], axis=-1).astype(np.uint8)
    _save_nifti(stack, series.affine, path)
    return keys


def write_study(study: SyntheticStudy, out_dir: str | Path, fmt: str = "nifti", *,
                uid_seed: str | None = None) -> StudyEntry:
    """Write ``study``'s series and masks under ``out_dir`` and return its manifest entry.

    Args:
        study: the generated study.
        out_dir: data-set root (created if missing).
        fmt: ``"nifti"`` or ``"dicom"``.
        uid_seed: makes DICOM UIDs a deterministic function of it (e.g. ``"seed0"``); random when None.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    root = Path(out_dir)
    study_dir = root / "studies" / study.study_id
    mask_dir = root / "masks" / study.study_id
    study_dir.mkdir(parents=True, exist_ok=True)
    series_entries, lesion_masks = [], {}
    study_uid = None
    if fmt == "dicom":
        study_uid = generate_uid() if uid_seed is None else generate_uid(entropy_srcs=[uid_seed, study.study_id])
    for position, series in enumerate(study.series, start=1):
        stem = series_stem(position, series.name)
        stored = to_int16(series.volume)
        path = series_path(root, study.study_id, position, series.name, fmt)
        if fmt == "nifti":
            _save_nifti(stored, series.affine, path)
        else:
            write_dicom_series(
                stored, series.affine, path,
                series_description=series.name,
                study_description=study.study_description,
                series_number=position,
                study_uid=study_uid,
                patient_id=study.patient_id,
                through_axis=2,
                uid_seed=None if uid_seed is None else f"{uid_seed}-{study.study_id}-{position}",
                extra_tags=_acquisition_tags(series),
            )
        series_entries.append(SeriesEntry(series.name, path, series.spec.sequence, series.spec.plane))
        if any(m.any() for m in series.masks.values()):
            mask_dir.mkdir(parents=True, exist_ok=True)
            mask_path = mask_dir / f"{stem}.nii.gz"
            lesion_masks[series.name] = LesionMask(mask_path, tuple(_write_masks(series, mask_path)))
    return manifest_entry(study, tuple(series_entries), lesion_masks)


def _acquisition_tags(series: SimulatedSeries) -> dict[str, object]:
    spec = series.spec
    tags: dict[str, object] = {
        "RepetitionTime": round(spec.tr_ms, 2),
        "EchoTime": round(spec.te_ms, 2),
        "SliceThickness": spec.slice_thickness_mm,
        "SpacingBetweenSlices": spec.slice_spacing,
        "FlipAngle": spec.flip_deg,
        "ProtocolName": series.name,
    }
    if spec.ti_ms:
        tags["InversionTime"] = round(spec.ti_ms, 1)
    return tags


def _round_floats(value):
    """JSON-ready plain values with floats rounded to 4 decimals (stable, readable manifests)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round_floats(v) for v in value]
    if isinstance(value, np.generic):
        return _round_floats(value.item())
    if isinstance(value, np.ndarray):
        return _round_floats(value.tolist())
    return value


def manifest_entry(study: SyntheticStudy | StudyPlan, series: tuple[SeriesEntry, ...],
                   lesion_masks: dict[str, LesionMask] | None) -> StudyEntry:
    """The manifest entry of ``study`` (``prima.manifest``), with the engine's findings, protocol,
    vendor and protocol-blind flag kept as extra fields.

    Args:
        study: a generated study, or a plan (metadata only).
        series: its series entries, in study order.
        lesion_masks: series name -> mask file ({} for no lesion; None when not written).

    Returns:
        The entry ``prima.manifest.manifest_line`` writes.
    """
    return StudyEntry(
        study_id=study.study_id,
        patient_id=study.patient_id,
        split=study.split,
        study_description=study.study_description,
        series=series,
        report=study.report,
        labels=dict(study.labels),
        priority=study.priority,
        referrals=tuple(study.referrals),
        lesion_masks=lesion_masks,
        subject=_round_floats(study.subject),
        extra=_round_floats({
            "findings": [
                {"key": f.key, "location": f.location, "size_mm": float(f.size_mm), "attributes": f.attributes}
                for f in study.findings
            ],
            "protocol": study.protocol,
            "vendor": study.vendor,
            "protocol_blind": study.protocol_blind,
        }),
    )


def plan_entry(plan: StudyPlan, out_dir: str | Path, fmt: str = "nifti") -> StudyEntry:
    """The manifest entry of a planned study without writing anything: series paths name the files
    ``write_study`` would write, and lesion masks are unknown (None).

    Args:
        plan: from ``study.plan_study``.
        out_dir: data-set root the paths are under.
        fmt: ``"nifti"`` or ``"dicom"`` (the paths' form).

    Returns:
        The entry; its metadata, labels and report equal those of the generated study.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    series = tuple(SeriesEntry(s.name, series_path(Path(out_dir), plan.study_id, position, s.name, fmt),
                               s.spec.sequence, s.spec.plane)
                   for position, s in enumerate(plan.series, start=1))
    return manifest_entry(plan, series, None)


def write_one(seed: int, index: int, out: str, fmt: str, spacing: float, max_series: int, protocol_blind: str,
              metadata_only: bool, balance: float = 0.0, shift: float = 0.0,
              primary: Sequence[str] | None = None, primary_key: str | None = None,
              split_fractions: Sequence[float] | None = None) -> StudyEntry:
    """Generate and write study ``index`` (or only plan it); returns its manifest entry (runs in a worker)."""
    blind = is_protocol_blind(protocol_blind, study_split(seed, index, split_fractions))
    settings = dict(protocol_blind=blind, spacing=spacing, max_series=max_series, balance=balance, shift=shift,
                    primary=primary, primary_key=primary_key, split_fractions=split_fractions)
    if metadata_only:
        return plan_entry(plan_study(seed, index, **settings), out, fmt)
    return write_study(generate_study(seed, index, **settings), out, fmt, uid_seed=f"seed{seed}")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker() -> None:
    # One process per core: BLAS threads of their own would only oversubscribe the cores.
    threadpool_limits(1)


def write_dataset(
    n: int, out: str | Path, *, seed: int = 0, fmt: str = "nifti", workers: int | None = None, spacing: float = 1.5,
    max_series: int = 8, protocol_blind: str = DEFAULT_PROTOCOL_BLIND, metadata_only: bool = False,
    progress: bool = True, balance: float = 0.0, shift: float = 0.0, primary: Sequence[str] | None = None,
    stratify: bool = False, split_fractions: Sequence[float] | None = None, only_split: str | None = None,
    first: int | None = None,
) -> Path:
    """Generate ``n`` studies under ``out`` with ``workers`` spawned processes; returns the manifest path.

    Studies are written as workers finish them and listed in the manifest in study order; each study
    depends only on ``(seed, index)`` (and ``n`` when stratified), so the output is identical for any
    number of workers.

    Args:
        n: number of studies.
        out: data-set root (created if missing).
        seed: data-set seed.
        fmt: ``"nifti"`` or ``"dicom"``.
        workers: worker processes (1 = in this process); None = one per available core
            (``available_cores``), never more than ``n``.
        spacing: phantom voxel size in mm.
        max_series: most series per study (2..8).
        protocol_blind: which splits are drawn protocol-blind (``study.PROTOCOL_BLIND_SPLITS``): "heldout"
            (val and test; train follows the indication), "all" or "none".
        metadata_only: write only ``manifest.jsonl`` (``plan_entry``: no images or masks; series paths
            name the files a full run would write), e.g. to measure ``training.metadata_baseline``.
        progress: show a progress bar.
        balance: label balancing of the primary diagnosis, 0 (clinical frequencies) .. 1 (uniform over
            the 52 labels); see ``pathology.primary_weights``.
        shift: 0 (training ranges) .. ``shift.MAX_SHIFT``: pose, size, deformation, contrast, bias, noise
            and resolution drawn beyond the training ranges, for a held-out test set (``study.plan_study``).
        primary: draw every study's primary diagnosis among these keys, no normal studies (e.g. a test set of
            focal lesions for LIME localisation); None draws over all labels.
        stratify: share the primary diagnoses out over each split's abnormal studies in proportion to their
            weights instead of drawing them independently (``study.stratified_primaries``): every label has
            positives in every split that has as many abnormal studies as there are labels.
        split_fractions: train, val and test fractions (``study.split_table``); None keeps 0.8, 0.1, 0.1. A larger
            test fraction gives a modest data set a test split with several positives of every label.

    Returns:
        The path of ``manifest.jsonl``.

    Raises:
        ValueError: a bad ``n``, ``workers``, ``fmt``, ``protocol_blind``, ``balance``, ``shift``, ``primary`` or
            ``split_fractions``, ``only_split`` or ``first``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if only_split is not None and only_split not in KNOWN_SPLITS:
        raise ValueError(f"only_split must be one of {KNOWN_SPLITS}, got {only_split!r}")
    if first is not None and first < 1:
        raise ValueError(f"first must be >= 1, got {first}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if protocol_blind not in PROTOCOL_BLIND_SPLITS:
        raise ValueError(f"protocol_blind must be one of {sorted(PROTOCOL_BLIND_SPLITS)}, got {protocol_blind!r}")
    primary_weights(balance)  # validates balance
    check_shift(shift)
    check_primary(primary)
    primary = None if primary is None else list(primary)
    split_fractions = None if split_fractions is None else [fraction for _, fraction in split_table(split_fractions)]
    chosen = [i for i in range(n) if only_split is None or study_split(seed, i, split_fractions) == only_split][:first]
    if not chosen:
        raise ValueError(f"the {n}-study data set has no {only_split} study")
    workers = min(available_cores() if workers is None else workers, len(chosen))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    config = {"n": n, "seed": seed, "format": fmt, "spacing": spacing, "max_series": max_series,
              "protocol_blind": protocol_blind, "metadata_only": metadata_only, "balance": balance, "shift": shift}
    if primary is not None:  # recorded only when used, so earlier data sets keep their config
        config["primary"] = primary
    if stratify:
        config["stratify"] = True
    if split_fractions is not None:
        config["split_fractions"] = split_fractions
    if only_split is not None:
        config["only_split"] = only_split
    if first is not None:
        config["first"] = first
    (root / "synth_config.json").write_text(json.dumps(config, indent=2) + "\n")
    manifest = root / "manifest.jsonl"
    primary_keys = (stratified_primaries(seed, n, balance=balance, primary=primary, split_fractions=split_fractions)
                    if stratify else [None] * n)
    args = [(seed, i, str(root), fmt, spacing, max_series, protocol_blind, metadata_only, balance, shift, primary,
             primary_keys[i], split_fractions) for i in chosen]
    with manifest.open("w", encoding="utf-8") as f, tqdm(total=len(args), unit="study", disable=not progress) as bar:
        if workers == 1:
            with threadpool_limits(1):  # as in the workers, so every worker count gives the same bytes
                for a in args:
                    f.write(manifest_line(write_one(*a), root))
                    bar.update()
            return manifest
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
            # Bounded look-ahead keeps memory flat; results are written in study order.
            pending = {}
            next_submit = 0
            for index in range(len(args)):
                while next_submit < len(args) and next_submit < index + 2 * workers:
                    pending[next_submit] = pool.submit(write_one, *args[next_submit])
                    next_submit += 1
                f.write(manifest_line(pending.pop(index).result(), root))
                f.flush()
                bar.update()
    return manifest


def label_counts(manifest: str | Path) -> dict[str, dict[str, int]]:
    """Positive studies per label per split of a manifest, e.g. to check a release has enough of each.

    Args:
        manifest: a ``manifest.jsonl`` (read with ``prima.manifest.read_manifest``).

    Returns:
        ``{split: {diagnosis key: positives}}`` with every one of the 52 keys (0 included), splits in
        ``study.SPLIT_FRACTIONS`` order (then any others), only splits that have studies.
    """
    keys = default_label_space().diagnosis_keys
    counts: dict[str, dict[str, int]] = {}
    for study in read_manifest(manifest):
        split = counts.setdefault(study.split, dict.fromkeys(keys, 0))
        for key in keys:
            split[key] += int(study.labels.get(key, 0) > 0)
    order = [name for name, _ in SPLIT_FRACTIONS]
    return {split: counts[split] for split in sorted(counts, key=lambda s: (order.index(s) if s in order
                                                                            else len(order), s))}


def label_count_summary(counts: dict[str, dict[str, int]], fewest: int = 5) -> list[str]:
    """One line per split of ``label_counts``: minimum and median positives per label and the rarest labels.

    Args:
        counts: from ``label_counts``.
        fewest: how many of the rarest labels to name (ties broken by label order).

    Returns:
        Lines such as ``train: positives per label min 3, median 41; fewest: spine_syrinx 3, ...``.

    Raises:
        ValueError: ``fewest`` < 0.
    """
    if fewest < 0:
        raise ValueError(f"fewest must be >= 0, got {fewest}")
    lines = []
    for split, per_label in counts.items():
        values = np.array(list(per_label.values()))
        rarest = sorted(per_label.items(), key=lambda item: item[1])[:fewest]  # stable: label order on ties
        named = ", ".join(f"{key} {count}" for key, count in rarest)
        lines.append(f"{split}: positives per label min {int(values.min())}, median {np.median(values):g}"
                     + (f"; fewest: {named}" if named else ""))
    return lines
