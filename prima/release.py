"""The release format: what the app loads and what is pushed to the Hugging Face Hub (SPEC section 7).

A release is a folder::

    config.json             the PrimaConfig (preprocessing, tokenizer, model, labels, thresholds)
                            plus a "release" section naming the files below
    model.safetensors       the CLIP model: keys "visual.*", "text.*", "image_proj.*", "text_proj.*",
                            "logit_scale", "patdis_logit_scale"
    vqvae.safetensors       the VQ-VAE volume tokenizer (optional)
    heads.safetensors       the task heads, thresholds included (optional)
    tokenizer.json          the byte-level BPE report tokenizer (``tokenizers`` format)
    README.md               the model card

Weights are safetensors only (no pickles). ``load_release`` takes a local folder or
``hf://owner/repo[@revision]``, resolved through ``huggingface_hub.snapshot_download`` (which honours
``HF_HUB_OFFLINE`` and the local cache).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prima.config import PrimaConfig
from prima.errors import ConfigError, ReleaseError
from prima.models.clip import PrimaCLIP
from prima.models.heads import TaskHeads
from prima.models.text import TextTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "vqvae.safetensors"
HEADS_FILE = "heads.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer.json"  # the Hugging Face name for a tokenizers file
MODEL_CARD_FILE = "README.md"
HF_SCHEME = "hf://"


@dataclass
class Release:
    """A loaded release; modules are on the requested device in eval mode."""

    config: PrimaConfig
    model: PrimaCLIP
    text_tokenizer: TextTokenizer
    tokenizer: nn.Module | None  # the VQ-VAE, when the release ships one
    heads: TaskHeads | None  # the task heads, when the release ships them
    path: Path  # local folder the files were read from
    revision: str | None  # hub revision asked for, None for local folders


def build_heads(config: PrimaConfig, in_dim: int) -> TaskHeads:
    """Task heads sized by the config's label space, carrying the config's thresholds."""
    space = config.label_space
    return TaskHeads(
        in_dim,
        config.heads,
        n_diagnoses=len(space.diagnoses),
        n_referrals=len(space.referral_keys),
        n_tiers=len(space.priority_tiers),
        diagnosis_thresholds=config.diagnosis_thresholds,
        referral_thresholds=config.referral_thresholds,
    )


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors, ready for ``safetensors.torch.save_file``."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_release(
    directory: str | Path,
    model: PrimaCLIP,
    *,
    text_tokenizer: TextTokenizer,
    tokenizer: nn.Module | None = None,
    heads: TaskHeads | None = None,
    model_card: str | None = None,
) -> Path:
    """Write a release folder (created if needed; existing release files are overwritten).

    Args:
        directory: destination folder.
        model: the CLIP model; its config is written to ``config.json``.
        text_tokenizer: the report tokenizer the text tower was trained with.
        tokenizer: the VQ-VAE (``prima.models.vqvae.VQVAE``); its ``config`` replaces the model
            config's tokenizer section. ``None`` ships no tokenizer weights.
        heads: task heads; their thresholds are written into ``config.json`` too.
        model_card: markdown for ``README.md``; a minimal card is written when ``None``.

    Returns:
        the folder path.
    """
    if text_tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(
            f"text tokenizer has {text_tokenizer.vocab_size} tokens, the text tower only {model.config.text.vocab_size}"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if tokenizer is not None and hasattr(tokenizer, "config"):
        config = dataclasses.replace(config, tokenizer=tokenizer.config)
    if heads is not None:
        config = dataclasses.replace(
            config,
            diagnosis_thresholds=heads.diagnosis_thresholds.tolist(),
            referral_thresholds=heads.referral_thresholds.tolist(),
        )
    files = {"model": MODEL_FILE, "text_tokenizer": TEXT_TOKENIZER_FILE, "tokenizer": None, "heads": None}
    save_file(module_state(model), folder / MODEL_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        save_file(module_state(tokenizer), folder / TOKENIZER_FILE, metadata={"format": "pt"})
        files["tokenizer"] = TOKENIZER_FILE
    if heads is not None:
        save_file(module_state(heads), folder / HEADS_FILE, metadata={"format": "pt"})
        files["heads"] = HEADS_FILE
    text_tokenizer.save(folder / TEXT_TOKENIZER_FILE)
    doc = config.to_dict()
    doc["release"] = {"format_version": FORMAT_VERSION, "files": files}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    card = model_card if model_card is not None else f"# {config.name}\n\nA Prima release (format {FORMAT_VERSION}).\n"
    (folder / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
    return folder


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://owner/repo[@revision]`` -> (``owner/repo``, revision or None)."""
    if not uri.startswith(HF_SCHEME):
        raise ReleaseError(f"not a hub URI (expected {HF_SCHEME}owner/repo[@revision]): {uri!r}")
    repo, at, revision = uri[len(HF_SCHEME) :].partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or (at and not revision):
        raise ReleaseError(f"malformed hub URI {uri!r}: expected {HF_SCHEME}owner/repo[@revision]")
    return repo, revision or None


def _resolve(source: str | Path, cache_dir: str | Path | None, local_files_only: bool) -> tuple[Path, str | None]:
    if isinstance(source, str) and source.startswith(HF_SCHEME):
        from huggingface_hub import snapshot_download

        repo_id, revision = parse_hf_uri(source)
        try:
            folder = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
        except Exception as exc:  # the hub client raises many types: offline, not found, HTTP, gated
            raise ReleaseError(
                f"could not fetch {source}: {type(exc).__name__}: {exc}. Offline (HF_HUB_OFFLINE=1) only the "
                "local Hugging Face cache is used; download it once with network, or pass a local folder."
            ) from exc
        return Path(folder), revision
    folder = Path(source)
    if not folder.is_dir():
        raise ReleaseError(f"release folder {str(folder)!r} does not exist")
    return folder, None


def _read_config(folder: Path) -> tuple[PrimaConfig, dict]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ReleaseError(f"{folder}: missing {CONFIG_FILE}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path}: not valid JSON: {exc}") from exc
    release = doc.pop("release", None)
    if not isinstance(release, dict) or release.get("format_version") != FORMAT_VERSION:
        raise ReleaseError(f"{path}: not a release config of format {FORMAT_VERSION} (no matching 'release' section)")
    try:
        config = PrimaConfig.from_dict(doc)
    except (ConfigError, TypeError) as exc:
        raise ReleaseError(f"{path}: invalid model config: {exc}") from exc
    return config, release["files"]


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``module``; a missing, corrupted or mismatched file raises ``ReleaseError``."""
    if not path.is_file():
        raise ReleaseError(f"missing weight file {path}")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise ReleaseError(f"{path}: corrupted or truncated safetensors file: {exc}") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ReleaseError(
            f"{path}: weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ReleaseError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the config expects {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state)


def load_release(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Release:
    """Load a release from a local folder or ``hf://owner/repo[@revision]``.

    Args:
        source: folder path or hub URI.
        device: where to put the modules.
        cache_dir: Hugging Face cache folder (default: the hub client's, e.g. ``HF_HUB_CACHE``).
        local_files_only: never contact the hub (``HF_HUB_OFFLINE=1`` does the same).

    Raises:
        ReleaseError: missing file, corrupted or mismatched weights, unreachable hub repository.
    """
    folder, revision = _resolve(source, cache_dir, local_files_only)
    config, files = _read_config(folder)
    model = PrimaCLIP(config)
    load_weights(model, folder / (files.get("model") or MODEL_FILE))
    text_path = folder / (files.get("text_tokenizer") or TEXT_TOKENIZER_FILE)
    if not text_path.is_file():
        raise ReleaseError(f"{folder}: missing {text_path.name}")
    try:
        text_tokenizer = TextTokenizer.load(text_path)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ReleaseError(f"{text_path}: unreadable text tokenizer: {exc}") from exc
    tokenizer = None
    if files.get("tokenizer"):
        from prima.models.vqvae import VQVAE

        tokenizer = VQVAE(config.tokenizer)
        load_weights(tokenizer, folder / files["tokenizer"])
    heads = None
    if files.get("heads"):
        heads = build_heads(config, model.visual.embed_dim)
        load_weights(heads, folder / files["heads"])
    for module in (model, tokenizer, heads):
        if module is not None:
            module.to(device).eval()
    return Release(config, model, text_tokenizer, tokenizer, heads, folder, revision)
