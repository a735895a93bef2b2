"""hViT CLIP training: studies (cached tokens) against their reports, with patient discrimination, and
optionally the task heads trained jointly with the hViT on the labels.

    python -m training.clip --config training/configs/clip-lite.yaml
    torchrun --nproc_per_node 8 -m training.clip --config training/configs/clip-paper.yaml

Loss ``L = clip_weight * (L_clip + patdis_weight * L_patdis) + task_weight * L_task`` (patdis_weight: the model
config's lambda, paper 0.03; the paper trains CLIP alone: task_weight 0). ``L_task`` is the heads' loss on the
study labels: diagnoses and referrals with positive-weighted BCE, priority with cross-entropy, and with
token-pooling heads ``abnormal_weight`` times the BCE of the abnormal logit (abnormal = any diagnosis positive).
A model reading place deviations reads every cached token against ``place_normal``. Every paper
augmentation (``training.study_data.AugmentConfig``): token dropout, series dropout, ``unk`` series names
(and descriptions), filter-threshold jitter, report-item shuffling, abnormal studies up-sampled. The
text tower starts from ``training.report_lm``'s pre-trained GPT-2, the series-name encoder and the
sequence ViT from ``training.series_names``. Validation: retrieval top-1/top-5 among the validation
studies (groups of up to 100), and with heads the abnormal and mean diagnosis AUROC of the validation studies.
Resumes from ``<out>/last.pt``; writes ``<out>/clip.safetensors`` (and ``<out>/heads.safetensors`` with heads,
thresholds at 0: ``training.heads`` chooses them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prima.factory import create_heads, create_model, get_model_config
from prima.losses import ClipLoss, PatientDiscriminationLoss, positive_weights, priority_ce, weighted_bce
from prima.models.batching import StudyBatch
from prima.models.clip import ClipOutput, PrimaCLIP
from prima.models.heads import HeadOutput, TaskHeads
from prima.models.text import ReportTokenizer
from prima.precision import autocast, autocast_dtype
from prima.release import load_weights, module_state
from training.metrics import auroc, retrieval_top_k
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
    label_targets,
    rank_share,
    report_text,
    sampling_weights,
    step_rng,
    study_inputs,
    study_outputs,
    token_studies,
)
from training.token_cache import TokenCache, token_reader

CLIP_FILE = "clip.safetensors"
HEADS_FILE = "heads.safetensors"
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
    place_normal: str | None = None  # place_normal.safetensors from training.place_normal: needed (and only
    #                                   read) when the model config reads place deviations
    clip_weight: float = 1.0  # weight of the CLIP + patient-discrimination losses (0: the task losses alone)
    task_weight: float = 0.0  # weight of the task losses on heads trained jointly (0: CLIP alone, the paper)
    abnormal_weight: float = 1.0  # weight of the abnormal logit's loss within the task losses (token pooling)
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


def parameter_groups(model: nn.Module, config: ClipTrainConfig) -> list[dict]:
    """AdamW groups: decay on weight matrices only; the pre-trained text tower (``text.*``, also nested as in
    ``JointModel``) at ``text_lr_scale``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        text = ".text." in f".{name}"
        decay = parameter.ndim >= 2 and "registers" not in name and "position" not in name
        groups.setdefault((text, decay), []).append(parameter)
    return [{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
             "lr_scale": config.text_lr_scale if text else 1.0}
            for (text, decay), params in sorted(groups.items())]


class JointModel(nn.Module):
    """The CLIP model and the task heads in one module (one DistributedDataParallel wrapper, one checkpoint)."""

    def __init__(self, model: PrimaCLIP, heads: TaskHeads) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, batch: StudyBatch, text_ids: Tensor, text_mask: Tensor) -> tuple[ClipOutput, HeadOutput]:
        output = self.model(batch, text_ids, text_mask)
        return output, self.heads.on_batch(output.study_embedding, output.token_outputs, batch)


def task_loss(output: HeadOutput, diagnoses: Tensor, referrals: Tensor, tiers: Tensor, diagnosis_weight: Tensor,
              referral_weight: Tensor, abnormal_weight: float) -> Tensor:
    """The heads' loss on a batch's labels (module docstring): (N, diagnoses) and (N, referrals) 0/1 targets with
    their positive weights, (N,) tier indices."""
    loss = (weighted_bce(output.diagnosis_logits.float(), diagnoses, diagnosis_weight)
            + weighted_bce(output.referral_logits.float(), referrals, referral_weight)
            + priority_ce(output.priority_logits.float(), tiers))
    if output.abnormal_logits is not None and abnormal_weight:
        abnormal = diagnoses.amax(1).float()
        loss = loss + abnormal_weight * F.binary_cross_entropy_with_logits(output.abnormal_logits.float(), abnormal)
    return loss


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
             dtype: torch.dtype | None, heads: TaskHeads | None = None) -> dict:
    """Retrieval top-1/top-5 (both directions) among the validation studies, in groups of up to 100; with
    heads also their normal-vs-abnormal AUROC (the abnormal logit, else the largest diagnosis logit) and mean
    diagnosis AUROC over the diagnoses with a positive and a negative study."""
    settings = model.config
    outputs = study_outputs(model, [s.tokens() for s in studies], settings, heads=heads,
                            batch_size=config.eval_batch_size, dtype=dtype)
    text = model.embed_texts(tokenizer, [s.entry.report for s in studies], dtype).cpu()
    result = retrieval_top_k(outputs.image_features.numpy(), text.numpy(), ks=(1, 5), group_size=100,
                             seed=config.seed)
    if outputs.heads is not None:
        diagnoses, _, _ = label_targets([s.entry for s in studies], settings.label_space)
        logits = outputs.heads.diagnosis_logits.numpy()
        abnormal = (outputs.heads.abnormal_logits.numpy() if outputs.heads.abnormal_logits is not None
                    else logits.max(1))
        scored = [value for value in (auroc(diagnoses[:, c], logits[:, c]) for c in range(diagnoses.shape[1]))
                  if value is not None]
        result["heads"] = {"abnormal_auroc": auroc(diagnoses.max(1), abnormal),
                           "diagnosis_mean_auroc": float(np.mean(scored)) if scored else None}
    return result


def train(config: ClipTrainConfig) -> Path:
    """Run (or resume) CLIP training; returns the path of ``clip.safetensors``."""
    check_attention_kernel(config.attention)
    if config.clip_weight < 0 or config.task_weight < 0 or config.abnormal_weight < 0:
        raise ValueError("clip_weight, task_weight and abnormal_weight must be >= 0")
    if config.clip_weight == 0 and config.task_weight == 0:
        raise ValueError("clip_weight and task_weight are both 0: nothing to train")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    augment = config.augment()
    cache = TokenCache(config.token_cache, token_reader(get_model_config(config.model), config.place_normal))
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
        heads = create_heads(settings).to(context.device) if config.task_weight > 0 else None
        trained = model if heads is None else JointModel(model, heads)
        targets = [torch.from_numpy(a).to(context.device)
                   for a in label_targets([s.entry for s in train_studies], settings.label_space)]
        diagnosis_weight, referral_weight = positive_weights(targets[0]), positive_weights(targets[1])
        groups = parameter_groups(trained, config)
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
        checkpoint = resume(out / CHECKPOINT_FILE, config, context.device, may_differ=RESUMABLE_CHANGES)
        path = out / CLIP_FILE
        if finished_run(checkpoint, config.steps, path, out / SUMMARY_FILE,
                        *([] if heads is None else [out / HEADS_FILE])):
            return path
        step, seconds_before, history = 0, 0.0, []
        if checkpoint is not None:
            trained.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step, seconds_before, history = checkpoint["step"], checkpoint["seconds"], checkpoint["validation"]
        # without the CLIP loss the text tower gets no gradient, which DDP must be told
        wrapped = (DistributedDataParallel(trained, find_unused_parameters=config.clip_weight == 0)
                   if context.world_size > 1 else trained)
        clip_loss, patdis_loss = ClipLoss(), PatientDiscriminationLoss()
        dtype = autocast_dtype(context.device, config.precision)

        def checkpoint_now() -> None:
            if context.is_main:
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "model": trained.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "seconds": seconds_before + time.perf_counter() - started, "validation": history}, config)

        def evaluate_now() -> dict:  # on the main process: into the history, and the log line's fields
            if not context.is_main:
                return {}
            evaluation = validate(model, val_studies, tokenizer, config, dtype, heads)
            trained.train()
            history.append({"step": step, **evaluation})
            return {**{f"val_{direction}_{k}": v for direction in ("image_to_text", "text_to_image")
                       for k, v in evaluation.get(direction, {}).items()},
                    **{f"val_{k}": v for k, v in evaluation.get("heads", {}).items()}}

        log = RunLog(out, config.steps, step, unit="studies", enabled=context.is_main, description="clip")
        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every if val_studies else None,
                        evaluate=evaluate_now, evaluate_at_time_limit=False, time_limit_min=config.time_limit_min,
                        started=started)
        trained.train()
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
                output, head_output = output if heads is not None else (output, None)
            contrastive = clip_loss(output.image_features.float(), output.text_features.float(), output.logit_scale)
            patient = patdis_loss(output.series_features.float(), output.series_study, output.patdis_logit_scale,
                                  output.series_valid)
            loss = config.clip_weight * (contrastive + settings.patdis_weight * patient)
            task = torch.zeros(())
            if head_output is not None:
                rows = torch.as_tensor(indices, device=context.device)
                task = task_loss(head_output, targets[0][rows], targets[1][rows], targets[2][rows], diagnosis_weight,
                                 referral_weight, config.abnormal_weight)
                loss = loss + config.task_weight * task
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            step += 1
            # every rank's share weighs the same, so the mean over ranks is the global batch's loss
            totals = context.sum([float(loss.detach()), float(contrastive.detach()), float(patient.detach()),
                                  float(task.detach())])
            mean = [value / context.world_size for value in totals]
            log.update(config.batch_size, loss=mean[0], clip=mean[1], patdis=mean[2], task=mean[3],
                       scale=float(output.logit_scale.detach()), lr=lr)
            if loop.end_step(step):
                break
        loop.finish()
        if context.is_main:
            save_file(module_state(model), path, metadata={"format": "pt"})
            if heads is not None:
                save_file(module_state(heads), out / HEADS_FILE, metadata={"format": "pt"})
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
