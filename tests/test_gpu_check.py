"""bench/gpu_check.py's CPU dry run (`--device cpu --tiny`): the same path the GPU check takes
(a temporary repo, `dvc exp run` of every stage on local text, the training and decoding benches
against transformers), at a trivial size, on fixture text in the shared-data layout."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import ROOT, _dolly_file, _wikitext_file

pytestmark = pytest.mark.slow  # the whole pipeline through `dvc exp run`, then the benches

pytest.importorskip("transformers")


def _check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    rng = random.Random(0)
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "extra").mkdir()
    (data / "dolly").mkdir()
    _wikitext_file(data / "wikitext-2-raw" / "wiki.train.first1000lines.raw", 30, rng)
    _wikitext_file(data / "wikitext-2-raw" / "wiki.valid.raw", 4, rng)
    _wikitext_file(data / "wikitext-2-raw" / "wiki.test.raw", 4, rng)
    (data / "extra" / "prose.txt").write_text("Plain prose without any split in its name.\n" * 20)
    _dolly_file(data / "dolly" / "dolly.subset-120.jsonl", 120, rng)
    proc = _check("--device", "cpu", "--tiny", "--data", str(data), "--keep", str(tmp_path / "run"))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "dvc exp run -S process.pretrain.source=raw/pretrain" in out
    for stage in ("pretrain", "finetune"):
        assert f"{stage}: fp32 on cpu" in out and "tok/s, mfu" in out
    assert "eval finetune: lm.loss" in out
    for prompt in ("What is the capital of France?", "Give me three tips for staying healthy."):
        assert f"Q: {prompt}" in out
    assert "cpu fp32: ours" in out and "ours/theirs" in out  # the training step vs GPT-2
    assert "ratio" in out and "same tokens" in out  # decoding vs transformers
    assert out.rstrip().splitlines()[-1].startswith("gpu check passed in")
    raw = tmp_path / "run" / "repo" / "raw" / "pretrain"
    assert sorted(p.name for p in raw.iterdir()) == ["prose.train.txt", "wiki.test.raw",
                                                     "wiki.train.raw", "wiki.valid.raw"]


def test_gpu_check_without_text_says_so(tmp_path):
    proc = _check("--device", "cpu", "--tiny", "--data", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"gpu check failed: no pretrain text found under {tmp_path} (see --help)"
