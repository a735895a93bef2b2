"""Pre-train the series-name encoder: CLIP of series names against the sequence ViT's view of the series.

    python -m training.series_names --config training/configs/series-names-lite.yaml --token-cache CACHE
    torchrun --nproc_per_node 4 -m training.series_names --config ... --token-cache CACHE --model prima-paper

docs/design.md §3: E_sn (``PrimaVisual.series_name_encoder``) is pre-trained with a CLIP objective against the
sequence ViT's view of the series. A pair is one series of a train study of the token cache: its *series view* is
the sequence ViT over its tokens with the ``unk`` name in the name slot (the view must not read the name it is
scored against), its *name view* is E_sn over its name. Two throw-away linear projections take both to
``embed_dim``, where a symmetric CLIP loss (``prima.losses.ClipLoss``, negatives from the global batch) with a
learnable temperature compares them. E_sn and the sequence ViT are trained; the projections are dropped.

Sampling. Many studies share a name (``T2W_FLAIR_TRA``), and a batch holding one name twice would count a true
pair as a negative. A step's global batch is therefore ``batch_size`` *distinct* names (``global_batch``): each
epoch shuffles the distinct train names and cuts that order into batches; each name then brings one of its series,
drawn at random, with at most ``max_tokens`` of its tokens (a random subset). Every draw is seeded by (seed, step)
and the item's place in the global batch, so a resumed run repeats an uninterrupted one and any number of processes
(each taking its share of the global batch) sees the same data. Series whose name encodes to ``unk`` carry no name
to learn and are left out, as are series without tokens.

Validation (every ``eval_every`` steps and at the end) scores the val split's series against its distinct names;
see ``evaluate``. Resumes from ``<out>/last.pt``; finishes by writing ``<out>/series_names.safetensors`` (the
trained weights under ``PrimaVisual``'s key names, read by ``load_series_names``) and ``<out>/series_names.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prima.factory import get_model_config
from prima.losses import ClipLoss
from prima.manifest import manifest_digest, read_manifest
from prima.models.batching import pad_series
from prima.models.clip import MAX_LOGIT_SCALE, PrimaVisual
from prima.models.name_encoder import CLS_ID, UNK_ID, UNK_NAME, encode_names
from prima.precision import PRECISIONS, autocast, autocast_dtype
from prima.release import module_state
from prima.tokens import SeriesTokens
from training.runtime import (
    parse_stage_args,
    print_on_main,
    CHECKPOINT_FILE,
    RunLog,
    StepLoop,
    config_dict,
    distributed,
    finished_run,
    git_commit,
    resume,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)
from training.token_cache import TokenCache, token_reader

SERIES_NAMES_FILE = "series_names.safetensors"
SUMMARY_FILE = "series_names.json"
TRAINED_PREFIXES = ("series_name_encoder.", "sequence_vit.")  # the parts of PrimaVisual this stage trains
TRAIN_SPLIT, VAL_SPLIT = "train", "val"
# Tags of the random streams (numpy SeedSequence words), so name orders, series draws and validation subsets
# never share a stream whatever the seed and step.
_ORDER_STREAM, _DRAW_STREAM, _VAL_STREAM = 0, 1, 2


@dataclass
class SeriesNamesConfig:
    """One series-name pre-training run (``training/configs/series-names-lite.yaml`` sets the shipped one)."""

    manifest: str  # manifest.jsonl: its train split is trained on, its val split scored
    token_cache: str  # token cache folder of the manifest's studies (the one holding index.json)
    out: str  # run folder: checkpoint, log, series_names.json and the trained series_names.safetensors
    model: str = "prima-lite"  # model config whose series-name encoder and sequence ViT are trained
    place_normal: str | None = None  # place_normal.safetensors, for a model config reading place deviations
    max_tokens: int = 256  # tokens kept per series (a random subset of longer series): bounds a step's cost
    steps: int = 3000  # optimiser steps
    batch_size: int = 32  # distinct names (one series each) per step, over all processes together
    lr: float = 1e-4  # peak AdamW learning rate (at 1e-3 the series view collapsed to a constant)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup: int = 100  # linear warm-up steps, then cosine decay to a tenth of the peak
    eval_every: int = 250  # steps between validations (one more at the end)
    log_every: int = 50  # steps between log lines
    checkpoint_every: int = 250  # steps between last.pt saves
    time_limit_min: float | None = None  # stop (validate and save) after this many minutes
    precision: str = "auto"  # auto (bf16 where the hardware has it natively), fp32 or bf16
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    seed: int = 0  # seeds initialisation, name order, series draws and token subsets

    def __post_init__(self) -> None:
        for name in ("max_tokens", "steps", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (a CLIP batch needs negatives), got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0 and warmup >= 0, got {self.lr}, {self.weight_decay}, "
                             f"{self.warmup}")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise ValueError(f"time_limit_min must be positive, got {self.time_limit_min}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# Settings that may change when a run is resumed: they do not change what was computed so far.
RESUMABLE_CHANGES = ("steps", "eval_every", "log_every", "checkpoint_every", "time_limit_min", "device", "threads")


@dataclass
class NameGroups:
    """Series grouped by the name the encoder reads, groups sorted by that name's codes."""

    names: list[str]  # one name per group (every name of a group encodes to the same codes)
    members: list[list[tuple[str, int]]]  # per group, its series as (study id, index in the study's series)

    def __len__(self) -> int:
        return len(self.names)


def group_by_name(cache: TokenCache, study_ids: Iterable[str], max_length: int) -> NameGroups:
    """Group the series of ``study_ids`` by their ``encode_names`` codes, so names the encoder cannot tell
    apart (the same after stripping, or past ``max_length`` bytes) are one name.

    Series whose name encodes to ``unk`` (no name to learn) and series without tokens (no view) are left out.
    """
    groups: dict[tuple[int, ...], tuple[str, list[tuple[str, int]]]] = {}
    for study_id in sorted(study_ids):
        for index, series in enumerate(cache.study_tokens(study_id).series):
            codes = tuple(encode_names([series.name], max_length)[0][0].tolist())
            if codes != (CLS_ID, UNK_ID) and len(series):
                groups.setdefault(codes, (series.name, []))[1].append((study_id, index))
    keys = sorted(groups)
    return NameGroups([groups[key][0] for key in keys], [groups[key][1] for key in keys])


def global_batch(n_names: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The name indices of step ``step``'s global batch: ``batch_size`` distinct names.

    Epoch ``e`` is a permutation of the names seeded by (seed, e), cut into ``n_names // batch_size`` batches
    (the remainder sits that epoch out); so a name comes at most once per epoch, never twice in a batch, and
    the batch is a pure function of (seed, step).

    Raises:
        ValueError: fewer than ``batch_size`` names.
    """
    per_epoch = n_names // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_names} distinct series names cannot fill a batch of {batch_size} distinct names")
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n_names)
    return order[offset * batch_size : (offset + 1) * batch_size]


def capped_features(series: SeriesTokens, max_tokens: int, rng: np.random.Generator) -> Tensor:
    """(min(K, max_tokens), 289) token features of ``series``: a random subset (kept in order) when longer."""
    if len(series) > max_tokens:
        series = series.subset(rng.choice(len(series), max_tokens, replace=False))
    return series.features


def draw_series(cache: TokenCache, members: list[tuple[str, int]], max_tokens: int, seed: int, step: int,
                position: int) -> Tensor:
    """Token features of the series that the name at ``position`` of step ``step``'s global batch brings: one of
    its ``members`` and its token subset, drawn from a stream seeded by (seed, step, position)."""
    rng = np.random.default_rng([seed, _DRAW_STREAM, step, position])
    study_id, index = members[rng.integers(len(members))]
    return capped_features(cache.study_tokens(study_id).series[index], max_tokens, rng)


class SeriesNameClip(nn.Module):
    """The series view and the name view of a batch of series in a joint space.

    Args:
        visual: the hViT whose ``series_name_encoder`` and ``sequence_vit`` are trained. They are shared, not
            copied, under the same attribute names (so their state-dict keys are ``PrimaVisual``'s); its other
            parts are not registered, so the optimiser and DDP see only what this stage trains.
        embed_dim: width of the joint space.
        init_temperature: CLIP temperature at initialisation.
    """

    def __init__(self, visual: PrimaVisual, embed_dim: int, init_temperature: float) -> None:
        super().__init__()
        self.series_name_encoder = visual.series_name_encoder
        self.sequence_vit = visual.sequence_vit
        self.series_proj = nn.Linear(visual.series_dim, embed_dim)
        self.name_proj = nn.Linear(self.series_name_encoder.config.out_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def scale(self) -> Tensor:
        """() 1 / temperature, at most ``MAX_LOGIT_SCALE``."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_series(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """(S, embed_dim) L2-normalised float32 series views of padded tokens (S, T, 289) and their mask (S, T);
        the name slot holds the ``unk`` name's encoding for every series."""
        ids, mask = encode_names([UNK_NAME], self.series_name_encoder.config.max_length)
        unk = self.series_name_encoder(ids.to(tokens.device), mask.to(tokens.device))
        series = self.sequence_vit(tokens, token_mask, unk.expand(tokens.shape[0], -1))
        return F.normalize(self.series_proj(series).float(), dim=-1)

    def encode_name(self, name_ids: Tensor, name_mask: Tensor) -> Tensor:
        """(N, embed_dim) L2-normalised float32 name views of ``encode_names`` codes and mask (N, L)."""
        return F.normalize(self.name_proj(self.series_name_encoder(name_ids, name_mask)).float(), dim=-1)

    def forward(self, tokens: Tensor, token_mask: Tensor, name_ids: Tensor,
                name_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(series views (S, embed_dim), name views (S, embed_dim), logit scale ())."""
        return self.encode_series(tokens, token_mask), self.encode_name(name_ids, name_mask), self.scale()


@torch.no_grad()
def evaluate(model: SeriesNameClip, cache: TokenCache, groups: NameGroups, max_tokens: int, batch_size: int,
             seed: int, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Score every series of ``groups`` against the distinct names of ``groups``.

    ``A[m, n]`` = the mean cosine similarity between the series of name ``m`` and name ``n``. Name->series top-1:
    the fraction of names ``n`` whose best group (argmax over ``m``) is their own; series->name top-1: the
    fraction of groups ``m`` whose best name is their own; loss: the symmetric cross-entropy of
    ``logit_scale * A`` with the diagonal as targets (distinct names, so no true pair is a negative). Token
    subsets are seeded by (seed, series), the same at every validation.

    Args:
        model: the model to score (unwrapped: no collective runs here).
        cache: the token cache the groups index.
        groups: the series to score, by name; at least 2 names.
        max_tokens: tokens kept per series.
        batch_size: series per forward.
        seed: the run's seed.
        dtype: autocast dtype (None: fp32).

    Returns:
        ``{"val_loss", "val_name_to_series_top1", "val_series_to_name_top1"}``.
    """
    if len(groups) < 2:
        raise ValueError(f"validation needs at least 2 distinct series names, got {len(groups)}")
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    series = [(group, study_id, index) for group, members in enumerate(groups.members)
              for study_id, index in members]
    views = []
    for start in range(0, len(series), batch_size):
        tokens, mask = pad_series([
            capped_features(cache.study_tokens(study_id).series[index], max_tokens,
                            np.random.default_rng([seed, _VAL_STREAM, start + offset]))
            for offset, (_, study_id, index) in enumerate(series[start : start + batch_size])])
        with autocast(device, dtype):
            views.append(model.encode_series(tokens.to(device), mask.to(device)))
    ids, mask = encode_names(groups.names, model.series_name_encoder.config.max_length)
    with autocast(device, dtype):
        names = model.encode_name(ids.to(device), mask.to(device))
    group_of = torch.tensor([group for group, _, _ in series], device=device)
    counts = torch.bincount(group_of, minlength=len(groups)).float()
    similarity = torch.cat(views) @ names.T  # (series, names)
    per_group = similarity.new_zeros(len(groups), len(groups)).index_add(0, group_of, similarity) / counts[:, None]
    targets = torch.arange(len(groups), device=device)
    logits = model.scale() * per_group
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    model.train(was_training)
    return {"val_loss": float(loss),
            "val_name_to_series_top1": float((per_group.argmax(0) == targets).float().mean()),
            "val_series_to_name_top1": float((per_group.argmax(1) == targets).float().mean())}


def load_series_names(path: str | Path, visual: PrimaVisual) -> list[str]:
    """Load a ``series_names.safetensors`` into ``visual``: its ``series_name_encoder.*`` and ``sequence_vit.*``
    weights; the rest of ``visual`` is untouched.

    Returns:
        The loaded keys, sorted.

    Raises:
        ValueError: the file holds a key ``visual`` lacks or outside those two prefixes, lacks one of
            ``visual``'s keys under them, or holds a tensor of another shape (another model config).
    """
    state = load_file(str(path))
    expected = {key: value for key, value in visual.state_dict().items() if key.startswith(TRAINED_PREFIXES)}
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(f"{path}: not series-name weights for this model: unexpected keys {unexpected[:5]}, "
                         f"missing keys {missing[:5]}")
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in sorted(state)
                  if state[key].shape != expected[key].shape]
    if mismatched:
        raise ValueError(f"{path}: shapes differ from the model's (file vs model): {', '.join(mismatched[:5])}")
    visual.load_state_dict(state, strict=False)
    return sorted(state)


def parse_args(argv: list[str] | None = None) -> SeriesNamesConfig:
    return parse_stage_args(SeriesNamesConfig, argv, __doc__)


def train(config: SeriesNamesConfig) -> Path:
    """Run (or resume) the pre-training; returns the path of the trained ``series_names.safetensors``.

    Raises:
        ValueError: the train split has fewer distinct names than ``batch_size``, the val split fewer than 2,
            or ``batch_size`` does not split evenly over the processes.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    settings = get_model_config(config.model)
    max_length = settings.vision.sequence.series_name.max_length
    cache = TokenCache(config.token_cache, token_reader(settings, config.place_normal))
    cached = set(cache.study_ids)  # studies the cache could not load are absent from it

    def split_groups(split: str) -> NameGroups:
        studies = read_manifest(config.manifest, [split])
        return group_by_name(cache, [s.study_id for s in studies if s.study_id in cached], max_length)

    train_groups, val_groups = split_groups(TRAIN_SPLIT), split_groups(VAL_SPLIT)
    global_batch(len(train_groups), config.batch_size, config.seed, 0)  # fails early on too few names
    if len(val_groups) < 2:
        raise ValueError(f"the {VAL_SPLIT} split has {len(val_groups)} distinct series names; validation needs 2")
    with distributed(config.device) as context:
        if config.batch_size % context.world_size:
            raise ValueError(f"batch_size {config.batch_size} does not split over {context.world_size} processes")
        share = config.batch_size // context.world_size
        mine = range(context.rank * share, (context.rank + 1) * share)
        dtype = autocast_dtype(context.device, config.precision)

        seed_everything(config.seed)  # identical initial weights on every rank
        model = SeriesNameClip(PrimaVisual(settings.vision), settings.embed_dim, settings.init_temperature)
        model = model.to(context.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        checkpoint = resume(out / CHECKPOINT_FILE, config, context.device, may_differ=RESUMABLE_CHANGES)
        path = out / SERIES_NAMES_FILE
        if finished_run(checkpoint, config.steps, path, out / SUMMARY_FILE):
            return path
        step, seconds_before, train_loss = 0, 0.0, None
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step, seconds_before, train_loss = checkpoint["step"], checkpoint["seconds"], checkpoint["train_loss"]
        wrapped = DistributedDataParallel(model) if context.world_size > 1 else model
        clip_loss = ClipLoss()
        started = time.perf_counter()
        val: dict[str, float] | None = None  # the last validation's scores

        def validate() -> dict[str, float]:
            return evaluate(model, cache, val_groups, config.max_tokens, config.batch_size, config.seed, dtype)

        def validate_on_main() -> dict[str, float]:  # the log line's fields: the scores on the main process
            nonlocal val
            scores = validate() if context.is_main else {}
            val = scores or val
            return scores

        def checkpoint_now() -> None:
            if context.is_main:
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "seconds": seconds_before + time.perf_counter() - started,
                    "train_loss": log.latest("loss", train_loss)}, config)  # the last line's, else the resumed run's

        log = RunLog(out, config.steps, step, unit="series", enabled=context.is_main, description="series names")
        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
                        evaluate=validate_on_main, time_limit_min=config.time_limit_min, started=started)
        model.train()
        while step < config.steps:
            names = global_batch(len(train_groups), config.batch_size, config.seed, step)
            tokens, token_mask = pad_series([draw_series(cache, train_groups.members[names[position]],
                                                         config.max_tokens, config.seed, step, position)
                                             for position in mine])
            name_ids, name_mask = encode_names([train_groups.names[names[position]] for position in mine], max_length)
            lr = warmup_cosine(step, config.steps, config.warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(context.device, dtype):
                series_views, name_views, scale = wrapped(tokens.to(context.device), token_mask.to(context.device),
                                                          name_ids.to(context.device), name_mask.to(context.device))
            loss = clip_loss(series_views, name_views, scale)  # float32 views: the loss runs in float32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # Each rank's loss covers its share of the rows; their mean is the global batch's loss.
            log.update(config.batch_size, loss=context.sum([loss.item()])[0] / context.world_size,
                       logit_scale=scale.item(), lr=lr)
            if loop.end_step(step):
                break
        loop.finish()
        if context.is_main:
            val = val or validate()  # a resumed run with no step left still reports its scores
            save_file({key: value for key, value in module_state(model).items() if key.startswith(TRAINED_PREFIXES)},
                      str(path), metadata={"format": "pt"})
            summary = {"steps": step, "train_loss": log.latest("loss", train_loss), **val,
                       "val_names": len(val_groups), "val_series": sum(map(len, val_groups.members)),
                       "train_names": len(train_groups), "train_series": sum(map(len, train_groups.members)),
                       "seconds": seconds_before + time.perf_counter() - started, "processes": context.world_size,
                       "commit": git_commit(), "manifest_sha256": manifest_digest(config.manifest),
                       "config": config_dict(config)}
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        context.barrier()  # every rank returns once the weights are on disk
    return path


def main(argv: list[str] | None = None) -> None:
    print_on_main(train(parse_args(argv)))


if __name__ == "__main__":
    main()
