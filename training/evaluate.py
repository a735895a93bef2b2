"""Evaluate a release on a manifest split: ``python -m training.evaluate RELEASE MANIFEST [--split test]``.

Every study goes through the inference path (``prima.io`` -> ``prima.tokens.tokenize_study`` ->
``prima.predict.predict_tokens``), then again with every series name and the study description replaced
by ``unk``. Written to ``--out`` (default ``<release>/evaluation``): ``eval.json``, ``eval.md`` and
``reliability.png``. What is measured (docs/training.md):

- diagnoses: per-label AUROC with a 95% bootstrap CI, the mean; the same for the ``unk``-names run; the
  metadata-only baseline (``training.metadata_baseline``, fitted on the manifest's train split) on the
  same split; zero-shot AUROC per label from the text prompt "<display name>." (``zero_shot_prompt``); calibration;
- referrals: per-referral AUROC; priority: correlation of the normalised priority score with the tier,
  confusion matrix; retrieval top-1 / top-5 in groups of 100;
- LIME localisation: for positive studies of focal diagnoses with lesion masks, whether one of the top-3
  LIME tokens of the series the model relies on most (``prima.explain.series_contribution``) overlaps
  the lesion (the paper's top-3 accuracy);
- TPR disparity across subgroups (vendor, sex, age group) in the equal-opportunity form;
- the diagnostic ladder (``training.ladder``: lone-token lesion probe, probes of the frozen study embedding, the
  heads' normal-vs-abnormal AUROC) and how often an urgent positive diagnosis comes with the lowest priority.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prima.errors import StudyLoadError
from prima.explain import explain, series_contribution
from prima.manifest import StudyEntry, load_entry_study, read_manifest
from prima.models.clip import zero_shot_prompt
from prima.models.name_encoder import UNK_NAME
from prima.precision import autocast, autocast_dtype
from prima.predict import Prediction, predict_tokens, ready_release
from prima.release import PLACE_NORMAL_FILE, Release
from prima.tokens import StudyTokens, tokenize_study
from training.ladder import abnormal_auroc, embedding_probe, token_lesion_probe
from training.lesion_masks import lesion_mask_on_grid, token_lesion_overlap
from training.metadata_baseline import metadata_baseline
from training.metrics import (
    calibration,
    equal_opportunity,
    interval_text,
    lime_top_k_hit,
    markdown_table,
    per_label_auroc,
    per_label_calibration,
    priority_correlation,
    reliability_diagram,
    retrieval_top_k,
)
from training.runtime import cache_key, file_digest, git_commit, machine_description, weights_digest
from training.study_data import label_targets

EVAL_JSON, EVAL_MARKDOWN, RELIABILITY_PNG = "eval.json", "eval.md", "reliability.png"
ALL_SPLITS = "all"  # --split all: every study of the manifest (a test-only set such as a shifted one)

# Diagnoses with a circumscribed lesion, the ones LIME localisation is scored on (diffuse or global
# findings such as atrophy, ventriculomegaly, edema, mass effect or small vessel disease have no "inside").
FOCAL_DIAGNOSES = (
    "cyst_arachnoid_cyst", "cyst_colloid_cyst", "infectious_brain_abscess", "sellar_craniopharyngioma",
    "sellar_pituitary_adenoma", "sellar_rathkes_cleft_cyst", "surgical_resection_cavity", "trauma_brain_contusion",
    "trauma_subdural_hematoma", "tumor_adult_brain_metastasis", "tumor_adult_glioma", "tumor_adult_high_grade_glioma",
    "tumor_adult_low_grade_glioma", "tumor_adult_lymphoma", "tumor_adult_meningioma", "tumor_adult_pineal_tumor",
    "tumor_adult_schwannoma", "tumor_pediatric_brainstem_glioma", "tumor_pediatric_ependymoma",
    "tumor_pediatric_germ_cell_tumor", "tumor_pediatric_medulloblastoma", "tumor_pediatric_pilocytic_astrocytoma",
    "vascular_hemorrhagic_intracranial_hemorrhage", "vascular_ischemic_large_vessel_stroke",
    "vascular_malformation_arteriovenous_malformation", "vascular_malformation_cavernoma",
)


def unk_tokens(tokens: StudyTokens) -> StudyTokens:
    """The same tokens with every series name and the study description replaced by ``unk``."""
    return StudyTokens(UNK_NAME, [dataclasses.replace(series, name=UNK_NAME) for series in tokens.series])


def age_group(age: float | None) -> str | None:
    if age is None:
        return None
    return "child (<18)" if age < 18 else "adult (18-65)" if age < 65 else "older (65+)"


def subgroups(entry: StudyEntry) -> dict[str, str | None]:
    """The subgroup attributes a synthetic (or annotated real) study records."""
    return {"vendor": entry.extra.get("vendor"), "sex": entry.subject.get("sex"),
            "age group": age_group(entry.subject.get("age"))}


def text_features(release: Release, texts: list[str], dtype) -> np.ndarray:
    """L2-normalised joint-space embeddings of texts (``PrimaCLIP.embed_texts``, 64 per forward)."""
    return release.model.embed_texts(release.report_tokenizer, texts, dtype).cpu().numpy()


@torch.no_grad()
def image_features(release: Release, embeddings: np.ndarray, dtype) -> np.ndarray:
    model = release.model
    device = model.logit_scale.device
    with autocast(device, dtype):
        features = model.image_proj(torch.from_numpy(embeddings).to(device)).float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def prediction_arrays(predictions: list[Prediction]) -> dict[str, np.ndarray]:
    """The outputs ``score`` reads, one row per study."""
    return {"diagnosis": np.array([[d.logit for d in p.diagnoses] for p in predictions]),
            "probability": np.array([[d.prob for d in p.diagnoses] for p in predictions]),
            "positive": np.array([[d.positive for d in p.diagnoses] for p in predictions], dtype=bool),
            "referral": np.array([[r.logit for r in p.referrals] for p in predictions]),
            "priority": np.array([[p.priority.probs[t] for t in p.priority.probs] for p in predictions]),
            "abnormal": np.array([np.nan if p.abnormal is None else p.abnormal for p in predictions])}


def localise(entries: list[StudyEntry], tokens_list: list[StudyTokens], release: Release, *, num_samples: int,
             max_explanations: int, seed: int, precision: str) -> dict:
    """LIME top-3 localisation on positive studies of focal diagnoses with lesion masks."""
    space = release.config.label_space
    records = []
    candidates = [(i, key) for i, entry in enumerate(entries) for key in FOCAL_DIAGNOSES
                  if entry.labels.get(key) and entry.lesion_masks]
    for i, key in tqdm(candidates[:max_explanations], desc="LIME localisation", unit="explanation"):
        tokens = tokens_list[i]
        contribution = series_contribution(tokens, release, precision=precision)
        column = space.diagnosis_keys.index(key)
        series_index = int(np.argmax(contribution.deltas[:, column]))
        series = tokens.series[series_index]
        mask = lesion_mask_on_grid(entries[i], series.name, key, series, release.config.preprocess)
        if mask is None:  # the lesion lies outside this series' field of view
            records.append({"study_id": entries[i].study_id, "key": key, "series": series.name, "hit": None})
            continue
        explanation = explain(tokens, release, key, series_index, num_samples=num_samples, seed=seed, top_k=3,
                              precision=precision)
        hit = lime_top_k_hit(explanation.weights, series.coords, mask, release.config.volume_tokenizer.patch_size,
                             series.through_axis, k=3)
        records.append({"study_id": entries[i].study_id, "key": key, "series": series.name, "hit": hit,
                        "r2": explanation.r2})
    scored = [r for r in records if r["hit"] is not None]
    per_label = {}
    for key in FOCAL_DIAGNOSES:
        hits = [r["hit"] for r in scored if r["key"] == key]
        if hits:
            per_label[key] = {"top3_accuracy": float(np.mean(hits)), "explanations": len(hits)}
    return {"top3_accuracy": float(np.mean([r["hit"] for r in scored])) if scored else None,
            "explanations": len(scored), "outside_field_of_view": len(records) - len(scored),
            "candidates": len(candidates), "num_samples": num_samples, "per_label": per_label, "records": records}


def priority_conflicts(positive: np.ndarray, priority: np.ndarray, space) -> dict:
    """How often the outputs contradict each other: a study with a positive diagnosis of the most urgent tier
    whose predicted priority (the most probable tier) is the least urgent one.

    Args:
        positive: (N, 52) bool, the diagnoses called positive at their operating thresholds.
        priority: (N, tiers) priority probabilities.
        space: the label space (each diagnosis' own tier).
    """
    urgent = np.array([d.tier == space.priority_tiers[-1] for d in space.diagnoses])
    with_urgent = positive[:, urgent].any(axis=1)
    conflicts = with_urgent & (priority.argmax(axis=1) == 0)
    return {"studies_with_urgent_positive": int(with_urgent.sum()), "conflicts": int(conflicts.sum()),
            "rate": float(conflicts.sum() / with_urgent.sum()) if with_urgent.any() else None}


def ladder(entries: list[StudyEntry], tokens_list: list[StudyTokens], outputs: dict[str, np.ndarray],
           embeddings: np.ndarray, release: Release, *, seed: int) -> dict:
    """The diagnostic ladder (``training.ladder``) on the evaluated studies: the token-level lesion probe
    where masks exist, the probes of the frozen study embedding, the heads' normal-vs-abnormal AUROC and how
    often a positive urgent diagnosis comes with the lowest priority."""
    space = release.config.label_space
    latents, overlaps, owners = [], [], []
    for index, (entry, tokens) in enumerate(zip(entries, tokens_list)):
        if not entry.lesion_masks:
            continue
        for series in tokens.series:
            overlap = token_lesion_overlap(entry, series, release.config.preprocess,
                                           release.config.volume_tokenizer.patch_size)
            if overlap is not None:
                latents.append(series.latents.numpy())
                overlaps.append(overlap)
                owners.append(index)
    diagnoses, _, _ = label_targets(entries, space)
    return {"token_lesion_probe": token_lesion_probe(latents, overlaps, owners, seed=seed),
            "embedding_probe": embedding_probe(embeddings, diagnoses, space.diagnosis_keys, seed=seed),
            "abnormal_auroc": abnormal_auroc(diagnoses, outputs["probability"]),
            "abnormal_output_auroc": (None if np.isnan(outputs["abnormal"]).any()
                                      else abnormal_auroc(diagnoses, outputs["abnormal"][:, None])),
            "priority_conflicts": priority_conflicts(outputs["positive"], outputs["priority"], space)}


def baseline_on(entries: list[StudyEntry], split: str, train: list[StudyEntry] | None = None) -> dict:
    """The metadata-only baseline fitted on the train split of ``train`` (default: of ``entries``) and scored on
    the ``split`` studies of ``entries``; empty when there is no train split to fit on (e.g. a test-only shifted
    set) or every study is scored."""
    fit_on = [e for e in (entries if train is None else train) if e.split == "train"]
    if split == ALL_SPLITS or split == "train" or not fit_on:
        return {"mean_auroc": None, "per_label": {}, "n_train": 0}
    return metadata_baseline([*fit_on, *(e for e in entries if e.split == split)], split=split)


def score(entries: list[StudyEntry], outputs: dict[str, np.ndarray], unk_outputs: dict[str, np.ndarray],
          images: np.ndarray, reports: np.ndarray, prompts: np.ndarray, space, baseline: dict, *, n_boot: int = 1000,
          seed: int = 0) -> dict:
    """Every figure but LIME localisation from the model's outputs on ``entries`` (``prediction_arrays``), the
    same with ``unk`` names, joint-space image, report and label-prompt features, and the metadata baseline."""
    diagnoses, referrals, tiers = label_targets(entries, space)
    keys, referral_keys = list(space.diagnosis_keys), list(space.referral_keys)
    return {
        "diagnosis": per_label_auroc(diagnoses, outputs["diagnosis"], keys, n_boot=n_boot, seed=seed),
        "diagnosis_unk_names": per_label_auroc(diagnoses, unk_outputs["diagnosis"], keys, n_boot=n_boot, seed=seed),
        "metadata_baseline": {"mean_auroc": baseline["mean_auroc"], "per_label": baseline["per_label"],
                              "n_train": baseline["n_train"]},
        "zero_shot": per_label_auroc(diagnoses, images @ prompts.T, keys, n_boot=0, seed=seed),
        "referral": per_label_auroc(referrals, outputs["referral"], referral_keys, n_boot=n_boot, seed=seed),
        "priority": priority_correlation(outputs["priority"], tiers),
        "retrieval": retrieval_top_k(images, reports, ks=(1, 5), group_size=100, seed=seed),
        "calibration": calibration(diagnoses, outputs["probability"]),
        "calibration_per_label": per_label_calibration(diagnoses, outputs["probability"], keys),
        "tpr_disparity": {attribute: equal_opportunity(diagnoses, outputs["positive"],
                                                       np.array([subgroups(e)[attribute] or "unknown"
                                                                 for e in entries]), keys)
                          for attribute in ("vendor", "sex", "age group")},
    }


# Release config fields that only turn outputs into decisions: releases that differ in them alone (the points of
# the data-scaling curve) read the same tokens.
DECISION_FIELDS = ("diagnosis_thresholds", "referral_thresholds")


def tokens_identity(release: Release, precision: str) -> str:
    """What a study's tokens depend on besides its images: the volume tokenizer's weights, the release
    config but its operating thresholds (preprocessing, filter threshold), the place-normal model the
    deviations are read against and the precision."""
    folder = Path(release.path)
    normal = folder / PLACE_NORMAL_FILE
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return cache_key(volume_tokenizer=weights_digest(folder / "volume_tokenizer.safetensors"),
                     config={k: v for k, v in config.items() if k not in DECISION_FIELDS}, precision=precision,
                     place_normal=weights_digest(normal) if normal.exists() else None)


def evaluate(release_path: str | Path, manifest: str | Path, *, split: str = "test", out: str | Path | None = None,
             n_boot: int = 1000, lime_samples: int = 500, lime_max: int = 150, device: str = "auto",
             precision: str = "auto", seed: int = 0, progress: bool = True,
             token_memo: dict[tuple[str, str], StudyTokens] | None = None,
             baseline_manifest: str | Path | None = None) -> dict:
    """Evaluate ``release_path`` on the ``split`` studies of ``manifest``; returns the eval.json content.

    ``token_memo`` keeps each study's tokens under ``(tokens_identity, study_id)`` across calls, so releases
    that share a volume tokenizer and config (the data-scaling points) tokenize the test studies once.
    ``baseline_manifest``: the manifest whose train split fits the metadata-only baseline, for a test-only set
    (default: ``manifest``'s own train split)."""
    started = time.perf_counter()
    release = ready_release(release_path, device)
    identity = tokens_identity(release, precision) if token_memo is not None else ""
    space = release.config.label_space
    out = Path(out) if out is not None else Path(release_path) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    all_entries = read_manifest(manifest)
    entries, tokens_list, full, unk, skipped = [], [], [], [], []
    for entry in tqdm([e for e in all_entries if split == ALL_SPLITS or e.split == split],
                      desc=f"predicting {split}", unit="study", disable=not progress):
        tokens = None if token_memo is None else token_memo.get((identity, entry.study_id))
        if tokens is None:
            try:
                tokens = tokenize_study(load_entry_study(entry), release, precision=precision)
            except (StudyLoadError, ValueError) as error:
                skipped.append({"study_id": entry.study_id, "reason": str(error)})
                continue
            if token_memo is not None:
                token_memo[(identity, entry.study_id)] = tokens
        entries.append(entry)
        tokens_list.append(tokens)
        full.append(predict_tokens(tokens, release, precision=precision, return_embedding=True))
        unk.append(predict_tokens(unk_tokens(tokens), release, precision=precision))
    if not entries:
        raise ValueError(f"{manifest}: no {split} study could be evaluated")
    predicted_at = time.perf_counter()
    dtype = autocast_dtype(release.model.logit_scale.device, precision)
    embeddings = np.array([p.embedding for p in full], dtype=np.float32)
    outputs = prediction_arrays(full)
    images = image_features(release, embeddings, dtype)
    reports = text_features(release, [e.report for e in entries], dtype)
    prompts = text_features(release, [zero_shot_prompt(d.name) for d in space.diagnoses], dtype)
    result = {"split": split, "studies": len(entries), "skipped": skipped,
              **score(entries, outputs, prediction_arrays(unk), images, reports, prompts, space,
                      baseline_on(all_entries, split, None if baseline_manifest is None else read_manifest(
                          baseline_manifest)), n_boot=n_boot, seed=seed)}
    result["ladder"] = ladder(entries, tokens_list, outputs, embeddings, release, seed=seed)
    result["lime_localisation"] = localise(entries, tokens_list, release, num_samples=lime_samples,
                                           max_explanations=lime_max, seed=seed, precision=precision)
    reliability_diagram(result["calibration"], out / RELIABILITY_PNG, f"{release.config.name}: diagnoses, {split}")
    result["provenance"] = {
        "release": str(release_path), "model": release.config.name, "commit": git_commit(ignore=(release.path,)),
        "manifest": str(manifest), "manifest_sha256": file_digest(manifest),
        "baseline_manifest": None if baseline_manifest is None else str(baseline_manifest),
        "model_sha256": file_digest(Path(release.path) / "model.safetensors"), "device": str(
            release.model.logit_scale.device), "precision": str(dtype or torch.float32), "seed": seed, "n_boot": n_boot,
        "machine": machine_description(release.model.logit_scale.device),
        "seconds": {"predict": predicted_at - started, "total": time.perf_counter() - started},
    }
    (out / EVAL_JSON).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / EVAL_MARKDOWN).write_text(markdown_report(result, space), encoding="utf-8")
    return result


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _evaluated_studies(split: str) -> str:
    """The studies an evaluation covers, as its heading names them (--split all: a test-only set)."""
    return "every study of the manifest" if split == ALL_SPLITS else f"the {split} split"


def _interval(scores: dict) -> str:
    interval = interval_text(scores.get("mean_ci_low"), scores.get("mean_ci_high"))
    return f"; 95% CI {interval}" if interval else ""


def summary_rows(result: dict) -> list[dict]:
    """The headline figures, one row each (the model card's evaluation table)."""
    lime = result["lime_localisation"]
    scored = result["diagnosis"]["n_labels_scored"]
    disparity = result["tpr_disparity"]
    positives = "positives" if result["split"] == ALL_SPLITS else f"{result['split']} positives"
    return [
        {"metric": f"Diagnosis mean AUROC ({scored} of 52 labels have {positives} and negatives"
                   f"{_interval(result['diagnosis'])})", "value": result["diagnosis"]["mean_auroc"]},
        {"metric": "Diagnosis mean AUROC, series names and description `unk`",
         "value": result["diagnosis_unk_names"]["mean_auroc"]},
        {"metric": "Metadata-only baseline mean AUROC (same split)",
         "value": result["metadata_baseline"]["mean_auroc"]},
        {"metric": "Lowest diagnosis AUROC", "value": result["diagnosis"]["min_auroc"]},
        {"metric": f"Referral mean AUROC (11{_interval(result['referral'])})",
         "value": result["referral"]["mean_auroc"]},
        {"metric": "Priority: Spearman correlation of the priority score with the tier",
         "value": result["priority"]["spearman"]},
        *({"metric": f"Retrieval top-{k} (groups of 100), study -> report",
           "value": result["retrieval"]["image_to_text"][f"top{k}"]} for k in (1, 5)),
        {"metric": "Zero-shot mean AUROC (prompt = display name)", "value": result["zero_shot"]["mean_auroc"]},
        {"metric": f"LIME top-3 localisation ({lime['explanations']} explanations)", "value": lime["top3_accuracy"]},
        {"metric": "Calibration: expected calibration error", "value": result["calibration"]["ece"]},
        *({"metric": f"TPR disparity across {attribute} (mean over labels, equal opportunity)",
           "value": disparity[attribute]["mean_disparity"]} for attribute in disparity),
        *ladder_rows(result.get("ladder")),
    ]


def ladder_rows(ladder: dict | None) -> list[dict]:
    """The ladder's rows (none for an evaluation made before the ladder existed)."""
    if ladder is None:
        return []
    token, probe, conflicts = ladder["token_lesion_probe"], ladder["embedding_probe"], ladder["priority_conflicts"]
    return [
        {"metric": f"Ladder 1, signal available: lone-token lesion probe AUROC ({token['lesion_tokens']} lesion "
                   f"tokens, {token['studies']} studies with masks)", "value": token["auroc"]},
        {"metric": "Ladder 2, signal kept: linear probe of the study embedding, normal vs abnormal AUROC",
         "value": probe["abnormal_auroc"]},
        {"metric": f"Ladder 2, signal kept: linear probe, diagnosis mean AUROC ({probe['labels_probed']} labels "
                   "with enough positives)", "value": probe["diagnosis_mean_auroc"]},
        {"metric": "Ladder 3, signal used: heads, normal vs abnormal AUROC (largest diagnosis probability)",
         "value": ladder["abnormal_auroc"]},
        *([{"metric": "Ladder 3, signal used: heads, normal vs abnormal AUROC (abnormal probability)",
            "value": ladder["abnormal_output_auroc"]}] if ladder.get("abnormal_output_auroc") is not None else []),
        {"metric": f"Conflicting outputs: urgent positive with the lowest priority "
                   f"({conflicts['conflicts']} of {conflicts['studies_with_urgent_positive']} studies)",
         "value": conflicts["rate"]},
    ]


def markdown_report(result: dict, space) -> str:
    """eval.md: the summary table, then per-label AUROCs beside the baseline and the unk-names run."""
    lines = [f"## Evaluation on {_evaluated_studies(result['split'])} ({result['studies']} studies)", "",
             markdown_table(summary_rows(result), [("metric", "Metric"), ("value", "Value")]), ""]
    rows = []
    calibrated = result.get("calibration_per_label")  # absent from evaluations made before it existed
    for diagnosis in space.diagnoses:
        model = result["diagnosis"]["per_label"][diagnosis.key]
        rows.append({"label": diagnosis.name, "positives": model["positives"], "auroc": model["auroc"],
                     "ci": None if model["ci_low"] is None else f"{model['ci_low']:.3f}–{model['ci_high']:.3f}",
                     "unk": result["diagnosis_unk_names"]["per_label"][diagnosis.key]["auroc"],
                     "baseline": result["metadata_baseline"]["per_label"].get(diagnosis.key),
                     "zero_shot": result["zero_shot"]["per_label"][diagnosis.key]["auroc"]})
        if calibrated:
            label = calibrated[diagnosis.key]
            rows[-1].update(calibration=f"{label['mean_predicted']:.3f} / {label['observed_rate']:.3f}",
                            brier=label["brier"])
    columns = [("label", "Diagnosis"), ("positives", "Positives"), ("auroc", "AUROC"), ("ci", "95% CI"),
               ("unk", "`unk` names"), ("baseline", "Metadata baseline"), ("zero_shot", "Zero-shot")]
    if calibrated:
        columns += [("calibration", "Mean probability / positive rate"), ("brier", "Brier")]
    lines += ["### Per diagnosis", "", markdown_table(rows, columns), ""]
    matrix = result["priority"]["confusion_matrix"]
    lines += ["### Priority confusion matrix (rows: truth, columns: predicted)", "",
              markdown_table([{"truth": tier, **{t: matrix[i][j] for j, t in enumerate(space.priority_tiers)}}
                              for i, tier in enumerate(space.priority_tiers)],
                             [("truth", "Truth"), *[(t, t) for t in space.priority_tiers]]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("release", help="release folder or hf://owner/repo")
    parser.add_argument("manifest", type=Path, help="manifest.jsonl (its train split fits the metadata baseline)")
    parser.add_argument("--baseline-manifest", type=Path, default=None,
                        help="fit the metadata baseline on this manifest's train split instead (a test-only set)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test; all: every study)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <release>/evaluation)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUROC CIs")
    parser.add_argument("--lime-samples", type=int, default=500, help="LIME perturbations per explanation")
    parser.add_argument("--lime-max", type=int, default=150, help="most explanations for LIME localisation")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap, retrieval groups and LIME")
    args = parser.parse_args(argv)
    result = evaluate(args.release, args.manifest, split=args.split, out=args.out, n_boot=args.n_boot,
                      lime_samples=args.lime_samples, lime_max=args.lime_max, device=args.device,
                      precision=args.precision, seed=args.seed, baseline_manifest=args.baseline_manifest)
    for row in summary_rows(result):
        print(f"{row['metric']}: {_fmt(row['value'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
