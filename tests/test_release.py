"""Release folder: save -> load round trip, hub URIs, and clear errors for broken releases."""

import json
import shutil

import pytest
import torch

from prima.config import VolumeTokenizerConfig
from prima.errors import ReleaseError
from prima.factory import create_heads, create_model, create_volume_tokenizer, get_model_config
from prima.models.text import train_report_tokenizer
from prima.release import (
    HEADS_FILE,
    MODEL_FILE,
    REPORT_TOKENIZER_FILE,
    VOLUME_TOKENIZER_FILE,
    load_release,
    load_volume_tokenizer,
    parse_hf_uri,
    save_release,
    save_volume_tokenizer,
)

REPORTS = ["No acute intracranial abnormality.", "Left frontal meningioma with mild mass effect."] * 5


@pytest.fixture(scope="module")
def release_parts():
    torch.manual_seed(0)
    config = get_model_config("prima-lite")
    model = create_model(config).eval()
    heads = create_heads(config).eval()
    heads.diagnosis_thresholds.copy_(torch.linspace(-1, 1, 52))
    volume_tokenizer = create_volume_tokenizer(VolumeTokenizerConfig(channels=8, res_layers=1, codebook_size=32)).eval()
    report_tokenizer = train_report_tokenizer(REPORTS, vocab_size=300)
    return model, heads, volume_tokenizer, report_tokenizer


@pytest.fixture(scope="module")
def saved(release_parts, tmp_path_factory):
    model, heads, volume_tokenizer, report_tokenizer = release_parts
    folder = tmp_path_factory.mktemp("release")
    save_release(folder, model, report_tokenizer=report_tokenizer, volume_tokenizer=volume_tokenizer, heads=heads,
                 model_card="# card\n")
    return folder


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def _outputs(model, heads, volume_tokenizer, report_tokenizer):
    g = torch.Generator().manual_seed(0)
    study = [(torch.randn(n, 289, generator=g), f"AX T{n}") for n in (5, 9)]
    batch = model.pack([study], ["MRI BRAIN"])
    ids, mask = report_tokenizer(REPORTS[:2], model.config.text.context_length)
    patches = torch.rand(2, 32, 32, 4, generator=g)
    with torch.no_grad():
        out = model(batch, ids, mask)
        return [out.image_features, out.text_features, out.series_features, heads(out.study_embedding).diagnosis_logits,
                volume_tokenizer.encode(patches), ids]


def test_round_trip_is_bitwise_identical(release_parts, saved):
    release = load_release(saved)
    before = _outputs(*release_parts)
    after = _outputs(release.model, release.heads, release.volume_tokenizer, release.report_tokenizer)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert torch.equal(release.heads.diagnosis_thresholds, torch.linspace(-1, 1, 52))
    assert release.revision is None and not release.model.training


def test_folder_contents(saved):
    names = sorted(p.name for p in saved.iterdir())
    assert names == sorted(["config.json", MODEL_FILE, VOLUME_TOKENIZER_FILE, HEADS_FILE, REPORT_TOKENIZER_FILE,
                            "README.md"])
    doc = json.loads((saved / "config.json").read_text())
    assert doc["name"] == "prima-lite" and doc["preprocess"]["in_plane_size"] == 256
    assert len(doc["labels"]["diagnoses"]) == 52 and len(doc["diagnosis_thresholds"]) == 52
    assert doc["volume_tokenizer"]["channels"] == 8  # the shipped VQ-VAE's own config
    assert not any(p.suffix in {".pt", ".pth", ".bin", ".pkl"} for p in saved.iterdir())


def test_release_without_volume_tokenizer_and_heads(release_parts, tmp_path):
    model, _, _, report_tokenizer = release_parts
    save_release(tmp_path, model, report_tokenizer=report_tokenizer)
    release = load_release(tmp_path)
    assert release.volume_tokenizer is None and release.heads is None
    assert torch.equal(release.model.logit_scale, model.logit_scale)


def test_truncated_weights_raise_release_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match="corrupted or truncated"):
        load_release(folder)


def test_garbled_header_raises_release_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / HEADS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ReleaseError, match="heads.safetensors"):
        load_release(folder)


@pytest.mark.parametrize("name", ["config.json", MODEL_FILE, VOLUME_TOKENIZER_FILE, REPORT_TOKENIZER_FILE])
def test_missing_file_raises_release_error(saved, tmp_path, name):
    folder = _copy(saved, tmp_path)
    (folder / name).unlink()
    with pytest.raises(ReleaseError, match=name.replace(".", r"\.")):
        load_release(folder)


def test_weights_that_do_not_fit_the_config_raise_release_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    doc = json.loads((folder / "config.json").read_text())
    doc["vision"]["sequence"]["mlp_dim"] += 8
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ReleaseError, match="shape"):
        load_release(folder)


def test_volume_tokenizer_travels_alone_with_its_config(release_parts, tmp_path):
    volume_tokenizer = release_parts[2]
    path = save_volume_tokenizer(volume_tokenizer, tmp_path / "alone" / VOLUME_TOKENIZER_FILE)
    loaded = load_volume_tokenizer(path)
    assert loaded.config == volume_tokenizer.config and not loaded.training
    patches = torch.rand(3, 32, 32, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode(patches), volume_tokenizer.encode(patches))
    save_release(tmp_path / "plain", release_parts[0], report_tokenizer=release_parts[3])
    with pytest.raises(ReleaseError, match="not a volume tokenizer file"):
        load_volume_tokenizer(tmp_path / "plain" / MODEL_FILE)


def test_volume_tokenizer_that_disagrees_with_config_json_raises(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    doc = json.loads((folder / "config.json").read_text())
    doc["volume_tokenizer"]["commitment_beta"] = 0.5
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ReleaseError, match="config.json says"):
        load_release(folder)


def test_invalid_config_raises_release_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    doc = json.loads((folder / "config.json").read_text())
    doc["vision"]["sequence"]["width_typo"] = 3
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ReleaseError, match="unknown keys"):
        load_release(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ReleaseError, match="JSON"):
        load_release(folder)


def test_missing_folder_raises_release_error(tmp_path):
    with pytest.raises(ReleaseError, match="does not exist"):
        load_release(tmp_path / "nowhere")


def test_hf_uri_parsing():
    assert parse_hf_uri("hf://owner/repo") == ("owner/repo", None)
    assert parse_hf_uri("hf://owner/repo@v1.0") == ("owner/repo", "v1.0")
    for bad in ["hf://repo", "hf://owner/repo@", "hf://a/b/c", "hf:///repo", "owner/repo"]:
        with pytest.raises(ReleaseError):
            parse_hf_uri(bad)


def test_hub_release_not_in_cache_offline_raises_release_error(tmp_path):
    with pytest.raises(ReleaseError, match="could not fetch hf://owner/absent@main"):
        load_release("hf://owner/absent@main", cache_dir=tmp_path, local_files_only=True)


def test_hub_release_is_loaded_from_the_cache_offline(saved, tmp_path):
    """The Hugging Face cache layout: refs/<revision> names a commit whose snapshot holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--owner--prima"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    release = load_release("hf://owner/prima@main", cache_dir=tmp_path, local_files_only=True)
    assert release.revision == "main" and release.heads is not None
    assert release.path == repo / "snapshots" / commit
