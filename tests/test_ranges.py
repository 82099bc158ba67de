"""process on every core by pieces of the files (minigpt.ranges): the workers read their own byte
ranges / row groups, and the output is byte for byte that of one process reading the files whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import minigpt.data as data
import minigpt.sources as sources
from minigpt.config import PretrainDataConfig
from minigpt.data import process_pretrain
from minigpt.ranges import plan_pieces
from minigpt.sources import DataError

WORDS = "river city music band été 中文 album war king 😀 team game season film".split()
OUTPUTS = ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _jsonl_bytes(docs: int, seed: int = 0) -> bytes:
    """JSON lines with LF and CRLF endings, blank and whitespace-only lines, empty documents,
    escaped and raw non-ASCII, and a byte-order mark."""
    rng = random.Random(seed)
    out = ["\ufeff"]
    for i in range(docs):
        text = "" if i % 17 == 5 else "   " if i % 19 == 3 else _text(rng, rng.randint(1, 60))
        out.append(json.dumps({"id": i, "text": text}, ensure_ascii=i % 2 == 0))
        out.append("\r\n" if i % 3 == 0 else "\n")
        if i % 11 == 0:
            out.append("\n" if i % 2 else "  \r\n")
    return "".join(out).encode("utf-8")


def _text_bytes(blocks: int, seed: int = 0) -> bytes:
    """Blank-line blocks with LF/CRLF/CR endings, whitespace-only separators, a BOM, and a long
    stretch without blank lines (cut by MAX_BLOCK_CHARS)."""
    rng = random.Random(seed)
    out = ["\ufeff"]
    for i in range(blocks):
        nl = ("\n", "\r\n", "\r")[i % 3]
        lines = [_text(rng, rng.randint(1, 20)) for _ in range(rng.randint(1, 4))]
        out.append(nl.join(lines) + nl + (" \t" if i % 5 == 0 else "") + nl)
        if i == blocks // 2:
            out.append("".join(_text(rng, 8) + "\n" for _ in range(60)))  # no blank line
    return "".join(out).encode("utf-8")


def _runs(cfg: PretrainDataConfig, tmp_path: Path, workers=(1, 2, 3)) -> dict[int, dict]:
    return {n: process_pretrain(cfg, tmp_path / f"out{n}", num_proc=n) for n in workers}


def _assert_identical(tmp_path: Path, workers=(2, 3)) -> None:
    for n in workers:
        for f in OUTPUTS:
            assert (tmp_path / "out1" / f).read_bytes() == (tmp_path / f"out{n}" / f).read_bytes(), (n, f)


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of ~300 bytes: the nominal edges fall mid-line and mid-document."""
    monkeypatch.setattr(data, "MIN_PIECE_BYTES", 300)
    monkeypatch.setattr(data, "PIECE_BYTES", 300)


def test_plan_pieces_moves_edges_to_line_and_block_starts(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(_jsonl_bytes(200))
    text = tmp_path / "a.txt"
    text.write_bytes(_text_bytes(80))
    for path, blocks in ((jsonl, False), (text, True), (text, False)):
        raw = path.read_bytes()
        pieces = plan_pieces([path], blocks, 300)
        assert len(pieces) > 5
        assert pieces[0].start == 0 and pieces[-1].end == len(raw)
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # each byte once
        for p in pieces[1:]:
            assert raw[p.start - 1:p.start] == b"\n"
            if blocks:  # the line before the edge is blank
                before = raw[:p.start - 1]
                last = before[max(before.rfind(b"\n"), before.rfind(b"\r")) + 1:]
                assert not last.strip(), (p, last)
        # Nominal edges (multiples of 300) are mostly not line starts: they were moved.
        assert any(raw[k - 1:k] != b"\n" for k in range(300, len(raw), 300))


def test_jsonl_pieces_write_the_same_bytes_as_one_process(tmp_path, small_pieces):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_bytes(_jsonl_bytes(400, seed=1))
    (tmp_path / "src" / "b.jsonl").write_bytes(_jsonl_bytes(150, seed=2)[3:])  # no BOM
    cfg = PretrainDataConfig(source=str(tmp_path / "src"), validation_fraction=0.2,
                             test_fraction=0.2)
    stats = _runs(cfg, tmp_path)
    assert stats[1] == stats[2] == stats[3]
    assert stats[1]["dropped"]["empty"] > 20 and stats[1]["validation"]["dropped"]["empty"] > 0
    _assert_identical(tmp_path)


def test_text_pieces_write_the_same_bytes_as_one_process(tmp_path, small_pieces, monkeypatch):
    monkeypatch.setattr(sources, "MAX_BLOCK_CHARS", 200)  # passed on to the workers
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "wiki.train.txt").write_bytes(_text_bytes(120, seed=3))
    (tmp_path / "src" / "wiki.valid.txt").write_bytes(_text_bytes(30, seed=4))
    cfg = PretrainDataConfig(source=str(tmp_path / "src"), format="documents",
                             validation_fraction=0.1, test_fraction=0.1)
    stats = _runs(cfg, tmp_path)
    assert stats[1] == stats[3] and stats[1]["official_splits"] == ["train", "validation"]
    longest = max(len(json.loads(line)["text"]) for line in
                  (tmp_path / "out1" / "train.jsonl").read_text().splitlines())
    assert longest < 200 + 200  # the stretch without blank lines was cut
    _assert_identical(tmp_path)


@pytest.mark.slow
def test_parquet_row_groups_write_the_same_bytes_as_one_process(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    texts = [_text(rng, rng.randint(0, 30)) for _ in range(500)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "train.parquet", row_group_size=37)
    assert pq.ParquetFile(tmp_path / "train.parquet").metadata.num_row_groups > 10
    cfg = PretrainDataConfig(source=str(tmp_path / "train.parquet"), validation_fraction=0.2,
                             test_fraction=0.1)
    _runs(cfg, tmp_path)
    _assert_identical(tmp_path)
    # An error in a later row group names its row in the whole file, as one process does.
    pq.write_table(pa.table({"text": texts[:400] + [None] * 0 + ["x\x00y"] + texts[401:]}),
                   tmp_path / "train.parquet", row_group_size=37)
    for n in (1, 2):
        with pytest.raises(DataError, match=r"train.parquet: row 401: column 'text' holds a NUL"):
            process_pretrain(cfg, tmp_path / "bad", num_proc=n)


def test_a_corpus_smaller_than_the_worker_count(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    cfg = PretrainDataConfig(source=str(path), validation_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match="no documents in the validation split"):
        process_pretrain(PretrainDataConfig(source=str(path)), tmp_path / "x", num_proc=3)
    stats = _runs(cfg, tmp_path, workers=(1, 3))
    assert stats[3]["train"]["documents"] == 2
    _assert_identical(tmp_path, workers=(3,))


@pytest.mark.parametrize("bad, needle", [
    ('{"text": "cut', "invalid JSON"),
    ('{"text": "a\\ud800b"}', "column 'text' holds a lone surrogate (U+D800), not valid Unicode"),
    ('{"body": "x"}', "no column 'text' (found: body)"),
])
def test_an_error_in_a_later_piece_is_reported_as_one_process_reports_it(
        tmp_path, small_pieces, bad, needle):
    path = tmp_path / "corpus.jsonl"
    raw = _jsonl_bytes(300).decode("utf-8").splitlines(keepends=True)
    lines = raw[:250] + [bad + "\r\n"] + raw[250:280] + ["also bad\n"] + raw[280:]
    path.write_text("".join(lines), encoding="utf-8", newline="")
    messages = []
    for n in (1, 2, 3):
        with pytest.raises(DataError) as err:
            process_pretrain(PretrainDataConfig(source=str(path)), tmp_path / "out", num_proc=n)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2]
    assert messages[0].startswith(f"{path}:251: {needle}"), messages[0]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]  # no shards left behind


def test_a_text_error_in_a_later_piece_names_its_line(tmp_path, small_pieces):
    path = tmp_path / "corpus.txt"
    raw = _text_bytes(100)
    cut = raw.index(b"\n", len(raw) * 2 // 3)
    path.write_bytes(raw[:cut] + b" \xff" + raw[cut:])
    line = len(raw[:cut].decode("utf-8").splitlines()) or 1
    messages = []
    for n in (1, 2):
        with pytest.raises(DataError) as err:
            process_pretrain(PretrainDataConfig(source=str(path)), tmp_path / "out", num_proc=n)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{path}:{line}: not UTF-8 text (byte 0xff"), messages[0]


def test_the_main_process_reads_no_documents(tmp_path, small_pieces, monkeypatch):
    """With workers, the documents are read, parsed and prepared in the workers alone: the main
    process only plans the pieces and appends the workers' shards (1.7x on 2 cores needs it)."""
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_jsonl_bytes(200))

    def refuse(*args, **kwargs):
        raise AssertionError("the main process read documents")

    cfg = PretrainDataConfig(source=str(path), format="documents")  # auto reads a prefix here
    expected = process_pretrain(cfg, tmp_path / "one", num_proc=1)
    for name in ("read_records", "read_text_lines", "_local_rows"):
        monkeypatch.setattr(sources, name, refuse)  # in this process only: workers are spawned
    monkeypatch.setattr(data, "_prepare_unit", refuse)
    assert process_pretrain(cfg, tmp_path / "two", num_proc=2) == expected
    for f in OUTPUTS:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_a_huge_line_and_a_file_without_blank_lines_go_through_tokenizer_and_encode(
        tmp_path, small_pieces, monkeypatch):
    """Small-scale stand-ins for a 100 MB one-row JSONL document and a big text file without
    headings or blank lines, with the caps lowered: process (2 workers, the same bytes as 1)
    keeps the long row whole and cuts the text into blocks; the tokenizer trains on pieces and
    encode writes each document's exact ids and one <|endoftext|> after it."""
    import minigpt.encode as enc
    from minigpt.tokenizer import EOT, encode_text, save_tokenizer, train_tokenizer

    monkeypatch.setattr(sources, "MAX_BLOCK_CHARS", 2000)
    monkeypatch.setattr(enc, "PIECE_CHARS", 1000)
    rng = random.Random(7)
    (tmp_path / "src").mkdir()
    huge = _text(rng, 20000)  # one row spanning many nominal pieces
    (tmp_path / "src" / "a.jsonl").write_text(
        json.dumps({"text": "Short."}) + "\n" + json.dumps({"text": huge}) + "\n", encoding="utf-8")
    (tmp_path / "src" / "b.txt").write_text("".join(_text(rng, 12) + "\n" for _ in range(800)),
                                            encoding="utf-8")
    cfg = PretrainDataConfig(source=str(tmp_path / "src"), format="documents",
                             validation_fraction=0, test_fraction=0)
    _runs(cfg, tmp_path, workers=(1, 2))
    _assert_identical(tmp_path, workers=(2,))
    docs = [json.loads(line)["text"] for line in
            (tmp_path / "out2" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert docs[:2] == ["Short.", huge] and len(docs) > 20
    assert max(len(d) for d in docs[2:]) < 2000 + 200
    tok = train_tokenizer(docs, 400)
    save_tokenizer(tok, tmp_path / "tok.json")
    enc.encode_corpus("pretrain", tmp_path / "out2", tmp_path / "tok.json", tmp_path / "tokens",
                      splits=("train",))
    ids = enc.read_tokens(tmp_path / "tokens" / "train").tolist()
    eot = tok.token_to_id(EOT)
    assert ids == [i for d in docs for i in encode_text(tok, d) + [eot]]


def test_shards_are_appended_without_copy_file_range_too(tmp_path, small_pieces, monkeypatch):
    """Where the kernel cannot copy between the files (another OS, an old kernel), the shards are
    copied in user space: the same bytes."""
    import os

    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_jsonl_bytes(300))
    cfg = PretrainDataConfig(source=str(path), validation_fraction=0.2, test_fraction=0.2)
    process_pretrain(cfg, tmp_path / "out1", num_proc=1)
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    process_pretrain(cfg, tmp_path / "out2", num_proc=2)
    _assert_identical(tmp_path, workers=(2,))
