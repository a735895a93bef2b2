"""Build a release from nothing: ``python -m training.release --config training/configs/release-lite.yaml``.

Stages, each the same code as its own command and each resumable (a finished stage is skipped, an
interrupted one continues from its checkpoint):

    data             training.synth (or a given manifest, e.g. from training.export_manifest)
    volume tokenizer training.volume_tokenizer.train (or given weights)
    token cache      training.token_cache
    place normal     training.place_normal     (only for a model reading place deviations: prima-lite-head)
    report LM        training.report_lm        (BPE report tokenizer + GPT-2 next-token pre-training)
    series names     training.series_names     (series-name encoder CLIP pre-training)
    clip             training.clip             (hViT CLIP + patient discrimination; with task_weight the heads
                                               trained jointly on the labels)
    heads            training.heads            (diagnoses, referrals, priority; thresholds; only thresholds
                                               for heads trained in the clip stage)
    release          prima.release.save_release, then training.evaluate on the test split, then the model card
    optional         a shifted test set, a localisation test set (focal lesions, for LIME), a stratified test
                     set the card is read on (>= 5 positives a label) and the data-scaling curve (config
                     sections ``shifted``, ``localisation``, ``test_set``, ``scaling``)

``--push-to-hub OWNER/REPO`` uploads the folder with ``huggingface_hub``. Stage times go to
``<work>/stages.json`` and the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from prima.config import config_from_dict
from prima.distributed import resolve_device
from prima.errors import ConfigError
from prima.factory import get_model_config
from prima.manifest import read_manifest, write_manifest
from prima.models.text import ReportTokenizer
from prima.release import load_place_normal, load_volume_tokenizer, save_release, volume_tokenizer_provenance
from training import clip as clip_stage
from training import heads as heads_stage
from training import place_normal as place_normal_stage
from training import report_lm, series_names
from training.evaluate import ALL_SPLITS, EVAL_JSON, EVAL_MARKDOWN, FOCAL_DIAGNOSES, RELIABILITY_PNG, evaluate
from training.ladder import normal_vs_abnormal
from training.model_card import model_card
from training.runtime import (
    cache_key,
    file_digest,
    git_commit,
    machine_description,
    read_config_file,
    stop_on_terminate,
    weights_digest,
)
from training.synth.writers import write_dataset
from training.token_cache import TokenCacheConfig, build_token_cache
from training.volume_tokenizer import train as volume_tokenizer_stage

STAGES_FILE = "stages.json"
SCALING_JSON, SCALING_PNG = "scaling.json", "scaling.png"
EVALUATION_FOLDER = "evaluation"
PROVENANCE_JSON = "provenance.json"


@dataclass
class ReleaseConfig:
    """A whole release (``training/configs/release-lite.yaml``); each stage section holds that stage's
    config fields (see its ``--help``) except the paths, which the release fills in."""

    out: str  # the release folder written at the end (e.g. assets/weights/prima-lite)
    work: str  # folder of every stage's run (data, caches, checkpoints, logs)
    model: str = "prima-lite"  # model config of the release
    device: str = "auto"  # every stage's device: auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads per process
    seed: int = 0  # seeds every stage
    data: dict = field(default_factory=dict)  # training.synth settings (n, spacing, balance, ...) or {manifest: path}
    volume_tokenizer: dict = field(default_factory=dict)  # {weights: path} or training.volume_tokenizer.train fields
    token_cache: dict = field(default_factory=dict)  # training.token_cache fields
    place_normal: dict = field(default_factory=dict)  # training.place_normal fields (a model reading deviations)
    report_lm: dict = field(default_factory=dict)  # training.report_lm fields
    series_names: dict = field(default_factory=dict)  # training.series_names fields
    clip: dict = field(default_factory=dict)  # training.clip fields
    heads: dict = field(default_factory=dict)  # training.heads fields
    evaluate: dict = field(default_factory=dict)  # training.evaluate options: n_boot, lime_samples, lime_max
    shifted: dict = field(default_factory=dict)  # {n, shift, seed}: a test set drawn outside the training ranges
    localisation: dict = field(default_factory=dict)  # {n, seed, balance}: a test set of focal lesions for LIME
    test_set: dict = field(default_factory=dict)  # {n, seed}: a stratified test-only set the card is read on
    scaling: dict = field(default_factory=dict)  # {fractions: [0.125, ...], steps: same | proportional}: the curve


EVALUATE_OPTIONS = ("n_boot", "lime_samples", "lime_max", "precision")
_SYNTH_OPTIONS = ("n", "seed", "fmt", "workers", "spacing", "max_series", "protocol_blind", "balance", "shift",
                  "primary", "stratify", "split_fractions", "manifest")


def check_release_config(doc: dict) -> ReleaseConfig:
    """The release config of a parsed file, every section checked against its stage's fields before any
    work starts (a typo should not surface after an hour of synthesis). Raises ``ConfigError``."""
    config = config_from_dict(ReleaseConfig, doc, "release config")
    known = {"data": _SYNTH_OPTIONS, "evaluate": EVALUATE_OPTIONS,
             "shifted": ("n", "shift", "seed", "spacing", "max_series", "stratify"), "scaling": ("fractions", "steps"),
             "localisation": ("n", "seed", "balance", "spacing", "max_series", "stratify"),
             "test_set": ("n", "seed", "spacing", "max_series"),
             "volume_tokenizer": ("weights", *(f.name for f in dataclasses.fields(
                 volume_tokenizer_stage.VolumeTokenizerTrainConfig))),
             "token_cache": [f.name for f in dataclasses.fields(TokenCacheConfig)],
             "place_normal": [f.name for f in dataclasses.fields(place_normal_stage.PlaceNormalFitConfig)],
             "report_lm": [f.name for f in dataclasses.fields(report_lm.ReportLMConfig)],
             "series_names": [f.name for f in dataclasses.fields(series_names.SeriesNamesConfig)],
             "clip": [f.name for f in dataclasses.fields(clip_stage.ClipTrainConfig)],
             "heads": [f.name for f in dataclasses.fields(heads_stage.HeadsTrainConfig)]}
    for section, names in known.items():
        unknown = sorted(set(getattr(config, section)) - set(names))
        if unknown:
            raise ConfigError(f"release config section {section!r}: unknown keys {unknown}")
    return config


def stage_config(cls: type, section: dict, where: str, **paths: Any):
    """A stage's config dataclass from its release section plus the paths and shared settings."""
    doc = {**section, **paths}
    try:
        return config_from_dict(cls, doc, where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


class StageTimer:
    """Runs stages, records each one's seconds in ``<work>/stages.json``: the wall time spent in the stage
    over every run of the work folder, so a stage interrupted by Ctrl-C or an error counts the part done
    before it was resumed (``main`` turns SIGTERM into such an exit; SIGKILL records nothing of that
    stage), and a finished stage that a later run only checks adds those seconds of checking."""

    def __init__(self, work: Path) -> None:
        self.path = work / STAGES_FILE
        self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            result = function()
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - started, 1)
            self.path.write_text(json.dumps(self.times, indent=1) + "\n", encoding="utf-8")
        print(f"== {name}: {self.times[name]:.0f} s", file=sys.stderr, flush=True)
        return result


def synthesise(config: ReleaseConfig, work: Path) -> Path:
    """The release's manifest: the given one, or a synthetic data set (written once)."""
    if "manifest" in config.data:
        return Path(config.data["manifest"])
    return synthesise_once(work / "data", {"seed": config.seed, **config.data})


def synthesise_once(folder: Path, settings: dict) -> Path:
    """``training.synth`` into ``folder`` with ``settings`` (``n`` and ``write_dataset``'s keywords), unless
    ``done.json`` says it was done with the same settings; returns the manifest."""
    manifest = folder / "manifest.jsonl"
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()) == settings:
        return manifest
    options = dict(settings)
    write_dataset(options.pop("n"), folder, **options)
    done.write_text(json.dumps(settings), encoding="utf-8")
    return manifest


def build(config: ReleaseConfig, command: str) -> Path:
    """Run every stage; returns the release folder."""
    check_release_config(dataclasses.asdict(config))
    work = Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(work)
    shared = {"model": config.model, "device": config.device, "threads": config.threads, "seed": config.seed}
    manifest = timer.run("data", lambda: synthesise(config, work))

    if "weights" in config.volume_tokenizer:
        volume_tokenizer_path = Path(config.volume_tokenizer["weights"])
    else:
        vt_config = stage_config(volume_tokenizer_stage.VolumeTokenizerTrainConfig, config.volume_tokenizer,
                                 "volume_tokenizer", manifest=str(manifest), out=str(work / "volume_tokenizer"),
                                 **shared)
        volume_tokenizer_path = timer.run("volume tokenizer", lambda: volume_tokenizer_stage.train(vt_config))

    cache_config = stage_config(TokenCacheConfig, config.token_cache, "token_cache", manifest=str(manifest),
                                out=str(work / "token_cache"), volume_tokenizer=str(volume_tokenizer_path),
                                model=config.model, device=config.device, threads=config.threads)
    cache = timer.run("token cache", lambda: build_token_cache(cache_config))

    place_normal: dict[str, str] = {}  # the place_normal path of every stage reading tokens, when the model needs it
    if get_model_config(config.model).vision.token_values == "place_deviation":
        normal_config = stage_config(place_normal_stage.PlaceNormalFitConfig, config.place_normal, "place_normal",
                                     manifest=str(manifest), token_cache=str(cache), out=str(work / "place_normal"),
                                     model=config.model, seed=config.seed)
        place_normal["place_normal"] = str(timer.run("place normal", lambda: place_normal_stage.fit(normal_config)))

    lm_config = stage_config(report_lm.ReportLMConfig, config.report_lm, "report_lm", manifest=str(manifest),
                             out=str(work / "report_lm"), **shared)
    timer.run("report LM", lambda: report_lm.train(lm_config))
    tokenizer_path = work / "report_lm" / "report_tokenizer.json"
    text_tower_path = work / "report_lm" / "text_tower.safetensors"

    names_config = stage_config(series_names.SeriesNamesConfig, config.series_names, "series_names",
                                manifest=str(manifest), token_cache=str(cache), out=str(work / "series_names"),
                                **place_normal, **shared)
    names_path = timer.run("series names", lambda: series_names.train(names_config))

    clip_config = stage_config(clip_stage.ClipTrainConfig, config.clip, "clip", manifest=str(manifest),
                               token_cache=str(cache), report_tokenizer=str(tokenizer_path),
                               text_tower=str(text_tower_path), series_names=str(names_path),
                               out=str(work / "clip"), **place_normal, **shared)
    clip_path = timer.run("clip", lambda: clip_stage.train(clip_config))

    def trained_heads(clip_weights: Path) -> dict[str, str]:  # heads the CLIP stage trained with the hViT
        return {"trained": str(clip_weights.parent / clip_stage.HEADS_FILE)} if clip_config.task_weight > 0 else {}

    heads_config = stage_config(heads_stage.HeadsTrainConfig, config.heads, "heads", manifest=str(manifest),
                                token_cache=str(cache), clip=str(clip_path), out=str(work / "heads"),
                                model=config.model, device="cpu" if config.device == "auto" else config.device,
                                threads=config.threads, seed=config.seed, **place_normal, **trained_heads(clip_path))
    heads_path = timer.run("heads", lambda: heads_stage.train(heads_config))

    out = Path(config.out)

    def assemble(folder: Path, clip_weights: Path, heads_weights: Path) -> Path:
        model = clip_stage.load_clip(clip_weights, config.model)
        heads = heads_stage.load_heads(heads_weights, get_model_config(config.model))
        normal = load_place_normal(place_normal["place_normal"]) if place_normal else None
        return save_release(folder, model, report_tokenizer=ReportTokenizer.load(tokenizer_path),
                            volume_tokenizer=load_volume_tokenizer(volume_tokenizer_path), heads=heads,
                            place_normal=normal)

    timer.run("assemble", lambda: assemble(out, clip_path, heads_path))
    options = {"n_boot": 1000, "lime_samples": 500, "lime_max": 150, **config.evaluate}
    test_tokens: dict = {}  # the test studies' tokens, shared by the evaluations of the scaling points
    result = timer.run("evaluate", lambda: evaluate_once(out, manifest, out / EVALUATION_FOLDER,
                                                         device=config.device, seed=config.seed,
                                                         token_memo=test_tokens, **options))

    def write_card(with_scaling: bool) -> None:
        """provenance.json, then README.md from the release's files (again once the scaling curve is written)."""
        provenance = {
            "command": command, "commit": git_commit(ignore=(out,)), "config": dataclasses.asdict(config),
            "manifest_sha256": file_digest(manifest), "stage_seconds": timer.times,
            "machine": machine_description(resolve_device(config.device)),
            "volume_tokenizer": volume_tokenizer_provenance(volume_tokenizer_path),
            "stage_summaries": {name: _summary(work / folder / file) for name, folder, file in (
                ("report_lm", "report_lm", "report_lm.json"), ("series_names", "series_names", "series_names.json"),
                ("clip", "clip", clip_stage.SUMMARY_FILE), ("heads", "heads", heads_stage.SUMMARY_FILE),
                ("place_normal", "place_normal", place_normal_stage.SUMMARY_FILE))},
            "label_counts": _label_counts(manifest),
        }
        (out / EVALUATION_FOLDER / PROVENANCE_JSON).write_text(json.dumps(provenance, indent=1) + "\n",
                                                             encoding="utf-8")
        (out / "README.md").write_text(card_from_files(out, with_scaling=with_scaling), encoding="utf-8")

    def test_only_evaluation(name: str, settings: dict, split: str = ALL_SPLITS, **overrides: Any) -> dict:
        """The whole evaluation of a test-only synthetic set written to ``<work>/<name>``."""
        test_manifest = synthesise_once(work / name, settings)
        return evaluate_once(out, test_manifest, out / EVALUATION_FOLDER / name, split=split,
                             device=config.device, seed=config.seed, **{**options, **overrides})

    if config.shifted:
        timer.run("shifted test set", lambda: test_only_evaluation("shifted", {
            "seed": config.seed + 1, "shift": 1.0, "protocol_blind": "all", **config.shifted}, lime_max=0))
    if config.localisation:
        # Test-only studies whose primary diagnosis is focal (the paper scores LIME on BraTS): the LIME target
        # is read on this set.
        timer.run("localisation test set", lambda: test_only_evaluation("localisation", {
            "seed": config.seed + 2, "protocol_blind": "all", "balance": 1.0, "primary": list(FOCAL_DIAGNOSES),
            **config.localisation}))
    # Where the scaling points are scored: the data's test split, or the test set. Each has its own token memo, as
    # the two sets number their studies alike.
    scored_on, scored_tokens, scored_options, full_result = manifest, test_tokens, {}, result
    if config.test_set:
        # The data's test split has about one positive a label; this set is drawn as the data are (another seed,
        # every study in test, stratified) with >= 5 of each, and the card's figures are read on it. The metadata
        # baseline fits on the data's training split.
        drawn_as_data = {k: config.data[k] for k in ("spacing", "max_series", "balance") if k in config.data}
        scored_tokens, scored_options = {}, {"baseline_manifest": str(manifest)}
        full_result = timer.run("test set", lambda: test_only_evaluation("test_set", {
            "seed": config.seed + 3, "protocol_blind": "all", "stratify": True, "split_fractions": [0.0, 0.0, 1.0],
            **drawn_as_data, **config.test_set}, split="test", lime_max=0, token_memo=scored_tokens,
            **scored_options))
        scored_on = work / "test_set" / "manifest.jsonl"
    write_card(with_scaling=False)  # the release is usable now; the scaling curve takes as long again
    if config.scaling.get("fractions"):
        proportional = config.scaling.get("steps", "same") == "proportional"

        def point(fraction: float) -> dict:
            """CLIP and heads again on a fraction of the training patients, scored where the card is read (the
            test set, else the test split): with the same number of CLIP steps, or (``steps: proportional``) the
            same number of epochs."""
            folder = work / "scaling" / f"{fraction:g}"
            subset = subset_manifest(manifest, fraction, config.seed, folder / "manifest.jsonl")
            steps = max(1, round(fraction * clip_config.steps)) if proportional else clip_config.steps
            clip_weights = clip_stage.train(dataclasses.replace(
                clip_config, manifest=str(subset), out=str(folder / "clip"), steps=steps,
                warmup=min(clip_config.warmup, max(1, steps // 5)), eval_every=max(1, steps)))
            heads_weights = heads_stage.train(dataclasses.replace(heads_config, manifest=str(subset), clip=str(
                clip_weights), out=str(folder / "heads"), **trained_heads(clip_weights)))
            scored = evaluate_once(assemble(folder / "release", clip_weights, heads_weights), scored_on,
                                   folder / "evaluation", device=config.device, seed=config.seed,
                                   token_memo=scored_tokens, **{**options, "lime_max": 0, **scored_options})
            return {**scaling_point(fraction, subset, scored), "clip_steps": steps}

        full = {**scaling_point(1.0, manifest, full_result), "clip_steps": clip_config.steps}
        curve = timer.run("scaling", lambda: [*(point(f) for f in sorted(config.scaling["fractions"]) if f < 1), full])
        write_scaling(curve, out / EVALUATION_FOLDER)
        write_card(with_scaling=True)
    print(f"release written to {out} ({json.dumps(timer.times)})", file=sys.stderr)
    return out


def evaluate_once(release: Path, manifest: Path, folder: Path, split: str = "test", token_memo: dict | None = None,
                  **options: Any) -> dict:
    """``training.evaluate`` on the test split, or its earlier result when the release files, the manifest
    and the options are the ones it was computed with (a resumed release does not evaluate twice);
    ``token_memo`` as in ``training.evaluate.evaluate``."""
    key = cache_key(manifest=file_digest(manifest), split=split, options=options, weights={
        path.name: weights_digest(path) for path in sorted(release.glob("*.safetensors"))})
    key_file = folder / "eval.key"
    if key_file.exists() and key_file.read_text() == key and (folder / EVAL_JSON).exists():
        return json.loads((folder / EVAL_JSON).read_text(encoding="utf-8"))
    result = evaluate(release, manifest, split=split, out=folder, token_memo=token_memo, **options)
    key_file.write_text(key, encoding="utf-8")
    return result


def subset_manifest(manifest: Path, fraction: float, seed: int, path: Path) -> Path:
    """A manifest keeping ``fraction`` of the training patients (a seeded draw) and every val/test study; it
    reads the full token cache (studies absent from the manifest are simply not used)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a scaling fraction must be in (0, 1], got {fraction}")
    entries = read_manifest(manifest)
    patients = sorted({e.patient_id for e in entries if e.split == "train"})
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CA1E]))
    kept = set(rng.permutation(patients)[: max(1, round(fraction * len(patients)))].tolist())
    return write_manifest([e for e in entries if e.split != "train" or e.patient_id in kept], path)


def scaling_point(fraction: float, manifest: Path, result: dict) -> dict:
    """A point of the curve: the training studies of ``manifest`` and the figures of the evaluation ``result``."""
    return {"fraction": fraction, "train_studies": sum(e.split == "train" for e in read_manifest(manifest)),
            "scored_on": result["provenance"]["manifest"], "studies_scored": result["studies"],
            "mean_auroc": result["diagnosis"]["mean_auroc"], "mean_ci_low": result["diagnosis"].get("mean_ci_low"),
            "mean_ci_high": result["diagnosis"].get("mean_ci_high"),
            "labels_scored": result["diagnosis"]["n_labels_scored"],
            "unk_mean_auroc": result["diagnosis_unk_names"]["mean_auroc"],
            "abnormal_auroc": normal_vs_abnormal(result.get("ladder") or {})}


def write_scaling(curve: list[dict], folder: Path) -> None:
    """``scaling.json`` and ``scaling.png`` (mean test AUROC against the number of training studies)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    (folder / SCALING_JSON).write_text(json.dumps(curve, indent=1) + "\n", encoding="utf-8")
    figure = Figure(figsize=(4.5, 3.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = [p for p in curve if p["mean_auroc"] is not None]
    axes.plot([p["train_studies"] for p in points], [p["mean_auroc"] for p in points], "o-")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("training studies")
    axes.set_ylabel("mean diagnosis AUROC (test)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / SCALING_PNG)


def _summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary.pop("history", None)
    summary.pop("validation", None)
    return summary


def _label_counts(manifest: Path) -> dict[str, dict[str, int]]:
    """Positives per label per split (the release data's counts)."""
    counts: dict[str, dict[str, int]] = {}
    for entry in read_manifest(manifest):
        split = counts.setdefault(entry.split, {"studies": 0})
        split["studies"] += 1
        for key, value in entry.labels.items():
            split[key] = split.get(key, 0) + int(value)
    return counts


def card_from_files(folder: Path, with_scaling: bool = True) -> str:
    """The model card of the release in ``folder`` rendered from the files its build wrote there: the
    evaluation, provenance, and the shifted, localisation and (``with_scaling``) scaling results of the
    sections its config has. The build writes its card so, and a built release's card follows a change of
    the card's code the same way, without training again."""
    evaluation = folder / EVALUATION_FOLDER

    def read(path: Path, wanted: Any = True) -> Any:
        return json.loads(path.read_text(encoding="utf-8")) if wanted and path.exists() else None

    provenance = read(evaluation / PROVENANCE_JSON)
    if provenance is None:
        raise FileNotFoundError(f"{evaluation / PROVENANCE_JSON} is missing: {folder} is not a built release")
    sections = provenance["config"]
    test_split = read(evaluation / EVAL_JSON)
    test_set = read(evaluation / "test_set" / EVAL_JSON, sections.get("test_set"))  # older releases have none
    read_on = "test_set/" if test_set is not None else ""
    return model_card(get_model_config(sections["model"]), test_set or test_split, provenance,
                      (evaluation / f"{read_on}{EVAL_MARKDOWN}").read_text(encoding="utf-8"),
                      f"{EVALUATION_FOLDER}/{read_on}{RELIABILITY_PNG}",
                      read(evaluation / SCALING_JSON, with_scaling and sections["scaling"].get("fractions")),
                      read(evaluation / "shifted" / EVAL_JSON, sections["shifted"]),
                      read(evaluation / "localisation" / EVAL_JSON, sections["localisation"]),
                      test_split if test_set is not None else None)


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a release folder to the Hugging Face Hub (needs network and a token); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=f"Prima release from commit {git_commit()}")
    return commit.commit_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.release", description=__doc__.splitlines()[0])
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--config", type=Path, help="release config (YAML or JSON)")
    task.add_argument("--rewrite-card", type=Path, metavar="RELEASE",
                      help="only write RELEASE/README.md again from the files its build left there")
    parser.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda)")
    parser.add_argument("--out", default=None, help="override the release folder")
    parser.add_argument("--work", default=None, help="override the work folder")
    parser.add_argument("--push-to-hub", metavar="OWNER/REPO", default=None, help="upload the release afterwards")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    args = parser.parse_args(argv)
    if args.rewrite_card:
        (args.rewrite_card / "README.md").write_text(card_from_files(args.rewrite_card), encoding="utf-8")
        return 0
    doc = read_config_file(args.config)
    for key in ("device", "out", "work"):
        if getattr(args, key) is not None:
            doc[key] = getattr(args, key)
    config = check_release_config(doc)
    command = "python -m training.release " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    with stop_on_terminate():
        folder = build(config, command)
    if args.push_to_hub:
        print(push_to_hub(folder, args.push_to_hub, args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
