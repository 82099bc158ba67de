"""minigpt.evaluate and stages/eval.py: the metric arithmetic on hand-made cases, then the stage.

Stubs stand in for the GPT where a known answer is needed: they follow its contract,
`model(idx, targets=None) -> (logits, loss)`, loss = mean cross-entropy over targets != -100.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from minigpt import answers, evaldata, perplexity
from minigpt import evaluate as ev
from minigpt.model import IGNORE
from minigpt.scores import echo_baseline, text_scores


class BigramStub:
    """Logits depend only on the current token (a fixed random table): every token's NLL is known
    in closed form whatever window it falls in, so the sliding window's total must match it exactly
    if every target is scored once and only once. Counts the calls it gets."""

    def __init__(self, vocab: int, seed: int = 0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def __call__(self, idx, targets=None):
        self.calls += 1
        logits = self.table[idx]
        if targets is None:
            return logits, None
        return None, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def exact_nll(self, tokens) -> float:
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        return float(F.cross_entropy(self.table[t[:-1]], t[1:], reduction="sum"))


class UniformStub(BigramStub):
    """All-zero logits: every token costs exactly ln(vocab)."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.table = torch.zeros(vocab, vocab)


def tiny_gpt(vocab: int = 50, block_size: int = 16):
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, block_size=block_size)).eval()


# ----------------------------------------------------------------------------- the window plan


@pytest.mark.parametrize("n,block,stride", [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 3),
                                            (100, 8, 8), (101, 8, 8), (64, 16, 1), (33, 16, 16)])
def test_window_plan_scores_every_target_once_with_context(n, block, stride):
    width = min(block, n)
    scored = []
    for begin, first in perplexity.window_plan(n, block, stride):
        assert 0 <= begin and begin + width <= n and 0 <= first < width
        for j in range(first, width):
            target = begin + 1 + j
            scored.append(target)
            context = target - begin  # tokens begin..target-1 are visible
            assert context <= block
            # the first window's early targets have what precedes them; all others >= block - stride
            assert context >= min(target, block - stride + 1)
    assert scored == list(range(1, n + 1))


def test_window_plan_rejects_stride_beyond_block():
    with pytest.raises(ValueError, match="stride"):
        perplexity.window_plan(100, 8, 9)


# ----------------------------------------------------------------------------- sliding window NLL


@pytest.mark.parametrize("stride,batch", [(1, 7), (3, 2), (5, 64), (8, 1)])
def test_sliding_window_scores_each_token_exactly_once(stride, batch):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=203).astype(np.uint16)  # memmap-like dtype
    model = BigramStub(20)
    nll, n = perplexity.sliding_window_nll(model, tokens, block_size=8, stride=stride, batch_size=batch)
    assert n == len(tokens) - 1
    assert nll == pytest.approx(model.exact_nll(tokens), rel=1e-5)


def test_sliding_window_batches_windows():
    tokens = np.arange(200) % 20
    model = BigramStub(20)
    perplexity.sliding_window_nll(model, tokens, block_size=8, stride=4, batch_size=10, workers=1)
    assert model.calls == math.ceil(len(perplexity.window_plan(199, 8, 4)) / 10)


def test_worker_threads_give_the_single_thread_totals():
    """The eval stage spreads batches over one worker thread per core: the same sums (in order)
    as one batch after another, for the sliding window and the SFT loss."""
    model = tiny_gpt(block_size=16)
    tokens = np.random.default_rng(2).integers(0, 50, size=400)
    one = perplexity.sliding_window_nll(model, tokens, 16, 5, 3, workers=1)
    for workers in (2, 3):
        nll, n = perplexity.sliding_window_nll(model, tokens, 16, 5, 3, workers=workers)
        assert n == one[1] and nll == pytest.approx(one[0], rel=1e-6)
    rng = np.random.default_rng(3)
    examples = [(rng.integers(0, 50, k), (np.arange(k) >= k // 2).astype(np.uint8)) for k in range(4, 17)]
    a = perplexity.masked_nll(model, examples, 2, pad_id=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # workers default to the intra-op threads: one means no pool
    try:
        b = perplexity.masked_nll(model, examples, 2, pad_id=1)
    finally:
        torch.set_num_threads(before)
    assert a[1:] == b[1:] and a[0] == pytest.approx(b[0], rel=1e-6)


def test_sliding_window_max_tokens_caps_the_targets():
    tokens = np.random.default_rng(1).integers(0, 20, size=500)
    model = BigramStub(20)
    nll, n = perplexity.sliding_window_nll(model, tokens, 8, 4, 16, max_tokens=77)
    assert n == 77
    assert nll == pytest.approx(model.exact_nll(tokens[:78]), rel=1e-5)


def test_sliding_window_equals_full_forward_when_text_fits():
    model = tiny_gpt(block_size=16)
    tokens = torch.randint(0, 50, (14,), generator=torch.Generator().manual_seed(0))
    nll, n = perplexity.sliding_window_nll(model, tokens.numpy(), block_size=16, stride=4, batch_size=4)
    with torch.no_grad():
        logits, _ = model(tokens[None, :-1])
        want = F.cross_entropy(logits[0], tokens[1:], reduction="sum").item()
    assert n == 13
    assert nll == pytest.approx(want, rel=1e-5)


def test_stride_equal_to_block_is_non_overlapping_chunks():
    model = tiny_gpt(block_size=16)
    tokens = torch.randint(0, 50, (16 * 5 + 1,), generator=torch.Generator().manual_seed(1))
    nll, n = perplexity.sliding_window_nll(model, tokens.numpy(), block_size=16, stride=16, batch_size=2)
    want = 0.0
    with torch.no_grad():
        for b in range(0, 80, 16):
            logits, _ = model(tokens[None, b : b + 16])
            want += F.cross_entropy(logits[0], tokens[b + 1 : b + 17], reduction="sum").item()
    assert n == 80
    assert nll == pytest.approx(want, rel=1e-5)


def test_more_context_does_not_change_the_count_and_gpt_runs_in_windows():
    model = tiny_gpt(block_size=16)
    tokens = np.random.default_rng(2).integers(0, 50, size=100)
    _, n1 = perplexity.sliding_window_nll(model, tokens, 16, 16, 8)
    _, n2 = perplexity.sliding_window_nll(model, tokens, 16, 3, 8)
    assert n1 == n2 == 99


# ----------------------------------------------------------------------------- metric arithmetic


def test_uniform_logits_give_ln_vocab_and_exact_bpb_and_word_ppl():
    vocab = 64
    tokens = np.arange(101) % vocab
    nll, n = perplexity.sliding_window_nll(UniformStub(vocab), tokens, 16, 8, 4)
    assert n == 100 and nll == pytest.approx(100 * math.log(vocab), rel=1e-6)
    m = perplexity.lm_metrics(nll, n, n_bytes=300, n_words=50)
    assert m["loss"] == pytest.approx(math.log(vocab))
    assert m["perplexity"] == pytest.approx(vocab)
    # 100 tokens at 6 bits each over 300 bytes; 100 ln 64 nats over 50 words -> 64^2 per word
    assert m["bits_per_byte"] == pytest.approx(600 / 300)
    assert m["word_perplexity"] == pytest.approx(vocab ** 2)


def test_loss_metrics_without_tokens_is_nan_and_rounded_makes_it_null():
    m = perplexity.loss_metrics(0.0, 0)
    assert math.isnan(m["loss"])
    assert ev.rounded({"a": m, "b": [1.23456789, 2]}) == {"a": {"loss": None, "perplexity": None},
                                                           "b": [1.23457, 2]}


# ----------------------------------------------------------------------------- SFT loss


def test_masked_nll_counts_response_tokens_only():
    vocab = 10
    model = BigramStub(vocab, seed=3)
    ids = np.array([3, 4, 5, 6, 7, 0])
    mask = np.array([0, 0, 0, 1, 1, 1])  # tokens 6, 7 and the closing EOT (0) are the response
    short = (np.array([3, 8, 0]), np.array([0, 1, 1]))
    prompt_only = (np.array([3, 4, 5]), np.array([0, 0, 0]))  # nothing to score: not counted
    nll, n, examples = perplexity.masked_nll(model, [(ids, mask), short, prompt_only], batch_size=2, pad_id=1)
    per_token = F.cross_entropy(model.table[torch.tensor(ids[:-1])], torch.tensor(ids[1:]),
                                reduction="none")
    per_short = F.cross_entropy(model.table[torch.tensor([3, 8])], torch.tensor([8, 0]), reduction="none")
    assert (n, examples) == (5, 2)
    assert nll == pytest.approx(float(per_token[2:].sum() + per_short.sum()), rel=1e-5)


def test_sft_rows_mask_prompt_targets_and_collate_pads():
    from minigpt.sft import collate, example_xy

    rows = [example_xy(np.array([5, 6, 7]), np.array([0, 0, 1])), example_xy([5, 6], [0, 1])]
    x, y = collate(rows, pad_id=1)
    assert x.tolist() == [[5, 6], [5, 1]]
    assert y.tolist() == [[IGNORE, 7], [6, IGNORE]]


# ----------------------------------------------------------------------------- text scores


def test_text_scores_identical_and_disjoint():
    refs = ["The capital of France is Paris.", "Drink water, sleep well and exercise daily."]
    same = text_scores(refs, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert same[key] == pytest.approx(1.0)
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert same["examples"] == 2
    none = text_scores(["zebra quokka", "xylophone"], refs)
    for key in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert none[key] == pytest.approx(0.0)
    assert none["chrf"] < 5.0  # chrF counts character n-grams: disjoint words may share a letter


def test_text_scores_stem_and_handle_empty_answers():
    s = text_scores(["cats running"], ["cat runs"])
    assert s["rouge1"] == pytest.approx(1.0)  # use_stemmer=True
    empty = text_scores([""], ["something"])
    assert empty["rouge1"] == 0.0 and empty["bleu"] == 0.0


def test_echo_baseline_repeats_instruction_and_context():
    assert echo_baseline("Name a fruit.") == "Name a fruit."
    assert echo_baseline("Summarise.", "Paris is big.") == "Summarise.\n\nParis is big."
    s = text_scores([echo_baseline("What is the capital of France?")], ["Paris is the capital of France."])
    assert 0.0 < s["rouge1"] < 1.0


def test_fit_prompt_cuts_user_text_and_keeps_the_template():
    # <|user|> "\n" instruction/context tokens "\n" <|assistant|> "\n"  (9 stands for "\n")
    ids = [3, 9, 10, 11, 12, 13, 14, 9, 4, 9]
    assert answers.fit_prompt(ids, 10) == ids
    assert answers.fit_prompt(ids, 7) == [3, 9, 10, 11, 9, 4, 9]
    assert answers.prompt_budget(256, 96) == 160 and answers.prompt_budget(32, 30) == 16
    with pytest.raises(ev.EvalError, match="cannot be cut to 3 tokens"):
        answers.fit_prompt(ids, 3)  # <|user|>, "\n" <|assistant|>, "\n": 4 at the least


def test_a_prompt_is_cut_exactly_as_an_example_whose_response_is_its_last_token():
    """template.truncate_prompt states the cut once: the same tokens truncate_example keeps for
    the prompt with a mask of 1 on its closing "\n" (how evaluation cut prompts before)."""
    from minigpt.template import truncate_example, truncate_prompt

    rng = random.Random(0)
    for _ in range(200):
        user = [rng.randrange(5, 50) for _ in range(rng.randrange(1, 30))]
        ids = [3] + user + [9, 4, 9]
        for max_len in range(1, len(ids) + 2):
            cut = truncate_example(ids, [0] * (len(ids) - 1) + [1], max_len)
            assert truncate_prompt(ids, max_len) == (None if cut is None else list(cut[0]))
    with pytest.raises(ValueError, match="not a generation prompt"):
        truncate_prompt([3, 10, 9, 4], 2)  # no token after <|assistant|>


# ----------------------------------------------------------------------------- the eval stage

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of river city band album war king team game season film song north south".split()
PROMPTS = ["What is the capital of France?", "Name a river."]
EVAL = {"device": "cpu", "stride": 8, "max_tokens": 0, "generate_examples": 3, "max_new_tokens": 6,
        "prompts": PROMPTS}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "."


def _qa(rng: random.Random) -> dict:
    context = _doc(rng) * rng.randint(1, 8) if rng.random() < 0.5 else ""  # some need cutting
    return {"instruction": f"Tell me about the {rng.choice(WORDS)}.", "context": context,
            "response": _doc(rng)}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace as the pipeline leaves it before eval: processed text, tokenizer, token
    files (the real encoder), and two random tiny model directories (checkpoint.save_model)."""
    from minigpt.checkpoint import save_model
    from minigpt.encode import encode_corpus
    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import save_tokenizer, tokenizer_hash, train_tokenizer

    root = tmp_path_factory.mktemp("eval_ws")
    rng = random.Random(0)
    stats = {}
    for split, n in (("train", 60), ("validation", 5), ("test", 12)):
        docs = [_doc(rng) for _ in range(n)]
        _write_jsonl(root / f"data/processed/pretrain/{split}.jsonl", [{"text": d} for d in docs])
        stats[split] = {"documents": n, "characters": sum(map(len, docs)),
                        "bytes": sum(len(d.encode()) for d in docs),
                        "words": sum(len(d.split()) for d in docs)}
        _write_jsonl(root / f"data/processed/sft/{split}.jsonl", [_qa(rng) for _ in range(n)])
    (root / "data/processed/pretrain/stats.json").write_text(json.dumps(stats))
    tok_file = root / "data/tokenizer/tokenizer.json"
    train = [json.loads(line)["text"] for line in
             (root / "data/processed/pretrain/train.jsonl").read_text().splitlines()]
    tok = train_tokenizer(train * 3, vocab_size=300)
    save_tokenizer(tok, tok_file)
    for corpus in ("pretrain", "sft"):
        encode_corpus(corpus, root / f"data/processed/{corpus}", tok_file, root / f"data/tokens/{corpus}")
    for seed, stage in ((0, "pretrain"), (1, "finetune")):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=64 * math.ceil(tok.get_vocab_size() / 64), n_layer=1,
                              n_head=2, n_embd=16, block_size=32))
        save_model(model, root / f"out/{stage}", tokenizer_file=tok_file,
                   meta={"stage": stage, "tokenizer_hash": tokenizer_hash(tok_file),
                         "chat_template": None if stage == "pretrain" else "minigpt-v1",
                         "tokenizer_vocab_size": tok.get_vocab_size()})
    return root


@pytest.fixture
def workspace(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    (root / "params.yaml").write_text(yaml.safe_dump({"eval": EVAL}))
    monkeypatch.chdir(root)
    return root


def _stage():
    spec = importlib.util.spec_from_file_location("eval_stage", ROOT / "stages" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(workspace: Path) -> dict[str, str]:
    return {str(p.relative_to(workspace)): p.read_text()
            for d in ("metrics/eval", "metrics/samples") for p in sorted((workspace / d).glob("*.json"))}


def test_eval_stage_end_to_end(workspace, capsys):
    stage = _stage()
    for name in ("pretrain", "finetune"):
        assert stage.main([name]) == 0, capsys.readouterr().err
        assert f"eval@{name}: ppl" in capsys.readouterr().out
    first = _outputs(workspace)
    assert sorted(first) == ["metrics/eval/finetune.json", "metrics/eval/pretrain.json",
                             "metrics/samples/finetune.json", "metrics/samples/pretrain.json"]
    count = json.loads((workspace / "data/tokens/pretrain/test.json").read_text())["count"]
    stats = json.loads((workspace / "data/processed/pretrain/stats.json").read_text())["test"]
    m = {name: json.loads(first[f"metrics/eval/{name}.json"]) for name in ("pretrain", "finetune")}
    for name in ("pretrain", "finetune"):
        assert list(m[name]) == ["lm", "sft", "gen", "baseline", "settings"]
        s = m[name]["settings"]
        assert s["tokens_scored"] == s["tokens_total"] == count  # every token, EOTs included
        assert (s["method"], s["window"], s["stride"], s["eot_scored"]) == ("sliding_window", 32, 8, True)
        assert (s["fraction_scored"], s["sizes_scaled"]) == (1.0, False)
        assert (s["bytes"], s["words"]) == (stats["bytes"], stats["words"])
        lm, sft, gen = m[name]["lm"], m[name]["sft"], m[name]["gen"]
        assert 4.0 < lm["loss"] < 7.0  # random init: about ln(vocab)
        assert lm["perplexity"] == pytest.approx(math.exp(lm["loss"]), rel=1e-4)
        assert lm["bits_per_byte"] == pytest.approx(lm["loss"] * count / math.log(2) / stats["bytes"],
                                                    rel=1e-4)
        assert lm["word_perplexity"] == pytest.approx(math.exp(lm["loss"] * count / stats["words"]),
                                                      rel=1e-4)
        assert sft["examples"] + sft["dropped"] == 12 and sft["tokens"] > 0 and sft["loss"] > 0
        assert gen["examples"] == 3
        assert set(gen) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "examples"}
        assert m[name]["baseline"]["gen"]["examples"] == 3 and m[name]["baseline"]["gen"]["rouge1"] > 0
        samples = json.loads(first[f"metrics/samples/{name}.json"])
        assert list(samples) == PROMPTS and all(isinstance(v, str) for v in samples.values())
    assert m["pretrain"]["lm"]["loss"] != m["finetune"]["lm"]["loss"]
    assert m["pretrain"]["baseline"] == m["finetune"]["baseline"]

    # deterministic: a second run writes the same bytes; each item writes only its own files
    (workspace / "metrics/eval/pretrain.json").unlink()
    assert stage.main(["finetune"]) == 0
    assert not (workspace / "metrics/eval/pretrain.json").exists()
    assert stage.main(["pretrain"]) == 0
    assert first == _outputs(workspace)


def test_eval_stage_needs_one_model_name(workspace, capsys):
    assert _stage().main(["both"]) == 2
    assert "usage: python stages/eval.py pretrain|finetune" in capsys.readouterr().err
    assert not (workspace / "metrics").exists()


def test_eval_stage_max_tokens_scales_bytes_and_words(workspace):
    (workspace / "params.yaml").write_text(yaml.safe_dump(
        {"eval": {**EVAL, "max_tokens": 100, "generate_examples": 0, "prompts": []}}))
    assert _stage().main(["finetune"]) == 0
    m = json.loads((workspace / "metrics/eval/finetune.json").read_text())
    s = m["settings"]
    assert s["tokens_scored"] == 100 and s["sizes_scaled"] is True and s["fraction_scored"] == pytest.approx(100 / s["tokens_total"], rel=1e-5)
    stats = json.loads((workspace / "data/processed/pretrain/stats.json").read_text())["test"]
    assert s["bytes"] == pytest.approx(stats["bytes"] * s["fraction_scored"], rel=1e-5)
    lm = m["lm"]
    assert lm["bits_per_byte"] == pytest.approx(lm["loss"] * 100 / math.log(2) / s["bytes"], rel=1e-4)
    assert "gen" not in m and m["baseline"] == {}
    assert json.loads((workspace / "metrics/samples/finetune.json").read_text()) == {}


def test_eval_reads_only_the_test_tokens_it_scores(workspace):
    from minigpt.checkpoint import load_model
    from minigpt.config import EvalConfig

    assert EvalConfig().max_tokens == 1_000_000  # bounded by default (WikiText's test split fits)
    full = evaldata.load_eval_data(workspace / "data/tokens", workspace / "data/processed", 0)
    capped = evaldata.load_eval_data(workspace / "data/tokens", workspace / "data/processed", 0, max_tokens=50)
    assert len(capped.tokens) == 51 and not isinstance(capped.tokens, np.memmap)
    assert capped.tokens_total == full.tokens_total == len(full.tokens) - 1 > 200
    assert np.array_equal(capped.tokens, full.tokens[:51])
    model, _, _ = load_model(workspace / "out/pretrain", "cpu")
    cfg = EvalConfig(**{**EVAL, "max_tokens": 50})
    assert ev.evaluate_lm(model, capped, cfg, torch.device("cpu")) == \
        ev.evaluate_lm(model, full, cfg, torch.device("cpu"))


def test_a_stride_beyond_the_block_is_refused_by_the_library_too(workspace):
    """The stage refuses it before loading (check_model, below); a caller of evaluate_lm gets
    window_plan's error naming the stride, not a run."""
    from minigpt.checkpoint import load_model
    from minigpt.config import EvalConfig

    data = evaldata.load_eval_data(workspace / "data/tokens", workspace / "data/processed", 0, max_tokens=50)
    model, _, _ = load_model(workspace / "out/pretrain", "cpu")
    with pytest.raises(ValueError, match=r"stride must be in \[1, block_size=32\] \(got 64\)"):
        ev.evaluate_lm(model, data, EvalConfig(**{**EVAL, "stride": 64}), torch.device("cpu"))


@pytest.mark.parametrize("item,breakage,message", [
    ("finetune", lambda ws: shutil.rmtree(ws / "out/finetune"), "out/finetune: model directory not found"),
    ("pretrain", lambda ws: (ws / "data/processed/pretrain/stats.json").unlink(), "stats.json: not found"),
    ("pretrain", lambda ws: (ws / "params.yaml").write_text(yaml.safe_dump({"eval": {**EVAL, "stride": 64}})),
     "eval.stride: 64 exceeds the model's block_size (32, out/pretrain)"),
])
def test_eval_stage_errors_are_one_line(workspace, capsys, item, breakage, message):
    breakage(workspace)
    assert _stage().main([item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (workspace / "metrics").exists()


def test_eval_of_a_diverged_model_is_an_error_not_empty_answers(workspace, capsys):
    """A NaN model's greedy answers used to be id 0 (empty text), scored without a word."""
    from minigpt.checkpoint import load_model, save_model

    model, _, config = load_model(workspace / "out/finetune")
    with torch.no_grad():
        model.layers[0].mlp.down.weight[0, 0] = float("nan")
    meta = {k: config[k] for k in ("stage", "tokenizer_hash", "chat_template", "tokenizer_vocab_size")}
    save_model(model, workspace / "out/finetune", tokenizer_file=workspace / "out/finetune/tokenizer.json",
               meta=meta)
    assert _stage().main(["finetune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out/finetune: weights hold NaN or inf (layers.0.mlp.down.weight")
    assert err.count("\n") == 1 and not (workspace / "metrics").exists()
