"""Report tokenizer and GPT-2 pre-training: byte-level BPE on the training reports, then next-token prediction.

    python -m training.report_lm --config training/configs/report-lm-lite.yaml
    torchrun --nproc_per_node 4 -m training.report_lm --config training/configs/report-lm-lite.yaml

The paper's text encoder is a GPT-2 pre-trained on the report corpus before CLIP training updates it. This
stage trains the tokenizer on the ``splits`` reports (never val/test; kept across resumes, keyed by the
corpus and vocabulary settings), then the model config's ``TextTower`` with next-token cross-entropy (EOS is a
target, padding is not), the report items shuffled per sample like in CLIP training. Validation perplexity
on the ``val`` reports every ``eval_every`` steps and at the end. Resumes from ``<out>/last.pt``; writes
``<out>/report_tokenizer.json``, ``<out>/text_tower.safetensors`` (``TextTower`` state dict keys, read
with :func:`load_text_tower`) and a ``<out>/report_lm.json`` summary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prima.config import TextConfig, config_from_dict
from prima.distributed import DistributedContext
from prima.errors import ConfigError, ReleaseError
from prima.factory import get_model_config
from prima.manifest import manifest_digest, read_manifest
from prima.models.text import ReportTokenizer, TextTower, train_report_tokenizer
from prima.precision import PRECISIONS, autocast, autocast_dtype
from prima.release import REPORT_TOKENIZER_FILE, load_weights, module_state
from training.report_items import shuffle_items
from training.runtime import (
    parse_stage_args,
    print_on_main,
    CHECKPOINT_FILE,
    RunLog,
    StepLoop,
    cache_key,
    config_dict,
    distributed,
    finished_run,
    git_commit,
    resume,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)

TEXT_TOWER_FILE = "text_tower.safetensors"
TOKENIZER_KEY_FILE = "report_tokenizer.key.json"
SUMMARY_FILE = "report_lm.json"
_TEXT_CONFIG_KEY = "text_config"  # safetensors metadata key holding the TextConfig the weights were built with
_PROVENANCE_KEY = "provenance"  # safetensors metadata key holding how the weights were made
MIN_VOCAB_SIZE = 258  # the 256 bytes and the two special tokens


@dataclass
class ReportLMConfig:
    """One report tokenizer + GPT-2 pre-training run (``training/configs/report-lm-lite.yaml`` sets the lite one)."""

    manifest: str  # manifest.jsonl whose reports are the corpus
    out: str  # run folder: report_tokenizer.json, checkpoint, log, text_tower.safetensors, report_lm.json
    model: str = "prima-lite"  # model config whose text section (GPT-2 size, vocabulary, context) is trained
    splits: tuple[str, ...] = ("train",)  # manifest splits the tokenizer and the LM learn from (never val/test)
    vocab_size: int | None = None  # BPE vocabulary target (default: the model's text.vocab_size; may end smaller)
    min_frequency: int = 2  # a BPE merge needs at least this many occurrences
    shuffle_items: bool = True  # present each report's items in a random order (the CLIP augmentation)
    steps: int = 2000  # optimiser steps
    batch_size: int = 32  # reports per step, all processes together
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay (weight matrices only, not biases and norms)
    clip_grad_norm: float = 1.0  # clip the gradient norm to this (0: no clipping)
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of the peak
    eval_every: int = 250  # steps between validation perplexity evaluations (also done at the end)
    log_every: int = 50  # steps between log lines
    checkpoint_every: int = 250  # steps between last.pt saves
    time_limit_min: float | None = None  # stop (and save) after this many minutes
    precision: str = "auto"  # auto (bf16 on CUDA and CPUs with native bf16, else fp32), fp32 or bf16
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads per process (default: torch's choice)
    seed: int = 0  # seeds initialisation, batch order and item shuffling


# Settings that may change when a run is resumed: they do not change what was computed so far.
RESUMABLE_CHANGES = ("steps", "eval_every", "log_every", "checkpoint_every", "time_limit_min", "precision", "device",
                     "threads")


def check_config(config: ReportLMConfig, text: TextConfig) -> None:
    """Refuse settings that cannot train.

    Raises:
        ValueError: a split outside train, a vocabulary out of [258, text.vocab_size], or a count,
            rate or precision out of range.
    """
    if not config.splits or any(split != "train" for split in config.splits):
        raise ValueError(f"splits must be train only (val and test stay unseen), got {list(config.splits)}")
    vocab_size = text.vocab_size if config.vocab_size is None else config.vocab_size
    if not MIN_VOCAB_SIZE <= vocab_size <= text.vocab_size:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {text.vocab_size}] (the {config.model} text "
                         f"tower's vocabulary), got {vocab_size}")
    for name in ("min_frequency", "steps", "batch_size", "eval_every", "log_every", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("weight_decay", "clip_grad_norm", "warmup"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.lr <= 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.time_limit_min is not None and config.time_limit_min <= 0:
        raise ValueError(f"time_limit_min must be > 0 or None, got {config.time_limit_min}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")


def report_corpus(manifest: str | Path, splits: tuple[str, ...]) -> list[str]:
    """The non-empty reports of ``splits`` in manifest order (an empty report teaches nothing but EOS)."""
    return [study.report for study in read_manifest(manifest, splits) if study.report.strip()]


def run_tokenizer(out: Path, reports: list[str], vocab_size: int, min_frequency: int) -> ReportTokenizer:
    """The run's report tokenizer: ``<out>/report_tokenizer.json`` when it was trained from this corpus with
    these settings, else trained now (deterministic) and saved with its key beside it.

    Raises:
        ConfigError: the saved tokenizer is another corpus's and the run already has a checkpoint,
            whose model learnt that tokenizer's ids.
    """
    corpus_sha256 = hashlib.sha256(json.dumps(reports).encode("utf-8")).hexdigest()
    key = cache_key(corpus_sha256=corpus_sha256, vocab_size=vocab_size, min_frequency=min_frequency)
    path, key_path = out / REPORT_TOKENIZER_FILE, out / TOKENIZER_KEY_FILE
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text(encoding="utf-8"))["key"] == key:
        return ReportTokenizer.load(path)
    if (out / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{out}: its checkpoint was trained with another report tokenizer (the corpus or the "
                          "vocabulary settings changed); use a new run folder")
    tokenizer = train_report_tokenizer(reports, vocab_size, min_frequency)
    tokenizer.save(path)
    key_path.write_text(json.dumps({"key": key, "corpus_sha256": corpus_sha256, "reports": len(reports),
                                    "vocab_size": vocab_size, "min_frequency": min_frequency}) + "\n",
                        encoding="utf-8")
    return tokenizer


class ReportBatches:
    """The global batch of reports at each step, a pure function of (seed, step).

    Samples are read from an endless stream of epochs, each a seeded permutation of the corpus, ``batch_size``
    per step (a batch may span two epochs); each sample's items are shuffled with a generator seeded by
    (seed, step, its place in the batch).
    """

    def __init__(self, reports: list[str], batch_size: int, seed: int, shuffle: bool) -> None:
        self.reports, self.batch_size, self.seed, self.shuffle = reports, batch_size, seed, shuffle
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)  # a batch touches at most two epochs

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.reports))

    def __call__(self, step: int) -> list[str]:
        batch = []
        for slot in range(self.batch_size):
            epoch, offset = divmod(step * self.batch_size + slot, len(self.reports))
            report = self.reports[self._order(epoch)[offset]]
            if self.shuffle:
                report = shuffle_items(report, np.random.default_rng([self.seed, 1, step, slot]))
            batch.append(report)
        return batch


class NextTokenLoss(nn.Module):
    """Summed next-token cross-entropy of a ``TextTower`` (a module, so DDP sees the forward pass)."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (N, L) from ``ReportTokenizer``. Returns the float32 sum over every real token after the
        first (EOS included) of -log p(token | the tokens before it)."""
        logits = self.tower.lm_logits(ids, mask)[:, :-1].float()
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")


def target_count(mask: Tensor) -> int:
    """How many tokens of a batch are predicted: every real token but each report's first."""
    return int(mask[:, 1:].sum())


def parameter_groups(tower: TextTower, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on biases and layer norms (GPT-2 practice)."""
    matrices = [p for p in tower.parameters() if p.ndim >= 2]
    vectors = [p for p in tower.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(objective: NextTokenLoss, tokenizer: ReportTokenizer, reports: list[str], batch_size: int,
             context: DistributedContext, dtype: torch.dtype | None) -> float | None:
    """Mean next-token loss over every target token of ``reports`` (each rank takes its share), None without
    reports."""
    mine = context.shard(reports)
    total, count = 0.0, 0
    objective.eval()
    for start in range(0, len(mine), batch_size):
        ids, mask = tokenizer(mine[start : start + batch_size], objective.tower.config.context_length)
        with autocast(context.device, dtype):
            total += float(objective(ids.to(context.device), mask.to(context.device)))
        count += target_count(mask)
    objective.train()
    total, count = context.sum([total, count])
    return total / count if count else None


def _val_fields(val_loss: float | None) -> dict[str, float]:
    return {} if val_loss is None else {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}


def save_text_tower(tower: TextTower, path: Path, provenance: dict) -> Path:
    """Write the tower's state dict (its own keys) with its text config and ``provenance`` in the metadata."""
    save_file(module_state(tower), path, metadata={
        "format": "pt", _TEXT_CONFIG_KEY: json.dumps(dataclasses.asdict(tower.config)),
        _PROVENANCE_KEY: json.dumps(provenance)})
    return path


def load_text_tower(path: str | Path, config: TextConfig, device: torch.device | str = "cpu") -> TextTower:
    """A pre-trained ``text_tower.safetensors`` as a ``TextTower`` of ``config`` (in training mode: the CLIP
    stage keeps training it).

    Raises:
        ReleaseError: the file is missing or corrupted, or was trained with another GPT-2 shape, vocabulary or
            context (dropout may differ).
    """
    path = Path(path)
    tower = TextTower(config)
    load_weights(tower, path)
    with safe_open(str(path), framework="pt") as weights:
        saved = (weights.metadata() or {}).get(_TEXT_CONFIG_KEY)
    if saved is not None:
        trained = config_from_dict(TextConfig, json.loads(saved), f"{path}:{_TEXT_CONFIG_KEY}")
        if dataclasses.replace(trained, dropout=config.dropout) != config:
            raise ReleaseError(f"{path} was trained as {trained}, not as {config}")
    return tower.to(device)


def parse_args(argv: list[str] | None = None) -> ReportLMConfig:
    return parse_stage_args(ReportLMConfig, argv, __doc__)


def train(config: ReportLMConfig) -> Path:
    """Run (or resume) the stage; returns the path of the pre-trained ``text_tower.safetensors``.

    Raises:
        ValueError: bad settings (:func:`check_config`), no report in ``splits``, or a global batch that the
            processes cannot share evenly.
        ConfigError: the run folder holds a run of another config or another tokenizer.
    """
    text = get_model_config(config.model).text
    check_config(config, text)
    vocab_size = text.vocab_size if config.vocab_size is None else config.vocab_size
    reports = report_corpus(config.manifest, config.splits)
    if not reports:
        raise ValueError(f"{config.manifest}: no non-empty report in splits {list(config.splits)}")
    val_reports = report_corpus(config.manifest, ("val",))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    with distributed(config.device) as context:
        if config.batch_size % context.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {context.world_size} processes")
        share = config.batch_size // context.world_size
        if context.is_main:  # one process trains the tokenizer; the others read what it saved
            run_tokenizer(out, reports, vocab_size, config.min_frequency)
        context.barrier()
        tokenizer = run_tokenizer(out, reports, vocab_size, config.min_frequency)

        seed_everything(config.seed)  # identical initial weights on every rank
        tower = TextTower(text).to(context.device)
        objective = NextTokenLoss(tower)
        optimizer = torch.optim.AdamW(parameter_groups(tower, config.weight_decay), lr=config.lr)
        checkpoint = resume(out / CHECKPOINT_FILE, config, context.device, may_differ=RESUMABLE_CHANGES)
        path = out / TEXT_TOWER_FILE
        if finished_run(checkpoint, config.steps, path, out / SUMMARY_FILE):
            return path
        step, train_loss, seconds = 0, None, 0.0
        if checkpoint is not None:
            tower.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step, train_loss, seconds = checkpoint["step"], checkpoint["train_loss"], checkpoint["seconds"]
        wrapped = DistributedDataParallel(objective) if context.world_size > 1 else objective
        dtype = autocast_dtype(context.device, config.precision)
        batches = ReportBatches(reports, config.batch_size, config.seed, config.shuffle_items)

        started = time.perf_counter()
        val_loss, evaluated_at = None, None

        def checkpoint_now() -> None:
            if context.is_main:
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "model": tower.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "train_loss": log.latest("loss", train_loss),  # the last log line's, else the resumed run's
                    "seconds": seconds + time.perf_counter() - started}, config)

        def validate() -> dict[str, float]:  # every rank: each scores its share of the reports
            nonlocal val_loss, evaluated_at
            val_loss, evaluated_at = evaluate(objective, tokenizer, val_reports, share, context, dtype), step
            return _val_fields(val_loss)

        log = RunLog(out, config.steps, step, unit="tokens", enabled=context.is_main, description="report LM")
        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every, evaluate=validate,
                        time_limit_min=config.time_limit_min, started=started)
        objective.train()
        while step < config.steps:
            # Every rank tokenises the whole global batch: its share of the rows, and the global target count
            # that makes the loss the mean over all the batch's tokens however the rows are split.
            ids, mask = tokenizer(batches(step), text.context_length)
            targets = target_count(mask)
            rows = slice(context.rank * share, (context.rank + 1) * share)
            lr = warmup_cosine(step, config.steps, config.warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(context.device, dtype):
                loss_sum = wrapped(ids[rows].to(context.device), mask[rows].to(context.device))
            optimizer.zero_grad(set_to_none=True)
            (loss_sum * context.world_size / targets).backward()  # DDP averages the ranks' gradients
            if config.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(tower.parameters(), config.clip_grad_norm)
            optimizer.step()
            step += 1
            loss = context.sum([float(loss_sum.detach())])[0] / targets
            log.update(targets, loss=loss, perplexity=math.exp(loss), lr=lr)
            if loop.end_step(step):
                break
        loop.finish()
        if evaluated_at != step:  # resumed a run that had already finished
            val_loss = evaluate(objective, tokenizer, val_reports, share, context, dtype)
        if context.is_main:
            provenance = {"commit": git_commit(), "manifest_sha256": manifest_digest(config.manifest), "steps": step,
                          "processes": context.world_size, "config": config_dict(config)}
            save_text_tower(tower, path, provenance)
            train_loss = log.latest("loss", train_loss)
            summary = {**provenance, "train_loss": train_loss,
                       "train_perplexity": None if train_loss is None else math.exp(train_loss),
                       "val_loss": val_loss, "val_perplexity": None if val_loss is None else math.exp(val_loss),
                       "tokenizer_vocab_size": tokenizer.vocab_size, "text_vocab_size": text.vocab_size,
                       "corpus_reports": len(reports), "val_reports": len(val_reports),
                       "train_seconds": seconds + time.perf_counter() - started}
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        context.barrier()
    return path


def main(argv: list[str] | None = None) -> None:
    print_on_main(train(parse_args(argv)))


if __name__ == "__main__":
    main()
