"""The `process` stage: sources, WikiText regrouping and detokenization, SFT cleaning, stable
splits, error messages, atomic output, and the stage script itself. Tiny fixtures, all fast."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import yaml

from minigpt.config import PretrainDataConfig, SFTDataConfig
from minigpt.data import process_pretrain, process_sft
from minigpt.splits import assign_split, stable_fraction
from minigpt.files import atomic_directory, read_objects
from minigpt.sources import DataError, resolve_source, split_of
from minigpt.wikitext import article_text, detokenize, detokenize_line, is_title, wikitext_articles
import minigpt.sources as sources
import minigpt.wikitext as wikitext

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

WIKI_LINES = [
    " ",
    " = Valkyria Chronicles III = ",
    " ",
    " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . "
    "Valkyria of the Battlefield 3 ) is a tactical role @-@ playing video game . ",
    " The game 's opening theme was sung by May 'n . ",
    " ",
    " = = Gameplay = = ",
    " ",
    " It sold 1 @,@ 000 copies at $ 4 @.@ 5 each . ",
    " ",
    " = = = Plot = = = ",
    " ",
    " ",
    " The \" Nameless \" unit fights . ",
    " ",
    " = Tower Building of the Little Rock Arsenal = ",
    " ",
    " The building 's walls were 3 feet thick . ",
    " ",
]
WORDS = "river city music band album war king team game season film song station church".split()


def _wiki_article(rng: random.Random, i: int) -> list[str]:
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
    return [f" = Article {i} {rng.choice(WORDS)} = ", " ", f" The {body} @-@ end , done . ", " "]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _wiki_file(path: Path, articles: int, seed: int = 0, start: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" "]
    for i in range(start, start + articles):
        lines += _wiki_article(rng, i)
    return _write_lines(path, lines)


def _dolly_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Question {seed}.{i}: what is the {rng.choice(WORDS)}?",
             "context": rng.choice(["", f"Some context about {rng.choice(WORDS)}."]),
             "response": f"It is a {rng.choice(WORDS)} ({seed}.{i}).", "category": None}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _split_of_each(out: Path, key: str) -> dict[str, str]:
    return {rec[key]: split for split in ("train", "validation", "test")
            for rec in _records(out / f"{split}.jsonl")}


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


# --------------------------------------------------------------------------------------------
# WikiText: regrouping and detokenization
# --------------------------------------------------------------------------------------------

def test_titles_are_top_level_headings_only():
    assert is_title(" = Valkyria Chronicles III = ")
    assert is_title(" = Valkyria Chronicles III = \n")
    assert is_title("= Title =")
    assert not is_title(" = = Gameplay = = ")
    assert not is_title(" = = = Plot = = = ")
    assert not is_title(" The = sign is used . ")


def test_regroup_raw_lines_and_hub_rows_alike():
    articles = list(wikitext_articles(WIKI_LINES))
    assert len(articles) == 2  # sections never start an article; the leading blank is no document
    assert articles[0][0].strip() == "= Valkyria Chronicles III ="
    assert articles[1][0].strip() == "= Tower Building of the Little Rock Arsenal ="
    # Hub rows: blank lines are "", every other row ends in "\n".
    hub_rows = [line + "\n" if line.strip() else "" for line in WIKI_LINES]
    hub_articles = list(wikitext_articles(hub_rows))
    assert [article_text(a, True) for a in hub_articles] == \
        [article_text(a, True) for a in articles]


def test_article_text_detokenized_layout():
    first = article_text(next(wikitext_articles(WIKI_LINES)), True)
    assert first == (
        "Valkyria Chronicles III\n"
        "\n"
        "Senjō no Valkyria 3: Unrecorded Chronicles (Japanese: 戦場のヴァルキュリア3, lit. Valkyria of "
        "the Battlefield 3) is a tactical role-playing video game.\n"
        "The game's opening theme was sung by May'n.\n"
        "\n"
        "Gameplay\n"
        "\n"
        "It sold 1,000 copies at $4.5 each.\n"
        "\n"
        "Plot\n"
        "\n"
        'The "Nameless" unit fights.')


def test_article_text_verbatim_keeps_source_lines():
    first = next(wikitext_articles(WIKI_LINES))
    text = article_text(first, False)
    assert text.split("\n") == WIKI_LINES[1:14]  # the lines themselves; trailing blank trimmed
    assert " @-@ " in text and " = = Gameplay = = " in text


@pytest.mark.parametrize("raw, expected", [
    # Real lines (or parts) of wikitext-2-raw.
    (" Released in January 2011 in Japan , it is the third game in the Valkyria series . ",
     "Released in January 2011 in Japan, it is the third game in the Valkyria series."),
    (" In 2004 Boulter landed a role as \" Craig \" in the episode \" Teddy 's Story \" of the "
     "television series The Long Firm ; he starred alongside actors Mark Strong and Derek Jacobi . ",
     "In 2004 Boulter landed a role as \"Craig\" in the episode \"Teddy's Story\" of the television "
     "series The Long Firm; he starred alongside actors Mark Strong and Derek Jacobi."),
    (" The storm caused $ 3 million in damage ; about $ 10 @,@ 000 in Florida . ",
     "The storm caused $3 million in damage; about $10,000 in Florida."),
    (" It had a duration of 3 : 04 ( 3 minutes ) and peaked at 4 @.@ 5 % . ",
     "It had a duration of 3:04 (3 minutes) and peaked at 4.5%."),
    (" During 1944 , the ships ' AA defences were reinforced . ",
     "During 1944, the ships' AA defences were reinforced."),
    (" The Mark VII ( A17 ) , nicknamed ' Purdah ' , was first developed . ",
     "The Mark VII (A17), nicknamed 'Purdah', was first developed."),
    (" by Tony O 'Doherty , as \" I wouldn 't say \" , in Re d 'Italia [ 3 ] ",
     "by Tony O'Doherty, as \"I wouldn't say\", in Re d'Italia [3]"),
    (" \" If you don ’ t wanna take it \" and women ’ s ceremonies ",
     "\"If you don’t wanna take it\" and women’s ceremonies"),
    (" By the 1980s and ' 90s , such work was being done at 57 ° 53 ′ N . ",
     "By the 1980s and '90s, such work was being done at 57° 53′ N."),
    (" He went 6 ⁄ 3 innings on the M ‑ 12 ! Really ? ",
     "He went 6⁄3 innings on the M‑12! Really?"),
    # An odd number of double quotes: one is stray (a quote spanning paragraphs): leave them.
    (" was increasingly so ever since . \" ( David Barsamian ) ",
     "was increasingly so ever since. \" (David Barsamian)"),
    (" = = Gameplay = = ", "= = Gameplay = ="),  # headings are handled by article_text
    ("   ", ""),
])
def test_detokenize_line(raw, expected):
    assert detokenize_line(raw) == expected


def test_detokenize_keeps_lines_and_plain_text():
    assert detokenize("a , b\n\nc .") == "a, b\n\nc."
    plain = "Ordinary prose, already clean (really). It's fine: 3:04, $5 and 50%."
    assert detokenize(plain) == plain


@pytest.mark.skipif(not (SHARED / "wikitext-2-raw" / "wiki.valid.raw").exists(),
                    reason="shared real data not available")
def test_detokenize_real_validation_file():
    lines = (SHARED / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").split("\n")
    articles = list(wikitext_articles(lines))
    assert len(articles) == 60
    texts = [article_text(a, True) for a in articles]
    joined = "\n".join(texts)
    for artifact in (" @-@ ", " @,@ ", " @.@ ", " , ", " . ", " ; ", "( ", " )", " 's ", "= ="):
        assert artifact not in joined, artifact
    assert all(t.split("\n")[0] and not t.startswith(("=", " ")) for t in texts)
    # Detokenization only moves spaces, replaces @x@ tokens and unwraps headings: every other
    # character of the source survives, in order.
    def visible(text: str) -> str:
        for token, char in (("@-@", "-"), ("@,@", ","), ("@.@", ".")):
            text = text.replace(f" {token} ", char)
        return "".join(text.split())

    source = "".join(visible(wikitext.heading_text(l) or l) for a in articles for l in a)
    assert visible(joined) == source


# --------------------------------------------------------------------------------------------
# Stable hashing and split carving
# --------------------------------------------------------------------------------------------

def test_stable_fraction_is_fixed_and_uniform():
    # A constant: the value must never change across runs, machines or Python versions.
    assert stable_fraction("hello") == 0.17557225990430192  # top 53 bits of sha256("hello") / 2**53
    keys = [f"doc {i}" for i in range(20000)]
    splits = [assign_split(k, 0.1, 0.05) for k in keys]
    assert abs(splits.count("validation") / len(keys) - 0.1) < 0.01
    assert abs(splits.count("test") / len(keys) - 0.05) < 0.01
    # Carving only test leaves the validation band in train (bands never move).
    only_test = [assign_split(k, 0.1, 0.05, candidates=("test",)) for k in keys]
    assert only_test.count("validation") == 0
    assert [s == "test" for s in only_test] == [s == "test" for s in splits]


def test_split_names_like_datasets():
    assert split_of("wiki.train.raw") == "train"
    assert split_of("wiki.train.first1000lines.raw") == "train"
    assert split_of("wiki.valid.raw") == "validation"
    assert split_of("dev.jsonl") == "validation"
    assert split_of("test-00000-of-00001.parquet") == "test"
    assert split_of("validation/part1.txt") == "validation"
    assert split_of("wiki.raw") is None
    assert split_of("contest.txt") is None  # a keyword must be a whole word
    with pytest.raises(DataError, match="several splits"):
        split_of("train_test.txt")


def test_pretrain_carving_is_deterministic_and_stable(tmp_path):
    cfg = PretrainDataConfig(source=str(tmp_path / "raw"), validation_fraction=0.2,
                             test_fraction=0.2)
    _wiki_file(tmp_path / "raw" / "wiki.raw", 60)
    stats = process_pretrain(cfg, tmp_path / "a")
    assert stats["carved_splits"] == ["validation", "test"]
    assert stats["official_splits"] == ["train"]
    process_pretrain(cfg, tmp_path / "b")
    for split in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    before = _split_of_each(tmp_path / "a", "text")
    assert sum(s == "validation" for s in before.values()) >= 5
    # More documents (a second file): every existing document stays in its split.
    _wiki_file(tmp_path / "raw" / "more.raw", 40, seed=1, start=100)
    process_pretrain(cfg, tmp_path / "c")
    after = _split_of_each(tmp_path / "c", "text")
    assert len(after) == 100
    assert all(after[text] == split for text, split in before.items())


def test_official_splits_kept_and_max_documents_caps_train_only(tmp_path):
    raw = tmp_path / "raw"
    _wiki_file(raw / "wiki.train.raw", 30)
    _wiki_file(raw / "wiki.valid.raw", 3, seed=1)
    _wiki_file(raw / "wiki.test.raw", 4, seed=2)
    (raw / ".gitkeep").write_text("")
    (raw / "README.md").write_text("not data")
    stats = process_pretrain(PretrainDataConfig(source=str(raw), max_documents=10),
                             tmp_path / "out")
    assert stats["official_splits"] == ["train", "validation", "test"]
    assert stats["carved_splits"] == []
    assert [stats[s]["documents"] for s in ("train", "validation", "test")] == [10, 3, 4]
    assert stats["train"]["dropped"]["max_documents"] == 20
    assert stats["dropped"] == {"empty": 0, "max_documents": 20}
    assert stats["detokenized"] is True and stats["source"] == str(raw)
    # Carved validation/test do not depend on the cap either.
    _wiki_file(tmp_path / "one" / "wiki.raw", 80)
    full = process_pretrain(PretrainDataConfig(source=str(tmp_path / "one"),
                                               validation_fraction=0.2), tmp_path / "full")
    capped = process_pretrain(PretrainDataConfig(source=str(tmp_path / "one"),
                                                 validation_fraction=0.2, max_documents=5),
                              tmp_path / "capped")
    assert capped["train"]["documents"] == 5
    for split in ("validation", "test"):
        assert capped[split] == full[split]
        assert (tmp_path / "full" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "capped" / f"{split}.jsonl").read_bytes()


def test_stats_measure_the_written_text(tmp_path):
    raw = _write_lines(tmp_path / "wiki.train.raw", WIKI_LINES)
    stats = process_pretrain(PretrainDataConfig(source=str(raw), validation_fraction=0,
                                                test_fraction=0), tmp_path / "out")
    texts = [r["text"] for r in _records(tmp_path / "out" / "train.jsonl")]
    assert stats["train"] == {
        "documents": 2, "characters": sum(map(len, texts)),
        "bytes": sum(len(t.encode()) for t in texts),
        "words": sum(len(t.split()) for t in texts),
        "dropped": {"empty": 0, "max_documents": 0}}
    assert stats["train"]["bytes"] > stats["train"]["characters"]  # Japanese text is multi-byte
    assert stats["validation"]["documents"] == 0  # fraction 0: asked for, so allowed


# --------------------------------------------------------------------------------------------
# Local formats
# --------------------------------------------------------------------------------------------

def test_parquet_and_jsonl_pretrain_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i} about the {WORDS[i % len(WORDS)]} ." for i in range(40)]
    pq.write_table(pa.table({"text": docs + ["   "], "id": list(range(41))}),
                   tmp_path / "train.parquet")
    cfg = PretrainDataConfig(source=str(tmp_path / "train.parquet"), format="documents",
                             validation_fraction=0.2, test_fraction=0.2)
    stats = process_pretrain(cfg, tmp_path / "out")
    assert sum(stats[s]["documents"] for s in ("train", "validation", "test")) == 40
    assert stats["dropped"]["empty"] == 1
    out = {r["text"] for s in ("train", "validation", "test")
           for r in _records(tmp_path / "out" / f"{s}.jsonl")}
    assert "Document number 0 about the river ." in out  # documents are written as they are

    _write_jsonl(tmp_path / "j" / "corpus.train.jsonl", [{"body": d} for d in docs])
    _write_jsonl(tmp_path / "j" / "corpus.valid.jsonl", [{"body": "v ."}])
    _write_jsonl(tmp_path / "j" / "corpus.test.jsonl", [{"body": "t ."}])
    cfg = PretrainDataConfig(source=str(tmp_path / "j"), format="documents",
                             text_column="body")
    stats = process_pretrain(cfg, tmp_path / "out2")
    assert [stats[s]["documents"] for s in ("train", "validation", "test")] == [40, 1, 1]
    assert next(_records(tmp_path / "out2" / "test.jsonl")) == {"text": "t ."}


def test_hub_rows_through_a_fake_dataset(tmp_path, monkeypatch):
    class FakeSplit:
        def __init__(self, rows):
            self.rows, self.column_names = rows, ["text"]

        def __len__(self):
            return len(self.rows)

        def iter(self, batch_size):
            for i in range(0, len(self.rows), batch_size):
                yield {"text": self.rows[i:i + batch_size]}

    hub_rows = [line + "\n" if line.strip() else "" for line in WIKI_LINES]
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return {"train": FakeSplit(hub_rows), "validation": FakeSplit(hub_rows[:15]),
                "test": FakeSplit(hub_rows[15:])}

    monkeypatch.setattr(sources, "load_dataset", fake_load)
    cfg = PretrainDataConfig(revision="abc123")
    stats = process_pretrain(cfg, tmp_path / "out")
    assert calls == [(("Salesforce/wikitext", "wikitext-2-raw-v1"), {"revision": "abc123"})]
    assert [stats[s]["documents"] for s in ("train", "validation", "test")] == [2, 1, 1]
    assert stats["name"] == "wikitext-2-raw-v1"
    test_doc = next(_records(tmp_path / "out" / "test.jsonl"))["text"]
    assert test_doc == ("Tower Building of the Little Rock Arsenal\n\n"
                        "The building's walls were 3 feet thick.")


def test_sft_alpaca_json_and_parquet(tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "" if len(w) % 2 else f"Context {w}",
             "output": f"{w}!"} for w in WORDS * 3]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    columns = {"instruction": "instruction", "context": "input", "response": "output"}
    cfg = SFTDataConfig(source=str(tmp_path / "alpaca.json"), columns=columns,
                        validation_fraction=0.2, test_fraction=0.2)
    stats = process_sft(cfg, tmp_path / "out")
    assert sum(stats[s]["examples"] for s in ("train", "validation", "test")) == len(WORDS)
    assert stats["dropped"]["duplicate"] == 2 * len(WORDS)
    first = next(_records(tmp_path / "out" / "train.jsonl"))
    assert set(first) == {"instruction", "context", "response"}

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    pq.write_table(table, tmp_path / "alpaca.parquet")
    cfg2 = SFTDataConfig(source=str(tmp_path / "alpaca.parquet"), columns=columns,
                         validation_fraction=0.2, test_fraction=0.2)
    process_sft(cfg2, tmp_path / "out2")
    for split in ("train", "validation", "test"):
        assert (tmp_path / "out" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "out2" / f"{split}.jsonl").read_bytes()


@pytest.mark.skipif(not (SHARED / "alpaca" / "alpaca_data_1k.json").exists(),
                    reason="shared real data not available")
def test_sft_real_alpaca_file(tmp_path):
    cfg = SFTDataConfig(source=str(SHARED / "alpaca" / "alpaca_data_1k.json"),
                        columns={"instruction": "instruction", "context": "input",
                                 "response": "output"})
    stats = process_sft(cfg, tmp_path / "out")
    kept = sum(stats[s]["examples"] for s in ("train", "validation", "test"))
    assert kept + sum(stats["dropped"].values()) == 1000
    assert stats["validation"]["examples"] > 20 and stats["test"]["examples"] > 20


# --------------------------------------------------------------------------------------------
# SFT cleaning and its split
# --------------------------------------------------------------------------------------------

def test_sft_cleaning_counts_drops(tmp_path):
    rows = _dolly_rows(60)
    rows += [
        {"instruction": "  ", "context": "", "response": "orphan answer"},
        {"instruction": "A question?", "context": "", "response": " \n "},
        {"instruction": "No response key at all?", "context": None, "response": None},
        dict(rows[0]),                                       # exact duplicate
        {**rows[1], "instruction": "  " + rows[1]["instruction"] + "\n"},  # duplicate once stripped
        {**rows[2], "response": rows[2]["response"] + " Different."},     # not a duplicate
    ]
    path = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    stats = process_sft(SFTDataConfig(source=str(path), validation_fraction=0.2,
                                      test_fraction=0.2), tmp_path / "out")
    assert stats["dropped"] == {"empty_instruction": 1, "empty_response": 2, "duplicate": 2}
    assert sum(stats[s]["examples"] for s in ("train", "validation", "test")) == 61
    assert sum(stats[s]["dropped"]["duplicate"] for s in ("train", "validation", "test")) == 2
    assert stats["measured"] == "response"
    records = [r for s in ("train", "validation", "test")
               for r in _records(tmp_path / "out" / f"{s}.jsonl")]
    assert all(r == {k: v.strip() for k, v in r.items()} for r in records)
    responses = [r["response"] for r in records]
    assert sum(len(x.split()) for x in responses) == sum(stats[s]["words"]
                                                         for s in ("train", "validation", "test"))
    # The same prompt with two answers lands in one split (no prompt leakage).
    split = _split_of_each(tmp_path / "out", "response")
    assert split[rows[2]["response"]] == split[rows[2]["response"] + " Different."]


@pytest.mark.slow
def test_workers_write_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    """num_proc 1 (in this process) and 3 spawned workers, four documents a chunk so every worker
    gets several: byte-identical splits and stats, with carving, max_documents, empty documents
    and SFT duplicates (decided in input order) in play."""
    import minigpt.data as data

    monkeypatch.setattr(data, "CHUNK_ITEMS", 4)
    _wiki_file(tmp_path / "wiki" / "wiki.raw", 50)
    docs = [{"text": f"Document {i} about the {WORDS[i % len(WORDS)]} @-@ city ."} for i in range(60)]
    docs[5]["text"] = docs[9]["text"] = "  "
    _write_jsonl(tmp_path / "docs" / "train.jsonl", docs)
    rows = _dolly_rows(50)
    rows += [dict(rows[3]), dict(rows[40]), {"instruction": " ", "context": "", "response": "x"}]
    dolly = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    runs = {
        "wiki": lambda n, out: process_pretrain(PretrainDataConfig(
            source=str(tmp_path / "wiki"), validation_fraction=0.2, test_fraction=0.2,
            max_documents=20), out, num_proc=n),
        "docs": lambda n, out: process_pretrain(PretrainDataConfig(
            source=str(tmp_path / "docs"), format="documents", validation_fraction=0.2,
            test_fraction=0.2, max_documents=30), out, num_proc=n),
        "sft": lambda n, out: process_sft(SFTDataConfig(
            source=str(dolly), validation_fraction=0.2, test_fraction=0.2), out, num_proc=n),
    }
    for name, run in runs.items():
        one, three = run(1, tmp_path / f"{name}-1"), run(3, tmp_path / f"{name}-3")
        assert one == three and sum(one["dropped"].values()) > 0, name
        for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"):
            assert (tmp_path / f"{name}-1" / f).read_bytes() == (tmp_path / f"{name}-3" / f).read_bytes()


def test_sft_split_is_stable_when_rows_are_added(tmp_path):
    rows = _dolly_rows(200)
    cfg = lambda p: SFTDataConfig(source=str(p), validation_fraction=0.1, test_fraction=0.1)
    process_sft(cfg(_write_jsonl(tmp_path / "a.jsonl", rows)), tmp_path / "a")
    more = rows[:100] + _dolly_rows(150, seed=7) + rows[100:]
    random.Random(3).shuffle(more)
    process_sft(cfg(_write_jsonl(tmp_path / "b.jsonl", more)), tmp_path / "b")
    before = _split_of_each(tmp_path / "a", "response")
    after = _split_of_each(tmp_path / "b", "response")
    assert {s for s in before.values()} == {"train", "validation", "test"}
    assert all(after[r] == s for r, s in before.items())


def test_sft_named_splits_are_kept_and_only_missing_ones_carved(tmp_path):
    """A local SFT directory with train.jsonl + test.jsonl keeps the user's test set as it is;
    only validation is carved, from train; stats say which splits were official and which carved."""
    train, test = _dolly_rows(200), _dolly_rows(30, seed=5)
    src = tmp_path / "sft"
    src.mkdir()
    _write_jsonl(src / "train.jsonl", train)
    _write_jsonl(src / "test.jsonl", test)
    stats = process_sft(SFTDataConfig(source=str(src), validation_fraction=0.1,
                                      test_fraction=0.1), tmp_path / "out")
    assert stats["official_splits"] == ["train", "test"] and stats["carved_splits"] == ["validation"]
    split = _split_of_each(tmp_path / "out", "response")
    assert all(split[r["response"]] == "test" for r in test)  # every user test row, in test
    assert stats["test"]["examples"] == len(test)
    carved = {r["response"] for r in train if split[r["response"]] == "validation"}
    assert 5 <= len(carved) <= 40 and stats["validation"]["examples"] == len(carved)
    assert {split[r["response"]] for r in train} == {"train", "validation"}  # none carved to test
    # all three given: nothing carved; a single file: everything carved (Dolly)
    _write_jsonl(src / "validation.jsonl", _dolly_rows(20, seed=9))
    stats = process_sft(SFTDataConfig(source=str(src)), tmp_path / "out3")
    assert stats["carved_splits"] == [] and stats["validation"]["examples"] == 20
    stats = process_sft(SFTDataConfig(source=str(src / "train.jsonl")), tmp_path / "one")
    assert stats["official_splits"] == ["train"] and stats["carved_splits"] == ["validation", "test"]


def test_sft_context_optional_in_columns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl",
                        [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(50)])
    cfg = SFTDataConfig(source=str(path), columns={"instruction": "q", "response": "a"},
                        validation_fraction=0.2, test_fraction=0.2)
    process_sft(cfg, tmp_path / "out")
    rec = next(_records(tmp_path / "out" / "train.jsonl"))
    assert rec["context"] == "" and rec["instruction"].startswith("Question")


# --------------------------------------------------------------------------------------------
# Errors: one line, naming what is wrong
# --------------------------------------------------------------------------------------------

def test_source_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("Salesforce/wikitext") is None
    assert resolve_source("databricks/databricks-dolly-15k") is None
    for missing in ("raw/pretrain", "./corpus", "/nope/data", "dolly.jsonl", "a/b/c", "x.parquet"):
        with pytest.raises(DataError, match=f"^source not found: {missing}$"):
            resolve_source(missing)
    (tmp_path / "Salesforce").mkdir()  # an existing path always wins
    (tmp_path / "Salesforce" / "wikitext").mkdir()
    assert resolve_source("Salesforce/wikitext") == Path("Salesforce/wikitext")


def test_missing_local_source_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^source not found: raw/pretrain$"):
        process_pretrain(PretrainDataConfig(source="raw/pretrain"), tmp_path / "out")
    with pytest.raises(DataError, match="^source not found: raw/sft/dolly.jsonl$"):
        process_sft(SFTDataConfig(source="raw/sft/dolly.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_json_line_is_reported_with_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows(5))
    with path.open("a") as f:
        f.write('{"instruction": "broken", "response": \n')
    with pytest.raises(DataError, match=rf"^{path}:6: invalid JSON \(Expecting value"):
        process_sft(SFTDataConfig(source=str(path)), tmp_path / "out")
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"instruction": "a", "response": "b"},\n {oops}\n]\n')
    with pytest.raises(DataError, match=rf"^{arr}:3: invalid JSON"):
        process_sft(SFTDataConfig(source=str(arr)), tmp_path / "out")
    notobj = _write_lines(tmp_path / "list.jsonl", ['["a", "b"]'])
    with pytest.raises(DataError, match=rf"^{notobj}:1: expected a JSON object"):
        process_sft(SFTDataConfig(source=str(notobj)), tmp_path / "out")


def test_missing_column_names_column_and_file(tmp_path):
    path = _write_jsonl(tmp_path / "alpaca.jsonl",
                        [{"instruction": "i", "input": "", "output": "o"}])
    with pytest.raises(DataError) as err:
        process_sft(SFTDataConfig(source=str(path)), tmp_path / "out")
    msg = str(err.value)
    assert str(path) in msg and "'context'" in msg and "process.sft.columns" in msg
    assert "\n" not in msg

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet: no column 'text' \(found: content\)"):
        process_pretrain(PretrainDataConfig(source=str(tmp_path / "train.parquet"),
                                            format="documents"), tmp_path / "out")
    with pytest.raises(DataError, match=r"column 'response' is not a string \(got int\)"):
        process_sft(SFTDataConfig(source=str(_write_jsonl(
            tmp_path / "num.jsonl", [{"instruction": "i", "context": "", "response": 3}]))),
            tmp_path / "out")


def test_empty_corpus_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "dolly.jsonl",
                        [{"instruction": "", "context": "", "response": "r"},
                         {"instruction": "i", "context": "", "response": ""}])
    with pytest.raises(DataError, match=r"no examples left after cleaning "
                                        r"\(empty_instruction: 1, empty_response: 1\)"):
        process_sft(SFTDataConfig(source=str(path)), tmp_path / "out")
    empty = _write_lines(tmp_path / "wiki.train.raw", [" ", " "])
    with pytest.raises(DataError, match="no documents in the train split"):
        process_pretrain(PretrainDataConfig(source=str(empty)), tmp_path / "out")
    # Too few documents to carve a validation split: say so and how to fix it.
    small = _wiki_file(tmp_path / "small" / "wiki.raw", 3)
    with pytest.raises(DataError, match="too few for validation_fraction=0.05"):
        process_pretrain(PretrainDataConfig(source=str(small)), tmp_path / "out")


def test_directory_layout_errors(tmp_path):
    raw = tmp_path / "raw"
    _wiki_file(raw / "wiki.train.raw", 5)
    _wiki_file(raw / "extra.raw", 5)
    with pytest.raises(DataError, match="extra.raw: cannot tell its split"):
        process_pretrain(PretrainDataConfig(source=str(raw)), tmp_path / "out")
    (raw / "extra.raw").unlink()
    (raw / "wiki.train.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        process_pretrain(PretrainDataConfig(source=str(raw)), tmp_path / "out")
    only_valid = tmp_path / "v"
    _wiki_file(only_valid / "wiki.valid.raw", 5)
    with pytest.raises(DataError, match="no train file"):
        process_pretrain(PretrainDataConfig(source=str(only_valid)), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        process_sft(SFTDataConfig(source=str(tmp_path / "empty")), tmp_path / "out")


def test_hub_unreachable_is_one_helpful_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub "
                              "(LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(sources, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        process_pretrain(PretrainDataConfig(), tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "Salesforce/wikitext" in msg and "ConnectionError" in msg
    assert "hub" in msg and "unreachable" in msg and "raw/pretrain" in msg and "README" in msg
    with pytest.raises(DataError, match="hub may be unreachable.*local path such as raw/sft"):
        process_sft(SFTDataConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "closed HF_ENDPOINT"])
def test_offline_hub_load_fails_fast_in_one_line(tmp_path, how):
    """The real `datasets` with no reachable hub: the stage prints one line. A hub id nobody has
    cached. How fast (within 5 s; a closed endpoint once cost ~36 s of retries) is machine-
    dependent: `python bench/machine_checks.py offline_hub`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
           "HF_ENDPOINT") and not k.lower().endswith("_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               PYTHONPATH=str(ROOT))
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    params = {"process": {"pretrain": {"source": "minigpt-tests/not-cached", "name": None}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "process.py"), "pretrain"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not load 'minigpt-tests/not-cached'")
    assert "local path such as raw/pretrain" in err[0]
    if how != "HF_HUB_OFFLINE":
        assert "unreachable" in err[0] and "127.0.0.1" in err[0]


# --------------------------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------------------------

def test_failed_run_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "processed" / "sft"
    good = _write_jsonl(tmp_path / "good.jsonl", _dolly_rows(40))
    process_sft(SFTDataConfig(source=str(good), validation_fraction=0.2, test_fraction=0.2), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"}
    # Fails late: 40 good rows are written to the temporary directory before the bad line.
    bad = _write_jsonl(tmp_path / "bad.jsonl", _dolly_rows(80, seed=5))
    with bad.open("a") as f:
        f.write("not json\n")
    with pytest.raises(DataError, match="bad.jsonl:81: invalid JSON"):
        process_sft(SFTDataConfig(source=str(bad)), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(out.parent) == ["sft"]  # no temporary directories left behind
    # A successful run replaces the old output completely.
    process_sft(SFTDataConfig(source=str(bad.with_name("good.jsonl"))), out)
    assert os.listdir(out.parent) == ["sft"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["t"]
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["t"]


def test_jsonl_keeps_one_document_per_line(tmp_path):
    path = _write_jsonl(tmp_path / "w.jsonl", [{"text": "a\u2028b\x85c\nd"}] * 3)
    process_pretrain(PretrainDataConfig(source=str(path), format="documents",
                                        validation_fraction=0, test_fraction=0), tmp_path / "o")
    raw = (tmp_path / "o" / "train.jsonl").read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 3
    assert next(_records(tmp_path / "o" / "train.jsonl"))["text"] == "a\u2028b\x85c\nd"


# --------------------------------------------------------------------------------------------
# The stage script
# --------------------------------------------------------------------------------------------

def _run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return conftest.run_stage_script("process", cwd, *args, timeout=120)


@pytest.mark.slow
def test_stage_script_end_to_end(tmp_path):
    _wiki_file(tmp_path / "raw" / "pretrain" / "wiki.train.raw", 30)
    _wiki_file(tmp_path / "raw" / "pretrain" / "wiki.valid.raw", 3, seed=1)
    _wiki_file(tmp_path / "raw" / "pretrain" / "wiki.test.raw", 3, seed=2)
    _write_jsonl(tmp_path / "raw" / "sft" / "dolly.jsonl", _dolly_rows(80))
    params = {"process": {"pretrain": {"source": "raw/pretrain", "name": None},
                          "sft": {"source": "raw/sft/dolly.jsonl", "validation_fraction": 0.1,
                                  "test_fraction": 0.1}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for corpus in ("pretrain", "sft"):
        result = _run_stage(tmp_path, corpus)
        assert result.returncode == 0, result.stderr
        assert f"process@{corpus}:" in result.stdout
        out = tmp_path / "data" / "processed" / corpus
        assert sorted(os.listdir(out)) == ["stats.json", "test.jsonl", "train.jsonl",
                                           "validation.jsonl"]
    assert _stats(tmp_path / "data/processed/pretrain")["train"]["documents"] == 30
    assert sum(_stats(tmp_path / "data/processed/sft")[s]["examples"]
               for s in ("train", "validation", "test")) == 80

    # Errors: one line on stderr, exit status 2, previous output untouched.
    before = (tmp_path / "data/processed/sft/train.jsonl").read_bytes()
    with (tmp_path / "raw" / "sft" / "dolly.jsonl").open("a") as f:
        f.write("{bad\n")
    result = _run_stage(tmp_path, "sft")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: raw/sft/dolly.jsonl:81: invalid JSON "
                                          f"(Expecting property name enclosed in double quotes, "
                                          f"column 2)"]
    assert (tmp_path / "data/processed/sft/train.jsonl").read_bytes() == before

    params["process"]["pretrain"]["bogus"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _run_stage(tmp_path, "pretrain")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: params.yaml: process.pretrain.bogus: unknown key")

    result = _run_stage(tmp_path, "nonsense")
    assert result.returncode == 2 and "usage:" in result.stderr


# --------------------------------------------------------------------------------------------
# Format by evidence, text blocks, streamed hub slices
# --------------------------------------------------------------------------------------------

def _records(path: Path):
    """The JSON objects of a processed split, read as the later stages read them."""
    return (obj for _, _, obj in read_objects(path))


def _texts(out: Path, split: str = "train") -> list[str]:
    return [r["text"] for r in _records(out / f"{split}.jsonl")]


def _no_carving(**kw) -> PretrainDataConfig:
    return PretrainDataConfig(validation_fraction=0, test_fraction=0, **kw)


def test_format_auto_is_wikitext_only_on_evidence(tmp_path):
    wiki = _write_lines(tmp_path / "wiki" / "wiki.train.raw", WIKI_LINES)
    assert sources.pretrain_format(_no_carving(source=str(wiki))) == "wikitext"
    # The real quick-start files, and WikiText rows kept as parquet (the hub's own layout).
    if SHARED.is_dir():
        assert sources.pretrain_format(_no_carving(source=str(SHARED / "wikitext-2-raw"))) \
            == "wikitext"
        assert sources.pretrain_format(_no_carving(source=str(SHARED / "extra"))) == "documents"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [l + "\n" for l in WIKI_LINES]}), tmp_path / "w.parquet")
    assert sources.pretrain_format(_no_carving(source=str(tmp_path / "w.parquet"))) == "wikitext"
    # Hub ids: WikiText's only (no network needed to decide).
    assert sources.pretrain_format(_no_carving(source="Salesforce/wikitext")) == "wikitext"
    assert sources.pretrain_format(_no_carving(source="HuggingFaceFW/fineweb-edu")) == "documents"
    # A heading-like line that is not the first non-blank line is not evidence.
    prose = _write_lines(tmp_path / "p" / "train.txt",
                         ["Some prose.", "", " = Not A Title Here = ", "", "More prose."])
    assert sources.pretrain_format(_no_carving(source=str(prose))) == "documents"
    # An explicit format is never second-guessed.
    assert sources.pretrain_format(_no_carving(source=str(prose), format="wikitext")) == "wikitext"


def test_format_auto_decides_on_a_bounded_prefix(tmp_path, monkeypatch):
    path = _write_lines(tmp_path / "train.txt", [" "] * 40 + WIKI_LINES[1:])
    assert sources.pretrain_format(_no_carving(source=str(path))) == "wikitext"
    monkeypatch.setattr(sources, "SNIFF_CHARS", 64)  # the title now lies past the prefix
    assert sources.pretrain_format(_no_carving(source=str(path))) == "documents"
    rows = [{"text": " "}] * 5 + [{"text": " = T = "}]
    jsonl = _write_jsonl(tmp_path / "j.jsonl", rows)
    assert sources.pretrain_format(_no_carving(source=str(jsonl))) == "wikitext"
    monkeypatch.setattr(sources, "SNIFF_ROWS", 3)
    assert sources.pretrain_format(_no_carving(source=str(jsonl))) == "documents"


def test_jsonl_corpus_is_one_document_per_row_with_default_params(tmp_path):
    # The default params (format auto, detokenize true) once made this ONE document.
    docs = [f"Document {i} : the {WORDS[i % len(WORDS)]} @-@ thing ." for i in range(60)]
    path = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    stats = process_pretrain(PretrainDataConfig(source=str(path)), tmp_path / "out")
    assert sum(stats[s]["documents"] for s in SPLITS_) == 60
    assert stats["wikitext"] is False and stats["detokenized"] is False
    written = {t for s in SPLITS_ for t in _texts(tmp_path / "out", s)}
    assert written == set(docs)  # never detokenized: documents are written as they are


SPLITS_ = ("train", "validation", "test")


def test_formats_wikitext_and_documents_on_the_same_file(tmp_path):
    path = _write_lines(tmp_path / "wiki.train.raw", WIKI_LINES)
    auto = process_pretrain(_no_carving(source=str(path)), tmp_path / "auto")
    wiki = process_pretrain(_no_carving(source=str(path), format="wikitext"), tmp_path / "wiki")
    assert auto == wiki and auto["train"]["documents"] == 2
    assert _texts(tmp_path / "auto") == _texts(tmp_path / "wiki")
    verbatim = process_pretrain(_no_carving(source=str(path), format="wikitext",
                                            detokenize=False), tmp_path / "verbatim")
    assert verbatim["detokenized"] is False
    assert _texts(tmp_path / "verbatim")[1] == "\n".join(WIKI_LINES[15:18])  # as in the file
    # documents: blank-line blocks, verbatim (WIKI_LINES has blank lines between most lines).
    docs = process_pretrain(_no_carving(source=str(path), format="documents"), tmp_path / "docs")
    assert docs["wikitext"] is False and docs["detokenized"] is False
    blocks = _texts(tmp_path / "docs")
    assert len(blocks) == 8 and blocks[0] == WIKI_LINES[1]
    assert blocks[1] == WIKI_LINES[3] + "\n" + WIKI_LINES[4] and "@-@" in blocks[1]
    # wikitext forced on a file auto would call documents: regrouped at the titles all the same.
    late = _write_lines(tmp_path / "late" / "train.txt", ["Preface line."] + WIKI_LINES)
    assert sources.pretrain_format(_no_carving(source=str(late))) == "documents"
    forced = process_pretrain(_no_carving(source=str(late), format="wikitext"), tmp_path / "f")
    assert forced["train"]["documents"] == 3 and _texts(tmp_path / "f")[0] == "Preface line."


def test_text_documents_are_blank_line_blocks_with_a_size_cap(tmp_path, monkeypatch):
    lines = ["First doc, line one.", "line two.", "", "  ", "\t", "Second doc.", " ",
             "Third doc."]
    path = _write_lines(tmp_path / "train.txt", lines)
    process_pretrain(_no_carving(source=str(path)), tmp_path / "a")
    assert _texts(tmp_path / "a") == ["First doc, line one.\nline two.", "Second doc.",
                                      "Third doc."]
    # A file without blank lines is never one giant document: a block ends at the first line
    # end past MAX_BLOCK_CHARS; a line is never cut.
    monkeypatch.setattr(sources, "MAX_BLOCK_CHARS", 100)
    many = _write_lines(tmp_path / "b" / "train.txt", [f"line {i} " + "x" * 30 for i in range(50)])
    process_pretrain(_no_carving(source=str(many)), tmp_path / "b_out")
    blocks = _texts(tmp_path / "b_out")
    assert len(blocks) == 17 and all(b.count("\n") == 2 for b in blocks[:-1])  # 3 x 39 > 100
    assert "\n".join(blocks) == many.read_text().rstrip("\n")
    long_line = "word " * 100
    one = _write_lines(tmp_path / "c" / "train.txt", ["short", long_line, "after"])
    process_pretrain(_no_carving(source=str(one)), tmp_path / "c_out")
    assert _texts(tmp_path / "c_out") == [f"short\n{long_line}", "after"]


def test_word_count_of_a_huge_document_matches_split():
    from minigpt.splits import count_words

    rng = random.Random(0)
    text = "".join(rng.choice(["ab", "c", " ", "\n", "  ", "déf"]) for _ in range(20_000))
    for chunk in (7, 64, 1000, 2**20):
        assert count_words(text, chunk) == len(text.split())
    assert count_words("x" * 100, 7) == 1 and count_words(" " * 50, 7) == 0


FINEWEB_README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
A local copy of a hub dataset in the hub's own layout (FineWeb-Edu's).
"""


def _hub_layout(root: Path, shards: list[list[str]], broken_last: bool = False) -> Path:
    """`root` laid out like FineWeb-Edu on the hub: a README with configs, parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sample" / "10BT").mkdir(parents=True)
    (root / "README.md").write_text(FINEWEB_README)
    for k, docs in enumerate(shards):
        pq.write_table(pa.table({"text": docs, "id": [f"{k}-{i}" for i in range(len(docs))]}),
                       root / "sample" / "10BT" / f"{k:03d}_00000.parquet")
    if broken_last:  # reading it would fail: proves the stream never gets there
        (root / "sample" / "10BT" / f"{len(shards):03d}_00000.parquet").write_bytes(b"not parquet")
    return root


def _serve_hub_from(monkeypatch, repos: dict[str, Path]) -> list:
    """Replace only the network: a hub id loads, with the same arguments, from a local copy."""
    import datasets

    calls = []

    def load(source, *args, **kwargs):
        calls.append((source, args, kwargs))
        kwargs = {k: v for k, v in kwargs.items() if not (k == "revision" and v is None)}
        return datasets.load_dataset(str(repos[source]), *args, **kwargs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "load_dataset", load)
    return calls


def test_hub_slice_is_streamed_from_the_shards_it_needs(tmp_path, monkeypatch):
    import minigpt.data as data

    # Shards of 1500 rows: `datasets` streams 1000-row batches, which may run into the next
    # shard, and process reads ahead by the chunks in flight (2 per worker): small ones here.
    monkeypatch.setattr(data, "CHUNK_ITEMS", 50)
    docs = [f"Web page {i} about the {WORDS[i % len(WORDS)]} and more." for i in range(4000)]
    repo = _hub_layout(tmp_path / "fw", [docs[:1500], docs[1500:3000], docs[3000:]],
                       broken_last=True)
    calls = _serve_hub_from(monkeypatch, {"HuggingFaceFW/fineweb-edu": repo})
    cfg = PretrainDataConfig(source="HuggingFaceFW/fineweb-edu", name="sample-10BT",
                             max_documents=1600, validation_fraction=0.1, test_fraction=0.1)
    stats = process_pretrain(cfg, tmp_path / "out")
    assert calls == [("HuggingFaceFW/fineweb-edu", ("sample-10BT",),
                      {"revision": None, "streaming": True})]
    assert stats["streamed"] is True and stats["wikitext"] is False
    assert stats["train"]["documents"] == 1600 and stats["dropped"]["max_documents"] == 0
    read = {t: s for s in SPLITS_ for t in _texts(tmp_path / "out", s)}
    # Only a prefix of the stream was read (the broken last shard never was) ...
    assert 1600 < len(read) < 2200 and set(read) == set(docs[:len(read)])
    # ... and each document's split is its hash's alone, as for any source.
    assert all(split == assign_split(t, 0.1, 0.1) for t, split in read.items())
    assert stats["validation"]["documents"] > 0 and stats["test"]["documents"] > 0

    # Workers read ahead of the writer: a streamed slice still ends at the same document.
    process_pretrain(cfg, tmp_path / "one", num_proc=1)
    process_pretrain(cfg, tmp_path / "three", num_proc=3)
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "three" / f).read_bytes()
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "out" / f).read_bytes()

    # Shard order does not move a document between splits: the same pages, shards rearranged.
    again = _hub_layout(tmp_path / "fw2", [docs[2500:][::-1], docs[:1200], docs[1200:2500]])
    _serve_hub_from(monkeypatch, {"HuggingFaceFW/fineweb-edu": again})
    full = process_pretrain(dataclasses.replace(cfg, max_documents=10_000), tmp_path / "out2")
    assert sum(full[s]["documents"] for s in SPLITS_) == 4000
    everything = {t: s for s in SPLITS_ for t in _texts(tmp_path / "out2", s)}
    assert all(everything[t] == s for t, s in read.items())


def test_a_failed_shard_read_is_one_line(tmp_path, monkeypatch):
    repo = _hub_layout(tmp_path / "fw", [["a b c", "d e f"]], broken_last=True)
    calls = _serve_hub_from(monkeypatch, {"org/web": repo})
    with pytest.raises(DataError) as err:  # 2 documents < 10: the stream reaches the broken shard
        process_pretrain(PretrainDataConfig(source="org/web", name="sample-10BT",
                                            max_documents=10), tmp_path / "out")
    assert calls[0][2] == {"revision": None, "streaming": True}
    assert str(err.value).startswith("org/web [train]: reading failed (")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_long_document_is_one_document_in_the_token_stream(tmp_path, monkeypatch):
    """process keeps a long text document whole; the tokenizer trains on it in pieces and encode
    encodes it in pieces: the stream holds its exact ids and one <|endoftext|> after it."""

    import minigpt.encode as enc
    from minigpt.tokenizer import EOT, encode_text, save_tokenizer, train_tokenizer

    rng = random.Random(0)
    long_line = " ".join(rng.choice(WORDS) for _ in range(3000))  # ~20k characters, one line
    path = _write_lines(tmp_path / "train.txt", ["Short one.", "", long_line, long_line, "",
                                                 "Last one."])
    process_pretrain(_no_carving(source=str(path)), tmp_path / "processed")
    docs = _texts(tmp_path / "processed")
    assert docs == ["Short one.", f"{long_line}\n{long_line}", "Last one."]
    monkeypatch.setattr(enc, "PIECE_CHARS", 1000)  # so the long document is encoded in pieces
    tok = train_tokenizer(docs, 400)
    save_tokenizer(tok, tmp_path / "tok.json")
    enc.encode_corpus("pretrain", tmp_path / "processed", tmp_path / "tok.json",
                      tmp_path / "tokens", splits=("train",))
    ids = enc.read_tokens(tmp_path / "tokens" / "train").tolist()
    eot = tok.token_to_id(EOT)
    want = [i for d in docs for i in encode_text(tok, d) + [eot]]
    assert ids == want and ids.count(eot) == 3
    assert len(enc.split_text(docs[1], 1000)) > 10


@pytest.mark.slow
def test_source_outside_raw_warns_that_dvc_does_not_track_it(tmp_path):
    """dvc.yaml declares raw/ as the process stages' dependency: a source elsewhere (outside the
    repo, say) is read but not tracked, so edits to it would leave stale outputs without a word."""
    outside = tmp_path / "elsewhere" / "dolly.jsonl"
    _write_jsonl(outside, _dolly_rows(40))
    _write_jsonl(tmp_path / "repo" / "raw" / "sft" / "dolly.jsonl", _dolly_rows(40))
    repo = tmp_path / "repo"
    for source, warned in ((str(outside), True), ("../elsewhere/dolly.jsonl", True),
                           ("raw/sft/dolly.jsonl", False), (str(repo / "raw/sft"), False)):
        (repo / "params.yaml").write_text(yaml.safe_dump({"process": {"sft": {"source": source}}}))
        result = _run_stage(repo, "sft")
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        if warned:
            assert lines == [f"warning: process.sft.source {source} is outside raw/, so DVC does not "
                             "track it: editing it will not re-run process@sft (copy it under raw/ "
                             "and `dvc add` it, or `dvc import-url` it to raw/; see raw/README.md)"]
        else:
            assert lines == [], lines


@pytest.mark.parametrize("num_proc", [1, 2])
def test_pretrain_jsonl_errors_name_file_and_line_whatever_the_workers(tmp_path, num_proc):
    """A pre-training .jsonl: blank lines are no rows, and the first bad line is the one named,
    FILE:LINE (a JSON-escaped lone surrogate too: it used to fail at write time, a traceback)."""
    docs = [{"text": f"Document {i} about the {WORDS[i % len(WORDS)]}."} for i in range(300)]
    path = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    with path.open("a") as f:
        f.write("\n  \n" + json.dumps({"text": "After the blank lines."}) + "\n")
    stats = process_pretrain(_no_carving(source=str(path)), tmp_path / "ok", num_proc=num_proc)
    assert stats["train"]["documents"] == 301
    assert _texts(tmp_path / "ok")[-1] == "After the blank lines."
    for bad, needle in (('{"text": "cut', ":302: invalid JSON"),
                        ('["a list"]', ":302: expected a JSON object"),
                        ('{"body": "x"}', ":302: no column 'text' (found: body) (set process."
                                          "pretrain.text_column)"),
                        ('{"text": "a\\ud800b"}', ":302: column 'text' holds a lone surrogate "
                                                  "(U+D800)")):
        lines = path.read_text().splitlines()[:301] + [bad, "also not json"]
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError) as err:
            process_pretrain(_no_carving(source=str(path)), tmp_path / "bad", num_proc=num_proc)
        assert str(err.value).startswith(f"{path}{needle}"), str(err.value)
        assert not (tmp_path / "bad").exists()
