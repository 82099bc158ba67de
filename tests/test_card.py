"""The model card `minigpt export --format hf` writes, and `--push-to-hub` (with a stand-in HfApi)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minigpt import cli
from minigpt.checkpoint import save_model
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer
from test_cli import CORPUS

TRAINING = {"steps": 1200, "tokens": 4915200, "val_loss": 3.2109, "device": "cuda", "dtype":
            "bfloat16", "world_size": 1}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def project(tmp_path) -> Path:
    tok = train_tokenizer(CORPUS, vocab_size=320)
    tok_file = tmp_path / "tokenizer.json"
    save_tokenizer(tok, tok_file)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=32, block_size=64))
    save_model(model, tmp_path / "out" / "finetune", tokenizer_file=tok_file,
               meta={"tokenizer_hash": tokenizer_hash(tok_file), "stage": "finetune",
                     "chat_template": "minigpt-v1", "training": TRAINING})
    split = {"documents": 600, "characters": 10_000_000, "bytes": 10_900_000, "words": 2_051_910}
    _write(tmp_path / "data/processed/pretrain/stats.json",
           {"source": "Salesforce/wikitext", "revision": "b08601e", "train": split,
            "validation": {**split, "documents": 60}, "test": {**split, "documents": 62}})
    _write(tmp_path / "data/processed/sft/stats.json",
           {"source": "databricks/databricks-dolly-15k", "revision": None, "measured": "response",
            "train": {"examples": 14011, "words": 2_400_000, "bytes": 13_000_000}})
    _write(tmp_path / "data/tokens/pretrain/train.json", {"dtype": "uint16", "count": 2_634_212})
    _write(tmp_path / "data/tokens/sft/train.json", {"dtype": "uint16", "count": 3_100_456})
    _write(tmp_path / "metrics/pretrain.json", {"steps": 5000, "tokens": 20_480_000, "val_loss": 4.012})
    _write(tmp_path / "metrics/finetune.json", {"steps": 1200, "best_val_loss": 3.2109})
    _write(tmp_path / "metrics/eval/finetune.json",
           {"lm": {"perplexity": 55.3, "bits_per_byte": 1.25}, "sft": {"loss": 2.5},
            "gen": {"rougeL": 0.213, "bleu": 4.5, "chrf": 20.1}, "baseline": {"gen": {"rougeL": 0.1}}})
    return tmp_path


def export(project: Path, *extra: str) -> int:
    return cli.main(["export", str(project / "hf"), "--checkpoint_path",
                     str(project / "out" / "finetune"), "--project_dir", str(project), *extra])


def test_card_describes_model_data_training_and_licenses(project, capsys):
    assert export(project) == 0
    card = (project / "hf" / "README.md").read_text()
    params = GPT(GPTConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, block_size=64)).num_params()
    assert card.startswith("---\n") and "license: cc-by-sa-3.0" in card
    assert "datasets: [Salesforce/wikitext, databricks/databricks-dolly-15k]" in card
    assert f"| parameters | {params:,} |" in card and "| context | 64 tokens |" in card
    assert "instruction-tuned" in card and "<|assistant|>" in card
    assert "Salesforce/wikitext" in card and "revision: b08601e" in card
    assert "revision: not pinned" in card  # dolly's null revision
    assert "| train | 600 | 2,051,910 | 10,900,000 | 2,634,212 |" in card
    assert "| train | 14,011 | 2,400,000 | 13,000,000 | 3,100,456 |" in card
    assert "| pretrain | 5,000 | 20,480,000 | - | 4.012 |" in card
    assert "| finetune | 1,200 | - | - | - | 3.2109 |" in card
    assert "| model | lm.perplexity | lm.bits_per_byte | lm.word_perplexity |" in card
    assert "| finetune | 55.3 | 1.25 | - | 2.5 | 0.213 | 4.5 | 20.1 |" in card
    assert "| echo baseline | - | - | - | - | 0.1 | - | - |" in card
    assert "stage `finetune`, 1,200 steps, 4,915,200 tokens, on cuda" in card
    assert card.count("CC BY-SA 3.0") >= 2 and "## Intended use and limits" in card
    assert "README.md" in capsys.readouterr().err


def test_card_without_project_files_and_with_hostile_ones(project, tmp_path):
    for f in ["data/processed/sft/stats.json", "metrics/pretrain.json", "metrics/finetune.json",
              "metrics/eval/finetune.json"]:
        (project / f).unlink()
    _write(project / "data/processed/pretrain/stats.json",
           {"source": "[click](http://evil.example)\n# injected", "train": {"documents": "x" * 5000}})
    (project / "data/tokens/pretrain/train.json").write_text("{not json")
    _write(project / "metrics/eval/pretrain.json",
           {"lm": "[click](http://evil.example)", "gen": {"rougeL": "x" * 5000, "bleu": [1, 2]},
            "baseline": ["not a mapping"]})
    assert export(project) == 0
    card = (project / "hf" / "README.md").read_text()
    assert "| pretrain | - | - | - | - | " in card and "echo baseline" not in card
    assert "[click](" not in card and "\n# injected" not in card and "x" * 200 not in card
    assert "no `data/processed/sft/stats.json` found" in card and "No `metrics/*.json` found." in card
    assert "see the dataset's own license" in card and "license: cc-by-sa-3.0" not in card


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and what the folder held at upload."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, kw))
        if FakeHfApi.fail:
            raise FakeHfApi.fail
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, files, kw))


def test_push_to_hub_uploads_the_export(project, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], None
    assert export(project, "--push-to-hub", "me/minigpt-chat", "--private") == 0
    (create, repo, kw), (upload, repo2, files, kw2) = FakeHfApi.calls
    assert (create, repo, kw["exist_ok"], kw["private"]) == ("create_repo", "me/minigpt-chat", True, True)
    assert (upload, repo2, kw2["repo_type"]) == ("upload_folder", "me/minigpt-chat", "model")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert "uploaded" in capsys.readouterr().err


def test_push_to_hub_failure_is_one_line_and_keeps_the_export(project, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], RuntimeError("401 Client Error: Unauthorized\nmore")
    assert export(project, "--push-to-hub", "me/x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --push-to-hub me/x: 401 Client Error: Unauthorized"
    assert (project / "hf" / "README.md").exists() and (project / "hf" / "model.safetensors").exists()


def test_reexport_keeps_an_edited_card_and_says_so(project, capsys):
    """Re-export replaced a README.md the user had edited (issue 25, item 8): now it keeps it."""
    from minigpt.card import card_edited

    assert export(project) == 0
    readme = project / "hf" / "README.md"
    assert not card_edited(readme.read_bytes())
    _write(project / "metrics/finetune.json", {"steps": 1300, "best_val_loss": 3.1})
    capsys.readouterr()
    assert export(project) == 0  # an unedited card is ours: regenerated, silently
    assert "| finetune | 1,300 |" in readme.read_text() and "warning" not in capsys.readouterr().err
    edited = readme.read_bytes().replace(b"## Intended use", b"My notes \xe2\x9c\x93\n\n## Intended use")
    readme.write_bytes(edited)
    assert card_edited(edited)
    assert export(project) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"warning: {readme} was edited after it was exported: kept as it is, not "
                       "regenerated (delete it to get a new model card)")
    assert readme.read_bytes() == edited and (project / "hf" / "model.safetensors").exists()
    readme.unlink()
    assert export(project) == 0 and not card_edited(readme.read_bytes())
