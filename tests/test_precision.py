"""Precision per hardware: fp16 with dynamic loss scaling (overflow -> step skipped and scale
halved, exact resume with the scaler's state, divergence still one line), what dtype `auto` picks
on CUDA by compute capability, on MPS and on CPUs (faked), and the warning for an emulated dtype.

fp16 runs on CPU here: torch's CPU autocast and GradScaler accept float16, with the same scaling
logic as on CUDA. Same tiny GPT and token files as test_train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minigpt import hardware, mfu, precision, runtime, train
from minigpt.config import ConfigError, TrainConfig
from minigpt.runtime import Runtime
from minigpt.train import TrainingError, fit
from minigpt.windows import TokenWindows, val_windows
from test_train import BLOCK, CrashAfter, cfg, data, tiny_model, weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

CPU = torch.device("cpu")


def run_fp16(data: dict, c, out: str = "run", source=None, model=None, **kw) -> dict:
    root = data["root"] / out
    model = model or tiny_model(c.seed)
    source = source or TokenWindows(data["train"], BLOCK, c.batch_size, c.seed)
    val = val_windows(data["val"], BLOCK, c.batch_size, c.eval_batches)
    return fit(model, c, Runtime(device=CPU, dtype="fp16"), source, val, model_dir=root / "model",
               ckpt_dir=root / "ckpt", curves_dir=root / "curves", meta={"stage": "pretrain"},
               tokenizer_file=data["tokenizer"], **kw)


def scaler_factory(monkeypatch, **kw) -> None:
    """fit's scaler with other knobs (a huge initial scale overflows the tiny model's gradients)."""
    monkeypatch.setattr(train, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(device.type, **kw))


def test_fp16_overflow_skips_the_step_and_halves_the_scale(data):
    c = cfg(dtype="fp16")
    model = tiny_model(c.seed)
    opt = train.build_optimizer(model, c, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # fp16 gradients * 2^24 overflow
    run = train._Run(raw=model, model=model, optimizer=opt, cfg=c, rt=Runtime(device=CPU, dtype="fp16"),
                     source=TokenWindows(data["train"], BLOCK, 4, 7), val=[], identity={},
                     h=train.History(), scaler=scaler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skips = 0
    while True:
        loss, norm, _ = train.train_step(run)
        assert math.isfinite(loss)
        if not run.skipped:
            break
        skips += 1
        assert not math.isfinite(norm) and scaler.get_scale() == 2.0 ** (24 - skips)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no update
        assert not opt.state and all(p.grad is None for p in model.parameters())
    assert skips >= 1 and run.h.skipped_steps == skips and math.isfinite(norm)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fp16_fit_counts_and_logs_skipped_steps(data, monkeypatch, capsys):
    scaler_factory(monkeypatch, init_scale=2.0**24)
    s = run_fp16(data, cfg(dtype="fp16"))
    out = capsys.readouterr().out
    assert s["steps"] == 8 and 1 <= s["skipped_steps"] < 8 and s["loss_scale"] < 2.0**24
    assert s["val_loss"] < s["first_val_loss"]  # the steps that were taken trained
    assert out.count("step skipped") == s["skipped_steps"]
    assert f"({s['skipped_steps']} skipped)" in out  # the log row
    config = json.loads((data["root"] / "run" / "model" / "config.json").read_text())
    assert config["training"]["skipped_steps"] == s["skipped_steps"] and config["training"]["dtype"] == "fp16"
    rows = (data["root"] / "run" / "curves" / "train.tsv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split("\t")[2])) for r in rows)  # losses stay finite


def test_fp16_resume_after_kill_is_exact(data, monkeypatch, capsys):
    """The scaler's state is part of the checkpoint: with a scale that overflows every other step
    (growth after each good step), a resume that restarted the scale would skip other steps."""
    scaler_factory(monkeypatch, init_scale=2.0**24, growth_interval=1)
    c = cfg(dtype="fp16", max_steps=10, save_interval=4)
    straight = run_fp16(data, c, out="straight")
    assert straight["skipped_steps"] >= 2
    with pytest.raises(KeyboardInterrupt):  # killed during step 6: checkpoint at step 4 survives
        run_fp16(data, c, out="resumed", source=CrashAfter(TokenWindows(data["train"], BLOCK, 4, 7), 5))
    capsys.readouterr()
    resumed = run_fp16(data, c, out="resumed", model=tiny_model(99))  # other init: all restored
    assert "resuming from" in capsys.readouterr().out and resumed["resumed_from_step"] == 4
    a, b = weights(data["root"] / "straight"), weights(data["root"] / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("skipped_steps", "loss_scale", "train_loss", "val_loss"):
        assert resumed[key] == straight[key], key
    ta = (data["root"] / "straight" / "curves" / "train.tsv").read_text().splitlines()
    tb = (data["root"] / "resumed" / "curves" / "train.tsv").read_text().splitlines()
    assert [r.split("\t")[:5] for r in ta] == [r.split("\t")[:5] for r in tb]


def test_fp16_divergence_still_stops_with_one_line(data):
    from test_train import poisoned_model

    c = cfg(dtype="fp16", max_steps=8, save_interval=2)
    model = poisoned_model(c.seed)
    with pytest.raises(TrainingError, match=r"at step 3\b") as e:
        run_fp16(data, c, model=model)
    assert "\n" not in str(e.value) and "fp16 loss scale" in str(e.value) and "step 2" in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_gradients_that_overflow_unscaled_are_a_divergence(data, monkeypatch):
    """Skipping is for a scale that is too large; once the scale is <= 1, it stops (one line)."""
    scaler_factory(monkeypatch, init_scale=4.0)
    model = tiny_model(7)
    model.norm.register_forward_hook(
        lambda m, a, out: out.register_hook(lambda g: g * math.inf) and None if m.training else None)
    with pytest.raises(TrainingError, match=r"fp16 loss scale 1\) at step 3\b") as e:
        run_fp16(data, cfg(dtype="fp16", max_steps=8), model=model)
    assert "\n" not in str(e.value)


# --- what `auto` picks ------------------------------------------------------------------------


def fake_cuda(monkeypatch, capability: tuple[int, int], name: str = "Tesla T4") -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says on sm_75
    return torch.device("cuda", 0)


@pytest.mark.parametrize("capability, want", [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                              ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_is_bf16_only_from_compute_capability_8(monkeypatch, capability, want):
    cuda = fake_cuda(monkeypatch, capability)
    assert precision.resolve_dtype("auto", cuda) == want
    assert precision.eval_dtype(cuda) == ("bf16" if want == "bf16" else "fp32")  # no unscaled fp16
    assert precision.resolve_dtype("fp32", cuda) == "fp32"


def test_auto_on_mps_is_fp16_where_torch_scales_it(monkeypatch):
    mps = torch.device("mps")
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.13.0"))
    assert precision.resolve_dtype("auto", mps) == "fp16"
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.8.0"))
    assert precision.resolve_dtype("auto", mps) == "fp16"
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.7.1"))
    assert precision.resolve_dtype("auto", mps) == "fp32"  # no GradScaler on MPS before 2.8
    assert precision.eval_dtype(mps) == "fp32"


def test_auto_on_cpu_is_bf16_only_with_its_instructions(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert precision.resolve_dtype("auto", CPU) == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert precision.resolve_dtype("auto", CPU) == "bf16"


def test_fp16_autocast_scaler_and_peak(monkeypatch):
    with precision.autocast(CPU, "fp16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    assert isinstance(precision.grad_scaler(CPU, "fp16"), torch.amp.GradScaler)
    assert precision.grad_scaler(CPU, "bf16") is None and precision.grad_scaler(CPU, "fp32") is None
    cuda = fake_cuda(monkeypatch, (7, 5), "Tesla T4")
    assert mfu.peak_flops(cuda, "fp16", 2) == pytest.approx(2 * 65e12)
    assert mfu.peak_flops(cuda, "fp32", 1) == pytest.approx(8.1e12)
    fake_cuda(monkeypatch, (8, 9), "NVIDIA L40S")  # not an L4: unknown, MFU 0
    assert mfu.peak_flops(cuda, "bf16", 1) == 0.0
    TrainConfig(dtype="fp16").validate("pretrain")  # a params value
    with pytest.raises(ConfigError, match=r"pretrain.dtype.*auto, bf16, fp16 or fp32"):
        TrainConfig(dtype="fp8").validate("pretrain")


# --- a dtype the hardware only emulates -----------------------------------------------------------


def test_bf16_on_a_cpu_without_it_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    assert precision.resolve_dtype("bf16", CPU, "pretrain.dtype") == "bf16"  # asked for: kept
    assert precision.resolve_dtype("bf16", CPU, "pretrain.dtype") == "bf16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: pretrain.dtype bf16: ")
    assert "avx512_bf16" in err and "pretrain.dtype: fp32 or auto" in err
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    precision.resolve_dtype("bf16", CPU, "finetune.dtype")
    precision.resolve_dtype("fp32", CPU, "finetune.dtype")
    precision.resolve_dtype("auto", CPU, "finetune.dtype")
    assert capsys.readouterr().err == ""  # native bf16, or nothing emulated asked for


def test_setup_runtime_names_the_section_in_the_warning(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(runtime, "die_with_parent", lambda: None)  # not for the test process
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)
    rt = runtime.setup_runtime(cfg(dtype="bf16"), "finetune")
    assert rt.dtype == "bf16"
    assert capsys.readouterr().err.startswith("warning: finetune.dtype bf16: this CPU has no native bf16")


def test_bf16_on_a_gpu_before_compute_8_warns(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_warned", set())
    cuda = fake_cuda(monkeypatch, (7, 5))
    precision.resolve_dtype("bf16", cuda, "pretrain.dtype")
    err = capsys.readouterr().err
    assert "compute capability 7.5" in err and "pretrain.dtype: fp16 or auto" in err
    precision.resolve_dtype("fp16", cuda, "pretrain.dtype")
    assert capsys.readouterr().err == ""


def test_pretrain_stage_trains_in_fp16_when_asked(tmp_path, monkeypatch, capsys):
    """`pretrain.dtype: fp16` in params.yaml: the stage trains loss-scaled and says so."""
    from test_train import _load_stage, stage_project, stage_tokenizer, stage_tokens

    stage_project(tmp_path, monkeypatch, dtype="fp16")
    monkeypatch.setattr(precision, "_warned", set())
    stage_tokens(tmp_path, stage_tokenizer(tmp_path))
    assert _load_stage().main() == 0
    out, err = capsys.readouterr()
    assert "cpu fp16" in out and "loss scale 65536 (0 skipped)" in out
    if not hardware.cpu_has_fp16():
        assert "warning: pretrain.dtype fp16: this CPU has no native fp16" in err
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["skipped_steps"] == 0 and metrics["loss_scale"] == 65536.0 and metrics["steps"] == 4


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_setup_runtime_names_the_device_key(monkeypatch, section):
    monkeypatch.setattr(runtime, "die_with_parent", lambda: None)  # not for the test process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runtime.DeviceError, match=rf"^{section}\.device cuda:99: CUDA is not available"):
        runtime.setup_runtime(cfg(device="cuda:99"), section)
