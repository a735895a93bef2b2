"""The token cache: every series of a manifest through ``prima.tokens`` once, into memory-mapped shards.

    python -m training.token_cache --config training/configs/token-cache-lite.yaml
    torchrun --nnodes 4 --nproc_per_node 8 -m training.token_cache --config ...   # an archive, many machines

The cache lives in ``<out>/<key>/`` where the key hashes everything the tokens depend on (the manifest's
bytes, the splits, the preprocessing and filter settings, the volume tokenizer's config and weights), so
a changed input gives a new cache and a stale one is never read. Each process tokenizes every
``world_size``-th study and appends to its own shard; the main process writes ``index.json`` last, so a
folder with an index is complete. A token is stored as its 128 VQ-VAE codes (int16) plus the codebook,
so reading a cache reproduces the features of ``prima.tokens.tokenize_series`` bit for bit.

As in ``prima predict-batch`` (``prima.batch.prepared_studies``), ``workers`` DataLoader processes load
each study and cut it into filtered patches while this process encodes the previous one, so the encoder
does not wait on file reading and resampling (on a GPU; on a 2-core CPU the encoder already keeps both
cores busy, and 0, 1 or 2 workers took the same 36-41 s for 16 studies). A study that cannot be loaded or
preprocessed is recorded in the shard's ``skipped`` list with the reason, and the cache goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from prima.batch import DEFAULT_WORKERS, prepared_studies
from prima.config import PrimaConfig
from prima.distributed import resolve_device
from prima.factory import get_model_config
from prima.manifest import manifest_digest, read_manifest
from prima.precision import autocast_dtype
from prima.release import load_place_normal, load_volume_tokenizer
from prima.tokens import (SeriesTokens, StudyTokens, check_volume_tokenizer, code_dtype, encode_filtered,
                          place_normalised)
from training.runtime import add_config_arguments, cache_key, distributed, file_digest, load_stage_config

CACHE_VERSION = 1
INDEX_FILE = "index.json"
CODEBOOK_FILE = "codebook.npy"
# Per-token arrays (one row per token) and per-patch arrays (one row per patch of a series' grid).
_TOKEN_ARRAYS = {"codes": None, "coords": np.int16, "patch_indices": np.int32}
_PATCH_ARRAYS = {"fractions": np.float32}


@dataclass
class TokenCacheConfig:
    """What to tokenize and with what (``training/configs/token-cache-lite.yaml``)."""

    manifest: str  # manifest.jsonl listing the studies
    out: str  # cache root; this cache goes to <out>/<key>/
    volume_tokenizer: str  # volume_tokenizer.safetensors to encode with
    model: str = "prima-lite"  # model config whose preprocessing and background filter are used
    splits: tuple[str, ...] = ("train", "val", "test")  # manifest splits to cache
    min_fraction: float | None = None  # background threshold to encode at (default: the model config's);
    #                                    lower lets training re-filter at thresholds above it
    batch_size: int = 256  # patches per VQ-VAE call
    precision: str = "auto"  # the encoder's precision (prima.precision); predictions that should match use the same
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda
    threads: int | None = None  # torch CPU threads per process
    workers: int = DEFAULT_WORKERS  # DataLoader processes per process that load and patch studies (0 = in
    #                                 this process); they do not change the tokens, so not part of the key


def cache_folder(config: TokenCacheConfig, settings: PrimaConfig) -> Path:
    """``<out>/<key>``: the key covers everything the cached tokens depend on."""
    key = cache_key(version=CACHE_VERSION, manifest=manifest_digest(config.manifest), splits=sorted(config.splits),
                    preprocess=dataclasses.asdict(settings.preprocess),
                    volume_tokenizer=dataclasses.asdict(settings.volume_tokenizer),
                    weights=file_digest(config.volume_tokenizer), min_fraction=config.min_fraction,
                    precision=str(autocast_dtype(resolve_device(config.device), config.precision)))
    return Path(config.out) / key


class _ShardWriter:
    """Appends one process's series to raw arrays (``<name>.bin``) and remembers where each series lies."""

    def __init__(self, folder: Path, codes_dtype: np.dtype) -> None:
        self.folder = folder
        self.dtypes = {**_TOKEN_ARRAYS, "codes": codes_dtype, **_PATCH_ARRAYS}
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in self.dtypes}
        self.tokens = 0
        self.patches = 0
        self.series: list[dict] = []

    def add(self, study_id: str, tokens: SeriesTokens) -> None:
        arrays = {"codes": tokens.codes, "coords": tokens.coords, "patch_indices": tokens.patch_indices,
                  "fractions": tokens.fractions}
        for name, array in arrays.items():
            self.files[name].write(np.ascontiguousarray(array, dtype=self.dtypes[name]).tobytes())
        self.series.append({"study_id": study_id, "name": tokens.name, "plane": tokens.plane,
                            "through_axis": tokens.through_axis, "shape": list(tokens.shape),
                            "affine": np.asarray(tokens.affine).tolist(),
                            "tokens": [self.tokens, len(tokens)], "patches": [self.patches, len(tokens.fractions)]})
        self.tokens += len(tokens)
        self.patches += len(tokens.fractions)

    def close(self, skipped: list[dict]) -> None:
        for stream in self.files.values():
            stream.close()
        shard = {"dtypes": {name: np.dtype(dtype).str for name, dtype in self.dtypes.items()},
                 "series": self.series, "skipped": skipped, "tokens": self.tokens, "patches": self.patches}
        (self.folder / "shard.json").write_text(json.dumps(shard), encoding="utf-8")


def build_token_cache(config: TokenCacheConfig, progress: bool = True) -> Path:
    """Tokenize every series of the manifest's splits (sharded over torchrun processes); returns the cache
    folder. An existing complete cache with the same key is returned as it is."""
    if config.workers < 0:
        raise ValueError(f"workers must be >= 0, got {config.workers}")
    settings = get_model_config(config.model)
    if config.threads:
        torch.set_num_threads(config.threads)
    folder = cache_folder(config, settings)
    if (folder / INDEX_FILE).exists():
        return folder
    studies = read_manifest(config.manifest, config.splits)
    if not studies:
        raise ValueError(f"{config.manifest}: no study in splits {list(config.splits)}")
    with distributed(config.device) as context:
        volume_tokenizer = load_volume_tokenizer(config.volume_tokenizer, context.device)
        settings = dataclasses.replace(settings, volume_tokenizer=volume_tokenizer.config)
        check_volume_tokenizer(volume_tokenizer, settings)
        shard = folder / f"shard-{context.rank:05d}-of-{context.world_size:05d}"
        if shard.exists():  # left by an interrupted run: its content is incomplete
            shutil.rmtree(shard)
        shard.mkdir(parents=True)
        writer = _ShardWriter(shard, code_dtype(volume_tokenizer.config.codebook_size))
        skipped = []
        mine = studies[context.rank :: context.world_size]
        prepared = prepared_studies(mine, settings, config.workers, config.min_fraction)
        for study in tqdm(prepared, total=len(mine), desc=f"token cache [{context.rank}]", unit="study",
                          disable=not progress or not context.is_main):
            if study.error is not None:
                skipped.append({"study_id": study.study_id, "series": None, "reason": study.error})
                continue
            skipped += [{"study_id": study.study_id, "series": s["name"], "reason": s["reason"]}
                        for s in study.skipped]
            for series in study.series:
                writer.add(study.study_id, encode_filtered(series, volume_tokenizer, config.batch_size,
                                                           config.precision))
        writer.close(skipped)
        context.barrier()
        if context.is_main:
            np.save(folder / CODEBOOK_FILE, volume_tokenizer.quantizer.codebook.cpu().numpy())
            shards = sorted(p.name for p in folder.glob("shard-*") if p.name.endswith(f"-of-{context.world_size:05d}"))
            index = {"version": CACHE_VERSION, "config": dataclasses.asdict(config), "shards": shards,
                     "latent_grid": list(volume_tokenizer.latent_grid),
                     "latent_channels": volume_tokenizer.config.latent_channels}
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
        context.barrier()
    return folder


class TokenCache:
    """Read a token cache: the tokens of a study, as ``prima.tokens.StudyTokens``, from memory-mapped shards.

    Args:
        folder: a cache folder written by :func:`build_token_cache` (holding ``index.json``).
        read: applied to every study's tokens as they are read (``token_reader``); None keeps them as cached.
    """

    def __init__(self, folder: str | Path, read: Callable[[StudyTokens], StudyTokens] | None = None) -> None:
        self.folder = Path(folder)
        self.read = read  # applied to every study's tokens (``token_reader``: place deviations)
        if not (self.folder / INDEX_FILE).exists():
            raise FileNotFoundError(f"{self.folder} is not a complete token cache (no {INDEX_FILE})")
        self.index = json.loads((self.folder / INDEX_FILE).read_text(encoding="utf-8"))
        self._codebook = torch.from_numpy(np.load(self.folder / CODEBOOK_FILE))
        self._grid = tuple(self.index["latent_grid"])
        self._arrays: list[dict[str, np.ndarray]] = []
        self._series: dict[str, list[tuple[int, dict]]] = {}
        self.skipped: list[dict] = []
        for number, name in enumerate(self.index["shards"]):
            shard = json.loads((self.folder / name / "shard.json").read_text(encoding="utf-8"))
            self._arrays.append({array: self._memmap(self.folder / name / f"{array}.bin", np.dtype(dtype))
                                 for array, dtype in shard["dtypes"].items()})
            for series in shard["series"]:
                self._series.setdefault(series["study_id"], []).append((number, series))
            self.skipped += shard["skipped"]

    @staticmethod
    def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def study_ids(self) -> list[str]:
        return sorted(self._series)

    def latents(self, codes: np.ndarray) -> torch.Tensor:
        """(K, 256) latents of (K, 128) codes: the same layout as ``VQVAE.tokens_from_codes``."""
        vectors = self._codebook[torch.from_numpy(codes.astype(np.int64))]  # (K, x*y*z, channels)
        return vectors.reshape(len(codes), -1)

    def study_tokens(self, study_id: str, description: str = "") -> StudyTokens:
        """The cached tokens of every series of ``study_id`` (series that could not be loaded are absent)."""
        if study_id not in self._series:
            raise KeyError(f"study {study_id!r} is not in the token cache {self.folder}")
        series = []
        for number, info in self._series[study_id]:
            arrays = self._arrays[number]
            start, count = info["tokens"]
            first, patches = info["patches"]
            per_token = math.prod(self._grid)
            codes = np.asarray(arrays["codes"][start * per_token : (start + count) * per_token]).reshape(count, per_token)
            series.append(SeriesTokens(
                name=info["name"], plane=info["plane"], through_axis=info["through_axis"], shape=tuple(info["shape"]),
                affine=np.asarray(info["affine"]), fractions=np.asarray(arrays["fractions"][first : first + patches]),
                patch_indices=np.asarray(arrays["patch_indices"][start : start + count], dtype=np.int64),
                coords=np.asarray(arrays["coords"][start * 3 : (start + count) * 3], dtype=np.int64).reshape(count, 3),
                codes=codes, latents=self.latents(codes)))
        tokens = StudyTokens(description, series)
        return tokens if self.read is None else self.read(tokens)


def token_reader(config: PrimaConfig, place_normal: str | None) -> Callable[[StudyTokens], StudyTokens] | None:
    """How a model config reads cached tokens (``TokenCache``'s ``read``): as they are, or against the
    place-normal model saved at ``place_normal`` (``training.place_normal``), which a config reading place
    deviations requires.

    Deviations are computed again on every read rather than kept: 3.6 ms a study (1,750 tokens, one thread),
    about 4% of a training step of 16 studies, where keeping them would hold every training token's 256
    values in memory (1.3 GB for 716 studies)."""
    wants = config.vision.token_values == "place_deviation"
    if wants != (place_normal is not None):
        raise ValueError(f"model {config.name!r} reads token {config.vision.token_values}s: "
                         f"{'a place-normal model is needed' if wants else 'a place-normal model is not read'}")
    if place_normal is None:
        return None
    return functools.partial(place_normalised, model=load_place_normal(place_normal), config=config.volume_tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, TokenCacheConfig)
    config = load_stage_config(TokenCacheConfig, parser.parse_args(argv))
    folder = build_token_cache(config)
    cache = TokenCache(folder)
    print(f"{folder}: {len(cache.study_ids)} studies, {len(cache.skipped)} skipped series")


if __name__ == "__main__":
    main()
