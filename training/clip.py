"""hViT CLIP training: studies (cached tokens) against their reports, with patient discrimination.

    python -m training.clip --config training/configs/clip-lite.yaml
    torchrun --nproc_per_node 8 -m training.clip --config training/configs/clip-paper.yaml

Loss ``L = L_clip + patdis_weight * L_patdis`` (the model config's lambda, paper 0.03). Every paper
augmentation (``training.study_data.AugmentConfig``): token dropout, series dropout, ``unk`` series names
(and descriptions), filter-threshold jitter, report-item shuffling, abnormal studies up-sampled. The
text tower starts from ``training.report_lm``'s pre-trained GPT-2, the series-name encoder and the
sequence ViT from ``training.series_names``. Validation: retrieval top-1/top-5 among the validation
studies (groups of up to 100). Resumes from ``<out>/last.pt``; writes ``<out>/clip.safetensors``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from prima.factory import create_model, get_model_config
from prima.losses import ClipLoss, PatientDiscriminationLoss
from prima.models.clip import PrimaCLIP
from prima.models.text import ReportTokenizer
from prima.precision import autocast, autocast_dtype
from prima.release import load_weights, module_state
from training.metrics import retrieval_top_k
from training.report_lm import load_text_tower
from training.runtime import (
    parse_stage_args,
    print_on_main,
    CHECKPOINT_FILE,
    RunLog,
    StepLoop,
    attention_kernel,
    check_attention_kernel,
    config_dict,
    distributed,
    finished_run,
    git_commit,
    resume,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)
from training.series_names import load_series_names
from training.study_data import (
    AugmentConfig,
    global_batch,
    rank_share,
    report_text,
    sampling_weights,
    step_rng,
    study_embeddings,
    study_inputs,
    token_studies,
)
from training.token_cache import TokenCache

CLIP_FILE = "clip.safetensors"
SUMMARY_FILE = "clip.json"


@dataclass
class ClipTrainConfig:
    """One hViT CLIP run (``training/configs/clip-lite.yaml`` sets the lite release's)."""

    manifest: str  # manifest.jsonl of the studies
    token_cache: str  # token cache folder of that manifest (training.token_cache)
    report_tokenizer: str  # report_tokenizer.json from training.report_lm
    out: str  # run folder: checkpoint, log and clip.safetensors
    model: str = "prima-lite"  # model config to train
    text_tower: str | None = None  # text_tower.safetensors from training.report_lm (None: random GPT-2)
    series_names: str | None = None  # series_names.safetensors from training.series_names (None: random)
    steps: int = 2000  # optimiser steps
    batch_size: int = 32  # studies per step, all processes together (the CLIP negatives)
    lr: float = 5e-4  # peak AdamW learning rate
    text_lr_scale: float = 0.2  # the pre-trained text tower learns at this fraction of lr
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, registers and scales)
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of the peak
    token_dropout: float = 0.03  # fraction of a series' tokens dropped (paper ~3%)
    series_dropout: float = 0.08  # chance a series is dropped (paper ~8%)
    unk_name: float = 0.07  # chance a series name becomes unk (paper ~7%)
    unk_description: float = 0.07  # chance the study description becomes unk
    filter_range: tuple[float, float] = (0.03, 0.15)  # background threshold jitter (cache built at or below low)
    max_tokens: int | None = 256  # tokens kept per series per step (random subset; bounds CPU cost); None = all
    shuffle_report_items: bool = True  # report items in a random order (paper)
    abnormal_upsample: float = 3.0  # abnormal studies this many times as likely in a batch (paper x3-4)
    eval_every: int = 250  # steps between validation retrieval evaluations
    eval_batch_size: int = 16  # studies per forward when embedding the validation split
    log_every: int = 20  # steps between log lines
    checkpoint_every: int = 100  # steps between last.pt saves
    time_limit_min: float | None = None  # stop (and save) after this many minutes
    precision: str = "auto"  # auto (bf16 on CUDA and CPUs with native bf16, else fp32), fp32 or bf16
    attention: str = "auto"  # training attention kernel: auto (math on CPU: 1.6x faster steps), torch or math
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads per process
    seed: int = 0  # seeds initialisation, batches and augmentation

    def augment(self) -> AugmentConfig:
        return AugmentConfig(token_dropout=self.token_dropout, series_dropout=self.series_dropout,
                             unk_name=self.unk_name, unk_description=self.unk_description,
                             filter_range=tuple(self.filter_range), max_tokens=self.max_tokens,
                             shuffle_report_items=self.shuffle_report_items)


# Settings that may change when a run is resumed: they do not change what was computed so far.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batch_size", "log_every", "checkpoint_every", "time_limit_min",
                     "device", "threads")


def parameter_groups(model: PrimaCLIP, config: ClipTrainConfig) -> list[dict]:
    """AdamW groups: decay on weight matrices only; the pre-trained text tower at ``text_lr_scale``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        text = name.startswith("text.")
        decay = parameter.ndim >= 2 and "registers" not in name and "position" not in name
        groups.setdefault((text, decay), []).append(parameter)
    return [{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
             "lr_scale": config.text_lr_scale if text else 1.0}
            for (text, decay), params in sorted(groups.items())]


def initial_model(config: ClipTrainConfig) -> PrimaCLIP:
    """The model config's CLIP model with the pre-trained text tower and series-name encoder loaded."""
    model = create_model(get_model_config(config.model))
    if config.text_tower:
        model.text.load_state_dict(load_text_tower(config.text_tower, model.config.text).state_dict())
    if config.series_names:
        load_series_names(config.series_names, model.visual)
    return model


def load_clip(path: str | Path, model_name: str) -> PrimaCLIP:
    """A trained ``clip.safetensors`` in the named model config, in eval mode."""
    model = create_model(get_model_config(model_name))
    load_weights(model, Path(path))
    return model.eval()


@torch.no_grad()
def validate(model: PrimaCLIP, studies, tokenizer: ReportTokenizer, config: ClipTrainConfig,
             dtype: torch.dtype | None) -> dict:
    """Retrieval top-1/top-5 (both directions) among the validation studies, in groups of up to 100."""
    settings = model.config
    _, image = study_embeddings(model, [s.tokens() for s in studies], settings, batch_size=config.eval_batch_size,
                                dtype=dtype)
    text = model.embed_texts(tokenizer, [s.entry.report for s in studies], dtype).cpu()
    return retrieval_top_k(image.numpy(), text.numpy(), ks=(1, 5), group_size=100, seed=config.seed)


def train(config: ClipTrainConfig) -> Path:
    """Run (or resume) CLIP training; returns the path of ``clip.safetensors``."""
    check_attention_kernel(config.attention)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    augment = config.augment()
    cache = TokenCache(config.token_cache)
    train_studies = token_studies(config.manifest, cache, ["train"])
    val_studies = token_studies(config.manifest, cache, ["val"])
    if not train_studies:
        raise ValueError(f"{config.manifest}: no training study has cached tokens in {config.token_cache}")
    probabilities = sampling_weights(train_studies, config.abnormal_upsample)
    tokenizer = ReportTokenizer.load(config.report_tokenizer)
    started = time.perf_counter()
    with distributed(config.device) as context:
        if config.batch_size % context.world_size:
            raise ValueError(f"batch_size {config.batch_size} must divide by the {context.world_size} processes")
        seed_everything(config.seed)  # identical initial weights on every rank
        model = initial_model(config).to(context.device)
        if tokenizer.vocab_size > model.config.text.vocab_size:
            raise ValueError(f"{config.report_tokenizer} has {tokenizer.vocab_size} tokens, the text tower only "
                             f"{model.config.text.vocab_size}")
        settings = model.config
        groups = parameter_groups(model, config)
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
        checkpoint = resume(out / CHECKPOINT_FILE, config, context.device, may_differ=RESUMABLE_CHANGES)
        path = out / CLIP_FILE
        if finished_run(checkpoint, config.steps, path, out / SUMMARY_FILE):
            return path
        step, seconds_before, history = 0, 0.0, []
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step, seconds_before, history = checkpoint["step"], checkpoint["seconds"], checkpoint["validation"]
        wrapped = DistributedDataParallel(model) if context.world_size > 1 else model
        clip_loss, patdis_loss = ClipLoss(), PatientDiscriminationLoss()
        dtype = autocast_dtype(context.device, config.precision)

        def checkpoint_now() -> None:
            if context.is_main:
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "seconds": seconds_before + time.perf_counter() - started, "validation": history}, config)

        def evaluate_now() -> dict:  # on the main process: into the history, and the log line's fields
            if not context.is_main:
                return {}
            evaluation = validate(model, val_studies, tokenizer, config, dtype)
            model.train()
            history.append({"step": step, **evaluation})
            return {f"val_{direction}_{k}": v for direction in ("image_to_text", "text_to_image")
                    for k, v in evaluation.get(direction, {}).items()}

        log = RunLog(out, config.steps, step, unit="studies", enabled=context.is_main, description="clip")
        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every if val_studies else None,
                        evaluate=evaluate_now, evaluate_at_time_limit=False, time_limit_min=config.time_limit_min,
                        started=started)
        model.train()
        while step < config.steps:
            indices = rank_share(global_batch(len(train_studies), config.batch_size, probabilities, config.seed, step),
                                 context.rank, context.world_size)
            studies = [train_studies[i] for i in indices]
            inputs = [study_inputs(s.tokens(), augment, settings.volume_tokenizer, step_rng(config.seed, step, int(i)))
                      for s, i in zip(studies, indices)]
            reports = [report_text(s.entry.report, augment, step_rng(config.seed + 1, step, int(i)))
                       for s, i in zip(studies, indices)]
            batch = model.pack([pairs for pairs, _ in inputs], [description for _, description in inputs])
            ids, mask = tokenizer(reports, settings.text.context_length)
            lr = warmup_cosine(step, config.steps, config.warmup, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with autocast(context.device, dtype), attention_kernel(config.attention, context.device):
                output = wrapped(batch, ids.to(context.device), mask.to(context.device))
            contrastive = clip_loss(output.image_features.float(), output.text_features.float(), output.logit_scale)
            patient = patdis_loss(output.series_features.float(), output.series_study, output.patdis_logit_scale,
                                  output.series_valid)
            loss = contrastive + settings.patdis_weight * patient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            # every rank's share weighs the same, so the mean over ranks is the global batch's loss
            totals = context.sum([float(loss.detach()), float(contrastive.detach()), float(patient.detach())])
            mean = [value / context.world_size for value in totals]
            log.update(config.batch_size, loss=mean[0], clip=mean[1], patdis=mean[2],
                       scale=float(output.logit_scale.detach()), lr=lr)
            if loop.end_step(step):
                break
        loop.finish()
        if context.is_main:
            save_file(module_state(model), path, metadata={"format": "pt"})
            summary = {"steps": step, "processes": context.world_size, "train_studies": len(train_studies),
                       "val_studies": len(val_studies), "validation": history,
                       "seconds": seconds_before + time.perf_counter() - started,
                       "commit": git_commit(), "config": config_dict(config)}
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        context.barrier()
    return path


def parse_args(argv: list[str] | None = None) -> ClipTrainConfig:
    return parse_stage_args(ClipTrainConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    print_on_main(train(parse_args(argv)))


if __name__ == "__main__":
    main()
