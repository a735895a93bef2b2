"""Fit the place-normal model (``prima.models.place_normal``) on the normal training studies' cached tokens.

    python -m training.place_normal --manifest DATA/manifest.jsonl --token-cache CACHE/<key> --out runs/place-normal \
        --model prima-lite-head

Every training series gets a kind: the k-means cluster (``kinds`` clusters) of its mean latent, over the tokens
the model's background filter keeps, standardised over the training series. Then, over the tokens of the
training studies with no positive diagnosis, each place (kind, plane, patch index) with at least ``min_count``
tokens gets the mean and s.d. of their latent; an s.d. is raised to at least half its median over the places
(per latent value), so a place where a value barely varied does not turn noise into a large deviation.
Needs a head-grid cache: elsewhere a patch index is not the same place from one study to the next.
Writes ``<out>/place_normal.safetensors`` and ``<out>/place_normal.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm import tqdm

from prima.config import LATENT_DIM, PLANES
from prima.factory import get_model_config
from prima.models.place_normal import PlaceNormalModel, place_keys
from prima.release import PLACE_NORMAL_FILE, save_place_normal
from training.runtime import config_dict, git_commit, parse_stage_args, print_on_main
from training.study_data import token_studies
from training.token_cache import TokenCache

SUMMARY_FILE = "place_normal.json"


@dataclass
class PlaceNormalFitConfig:
    """One fit of the place-normal model."""

    manifest: str  # manifest.jsonl of the studies (its training split is used)
    token_cache: str  # token cache folder of that manifest, built on the head grid
    out: str  # run folder: place_normal.safetensors, place_normal.json
    model: str = "prima-lite-head"  # model config (its background filter decides the tokens a kind is found from)
    kinds: int = 16  # k-means clusters of the series' mean latents (series kinds found without names)
    min_count: int = 20  # normal tokens a place needs to be modelled
    seed: int = 0  # seeds k-means


def series_kind_means(studies, config) -> tuple[np.ndarray, list[int]]:
    """(S, 256) mean latent of every series of ``studies`` over the tokens the config's filter keeps, and the
    number of series of each study."""
    tokenizer = config.volume_tokenizer
    means, counts = [], []
    for study in tqdm(studies, desc="series kinds", unit="study", leave=False):
        series_list = study.tokens().series
        counts.append(len(series_list))
        for series in series_list:
            kept = series.refilter(tokenizer.min_foreground_fraction, tokenizer.min_tokens)
            means.append(kept.latents.mean(0).numpy())
    return np.array(means, dtype=np.float64), counts


def fit(config: PlaceNormalFitConfig) -> Path:
    """Fit the model; returns the path of ``place_normal.safetensors`` (a finished fit of the same config is kept)."""
    if config.kinds < 1 or config.min_count < 2:
        raise ValueError(f"kinds must be >= 1 and min_count >= 2, got {config.kinds} and {config.min_count}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path, summary_path = out / PLACE_NORMAL_FILE, out / SUMMARY_FILE
    if path.exists() and summary_path.exists() and (
            json.loads(summary_path.read_text(encoding="utf-8"))["config"] == config_dict(config)):
        return path
    started = time.perf_counter()
    settings = get_model_config(config.model)
    if settings.preprocess.grid != "head":
        raise ValueError(f"model {config.model!r} uses the {settings.preprocess.grid!r} grid: a place-normal model "
                         "needs the head grid")
    cache = TokenCache(config.token_cache)
    if cache.index["config"].get("model") and get_model_config(cache.index["config"]["model"]).preprocess.grid != "head":
        raise ValueError(f"{config.token_cache} was not built on the head grid")
    studies = token_studies(config.manifest, cache, ["train"])
    if not any(not study.abnormal for study in studies):
        raise ValueError(f"{config.manifest}: no normal training study has cached tokens in {config.token_cache}")
    means, series_counts = series_kind_means(studies, settings)
    if len(means) < config.kinds:
        raise ValueError(f"{len(means)} training series cannot make {config.kinds} kinds")
    centre, scale = means.mean(0), means.std(0) + 1e-6
    kmeans = KMeans(config.kinds, n_init=10, random_state=config.seed).fit((means - centre) / scale)

    # sums over patch indices per (kind, plane), grown as indices appear
    first: dict[tuple[int, int], np.ndarray] = {}
    second: dict[tuple[int, int], np.ndarray] = {}
    count: dict[tuple[int, int], np.ndarray] = {}
    starts = np.cumsum([0, *series_counts])  # each study's first row in ``means``
    for index, study in enumerate(tqdm(studies, desc="normal places", unit="study", leave=False)):
        if study.abnormal:
            continue
        for row, series in enumerate(study.tokens().series, start=starts[index]):
            group = (int(kmeans.labels_[row]), PLANES.index(series.plane))
            size = int(series.patch_indices.max()) + 1
            if group not in count or len(count[group]) < size:
                for table, width in ((first, (LATENT_DIM,)), (second, (LATENT_DIM,)), (count, ())):
                    grown = np.zeros((size, *width))
                    if group in table:
                        grown[: len(table[group])] = table[group]
                    table[group] = grown
            latents = series.latents.numpy().astype(np.float64)
            np.add.at(first[group], series.patch_indices, latents)
            np.add.at(second[group], series.patch_indices, latents ** 2)
            np.add.at(count[group], series.patch_indices, 1)
    keys, means_out, spreads = [], [], []
    for kind, plane in sorted(count):  # keys come out sorted: kind, then plane, then patch index
        usable = np.flatnonzero(count[kind, plane] >= config.min_count)
        n = count[kind, plane][usable, None]
        mean = first[kind, plane][usable] / n
        keys.append(place_keys(torch.tensor(kind), plane, torch.from_numpy(usable)).numpy())
        means_out.append(mean)
        spreads.append(np.sqrt(np.maximum(second[kind, plane][usable] / n - mean ** 2, 0.0)))
    keys = np.concatenate(keys)
    if not len(keys):
        raise ValueError(f"no place holds {config.min_count} tokens of the normal training studies: nothing to model")
    spread = np.concatenate(spreads)
    spread = np.maximum(spread, 0.5 * np.median(spread, axis=0))
    model = PlaceNormalModel(config.kinds, len(keys))
    model.kind_centre.copy_(torch.from_numpy(centre))
    model.kind_scale.copy_(torch.from_numpy(scale))
    model.centroids.copy_(torch.from_numpy(kmeans.cluster_centers_))
    model.set_places(torch.from_numpy(keys), torch.from_numpy(np.concatenate(means_out)), torch.from_numpy(spread))
    save_place_normal(model, path)
    summary = {"places": len(keys), "kinds": config.kinds, "train_series": len(means),
               "normal_studies": sum(not s.abnormal for s in studies), "train_studies": len(studies),
               "series_per_kind": np.bincount(kmeans.labels_, minlength=config.kinds).tolist(),
               "bytes": path.stat().st_size, "seconds": time.perf_counter() - started, "commit": git_commit(),
               "config": config_dict(config)}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


def parse_args(argv: list[str] | None = None) -> PlaceNormalFitConfig:
    return parse_stage_args(PlaceNormalFitConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    print_on_main(fit(parse_args(argv)))


if __name__ == "__main__":
    main()
