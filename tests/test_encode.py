"""Encode: processed JSONL -> tokenizer -> token files, read back and checked end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import conftest
import pytest

import minigpt.encode as enc
from minigpt.template import encode_example
from minigpt.encode import (EncodeError, encode_corpus, flatten_with_eot, read_meta, read_sft,
                            read_tokens, set_threads, token_dtype)
from minigpt.tokenizer import (EOT, decode, load_tokenizer, save_tokenizer, tokenizer_hash,
                               train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices("etaoinshrdlucmfwyp", k=rng.randint(1, 8))) for _ in range(500)]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 200))) for _ in range(n)]
    docs[1] = ""  # an empty document is still followed by <|endoftext|>
    docs[2] = " = Title = \n\n Body with 東京, 😀 and e\u0301.\r\n"
    docs[3] = f"an article that quotes {EOT} literally"
    return docs


def _rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    docs = _docs(3 * n, seed)
    return [{"instruction": docs[3 * i] or "Q?", "context": docs[3 * i + 1] if rng.random() < 0.4 else "",
             "response": docs[3 * i + 2] or "A."} for i in range(n)]


def _write_jsonl(path: Path, objs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project: processed splits for both corpora and a trained tokenizer."""
    root = tmp_path_factory.mktemp("project")
    for i, split in enumerate(enc.SPLITS):
        _write_jsonl(root / f"data/processed/pretrain/{split}.jsonl",
                     [{"text": t} for t in _docs(40 if split == "train" else 12, seed=i)])
        _write_jsonl(root / f"data/processed/sft/{split}.jsonl", _rows(30 if split == "train" else 8, i))
    texts = [json.loads(line)["text"] for line in
             (root / "data/processed/pretrain/train.jsonl").read_text().splitlines()]
    save_tokenizer(train_tokenizer(texts, 600, 2), root / "data/tokenizer/tokenizer.json")
    return root


def _encode(project: Path, corpus: str, out: Path | None = None, batch_size: int = 7):
    return encode_corpus(corpus, project / f"data/processed/{corpus}",
                         project / "data/tokenizer/tokenizer.json",
                         out or project / f"data/tokens/{corpus}", batch_size)


def test_token_dtype_switches_to_uint32_past_uint16():
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65535) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u4")
    assert token_dtype(200_000) == np.dtype("<u4")
    assert token_dtype(8192).byteorder in ("<", "=") and np.dtype("<u4").str == "<u4"


def test_flatten_with_eot():
    out = flatten_with_eot([[5, 6], [], [7]], 0, np.dtype("<u2"))
    assert out.dtype == np.dtype("<u2") and out.tolist() == [5, 6, 0, 0, 7, 0]


def test_chunks_end_at_the_count_or_the_byte_cap(tmp_path):
    path = tmp_path / "x.jsonl"
    _write_jsonl(path, [{"text": "a" * 20}] * 5)  # 33 bytes a line
    assert [len(lines) for _, _, lines, _ in enc._chunks(path, 2)] == [2, 2, 1]
    assert [first for _, first, _, _ in enc._chunks(path, 2)] == [1, 3, 5]  # for FILE:LINE errors
    assert [len(lines) for _, _, lines, _ in enc._chunks(path, 100, max_bytes=70)] == [3, 2]
    assert sum(size for *_, size in enc._chunks(path, 2)) == path.stat().st_size


@pytest.mark.slow
def test_workers_write_the_same_bytes_as_one_process(project, tmp_path):
    """num_proc 1 (in this process) and 3 spawned workers, chunked small so every worker gets
    several chunks out of order: byte-identical token files for both corpora."""
    tok = project / "data/tokenizer/tokenizer.json"
    for corpus in ("pretrain", "sft"):
        outs = {}
        for workers in (1, 3):
            outs[workers] = tmp_path / f"{corpus}-{workers}"
            encode_corpus(corpus, project / f"data/processed/{corpus}", tok, outs[workers],
                          batch_size=3, num_proc=workers)
        files = sorted(p.name for p in outs[1].iterdir())
        assert files == sorted(p.name for p in outs[3].iterdir()) and "train.bin" in files
        for name in files:
            assert (outs[1] / name).read_bytes() == (outs[3] / name).read_bytes(), (corpus, name)


def test_a_worker_error_names_the_first_bad_line(project, tmp_path):
    src = tmp_path / "processed"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(40)]
    lines[7], lines[31] = '{"text": 7}', "{broken"
    for split in enc.SPLITS:
        src.mkdir(exist_ok=True)
        (src / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(ValueError, match=r"train.jsonl:8: field 'text' must be a string"):
            encode_corpus("pretrain", src, project / "data/tokenizer/tokenizer.json",
                          tmp_path / "out", batch_size=2, num_proc=workers)
    (src / "train.jsonl").write_text("\ufeff" + '{"text": "bom"}\n\n[1]\n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: expected a JSON object, got list"):
        encode_corpus("pretrain", src, project / "data/tokenizer/tokenizer.json", tmp_path / "out",
                      batch_size=1, num_proc=2)


def test_set_threads(monkeypatch):
    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    set_threads(0)
    assert "RAYON_NUM_THREADS" not in os.environ and os.environ["TOKENIZERS_PARALLELISM"] == "true"
    set_threads(1)
    assert os.environ["RAYON_NUM_THREADS"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_pretrain_tokens_decode_to_the_documents_joined_by_eot(project):
    stats = _encode(project, "pretrain")
    tok = load_tokenizer(project / "data/tokenizer/tokenizer.json")
    out = project / "data/tokens/pretrain"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}.{ext}" for s in enc.SPLITS for ext in ("bin", "json"))
    for s in stats:
        docs = [json.loads(line)["text"] for line in
                (project / f"data/processed/pretrain/{s.split}.jsonl").read_text().splitlines()]
        tokens = read_tokens(out / s.split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert decode(tok, tokens.tolist()) == "".join(d + EOT for d in docs)
        assert int((tokens == 0).sum()) == len(docs)  # EOT only at document ends
        assert tokens[-1] == 0
        meta = read_meta(out / f"{s.split}.json")
        assert meta == {"dtype": "uint16", "count": len(tokens), "documents": len(docs),
                        "tokenizer_hash": tokenizer_hash(project / "data/tokenizer/tokenizer.json")}
        assert (out / f"{s.split}.bin").stat().st_size == 2 * meta["count"]


def test_batch_size_does_not_change_the_bytes(project, tmp_path):
    _encode(project, "pretrain", tmp_path / "a", batch_size=1)
    _encode(project, "pretrain", tmp_path / "b", batch_size=1000)
    for split in enc.SPLITS:
        a, b = (tmp_path / d / f"{split}.bin" for d in "ab")
        assert a.read_bytes() == b.read_bytes()


def test_sft_ids_mask_and_offsets(project):
    stats = _encode(project, "sft")
    tok = load_tokenizer(project / "data/tokenizer/tokenizer.json")
    for s in stats:
        rows = [json.loads(line) for line in
                (project / f"data/processed/sft/{s.split}.jsonl").read_text().splitlines()]
        ids, mask, idx, meta = read_sft(project / "data/tokens/sft", s.split)
        assert meta["examples"] == len(rows) == len(idx) - 1 and idx.dtype == np.uint64
        assert idx[0] == 0 and idx[-1] == len(ids) == len(mask) == meta["count"]
        assert mask.dtype == np.uint8
        for i, row in enumerate(rows):
            want_ids, want_mask = encode_example(tok, row["instruction"], row["context"], row["response"])
            a, b = int(idx[i]), int(idx[i + 1])
            assert ids[a:b].tolist() == want_ids and mask[a:b].tolist() == want_mask
            # the mask covers exactly "\n{response}<|endoftext|>"
            assert decode(tok, ids[a:b][mask[a:b] == 1].tolist()) == f"\n{row['response']}{EOT}"


def test_uint32_files_are_written_and_read(project, tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "token_dtype", lambda vocab_size: np.dtype("<u4"))
    _encode(project, "pretrain", tmp_path / "p")
    _encode(project, "sft", tmp_path / "s")
    small = read_tokens(project / "data/tokens/pretrain/train")
    big = read_tokens(tmp_path / "p" / "train.bin")
    assert big.dtype == np.uint32 and read_meta(tmp_path / "p" / "train")["dtype"] == "uint32"
    assert (tmp_path / "p" / "train.bin").stat().st_size == 4 * len(big)
    assert big.tolist() == small.tolist()
    ids, _, _, meta = read_sft(tmp_path / "s", "validation")
    assert ids.dtype == np.uint32 and meta["dtype"] == "uint32"


def test_readers_check_the_sidecar_and_tokenizer_hash(project, tmp_path):
    _encode(project, "pretrain", tmp_path / "t")
    good = tokenizer_hash(project / "data/tokenizer/tokenizer.json")
    assert len(read_tokens(tmp_path / "t" / "train", expected_hash=good)) > 0
    with pytest.raises(EncodeError, match=r"train.json: encoded with tokenizer .* but the tokenizer "
                                          r"is 0123456789abcdef \(run `dvc repro encode`\)"):
        read_tokens(tmp_path / "t" / "train", expected_hash="0123456789abcdef")
    data = (tmp_path / "t" / "test.bin").read_bytes()
    (tmp_path / "t" / "test.bin").write_bytes(data[:-2])
    with pytest.raises(EncodeError, match=r"test.bin: \d+ bytes, but the sidecar says"):
        read_tokens(tmp_path / "t" / "test")
    (tmp_path / "t" / "validation.json").write_text('{"dtype": "int8", "count": 3}')
    with pytest.raises(EncodeError, match="validation.json: expected dtype"):
        read_tokens(tmp_path / "t" / "validation")
    with pytest.raises(EncodeError, match="nope.json: sidecar not found"):
        read_tokens(tmp_path / "t" / "nope")


def test_read_sft_checks_offsets(project, tmp_path):
    _encode(project, "sft", tmp_path / "s")
    idx_path = tmp_path / "s" / "test.idx.bin"
    idx = np.fromfile(idx_path, dtype="<u8")
    idx[-1] += 1
    idx.tofile(idx_path)
    with pytest.raises(EncodeError, match="test.idx.bin: offsets must rise from 0 to"):
        read_sft(tmp_path / "s", "test")


def test_empty_split_reads_as_empty(project, tmp_path):
    src = tmp_path / "processed"
    for split in enc.SPLITS:
        _write_jsonl(src / f"{split}.jsonl", [] if split == "test" else [{"text": "hello"}])
    encode_corpus("pretrain", src, project / "data/tokenizer/tokenizer.json", tmp_path / "out")
    assert read_tokens(tmp_path / "out" / "test").size == 0
    assert read_meta(tmp_path / "out" / "test")["documents"] == 0


def test_output_directory_is_replaced_whole_or_not_at_all(project, tmp_path):
    out = tmp_path / "tokens" / "pretrain"
    out.mkdir(parents=True)
    (out / "stale.bin").write_text("old")
    _encode(project, "pretrain", out)
    assert not (out / "stale.bin").exists() and (out / "train.bin").exists()
    assert os.listdir(tmp_path / "tokens") == ["pretrain"]  # no temporary directory left

    bad = tmp_path / "processed"
    for split in enc.SPLITS:
        (bad / split).parent.mkdir(parents=True, exist_ok=True)
        (bad / f"{split}.jsonl").write_text('{"text": "fine"}\n' if split != "test" else '{"text": 1}\n')
    before = (out / "train.bin").read_bytes()
    with pytest.raises(Exception, match=r"test.jsonl:1: field 'text' must be a string"):
        encode_corpus("pretrain", bad, project / "data/tokenizer/tokenizer.json", out)
    assert (out / "train.bin").read_bytes() == before  # the old tokens are untouched
    assert os.listdir(tmp_path / "tokens") == ["pretrain"]


def test_missing_inputs_fail_before_any_work(project, tmp_path):
    with pytest.raises(EncodeError, match=r"validation.jsonl: not found \(run `dvc repro process@sft`\)"):
        src = tmp_path / "p"
        _write_jsonl(src / "train.jsonl", _rows(2))
        encode_corpus("sft", src, project / "data/tokenizer/tokenizer.json", tmp_path / "o")
    with pytest.raises(EncodeError, match="corpus must be one of"):
        encode_corpus("other", src, project / "data/tokenizer/tokenizer.json", tmp_path / "o")


def _run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return conftest.run_stage_script("encode", cwd, *args, timeout=60)


@pytest.mark.slow
def test_stage_cli(project, tmp_path):
    (project / "params.yaml").write_text("encode:\n  batch_size: 5\n  num_proc: 2\n")
    result = _run_stage(project, "nope")
    assert result.returncode == 2 and "usage:" in result.stderr
    result = _run_stage(project, "sft")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("encode@sft: train ") and "tokens/s" in result.stdout
    assert read_sft(project / "data/tokens/sft", "train")[3]["examples"] == 30

    (tmp_path / "params.yaml").write_text("encode:\n  batch_size: 5\n")
    _write_jsonl(tmp_path / "data/processed/pretrain/train.jsonl", [{"text": "x"}])
    for split in ("validation", "test"):
        _write_jsonl(tmp_path / f"data/processed/pretrain/{split}.jsonl", [{"text": "x"}])
    result = _run_stage(tmp_path, "pretrain")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: data/tokenizer/tokenizer.json: tokenizer file not found")
