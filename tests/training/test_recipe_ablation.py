"""benchmarks/recipe_ablation.py end to end on the tiny data set: runs with place-normalised tokens train, score and
report (their figures are not checked: a dozen studies measure nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe_ablation.py"


@pytest.mark.parametrize("options", [[], ["--task", "abnormal", "--place-form", "deviation"],
                                     ["--pool", "topk", "--abnormal-weight", "1", "--place-kind", "2"]],
                         ids=["task-heads", "abnormal-only", "token-pooling-clustered-kinds"])
def test_a_place_normalised_run_reports_every_split(options, tiny_dataset, tiny_token_cache, tmp_path):
    command = [sys.executable, str(BENCHMARK), "--data", str(tiny_dataset.parent), "--cache", str(tiny_token_cache),
               "--out", str(tmp_path), "--name", "tiny", "--steps", "2", "--batch", "2", "--place-normal",
               "--place-min-count", "1", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=BENCHMARK.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["args"]["place_normal"] and {"val", "test", "val_unk_names", "test_unk_names"} <= set(result)
    assert all(result[split][key] is None or 0.0 <= result[split][key] <= 1.0
               for split in ("val", "test") for key in ("abnormal_auroc", "abnormal_logit_auroc"))
