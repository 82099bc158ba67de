"""The training loop: schedule, token windows, exact resume, budget growth, fresh start on a config
change, early stopping with best weights, divergence, and DDP == one process with the global batch.

A 2-layer, 2-head, 32-wide GPT (block 16, vocab 64) on synthetic token files; fp32 on CPU with one
thread, so runs are bit-for-bit reproducible."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minigpt import hardware, mfu, optim, precision, runtime, train
from minigpt.config import TrainConfig
from minigpt.files import sha256_file
from minigpt.model import GPT, GPTConfig, IGNORE
from minigpt.runtime import DeviceError, Runtime
from minigpt.optim import lr_at
from minigpt.train import TrainingError, fit
from minigpt.windows import TokenWindows, val_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
BLOCK, VOCAB = 16, 64


def write_tokens(path: Path, n: int, seed: int = 0, dtype: str = "uint16") -> Path:
    """A token file + sidecar in the docs/FORMATS.md layout; a learnable pattern plus noise."""
    rng = np.random.default_rng(seed)
    tokens = ((np.arange(n) * 7) % VOCAB + rng.integers(0, 2, n)) % VOCAB
    tokens.astype(dtype).tofile(path)
    path.with_suffix(".json").write_text(json.dumps(
        {"dtype": dtype, "count": n, "documents": 1, "tokenizer_hash": "0123456789abcdef"}))
    return path


@pytest.fixture
def data(tmp_path) -> dict:
    d = tmp_path / "tokens"
    d.mkdir()
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    return {"train": write_tokens(d / "train.bin", 5000, 0),
            "val": write_tokens(d / "validation.bin", 1000, 1), "tokenizer": tok, "root": tmp_path}


def cfg(**kw) -> TrainConfig:
    base = dict(device="cpu", dtype="fp32", batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2,
                eval_interval=4, eval_batches=2, save_interval=4, log_interval=2, seed=7,
                optimizer="adamw", schedule="cosine", min_lr_ratio=0.1)  # the recipes' own tests: below
    return TrainConfig(**{**base, **kw})


def rt() -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype="fp32")


def tiny_model(seed: int = 7) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK))


def run_fit(data: dict, c: TrainConfig, out: str = "run", source=None, model=None, **kw) -> dict:
    root = data["root"] / out
    model = model or tiny_model(c.seed)
    source = source or TokenWindows(data["train"], BLOCK, c.batch_size, c.seed)
    val = val_windows(data["val"], BLOCK, c.batch_size, c.eval_batches)
    summary = fit(model, c, rt(), source, val, model_dir=root / "model", ckpt_dir=root / "ckpt",
                  curves_dir=root / "curves",
                  meta={"stage": "pretrain", "tokenizer_hash": "0123456789abcdef", "chat_template": None},
                  tokenizer_file=data["tokenizer"], **kw)
    summary["model"] = model
    return summary


def weights(root: Path) -> dict:
    return load_file(root / "model" / "model.safetensors")


# --- schedule and data ---------------------------------------------------------------------


def test_lr_schedule():
    c = cfg(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, c) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and min(lrs) >= 0.1
    assert lr_at(0, cfg(lr=1.0, warmup_steps=0, max_steps=10)) == pytest.approx(1.0)


def test_token_windows_deterministic_and_shifted(data):
    a = TokenWindows(data["train"], BLOCK, 4, seed=3)
    b = TokenWindows(data["train"], BLOCK, 4, seed=3)
    tokens = np.fromfile(data["train"], dtype=np.uint16)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.int64 and xa.shape == (4, BLOCK)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
            tokens, BLOCK) == xa[0].numpy(), axis=1))[0])
        assert torch.equal(ya[0], torch.from_numpy(tokens[start + 1:start + BLOCK + 1].astype(np.int64)))
    assert not torch.equal(TokenWindows(data["train"], BLOCK, 4, seed=4).next()[0], xa)


def test_token_windows_resume_and_rank_slices(data):
    a = TokenWindows(data["train"], BLOCK, 4, seed=3)
    a.next()
    state = a.state_dict()
    expected = a.next()
    b = TokenWindows(data["train"], BLOCK, 4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(expected, b.next()))

    whole = TokenWindows(data["train"], BLOCK, 6, seed=5)
    ranks = [TokenWindows(data["train"], BLOCK, 2, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(2):
        x, y = whole.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_token_windows_never_load_the_file(tmp_path):
    path = tmp_path / "big.bin"
    count = 1 << 30  # 2 GiB of uint16, sparse on disk: reading it all would show in RSS
    with open(path, "wb") as f:
        f.truncate(count * 2)
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "count": count}))
    before = _rss_mb()
    windows = TokenWindows(path, BLOCK, 8, seed=0)
    for _ in range(20):
        windows.next()
    assert isinstance(windows.tokens, np.memmap)
    assert _rss_mb() - before < 100


def test_val_windows_fixed_and_sharded(data):
    full = val_windows(data["val"], BLOCK, 4, 5)
    again = val_windows(data["val"], BLOCK, 4, 5)
    assert len(full) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    tokens = np.fromfile(data["val"], dtype=np.uint16).astype(np.int64)
    assert torch.equal(full[0][0][0], torch.from_numpy(tokens[:BLOCK]))  # first window at 0
    assert torch.equal(full[-1][1][-1], torch.from_numpy(tokens[-BLOCK:]))  # last ends at the end
    shards = [val_windows(data["val"], BLOCK, 2, 5, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [5, 5]
    for i in range(5):  # rank slices of global batch i == one process's batch i
        assert torch.equal(torch.cat([shards[0][i][0], shards[1][i][0]]), full[i][0])


def test_auto_dtype_follows_cpu_bf16_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert precision.resolve_dtype("auto", cpu) == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.resolve_dtype("auto", cpu) == "bf16"
    assert precision.resolve_dtype("fp32", cpu) == "fp32"


def test_cpu_peak_follows_the_instruction_set(monkeypatch):
    cpu = torch.device("cpu")
    for flags, fp32, bf16 in (({"avx2", "fma"}, 120e9, 120e9), ({"avx512f"}, 240e9, 240e9),
                              ({"avx512f", "avx512_bf16"}, 240e9, 480e9),
                              ({"avx512f", "avx512_bf16", "amx_bf16"}, 240e9, 3840e9)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
        assert mfu.cpu_peak_per_core("fp32") == pytest.approx(fp32)
        assert mfu.cpu_peak_per_core("bf16") == pytest.approx(bf16)  # no bf16 units: fp32's
        assert mfu.peak_flops(cpu, "fp32", 2) == pytest.approx(fp32 * torch.get_num_threads() * 2)


def test_auto_device_is_what_torch_reports():
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert runtime.resolve_device("auto") == torch.device(want)
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"^pretrain.device cuda:1: CUDA is not available"):
            runtime.resolve_device("cuda:1", where="pretrain.device")


# --- the loop ------------------------------------------------------------------------------


class CrashAfter:
    """A train source that dies (like a killed process) on its (n+1)-th batch."""

    def __init__(self, inner, n: int):
        self.inner, self.left = inner, n

    def next(self):
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")
        self.left -= 1
        return self.inner.next()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_fit_writes_everything(data):
    s = run_fit(data, cfg())
    root = data["root"] / "run"
    assert s["steps"] == 8 and s["tokens"] == 8 * 4 * BLOCK
    assert s["val_loss"] < s["first_val_loss"] < math.log(VOCAB) + 0.5
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == [".lock", "meta.json", "model.safetensors",
                                                                 "state.pt"]  # .lock: the writer's pid
    train_tsv = (root / "curves" / "train.tsv").read_text().splitlines()
    assert train_tsv[0].split("\t") == ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"]
    assert [int(r.split("\t")[0]) for r in train_tsv[1:]] == [2, 4, 6, 8]
    val_tsv = (root / "curves" / "val.tsv").read_text().splitlines()
    assert val_tsv[0] == "step\ttokens\tval_loss" and [r.split("\t")[0] for r in val_tsv[1:]] == ["0", "4", "8"]
    assert not (root / "metrics.json").exists()  # fit returns the metrics; the stage writes them
    for key in ("train_loss", "first_val_loss", "val_loss", "best_val_loss", "tokens", "steps",
                "tokens_per_s", "mfu", "params", "params_non_embedding", "time_s"):
        assert key in s
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["training"]["steps"] == 8 and config["n_layer"] == 2


def test_resume_after_kill_is_exact(data, capsys):
    straight = run_fit(data, cfg(), out="straight")
    with pytest.raises(KeyboardInterrupt):  # killed during step 6: checkpoint at step 4 survives
        run_fit(data, cfg(), out="resumed",
                source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 5))
    capsys.readouterr()
    resumed = run_fit(data, cfg(), out="resumed", model=tiny_model(99))  # other init: all restored
    assert "resuming from" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == 4
    a, b = weights(data["root"] / "straight"), weights(data["root"] / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_loss"] == straight["train_loss"] and resumed["val_loss"] == straight["val_loss"]
    ta = (data["root"] / "straight" / "curves" / "train.tsv").read_text().splitlines()
    tb = (data["root"] / "resumed" / "curves" / "train.tsv").read_text().splitlines()
    assert [r.split("\t")[:5] for r in ta] == [r.split("\t")[:5] for r in tb]


def test_resume_only_the_same_run_any_other_config_starts_fresh(data, capsys):
    """The scratch state finishes an interrupted run of the same config only: a finished 4-step
    run is not continued by an 8-step one, which gives exactly a fresh 8-step run's weights."""
    run_fit(data, cfg(max_steps=4))
    capsys.readouterr()
    longer = run_fit(data, cfg(max_steps=8))
    out = capsys.readouterr()
    assert "not resuming" in out.out + out.err and "train.max_steps: 4 -> 8" in out.out + out.err
    assert longer["resumed_from_step"] is None and longer["steps"] == 8
    fresh = run_fit(data, cfg(max_steps=8), out="fresh")
    a, b = weights(data["root"] / "run"), weights(data["root"] / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a) and longer["val_loss"] == fresh["val_loss"]
    rows = (data["root"] / "run" / "curves" / "train.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [2, 4, 6, 8]

    class Untouched(TokenWindows):
        def next(self):
            raise AssertionError("a finished run must not train again")

    done = run_fit(data, cfg(max_steps=8), source=Untouched(data["train"], BLOCK, 4, 7))
    assert done["steps"] == 8 and done["resumed_from_step"] == 8  # the same run: nothing to do
    capsys.readouterr()

    for change in ({"lr": 1e-3}, {"log_interval": 1}, {"max_steps": 4}):
        again = run_fit(data, cfg(**change))
        out = capsys.readouterr()
        assert "not resuming" in out.out + out.err, change
        assert f"train.{next(iter(change))}" in out.out + out.err, change
        assert again["resumed_from_step"] is None


def test_curves_are_written_at_each_log_row_before_any_checkpoint(data):
    """Plots of a running experiment are current: the TSVs do not wait for a checkpoint."""
    c = cfg(max_steps=8, save_interval=8, log_interval=2, eval_interval=2)
    with pytest.raises(KeyboardInterrupt):  # killed during step 6, before the first checkpoint
        run_fit(data, c, out="live", source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 5))
    curves = data["root"] / "live" / "curves"
    steps = lambda name: [int(r.split("\t")[0]) for r in (curves / name).read_text().splitlines()[1:]]
    assert steps("train.tsv") == [2, 4] and steps("val.tsv") == [0, 2, 4]
    assert not (data["root"] / "live" / "ckpt" / "meta.json").exists()


def test_early_stopping_keeps_best_weights(data, monkeypatch):
    c = cfg(max_steps=20, eval_interval=1, save_interval=100)
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7])  # evals at steps 0..4: best at step 1
    monkeypatch.setattr(train, "val_loss", lambda *a, **k: next(scripted))
    s = run_fit(data, c, out="early", keep_best=True, patience=3)
    assert s["stopped_early"] == 1 and s["steps"] == 4
    assert s["best_step"] == 1 and s["best_val_loss"] == 2.0
    assert (data["root"] / "early" / "ckpt" / "best.safetensors").exists()
    # reference: the same run killed during step 2 holds exactly the step-1 weights in memory
    monkeypatch.setattr(train, "val_loss", lambda *a, **k: 1.0)
    ref = tiny_model(c.seed)
    with pytest.raises(KeyboardInterrupt):
        run_fit(data, c, out="ref", model=ref, source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 1))
    got = weights(data["root"] / "early")
    assert all(torch.equal(got[k], ref.state_dict()[k]) for k in got)


def poisoned_model(seed: int, at: int = 3):
    """tiny_model(seed) whose `at`-th training forward returns NaN activations."""
    model = tiny_model(seed)
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == at:
                return output * float("nan")
        return output

    model.norm.register_forward_hook(poison)
    return model


def test_nan_stops_with_step_and_keeps_checkpoint(data):
    c = cfg(max_steps=8, save_interval=2)
    model = poisoned_model(c.seed)
    with pytest.raises(TrainingError, match=r"at step 3\b") as e:
        run_fit(data, c, model=model)
    assert "\n" not in str(e.value) and "step 2" in str(e.value)
    meta = json.loads((data["root"] / "run" / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never applied
    assert not (data["root"] / "run" / "model").exists()


DDP_CFG = dict(max_steps=6, eval_interval=3, save_interval=3, eval_batches=4)
DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from minigpt.config import TrainConfig
    from minigpt.model import GPT, GPTConfig
    from minigpt.runtime import setup_runtime, teardown
    from minigpt.train import fit
    from minigpt.windows import TokenWindows, val_windows
    root, c = Path(sys.argv[2]), TrainConfig(**eval(sys.argv[3]))
    rt = setup_runtime(c)  # seeds identically on both ranks: same init as the test's model
    torch.set_num_threads(1)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16))
    src = TokenWindows(root / "tokens" / "train.bin", 16, c.batch_size, c.seed, rt.rank, rt.world_size)
    val = val_windows(root / "tokens" / "validation.bin", 16, c.batch_size, c.eval_batches,
                      rt.rank, rt.world_size)
    out = root / "ddp"
    summary = fit(model, c, rt, src, val, model_dir=out / "model", ckpt_dir=out / "ckpt",
                  curves_dir=out / "curves", meta={"stage": "pretrain"},
                  tokenizer_file=root / "tokenizer.json")
    if rt.is_main:
        (out / "metrics.json").write_text(json.dumps(summary))
    teardown(rt)
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
@pytest.mark.parametrize("recipe", ["adamw_cosine", "muon_wsd"])
def test_ddp_two_ranks_match_one_process_with_the_global_batch(data, recipe):
    knobs = NEW_RECIPE if recipe == "muon_wsd" else {}
    single = run_fit(data, cfg(batch_size=4, **DDP_CFG, **knobs), out="single")
    script = data["root"] / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    c = dataclasses.asdict(cfg(batch_size=2, nproc=2, **DDP_CFG, **knobs))
    ddp = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(ROOT),
                          str(data["root"]), repr(c)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = weights(data["root"] / "single"), weights(data["root"] / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    m = json.loads((data["root"] / "ddp" / "metrics.json").read_text())
    assert m["tokens"] == single["tokens"] == 6 * 4 * BLOCK
    assert m["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert m["first_val_loss"] == pytest.approx(single["first_val_loss"], abs=1e-6)
    assert m["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)


DIGEST_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    import minigpt.resume
    from minigpt.config import TrainConfig
    from minigpt.runtime import setup_runtime, teardown
    from minigpt.resume import file_digests
    root = Path(sys.argv[2])
    rt = setup_runtime(TrainConfig(device="cpu", nproc=2))
    reads = []
    real = minigpt.resume.sha256_file
    minigpt.resume.sha256_file = lambda p: reads.append(str(p)) or real(p)
    paths = [root / "tokens" / "train.bin", root / "tokens" / "validation.bin"]
    out = {"digests": file_digests(paths, rt)}
    out["reads"] = list(reads)
    try:
        file_digests([root / "missing.bin"], rt)
    except OSError as e:
        out["error"] = str(e)
    (root / f"digests.{rt.rank}.json").write_text(json.dumps(out))
    teardown(rt)
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_ddp_inputs_are_hashed_once_on_rank_0(data):
    from minigpt.resume import file_digests

    script = data["root"] / "digests.py"
    script.write_text(DIGEST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(ROOT),
                          str(data["root"])], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((data["root"] / f"digests.{r}.json").read_text()) for r in (0, 1)]
    want = file_digests([data["root"] / "tokens" / n for n in ("train.bin", "validation.bin")])
    assert ranks[0]["digests"] == ranks[1]["digests"] == want
    assert len(ranks[0]["reads"]) == 2 and ranks[1]["reads"] == []  # rank 1 reads nothing
    assert "missing.bin" in ranks[0]["error"] and ranks[1]["error"] == ranks[0]["error"]  # no hang


# --- the stage -----------------------------------------------------------------------------


def _load_stage():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_pretrain", ROOT / "stages" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_project(tmp_path: Path, monkeypatch, **pretrain) -> None:
    """A tiny params.yaml (pretrain overrides: `pretrain`) in tmp_path, the working directory.
    The stage runs in this process: its process-wide settings (the parent watchdog, glibc's
    malloc tuning) are kept out of pytest's."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0}
    params["eval"]["stride"] = 16  # <= block_size, checked at load
    params["pretrain"].update(device="cpu", batch_size=4, max_steps=4, warmup_steps=1,
                              eval_interval=2, eval_batches=2, save_interval=2, log_interval=2,
                              **pretrain)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "die_with_parent", lambda: None)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)


def stage_tokenizer(tmp_path: Path) -> Path:
    from minigpt.tokenizer import save_tokenizer, train_tokenizer

    tok_path = tmp_path / "data" / "tokenizer" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True)
    save_tokenizer(train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 30, 300), tok_path)
    return tok_path


def stage_tokens(tmp_path: Path, tok_path: Path | None) -> None:
    """data/tokens/pretrain/{train,validation}: stamped with tok_path's hash (None: another's)."""
    from minigpt.tokenizer import tokenizer_hash

    tokens = tmp_path / "data" / "tokens" / "pretrain"
    tokens.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        write_tokens(tokens / f"{split}.bin", 2000, seed=len(split))
        if tok_path is not None:
            side = json.loads((tokens / f"{split}.json").read_text())
            side["tokenizer_hash"] = tokenizer_hash(tok_path)
            (tokens / f"{split}.json").write_text(json.dumps(side))


def test_pretrain_stage_errors_and_run(tmp_path, monkeypatch, capsys):
    from minigpt.tokenizer import tokenizer_hash

    stage_project(tmp_path, monkeypatch, dtype="fp32")
    stage = _load_stage()

    assert stage.main() == 2  # no tokenizer yet
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data/tokenizer/tokenizer.json") and "\n" not in err

    tok_path = stage_tokenizer(tmp_path)
    stage_tokens(tmp_path, None)
    assert stage.main() == 2  # token files made with another tokenizer
    err = capsys.readouterr().err.strip()
    assert "encoded with tokenizer 0123456789abcdef" in err and "\n" not in err

    stage_tokens(tmp_path, tok_path)
    assert stage.main() == 0
    out = capsys.readouterr().out
    assert "without embeddings" in out and "val loss" in out
    config = json.loads((tmp_path / "out" / "pretrain" / "config.json").read_text())
    assert config["vocab_size"] == config["tokenizer_vocab_size"]  # not padded: every id decodes
    assert config["tokenizer_hash"] == tokenizer_hash(tok_path) and config["stage"] == "pretrain"
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 4
    assert (tmp_path / "metrics" / "pretrain" / "val.tsv").is_file()
    assert stage.main() == 0  # already complete: resumes at the end and rewrites the outputs
    assert "resuming from out/ckpt/pretrain at step 4" in capsys.readouterr().out


class _Fixed:
    """A train source that hands out prepared (x, y) micro-batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def test_grad_accum_weights_micro_batches_by_their_targets():
    """Two micro-batches with different numbers of targets (masked prompts) must step exactly
    like one batch holding both: the loss is a mean over targets, not over micro-batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (4, 16), generator=g)
    y = torch.randint(0, VOCAB, (4, 16), generator=g)
    y[:2, :12] = IGNORE  # the first half has few targets (a long prompt)
    results = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:2], y[:2]), (x[2:], y[2:])])):
        model = tiny_model()
        c = cfg(grad_accum=accum, batch_size=4 // accum, grad_clip=0.0)
        opt = optim.adamw(model.parameters(), c.weight_decay, c.lr, (c.beta1, c.beta2), "cpu")
        run = train._Run(raw=model, model=model, optimizer=opt, cfg=c, rt=rt(),
                         source=_Fixed(batches), val=[], identity={}, h=train.History())
        loss, norm, tokens = train.train_step(run)
        results.append((loss, norm, tokens, [p.detach().clone() for p in model.parameters()]))
    (l1, n1, t1, w1), (l2, n2, t2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4) and t1 == t2
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # Adam: tiny grads move by ~lr


# --- the recipe knobs: Muon + WSD keep resume and DDP exact ----------------------------------

NEW_RECIPE = dict(optimizer="muon", muon_lr=0.02, schedule="wsd", decay_fraction=0.5)


def test_wsd_schedule():
    c = cfg(lr=1.0, min_lr_ratio=0.0, warmup_steps=2, max_steps=10, schedule="wsd", decay_fraction=0.4)
    lrs = [lr_at(s, c) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:6] == [1.0] * 4  # warm-up, then flat
    assert lrs[6:] == pytest.approx([0.75, 0.5, 0.25, 0.0])  # linear decay over the last 40%
    floor = cfg(lr=1.0, min_lr_ratio=0.1, warmup_steps=0, max_steps=10, schedule="wsd", decay_fraction=0.4)
    assert lr_at(9, floor) == pytest.approx(0.1) and lr_at(5, floor) == 1.0


def test_muon_optimizer_groups_and_lr():
    model = tiny_model()
    c = cfg(**NEW_RECIPE)
    opt = optim.build_optimizer(model, c, "cpu")
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_ids}
    assert names == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert "tok_emb.weight" not in names
    n_all = sum(len(g["params"]) for g in opt.param_groups)
    assert n_all == len(list(model.parameters()))
    run = train._Run(raw=model, model=model, optimizer=opt, cfg=c, rt=rt(),
                     source=TokenWindows(_tokens_for_step(), BLOCK, 4, 0), val=[], identity={},
                     h=train.History())
    train.train_step(run)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(lr_at(0, c) * c.muon_lr / c.lr)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(lr_at(0, c))


def _tokens_for_step() -> Path:
    import tempfile

    return write_tokens(Path(tempfile.mkdtemp()) / "t.bin", 500)


def test_resume_after_kill_is_exact_with_muon_and_wsd(data, capsys):
    c = cfg(**NEW_RECIPE)
    straight = run_fit(data, c, out="straight")
    with pytest.raises(KeyboardInterrupt):
        run_fit(data, c, out="resumed", source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 5))
    capsys.readouterr()
    resumed = run_fit(data, c, out="resumed", model=tiny_model(99))
    assert resumed["resumed_from_step"] == 4
    a, b = weights(data["root"] / "straight"), weights(data["root"] / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_loss"] == straight["train_loss"] and resumed["val_loss"] == straight["val_loss"]
    adamw = run_fit(data, cfg(), out="adamw")  # and Muon really is a different trajectory
    assert not torch.equal(weights(data["root"] / "adamw")["layers.0.attn.qkv.weight"],
                           a["layers.0.attn.qkv.weight"])
    assert adamw["val_loss"] != straight["val_loss"]


def test_a_failed_resume_forgets_the_optimizer_moments(data, capsys):
    """state.pt whose optimizer state loads but whose data position is missing: the run starts
    fresh with fresh Muon and AdamW moments, the same run as one never interrupted."""
    c = cfg(**NEW_RECIPE)
    straight = run_fit(data, c, out="straight")
    with pytest.raises(KeyboardInterrupt):
        run_fit(data, c, out="resumed", source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 5))
    ckpt = data["root"] / "resumed" / "ckpt"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["optimizer"]["muon"]["state"] and state["optimizer"]["adamw"]["state"]
    del state["data"]
    torch.save(state, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["state.pt"]["sha256"] = sha256_file(ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    again = run_fit(data, c, out="resumed")
    out = capsys.readouterr()
    assert "not resuming" in out.out + out.err and again["resumed_from_step"] is None
    a, b = weights(data["root"] / "straight"), weights(data["root"] / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["val_loss"] == straight["val_loss"]


def test_changing_the_optimizer_starts_fresh(data, capsys):
    run_fit(data, cfg(max_steps=4))
    capsys.readouterr()
    fresh = run_fit(data, cfg(max_steps=8, optimizer="muon"))
    out = capsys.readouterr()
    assert "not resuming" in out.out + out.err and "train.optimizer" in out.out + out.err
    assert fresh["resumed_from_step"] is None


def test_muon_matches_torch_muon():
    """Our Muon (fp32 Newton-Schulz) against torch.optim.Muon (bf16) on the same gradients."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = optim.Muon([{"params": ours}], lr=0.02, momentum=0.95, weight_decay=0.01)
    b = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.01)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, s in zip(ours, ref, start):
        moved = (q - s).abs().max().item()
        assert moved > 0.01 and (p - q).abs().max().item() < 0.05 * moved  # bf16 rounding only
