"""What the volume tokens of a synthetic data set carry for a study-level decision, without the hViT
(docs/training.md, "What the tokens carry"). Normal vs abnormal, scored on the val and test splits.

    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT footprint
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT mil --features latent,position --seed 0
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT normative [--position-weight 3]
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT probe --features latent,neighbours \\
        [--cross-series]
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT probe --features intensity
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT grid --kernel 3 --seed 0
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT grid --supervision labels --width 16 \\
        --steps 250 --batch 8
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT atlas [--normals 1000]
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT latent-atlas

DATA and CACHE as for ``benchmarks/recipe_ablation.py`` (masks and images are preprocessed as the cache's model
config says); ``--extra-train DATA2 CACHE2`` (repeatable) adds another data set's training studies, for a
data-scaling point on the same val and test studies. The first call gathers every cached token (latent, grid
coordinates, RAS centre, plane) and its lesion overlap (the share of its patch inside any lesion mask) into
``OUT/tokens.npz``, and each series' sequence into ``OUT/sequence.npy``; later calls reuse them. Experiments (one JSON line each, appended
to ``OUT/results.jsonl``):

- ``footprint``: per split, the share of abnormal studies with a token more than a quarter inside its lesion
  (``--patch 16 16 4``: with patches of another size, counted on the masks);
- ``mil``: multiple-instance learning from the study label alone: a token MLP, the study's logit the mean of its
  top 8 token logits; reports train / val / test AUROC and how well its token scores find lesion tokens
  (``--features deviation``: each token's |z| against its place's normal model, as ``latent-atlas`` builds it);
- ``normative``: no labels but "normal": a token's distance to its 5 nearest tokens of normal training studies
  (whitened PCA of the latent, optionally its position: RAS, or with ``--frame template`` its centre in the
  synthetic template's frame, the head pose recorded in the manifest undone, or with ``--frame grid`` its
  patch-grid index, which on a cache of the ``head`` grid, ``--model prima-lite-head``, is the same place in every
  study), study score the mean of its top 8;
- ``probe``: a diagnostic ceiling that uses the masks: gradient boosting on lesion against clean tokens of the
  training studies, with the chosen features; ``--cross-series`` stacks the same place in the other series;
  ``intensity`` is the image before the VQ-VAE (each study preprocessed again, cached in ``OUT/intensity.npy``),
  to tell what the tokenizer loses; the result also gives each diagnosis's studies against the normal ones;
- ``grid``: a small 3D CNN over each series' latents laid out on the latent grid (8 x 8 x 2 positions a token,
  cached in ``OUT/grids.pkl``), so a lesion is looked for at the resolution of one latent position (4 x 4 x 2
  voxels) with its surroundings; trained on the masks (crops) or on the study label alone (whole studies);
- ``atlas``: no tokens: a voxel-wise normal model of the image (mean and s.d. of the normal training studies per
  sequence and plane) in the synthetic template's frame, in RAS, and in RAS centred on the head, read as |z|;
- ``latent-atlas``: the same on the tokens: a normal model of the latent per sequence, plane, patch index and latent
  position, read as |z|; a patch index is a place only on a head-grid cache (``--model prima-lite-head``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from einops import rearrange
from scipy import ndimage
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import adjusted_rand_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prima.batch import prepared_studies  # noqa: E402
from prima.config import PrimaConfig  # noqa: E402
from prima.factory import get_model_config  # noqa: E402
from prima.manifest import StudyEntry, load_entry_study, read_manifest  # noqa: E402
from prima.patching import patch_extent  # noqa: E402
from prima.preprocess import find_head_centre, preprocess_series  # noqa: E402
from training.lesion_masks import LESION_TOKEN_LEVEL, lesion_mask_on_grid, token_lesion_overlap  # noqa: E402
from training.metrics import auroc  # noqa: E402
from training.synth.anatomy import BOX_HI, BOX_LO, rotation_matrix  # noqa: E402
from training.study_data import label_targets  # noqa: E402
from training.token_cache import INDEX_FILE, TokenCache  # noqa: E402

SPLITS = ("train", "val", "test")
PLANES = ("axial", "coronal", "sagittal")
TOP = 8  # a study's score: the mean of its TOP largest token scores
PCA_DIM = 32
LATENT_BLOCK = (4, 4, 2)  # voxels of a canonical patch behind one latent position of the VQ-VAE
NORMALS, MIN_COUNT = 1000, 20  # place_deviations: normal training studies in the model, tokens a place needs
FEATURES = ("latent", "pca", "position", "template", "grid", "neighbours", "centred", "codes", "intensity",
            "deviation")


def cached_studies(data: Path, cache_folder: Path, extra_train: list[tuple[Path, Path]] = ()
                   ) -> dict[str, list[tuple[StudyEntry, TokenCache]]]:
    """Per split, the data set's (manifest entry, its token cache) pairs of the cached studies; the training
    studies of ``extra_train`` (data set, token cache) pairs join the training split."""
    caches = {folder: TokenCache(folder) for folder in [cache_folder, *(folder for _, folder in extra_train)]}
    studies = {}
    for split in SPLITS:
        studies[split] = []
        for source, folder in [(data, cache_folder), *(extra_train if split == "train" else ())]:
            have = set(caches[folder].study_ids)
            studies[split] += [(e, caches[folder]) for e in read_manifest(source / "manifest.jsonl", [split])
                               if e.study_id in have]
    return studies


def cache_model_config(cache_folder: Path, extra_train: list[tuple[Path, Path]] = ()) -> PrimaConfig:
    """The model config whose preprocessing the token cache (and every ``extra_train`` cache) was built with."""
    models = {json.loads((folder / INDEX_FILE).read_text())["config"]["model"]
              for folder in [cache_folder, *(f for _, f in extra_train)]}
    if len(models) != 1:
        raise ValueError(f"the token caches were built with different model configs: {sorted(models)}")
    return get_model_config(models.pop())


def gather(data: Path, cache_folder: Path, out: Path, extra_train: list[tuple[Path, Path]] = ()) -> Path:
    """Every cached token of the data set with its lesion overlap, in study order (train, val, test); the
    training studies of ``extra_train`` (data set, token cache) pairs join the training split."""
    path = out / "tokens.npz"
    if path.exists():
        return path
    config = cache_model_config(cache_folder, extra_train)
    columns = {name: [] for name in ("latent", "ras", "grid", "plane", "study", "series", "overlap")}
    sequences = []  # per series, as the manifest records it
    splits, first = {}, 0
    for split, studies in cached_studies(data, cache_folder, extra_train).items():
        splits[split] = {"first": first, "labels": label_targets([e for e, _ in studies], config.label_space)[0]}
        for entry, cache in studies:
            recorded = {s.name: s.sequence for s in entry.series}
            for s in cache.study_tokens(entry.study_id).series:
                sequences.append(recorded.get(s.name) or "unknown")
                extent = np.array(patch_extent(s.through_axis, config.volume_tokenizer.patch_size))
                centres = s.coords * extent + extent / 2 - 0.5
                overlap = token_lesion_overlap(entry, s, config.preprocess, config.volume_tokenizer.patch_size)
                columns["latent"].append(s.latents.numpy().astype(np.float16))
                columns["ras"].append((centres @ s.affine[:3, :3].T + s.affine[:3, 3]).astype(np.float32))
                columns["grid"].append(s.coords.astype(np.int16))
                columns["plane"].append(np.full(len(s), PLANES.index(s.plane), np.int8))
                columns["study"].append(np.full(len(s), first, np.int32))
                columns["series"].append(np.full(len(s), len(columns["series"]), np.int32))
                columns["overlap"].append(np.zeros(len(s), np.float32) if overlap is None else overlap)
            first += 1
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: np.concatenate(parts) for name, parts in columns.items()})
    np.save(out / "sequence.npy", np.array(sequences))
    (out / "splits.pkl").write_bytes(pickle.dumps(splits))
    return path


def patch_intensities(args) -> Path:
    """Every gathered token's preprocessed patch (before the VQ-VAE) averaged over the voxels behind each of its
    latent positions: 128 intensities, as many positions as the latent has. Cached in ``OUT/intensity.npy``."""
    path = args.out / "intensity.npy"
    if path.exists():
        return path
    config = cache_model_config(args.cache, args.extra_train)
    min_fraction = json.loads((args.cache / INDEX_FILE).read_text())["config"]["min_fraction"]
    parts = []
    for studies in cached_studies(args.data, args.cache, args.extra_train).values():
        prepared_in_order = prepared_studies([e for e, _ in studies], config, 1, min_fraction)
        for prepared, (entry, cache) in zip(prepared_in_order, studies):
            cached = cache.study_tokens(entry.study_id).series
            if prepared.error is not None or len(prepared.series) != len(cached):
                raise ValueError(f"{entry.study_id}: its series do not match the token cache ({prepared.error})")
            for patches, tokens in zip(prepared.series, cached):
                if not np.array_equal(patches.coords, tokens.coords):
                    raise ValueError(f"{entry.study_id}/{tokens.name}: kept patches differ from the cached tokens")
                pooled = rearrange(patches.patches, "n (x a) (y b) (z c) -> n x y z (a b c)", a=LATENT_BLOCK[0],
                                   b=LATENT_BLOCK[1], c=LATENT_BLOCK[2]).mean(-1)
                parts.append(pooled.reshape(len(pooled), -1).astype(np.float16))
    np.save(path, np.concatenate(parts))
    return path


def head_pose(entry: StudyEntry) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic head's pose the engine records in the manifest's ``subject``: the linear part (rotation times
    size) and the translation that take template millimetres to the subject's RAS."""
    pose = entry.subject
    if not {"rotation_deg", "scale", "translation_mm"} <= set(pose):
        raise ValueError(f"{entry.study_id}: the manifest records no synthetic head pose in 'subject'")
    return rotation_matrix(np.array(pose["rotation_deg"])) @ np.diag(pose["scale"]), np.array(pose["translation_mm"])


def template_positions(args) -> Path:
    """Every gathered token's centre in the synthetic template's frame: its RAS centre through the inverse of the
    head's pose (rotation, size, position) that the synthetic engine records in the manifest's ``subject``; the
    elastic deformation is left in. Cached in ``OUT/template.npy``."""
    path = args.out / "template.npy"
    if path.exists():
        return path
    ras, study = (np.load(args.out / "tokens.npz")[name] for name in ("ras", "study"))
    out = np.zeros_like(ras)
    entries = [entry for studies in cached_studies(args.data, args.cache, args.extra_train).values()
               for entry, _ in studies]
    for index, entry in enumerate(entries):
        forward, translation = head_pose(entry)
        rows = study == index
        out[rows] = (ras[rows] - translation) @ np.linalg.inv(forward).T
    np.save(path, out.astype(np.float32))
    return path


class Tokens:
    """The gathered tokens and the study-level views the experiments share."""

    def __init__(self, out: Path):
        self.out = out
        arrays = np.load(out / "tokens.npz")
        self.latent = arrays["latent"].astype(np.float32)
        self.ras, self.grid, self.plane = arrays["ras"], arrays["grid"].astype(np.int64), arrays["plane"]
        self.study, self.series, self.overlap = arrays["study"], arrays["series"], arrays["overlap"]
        self.splits = pickle.loads((out / "splits.pkl").read_bytes())
        self.n_train = self.splits["val"]["first"]
        self.lesion = self.overlap > LESION_TOKEN_LEVEL
        self.clean = self.overlap == 0
        self.held_out = self.study >= self.n_train
        self.study_start = np.searchsorted(self.study, np.arange(self.study.max() + 2))

    def abnormal(self, split: str) -> np.ndarray:
        return self.splits[split]["labels"].max(axis=1).astype(int)

    def study_ids(self, split: str) -> np.ndarray:
        return self.splits[split]["first"] + np.arange(len(self.splits[split]["labels"]))

    def study_scores(self, token_scores: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's studies' largest token score and the mean of their TOP largest."""
        largest, top = [], []
        for index in self.study_ids(split):
            scores = np.sort(token_scores[self.study_start[index]:self.study_start[index + 1]])[::-1]
            largest.append(scores[0])
            top.append(scores[:TOP].mean())
        return np.array(largest), np.array(top)

    def study_auroc(self, token_scores: np.ndarray, split: str) -> dict:
        """Normal vs abnormal AUROC of the studies' largest and top-8 mean token scores."""
        largest, top = self.study_scores(token_scores, split)
        y = self.abnormal(split)
        return {"max": auroc(y, largest), f"top{TOP}": auroc(y, top)}

    def label_auroc(self, token_scores: np.ndarray, min_positives: int = 4) -> dict[str, float]:
        """Per diagnosis with ``min_positives`` held-out (val and test) studies: its studies against the normal
        ones, scored by the top-8 mean of their token scores."""
        top = np.concatenate([self.study_scores(token_scores, split)[1] for split in ("val", "test")])
        return self.diagnosis_auroc(top, min_positives)

    def diagnosis_auroc(self, study_scores: np.ndarray, min_positives: int = 4) -> dict[str, float]:
        """Per diagnosis with ``min_positives`` held-out studies: its studies against the normal ones, from one
        score per val and then test study."""
        labels = np.concatenate([self.splits[split]["labels"] for split in ("val", "test")])
        normal = labels.max(axis=1) == 0
        keys = get_model_config("prima-lite").label_space.diagnosis_keys
        return {key: auroc(np.r_[np.ones(labels[:, k].sum()), np.zeros(normal.sum())],
                           np.r_[study_scores[labels[:, k] == 1], study_scores[normal]])
                for k, key in enumerate(keys) if labels[:, k].sum() >= min_positives}

    def top_tokens(self, token_scores: np.ndarray) -> dict:
        """Where the TOP highest-scoring tokens of the held-out studies lie: in normal studies (the false
        positives), and in abnormal ones the share that are lesion tokens; distances from the synthetic
        template's centre (mm) when ``OUT/template.npy`` exists."""
        tops = {"normal": [], "abnormal": []}
        for split in ("val", "test"):
            for index, abnormal in zip(self.study_ids(split), self.abnormal(split)):
                start = self.study_start[index]
                order = np.argsort(token_scores[start:self.study_start[index + 1]])[::-1][:TOP]
                tops["abnormal" if abnormal else "normal"].append(start + order)
        tops = {kind: np.concatenate(rows) for kind, rows in tops.items()}
        result = {"abnormal_lesion_tokens": float(self.lesion[tops["abnormal"]].mean()),
                  "abnormal_touching_lesion": float((self.overlap[tops["abnormal"]] > 0).mean())}
        if (self.out / "template.npy").exists():
            distance = np.linalg.norm(np.load(self.out / "template.npy"), axis=1)
            result["distance_from_template_centre_mm"] = {
                "normal_top": float(distance[tops["normal"]].mean()),
                "abnormal_top": float(distance[tops["abnormal"]].mean()),
                "all_held_out": float(distance[self.held_out].mean())}
        return result

    def lesion_auroc(self, token_scores: np.ndarray) -> float | None:
        """Lesion against clean tokens of the held-out studies."""
        chosen = self.held_out & (self.lesion | self.clean)
        return auroc(self.lesion[chosen].astype(int), token_scores[chosen])

    def features(self, names: list[str], rng: np.random.Generator) -> np.ndarray:
        unknown = sorted(set(names) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {FEATURES}")
        sample = rng.choice(np.flatnonzero(~self.held_out), min(60000, int((~self.held_out).sum())), replace=False)
        mean = self.latent[sample].mean(0)
        _, _, vt = np.linalg.svd(self.latent[sample] - mean, full_matrices=False)
        pca = (self.latent - mean) @ vt[:PCA_DIM].T
        pca /= pca[sample].std(0)
        planes = np.eye(len(PLANES), dtype=np.float32)[self.plane]
        blocks = {"latent": (self.latent - mean) / (self.latent[sample].std(0) + 1e-6), "pca": pca,
                  "position": np.c_[self.ras / 100.0, planes], "grid": np.c_[self.grid, planes]}
        if "neighbours" in names:
            around = self._neighbour_mean(pca)
            blocks["neighbours"] = np.c_[around, pca - around]
        if "centred" in names:
            series_mean = np.zeros((self.series.max() + 1, pca.shape[1]), np.float32)
            np.add.at(series_mean, self.series, pca)
            blocks["centred"] = pca - (series_mean / np.bincount(self.series)[:, None])[self.series]
        if "template" in names:
            blocks["template"] = np.c_[np.load(self.out / "template.npy") / 100.0, planes]
        if "intensity" in names:
            intensity = np.load(self.out / "intensity.npy").astype(np.float32)
            blocks["intensity"] = (intensity - intensity[sample].mean(0)) / (intensity[sample].std(0) + 1e-6)
        if "deviation" in names:  # |z| of each latent position against its place's normal model, log-scaled
            blocks["deviation"] = np.log1p(place_deviations(self))
        if "codes" in names:  # the latent is 128 code positions x 2 channels: a small lesion moves a few
            grid = self.latent.reshape(len(self.latent), -1, 2)
            blocks["codes"] = np.c_[grid.max(1), grid.min(1), grid.std(1),
                                    np.abs(grid - grid.mean(1, keepdims=True)).max(1)]
        return np.concatenate([blocks[name] for name in names], axis=1).astype(np.float32)

    def _neighbour_mean(self, values: np.ndarray) -> np.ndarray:
        """Mean of each token's kept neighbours in its series' 3x3x3 patch block."""
        out = np.zeros_like(values)
        edges = np.r_[0, np.flatnonzero(np.diff(self.series)) + 1, len(self.series)]
        for start, stop in zip(edges[:-1], edges[1:]):
            coords = self.grid[start:stop]
            shape = tuple(coords.max(0) + 1)
            grid = np.zeros(shape + (values.shape[1],), np.float32)
            count = np.zeros(shape, np.float32)
            grid[tuple(coords.T)], count[tuple(coords.T)] = values[start:stop], 1
            total = ndimage.uniform_filter(grid, size=(3, 3, 3, 1), mode="constant")[tuple(coords.T)] * 27
            n = ndimage.uniform_filter(count, size=3, mode="constant")[tuple(coords.T)] * 27
            out[start:stop] = (total - values[start:stop]) / np.maximum(n - 1, 1)[:, None]
        return out


def patch_coverage(mask: np.ndarray, through_axis: int, patch_size: tuple[int, int, int]) -> np.ndarray:
    """Share of every patch of the grid (zero-padded at the far edges) inside ``mask``."""
    extent = patch_extent(through_axis, patch_size)
    padded = np.pad(mask.astype(np.float32), [(0, -n % e) for n, e in zip(mask.shape, extent)])
    blocks = padded.reshape(padded.shape[0] // extent[0], extent[0], padded.shape[1] // extent[1], extent[1],
                            padded.shape[2] // extent[2], extent[2])
    return blocks.mean(axis=(1, 3, 5))


def _lesion_patches(args, patch_size: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per split, per study: patches of any of its series more than a quarter inside a lesion, at ``patch_size``."""
    config = cache_model_config(args.cache)
    cache = TokenCache(args.cache)
    have = set(cache.study_ids)
    counts = {}
    for split in SPLITS:
        numbers = []
        for entry in read_manifest(args.data / "manifest.jsonl", [split]):
            if entry.study_id not in have:
                continue
            total = 0
            for s in cache.study_tokens(entry.study_id).series:
                mask = lesion_mask_on_grid(entry, s.name, None, s, config.preprocess)
                if mask is not None:
                    total += int((patch_coverage(mask, s.through_axis, patch_size) > LESION_TOKEN_LEVEL).sum())
            numbers.append(total)
        counts[split] = np.array(numbers)
    return counts


def footprint(tokens: Tokens, args) -> dict:
    result = {"patch": args.patch or "cached tokens"}
    by_patch = _lesion_patches(args, tuple(args.patch)) if args.patch else None
    for split in SPLITS:
        if by_patch is None:
            covered = np.array([tokens.lesion[tokens.study_start[i]:tokens.study_start[i + 1]].sum()
                                for i in tokens.study_ids(split)])
        else:
            covered = by_patch[split]
        covered = covered[tokens.abnormal(split) == 1]
        result[split] = {"abnormal": int(len(covered)),
                         "with_lesion_token": float((covered > 0).mean()) if len(covered) else None,
                         "with_5_lesion_tokens": float((covered >= 5).mean()) if len(covered) else None}
    return result


def mil(tokens: Tokens, args) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(tokens.features(args.features, np.random.default_rng(0)))
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(128, 1))
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    starts = tokens.study_start

    def study_logit(index: int) -> torch.Tensor:
        scores = net(x[starts[index]:starts[index + 1]])[:, 0]
        return scores.topk(min(TOP, len(scores))).values.mean()

    y = torch.tensor(tokens.abnormal("train"), dtype=torch.float32)
    for _ in range(args.epochs):
        net.train()
        order = rng.permutation(len(y))
        for batch in range(0, len(order), 16):
            chosen = order[batch:batch + 16]
            logits = torch.stack([study_logit(int(i)) for i in chosen])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[chosen])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        token_scores = net(x)[:, 0].numpy()
    return {"features": args.features, "seed": args.seed, "epochs": args.epochs,
            **{split: tokens.study_auroc(token_scores, split)[f"top{TOP}"] for split in SPLITS},
            "lesion_tokens": tokens.lesion_auroc(token_scores)}


def normative(tokens: Tokens, args) -> dict:
    rng = np.random.default_rng(0)
    names = ["pca"] + ([args.frame] if args.position_weight > 0 else [])
    x = tokens.features(names, rng)
    if args.position_weight > 0:  # millimetres in 20 mm units (or patch indices) times the weight; planes never mix
        x[:, PCA_DIM:PCA_DIM + 3] *= 5.0 * args.position_weight
        x[:, PCA_DIM + 3:] *= 100.0
    normal = tokens.splits["train"]["first"] + np.flatnonzero(tokens.abnormal("train") == 0)
    pool = np.flatnonzero(np.isin(tokens.study, normal))
    reference = torch.from_numpy(x[rng.choice(pool, min(args.pool, len(pool)), replace=False)])
    scores = np.zeros(len(x), np.float32)
    held = np.flatnonzero(tokens.held_out)
    for start in range(0, len(held), 1024):
        chunk = held[start:start + 1024]
        distances = torch.cdist(torch.from_numpy(x[chunk]), reference)
        scores[chunk] = distances.topk(5, dim=1, largest=False).values.mean(1).numpy()
    return {"position_weight": args.position_weight, "frame": args.frame, "pool": len(reference),
            **{split: tokens.study_auroc(scores, split) for split in ("val", "test")},
            "lesion_tokens": tokens.lesion_auroc(scores)}


def probe(tokens: Tokens, args) -> dict:
    rng = np.random.default_rng(0)
    x = tokens.features(args.features, rng)
    train = np.r_[np.flatnonzero(~tokens.held_out & tokens.lesion),
                  rng.choice(np.flatnonzero(~tokens.held_out & tokens.clean), args.clean, replace=False)]

    def fit(features: np.ndarray, rows: np.ndarray) -> HistGradientBoostingClassifier:
        return HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(features[rows], tokens.lesion[rows])

    scores = np.zeros(len(x), np.float32)
    scores[tokens.held_out] = fit(x, train).predict_proba(x[tokens.held_out])[:, 1]
    result = {"features": args.features, "lesion_tokens": tokens.lesion_auroc(scores),
              **{split: tokens.study_auroc(scores, split) for split in ("val", "test")},
              "by_label": tokens.label_auroc(scores), "top_tokens": tokens.top_tokens(scores)}
    if args.cross_series:
        # stage 1 out of fold on the training studies (two halves), then the same place in the other series
        half = rng.permutation(tokens.n_train) < tokens.n_train // 2
        in_half = half[np.minimum(tokens.study, tokens.n_train - 1)] & ~tokens.held_out
        for fold in (in_half, ~in_half & ~tokens.held_out):
            scores[fold] = fit(x, train[~fold[train]]).predict_proba(x[fold])[:, 1]
        stacked = np.c_[scores, _other_series(tokens, scores)]
        second = np.zeros(len(x), np.float32)
        second[tokens.held_out] = fit(stacked, train).predict_proba(stacked[tokens.held_out])[:, 1]
        result["cross_series"] = {"lesion_tokens": tokens.lesion_auroc(second),
                                  **{split: tokens.study_auroc(second, split) for split in ("val", "test")}}
    return result


def _other_series(tokens: Tokens, scores: np.ndarray, radius_mm: float = 12.0) -> np.ndarray:
    """Per token: the largest and mean score of the study's other series' tokens within ``radius_mm``."""
    out = np.zeros((len(scores), 2), np.float32)
    for index in range(len(tokens.study_start) - 1):
        start, stop = tokens.study_start[index], tokens.study_start[index + 1]
        series, local = tokens.series[start:stop], scores[start:stop]
        for i, near in enumerate(cKDTree(tokens.ras[start:stop]).query_ball_point(tokens.ras[start:stop], radius_mm)):
            near = np.asarray(near, dtype=np.int64)
            near = near[series[near] != series[i]]
            if len(near):
                out[start + i] = local[near].max(), local[near].mean()
    return out


def latent_grid_shape() -> np.ndarray:
    """Latent positions along each canonical axis of a token (8, 8, 2 for the 32 x 32 x 4 patch)."""
    return np.array(get_model_config("prima-lite").volume_tokenizer.patch_size) // np.array(LATENT_BLOCK)


def latent_grids(args) -> list[list[dict]]:
    """Per study (gather's order), per series: its token latents laid out as a 2-channel image on the latent
    grid (canonical axes: in-plane, in-plane, through; cropped to the kept tokens), which positions hold a
    kept token, and the share of each position's voxels inside a lesion. Cached in ``OUT/grids.pkl``."""
    path = args.out / "grids.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    config = cache_model_config(args.cache, args.extra_train)
    patch, latent = np.array(config.volume_tokenizer.patch_size), latent_grid_shape()
    studies = []
    for split_studies in cached_studies(args.data, args.cache, args.extra_train).values():
        for entry, cache in split_studies:
            series = []
            for s in cache.study_tokens(entry.study_id).series:
                order = [axis for axis in range(3) if axis != s.through_axis] + [s.through_axis]
                coords = s.coords[:, order]
                low, size = coords.min(0), coords.max(0) - coords.min(0) + 1
                blocks = np.zeros((*size, *latent, 2), np.float16)
                blocks[tuple((coords - low).T)] = s.latents.numpy().reshape(len(s), *latent, 2)
                kept = np.zeros(tuple(size), bool)
                kept[tuple((coords - low).T)] = True
                image = rearrange(blocks, "g0 g1 g2 a b c ch -> ch (g0 a) (g1 b) (g2 c)")
                lesion = np.zeros(image.shape[1:], np.uint8)
                mask = lesion_mask_on_grid(entry, s.name, None, s, config.preprocess)
                if mask is not None:
                    mask = np.moveaxis(mask, s.through_axis, -1).astype(np.float32)
                    start, stop = low * patch, (low + size) * patch
                    mask = np.pad(mask, [(0, max(0, b - n)) for b, n in zip(stop, mask.shape)])
                    mask = mask[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
                    lesion = np.round(patch_coverage(mask, 2, LATENT_BLOCK) * 255).astype(np.uint8)
                series.append({"image": image, "kept": kept, "lesion": lesion})
            studies.append(series)
    path.write_bytes(pickle.dumps(studies, protocol=pickle.HIGHEST_PROTOCOL))
    return studies


class GridDetector(torch.nn.Module):
    """A small 3D CNN over a series' latent grid: a lesion logit for every latent position. ``kernel`` 1 sees a
    position alone; 3 with dilations 1, 2, 4, 1 sees 17 positions (about 6 cm in-plane) around it."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        dilations = (1, 2, 4, 1) if kernel > 1 else (1, 1, 1, 1)
        layers, channels = [], 3
        for dilation in dilations:
            layers += [torch.nn.Conv3d(channels, width, kernel, padding=dilation * (kernel // 2), dilation=dilation),
                       torch.nn.GELU()]
            channels = width
        self.body = torch.nn.Sequential(*layers, torch.nn.Conv3d(width, 1, 1))

    def forward(self, image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(N, 2, X, Y, Z) standardised latents and (N, X, Y, Z) kept positions -> (N, X, Y, Z) logits."""
        return self.body(torch.cat([image * kept[:, None], kept[:, None]], dim=1))[:, 0]


def grid(tokens: Tokens, args) -> dict:
    """A latent-grid CNN, trained on the lesion masks (crops) or on the study label alone (whole studies)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    studies = latent_grids(args)
    n_train = tokens.n_train
    latent = latent_grid_shape()

    def kept_positions(series: dict) -> np.ndarray:
        return series["kept"].repeat(latent[0], 0).repeat(latent[1], 1).repeat(latent[2], 2)

    sample = np.concatenate([s["image"][:, kept_positions(s)].T for study in studies[:200] for s in study])
    mean, std = sample.astype(np.float32).mean(0), sample.astype(np.float32).std(0) + 1e-6

    def tensors(series: dict) -> tuple[torch.Tensor, torch.Tensor]:
        kept = torch.from_numpy(kept_positions(series).astype(np.float32))
        image = (torch.from_numpy(series["image"].astype(np.float32)) - torch.from_numpy(mean)[:, None, None, None])
        return image / torch.from_numpy(std)[:, None, None, None], kept

    net = GridDetector(args.width, args.kernel)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    abnormal = tokens.abnormal("train")
    started = time.perf_counter()
    for step in range(args.steps):
        if args.supervision == "masks":
            images, kepts, targets = [], [], []
            for _ in range(args.batch):
                series = studies[rng.integers(n_train)]
                s = series[rng.integers(len(series))]
                image, kept = tensors(s)
                lesion = s["lesion"] > LESION_TOKEN_LEVEL * 255
                where = np.argwhere(lesion) if lesion.any() and rng.random() < 0.5 else np.argwhere(kept.numpy() > 0)
                centre = where[rng.integers(len(where))]
                corner = [int(np.clip(c - e // 2, 0, max(n - e, 0)))
                          for c, e, n in zip(centre, args.crop, lesion.shape)]
                images.append(_crop(image, corner, args.crop))
                kepts.append(_crop(kept, corner, args.crop))
                targets.append(_crop(torch.from_numpy(lesion.astype(np.float32)), corner, args.crop))
            kept, target = torch.stack(kepts), torch.stack(targets)
            losses = torch.nn.functional.binary_cross_entropy_with_logits(net(torch.stack(images), kept), target,
                                                                          reduction="none")
            # lesion positions are rare even in crops centred on one: each class weighs half
            lesion_weight, clean_weight = target * kept, (1 - target) * kept
            loss = 0.5 * ((losses * lesion_weight).sum() / lesion_weight.sum().clamp(min=1)
                          + (losses * clean_weight).sum() / clean_weight.sum())
        else:
            chosen = rng.choice(n_train, min(args.batch, n_train), replace=False)
            logits = torch.stack([_study_logit(net, [tensors(s) for s in studies[i]]) for i in chosen])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.tensor(abnormal[chosen], dtype=torch.float32))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", file=sys.stderr)
    net.eval()
    result = {"supervision": args.supervision, "kernel": args.kernel, "width": args.width, "steps": args.steps,
              "seed": args.seed}
    held = {"lesion": [], "clean": []}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            ids = tokens.study_ids(split)[:100] if split == "train" else tokens.study_ids(split)
            largest, top = [], []
            for index in ids:
                scores = []
                for s in studies[index]:
                    image, kept = tensors(s)
                    logit = net(image[None], kept[None])[0]
                    inside = kept > 0
                    scores.append(logit[inside].numpy())
                    if split != "train":
                        held["lesion"].append(logit[inside & torch.from_numpy(s["lesion"] > LESION_TOKEN_LEVEL * 255)])
                        clean = logit[inside & torch.from_numpy(s["lesion"] == 0)]
                        held["clean"].append(clean[torch.from_numpy(rng.random(len(clean)) < 0.05)])
                values = np.sort(np.concatenate(scores))[::-1]
                largest.append(values[0])
                top.append(values[:TOP].mean())
            y = tokens.abnormal(split)[:len(ids)]
            result[split] = {"max": auroc(y, np.array(largest)), f"top{TOP}": auroc(y, np.array(top))}
    lesion, clean = torch.cat(held["lesion"]).numpy(), torch.cat(held["clean"]).numpy()
    result["lesion_positions"] = auroc(np.r_[np.ones(len(lesion)), np.zeros(len(clean))], np.r_[lesion, clean])
    return result


def atlas(tokens: Tokens, args) -> dict:
    """A voxel-wise model of normal heads: every series of ``--normals`` normal training studies resampled onto a
    grid in three frames: the synthetic template's (the head pose the engine records undone), RAS (pose left in),
    and RAS centred on the head's foreground centroid ("head": what a real export allows without a
    registration); per frame, sequence and plane, each voxel's mean and s.d. A held-out series scores as the mean
    of its TOP largest smoothed |z|, a study as its largest series score. No masks, no labels but "normal"."""
    config = cache_model_config(args.cache, args.extra_train)
    axes = [np.arange(low, high, args.spacing) for low, high in zip(BOX_LO, BOX_HI)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    shape = tuple(len(a) for a in axes)
    splits = cached_studies(args.data, args.cache, args.extra_train)
    frames = ("template", "ras", "head")

    def resampled(entry) -> list[tuple[tuple[str, str], dict[str, np.ndarray]]]:
        """Per series: (sequence, plane) and, per frame, its intensities on the grid (NaN outside the series)."""
        forward, translation = head_pose(entry)
        study = load_entry_study(entry)
        head_centre = find_head_centre(study.series)  # the head frame's origin, and the head grid's if the cache's
        ready_series = [preprocess_series(series, config.preprocess, head_centre) for series in study.series]
        world = {"template": points @ forward.T + translation, "ras": points,
                 "head": points - (BOX_LO + BOX_HI) / 2 + head_centre}
        sequences = {s.name: s.sequence for s in entry.series}
        out = []
        for ready in ready_series:
            to_voxel = np.linalg.inv(ready.affine)
            values = {frame: ndimage.map_coordinates(
                ready.array, (world[frame] @ to_voxel[:3, :3].T + to_voxel[:3, 3]).T, order=1, cval=np.nan,
                prefilter=False).reshape(shape).astype(np.float32) for frame in frames}
            out.append(((sequences.get(ready.name, "unknown"), ready.plane), values))
        return out

    normal = [entry for (entry, _), abnormal in zip(splits["train"], tokens.abnormal("train")) if not abnormal]
    sums: dict = {}
    for entry in normal[:args.normals]:
        for key, values in resampled(entry):
            for frame, array in values.items():
                total = sums.setdefault((frame, key), np.zeros((3, *shape), np.float64))
                seen = np.isfinite(array)
                total[0] += seen
                total[1][seen] += array[seen]
                total[2][seen] += array[seen] ** 2
    models = {}
    for (frame, key), (count, first, second) in sums.items():
        mean = first / np.maximum(count, 1)
        spread = np.sqrt(np.maximum(second / np.maximum(count, 1) - mean ** 2, 0.0))
        # a voxel's s.d. is at least half the median one, so that a few alike series do not make it tiny
        usable = count >= args.min_count
        floor = max(0.5 * float(np.median(spread[usable])), 1e-3) if usable.any() else 1.0
        models[frame, key] = (mean, np.maximum(spread, floor), usable)
    result = {"normals": min(len(normal), args.normals), "spacing_mm": args.spacing, "min_count": args.min_count}
    held_out: dict[str, list[float]] = {}
    for split in ("val", "test"):
        scores = {frame: [] for frame in frames}
        for entry, _ in splits[split]:
            best = {frame: 0.0 for frame in frames}
            for key, values in resampled(entry):
                for frame, array in values.items():
                    if (frame, key) not in models:
                        continue
                    mean, spread, usable = models[frame, key]
                    usable = usable & np.isfinite(array)
                    if not usable.any():
                        continue
                    z = np.abs(np.where(usable, (array - mean) / spread, 0.0))
                    smooth = ndimage.gaussian_filter(z, 1.0)[usable]
                    best[frame] = max(best[frame], float(np.sort(smooth)[::-1][:TOP].mean()))
            for frame in frames:
                scores[frame].append(best[frame])
        for frame in frames:
            result.setdefault(frame, {})[split] = auroc(tokens.abnormal(split), np.array(scores[frame]))
            held_out.setdefault(frame, []).extend(scores[frame])
    for frame in frames:
        result[frame]["by_label"] = tokens.diagnosis_auroc(np.array(held_out[frame]))
    return result


def place_z(latent: np.ndarray, place: np.ndarray, in_model: np.ndarray, min_count: int = MIN_COUNT,
            chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A normal model per place: the mean and s.d. of ``latent`` (any trailing shape) over the ``in_model`` tokens
    of each place (each value's s.d. at least half its median over the places), and every token's z against it.
    A token in the model is scored without itself; a place that then holds fewer than ``min_count`` tokens is left
    out. Yields (rows, z) in chunks of ``chunk`` tokens, since float64 copies of every latent would not fit.

    Args:
        latent: (N, ...) the tokens' latents.
        place: (N,) int place index of each token (e.g. sequence, plane and patch index).
        in_model: (N,) bool, the tokens of the normal studies the model is fitted on.
    """
    first = np.zeros((place.max() + 1, *latent.shape[1:]), np.float64)
    second, count = np.zeros_like(first), np.bincount(place[in_model], minlength=len(first)).astype(np.float64)
    for start in range(0, len(latent), chunk):
        rows = np.flatnonzero(in_model[start:start + chunk]) + start
        np.add.at(first, place[rows], latent[rows])
        np.add.at(second, place[rows], latent[rows].astype(np.float64) ** 2)
    usable = count >= min_count
    if not usable.any():
        raise ValueError(f"no place holds {min_count} tokens of the normal studies: nothing to model")
    per_value = (slice(None),) + (None,) * (latent.ndim - 1)
    spread = np.sqrt(np.maximum(second[usable] / count[usable][per_value]
                                - (first[usable] / count[usable][per_value]) ** 2, 0.0))
    floor = 0.5 * np.median(spread, axis=0)
    for start in range(0, len(latent), chunk):
        rows = np.arange(start, min(start + chunk, len(latent)))
        rows = rows[usable[place[rows]] & (count[place[rows]] - in_model[rows] >= max(min_count, 1))]
        own = in_model[rows][per_value]
        n = count[place[rows]][per_value] - own
        mean = (first[place[rows]] - own * latent[rows]) / n
        variance = (second[place[rows]] - own * latent[rows].astype(np.float64) ** 2) / n - mean ** 2
        yield rows, (latent[rows] - mean) / np.maximum(np.sqrt(np.maximum(variance, 0.0)), floor)


def series_kinds(tokens: Tokens, source: str = "manifest", clusters: int = 16, seed: int = 0) -> np.ndarray:
    """One int per gathered series saying which normal model it is compared with: its sequence as the manifest records
    it (``manifest``; ``OUT/sequence.npy``, written by ``gather``), one kind for all (``none``), or (``clusters``) the
    k-means cluster of its mean latent, fitted on the training series, which needs neither names nor labels."""
    if source == "manifest":
        return np.unique(np.load(tokens.out / "sequence.npy"), return_inverse=True)[1]
    if source == "none":
        return np.zeros(tokens.series.max() + 1, np.int64)
    if source != "clusters":
        raise ValueError(f"source must be manifest, clusters or none, got {source!r}")
    starts = np.r_[0, np.flatnonzero(np.diff(tokens.series)) + 1]  # a series' tokens are gathered together
    count = np.diff(np.r_[starts, len(tokens.series)])
    mean = np.add.reduceat(tokens.latent, starts, axis=0, dtype=np.float64) / count[:, None]
    return latent_clusters(mean, np.unique(tokens.series[~tokens.held_out]), clusters, seed)


def latent_clusters(series_mean: np.ndarray, training: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """The k-means cluster of every series' mean latent (S, 256), standardised and fitted on the ``training`` rows."""
    centre, spread = series_mean[training].mean(0), series_mean[training].std(0) + 1e-6
    model = KMeans(clusters, n_init=10, random_state=seed).fit((series_mean[training] - centre) / spread)
    return model.predict((series_mean - centre) / spread)


def place_deviations(tokens: Tokens, normals: int = NORMALS, min_count: int = MIN_COUNT,
                     kind: np.ndarray | None = None) -> np.ndarray:
    """(N, latent positions) |z| of every token's latent (the norm over its channels) against the normal model of its
    place (``place_z``): per series kind (``series_kinds``; default: the manifest's sequence), plane, patch index and
    latent position, over the tokens of ``normals`` normal training studies; 0 where a place is not modelled. On a
    head-grid cache a patch index is the same place in every study; on the paper's grid it is not."""
    positions = int(latent_grid_shape().prod())
    latent = tokens.latent.reshape(len(tokens.latent), positions, -1)
    kind = series_kinds(tokens) if kind is None else kind
    place = np.unique(np.c_[kind[tokens.series], tokens.plane, tokens.grid], axis=0, return_inverse=True)[1].ravel()
    normal = tokens.splits["train"]["first"] + np.flatnonzero(tokens.abnormal("train") == 0)
    out = np.zeros((len(latent), positions), np.float32)
    for rows, z in place_z(latent, place, np.isin(tokens.study, normal[:normals]), min_count):
        out[rows] = np.linalg.norm(z, axis=2)
    return out


def latent_atlas(tokens: Tokens, args) -> dict:
    """``atlas`` on the tokens (``place_deviations``): a held-out token scores as the largest |z| of its latent
    positions, a study as the mean of its TOP largest token scores."""
    kind = series_kinds(tokens, args.sequence, args.clusters)
    deviation = place_deviations(tokens, args.normals, args.min_count, kind)
    scores = deviation.max(axis=1)
    modelled = deviation[tokens.held_out].max(axis=1) > 0
    sequence = np.load(tokens.out / "sequence.npy")
    return {"normals": int(min((tokens.abnormal("train") == 0).sum(), args.normals)), "min_count": args.min_count,
            "sequence": args.sequence, "kinds": int(kind.max() + 1),
            "agreement_with_sequence": adjusted_rand_score(sequence, kind),
            "modelled_tokens": float(modelled.mean()),
            **{split: tokens.study_auroc(scores, split) for split in ("val", "test")},
            "lesion_tokens": tokens.lesion_auroc(scores), "by_label": tokens.label_auroc(scores)}


def _crop(array: torch.Tensor, corner: list[int], size: tuple[int, int, int]) -> torch.Tensor:
    """The last three axes of ``array`` cut to ``size`` from ``corner``, zero-padded where the array ends."""
    cut = array[(..., *(slice(c, c + e) for c, e in zip(corner, size)))]
    return torch.nn.functional.pad(cut, [p for axis in (2, 1, 0) for p in (0, size[axis] - cut.shape[axis - 3])])


def _study_logit(net: GridDetector, series: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Multiple-instance pooling for the label-only run: the mean of the study's TOP largest position logits."""
    logits = torch.cat([net(image[None], kept[None])[0][kept > 0] for image, kept in series])
    return logits.topk(min(TOP, len(logits))).values.mean()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data set folder (manifest.jsonl, masks)")
    parser.add_argument("--cache", type=Path, required=True, help="its token cache folder (holding index.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for tokens.npz and results.jsonl")
    parser.add_argument("--extra-train", type=Path, nargs=2, action="append", default=[], metavar=("DATA", "CACHE"),
                        help="another data set and its token cache whose training studies join the training split")
    commands = parser.add_subparsers(dest="command", required=True)
    footprint_parser = commands.add_parser("footprint", help="abnormal studies with a lesion token, per split")
    footprint_parser.add_argument("--patch", type=int, nargs=3, metavar=("IN_PLANE", "IN_PLANE", "THROUGH"),
                                  help="count patches of this size from the masks (default: the cached tokens)")
    learner = commands.add_parser("mil", help="multiple-instance learning from the study label alone")
    learner.add_argument("--features", default="latent", help=f"comma-separated, of {FEATURES}")
    learner.add_argument("--seed", type=int, default=0)
    learner.add_argument("--epochs", type=int, default=30)
    reference = commands.add_parser("normative", help="distance to normal training studies' tokens")
    reference.add_argument("--position-weight", type=float, default=0.0)
    reference.add_argument("--pool", type=int, default=200_000, help="reference tokens drawn")
    reference.add_argument("--frame", choices=("position", "template", "grid"), default="position",
                           help="where a token is: its RAS centre, that centre in the synthetic template's frame, or "
                                "its patch-grid index (the same place in every study on a head-grid cache)")
    diagnostic = commands.add_parser("probe", help="mask-supervised token classifier (a ceiling, not a recipe)")
    diagnostic.add_argument("--features", default="pca", help=f"comma-separated, of {FEATURES}")
    diagnostic.add_argument("--clean", type=int, default=150_000, help="clean training tokens drawn")
    diagnostic.add_argument("--cross-series", action="store_true")
    detector = commands.add_parser("grid", help="a 3D CNN over the latent grid (masks or study labels)")
    detector.add_argument("--supervision", choices=("masks", "labels"), default="masks")
    detector.add_argument("--kernel", type=int, choices=(1, 3), default=3)
    detector.add_argument("--width", type=int, default=32)
    detector.add_argument("--steps", type=int, default=1500)
    detector.add_argument("--batch", type=int, default=16, help="crops (masks) or studies (labels) a step")
    detector.add_argument("--crop", type=int, nargs=3, default=(32, 32, 8), help="latent positions (masks)")
    detector.add_argument("--lr", type=float, default=1e-3)
    detector.add_argument("--seed", type=int, default=0)
    voxels = commands.add_parser("atlas", help="a voxel-wise normal model in the template frame and in RAS")
    voxels.add_argument("--normals", type=int, default=300, help="normal training studies in the model")
    voxels.add_argument("--spacing", type=float, default=3.0, help="grid spacing, mm")
    voxels.add_argument("--min-count", type=int, default=20, help="series a voxel needs to be modelled")
    tokens_atlas = commands.add_parser("latent-atlas", help="a normal model of the latent per place (patch index)")
    tokens_atlas.add_argument("--normals", type=int, default=NORMALS, help="normal training studies in the model")
    tokens_atlas.add_argument("--min-count", type=int, default=MIN_COUNT, help="tokens a place needs to be modelled")
    tokens_atlas.add_argument("--sequence", choices=("manifest", "clusters", "none"), default="manifest",
                              help="which series share a normal model: those of one sequence as the manifest records "
                                   "it, of one k-means cluster of the series' mean latent (no names or labels, as in a "
                                   "real export), or all")
    tokens_atlas.add_argument("--clusters", type=int, default=16, help="k-means clusters for --sequence clusters")
    args = parser.parse_args(argv)
    if hasattr(args, "features"):
        args.features = args.features.split(",")
    started = time.perf_counter()
    gather(args.data, args.cache, args.out, args.extra_train)
    if "intensity" in getattr(args, "features", ()):
        patch_intensities(args)
    if "template" in getattr(args, "features", ()) or getattr(args, "frame", None) == "template":
        template_positions(args)
    tokens = Tokens(args.out)
    result = {"experiment": args.command,
              **{"footprint": footprint, "mil": mil, "normative": normative, "probe": probe,
                 "grid": grid, "atlas": atlas, "latent-atlas": latent_atlas}[args.command](tokens, args),
              "seconds": round(time.perf_counter() - started, 1)}
    line = json.dumps(result)
    print(line)
    with (args.out / "results.jsonl").open("a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
