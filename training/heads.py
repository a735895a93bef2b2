"""Task heads on frozen study embeddings: diagnoses, referrals and priority.

    python -m training.heads --config training/configs/heads-lite.yaml

The trained CLIP model embeds every train and validation study once (train studies also in
``train_views`` augmented views); three 3-layer MLPs (``prima.models.heads.TaskHeads``) learn on those
embeddings: diagnoses and referrals with positive-weighted BCE (``p_i = neg_i / pos_i``, paper), priority
with cross-entropy. After every epoch each task is scored on validation (mean AUROC over labels; priority:
mean one-vs-rest AUROC over tiers) and the best epoch of each task is kept (paper). Operating thresholds
are then chosen per label on validation (``training.metrics.choose_threshold``, Youden's J by default); a label
with fewer than ``threshold_min_positives`` validation positives keeps logit 0 (calibrated probability 0.5).

Before the thresholds, with ``calibrate`` (the default), the heads' logits are calibrated and the calibration
folded into their weights (``prima.models.heads.LogitCalibration``): diagnosis and referral logits lose the
``log pos_weight`` offset the positive-weighted BCE trains into them (weights of the training labels, as the
training used), then every output (diagnoses, referrals, priority, the abnormal logit) gets one temperature
that minimises its validation NLL. Without it the probabilities a release shows were far too high (the
positive weights are up to 1000 for rare labels: expected calibration error 0.44 on the shipped test split).
Writes ``<out>/heads.safetensors`` (thresholds included) and ``<out>/heads.json``.

Heads trained with the hViT (``training.clip`` with ``task_weight``; token-pooling heads can only be trained
so) are given as ``trained``: they are kept as they are; only their calibration and thresholds are chosen.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from prima.config import PrimaConfig
from prima.factory import create_heads, get_model_config
from prima.losses import positive_weights, priority_ce, weighted_bce
from prima.models.heads import HeadOutput, LogitCalibration, TaskHeads
from prima.precision import autocast_dtype
from prima.release import load_weights, module_state
from training.clip import load_clip
from training.metrics import auroc, calibration, choose_threshold
from training.runtime import config_dict, git_commit, parse_stage_args, print_on_main, seed_everything
from training.study_data import AugmentConfig, label_targets, study_embeddings, study_outputs, token_studies
from training.token_cache import TokenCache, token_reader

HEADS_FILE = "heads.safetensors"
SUMMARY_FILE = "heads.json"
TASKS = ("diagnosis", "referral", "priority")


@dataclass
class HeadsTrainConfig:
    """One task-head run (``training/configs/heads-lite.yaml`` sets the lite release's)."""

    manifest: str  # manifest.jsonl of the studies
    token_cache: str  # token cache folder of that manifest
    clip: str  # clip.safetensors from training.clip (frozen)
    out: str  # run folder: heads.safetensors, heads.json
    trained: str | None = None  # heads.safetensors trained jointly by training.clip: only thresholds are chosen
    place_normal: str | None = None  # place_normal.safetensors, for a model config reading place deviations
    model: str = "prima-lite"  # model config of the CLIP weights and the heads
    train_views: int = 4  # embeddings per training study: one as inference sees it + augmented views
    series_dropout: float = 0.08  # augmentation of the extra views (as in CLIP training)
    unk_name: float = 0.07  # chance a series name becomes unk in an extra view
    token_dropout: float = 0.03  # fraction of tokens dropped in an extra view
    epochs: int = 60  # passes over the training embeddings
    batch_size: int = 64  # embeddings per step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    threshold_rule: str = "youden"  # how operating thresholds are chosen on validation: youden or f1
    threshold_min_positives: int = 5  # fewer validation positives: the label keeps logit 0 (calibrated p 0.5)
    calibrate: bool = True  # fold the positive weighting's offset and a validation temperature into each output
    embed_batch_size: int = 16  # studies per forward when embedding
    precision: str = "auto"  # precision of the frozen hViT forward (prima.precision)
    device: str = "cpu"  # cpu or cuda (the heads train in seconds; one process)
    threads: int | None = None  # torch CPU threads
    seed: int = 0  # seeds initialisation, batches and the augmented views


def task_scores(output: HeadOutput, diagnoses: np.ndarray, referrals: np.ndarray,
                tiers: np.ndarray) -> dict[str, float]:
    """Mean AUROC of each task over its scorable labels (priority: one-vs-rest per tier)."""
    scores = {}
    for task, logits, targets in (("diagnosis", output.diagnosis_logits, diagnoses),
                                  ("referral", output.referral_logits, referrals),
                                  ("priority", output.priority_logits, np.eye(output.priority_logits.shape[1])[tiers])):
        values = [auroc(targets[:, c], logits[:, c].numpy()) for c in range(targets.shape[1])]
        scored = [v for v in values if v is not None]
        scores[task] = float(np.mean(scored)) if scored else float("nan")
    return scores


def choose_thresholds(heads: TaskHeads, output: HeadOutput, diagnoses: np.ndarray, referrals: np.ndarray,
                      rule: str, min_positives: int) -> None:
    """Set the heads' operating thresholds from their validation outputs (``choose_threshold`` per label)."""
    for name, logits, labels in (("diagnosis", output.diagnosis_logits, diagnoses),
                                 ("referral", output.referral_logits, referrals)):
        getattr(heads, f"{name}_thresholds").copy_(torch.tensor(
            [choose_threshold(labels[:, c], logits[:, c].numpy(), rule=rule, min_positives=min_positives)
             for c in range(labels.shape[1])]))


TEMPERATURE_BOUNDS = (0.05, 20.0)  # searched for the temperature with the least validation NLL


def fit_calibrations(output: HeadOutput, train_labels: tuple[np.ndarray, np.ndarray],
                     val_labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, LogitCalibration]:
    """Each output's ``LogitCalibration`` (module docstring) from the heads' validation ``output``.

    Args:
        output: the heads' outputs on the validation studies.
        train_labels: (N, diagnoses) and (N, referrals) 0/1 training labels, whose positive weights the
            training used.
        val_labels: the validation studies' diagnoses, referrals and (M,) tier indices.
    """
    val_d, val_r, val_t = (torch.from_numpy(a) for a in val_labels)
    binary = {"diagnosis": (output.diagnosis_logits, val_d, train_labels[0]),
              "referral": (output.referral_logits, val_r, train_labels[1])}
    if output.abnormal_logits is not None:  # trained with plain BCE: no offset
        binary["abnormal"] = (output.abnormal_logits, val_d.amax(1), None)
    fitted = {}
    for name, (logits, targets, train) in binary.items():
        shift = torch.zeros(()) if train is None else torch.log(positive_weights(torch.from_numpy(train)))
        logits, targets = logits.double(), targets.double()

        def nll(temperature: float) -> float:
            calibrated = LogitCalibration(shift, temperature).apply(logits)
            return float(F.binary_cross_entropy_with_logits(calibrated, targets))
        fitted[name] = LogitCalibration(shift.float(), _best_temperature(nll))
    priority = output.priority_logits.double()
    fitted["priority"] = LogitCalibration(torch.zeros(()), _best_temperature(
        lambda temperature: float(F.cross_entropy(priority / temperature, val_t))))
    return fitted


def _best_temperature(nll: Callable[[float], float]) -> float:
    return float(minimize_scalar(nll, bounds=TEMPERATURE_BOUNDS, method="bounded").x)


def calibrate(heads: TaskHeads, output: HeadOutput, train_labels: tuple[np.ndarray, np.ndarray],
              val_labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[HeadOutput, dict]:
    """Fit the calibrations (``fit_calibrations``), fold them into ``heads``; returns the validation output
    calibrated and a summary (each output's temperature, validation ECE before and after)."""
    fitted = fit_calibrations(output, train_labels, val_labels)
    for name, fit in fitted.items():
        heads.calibrate(name, fit)
    calibrated = HeadOutput(*(None if logits is None else fitted[name].apply(logits) for name, logits in (
        ("diagnosis", output.diagnosis_logits), ("referral", output.referral_logits),
        ("priority", output.priority_logits), ("abnormal", output.abnormal_logits))))
    val_d, val_r, _ = val_labels
    summary = {name: {"temperature": fit.temperature} for name, fit in fitted.items()}
    for name, before, after, targets in (
            ("diagnosis", output.diagnosis_logits, calibrated.diagnosis_logits, val_d),
            ("referral", output.referral_logits, calibrated.referral_logits, val_r),
            ("abnormal", output.abnormal_logits, calibrated.abnormal_logits, val_d.max(1))):
        if before is not None:
            summary[name] |= {"val_ece_before": calibration(targets, torch.sigmoid(before).numpy())["ece"],
                              "val_ece_after": calibration(targets, torch.sigmoid(after).numpy())["ece"]}
    return calibrated, summary


def embed(model, studies, config: HeadsTrainConfig, views: int) -> tuple[torch.Tensor, list[int]]:
    """Study embeddings: view 0 without augmentation (what inference sees), then augmented views; returns
    the stacked embeddings and the study index of each row."""
    settings = model.config
    dtype = autocast_dtype(next(model.parameters()).device, config.precision)
    tokens = [s.tokens() for s in studies]
    augment = AugmentConfig(token_dropout=config.token_dropout, series_dropout=config.series_dropout,
                            unk_name=config.unk_name, unk_description=config.unk_name, shuffle_report_items=False)
    rows, owners = [], []
    for view in tqdm(range(views), desc="embedding studies", unit="view", leave=False):
        if view == 0:
            embedding, _ = study_embeddings(model, tokens, settings, batch_size=config.embed_batch_size, dtype=dtype)
        else:
            embedding, _ = study_embeddings(model, tokens, settings, augment=augment, seed=config.seed + view,
                                            batch_size=config.embed_batch_size, dtype=dtype)
        rows.append(embedding)
        owners += list(range(len(studies)))
    return torch.cat(rows), owners


def train(config: HeadsTrainConfig) -> Path:
    """Train the heads; returns the path of ``heads.safetensors``."""
    if config.threshold_rule not in ("youden", "f1"):
        raise ValueError(f"threshold_rule must be youden or f1, got {config.threshold_rule!r}")
    if config.train_views < 1 or config.epochs < 1 or config.batch_size < 1:
        raise ValueError("train_views, epochs and batch_size must be >= 1")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path, summary_path = out / HEADS_FILE, out / SUMMARY_FILE
    if path.exists() and summary_path.exists() and (
            json.loads(summary_path.read_text(encoding="utf-8"))["config"] == config_dict(config)):
        return path  # trained before with this config (the run is deterministic)
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    settings = get_model_config(config.model)
    if settings.heads.diagnosis_pool == "tokens" and config.trained is None:
        raise ValueError(f"model {config.model!r} pools diagnoses from token scores: its heads train with the hViT "
                         "(training.clip with task_weight > 0); give them as trained")
    space = settings.label_space
    cache = TokenCache(config.token_cache, token_reader(settings, config.place_normal))
    train_studies = token_studies(config.manifest, cache, ["train"])
    val_studies = token_studies(config.manifest, cache, ["val"])
    if not train_studies or not val_studies:
        raise ValueError(f"need cached train and val studies, got {len(train_studies)} and {len(val_studies)}")
    model = load_clip(config.clip, config.model).to(config.device)
    if config.trained is not None:
        return thresholds_only(config, settings, model, train_studies, val_studies, started)
    train_x, owners = embed(model, train_studies, config, config.train_views)
    val_x, _ = embed(model, val_studies, config, 1)
    train_d, train_r, train_t = (a[owners] for a in label_targets([s.entry for s in train_studies], space))
    val_d, val_r, val_t = label_targets([s.entry for s in val_studies], space)

    seed_everything(config.seed)
    heads = create_heads(settings)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    diagnosis_weight = positive_weights(torch.from_numpy(train_d))
    referral_weight = positive_weights(torch.from_numpy(train_r))
    targets = [torch.from_numpy(a) for a in (train_d, train_r, train_t)]
    generator = torch.Generator().manual_seed(config.seed)
    best = {task: (-1.0, -1, None) for task in TASKS}
    history = []
    heads.train()
    for epoch in tqdm(range(config.epochs), desc="heads", unit="epoch"):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            output = heads(train_x[rows])
            loss = (weighted_bce(output.diagnosis_logits, targets[0][rows], diagnosis_weight)
                    + weighted_bce(output.referral_logits, targets[1][rows], referral_weight)
                    + priority_ce(output.priority_logits, targets[2][rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        heads.eval()
        with torch.no_grad():
            scores = task_scores(heads(val_x), val_d, val_r, val_t)
        heads.train()
        history.append({"epoch": epoch + 1, "loss": float(loss.detach()),
                        **{f"val_{k}_auroc": v for k, v in scores.items()}})
        for task in TASKS:
            if scores[task] > best[task][0]:
                best[task] = (scores[task], epoch + 1, copy.deepcopy(getattr(heads, task).state_dict()))
    for task in TASKS:  # a task that validation cannot score (one class only) keeps its last epoch
        if best[task][2] is not None:
            getattr(heads, task).load_state_dict(best[task][2])

    heads.eval()
    with torch.no_grad():
        output = heads(val_x)
    calibration_summary = None
    if config.calibrate:  # each study repeats train_views times: the positive weights the training used
        output, calibration_summary = calibrate(heads, output, (train_d, train_r), (val_d, val_r, val_t))
    choose_thresholds(heads, output, val_d, val_r, config.threshold_rule, config.threshold_min_positives)
    return save_heads(heads, config, {task: best[task][:2] for task in TASKS}, len(train_studies),
                      len(val_studies), history, calibration_summary, started)


def save_heads(heads: TaskHeads, config: HeadsTrainConfig, best: dict[str, tuple[float, int | None]],
               train_count: int, val_count: int, history: list[dict], calibration_summary: dict | None,
               started: float) -> Path:
    """Write ``heads.safetensors`` and the run summary (each task's best validation AUROC and its epoch,
    None for heads trained with the hViT; the calibration's summary); returns the weights' path."""
    out = Path(config.out)
    save_file(module_state(heads), out / HEADS_FILE, metadata={"format": "pt"})
    summary = {"best": {task: {"val_auroc": score, "epoch": epoch} for task, (score, epoch) in best.items()},
               "trained_with_the_hvit": config.trained, "calibration": calibration_summary,
               "train_studies": train_count, "val_studies": val_count, "history": history,
               "seconds": time.perf_counter() - started, "commit": git_commit(), "config": config_dict(config)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return out / HEADS_FILE


def thresholds_only(config: HeadsTrainConfig, settings: PrimaConfig, model, train_studies, val_studies,
                    started: float) -> Path:
    """Heads trained with the hViT (``config.trained``): their calibration and thresholds chosen on validation,
    nothing trained."""
    heads = load_heads(config.trained, settings).to(config.device)
    dtype = autocast_dtype(torch.device(config.device), config.precision)
    output = study_outputs(model, [s.tokens() for s in val_studies], settings, heads=heads,
                           batch_size=config.embed_batch_size, dtype=dtype).heads
    val_d, val_r, val_t = label_targets([s.entry for s in val_studies], settings.label_space)
    scores = task_scores(output, val_d, val_r, val_t)
    calibration_summary = None
    if config.calibrate:
        labels = label_targets([s.entry for s in train_studies], settings.label_space)
        output, calibration_summary = calibrate(heads, output, labels[:2], (val_d, val_r, val_t))
    choose_thresholds(heads, output, val_d, val_r, config.threshold_rule, config.threshold_min_positives)
    return save_heads(heads, config, {task: (scores[task], None) for task in TASKS}, len(train_studies),
                      len(val_studies), [], calibration_summary, started)


def load_heads(path: str | Path, settings: PrimaConfig) -> TaskHeads:
    """Trained ``heads.safetensors`` (thresholds included) for the model config ``settings``, in eval mode."""
    heads = create_heads(settings)
    load_weights(heads, Path(path))
    return heads.eval()


def parse_args(argv: list[str] | None = None) -> HeadsTrainConfig:
    return parse_stage_args(HeadsTrainConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    print_on_main(train(parse_args(argv)))


if __name__ == "__main__":
    main()
