"""The model card (``README.md`` of a release): what the model is, how it was made, how it scores."""

from __future__ import annotations

import json

from prima.config import PrimaConfig
from training.ladder import normal_vs_abnormal
from training.metrics import interval_text

# The targets for the lite release, beside which the card states each measured figure.
TARGETS = (
    ("Diagnosis mean AUROC", ("diagnosis", "mean_auroc"), ">=", 0.90),
    ("Lowest diagnosis AUROC", ("diagnosis", "min_auroc"), ">=", 0.75),
    ("Referral mean AUROC", ("referral", "mean_auroc"), ">=", 0.85),
    ("Priority correlation (Spearman)", ("priority", "spearman"), ">=", 0.69),
    ("LIME top-3 localisation", ("lime_localisation", "top3_accuracy"), ">=", 0.90),
)
BUILD_MINUTES_BOUND = 120  # the lite release builds from nothing within this on a 2-core CPU
SYNTHESIS_RATE_BOUND = 30  # studies per minute the data stage synthesises on a 2-core CPU


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def _value(result: dict, path: tuple[str, ...]):
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def machine_rows(machine: dict | None) -> list[str]:
    """Where the release was built and evaluated: bf16 figures reproduce exactly only on the same bf16 kernels."""
    if machine is None:
        return []
    flags = ", ".join(machine["cpu_half_precision_flags"]) or "none"
    gpu = f", GPU {machine['cuda']}" if "cuda" in machine else ""
    return [f"Built on: {machine['cpu']} ({machine['cpu_capability']}; half-precision instructions: {flags}){gpu}, "
            f"torch {machine['torch']}. The figures were computed in the precision `eval.json` records; in bf16 "
            "a fresh `training.evaluate` reproduces them bit for bit on a machine with the same bf16 kernels, "
            "and another CPU kind (AMX rather than AVX512-BF16 alone) moves them in the third decimal.", ""]


def target_rows(result: dict, localisation: dict | None = None) -> list[str]:
    """Markdown rows: target, measured value, met or not (the unk-names and baseline gaps included); LIME
    localisation is read on the localisation test set when there is one."""
    rows = []
    for name, path, _, bound in TARGETS:
        value = _value(result, path)
        if path[0] == "lime_localisation" and localisation is not None:
            lime = localisation["lime_localisation"]
            name, value = f"{name} (localisation set, {lime['explanations']} explanations)", lime["top3_accuracy"]
        met = value is not None and value >= bound
        rows.append(f"| {name} | >= {bound:.2f} | {'—' if value is None else f'{value:.3f}'} | "
                    f"{_verdict(met)} |")
    full, unk = result["diagnosis"]["mean_auroc"], result["diagnosis_unk_names"]["mean_auroc"]
    baseline = result["metadata_baseline"]["mean_auroc"]
    if full is not None and unk is not None:
        rows.append(f"| `unk`-names AUROC within 0.02 of the full one | <= 0.02 | {abs(full - unk):.3f} | "
                    f"{_verdict(abs(full - unk) <= 0.02)} |")
    if full is not None and baseline is not None:
        rows.append(f"| Margin over the metadata-only baseline | >= 0.30 | {full - baseline:.3f} | "
                    f"{_verdict(full - baseline >= 0.30)} |")
    return rows


def build_rows(provenance: dict) -> list[str]:
    """Markdown rows for the build targets: the wall time of every stage together and, where the release
    synthesised its data, the data stage's studies per minute (the machine is named under "How it was made")."""
    seconds = provenance["stage_seconds"]
    minutes = sum(seconds.values()) / 60
    rows = [f"| Release build time, every stage (minutes) | <= {BUILD_MINUTES_BOUND} | {minutes:.0f} | "
            f"{_verdict(minutes <= BUILD_MINUTES_BOUND)} |"]
    data = provenance["config"]["data"]
    if "manifest" not in data and seconds.get("data"):
        rate = data["n"] / seconds["data"] * 60
        rows.append(f"| Synthesis (studies per minute, data stage) | >= {SYNTHESIS_RATE_BOUND} | {rate:.1f} | "
                    f"{_verdict(rate >= SYNTHESIS_RATE_BOUND)} |")
    return rows


def scaling_rows(curve: list[dict] | None) -> list[str]:
    if not curve:
        return ["No data-scaling curve was run for this release (`scaling.fractions` in the release config)."]
    scored = curve[-1].get("studies_scored")  # absent from curves made before the test set
    where = f"the same {scored} test studies" if scored else "the same test split"
    return [f"Mean diagnosis AUROC when CLIP and the heads are trained on a fraction of the training patients "
            f"({where}; normal vs abnormal read as in the ladder):", "",
            "| Fraction | Training studies | CLIP steps | Mean AUROC | 95% CI | Labels scored | `unk` names | "
            "Normal vs abnormal |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {p['fraction']:g} | {p['train_studies']} | {p['clip_steps']} | {_fmt(p['mean_auroc'])} | "
              f"{interval_text(p.get('mean_ci_low'), p.get('mean_ci_high')) or '—'} | {p['labels_scored']} | "
              f"{_fmt(p['unk_mean_auroc'])} | {_fmt(p.get('abnormal_auroc'))} |" for p in curve), "",
            "![Data scaling](evaluation/scaling.png)"]


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def localisation_rows(result: dict, localisation: dict | None) -> list[str]:
    """LIME top-3 localisation on the test split and on the localisation set, per label."""
    lime = result["lime_localisation"]
    rows = [f"Test split: top-3 accuracy {_fmt(lime['top3_accuracy'])} on {lime['explanations']} explanations "
            f"({lime['outside_field_of_view']} more lesions lay outside the series the model relied on most)."]
    if localisation is None:
        return rows + ["", "No localisation test set was evaluated (`localisation` in the release config)."]
    lime = localisation["lime_localisation"]
    rows += ["", f"Localisation test set ({localisation['studies']} test-only studies, each with a focal primary "
             f"diagnosis, protocol-blind; `training.synth --primary`): top-3 accuracy "
             f"{_fmt(lime['top3_accuracy'])} on {lime['explanations']} explanations ({lime['num_samples']} LIME "
             f"samples each). Its diagnosis mean AUROC: {_fmt(localisation['diagnosis']['mean_auroc'])}.", "",
             "| Diagnosis | Explanations | Top-3 accuracy |", "|---|---|---|",
             *(f"| {key} | {row['explanations']} | {row['top3_accuracy']:.3f} |"
               for key, row in sorted(lime["per_label"].items()))]
    return rows


def shifted_rows(result: dict, shifted: dict | None) -> list[str]:
    if shifted is None:
        return ["No shifted test set was evaluated for this release (`shifted` in the release config)."]
    rows = [("Diagnosis mean AUROC", "diagnosis"), ("Diagnosis mean AUROC, `unk` names", "diagnosis_unk_names"),
            ("Referral mean AUROC", "referral")]
    return ["A test-only synthetic set whose head pose, deformation, bias field, noise, resolution and contrast are "
            "drawn outside the training ranges (`training.synth --shift`):", "",
            f"| Metric | In-range test ({result['studies']} studies) | Shifted ({shifted['studies']} studies) |",
            "|---|---|---|",
            *(f"| {name} | {_fmt(result[key]['mean_auroc'])} | {_fmt(shifted[key]['mean_auroc'])} |"
              for name, key in rows)]


def recipe_description(config: PrimaConfig, clip: dict) -> str:
    """What the card says the model is and how it learnt, from its model config and the release's clip section."""
    task_weight, clip_weight = clip.get("task_weight", 0.0), clip.get("clip_weight", 1.0)
    tokens = ("VQ-VAE volume tokens on the head grid, each read as its deviation from a place-normal model (the "
              "normal training studies' tokens at the same place, by series kind)"
              if config.vision.token_values == "place_deviation" else "VQ-VAE volume tokens")
    objective = "CLIP against the reports and a patient-discrimination loss" if clip_weight > 0 else ""
    if task_weight > 0:
        objective += (" and " if objective else "") + "the task labels, jointly"
    if config.heads.diagnosis_pool == "tokens":
        heads = (f"diagnosis logits (and a normal-vs-abnormal logit) pooled as the mean of each study's "
                 f"{config.heads.top_tokens} largest token scores, and MLP heads on the study embedding for 11 "
                 "referrals and a 3-tier worklist priority")
    else:
        heads = "MLP heads for 52 diagnoses, 11 referrals and a 3-tier worklist priority"
    return (f"A Prima brain-MRI vision-language model: {tokens}, a hierarchical ViT (sequence ViT per series, study "
            f"ViT per study) trained with {objective}, and {heads}. No lesion mask was used in training.")


def test_split_rows(test_split: dict | None, test_set: dict) -> list[str]:
    """Where the figures are read: the stratified test set, beside the data's own test split (when the release
    has a test set, ``test_split`` is that split's evaluation; None: the figures are the split's own)."""
    if test_split is None:
        return []
    diagnosis = test_split["diagnosis"]
    abnormal = normal_vs_abnormal(test_split.get("ladder") or {})
    return [f"Every figure below is read on the **test set**: {test_set['studies']} test-only studies drawn as the "
            f"data are (another seed, protocol-blind, stratified: at least {_positives(test_set)[0]} positives of "
            f"every label). The data's own test split ({test_split['studies']} studies, at least "
            f"{_positives(test_split)[0]} positive a label) "
            f"gives diagnosis mean AUROC {_fmt(diagnosis['mean_auroc'])}{_interval(diagnosis)}, referral mean "
            f"AUROC {_fmt(test_split['referral']['mean_auroc'])}, normal vs abnormal {_fmt(abnormal)}.", ""]


def _interval(scores: dict) -> str:
    interval = interval_text(scores.get("mean_ci_low"), scores.get("mean_ci_high"))
    return f" (95% CI {interval})" if interval else ""


def _positives(result: dict) -> list[int]:
    """The diagnoses' positive counts of an evaluation, fewest first."""
    return sorted(row["positives"] for row in result["diagnosis"]["per_label"].values())


def _split_row(name: str, studies: int, positives: list[int]) -> str:
    return f"| {name} | {studies} | {positives[0]} | {positives[len(positives) // 2]} |"


def model_card(config: PrimaConfig, result: dict, provenance: dict, evaluation_markdown: str,
               reliability_png: str, scaling: list[dict] | None = None, shifted: dict | None = None,
               localisation: dict | None = None, test_split: dict | None = None) -> str:
    """The release's README.md (Hugging Face model-card front matter included). ``result`` is the evaluation
    the card is read on: the stratified test set's when the release has one, with the data's own test split's
    evaluation in ``test_split``, else the test split's."""
    stages = provenance["stage_seconds"]
    counts = provenance["label_counts"]
    split_rows = []
    for split in ("train", "val", "test"):
        if split in counts:
            split_rows.append(_split_row(split, counts[split]["studies"],
                                         sorted(v for k, v in counts[split].items() if k != "studies")))
    if test_split is not None:
        split_rows.append(_split_row("test set (test-only)", result["studies"], _positives(result)))
    return "\n".join([
        "---",
        "license: mit",
        "library_name: prima",
        "tags: [medical-imaging, mri, brain, vision-language, clip, lime, synthetic-data]",
        "---",
        "",
        f"# {config.name}",
        "",
        "> **Research demo — not for clinical use.** Trained on synthetic studies only; not validated on real "
        "patients.",
        "",
        recipe_description(config, provenance["config"].get("clip", {})),
        "",
        "## Intended use and limitations",
        "",
        "- Intended use: exploring the method, its explanations (LIME over volume tokens) and its software; "
        "a starting point to retrain on a health system's own data.",
        "- Trained only on synthetic studies made from one real anatomy (the ICBM152 2009 template bundled with "
        "nilearn) deformed per subject, with simulated sequences, lesions and reports. Real scans differ in "
        "anatomy, contrast, artefacts and disease appearance: expect much lower performance on them.",
        "- The validation and test splits are protocol-blind (their series and descriptions do not follow the "
        "findings), so the figures below do not come from reading the protocol; the metadata-only baseline and "
        "the `unk`-names run show how much metadata alone carries.",
        "- Not a medical device. Do not use for diagnosis or triage of patients.",
        "",
        "## Targets",
        "",
        *test_split_rows(test_split, result),
        "| Target | Bound | Measured | |",
        "|---|---|---|---|",
        *target_rows(result, localisation),
        *build_rows(provenance),
        "",
        evaluation_markdown.strip(),
        "",
        f"![Reliability diagram]({reliability_png})",
        "",
        "## LIME localisation",
        "",
        *localisation_rows(test_split or result, localisation),
        "",
        "## Beyond the training ranges",
        "",
        *shifted_rows(result, shifted),
        "",
        "## Data scaling",
        "",
        *scaling_rows(scaling),
        "",
        "## Data",
        "",
        "Synthetic studies from `training.synth` (ICBM152 2009 template, nilearn), 2-8 series each, "
        "indication-driven protocols in the training split, protocol-blind validation and test splits.",
        "",
        "| Split | Studies | Fewest positives of a label | Median positives |",
        "|---|---|---|---|",
        *split_rows,
        "",
        "## How it was made",
        "",
        "```",
        provenance["command"],
        "```",
        "",
        f"Commit: `{provenance['commit']}`. Stage times (seconds): "
        + ", ".join(f"{name} {seconds:.0f}" for name, seconds in stages.items()) + ".",
        "",
        *machine_rows(provenance.get("machine")),
        "Release config:",
        "",
        "```json",
        json.dumps(provenance["config"], indent=1),
        "```",
        "",
    ]) + "\n"
