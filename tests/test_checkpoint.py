"""Checkpoints: atomic writes, model directory round trip (no pickle), load errors, and resume
state that survives a crash or a kill -9 at any moment (previous or new checkpoint, never a mix)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import checkpoint as ck
from minigpt import files, resume
from minigpt.checkpoint import CheckpointError
from minigpt.model import GPT, GPTConfig
from minigpt.optim import adamw

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=16))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from minigpt.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(["hello world, the quick brown fox"] * 20, 300), path)
    return path


def meta_for(tokenizer_file: Path) -> dict:
    from minigpt.tokenizer import tokenizer_hash

    return {"stage": "pretrain", "tokenizer_hash": tokenizer_hash(tokenizer_file), "chat_template": None}


# --- atomic primitives ---------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    files.atomic_write_bytes(path, b"one")
    files.atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    files.atomic_write_bytes(path, b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_save(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# --- model directory -----------------------------------------------------------------------


def test_model_dir_round_trip_identical_logits_without_pickle(tmp_path, tokenizer_file, monkeypatch):
    model = tiny().eval()
    out = tmp_path / "out" / "pretrain"
    ck.save_model(model, out, tokenizer_file=tokenizer_file, meta=meta_for(tokenizer_file))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["pretrain"]  # no temp leftovers
    assert "tok_emb.weight" in load_file(out / "model.safetensors")  # tied matrix stored once
    assert len(load_file(out / "model.safetensors")) == len(model.state_dict())

    def no_unpickling(*a, **k):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, tok, config = ck.load_model(out)
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert config["stage"] == "pretrain" and config["n_layer"] == 2 and config["chat_template"] is None
    assert tok.get_vocab_size() > 256


@pytest.mark.slow
def test_load_model_stays_light(tmp_path, tokenizer_file):
    # the shape check builds the model on the meta device; any init op there imports
    # torch._dynamo (~1.4 s, most of a short `minigpt generate`), so none may run
    out = tmp_path / "model"
    ck.save_model(tiny(), out, tokenizer_file=tokenizer_file, meta=meta_for(tokenizer_file))
    code = ("import sys; from minigpt.checkpoint import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert run.stdout.strip() == "False"


def test_save_model_overwrites_existing_directory(tmp_path, tokenizer_file):
    out = tmp_path / "m"
    ck.save_model(tiny(0), out, tokenizer_file=tokenizer_file, meta=meta_for(tokenizer_file))
    ck.save_model(tiny(1), out, tokenizer_file=tokenizer_file, meta=meta_for(tokenizer_file))
    loaded, _, _ = ck.load_model(out)
    assert torch.equal(loaded.tok_emb.weight, tiny(1).tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _one_line(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg


def test_load_model_errors(tmp_path, tokenizer_file):
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path / "nope")
    _one_line(e, tmp_path / "nope")

    out = tmp_path / "m"
    ck.save_model(tiny(), out, tokenizer_file=tokenizer_file, meta=meta_for(tokenizer_file))
    good = {n: (out / n).read_bytes() for n in ("config.json", "model.safetensors", "tokenizer.json")}

    def restore():
        for n, b in good.items():
            (out / n).write_bytes(b)

    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors missing") as e:
        ck.load_model(out)
    _one_line(e, out)
    restore()

    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config") as e:
        ck.load_model(out)
    _one_line(e, out / "config.json")
    restore()

    config = json.loads(good["config.json"])
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(CheckpointError, match="not a GPT config"):
        ck.load_model(out)
    restore()

    (out / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(CheckpointError, match="weights do not load") as e:
        ck.load_model(out)
    _one_line(e, out / "model.safetensors")
    restore()

    (out / "model.safetensors").write_bytes(b"\x00" * 64)  # garbage, not a pickle either
    with pytest.raises(CheckpointError, match="weights do not load"):
        ck.load_model(out)
    restore()

    (out / "config.json").write_text(json.dumps({**config, "tokenizer_hash": "0" * 16}))
    with pytest.raises(CheckpointError, match="tokenizer_hash '0000000000000000' differs from the "
                       "one the weights were saved with"):
        ck.load_model(out)
    restore()
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="tokenizer hash .* differs from config.json's"):
        ck.load_model(out)
    restore()
    ck.load_model(out)  # and it all works again


# --- resumable state -----------------------------------------------------------------------


def _opt(model):
    return adamw(model.parameters(), 0.1, 1e-3, (0.9, 0.95), "cpu")


def _one_step(model, opt):
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()


def test_state_round_trip(tmp_path):
    model = tiny()
    opt = _opt(model)
    _one_step(model, opt)
    rng = torch.get_rng_state()
    state = {"step": 7, "rng": [{"cpu": rng, "cuda": None}], "history": {"rows": [[1, 2.5]]}}
    resume.save_state(tmp_path, model, opt, state, {"model": {"n_layer": 2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    torch.load(tmp_path / "state.pt", weights_only=True)  # loadable without unpickling objects

    fresh = tiny(5)
    fresh_opt = _opt(fresh)
    got, meta = resume.load_state(tmp_path, fresh, fresh_opt)
    assert meta == {"model": {"n_layer": 2}}
    assert got["step"] == 7 and got["history"] == {"rows": [[1, 2.5]]}
    assert torch.equal(got["rng"][0]["cpu"], rng)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert resume.read_state_meta(tmp_path)["step"] == 7


def test_extra_files_and_missing_checkpoint(tmp_path):
    model = tiny()
    assert resume.read_state_meta(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume.load_state(tmp_path, model)
    best = {k: v * 2 for k, v in model.state_dict().items()}
    resume.save_state(tmp_path, model, None, {"step": 1}, {}, extra={"best.safetensors": best})
    state, _ = resume.load_state(tmp_path, tiny(2))
    assert torch.equal(state["extra"]["best.safetensors"]["tok_emb.weight"], best["tok_emb.weight"])


def test_save_over_foreign_or_stale_checkpoint(tmp_path):
    (tmp_path / "meta.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match="meta.json"):
        resume.read_state_meta(tmp_path)
    resume.save_state(tmp_path, tiny(), None, {"step": 1}, {},
                      extra={"best.safetensors": tiny().state_dict()})
    resume.save_state(tmp_path, tiny(), None, {"step": 2}, {})  # no extra: the old best file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    assert resume.load_state(tmp_path, tiny(1))[0]["step"] == 2


def _filled(value: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    for p in model.parameters():
        torch.nn.init.constant_(p, value)
    return model


def _check_consistent(ckpt: Path) -> int:
    """Load the checkpoint and check all its parts come from the same save; return its step."""
    model = _filled(-1.0)
    state, meta = resume.load_state(ckpt, model)
    step = state["step"]
    assert meta["step"] == step
    assert all(torch.all(p == step) for p in model.parameters())
    assert torch.all(state["extra"]["best.safetensors"]["0.weight"] == step)
    return step


def test_crash_before_commit_keeps_previous(tmp_path, monkeypatch):
    resume.save_state(tmp_path, _filled(1), None, {"step": 1}, {"step": 1},
                      extra={"best.safetensors": _filled(1).state_dict()})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed")  # dies after the payload temps, before meta.json

    monkeypatch.setattr(resume, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        resume.save_state(tmp_path, _filled(2), None, {"step": 2}, {"step": 2},
                          extra={"best.safetensors": _filled(2).state_dict()})
    assert _check_consistent(tmp_path) == 1


def test_crash_after_commit_rolls_forward(tmp_path, monkeypatch):
    resume.save_state(tmp_path, _filled(1), None, {"step": 1}, {"step": 1},
                      extra={"best.safetensors": _filled(1).state_dict()})
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(Path(dst).name)
        if len(calls) > 1 + 1:  # meta.json's rename and one payload rename happen, then death
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(resume.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        resume.save_state(tmp_path, _filled(2), None, {"step": 2}, {"step": 2},
                          extra={"best.safetensors": _filled(2).state_dict()})
    monkeypatch.setattr(resume.os, "replace", real_replace)
    assert calls[0] == "meta.json"
    assert _check_consistent(tmp_path) == 2  # read from the journal's temporary names
    resume.save_state(tmp_path, _filled(3), None, {"step": 3}, {"step": 3},
                      extra={"best.safetensors": _filled(3).state_dict()})
    assert _check_consistent(tmp_path) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_torn_payload_is_rejected(tmp_path):
    resume.save_state(tmp_path, _filled(1), None, {"step": 1}, {},
                      extra={"best.safetensors": _filled(1).state_dict()})
    with open(tmp_path / "state.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CheckpointError, match="state.pt") as e:
        resume.load_state(tmp_path, _filled(0))
    assert "\n" not in str(e.value)


KILLER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from minigpt import resume
    step = (resume.read_state_meta(sys.argv[1]) or {"step": 0})["step"]
    while True:
        step += 1
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        big = {"w": torch.full((512, 1024), float(step))}  # ~2 MB: kills land mid-write
        for p in model.parameters():
            torch.nn.init.constant_(p, float(step))
        extra = {"best.safetensors": {**model.state_dict(), **big}}
        resume.save_state(sys.argv[1], model, None, {"step": step, "pad": big["w"]}, {"step": step}, extra)
        print(step, flush=True)
""")


@pytest.mark.slow
def test_kill_9_at_random_moments_never_tears(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(KILLER)
    ckpt = tmp_path / "ckpt"
    delays = [0.0, 0.017, 0.043, 0.071]
    last = 0
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(ROOT)],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # at least one save completed in this process
        assert first.strip(), "saver died"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        step = _check_consistent(ckpt)
        assert step >= max(last, int(first))
        last = step
