"""Train the VQ-VAE volume tokenizer on the foreground patches of a study manifest.

    python -m training.tokenizer.train --manifest data/synth/manifest.jsonl --config prima-lite --out runs/tok
    torchrun --nproc_per_node 4 -m training.tokenizer.train --manifest ... --config prima-paper --out runs/tok

Each batch gets one random axis permutation (so one of the 32x32x4 / 32x4x32 / 4x32x32 shapes: the
paper's bucketing by shape) and random flips. Loss = L1 reconstruction + commitment. Resumes from
``<out>/last.pt``; finishes by writing ``tokenizer.safetensors`` and ``tokenizer_config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from prima.config import TokenizerConfig, config_from_dict
from prima.factory import get_model_config
from prima.models.vqvae import VQVAE, VQVAEOutput
from prima.release import load_weights, module_state
from training.tokenizer.augment import orient_patches, random_orientation
from training.tokenizer.data import cached_patch_set

WEIGHTS_FILE = "tokenizer.safetensors"
CONFIG_FILE = "tokenizer_config.json"


def tokenizer_loss(output: VQVAEOutput, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, L1 reconstruction): the VQ-VAE objective, L1 + the quantiser's commitment term."""
    reconstruction = (output.reconstruction.float() - target.float()).abs().mean()
    return reconstruction + output.commitment_loss, reconstruction


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    """The named model config's tokenizer section (if any), then the command-line overrides."""
    base = get_model_config(args.config).tokenizer if args.config else TokenizerConfig()
    overrides = {"channels": args.channels, "res_layers": args.res_layers, "codebook_size": args.codebook_size}
    return dataclasses.replace(base, **{key: value for key, value in overrides.items() if value is not None})


def save_tokenizer(model: VQVAE, out: Path) -> None:
    """Weights (codebook included) as safetensors plus the config as JSON: what a release ships."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(module_state(model), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n", encoding="utf-8")


def tokenizer_from_config(config_doc: dict) -> VQVAE:
    """An untrained :class:`VQVAE` from a parsed ``tokenizer_config.json`` (or a checkpoint's config)."""
    return VQVAE(config_from_dict(TokenizerConfig, config_doc, "tokenizer"))


def load_tokenizer(folder: Path | str, device: str | torch.device = "cpu") -> VQVAE:
    """A :class:`VQVAE` from a folder holding ``tokenizer.safetensors`` and ``tokenizer_config.json``."""
    folder = Path(folder)
    model = tokenizer_from_config(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    load_weights(model, folder / WEIGHTS_FILE)
    return model.to(device).eval()


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.jsonl (SPEC section 7)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, patch cache)")
    parser.add_argument("--config", default=None, help="model config whose tokenizer section to use, e.g. prima-lite")
    parser.add_argument("--channels", type=int, default=None, help="override the tokenizer width")
    parser.add_argument("--res-layers", type=int, default=None, help="override residual blocks per level")
    parser.add_argument("--codebook-size", type=int, default=None, help="override the number of codes")
    parser.add_argument("--splits", nargs="+", default=["train"], help="manifest splits to train on")
    parser.add_argument("--fraction-range", type=float, nargs=2, default=(0.02, 0.3),
                        help="per-series minimum foreground fraction drawn in this range (filter augmentation)")
    parser.add_argument("--steps", type=int, default=4000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32, help="patches per step per process")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between last.pt saves")
    parser.add_argument("--time-limit-min", type=float, default=None, help="stop (and save) after this many minutes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation")
    return parser.parse_args(argv)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) training; returns the folder holding the final tokenizer files."""
    rank, world, local_rank = _distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" and world > 1 else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = tokenizer_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "patches_train.npz"
    if rank == 0:
        cached_patch_set(args.manifest, args.splits, cache, config, tuple(args.fraction_range), args.seed)
    if world > 1:
        dist.barrier()
    patches = torch.from_numpy(cached_patch_set(args.manifest, args.splits, cache, config).patches)

    torch.manual_seed(args.seed)
    model = VQVAE(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    checkpoint_path = args.out / "last.pt"
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        if rank == 0:
            print(f"resumed from {checkpoint_path} at step {step}", flush=True)
    wrapped = DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model

    sampler = DistributedSampler(
        range(len(patches)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    batches_per_epoch = len(sampler) // args.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"{len(patches)} patches over {world} process(es) do not fill one batch of {args.batch_size}")

    def batches_from(start: int):
        epoch, offset = divmod(start, batches_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            batch_sampler = BatchSampler(sampler, args.batch_size, drop_last=True)
            yield from itertools.islice(batch_sampler, offset, None)
            epoch, offset = epoch + 1, 0

    def save_checkpoint() -> None:
        if rank != 0:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": dataclasses.asdict(config),
            "args": {key: str(value) for key, value in vars(args).items()},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        torch.save(state, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    log = (args.out / "log.jsonl").open("a", encoding="utf-8") if rank == 0 else None
    started = time.time()
    model.train()
    running = {"loss": 0.0, "l1": 0.0, "perplexity": 0.0, "used": 0.0, "n": 0}
    for indices in batches_from(step):
        if step >= args.steps:
            break
        # Same augmentation on every rank for a step, so resuming reproduces it.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        permutation, flips = random_orientation(generator)
        batch = orient_patches(patches[indices].to(device, torch.float32), permutation, flips)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        output = wrapped(batch)
        loss, l1 = tokenizer_loss(output, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        for key, value in (("loss", loss), ("l1", l1), ("perplexity", output.perplexity), ("used", output.used_codes)):
            running[key] += float(value.detach())
        running["n"] += 1
        out_of_time = args.time_limit_min is not None and time.time() - started > 60 * args.time_limit_min
        if world > 1:  # every rank must stop at the same step
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps or out_of_time):
            record = {
                "step": step,
                "lr": learning_rate(step - 1, args),
                **{key: running[key] / running["n"] for key in ("loss", "l1", "perplexity", "used")},
                "elapsed_s": round(time.time() - started, 1),
            }
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            running = dict.fromkeys(running, 0.0)
            running["n"] = 0
        if step % args.checkpoint_every == 0:
            save_checkpoint()
        if out_of_time:
            if rank == 0:
                print(f"time limit reached at step {step}", flush=True)
            break
    save_checkpoint()
    if rank == 0:
        save_tokenizer(model, args.out)
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return args.out


def main(argv: list[str] | None = None) -> None:
    out = train(parse_args(argv))
    if int(os.environ.get("RANK", 0)) == 0:
        print(out)


if __name__ == "__main__":
    main()
