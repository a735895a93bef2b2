"""Small, fast experiments on the hViT recipe (docs/training.md, "What makes the hViT learn"): one change at a
time, measured against the spread between seeds, on a token cache of a synthetic data set.

    python -m training.synth --n 1000 --out DATA --seed 11 --balance 1 --stratify --protocol-blind all
    torchrun --standalone --nproc_per_node 2 -m training.token_cache --manifest DATA/manifest.jsonl --out CACHE \
        --volume-tokenizer assets/volume-tokenizer-lite/volume_tokenizer.safetensors --min-fraction 0.02 --threads 1
    python benchmarks/recipe_ablation.py --data DATA --cache CACHE/<key> --out RUNS --name base --seed 0 \
        [--sampler random|all|salient|block] [--aux-lesion 1] [--mtp-steps 300] [--no-pos-weight] [--depth N] \
        [--place-normal [--place-form z|deviation]] [--task all|dx|abnormal] [--pool registers|topk] \
        [--abnormal-weight W] ...

A cache built with ``--model prima-lite-head`` holds tokens of the head grid (docs/design.md §2), where
``--place-normal`` compares each token with the normal training studies' tokens at the same place.

A fresh lite hViT (the sequence and study ViTs of prima-lite) and the task heads train on the labels (diagnoses
with positive-weighted BCE, referrals, priority: recipe (a) without CLIP) with the CLIP stage's augmentations;
options add a dense lesion loss on the sequence ViT's token outputs (needs the manifest's lesion masks), or
masked-token pre-training of the sequence ViT before the labels (a latent-space masked prediction, the idea of
Vol-JEPA). ``--task abnormal`` trains one normal-vs-abnormal logit alone; ``--pool topk`` reads that logit and the
diagnosis logits as the mean of a study's 8 largest token scores (linear scores of the sequence ViT's token
outputs, over all its series: the pooling of token_signal's ``mil``) instead of from the study embedding. Scored on
100 training studies (is it fitting?), val and test: normal vs abnormal from the largest diagnosis logit and from
the abnormal logit, mean diagnosis and referral AUROC, priority Spearman, and linear probes on the frozen study
embedding fitted on the training split; val and test again with every series name and study description "unk".
One JSON line per run is appended to RUNS/results.jsonl, and every split's logits to RUNS/NAME_sSEED_logits.npz.
"""
import argparse, dataclasses, json, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from prima.factory import get_model_config
from prima.models.clip import PrimaVisual
from prima.models.heads import TaskHeads
from prima.models.batching import pack_studies
from prima.manifest import read_manifest
from prima.precision import autocast, autocast_dtype
from training.token_cache import TokenCache
from training.study_data import label_targets, step_rng, global_batch
from training.metrics import auroc
from training.runtime import warmup_cosine, attention_kernel
from training.lesion_masks import token_lesion_overlap
from sklearn.linear_model import LogisticRegression

p = argparse.ArgumentParser()
p.add_argument("--data", type=Path, required=True, help="data set folder (manifest.jsonl)")
p.add_argument("--cache", type=Path, required=True, help="token cache folder of that manifest (holding index.json)")
p.add_argument("--out", type=Path, required=True, help="folder for the run logs and results.jsonl")
p.add_argument("--name", required=True)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--max-tokens", type=int, default=128)
p.add_argument("--sampler", default="random")
p.add_argument("--depth", type=int, default=None)
p.add_argument("--heads", type=int, default=None)
p.add_argument("--mlp", type=int, default=None)
p.add_argument("--registers", type=int, default=None)
p.add_argument("--study-depth", type=int, default=None)
p.add_argument("--aux-lesion", type=float, default=0.0)
p.add_argument("--task", default="all", choices=("all", "dx", "abnormal"),
               help="all = diagnoses + referrals + priority; dx = diagnoses only; abnormal = one normal-vs-abnormal "
                    "logit only (the target of token_signal's mil)")
p.add_argument("--abnormal-weight", type=float, default=0.0,
               help="weight of the normal-vs-abnormal loss added to the task losses (--task abnormal: it alone)")
p.add_argument("--pool", default="registers", choices=("registers", "topk"),
               help="where the abnormal and diagnosis logits come from: the study embedding (registers: a linear "
                    "layer, and the task heads), or for each the mean of the study's 8 largest token scores, linear "
                    "scores of the sequence ViT's token outputs (topk)")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--train-n", type=int, default=None)
p.add_argument("--pretrained", default=None)
p.add_argument("--wd", type=float, default=0.05)
p.add_argument("--dropout", type=float, default=0.1)
p.add_argument("--mtp-steps", type=int, default=0)
p.add_argument("--no-pos-weight", action="store_true")
p.add_argument("--mtp-ratio", type=float, default=0.4)
p.add_argument("--place-normal", action="store_true",
               help="tokens enter as their latent's z against the normal training studies' tokens at the same place "
                    "(sequence, plane, patch index); a place is the same anatomy only on a head-grid cache")
p.add_argument("--place-min-count", type=int, default=20, help="normal tokens a place needs to be modelled")
p.add_argument("--place-kind", type=int, default=0, metavar="K",
               help="with --place-normal: series share a normal model by the manifest's sequence (0), or by the "
                    "k-means cluster (of K) of their mean latent, which needs no names (token_signal.latent_clusters)")
p.add_argument("--place-form", default="z", choices=("z", "deviation"),
               help="with --place-normal: the signed z, or log1p(|z|) (token_signal's deviation feature)")
a = p.parse_args()
if not a.place_normal and (a.place_kind or a.place_form != "z"):
    p.error("--place-kind and --place-form need --place-normal")
TOP = 8  # --pool topk: a study's logit is the mean of its TOP largest token scores, as in token_signal's mil
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed); np.random.seed(a.seed)

DATA, CACHE = a.data, a.cache
a.out.mkdir(parents=True, exist_ok=True)
cache = TokenCache(CACHE)
config = get_model_config(cache.index["config"]["model"])  # prima-lite, or its head-grid variant
seq = config.vision.sequence
if a.depth: seq.depth = a.depth
if a.heads: seq.heads = a.heads
if a.mlp: seq.mlp_dim = a.mlp
if a.registers: seq.registers = a.registers
if a.study_depth: config.vision.study.depth = a.study_depth
space = config.label_space

entries = {s: [e for e in read_manifest(DATA / "manifest.jsonl", [s]) if e.study_id in set(cache.study_ids)]
           for s in ("train", "val", "test")}
if a.train_n:
    rng = np.random.default_rng(123)
    entries["train"] = [entries["train"][i] for i in sorted(rng.choice(len(entries["train"]), a.train_n, replace=False))]
tokens = {s: [cache.study_tokens(e.study_id, e.study_description) for e in es] for s, es in entries.items()}
targets = {s: label_targets(es, space) for s, es in entries.items()}


def place_normalise(entries, tokens, targets, min_count, form, kinds, clip=8.0):
    """Every token's latent as its z against the normal model of its place (series kind, plane, patch index) over
    the normal training studies' tokens (``token_signal.place_z``), clipped at +-``clip`` (``form`` "z"), or as
    log1p(|z|) (``form`` "deviation"); 0 where a place is not modelled. A series' kind is its sequence in the
    manifest (``kinds`` 0) or the k-means cluster of its mean latent (``kinds`` clusters)."""
    from token_signal import latent_clusters, place_z  # benchmarks/ is this script's folder

    keys, coords, in_model, latents, means, training = [], [], [], [], [], []
    normal = targets["train"][0].sum(1) == 0
    for split in tokens:
        for index, (entry, study) in enumerate(zip(entries[split], tokens[split])):
            sequence = {s.name: s.sequence for s in entry.series}
            for series in study.series:
                keys.append((sequence.get(series.name) or "unknown", series.plane))
                coords.append(series.coords)
                in_model.append(np.full(len(series), split == "train" and bool(normal[index])))
                latents.append(series.latents.numpy())
                means.append(latents[-1].mean(0))
                training.append(split == "train")
    if kinds:
        clusters = latent_clusters(np.array(means), np.flatnonzero(training), kinds)
        keys = [(int(cluster), plane) for cluster, (_, plane) in zip(clusters, keys)]
    place_of, places = {}, []
    for key, series_coords in zip(keys, coords):
        places.append([place_of.setdefault((*key, *map(int, c)), len(place_of)) for c in series_coords])
    latent = np.concatenate(latents)
    z = np.zeros(latent.shape, np.float32)
    for rows, values in place_z(latent, np.concatenate(places), np.concatenate(in_model), min_count):
        z[rows] = np.clip(values, -clip, clip) if form == "z" else np.log1p(np.abs(values))
    start = 0
    for split in tokens:
        for index, study in enumerate(tokens[split]):
            out = []
            for series in study.series:
                out.append(dataclasses.replace(series, latents=torch.from_numpy(z[start:start + len(series)])))
                start += len(series)
            tokens[split][index] = dataclasses.replace(study, series=out)


if a.place_normal:
    place_normalise(entries, tokens, targets, a.place_min_count, a.place_form, a.place_kind)
lesion = None
if a.aux_lesion:  # per-token lesion share of every training series with a mask
    lesion = {}
    for entry, study in zip(entries["train"], tokens["train"]):
        for s in study.series:
            if entry.lesion_masks:
                share = token_lesion_overlap(entry, s, config.preprocess, config.volume_tokenizer.patch_size)
                if share is not None:
                    lesion[(entry.study_id, s.name)] = share

visual = PrimaVisual(config.vision)
if a.pretrained:
    state = torch.load(a.pretrained, map_location="cpu")
    missing = visual.load_state_dict(state, strict=False)
    print("loaded pretrained", missing, flush=True)
from prima.config import HeadsConfig
heads = TaskHeads(visual.study_dim, HeadsConfig(hidden=256, dropout=a.dropout), len(space.diagnosis_keys),
                  len(space.referral_keys), len(space.priority_tiers))
token_head = torch.nn.Linear(289, 1) if a.aux_lesion else None
# the abnormal logit (column 0), and with --pool topk the diagnosis logits after it, scored per token
pooled_head = (torch.nn.Linear(289, 1 + len(space.diagnosis_keys)) if a.pool == "topk"
               else torch.nn.Linear(visual.study_dim, 1))
modules = torch.nn.ModuleList([visual, heads, pooled_head] + ([token_head] if token_head is not None else []))
decay = [q for n, q in modules.named_parameters() if q.ndim >= 2 and "registers" not in n]
no_decay = [q for n, q in modules.named_parameters() if not (q.ndim >= 2 and "registers" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
dtype = autocast_dtype(torch.device("cpu"), "auto")

dx, ref, tier = (torch.from_numpy(x) for x in targets["train"])
pos = dx.sum(0).float(); neg = len(dx) - pos
pos_weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))
if a.no_pos_weight: pos_weight = torch.ones_like(pos)
rpos = ref.sum(0).float(); rpos_weight = torch.where(rpos > 0, (len(ref) - rpos) / rpos.clamp(min=1), torch.ones_like(rpos))
if a.no_pos_weight: rpos_weight = torch.ones_like(rpos)
abnormal = dx.sum(1) > 0
prob = np.where(abnormal.numpy(), 3.0, 1.0); prob = prob / prob.sum()


def sample_tokens(series_tokens, rng):
    """Cap a series' tokens at max_tokens with the chosen sampler; returns (features, keep indices)."""
    n = len(series_tokens)
    if a.sampler == "all" or n <= a.max_tokens:
        return series_tokens
    if a.sampler == "random":
        keep = rng.choice(n, a.max_tokens, replace=False)
    elif a.sampler == "salient":  # half the budget: tokens farthest from the series' mean latent; half random
        lat = series_tokens.latents
        dist = ((lat - lat.mean(0)) ** 2).sum(1).numpy()
        k = a.max_tokens // 2
        top = np.argsort(-dist)[:k]
        rest = np.setdiff1d(np.arange(n), top)
        keep = np.concatenate([top, rng.choice(rest, a.max_tokens - k, replace=False)])
    elif a.sampler == "block":  # a contiguous neighbourhood: all tokens near a random centre (context kept)
        c = series_tokens.coords[rng.integers(n)]
        d = ((series_tokens.coords - c) ** 2).sum(1)
        keep = np.argsort(d + rng.random(n) * 0.1)[: a.max_tokens]
    return series_tokens.subset(keep)


def inputs_of(study_tokens, rng, train, study_id=None, unknown_names=False):
    series = list(study_tokens.series)
    if train and len(series) > 1:
        kept = [s for s in series if rng.random() >= 0.08]
        series = kept or [series[int(rng.integers(len(series)))]]
    pairs, lesion_targets = [], []
    for s in series:
        if train:
            s2 = s.refilter(float(rng.uniform(0.03, 0.15)), 25)
            s2 = sample_tokens(s2, rng)
            name = "unk" if rng.random() < 0.07 else s2.name
        else:
            s2 = s.refilter(0.05, 25)
            name = "unk" if unknown_names else s2.name
        pairs.append((s2.features, name))
        if lesion is not None and train:
            ov = lesion.get((study_id, s.name))
            if ov is None:
                lesion_targets.append(torch.zeros(len(s2)))
            else:
                lookup = dict(zip(s.patch_indices.tolist(), ov.tolist()))
                lesion_targets.append(torch.tensor([lookup.get(i, 0.0) for i in s2.patch_indices.tolist()], dtype=torch.float32))
    desc = "unk" if (train and rng.random() < 0.07) or unknown_names else study_tokens.description
    return pairs, desc, lesion_targets


def forward(batch_pairs, descs):
    """Study embeddings, the sequence ViT's token outputs and their mask, and the pooled logits: (B, 1) abnormal, or
    with --pool topk (B, 1 + diagnoses)."""
    batch = pack_studies(batch_pairs, descs, seq.series_name.max_length, config.vision.study.description.max_length)
    names = visual.series_name_encoder(batch.name_ids, batch.name_mask)
    series, token_out = visual.sequence_vit.encode_with_tokens(batch.tokens, batch.token_mask, names)
    vectors, mask = batch.study_layout(series)
    study = visual.encode_study(vectors, mask, batch.description_ids, batch.description_mask)
    if a.pool == "topk":  # per output, the mean of the study's TOP largest token scores over all its series
        scores = pooled_head(token_out.float()).masked_fill(~batch.token_mask[..., None], -torch.inf)
        per_study, usable = batch.study_layout(scores.flatten(1))  # (B, S, T * outputs)
        per_study = per_study.masked_fill(~usable[..., None], -torch.inf)
        per_study = per_study.unflatten(2, scores.shape[1:]).flatten(1, 2)  # (B, S * T, outputs)
        pooled = per_study.topk(TOP, dim=1).values.mean(1)
    else:
        pooled = pooled_head(study.float())
    return study, token_out, batch.token_mask, pooled


def diagnosis_logits(out, pooled):
    return pooled[:, 1:] if a.pool == "topk" else out.diagnosis_logits


@torch.no_grad()
def embed(split, unknown_names=False):
    visual.eval(); heads.eval()
    E, D, R, P, A = [], [], [], [], []
    ts = tokens[split]
    for i in range(0, len(ts), 16):
        chunk = [inputs_of(t, None, False, unknown_names=unknown_names) for t in ts[i:i + 16]]
        with autocast(torch.device("cpu"), dtype):
            study, _, _, pooled = forward([c[0] for c in chunk], [c[1] for c in chunk])
            out = heads(study)
        E.append(study.float()); D.append(diagnosis_logits(out, pooled).float()); R.append(out.referral_logits.float())
        P.append(out.priority_logits.float()); A.append(pooled[:, 0].float())
    return tuple(torch.cat(x).numpy() for x in (E, D, R, P, A))


def mean_auroc(y, s):
    vals = [auroc(y[:, c], s[:, c]) for c in range(y.shape[1])]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)), len(vals)


def metrics(split, E, D, R, P, A, probe=None):
    y, yr, yt = targets[split]
    ab = (y.sum(1) > 0).astype(int)
    out = {"abnormal_auroc": auroc(ab, D.max(1)), "abnormal_logit_auroc": auroc(ab, A),
           "dx_mean_auroc": mean_auroc(y, D)[0], "ref_mean_auroc": mean_auroc(yr, R)[0]}
    from scipy.stats import spearmanr
    probs = torch.softmax(torch.from_numpy(P), 1).numpy()
    out["priority_spearman"] = float(spearmanr(probs @ np.arange(probs.shape[1]), yt).statistic)
    if probe is not None:
        out.update(probe(split, E))
    return out


def make_probe():
    Etr, *_ = embed("train")
    y, _, _ = targets["train"]
    mu, sd = Etr.mean(0), Etr.std(0) + 1e-6
    ab = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit((Etr - mu) / sd, (y.sum(1) > 0))
    per = {}
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < len(y):
            per[c] = LogisticRegression(C=0.1, class_weight="balanced", max_iter=500).fit((Etr - mu) / sd, y[:, c])

    def probe(split, E):
        Z = (E - mu) / sd
        yy, _, _ = targets[split]
        s = np.zeros_like(yy, dtype=float)
        for c, m in per.items():
            s[:, c] = m.decision_function(Z)
        return {"probe_abnormal": auroc((yy.sum(1) > 0).astype(int), ab.decision_function(Z)),
                "probe_dx_mean": mean_auroc(yy[:, list(per)], s[:, list(per)])[0]}
    return probe


def masked_token_pretraining():
    """Masked latent prediction with the sequence ViT: a share of each series' tokens lose their latent (a
    learned mask vector instead, position and plane kept); a linear head predicts the latent from the output."""
    sv = visual.sequence_vit
    mask_vector = torch.nn.Parameter(torch.zeros(256))
    head = torch.nn.Linear(289, 256)
    params = list(sv.parameters()) + list(visual.series_name_encoder.parameters()) + [mask_vector] + list(head.parameters())
    o = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
    t0 = time.time()
    for step in range(a.mtp_steps):
        idx = global_batch(n_train, a.batch, np.full(n_train, 1 / n_train), a.seed + 99, step)
        rng = step_rng(a.seed + 99, step, 0)
        pairs = []
        for i in idx:
            for s in tokens["train"][i].series:
                s2 = sample_tokens(s.refilter(float(rng.uniform(0.03, 0.15)), 25), rng)
                pairs.append((s2.features, s2.name))
        batch = pack_studies([pairs], [""], seq.series_name.max_length, config.vision.study.description.max_length)
        x = batch.tokens
        hidden = (torch.rand(x.shape[:2]) < a.mtp_ratio) & batch.token_mask
        target = x[..., :256].clone()
        x = x.clone()
        x[..., :256] = torch.where(hidden[..., None], mask_vector.expand_as(x[..., :256]), x[..., :256])
        names = visual.series_name_encoder(batch.name_ids, batch.name_mask)
        with autocast(torch.device("cpu"), dtype), attention_kernel("auto", torch.device("cpu")):
            pred = head(sv.encode_with_tokens(x, batch.token_mask, names)[1].float())
        loss = ((pred - target) ** 2).mean(-1)[hidden].mean()
        lr = warmup_cosine(step, a.mtp_steps, max(1, a.mtp_steps // 10), a.lr)
        for g in o.param_groups: g["lr"] = lr
        o.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); o.step()
        if step % 20 == 0 or step == a.mtp_steps - 1:
            print(json.dumps({"mtp_step": step, "loss": float(loss), "s": time.time() - t0}), flush=True)


n_train = len(tokens["train"])
if a.mtp_steps:
    masked_token_pretraining()
started = time.time()
log = open(a.out / f"{a.name}_s{a.seed}.jsonl", "w")
modules.train()
for step in range(a.steps):
    idx = global_batch(n_train, a.batch, prob, a.seed, step)
    chunk = [inputs_of(tokens["train"][i], step_rng(a.seed, step, int(i)), True, entries["train"][i].study_id) for i in idx]
    lr = warmup_cosine(step, a.steps, max(1, a.steps // 10), a.lr)
    for g in opt.param_groups: g["lr"] = lr
    with autocast(torch.device("cpu"), dtype), attention_kernel("auto", torch.device("cpu")):
        study, token_out, token_mask, pooled = forward([c[0] for c in chunk], [c[1] for c in chunk])
        out = heads(study)
    abnormal_loss = F.binary_cross_entropy_with_logits(pooled[:, 0].float(), abnormal[idx].float())
    if a.task == "abnormal":
        loss = abnormal_loss
    else:
        loss = F.binary_cross_entropy_with_logits(diagnosis_logits(out, pooled).float(), dx[idx].float(),
                                                  pos_weight=pos_weight)
        loss = loss + a.abnormal_weight * abnormal_loss
    if a.task == "all":
        loss = loss + F.binary_cross_entropy_with_logits(out.referral_logits.float(), ref[idx].float(), pos_weight=rpos_weight)
        loss = loss + F.cross_entropy(out.priority_logits.float(), tier[idx])
    aux = torch.tensor(0.0)
    if token_head is not None:
        tl = token_head(token_out.float()).squeeze(-1)
        tgt = torch.zeros_like(tl)
        flat = [t for c in chunk for t in c[2]]
        for si, t in enumerate(flat):
            tgt[si, : len(t)] = (t > 0.25).float()
        aux = F.binary_cross_entropy_with_logits(tl[token_mask], tgt[token_mask], pos_weight=torch.tensor(10.0))
        loss = loss + a.aux_lesion * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
    opt.step()
    if step % 20 == 0 or step == a.steps - 1:
        rec = {"step": step, "loss": float(loss), "abnormal_loss": float(abnormal_loss), "aux": float(aux),
               "s": time.time() - started}
        print(json.dumps(rec), flush=True); log.write(json.dumps(rec) + "\n"); log.flush()

train_seconds = time.time() - started
probe = make_probe()
result = {"name": a.name, "seed": a.seed, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
          "train_seconds": train_seconds}
tokens["train100"] = tokens["train"][:100]; targets["train100"] = tuple(t[:100] for t in targets["train"])
outputs = {split: embed(split) for split in ("train100", "val", "test")}
for split, (E, D, R, P, A) in outputs.items():
    result[split] = metrics(split, E, D, R, P, A, probe=probe)
for split in ("val", "test"):  # every series name and study description "unk": what the names add
    result[f"{split}_unk_names"] = metrics(split, *embed(split, unknown_names=True))
# val and test together, so that more diagnoses have enough positives to be scored
held_out_dx = np.concatenate([targets[split][0] for split in ("val", "test")])
held_out_logits = np.concatenate([outputs[split][1] for split in ("val", "test")])
scored = held_out_dx.sum(0) >= 5
result["held_out_dx"] = {"mean_auroc": mean_auroc(held_out_dx[:, scored], held_out_logits[:, scored])[0]
                         if scored.any() else None, "diagnoses": int(scored.sum())}
np.savez_compressed(a.out / f"{a.name}_s{a.seed}_logits.npz",
                    **{f"{split}_{kind}": values for split, out in outputs.items()
                       for kind, values in zip(("diagnosis", "referral", "priority", "abnormal"), out[1:])})
result["n"] = {s: len(v) for s, v in tokens.items()}
print(json.dumps(result), flush=True)
with open(a.out / "results.jsonl", "a") as f:
    f.write(json.dumps(result) + "\n")
