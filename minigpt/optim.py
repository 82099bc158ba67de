"""How parameters are updated: the LR schedule, AdamW's param groups, Muon.

Design choices
- LR: linear warm-up then cosine (or, schedule `wsd`, flat then a linear decay over the last
  decay_fraction) to lr * min_lr_ratio, a pure function of (step, cfg), so a resume needs no
  scheduler state.
- AdamW decays matrices (linears, embedding) only, never norm gains; fused on CUDA and CPU
  (several times faster than foreach there: docs/EXPERIMENTS.md), foreach elsewhere.
- Optimizer `muon`: our `Muon` (torch.optim.Muon's update, Newton-Schulz in fp32 on CPU) for the
  blocks' matrices, AdamW for embedding/head and norm gains, stepped as one optimizer
  (`MuonAdamW`); each param group's `lr_ratio` maps the one schedule onto both peaks
  (muon_lr / lr, applied by `set_lr`). Recipe numbers: docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minigpt.config import TrainConfig  # FinetuneConfig is a TrainConfig


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for g = U S V^T (Keller Jordan's quintic, the
    coefficients torch.optim.Muon uses), in g's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, 5 Newton-Schulz steps, lr scaled by
    sqrt(max(1, rows / cols)), decoupled weight decay) with the orthogonalisation in `ns_dtype`.

    torch's Muon always runs it in bf16, which CPUs without native bf16 only emulate, far slower
    (docs/EXPERIMENTS.md); here it is fp32 on CPUs and bf16 only on CUDA (as torch's)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns_dtype=torch.float32):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=mu).to(self.ns_dtype)).to(p.dtype)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


class MuonAdamW:
    """Muon for the blocks' 2-D matrices, AdamW for the rest, stepped as one optimizer.

    Exposes what `fit` and the checkpoint code use: param_groups (each with an `lr_ratio` that
    scales the schedule's LR: muon_lr / lr for the Muon groups), step, zero_grad and
    state_dict / load_state_dict (both inner state dicts, so a resume is exact)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def adamw(params, weight_decay: float, lr: float, betas, device_type: str, **group
          ) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linears, embedding) only, not on norm gains;
    fused on CUDA and CPU, foreach elsewhere. `group` adds keys to both param groups (`lr_ratio`)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **group},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **group}]
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None,
                             foreach=None if fused else True)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str):
    """cfg.optimizer `adamw`: `adamw` above on every parameter. `muon`: `Muon` above
    (lr muon_lr, momentum muon_momentum, Nesterov, Keller's shape scaling) on every 2-D matrix
    inside the blocks, AdamW (lr, betas, weight decay) on the embedding/head and the norm gains.
    Muon's decoupled decay is scaled by lr / muon_lr so both shrink weights at the same rate."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return adamw(model.parameters(), cfg.weight_decay, cfg.lr, betas, device_type)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("layers.")]
    ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in ids]
    ratio = cfg.muon_lr / cfg.lr
    muon = Muon([{"params": hidden, "lr_ratio": ratio}], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.weight_decay / ratio,
                ns_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32)
    return MuonAdamW(muon, adamw(rest, cfg.weight_decay, cfg.lr, betas, device_type, lr_ratio=1.0))


def set_lr(optimizer, lr: float) -> None:
    """The schedule's LR on every param group, times its `lr_ratio` (muon_lr / lr for Muon's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for the update taken at `step` (0-based): linear warm-up, then cosine to lr*min_lr_ratio
    (schedule `cosine`), or flat at lr and a linear decay to lr*min_lr_ratio over the last
    decay_fraction of max_steps (schedule `wsd`, warmup-stable-decay)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * cfg.max_steps))
        left = cfg.max_steps - step  # updates still to take, this one included
        return cfg.lr if left > decay else floor + (cfg.lr - floor) * (left - 1) / decay
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)
