"""Train the VQ-VAE volume tokenizer on the foreground patches of a study manifest.

    python -m training.volume_tokenizer.train --config training/configs/volume-tokenizer-lite.yaml \
        --manifest data/synth/manifest.jsonl --out runs/volume-tokenizer
    torchrun --nproc_per_node 4 -m training.volume_tokenizer.train --config ... --model prima-paper

Each batch gets one random axis permutation (so one of the 32x32x4 / 32x4x32 / 4x32x32 shapes: the
paper's bucketing by shape) and random flips. Loss = L1 reconstruction + commitment. Resumes from
``<out>/last.pt`` (which records this config); finishes by writing ``<out>/volume_tokenizer.safetensors``,
the one-file form ``prima.release.load_volume_tokenizer`` reads and a release ships.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from prima.config import PrimaConfig
from prima.factory import create_volume_tokenizer, get_model_config
from prima.manifest import manifest_digest
from prima.models.vqvae import VQVAEOutput
from prima.release import VOLUME_TOKENIZER_FILE, save_volume_tokenizer
from training.runtime import (
    parse_stage_args,
    print_on_main,
    CHECKPOINT_FILE,
    RunLog,
    StepLoop,
    config_dict,
    distributed,
    git_commit,
    resume,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)
from training.volume_tokenizer.augment import orient_patches, random_orientation
from training.volume_tokenizer.data import cached_patch_set


@dataclass
class VolumeTokenizerTrainConfig:
    """One volume tokenizer training run (``training/configs/volume-tokenizer-lite.yaml`` sets the shipped one)."""

    manifest: str  # manifest.jsonl of the studies to train on
    out: str  # run folder: checkpoint, log, patch cache and the trained volume_tokenizer.safetensors
    model: str = "prima-lite"  # model config whose preprocessing and volume_tokenizer section are trained
    channels: int | None = None  # override the volume tokenizer's CNN width
    res_layers: int | None = None  # override the residual blocks per resolution level
    codebook_size: int | None = None  # override the number of codes
    splits: tuple[str, ...] = ("train",)  # manifest splits to train on
    fraction_range: tuple[float, float] = (0.02, 0.3)  # per-series background threshold drawn in this range
    steps: int = 4000  # optimiser steps
    batch_size: int = 32  # patches per step per process
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of the peak
    log_every: int = 50  # steps between log lines
    checkpoint_every: int = 250  # steps between last.pt saves
    time_limit_min: float | None = None  # stop (and save) after this many minutes
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    seed: int = 0  # seeds initialisation, data order and augmentation


# Settings that may change when a run is resumed: they do not change what was computed so far.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "time_limit_min", "device", "threads")


def tokenizer_loss(output: VQVAEOutput, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, L1 reconstruction): the VQ-VAE objective, L1 + the quantiser's commitment term."""
    reconstruction = (output.reconstruction.float() - target.float()).abs().mean()
    return reconstruction + output.commitment_loss, reconstruction


def model_config(config: VolumeTokenizerTrainConfig) -> PrimaConfig:
    """The named model config with the run's volume tokenizer overrides applied."""
    base = get_model_config(config.model)
    overrides = {"channels": config.channels, "res_layers": config.res_layers, "codebook_size": config.codebook_size}
    tokenizer = dataclasses.replace(base.volume_tokenizer,
                                    **{key: value for key, value in overrides.items() if value is not None})
    return dataclasses.replace(base, volume_tokenizer=tokenizer)


def parse_args(argv: list[str] | None = None) -> VolumeTokenizerTrainConfig:
    return parse_stage_args(VolumeTokenizerTrainConfig, argv, __doc__)


def train(config: VolumeTokenizerTrainConfig) -> Path:
    """Run (or resume) training; returns the path of the trained ``volume_tokenizer.safetensors``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    model_settings = model_config(config)
    with distributed(config.device) as context:
        if context.is_main:  # one process extracts; the others read the cache it wrote
            cached_patch_set(config.manifest, list(config.splits), out, model_settings, config.fraction_range,
                             config.seed)
        context.barrier()
        patch_set = cached_patch_set(config.manifest, list(config.splits), out, model_settings, config.fraction_range,
                                     config.seed)
        patches = torch.from_numpy(patch_set.patches)

        seed_everything(config.seed)  # identical initial weights on every rank
        model = create_volume_tokenizer(model_settings).to(context.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        checkpoint = resume(out / CHECKPOINT_FILE, config, context.device, may_differ=RESUMABLE_CHANGES)
        step = 0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step = checkpoint["step"]
        # The EMA codebook is synchronised inside the quantiser, so DDP need not broadcast buffers.
        wrapped = DistributedDataParallel(model, forward_sync_buffers=False) if context.world_size > 1 else model

        sampler = DistributedSampler(range(len(patches)), num_replicas=context.world_size, rank=context.rank,
                                     shuffle=True, seed=config.seed, drop_last=True)
        batches_per_epoch = len(sampler) // config.batch_size
        if batches_per_epoch == 0:
            raise ValueError(f"{len(patches)} patches over {context.world_size} process(es) do not fill one batch "
                             f"of {config.batch_size}")

        def batches_from(start: int):
            epoch, offset = divmod(start, batches_per_epoch)
            while True:
                sampler.set_epoch(epoch)
                yield from itertools.islice(BatchSampler(sampler, config.batch_size, drop_last=True), offset, None)
                epoch, offset = epoch + 1, 0

        def checkpoint_now() -> None:
            if context.is_main:
                save_checkpoint(out / CHECKPOINT_FILE, {"model": model.state_dict(),
                                                        "optimizer": optimizer.state_dict(), "step": step}, config)

        log = RunLog(out, config.steps, step, unit="patches", enabled=context.is_main,
                     description="volume tokenizer")
        model.train()
        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, time_limit_min=config.time_limit_min)
        for indices in batches_from(step):
            if step >= config.steps:
                break
            # Same augmentation on every rank for a step, so resuming reproduces it.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            permutation, flips = random_orientation(generator)
            batch = orient_patches(patches[indices].to(context.device, torch.float32), permutation, flips)
            lr = warmup_cosine(step, config.steps, config.warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            output = wrapped(batch)
            loss, l1 = tokenizer_loss(output, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            log.update(len(indices) * context.world_size, loss=loss.detach(), l1=l1.detach(),
                       perplexity=output.perplexity, used=output.used_codes, lr=lr)
            if loop.end_step(step):
                break
        loop.finish()
        path = out / VOLUME_TOKENIZER_FILE
        if context.is_main:
            save_volume_tokenizer(model, path, provenance={
                "commit": git_commit(), "manifest_sha256": manifest_digest(config.manifest), "steps": step,
                "processes": context.world_size, "config": config_dict(config)})
    return path


def main(argv: list[str] | None = None) -> None:
    print_on_main(train(parse_args(argv)))


if __name__ == "__main__":
    main()
