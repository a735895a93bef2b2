"""What the inference benchmarks run on: a synthetic DICOM study and a random-weights release."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from prima.factory import create_heads, create_model, create_volume_tokenizer, get_model_config
from prima.models.text import train_report_tokenizer
from prima.release import VOLUME_TOKENIZER_FILE, load_volume_tokenizer, save_release

SHIPPED_LITE = Path(__file__).resolve().parents[1] / "assets" / "volume-tokenizer-lite" / VOLUME_TOKENIZER_FILE


def write_study(folder: Path, series: int) -> Path:
    """A synthetic high-grade glioma study with ``series`` DICOM series (deterministic); its folder."""
    from training.synth.study import generate_study, plan_study
    from training.synth.writers import write_study as write

    # Protocol-blind, so the series drawn do not depend on the phantom's spacing: a cheap coarse plan
    # finds the first study with exactly ``series`` series.
    options = {"protocol_blind": True, "keys": ["tumor_adult_high_grade_glioma"], "max_series": series}
    index = next(i for i in range(200) if len(plan_study(7, i, spacing=6.0, **options).series) == series)
    study = generate_study(7, index, **options)
    write(study, folder, "dicom", uid_seed="bench")
    return folder / "studies" / study.study_id


def write_release(folder: Path, name: str) -> Path:
    """A release of model ``name`` with random weights (prima-lite with the shipped lite volume tokenizer,
    other models with a random one of their own width)."""
    torch.manual_seed(0)
    config = get_model_config(name)
    volume_tokenizer = load_volume_tokenizer(SHIPPED_LITE) if name == "prima-lite" else create_volume_tokenizer(config)
    return save_release(folder, create_model(config), report_tokenizer=train_report_tokenizer(["No abnormality."] * 4, 280),
                        volume_tokenizer=volume_tokenizer, heads=create_heads(config))


@contextlib.contextmanager
def study_workdir(series: int, header: str) -> Iterator[tuple[Path, Path]]:
    """A temporary folder holding the synthetic study (``write_study``); prints ``header`` and its rule
    once the study is written, so the table starts right after the slow part. Yields (folder, study)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        study_path = write_study(workdir / "study", series)
        print(header)
        print("-" * len(header))
        yield workdir, study_path
