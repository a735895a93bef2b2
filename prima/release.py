"""The release format: what the app loads and what is pushed to the Hugging Face Hub (docs/design.md section 7).

A release is a folder::

    config.json                    the PrimaConfig (preprocessing, volume tokenizer, model, labels,
                                   thresholds) plus a "release" section naming the files below
    model.safetensors              the CLIP model: keys "visual.*", "text.*", "image_proj.*",
                                   "text_proj.*", "logit_scale", "patdis_logit_scale"
    volume_tokenizer.safetensors   the VQ-VAE volume tokenizer, its config in the file's metadata (optional)
    heads.safetensors              the task heads, thresholds included (optional)
    place_normal.safetensors       the place-normal model the tokens are read against (optional;
                                   ``prima.models.place_normal``)
    report_tokenizer.json          the byte-level BPE report tokenizer (``tokenizers`` format)
    README.md                      the model card

A volume tokenizer travels alone in the same one-file form (``save_volume_tokenizer`` /
``load_volume_tokenizer``): that is how tokenizer training hands its result to a release and how
``assets/volume-tokenizer-lite/`` ships. Weights are safetensors only (no pickles). ``load_release``
takes a local folder or ``hf://owner/repo[@revision]``, resolved through
``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE`` and the local cache).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prima.config import PrimaConfig, VolumeTokenizerConfig, config_from_dict
from prima.errors import ConfigError, ReleaseError
from prima.factory import create_heads, create_model, create_volume_tokenizer
from prima.models.clip import PrimaCLIP
from prima.models.heads import TaskHeads
from prima.models.place_normal import PlaceNormalModel
from prima.models.text import ReportTokenizer
from prima.models.vqvae import VQVAE

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
VOLUME_TOKENIZER_FILE = "volume_tokenizer.safetensors"
HEADS_FILE = "heads.safetensors"
PLACE_NORMAL_FILE = "place_normal.safetensors"
REPORT_TOKENIZER_FILE = "report_tokenizer.json"
MODEL_CARD_FILE = "README.md"
HF_SCHEME = "hf://"
_VOLUME_TOKENIZER_CONFIG_KEY = "volume_tokenizer_config"  # safetensors metadata key holding its config
_PROVENANCE_KEY = "provenance"  # safetensors metadata key holding how the weights were made


@dataclass
class Release:
    """A loaded release; modules are on the requested device in eval mode."""

    config: PrimaConfig
    model: PrimaCLIP
    report_tokenizer: ReportTokenizer
    volume_tokenizer: VQVAE | None  # when the release ships one
    heads: TaskHeads | None  # when the release ships them
    path: Path  # local folder the files were read from
    revision: str | None  # hub revision asked for, None for local folders
    place_normal: PlaceNormalModel | None = None  # when the model reads tokens as deviations from normal


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors, ready for ``safetensors.torch.save_file``."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_volume_tokenizer(volume_tokenizer: VQVAE, path: str | Path, provenance: dict | None = None) -> Path:
    """Write a volume tokenizer as one safetensors file whose metadata carries its config and, optionally,
    how it was made (``provenance``: commit, data, steps, ...; read back by ``volume_tokenizer_provenance``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", _VOLUME_TOKENIZER_CONFIG_KEY: json.dumps(dataclasses.asdict(volume_tokenizer.config))}
    if provenance is not None:
        metadata[_PROVENANCE_KEY] = json.dumps(provenance)
    save_file(module_state(volume_tokenizer), path, metadata=metadata)
    return path


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ReleaseError(f"missing file {path}")
    try:
        with safe_open(str(path), framework="pt") as weights:
            return weights.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise ReleaseError(f"{path}: corrupted or truncated safetensors file: {exc}") from exc


def volume_tokenizer_provenance(path: str | Path) -> dict | None:
    """The provenance ``save_volume_tokenizer`` recorded in a volume tokenizer file, None if it has none."""
    text = _safetensors_metadata(Path(path)).get(_PROVENANCE_KEY)
    return None if text is None else json.loads(text)


def load_volume_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> VQVAE:
    """A volume tokenizer written by ``save_volume_tokenizer``, in eval mode on ``device``.

    Raises:
        ReleaseError: the file is missing, not safetensors, has no config, or its weights do not match it.
    """
    path = Path(path)
    metadata = _safetensors_metadata(path)
    if _VOLUME_TOKENIZER_CONFIG_KEY not in metadata:
        raise ReleaseError(f"{path}: not a volume tokenizer file (no {_VOLUME_TOKENIZER_CONFIG_KEY!r} in its metadata)")
    try:
        config = config_from_dict(VolumeTokenizerConfig, json.loads(metadata[_VOLUME_TOKENIZER_CONFIG_KEY]),
                                  "volume_tokenizer")
    except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as exc:
        raise ReleaseError(f"{path}: invalid volume tokenizer config: {exc}") from exc
    volume_tokenizer = create_volume_tokenizer(config)
    load_weights(volume_tokenizer, path)
    return volume_tokenizer.to(device).eval()


def save_release(
    directory: str | Path,
    model: PrimaCLIP,
    *,
    report_tokenizer: ReportTokenizer,
    volume_tokenizer: VQVAE | None = None,
    heads: TaskHeads | None = None,
    place_normal: PlaceNormalModel | None = None,
    model_card: str | None = None,
) -> Path:
    """Write a release folder (created if needed; existing release files are overwritten).

    Args:
        directory: destination folder.
        model: the CLIP model; its config is written to ``config.json``.
        report_tokenizer: the report tokenizer the text tower was trained with.
        volume_tokenizer: the VQ-VAE; its config replaces the model config's ``volume_tokenizer``
            section. ``None`` ships no volume tokenizer.
        heads: task heads; their thresholds are written into ``config.json`` too.
        place_normal: the place-normal model the model was trained to read tokens against (``None``: latents).
        model_card: markdown for ``README.md``; a minimal card is written when ``None``.

    Returns:
        the folder path.
    """
    if (place_normal is not None) != (model.config.vision.token_values == "place_deviation"):
        raise ValueError(f"a model reading token {model.config.vision.token_values}s needs "
                         f"{'a' if place_normal is None else 'no'} place-normal model")
    if report_tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(
            f"report tokenizer has {report_tokenizer.vocab_size} tokens, the text tower only "
            f"{model.config.text.vocab_size}"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if volume_tokenizer is not None:
        config = dataclasses.replace(config, volume_tokenizer=volume_tokenizer.config)
    if heads is not None:
        config = dataclasses.replace(
            config,
            diagnosis_thresholds=heads.diagnosis_thresholds.tolist(),
            referral_thresholds=heads.referral_thresholds.tolist(),
        )
    files = {"model": MODEL_FILE, "report_tokenizer": REPORT_TOKENIZER_FILE, "volume_tokenizer": None, "heads": None,
             "place_normal": None}
    save_file(module_state(model), folder / MODEL_FILE, metadata={"format": "pt"})
    if volume_tokenizer is not None:
        save_volume_tokenizer(volume_tokenizer, folder / VOLUME_TOKENIZER_FILE)
        files["volume_tokenizer"] = VOLUME_TOKENIZER_FILE
    if heads is not None:
        save_file(module_state(heads), folder / HEADS_FILE, metadata={"format": "pt"})
        files["heads"] = HEADS_FILE
    if place_normal is not None:
        save_place_normal(place_normal, folder / PLACE_NORMAL_FILE)
        files["place_normal"] = PLACE_NORMAL_FILE
    report_tokenizer.save(folder / REPORT_TOKENIZER_FILE)
    doc = config.to_dict()
    doc["release"] = {"format_version": FORMAT_VERSION, "files": files}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    card = model_card if model_card is not None else f"# {config.name}\n\nA Prima release (format {FORMAT_VERSION}).\n"
    (folder / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
    return folder


def save_place_normal(model: PlaceNormalModel, path: str | Path) -> Path:
    """Write a place-normal model (one safetensors file, as it is in memory: its places at 8 bits a value)."""
    save_file(module_state(model), path, metadata={"format": "pt"})
    return Path(path)


def load_place_normal(path: str | Path) -> PlaceNormalModel:
    """A saved place-normal model (``save_place_normal``), in float32 on the CPU, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"missing weight file {path}")
    try:
        state = load_file(path)
        model = PlaceNormalModel.for_state(state)
    except ValueError as exc:
        raise ReleaseError(f"{path}: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise ReleaseError(f"{path}: corrupted or truncated safetensors file: {exc}") from exc
    load_weights(model, path)
    return model.eval()


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
    model = create_model(config)
    load_weights(model, folder / (files.get("model") or MODEL_FILE))
    report_path = folder / (files.get("report_tokenizer") or REPORT_TOKENIZER_FILE)
    if not report_path.is_file():
        raise ReleaseError(f"{folder}: missing {report_path.name}")
    try:
        report_tokenizer = ReportTokenizer.load(report_path)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ReleaseError(f"{report_path}: unreadable report tokenizer: {exc}") from exc
    volume_tokenizer = None
    if files.get("volume_tokenizer"):
        volume_tokenizer = load_volume_tokenizer(folder / files["volume_tokenizer"])
        if volume_tokenizer.config != config.volume_tokenizer:
            raise ReleaseError(
                f"{folder}: {files['volume_tokenizer']} was built with {volume_tokenizer.config}, but config.json "
                f"says {config.volume_tokenizer}"
            )
    heads = None
    if files.get("heads"):
        heads = create_heads(config)
        load_weights(heads, folder / files["heads"])
    place_normal = load_place_normal(folder / files["place_normal"]) if files.get("place_normal") else None
    if (place_normal is not None) != (config.vision.token_values == "place_deviation"):
        raise ReleaseError(f"{folder}: the model reads token {config.vision.token_values}s, but the release "
                           f"{'ships' if place_normal is not None else 'lacks'} a place-normal model")
    for module in (model, volume_tokenizer, heads, place_normal):
        if module is not None:
            module.to(device).eval()
    return Release(config, model, report_tokenizer, volume_tokenizer, heads, folder, revision, place_normal)
