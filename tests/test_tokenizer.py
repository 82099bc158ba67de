"""Tokenizer: special-token ids, exact round trips for any Unicode, loading errors, hashing, the stage."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.tokenizer import (EOT, SPECIAL_TOKENS, TokenizerError, decode, encode_text, encode_texts,
                               iter_texts, load_tokenizer, save_tokenizer, special_id,
                               tokenizer_hash, train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]

SYLLABLES = "ka lo mi ne ru sa te vi bo da fe gu hi jo ku la me ni or pe qu re si to un".split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Small documents of made-up words (Zipf-like frequencies), a little Unicode mixed in."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    extra = ["café", "naïve", "東京", "😀", "—", "1,000", "\t", "  "]
    docs = []
    for _ in range(n):
        words = rng.choices(vocab, weights, k=rng.randint(20, 80))
        words = [w if rng.random() > 0.05 else rng.choice(extra) for w in words]
        docs.append(" ".join(words).capitalize() + ".\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=600, min_frequency=2)


def test_special_tokens_take_the_first_ids_in_order(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert [special_id(tok, t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError):
        special_id(tok, "<|nope|>")


def test_vocab_size_is_reached_and_holds_every_byte(tok):
    assert tok.get_vocab_size() == 600
    # all 256 byte symbols are in the vocabulary, whatever the training text held
    assert all(tok.encode(chr(c)).ids for c in range(1, 256))


@pytest.mark.parametrize("text", [
    "", " ", "  leading spaces", "trailing spaces   ", "\n", "\r\n", "line one\r\nline two\r\n",
    "tabs\tand\x0bvertical\x0cfeeds", "\x00\x01\x02\x1f\x7f control chars",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷", "中文字符和日本語のテキスト 한국어",
    "combining e\u0301 a\u0308 n\u0303 \u0301 alone", "zero width \u200b\u200d joiner \ufeff BOM",
    "Ω≈ç√∫˜µ≤≥÷ math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "  \n\n  \t  ",
])
def test_round_trip_edge_cases(tok, text):
    ids = encode_text(tok, text)
    assert decode(tok, ids) == text
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text  # the HF way too
    assert 0 not in ids  # nothing becomes <|endoftext|>


def _random_string(rng: random.Random) -> str:
    """Code points from many planes (no surrogates: they are not valid in UTF-8)."""
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF),
              (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    out = []
    for _ in range(rng.randint(0, 40)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)) if rng.random() < 0.7 else rng.choice(" \n\r\t"))
    return "".join(out)


def test_round_trip_random_unicode_fuzz(tok):
    rng = random.Random(1234)
    texts = [_random_string(rng) for _ in range(2000)]
    texts = [t for t in texts if "<|" not in t]  # stays free of literal special tokens
    for text, ids in zip(texts, encode_texts(tok, texts)):
        assert decode(tok, ids) == text
        assert encode_text(tok, text) == ids  # batch and single encodes agree


def test_literal_special_token_text_is_ordinary_text(tok):
    text = f"a {EOT} in an article <|user|>"
    ids = encode_text(tok, text)
    assert not set(ids) & {0, 1, 2, 3, 4}
    assert decode(tok, ids) == text
    # The plain HF call parses special tokens (that is what chat templates rely on) and
    # encode_text leaves the tokenizer's setting as it found it.
    assert 0 in tok.encode(text).ids
    assert tok.encode_special_tokens is False


def test_decode_keeps_special_tokens(tok):
    ids = [special_id(tok, "<|user|>")] + encode_text(tok, "\nhi\n") + [0]
    assert decode(tok, ids) == "<|user|>\nhi\n<|endoftext|>"


def test_save_load_and_hash(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    loaded = load_tokenizer(path)
    text = "The river 東京 😀 ran\r\n"
    assert loaded.encode(text).ids == tok.encode(text).ids
    h = tokenizer_hash(path)
    assert h == hashlib.sha256(path.read_bytes()).hexdigest()[:16] and len(h) == 16


def test_training_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_tokenizer(train_tokenizer(corpus(150, seed=3), 400, 2), a)
    save_tokenizer(train_tokenizer(iter(corpus(150, seed=3)), 400, 2), b)  # a stream works too
    assert tokenizer_hash(a) == tokenizer_hash(b)


def test_load_errors_are_one_line_naming_the_path(tmp_path, tok):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="nope.json: tokenizer file not found"):
        load_tokenizer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    # a valid tokenizer whose special tokens are not ids 0..4
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|pad|>"]
    del data["model"]["vocab"]["<|pad|>"]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="special tokens must have ids"):
        load_tokenizer(wrong)
    with pytest.raises(TokenizerError, match="nope.json"):
        tokenizer_hash(missing)


def test_iter_texts_streams_and_names_bad_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n')
    it = iter_texts(path)
    assert [next(it), next(it)] == ["a", "b"]
    with pytest.raises(TokenizerError, match=r"train.jsonl:4: field 'text' must be a string"):
        next(it)
    path.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(TokenizerError, match=r"train.jsonl:2: not valid JSON"):
        list(iter_texts(path))


def _run_stage(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MINIGPT_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "stages" / "tokenizer.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_stage_trains_and_writes_the_tokenizer(tmp_path):
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 500\n  min_frequency: 2\n")
    result = _run_stage(tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "data/processed/pretrain/train.jsonl: not found" in result.stderr
    assert result.stderr.count("\n") == 1

    src = tmp_path / "data" / "processed" / "pretrain"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(200)))
    result = _run_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vocab 500" in result.stdout
    tok = load_tokenizer(tmp_path / "data" / "tokenizer" / "tokenizer.json")
    assert tok.get_vocab_size() == 500


# --------------------------------------------------------------------------------------------
# Long documents in pieces; training on a budget
# --------------------------------------------------------------------------------------------

def test_training_pieces_are_bounded_and_lose_nothing():
    from minigpt.tokenizer import split_text, training_pieces

    text = "".join(corpus(300))
    pieces = list(training_pieces([text, "short", ""], 500))
    assert "".join(pieces) == text + "short"
    assert max(map(len, pieces)) <= 500 and len(pieces) > len(text) // 500
    # A stretch with no whitespace boundary: split_text leaves it whole, training cuts it.
    blob = "a b " + "x" * 1200 + " c"
    assert max(map(len, split_text(blob, 500))) > 500
    cut = list(training_pieces([blob], 500))
    assert "".join(cut) == blob and max(map(len, cut)) <= 500


def test_training_on_pieces_gives_the_same_tokenizer():
    from minigpt.tokenizer import training_pieces

    docs = corpus(400)
    long_docs = ["".join(docs[i:i + 100]) for i in range(0, 400, 100)]  # ~25k characters each
    whole = train_tokenizer(long_docs, vocab_size=600)
    pieces = train_tokenizer(list(training_pieces(long_docs, 700)), vocab_size=600)
    assert whole.to_str() == pieces.to_str()


HUGE_LINE_SCRIPT = """
import random
import minigpt.tokenizer as T
def peak_kb():  # VmHWM, not ru_maxrss: that one carries the parent's peak over a vfork + exec
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(5000)]
text = " ".join(rng.choice(words) for _ in range(1_000_000))  # one ~6 MB line
base = peak_kb()
T.train_tokenizer([text], 300)
print((peak_kb() - base) / 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_one_huge_line_trains_in_bounded_memory():
    # Whole, the trainer needs ~80 bytes per character of one sequence (a 100 MB line exhausted
    # 8 GB); in PIECE_CHARS pieces, a ~6 MB line grows the process by ~200 MB (mostly fixed).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAYON_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", HUGE_LINE_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 350, f"grew {result.stdout.strip()} MB"


def test_training_sample_within_budget_is_the_corpus_itself():
    from minigpt.tokenizer import TrainingSample

    docs = corpus(200)
    size = sum(map(len, docs))
    for sample in (TrainingSample(lambda: docs), TrainingSample(lambda: docs, size, 0),
                   TrainingSample(lambda: docs, size, 0, fits=True)):
        assert list(sample) == docs and not sample.sampled
        assert sample.documents == 200 and sample.characters == size


def test_training_sample_over_budget_is_the_first_characters_in_hash_order():
    from minigpt.tokenizer import TrainingSample, _sample_fraction

    docs = corpus(2000)
    total, budget = sum(map(len, docs)), sum(map(len, docs)) // 4
    reads = []

    def texts():
        reads.append(1)
        return iter(docs)

    sample = TrainingSample(texts, budget)
    chosen = list(sample)
    assert len(reads) == 2 and sample.sampled and sample.total == total
    assert sample.characters == sum(map(len, chosen)) == budget  # the budget is filled
    assert chosen == list(TrainingSample(lambda: docs, budget))  # deterministic
    # Chosen by each text's own hash, not its position: the lowest places, from all over (in
    # the last 1/65536 of places, where the budget runs out, in file order, one of them cut).
    whole = [t for t in chosen if t in set(docs)]
    assert len(whole) >= len(chosen) - 1
    assert all(_sample_fraction(t) < sample.threshold for t in whole)
    core = {d for d in docs if _sample_fraction(d) < sample.threshold - 2**-16}
    assert core <= set(chosen) and len(core) > len(chosen) - 10
    assert set(chosen) & set(docs[-500:]) and set(chosen) & set(docs[:500])
    # So another order picks the same documents (up to that last sliver).
    assert core <= set(TrainingSample(lambda: docs[::-1], budget))
    # A per-document cap cuts each document first (the budget counts what is kept).
    assert list(TrainingSample(lambda: docs, 0, 40)) == [d[:40] for d in docs]
    capped = TrainingSample(lambda: docs, budget // 10, 40)
    assert all(len(t) <= 40 for t in capped) and capped.characters == budget // 10


def _stage_dir(tmp_path: Path, docs: list[str], params: str) -> Path:
    src = tmp_path / "data" / "processed" / "pretrain"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "params.yaml").write_text(params)
    return tmp_path / "data" / "tokenizer" / "tokenizer.json"


def test_stage_defaults_train_on_everything_and_a_budget_samples(tmp_path):
    docs = corpus(600)
    vocab = "tokenizer:\n  vocab_size: 700\n"
    # Defaults (max_chars 1e9, no per-document cap): exactly the tokenizer of the whole split.
    out = _stage_dir(tmp_path / "a", docs, vocab)
    result = _run_stage(tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert "trained on 600 documents" in result.stdout and "sample" not in result.stdout
    full = train_tokenizer(docs, 700).to_str(pretty=True)
    assert out.read_text(encoding="utf-8") == full
    # A budget of a third: a hash sample, the same on every run, a different tokenizer.
    third = sum(map(len, docs)) // 3
    outs = []
    for name in ("b", "c"):
        outs.append(_stage_dir(tmp_path / name, docs, vocab + f"  max_chars: {third}\n"))
        result = _run_stage(tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert f"{third:,} characters (a sample of {sum(map(len, docs)):,})" in result.stdout
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_text(encoding="utf-8") != full
