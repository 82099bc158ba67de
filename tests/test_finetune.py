"""The finetune stage on a synthetic workspace: a tiny tokenizer and random GPT saved as
out/pretrain, SFT data encoded by the real encoder, and `stages/finetune.py` run in-process.

The synthetic task ("What colour is the <thing>?" -> "The <thing> is <colour>.") has a fixed
answer per thing, so a few dozen steps are enough to see the masked validation loss fall.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from minigpt.checkpoint import load_model, save_model
from minigpt.encode import encode_corpus
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
THINGS = "sky grass sun snow coal blood sea lemon cherry plum leaf cloud night milk rose ash".split()
COLOURS = "blue green yellow white black red blue yellow red purple green grey black white red grey".split()
FINETUNE = {"device": "cpu", "dtype": "fp32", "batch_size": 8, "max_steps": 40, "lr": 0.003,
            "warmup_steps": 4, "eval_interval": 10, "eval_batches": 4, "save_interval": 20,
            "log_interval": 10, "dropout": 0.0, "patience": 0}


def _rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        i = rng.randrange(len(THINGS))
        context = f"Think about the {THINGS[rng.randrange(len(THINGS))]}." if rng.random() < 0.3 else ""
        rows.append({"instruction": f"What colour is the {THINGS[i]}?", "context": context,
                     "response": f"The {THINGS[i]} is {COLOURS[i]}."})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace with out/pretrain and data/tokens/sft, built once per module."""
    root = tmp_path_factory.mktemp("ws")
    rng = random.Random(0)
    splits = {"train": _rows(300, rng), "validation": _rows(40, rng), "test": _rows(10, rng)}
    for split, rows in splits.items():
        _write_jsonl(root / "data/processed/sft" / f"{split}.jsonl", rows)
    texts = [f"{r['instruction']} {r['context']} {r['response']}" for r in splits["train"]]
    tok = train_tokenizer(texts * 3, vocab_size=320, min_frequency=2)
    tok_file = root / "data/tokenizer/tokenizer.json"
    save_tokenizer(tok, tok_file)
    encode_corpus("sft", root / "data/processed/sft", tok_file, root / "data/tokens/sft")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_embd=32,
                          block_size=48))
    save_model(model, root / "out/pretrain", tokenizer_file=tok_file,
               meta={"stage": "pretrain", "tokenizer_hash": tokenizer_hash(tok_file),
                     "chat_template": None, "tokenizer_vocab_size": tok.get_vocab_size()})
    return root


@pytest.fixture
def workspace(template, tmp_path, monkeypatch, stage_in_process) -> Iterator[Path]:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": FINETUNE}))
    monkeypatch.chdir(root)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two that wait on each other
    yield root
    torch.set_num_threads(threads)


def _stage():
    spec = importlib.util.spec_from_file_location("finetune_stage", ROOT / "stages/finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val_losses(root: Path) -> list[float]:
    lines = (root / "metrics/finetune/val.tsv").read_text().splitlines()
    col = lines[0].split("\t").index("val_loss")
    return [float(line.split("\t")[col]) for line in lines[1:]]


def test_finetune_end_to_end_masked_val_loss_falls(workspace, capsys):
    assert _stage().main() == 0
    out = capsys.readouterr().out
    assert "finetune:" in out
    losses = _val_losses(workspace)
    assert len(losses) == 5  # step 0 (the base model) + every 10 steps
    assert min(losses) < 0.6 * losses[0]

    metrics = json.loads((workspace / "metrics/finetune.json").read_text())
    assert metrics["best_val_loss"] == pytest.approx(min(losses), rel=1e-5)
    data = metrics["data"]
    assert data["train"]["examples"] == 300 and data["validation"]["examples"] == 40
    assert data["train"]["used"] + data["train"]["dropped"] == 300
    assert 0 <= data["padding_fraction"] < 1
    assert data["batching"]["pack"]["padding_fraction"] < data["batching"]["pad"]["padding_fraction"]

    model, _, config = load_model(workspace / "out/finetune")
    assert config["stage"] == "finetune" and config["chat_template"] == "minigpt-v1"
    assert config["tokenizer_hash"] == tokenizer_hash(workspace / "data/tokenizer/tokenizer.json")
    assert config["dropout"] == 0.0 and config["block_size"] == 48
    assert (workspace / "out/ckpt/finetune/meta.json").is_file()
    assert (workspace / "metrics/finetune/train.tsv").is_file()


def test_tokenizer_hash_mismatch_is_refused(workspace, capsys):
    sidecar = workspace / "data/tokens/sft/train.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "tokenizer_hash": "0123456789abcdef"}))
    assert _stage().main() == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:")
    assert "0123456789abcdef" in err and "out/pretrain" in err and "train" in err
    assert not (workspace / "out/finetune").exists()


def test_split_without_usable_examples_is_a_clear_error(workspace, capsys):
    long = [{"instruction": "Say it.", "context": "",
             "response": " ".join(["the sky is blue"] * 40)}] * 3
    _write_jsonl(workspace / "data/processed/sft/validation.jsonl", long)
    encode_corpus("sft", workspace / "data/processed/sft",
                  workspace / "data/tokenizer/tokenizer.json", workspace / "data/tokens/sft")
    assert _stage().main() == 2
    err = capsys.readouterr().err.strip()
    assert "'validation'" in err and "all 3 are too long" in err and "\n" not in err


def test_dropout_and_resume(workspace):
    """finetune.dropout reaches the model; a longer budget starts fresh (never continues a
    finished run), the same command again only rewrites the outputs from the scratch state."""
    stage = _stage()
    params = {**FINETUNE, "max_steps": 10, "dropout": 0.2, "eval_interval": 5}
    (workspace / "params.yaml").write_text(yaml.safe_dump({"finetune": params}))
    assert stage.main() == 0
    assert json.loads((workspace / "out/finetune/config.json").read_text())["dropout"] == 0.2
    (workspace / "params.yaml").write_text(yaml.safe_dump({"finetune": {**params, "max_steps": 15}}))
    assert stage.main() == 0
    metrics = json.loads((workspace / "metrics/finetune.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 15
    assert stage.main() == 0
    metrics = json.loads((workspace / "metrics/finetune.json").read_text())
    assert metrics["resumed_from_step"] == 15 and metrics["steps"] == 15
