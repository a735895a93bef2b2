"""What the volume tokens of a synthetic data set carry for a study-level decision, without the hViT
(docs/training.md, "What the tokens carry"). Normal vs abnormal, scored on the val and test splits.

    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT footprint
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT mil --features latent,position --seed 0
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT normative [--position-weight 3]
    python benchmarks/token_signal.py --data DATA --cache CACHE/<key> --out OUT probe --features latent,neighbours \\
        [--cross-series]

DATA and CACHE as for ``benchmarks/recipe_ablation.py``; ``--extra-train DATA2 CACHE2`` (repeatable) adds another
data set's training studies, for a data-scaling point on the same val and test studies. The first call gathers every cached token (latent, grid
coordinates, RAS centre, plane) and its lesion overlap (the share of its patch inside any lesion mask) into
``OUT/tokens.npz``; later calls reuse it. Experiments (one JSON line each, appended to ``OUT/results.jsonl``):

- ``footprint``: per split, the share of abnormal studies with a token more than a quarter inside its lesion
  (``--patch 16 16 4``: with patches of another size, counted on the masks);
- ``mil``: multiple-instance learning from the study label alone: a token MLP, the study's logit the mean of its
  top 8 token logits; reports train / val / test AUROC and how well its token scores find lesion tokens;
- ``normative``: no labels but "normal": a token's distance to its 5 nearest tokens of normal training studies
  (whitened PCA of the latent, optionally its position), study score the mean of its top 8;
- ``probe``: a diagnostic ceiling that uses the masks: gradient boosting on lesion against clean tokens of the
  training studies, with the chosen features; ``--cross-series`` stacks the same place in the other series.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from sklearn.ensemble import HistGradientBoostingClassifier

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prima.factory import get_model_config  # noqa: E402
from prima.manifest import read_manifest  # noqa: E402
from prima.patching import patch_extent  # noqa: E402
from training.lesion_masks import LESION_TOKEN_LEVEL, lesion_mask_on_grid, token_lesion_overlap  # noqa: E402
from training.metrics import auroc  # noqa: E402
from training.study_data import label_targets  # noqa: E402
from training.token_cache import TokenCache  # noqa: E402

SPLITS = ("train", "val", "test")
PLANES = ("axial", "coronal", "sagittal")
TOP = 8  # a study's score: the mean of its TOP largest token scores
PCA_DIM = 32
FEATURES = ("latent", "pca", "position", "grid", "neighbours", "centred", "codes")


def gather(data: Path, cache_folder: Path, out: Path, extra_train: list[tuple[Path, Path]] = ()) -> Path:
    """Every cached token of the data set with its lesion overlap, in study order (train, val, test); the
    training studies of ``extra_train`` (data set, token cache) pairs join the training split."""
    path = out / "tokens.npz"
    if path.exists():
        return path
    config = get_model_config("prima-lite")
    columns = {name: [] for name in ("latent", "ras", "grid", "plane", "study", "series", "overlap")}
    splits, first = {}, 0
    caches = {folder: TokenCache(folder) for folder in [cache_folder, *(folder for _, folder in extra_train)]}
    for split in SPLITS:
        sources = [(data, cache_folder), *(extra_train if split == "train" else ())]
        studies = []
        for source, folder in sources:
            have = set(caches[folder].study_ids)
            studies += [(e, caches[folder]) for e in read_manifest(source / "manifest.jsonl", [split])
                        if e.study_id in have]
        splits[split] = {"first": first, "labels": label_targets([e for e, _ in studies], config.label_space)[0]}
        for entry, cache in studies:
            for s in cache.study_tokens(entry.study_id).series:
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
    (out / "splits.pkl").write_bytes(pickle.dumps(splits))
    return path


class Tokens:
    """The gathered tokens and the study-level views the experiments share."""

    def __init__(self, out: Path):
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

    def study_auroc(self, token_scores: np.ndarray, split: str) -> dict:
        """Normal vs abnormal AUROC of the studies' largest and top-8 mean token scores."""
        largest, top = [], []
        for index in self.study_ids(split):
            scores = np.sort(token_scores[self.study_start[index]:self.study_start[index + 1]])[::-1]
            largest.append(scores[0])
            top.append(scores[:TOP].mean())
        y = self.abnormal(split)
        return {"max": auroc(y, np.array(largest)), f"top{TOP}": auroc(y, np.array(top))}

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
    config = get_model_config("prima-lite")
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
    names = ["pca"] + (["position"] if args.position_weight > 0 else [])
    x = tokens.features(names, rng)
    if args.position_weight > 0:  # RAS in 20 mm units times the weight; planes never mix
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
    return {"position_weight": args.position_weight, "pool": len(reference),
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
              **{split: tokens.study_auroc(scores, split) for split in ("val", "test")}}
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
    diagnostic = commands.add_parser("probe", help="mask-supervised token classifier (a ceiling, not a recipe)")
    diagnostic.add_argument("--features", default="pca", help=f"comma-separated, of {FEATURES}")
    diagnostic.add_argument("--clean", type=int, default=150_000, help="clean training tokens drawn")
    diagnostic.add_argument("--cross-series", action="store_true")
    args = parser.parse_args(argv)
    if hasattr(args, "features"):
        args.features = args.features.split(",")
    started = time.perf_counter()
    gather(args.data, args.cache, args.out, args.extra_train)
    tokens = Tokens(args.out)
    result = {"experiment": args.command,
              **{"footprint": footprint, "mil": mil, "normative": normative, "probe": probe}[args.command](tokens, args),
              "seconds": round(time.perf_counter() - started, 1)}
    line = json.dumps(result)
    print(line)
    with (args.out / "results.jsonl").open("a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
