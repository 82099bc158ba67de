"""The DVC pipeline end to end, in a temporary git repo, on tiny local fixtures.

One module-scoped repo is built and reproduced once (its local sources tracked with
`dvc add raw/pretrain raw/sft`, as the README says); the tests then check what users rely on, in
order: every stage's outputs exist, a second `dvc repro` is a no-op, a parameter change re-runs
exactly the stages that read it, `dvc exp run -S` / `dvc exp show` / `dvc metrics diff` compare
runs, going back to a trained params set is restored from DVC's run-cache without training, a
queued grid trains only finetune and evaluates only the fine-tuned model, and a longer pretrain budget gives a fresh run's weights.
"""

from __future__ import annotations

import json
import os
import random
import time
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # real `dvc repro`, `dvc exp run` and the queue

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["process@pretrain", "process@sft", "tokenizer", "encode@pretrain", "encode@sft",
          "pretrain", "finetune", "eval@pretrain", "eval@finetune"]
WORDS = ("the a of and river city music band album war king team game season film song game "
         "was is in on at by for with from first new old north south early late great small "
         "station church school party army league road bridge island forest").split()

# Tiny but complete: every stage runs for real, in seconds.
TINY_PARAMS = {
    "process": {"pretrain": {"source": "raw/pretrain", "name": None},
                "sft": {"source": "raw/sft/dolly.jsonl"}},
    "tokenizer": {"vocab_size": 400},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "pretrain": {"device": "cpu", "batch_size": 4, "max_steps": 6, "warmup_steps": 2,
                 "eval_interval": 3, "eval_batches": 2, "save_interval": 3, "log_interval": 2},
    "finetune": {"device": "cpu", "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr": 0.0003,
                 "eval_interval": 2, "eval_batches": 2, "save_interval": 2, "log_interval": 2},
    "eval": {"device": "cpu", "stride": 16, "max_tokens": 2000, "generate_examples": 2,
             "max_new_tokens": 8, "prompts": ["What is the capital of France?"]},
}


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + " @-@ " + rng.choice(WORDS) + " ."


def _wikitext_file(path: Path, articles: int, rng: random.Random) -> None:
    """WikiText raw format: ` = Title = ` headings, paragraphs as lines starting with a space."""
    lines = [" "]
    for a in range(articles):
        lines += [f" = {rng.choice(WORDS).title()} {a} = ", " "]
        for _ in range(3):
            lines += [" " + " ".join(_sentence(rng) for _ in range(4)), " "]
        lines += [" = = Section = = ", " ", " " + _sentence(rng), " "]
    path.write_text("\n".join(lines) + "\n")


def _dolly_file(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w") as f:
        for i in range(rows):
            row = {"instruction": f"Question {i}: what is the {rng.choice(WORDS)}?",
                   "context": _sentence(rng) if i % 3 == 0 else "",
                   "response": _sentence(rng), "category": "open_qa"}
            f.write(json.dumps(row) + "\n")


def _merge(base: dict, override: dict) -> dict:
    for k, v in override.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return base


def _run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    # Output to files, not pipes: a process that leaves a detached child behind (`dvc queue
    # start`'s workers) returns when it exits, not when the last holder of a pipe does.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(list(args), cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        out.seek(0), err.seek(0)
        proc.stdout, proc.stderr = out.read(), err.read()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def _stale(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    out = json.loads(_dvc(repo, "status", "--json").stdout or "{}")
    return set(out)


def _set_params(repo: Path, override: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), override),
                                   sort_keys=False))


def copy_project(repo: Path) -> None:
    """This checkout's pipeline into `repo`: dvc.yaml, params.yaml, ignores, minigpt/, stages/."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("minigpt", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    copy_project(repo)
    rng = random.Random(0)
    (repo / "raw/pretrain").mkdir(parents=True)
    (repo / "raw/sft").mkdir(parents=True)
    _wikitext_file(repo / "raw/pretrain/wiki.train.raw", 40, rng)
    _wikitext_file(repo / "raw/pretrain/wiki.valid.raw", 4, rng)
    _wikitext_file(repo / "raw/pretrain/wiki.test.raw", 4, rng)
    _dolly_file(repo / "raw/sft/dolly.jsonl", 120, rng)
    _set_params(repo, TINY_PARAMS)
    _run(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    for name in ("README.md", ".gitignore"):
        shutil.copy(ROOT / "raw" / name, repo / "raw" / name)
    _dvc(repo, "add", "-q", "raw/pretrain", "raw/sft")  # what the README tells users to do
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "fixture")
    _dvc(repo, "repro")
    return repo


def test_repro_builds_every_artifact(repo):
    for path in ["data/processed/pretrain/train.jsonl", "data/processed/sft/stats.json",
                 "data/tokenizer/tokenizer.json", "data/tokens/pretrain/train.bin",
                 "data/tokens/sft/train.mask.bin", "out/pretrain/model.safetensors",
                 "out/finetune/config.json", "metrics/pretrain.json", "metrics/finetune.json",
                 "metrics/eval/pretrain.json", "metrics/eval/finetune.json",
                 "metrics/samples/pretrain.json", "metrics/samples/finetune.json"]:
        assert (repo / path).is_file(), path
    assert _stale(repo) == set()
    second = _dvc(repo, "repro").stdout
    assert "didn't change, skipping" in second and "Running stage" not in second


def test_worker_counts_and_batch_size_rerun_nothing(repo):
    # The outputs are the same for any worker count (tests/test_data.py, tests/test_encode.py):
    # changing how many cores do the work must not make a stage stale.
    _set_params(repo, {"process": {"num_proc": 1}, "encode": {"num_proc": 3, "batch_size": 7}})
    try:
        assert _stale(repo) == set()
    finally:
        _set_params(repo, {"process": {"num_proc": 0}, "encode": {"num_proc": 0, "batch_size": 1000}})


def test_sft_param_change_reruns_only_the_sft_side(repo):
    _set_params(repo, {"process": {"sft": {"test_fraction": 0.2}}})
    assert _stale(repo) == {"process@sft"}
    out = _dvc(repo, "repro").stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    # encode@sft always re-runs; finetune and both evals re-run because the sft tokens changed.
    assert ran == {"process@sft", "encode@sft", "finetune", "eval@pretrain", "eval@finetune"}, out


def test_vocab_change_reruns_tokenizer_and_both_encodes(repo):
    _set_params(repo, {"tokenizer": {"vocab_size": 420}})
    assert _stale(repo) == {"tokenizer"}
    out = _dvc(repo, "repro", "encode@pretrain", "encode@sft").stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"tokenizer", "encode@pretrain", "encode@sft"}, out
    assert {"pretrain", "finetune"} <= _stale(repo)  # the models now need the new vocabulary
    # back to the trained vocabulary: every stage comes back from DVC's run-cache, nothing trains
    _set_params(repo, {"tokenizer": {"vocab_size": 400}})
    proc = _dvc(repo, "repro")
    assert "Running stage" not in proc.stdout + proc.stderr, proc.stdout
    assert _stale(repo) == set()


def _metric_sets(node) -> list[dict]:
    """Every `metrics` mapping in `dvc exp show --json` output, wherever the format nests it."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("metrics"), dict) and "metrics/finetune.json" in node["metrics"]:
            found.append(node["metrics"])
        for v in node.values():
            found += _metric_sets(v)
    elif isinstance(node, list):
        for v in node:
            found += _metric_sets(v)
    return found


def test_experiment_reruns_only_finetune_and_eval_and_is_comparable(repo):
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline")
    out = _dvc(repo, "exp", "run", "-S", "finetune.lr=0.003").stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"finetune", "eval@finetune"}, out  # the pre-trained model is not re-scored
    assert "Stage 'eval@pretrain' didn't change, skipping" in out, out
    shown = _metric_sets(json.loads(_dvc(repo, "exp", "show", "--json").stdout))
    finetune = [json.dumps(m["metrics/finetune.json"], sort_keys=True) for m in shown]
    assert len(set(finetune)) >= 2, "baseline and experiment should have different finetune metrics"
    diff = json.loads(_dvc(repo, "metrics", "diff", "--json").stdout or "{}")
    assert "metrics/finetune.json" in diff and "metrics/eval/finetune.json" in diff
    assert "metrics/pretrain.json" not in diff  # pretrain did not run again
    assert "metrics/eval/pretrain.json" not in diff


def test_going_back_to_trained_params_restores_from_run_cache(repo):
    scratch = repo / "out/ckpt/finetune/meta.json"
    before = scratch.stat().st_mtime_ns
    proc = _dvc(repo, "exp", "run", "-S", "finetune.lr=0.0003")  # the baseline's value
    out = proc.stdout + proc.stderr
    assert "Stage 'finetune' is cached - skipping run" in out, out
    assert "Stage 'eval@finetune' is cached - skipping run" in out, out
    assert "Running stage" not in out and "finetune: masked val loss" not in out, out
    assert scratch.stat().st_mtime_ns == before  # no training touched the scratch state
    assert _stale(repo) == set()


def _queued_logs(repo: Path, timeout: float = 240) -> dict[str, str]:
    """Start the queue with two workers (`dvc queue start -j 2`: the grid's two experiments side
    by side), wait (bounded) until it is empty, return {experiment: its log}. `queue start`
    returns at once (see _run); idle workers linger up to 10 s (DVC's docs), `queue stop` ends them."""
    _dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + timeout
    while True:
        status = _dvc(repo, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        if time.monotonic() > deadline:
            _dvc(repo, "queue", "stop", "--kill", check=False)
            raise AssertionError(f"queue still busy after {timeout}s:\n{status}")
        time.sleep(1)
    _dvc(repo, "queue", "stop", check=False)  # no worker left behind
    rows = [line.split() for line in status.splitlines()]
    done = [r for r in rows if "Success" in r]
    assert len(done) == 2 and not any("Failed" in r for r in rows), status
    return {r[1]: _dvc(repo, "queue", "logs", r[1]).stdout for r in done}


def test_queued_grid_trains_only_finetune_and_eval(repo):
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "before the grid")
    out = _dvc(repo, "exp", "run", "--queue", "-S", "finetune.lr=0.001,0.002").stdout
    assert out.count("Queued experiment") == 2, out
    logs = _queued_logs(repo)
    for name, log in logs.items():
        ran = {s for s in STAGES if f"Running stage '{s}'" in log}
        assert ran == {"finetune", "eval@finetune"}, f"{name}:\n{log}"
    shown = json.dumps(json.loads(_dvc(repo, "exp", "show", "--json").stdout))
    assert '"lr": 0.001' in shown and '"lr": 0.002' in shown


def _weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def test_longer_pretrain_budget_equals_a_fresh_run(repo):
    # out/ckpt/pretrain holds the fixture's finished 6-step run (nothing since trained pretrain)
    _set_params(repo, {"pretrain": {"max_steps": 12}})
    proc = _dvc(repo, "repro", "pretrain")
    assert "not resuming from out/ckpt/pretrain" in proc.stdout + proc.stderr
    assert "max_steps: 6 -> 12" in proc.stdout + proc.stderr
    continued = _weights(repo / "out/pretrain")
    shutil.rmtree(repo / "out/ckpt/pretrain")
    proc = _dvc(repo, "repro", "--force", "--no-run-cache", "pretrain")
    assert "Running stage 'pretrain'" in proc.stdout
    assert _weights(repo / "out/pretrain") == continued
