"""One training loop for pre-training and fine-tuning: `fit`, with resume, validation, early stop.

Design choices
- Device and DDP are `minigpt.runtime`, precision `minigpt.precision`, parameter updates
  `minigpt.optim`, the run's record and curves `minigpt.history`; batches come from a
  `BatchSource` (`windows.TokenWindows`, `sft.SFTBatches`).
- Resume: ckpt_dir is undeclared scratch (not a DVC out), used only to finish an interrupted run of
  exactly the same inputs (`resume.run_identity`: config, architecture, runtime, input digests).
  Equal -> restore everything, per-rank RNG and data state included; anything else -> one line
  saying what differs, start fresh: a finished 20-step run is never continued by a 40-step one.
- A step's loss is the mean over every target of the global batch (micro-batches and ranks weighted
  by their target counts), so masked SFT batches train like one big batch under accumulation/DDP.
- Loss and grad norm are checked (all-reduced) BEFORE the optimizer step: a non-finite loss stops
  training without touching the weights or the last good checkpoint (`TrainingError`, the step).
- fp16 (`precision.grad_scaler`): non-finite gradients under a finite loss are an overflow, not a
  divergence: the step is skipped (it counts against max_steps, as in torch's recipe), the scale
  halved and the skip counted; at a scale <= 1 it is a divergence. The scale resumes from state.pt.
- Validation at step 0, every eval_interval steps and at the end; tokens/s and MFU leave out each
  session's first step. Only rank 0 writes, holding a lock on ckpt_dir; the TSV curves are
  rewritten atomically at every log row, so plots of a running experiment are current."""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from minigpt.checkpoint import CheckpointError, save_model
from minigpt.history import RUN_DEPENDENT, History, run_summary, write_curves
from minigpt.model import IGNORE
from minigpt.optim import build_optimizer, lr_at, set_lr
from minigpt.precision import grad_scaler
from minigpt.resume import (identity_mismatch, load_state, lock_scratch, read_state_meta,
                            run_identity, save_state)
from minigpt.runtime import Runtime

if TYPE_CHECKING:
    from minigpt.config import TrainConfig  # FinetuneConfig is a TrainConfig

BEST_FILE = "best.safetensors"  # extra file in ckpt_dir when keep_best: the best weights so far


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, bad data, bad device); the message is one line."""


class BatchSource(Protocol):
    """What `fit` trains on. `next()` -> (x, y): CPU int64 (B, T) tensors for THIS rank, y = IGNORE
    where a position is not a target. `state_dict()` -> tensors/plain values (kept in state.pt, read
    back with `torch.load(weights_only=True)`) and `load_state_dict` make a resume exact. A DDP
    source draws the global batch identically on every rank and returns its own slice, so N ranks
    x B rows train exactly like one process with N*B rows.

    Validation is any iterable of THIS rank's (x, y) batches, the same ones every time (a list is
    fine); `fit` sums loss * target count over them and all-reduces: a token-weighted mean over
    the union of all ranks' batches."""

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches: Iterable, rt: Runtime) -> float:
    """Token-weighted mean loss over this rank's batches, all-reduced across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        n = (y != IGNORE).sum()
        if n == 0:
            continue
        with rt.autocast():
            _, loss = model(x, y)
        total[0] += loss.double() * n
        total[1] += n
    if rt.ddp:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


# --- the loop ---------------------------------------------------------------------------------


def _gather(obj: Any, rt: Runtime) -> list:
    """obj from every rank, in rank order (a 1-list without DDP)."""
    if not rt.ddp:
        return [obj]
    out = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def _rng_state(rt: Runtime) -> dict:
    cuda = torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(rng: dict, rt: Runtime) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], rt.device)


@dataclass
class _Run:
    """The moving parts of one `fit` call, so the helpers below stay small."""

    raw: torch.nn.Module  # the plain model (saved/loaded)
    model: torch.nn.Module  # what the step calls: raw, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    rt: Runtime
    source: BatchSource
    val: Iterable
    identity: dict
    h: History
    best: dict | None = None  # best weights (CPU) when keep_best
    flops_per_token: float = 0.0
    scaler: torch.amp.GradScaler | None = None  # fp16's dynamic loss scaling
    skipped: bool = False  # the last train_step was an fp16 overflow, skipped


def _save(run: _Run, ckpt_dir: Path) -> None:
    """Commit a resumable checkpoint (rank 0 writes; every rank contributes RNG/data state).
    The curves need no write here: the loop rewrites them whenever a row is added."""
    rngs, data = _gather(_rng_state(run.rt), run.rt), _gather(run.source.state_dict(), run.rt)
    if not run.rt.is_main:
        return
    state = {"step": run.h.step, "history": dataclasses.asdict(run.h), "rng": rngs, "data": data,
             "scaler": run.scaler.state_dict() if run.scaler is not None else None}
    extra = {BEST_FILE: run.best} if run.best is not None else None
    save_state(ckpt_dir, run.raw, run.optimizer, state, run.identity, extra)


def _write_curves(run: _Run, curves_dir: Path) -> None:
    if run.rt.is_main:
        write_curves(run.h, curves_dir)


def _try_resume(run: _Run, ckpt_dir: Path, log) -> bool:
    """Restore the run from ckpt_dir if its identity matches; say why not otherwise."""
    try:
        record = read_state_meta(ckpt_dir)
    except CheckpointError as e:
        log(f"not resuming: {e}; starting fresh")
        return False
    if record is None:
        return False
    reason = identity_mismatch(record.get("meta", {}), run.identity)
    if reason is not None:
        log(f"not resuming from {ckpt_dir}: it is from a run with other inputs ({reason}); "
            f"starting fresh")
        return False
    initial = {k: v.detach().clone() for k, v in run.raw.state_dict().items()}
    fresh_optimizer = run.optimizer.state_dict()  # no moments yet: what a failed load reverts to
    try:
        state, _ = load_state(ckpt_dir, run.raw, run.optimizer, run.rt.device)
        history = History(**state["history"])
        rank = run.rt.rank if len(state["rng"]) == run.rt.world_size else 0
        _set_rng_state(state["rng"][rank], run.rt)
        run.source.load_state_dict(state["data"][rank])
        if run.scaler is not None:
            if not state["scaler"]:
                raise KeyError("scaler")
            run.scaler.load_state_dict(state["scaler"])
    except (CheckpointError, KeyError, TypeError, IndexError, ValueError) as e:
        run.raw.load_state_dict(initial)  # a failed load may have overwritten some weights
        run.optimizer.load_state_dict(fresh_optimizer)  # and loaded some moments
        if run.scaler is not None:
            run.scaler = grad_scaler(run.rt.device, run.rt.dtype)
        why = e if isinstance(e, CheckpointError) else f"{ckpt_dir}: state from another version ({e!r})"
        log(f"not resuming: {why}; starting fresh")
        return False
    run.h = history
    run.best = state["extra"].get(BEST_FILE)
    log(f"resuming from {ckpt_dir} at step {run.h.step} (budget {run.cfg.max_steps} steps)")
    return True


def _eval_and_track(run: _Run, patience: int, keep_best: bool, log) -> None:
    val = val_loss(run.raw, run.val, run.rt)
    h = run.h
    h.val_rows.append([h.step, h.tokens, val])
    if val < h.best_val:
        h.best_val, h.best_step, h.evals_since_best = val, h.step, 0
        if keep_best and run.rt.is_main:
            run.best = {k: v.detach().to("cpu", copy=True) for k, v in run.raw.state_dict().items()}
    else:
        h.evals_since_best += 1
        if patience and h.evals_since_best >= patience:
            h.stopped_early = True
    log(f"step {h.step:6d} | val loss {val:.4f} (best {h.best_val:.4f} at step {h.best_step})")


def _to_device(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.device.type == "cuda":  # pinned + async: the copy overlaps the previous kernels
        return t.pin_memory().to(rt.device, non_blocking=True)
    return t.to(rt.device)


def train_step(run: _Run) -> tuple[float, float, int]:
    """One optimizer step over grad_accum micro-batches -> (loss, grad norm, tokens, all ranks).
    Sets run.skipped when an fp16 step overflowed and was skipped (module docstring)."""
    cfg, rt, model, scaler = run.cfg, run.rt, run.model, run.scaler
    run.skipped = False
    set_lr(run.optimizer, lr_at(run.h.step, cfg))
    batches = [run.source.next() for _ in range(cfg.grad_accum)]
    tokens = sum(x.numel() for x, _ in batches)
    # The step's loss is the mean over every target of the global batch. Micro-batches (and ranks)
    # hold different numbers of targets when prompts and padding are masked (SFT), so each
    # micro-batch's mean is weighted by its share of the global target count, not by 1/grad_accum;
    # DDP then averages gradients over ranks, hence the world_size factor.
    counts = [int((y != IGNORE).sum()) for _, y in batches]
    total = torch.tensor(float(sum(counts)), device=rt.device)
    if rt.ddp:
        dist.all_reduce(total)
    total = total.clamp(min=1.0)
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(batches):
        x, y = _to_device(x, rt), _to_device(y, rt)
        # under DDP, only the last micro-step all-reduces gradients (backward inside no_sync)
        sync = model.no_sync() if rt.ddp and micro < cfg.grad_accum - 1 else nullcontext()
        with sync:
            with rt.autocast():
                _, loss = model(x, y)
            if counts[micro] == 0:  # nothing to learn here, but DDP still needs this backward
                loss = torch.nan_to_num(loss) * 0.0
            scaled = loss * (counts[micro] * rt.world_size / total)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float() * counts[micro]
    if scaler is not None:
        scaler.unscale_(run.optimizer)  # clip (and step) the true gradients
    norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip or math.inf)
    if rt.ddp:  # one decision on every rank: the global mean loss (norm is already global)
        dist.all_reduce(loss_sum)
    loss_mean = loss_sum / total
    loss_val, norm_val = loss_mean.item(), norm.item()
    if scaler is not None and math.isfinite(loss_val):
        if not math.isfinite(norm_val) and scaler.get_scale() <= 1.0:  # not the scale's fault
            return loss_val, norm_val, tokens * rt.world_size
        scaler.update()  # halves the scale after an overflow, else counts toward growing it
        if not math.isfinite(norm_val):
            run.skipped = True
            run.h.skipped_steps += 1
            run.optimizer.zero_grad(set_to_none=True)
            return loss_val, norm_val, tokens * rt.world_size
    if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
        return loss_val, norm_val, tokens * rt.world_size
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_val, norm_val, tokens * rt.world_size


def fit(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime, train_source: BatchSource,
        val_batches: Iterable, *, model_dir: str | Path, ckpt_dir: str | Path,
        curves_dir: str | Path, meta: dict,
        tokenizer_file: str | Path, keep_best: bool = False, patience: int = 0,
        inputs: dict | None = None) -> dict:
    """Train `model` (a plain, unwrapped GPT) to cfg.max_steps, resuming from ckpt_dir if it matches.

    Writes (rank 0 only): resumable state in ckpt_dir every cfg.save_interval steps and at the end;
    the model directory (best-by-validation weights when keep_best) with config.json = architecture
    + `meta` + {"training": summary less RUN_DEPENDENT} and curves_dir/{train,val}.tsv. Returns
    the summary (the caller writes it as its metrics, with whatever it adds).
    `meta` identifies the run beyond the config (tokenizer_hash, stage, data identity, the starting
    weights for fine-tuning) and `inputs` ({file: SHA-256} of the data and starting weights, see
    `file_digests`) are part of the fingerprint: any change forbids resuming. patience > 0 stops
    after that many evaluations without a better validation loss. Raises TrainingError when
    the loss diverges (nothing is saved for the bad step)."""
    ckpt_dir, curves_dir, model_dir = Path(ckpt_dir), Path(curves_dir), Path(model_dir)
    with lock_scratch(ckpt_dir) if rt.is_main else nullcontext():  # rank 0 is the only writer
        return _fit(model, cfg, rt, train_source, val_batches, model_dir, ckpt_dir, curves_dir,
                    meta, tokenizer_file, keep_best, patience, inputs)


def _fit(model, cfg, rt, train_source, val_batches, model_dir, ckpt_dir, curves_dir, meta,
         tokenizer_file, keep_best, patience, inputs) -> dict:
    log = (lambda msg: tqdm.write(msg)) if rt.is_main else (lambda msg: None)
    raw = model.to(rt.device)
    raw.train()
    optimizer = build_optimizer(raw, cfg, rt.device.type)
    identity = run_identity(raw, cfg, rt, meta, keep_best, patience, inputs)
    run = _Run(raw=raw, model=raw, optimizer=optimizer, cfg=cfg, rt=rt, source=train_source,
               val=val_batches, identity=identity, h=History(),
               flops_per_token=float(raw.flops_per_token()),
               scaler=grad_scaler(rt.device, rt.dtype))
    if rt.is_main:
        curves_dir.mkdir(parents=True, exist_ok=True)
    resumed = _try_resume(run, ckpt_dir, log)
    resumed_from = run.h.step if resumed else None
    if not resumed:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout streams differ per rank, fixed per seed
    if cfg.compile:
        run.model = torch.compile(run.model)
    if rt.ddp:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    _loop(run, ckpt_dir, curves_dir, keep_best, patience, log)
    summary = run_summary(run.h, raw, run.flops_per_token, rt.peak_flops, run.scaler,
                          resumed_from)
    if rt.is_main:
        if keep_best and run.best is not None:
            raw.load_state_dict(run.best)
        info = {**{k: v for k, v in summary.items() if k not in RUN_DEPENDENT},
                "device": str(rt.device), "dtype": rt.dtype, "world_size": rt.world_size}
        save_model(raw, model_dir, tokenizer_file=tokenizer_file, meta={**meta, "training": info})
    return summary


def _loop(run: _Run, ckpt_dir: Path, curves_dir: Path, keep_best: bool, patience: int, log) -> None:
    cfg, rt, h = run.cfg, run.rt, run.h
    if h.step == 0 and not h.val_rows:  # the untrained (or pre-trained, for SFT) baseline
        _eval_and_track(run, patience, keep_best, log)
    _write_curves(run, curves_dir)  # a fresh run's empty curves, or a resumed run's history
    bar = tqdm(total=cfg.max_steps, initial=h.step, disable=not rt.is_main, dynamic_ncols=True,
               mininterval=1.0, desc=curves_dir.name or "train", unit="step")
    try:  # the bar's line is ended before any error is printed
        _steps(run, bar, ckpt_dir, curves_dir, keep_best, patience, log)
    finally:
        bar.close()


def _steps(run: _Run, bar, ckpt_dir: Path, curves_dir: Path, keep_best: bool, patience: int,
           log) -> None:
    cfg, h = run.cfg, run.h
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "norm": 0.0, "normed": 0}
    start = time.perf_counter()
    last_saved = h.step if h.step else None  # a resumed run's checkpoint; a fresh run has none yet
    warm_up = True  # the first step of a session compiles/allocates: kept out of tokens/s
    while h.step < cfg.max_steps and not h.stopped_early:
        loss, norm, tokens, dt = _checked_step(run, ckpt_dir, last_saved, log)
        _account(run, window, loss, norm, tokens, dt, warm_up)
        warm_up = False
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        last = h.step == cfg.max_steps
        logged = h.step % cfg.log_interval == 0 or last
        if logged:
            _log_row(run, window, log)
        if h.step % cfg.eval_interval == 0 or last:
            logged = True
            _eval_and_track(run, patience, keep_best, log)
            if h.stopped_early:
                log(f"early stop at step {h.step}: {patience} evaluations without improvement")
                if window["steps"]:
                    _log_row(run, window, log)
        if logged:
            _write_curves(run, curves_dir)  # current curves for plots of a running experiment
        if h.step % cfg.save_interval == 0 or last or h.stopped_early:
            h.wall_time += time.perf_counter() - start
            start = time.perf_counter()
            _save(run, ckpt_dir)
            last_saved = h.step
    # the last step (and an early stop) always saves: nothing is left to write
    h.wall_time += time.perf_counter() - start


def _checked_step(run: _Run, ckpt_dir: Path, last_saved: int | None,
                  log) -> tuple[float, float, int, float]:
    """`train_step` -> (loss, grad norm, tokens, seconds); out of memory and a non-finite loss
    become one-line `TrainingError`s, an fp16 overflow a log line."""
    cfg, h = run.cfg, run.h
    t0 = time.perf_counter()
    try:
        loss, norm, tokens = train_step(run)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        key = section(cfg)
        raise TrainingError(f"{key}.batch_size: out of memory at step {h.step + 1} with "
                            f"{cfg.batch_size} sequences per micro-batch; lower it (raise "
                            f"{key}.grad_accum to keep the batch)") from None
    if not (math.isfinite(loss) and (math.isfinite(norm) or run.skipped)):
        kept = (f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is kept"
                if last_saved is not None else "no checkpoint of this run was saved yet")
        scale = f", fp16 loss scale {run.scaler.get_scale():g}" if run.scaler is not None else ""
        raise TrainingError(
            f"non-finite loss {loss} (grad norm {norm}{scale}) at step {h.step + 1}; stopped "
            f"without updating the weights; {kept}; lower the learning rate or check the data")
    if run.skipped:
        log(f"step {h.step + 1:6d} | fp16 gradients overflowed: step skipped, loss scale "
            f"now {run.scaler.get_scale():g} ({h.skipped_steps} skipped so far)")
    return loss, norm, tokens, time.perf_counter() - t0


def _account(run: _Run, window: dict, loss: float, norm: float, tokens: int, dt: float,
             warm_up: bool) -> None:
    """Count a finished step in the history and in the window of the next log row."""
    h = run.h
    h.step, h.tokens = h.step + 1, h.tokens + tokens
    window["loss"] += loss
    window["steps"] += 1
    if not run.skipped:  # an overflowed step has no gradient norm
        window["norm"] += norm
        window["normed"] += 1
    if not warm_up:
        h.train_time, h.timed_tokens = h.train_time + dt, h.timed_tokens + tokens
        window["time"] += dt
        window["tokens"] += tokens


def _log_row(run: _Run, window: dict, log) -> None:
    h, rt = run.h, run.rt
    n = window["steps"]
    tps = window["tokens"] / window["time"] if window["time"] > 0 else 0.0
    mfu = run.flops_per_token * tps / rt.peak_flops if rt.peak_flops else 0.0
    loss = window["loss"] / n
    norm = window["norm"] / window["normed"] if window["normed"] else math.nan
    lr = lr_at(h.step - 1, run.cfg)
    h.train_rows.append([h.step, h.tokens, loss, lr, norm, tps, mfu])
    scale = (f" | loss scale {run.scaler.get_scale():g} ({h.skipped_steps} skipped)"
             if run.scaler is not None else "")
    log(f"step {h.step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
        f"{tps:,.0f} tok/s | mfu {100 * mfu:.1f}%{scale}")
    window.update(loss=0.0, steps=0, tokens=0, time=0.0, norm=0.0, normed=0)


def section(cfg: TrainConfig) -> str:
    """The params section `cfg` was read from, to name its keys in an error."""
    from minigpt.config import FinetuneConfig

    return "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"
