"""prima.batch through ``prima predict-batch`` / ``prima embed``: manifest order, equality with ``predict``,
failing studies, and a 2-process torchrun run that must equal the single-process one."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prima.batch import Embeddings, ids_path, part_path
from prima.distributed import DistributedContext
from prima.cli import main
from prima.manifest import load_entry_study, read_manifest
from prima.predict import predict
from training.volume_tokenizer.mni_manifest import build_mni_manifest
from helpers.torchrun import run_torchrun

BROKEN = "broken"  # the study whose series file does not exist
MODEL_ARGS = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real-anatomy NIfTI studies (2 series each) with a study that cannot load between them."""
    path = build_mni_manifest(tmp_path_factory.mktemp("mni"), subjects=2, seed=0, series_per_subject=2)
    first, second = path.read_text(encoding="utf-8").splitlines()
    broken = json.loads(first) | {"study_id": BROKEN, "patient_id": BROKEN,
                                  "series": [{"name": "AX T1", "path": "missing.nii.gz"}]}
    path.write_text("\n".join([first, json.dumps(broken), second]) + "\n", encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``prima.cli.main`` with stdout and stderr captured (module-scope fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def batch(manifest, random_release_path, tmp_path_factory) -> tuple[list[dict], str, str]:
    """predict-batch with 2 DataLoader workers: (records, stdout, stderr)."""
    out = tmp_path_factory.mktemp("batch") / "preds.jsonl"
    code, stdout, stderr = run_cli(["predict-batch", str(manifest), "--out", str(out), "--weights",
                                    str(random_release_path), "--workers", "2", "--embedding", *MODEL_ARGS])
    assert code == 0, stderr
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], stdout, stderr


def test_predict_batch_lines_follow_the_manifest_and_equal_predict(batch, manifest, random_release):
    records, _, _ = batch
    entries = read_manifest(manifest)
    assert [r["study_id"] for r in records] == [e.study_id for e in entries]
    for entry, record in zip(entries, records):
        if entry.study_id == BROKEN:
            continue
        expected = predict(load_entry_study(entry), random_release, device="cpu", precision="fp32",
                           return_embedding=True)
        assert [s["name"] for s in record["series"]] == [s.name for s in expected.series]
        assert [s["tokens_kept"] for s in record["series"]] == [s.tokens_kept for s in expected.series]
        torch.testing.assert_close(torch.tensor([d["logit"] for d in record["diagnoses"]]),
                                   torch.tensor([d.logit for d in expected.diagnoses]), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(record["embedding"]), torch.tensor(expected.embedding),
                                   rtol=0, atol=1e-5)
        assert record["priority"]["tier"] == expected.priority.tier
        assert set(record["timings_s"]) == {"load", "patches", "tokens", "model"}


def test_predict_batch_reads_tokens_as_a_place_normal_release_does(manifest, pooling_release, tmp_path):
    """The batch path builds its tokens itself: it must read them through the release's place-normal model, as
    ``predict`` does."""
    out = tmp_path / "preds.jsonl"
    code, _, stderr = run_cli(["predict-batch", str(manifest), "--out", str(out), "--weights",
                               str(pooling_release.path), "--workers", "1", *MODEL_ARGS])
    assert code == 0, stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for entry, record in zip(read_manifest(manifest), records):
        if entry.study_id == BROKEN:
            continue
        expected = predict(load_entry_study(entry), pooling_release, device="cpu", precision="fp32")
        torch.testing.assert_close(torch.tensor([d["logit"] for d in record["diagnoses"]]),
                                   torch.tensor([d.logit for d in expected.diagnoses]), rtol=0, atol=1e-5)


def test_a_failing_study_is_reported_and_does_not_stop_the_batch(batch):
    records, stdout, stderr = batch
    broken = next(r for r in records if r["study_id"] == BROKEN)
    assert set(broken) == {"study_id", "error"} and "missing.nii.gz does not exist" in broken["error"]
    assert f"study {BROKEN} failed: StudyLoadError" in stderr
    assert "2 studies (1 failed), 4 series" in stdout and "studies/s" in stdout and "tokens/s" in stdout


def test_embed_writes_rows_in_manifest_order_with_their_ids(batch, manifest, random_release_path, tmp_path):
    out = tmp_path / "embeddings.npy"
    code, stdout, stderr = run_cli(["embed", str(manifest), "--out", str(out), "--weights", str(random_release_path),
                                    "--workers", "0", *MODEL_ARGS])
    assert code == 0, stderr
    rows = np.load(out)
    ids = json.loads(ids_path(out).read_text(encoding="utf-8"))
    assert ids_path(out).name == "embeddings.ids.json"
    assert ids["study_ids"] == ["mni000", "mni001"] and [f["study_id"] for f in ids["failed"]] == [BROKEN]
    assert ids["model"] == {"name": "prima-lite", "revision": None}
    assert rows.dtype == np.float32 and rows.shape == (2, len(batch[0][0]["embedding"]))
    by_id = {r["study_id"]: r["embedding"] for r in batch[0] if "embedding" in r}
    np.testing.assert_allclose(rows, np.array([by_id[i] for i in ids["study_ids"]]), rtol=0, atol=1e-5)
    assert "2 studies (1 failed)" in stdout


def test_embeddings_parts_merge_in_manifest_order(tmp_path):
    out = tmp_path / "e.npy"
    order = ["a", "b", "c", "d", "e"]
    for rank in range(2):
        part = Embeddings(3, {"name": "m", "revision": None})
        for study_id in order[rank::2]:
            if study_id == "c":
                part.failed[study_id] = "ValueError: bad"
            else:
                part.rows[study_id] = np.full(3, order.index(study_id), np.float32)
        part.write(part_path(out, DistributedContext(rank, 2, rank, torch.device("cpu"))))
    Embeddings.merge([part_path(out, DistributedContext(0, 2, 0, torch.device("cpu")), r) for r in range(2)], out,
                     order)
    merged = Embeddings.read(out)
    assert list(merged.rows) == ["a", "b", "d", "e"] and merged.failed == {"c": "ValueError: bad"}
    np.testing.assert_array_equal(np.load(out)[:, 0], [0, 1, 3, 4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ids.json", "e.npy"]


def test_torchrun_two_processes_equal_one(batch, manifest, random_release_path, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = run_torchrun(["-m", "prima.cli", "predict-batch", str(manifest), "--out", str(out), "--weights",
                           str(random_release_path), "--workers", "0", "--embedding", *MODEL_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes" in result.stdout and f"[rank 1] study {BROKEN} failed" in result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    single = batch[0]
    assert [r["study_id"] for r in records] == [r["study_id"] for r in single]
    for got, expected in zip(records, single):
        assert set(got) == set(expected)
        if "error" in got:
            assert got["error"] == expected["error"]
            continue
        np.testing.assert_allclose([d["logit"] for d in got["diagnoses"]], [d["logit"] for d in expected["diagnoses"]],
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["embedding"], expected["embedding"], rtol=0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]  # the part files are gone


@pytest.mark.parametrize(("extra", "message"), [(["--splits", "val"], "no study in splits val"),
                                                (["--out", "embeddings.txt"], "must end in .npy"),
                                                (["--workers", "-1"], "workers must be >= 0")])
def test_embed_refuses_bad_arguments(manifest, random_release_path, tmp_path, capsys, extra, message):
    argv = ["embed", str(manifest), "--out", str(tmp_path / "e.npy"), "--weights", str(random_release_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prima embed: error:") and message in err
