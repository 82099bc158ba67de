"""SFT data: loss masking, truncation, padding/packing alignment, resume and DDP slicing.

Examples are built by hand in the chat template's shape (special ids from docs/FORMATS.md):
`<|user|> prompt... <|assistant|> response... <|endoftext|>`, mask 1 on the response and the end
token. Everything runs on a tiny random GPT in well under a second per test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt import sft
from minigpt.model import GPT, GPTConfig, IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

EOT, PAD, USER, ASSISTANT = 0, 1, 3, 4
VOCAB = 40


def example(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = [USER, *prompt, ASSISTANT, *response, EOT]
    mask = [0] * (len(prompt) + 2) + [1] * (len(response) + 1)
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)


def random_examples(n: int, rng: np.random.Generator, max_prompt: int = 10, max_resp: int = 8):
    return [example(rng.integers(5, VOCAB, rng.integers(1, max_prompt)).tolist(),
                    rng.integers(5, VOCAB, rng.integers(1, max_resp)).tolist()) for _ in range(n)]


def make_split(n: int = 40, block_size: int = 24, seed: int = 0) -> sft.SFTSplit:
    return sft.build_split("train", random_examples(n, np.random.default_rng(seed)), block_size)


def write_sft(directory, split: str, examples, tokenizer_hash: str = "abc") -> None:
    """The binding on-disk format (docs/FORMATS.md)."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate([e[0] for e in examples]) if examples else np.zeros(0)
    mask = np.concatenate([e[1] for e in examples]) if examples else np.zeros(0)
    idx = np.cumsum([0] + [len(e[0]) for e in examples]).astype(np.uint64)
    ids.astype(np.uint16).tofile(directory / f"{split}.bin")
    mask.astype(np.uint8).tofile(directory / f"{split}.mask.bin")
    idx.tofile(directory / f"{split}.idx.bin")
    meta = {"dtype": "uint16", "count": int(len(ids)), "examples": len(examples),
            "tokenizer_hash": tokenizer_hash}
    (directory / f"{split}.json").write_text(json.dumps(meta))


def tiny_gpt(block_size: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, block_size=block_size))


# --- loss masking -------------------------------------------------------------------------------


def test_targets_are_response_only():
    ids, mask = example([7, 8, 9], [10, 11])
    x, y = sft.row_xy(sft.build_split("t", [(ids, mask)], 16), [0])
    assert x.tolist() == ids[:-1].tolist()
    # y[t] predicts ids[t+1]: prompt and <|assistant|> ignored, response and EOT kept
    assert y.tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, 10, 11, EOT]


def test_masked_positions_contribute_nothing_to_loss_and_gradient():
    split = make_split(6, block_size=30)
    x, y = sft.collate([sft.row_xy(split, [i]) for i in range(len(split))], PAD)
    model = tiny_gpt()

    def loss_and_grads(x, y):
        model.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(x, y)

    # 1) the loss is exactly the mean CE over response positions, computed from full logits
    logits, _ = model(x)
    keep = y != IGNORE
    manual = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)

    # 2) putting real token ids at the ignored target positions (prompt, pads) and ignoring them
    #    by an explicit weight instead gives the same loss: ignored rows carry no weight at all
    noisy = torch.where(keep, y, torch.randint(5, VOCAB, y.shape))
    per_pos = F.cross_entropy(logits.view(-1, VOCAB), noisy.view(-1), reduction="none").view(y.shape)
    torch.testing.assert_close((per_pos * keep).sum() / keep.sum(), manual, rtol=1e-5, atol=1e-6)

    # 3) what sits in x after the last real token (the pad inputs) changes neither loss nor grads:
    #    causal attention never lets a pad reach a target
    x2 = torch.where(torch.cumsum(keep.flip(1), 1).flip(1) == 0, torch.randint(5, VOCAB, x.shape), x)
    assert not torch.equal(x2, x)
    loss2, grads2 = loss_and_grads(x2, y)
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)

    # 4) the gradient reaching each position's final hidden state is exactly 0 where masked
    hidden: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    try:
        _, loss3 = model(x, y)
        (g,) = torch.autograd.grad(loss3, hidden[0])
    finally:
        hook.remove()
    assert torch.all(g[~keep] == 0)
    assert torch.all(g[keep].abs().sum(-1) > 0)


# --- truncation ---------------------------------------------------------------------------------


def test_truncation_keeps_whole_response_and_drops_too_long():
    block = 16
    fits = example([5] * 3, [6] * 4)  # 10 tokens
    long_prompt = example(list(range(5, 25)), [30, 31, 32])  # 26 tokens: prompt must shrink
    long_response = example([5], [7] * 20)  # response + EOT alone exceed block + 1
    split = sft.build_split("train", [fits, long_prompt, long_response], block)
    assert (split.total, len(split), split.truncated, split.dropped) == (3, 2, 1, 1)
    ids, mask = split.ids[1], split.masks[1]
    assert len(ids) <= block + 1
    assert ids[0] == USER and ids[-5:].tolist() == [ASSISTANT, 30, 31, 32, EOT]
    assert mask.tolist()[-4:] == [1, 1, 1, 1] and mask[:-4].sum() == 0  # whole response kept
    assert split.stats() == {"examples": 3, "used": 2, "dropped": 1, "truncated": 1,
                             "target_tokens": 5 + 4}


def test_zero_usable_examples_is_a_clear_error(tmp_path):
    with pytest.raises(sft.SFTDataError, match=r"'validation'.*empty"):
        sft.build_split("validation", [], 16)
    too_long = [example([5], [7] * 30) for _ in range(3)]
    with pytest.raises(sft.SFTDataError, match=r"'train'.*all 3 are too long.*block_size=16"):
        sft.build_split("train", too_long, 16)
    write_sft(tmp_path, "train", too_long)
    with pytest.raises(sft.SFTDataError, match="'train'"):
        sft.load_split(tmp_path, "train", 16)


def test_load_split_reads_the_file_format(tmp_path):
    examples = random_examples(7, np.random.default_rng(1))
    write_sft(tmp_path, "validation", examples)
    split = sft.load_split(tmp_path, "validation", 64)
    assert len(split) == 7
    for (ids, mask), got_ids, got_mask in zip(examples, split.ids, split.masks):
        assert got_ids.tolist() == ids.tolist() and got_mask.tolist() == mask.astype(bool).tolist()


# --- padding and packing ------------------------------------------------------------------------


def test_padding_alignment():
    split = make_split(8)
    rows = [[0], [1], [2]]
    x, y = sft.collate([sft.row_xy(split, r) for r in rows], PAD)
    assert x.dtype == y.dtype == torch.int64
    assert x.shape[1] == max(len(split.ids[i]) for i in range(3)) - 1
    for r, (i,) in enumerate(rows):
        n = len(split.ids[i]) - 1
        assert x[r, :n].tolist() == split.ids[i][:-1].tolist()
        want = np.where(split.masks[i][1:], split.ids[i][1:], IGNORE)
        assert y[r, :n].tolist() == want.tolist()
        assert torch.all(x[r, n:] == PAD) and torch.all(y[r, n:] == IGNORE)


def test_packing_alignment_and_coverage():
    split = make_split(50, block_size=24)
    rows = sft.epoch_rows(split, 0, seed=3, packing=True)
    assert sorted(i for r in rows for i in r) == list(range(50))  # every example once per epoch
    assert any(len(r) > 1 for r in rows)
    for r in rows:
        x, y = sft.row_xy(split, r)
        assert len(x) <= split.block_size
        # the row's targets are exactly the union of its examples' own targets, in order
        want = [t for i in r for t in split.ids[i][1:][split.masks[i][1:]].tolist()]
        assert y[y != IGNORE].tolist() == want
        # each example's end token is followed by the next example's <|user|>, which is no target
        starts = np.cumsum([len(split.ids[i]) for i in r])[:-1]
        for s in starts:
            assert x[s - 1] == EOT and x[s] == USER and y[s - 1] == IGNORE


def test_batching_stats_measure_waste():
    split = make_split(200, block_size=32)
    pad = sft.batching_stats(split, 8, packing=False, seed=0)
    packed = sft.batching_stats(split, 8, packing=True, seed=0)
    assert 0 < packed["padding_fraction"] < pad["padding_fraction"] < 1
    assert pad["cross_example_targets"] == 0 and packed["cross_example_targets"] > 0
    assert pad["rows"] == 200 and packed["rows"] < 200
    # on a single batch, padding_fraction is the share of pad inputs in the collated tensor
    small = make_split(8, block_size=32)
    x, _ = sft.collate([sft.row_xy(small, [i]) for i in range(8)], PAD)
    got = sft.batching_stats(small, 8, packing=False)["padding_fraction"]
    assert got == pytest.approx((x == PAD).float().mean().item(), abs=1e-4)


# --- the train source: epochs, resume, DDP ------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_resume_is_exact(packing):
    split = make_split(30)
    a = sft.SFTBatches(split, 4, PAD, packing=packing, seed=7)
    for _ in range(9):  # crosses an epoch boundary (30 examples, 4 per batch)
        a.next()
    state = a.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    b = sft.SFTBatches(split, 4, PAD, packing=packing, seed=7)
    b.load_state_dict(restored)
    for _ in range(12):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch >= 1


def test_epochs_are_shuffled_and_complete():
    split = make_split(12)
    src = sft.SFTBatches(split, 4, PAD, seed=0)
    epoch0 = [r[0] for _ in range(3) for r in src.next_rows()]
    epoch1 = [r[0] for _ in range(3) for r in src.next_rows()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


@pytest.mark.parametrize("packing", [False, True])
def test_ddp_ranks_take_disjoint_slices_of_one_global_batch(packing):
    split = make_split(40)
    whole = sft.SFTBatches(split, 6, PAD, packing=packing, seed=5)
    ranks = [sft.SFTBatches(split, 3, PAD, packing=packing, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(10):
        global_rows = whole.next_rows()
        assert ranks[0].next_rows() + ranks[1].next_rows() == global_rows
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()


def test_val_batches_are_deterministic_and_sliced():
    split = make_split(11)
    one = sft.val_batches(split, 4, PAD)
    assert [len(x) for x, _ in one] == [4, 4, 3]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, sft.val_batches(split, 4, PAD)))
    assert len(sft.val_batches(split, 4, PAD, max_batches=2)) == 2
    r0 = sft.val_batches(split, 2, PAD, rank=0, world_size=2)
    r1 = sft.val_batches(split, 2, PAD, rank=1, world_size=2)
    assert sum(len(x) for x, _ in r0 + r1) == 11
    assert len(r0) == len(r1) == 3  # the same number of batches on every rank


def test_malformed_example_names_the_split():
    ids, mask = example([5] * 30, [6, 7])
    mask[3] = 1  # a target inside the prompt: not the chat template's shape
    with pytest.raises(sft.SFTDataError, match=r"'train', example 1"):
        sft.build_split("train", [example([5], [6]), (ids, mask)], 16)
