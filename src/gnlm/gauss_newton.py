"""The Gauss-Newton oracle trainer: full GN, GN-prox-linear and layerwise GN (design.md, "The method in one page").

Data parallel (torchrun): torch.func does not run through DDP/FSDP wrappers, so every rank holds the bare module
and a full copy of θ, φ and the inner optimizer. Each rank computes the surrogate gradient on its shard of every
inner batch and the gradients (and the surrogate value) are averaged with one all-reduce, so every rank takes the
same inner step; the CG solver averages its gradient and GGN-vector products the same way; line-search and
evaluation losses are averaged too. The results do not depend on the number of processes (up to rounding).

Checkpoints inside an outer step (``gn.checkpoint_every_inner``, ``train.checkpoint_every_seconds``; first-order
solver) store the inner-loop position: resuming continues the inner loop where it stopped, bit for bit.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gnlm import distributed as dist
from gnlm.config import ConfigError
from gnlm.curvature import blocks_from_patterns, cg_solve, default_blocks, forward_equivalents, surrogate_grad
from gnlm.model import loss_fn
from gnlm.optim import (EMA, InnerScheduleConfig, OptimConfig, build_optimizer, clip_grad_norm,
                        inner_lr_multiplier, set_lr)


def _default_inner_optim() -> OptimConfig:
    # The paper's inner optimizer: Muon on hidden matrices + AdamW on the rest, b2 0.999, clip 1.0 per group.
    return OptimConfig(name="muon", lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, clip=1.0, clip_per_group=True)


@dataclass
class GNConfig:
    """Options of ``method: gn``. One outer step = ``inner_steps`` inner steps of ``inner_batch_size`` fresh
    sequences each, then a line search on ``ls_batches`` more fresh batches."""

    surrogate: Literal["gn", "prox_linear"] = "gn"
    layerwise: bool = False
    blocks: list[list[str]] | None = None
    solver: Literal["first_order", "cg"] = "first_order"
    inner_steps: int = 32
    inner_batch_size: int = 32
    inner_optim: OptimConfig = field(default_factory=_default_inner_optim)
    inner_schedule: InnerScheduleConfig = field(default_factory=InnerScheduleConfig)
    warm_start: bool = True
    prox: float = 0.0
    line_search: bool = True
    ls_range: int = 5
    ls_batches: int = 4
    cg_iters: int = 20
    cg_damping: float = 1e-3
    checkpoint_every_inner: int = 0

    def validate(self) -> None:
        for name in ("inner_steps", "inner_batch_size", "ls_range", "ls_batches", "cg_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gn.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every_inner < 0:
            raise ConfigError(f"gn.checkpoint_every_inner must be >= 0 (0 = off), got {self.checkpoint_every_inner}")
        if self.prox < 0:
            raise ConfigError(f"gn.prox must be >= 0, got {self.prox}")
        if self.cg_damping < 0:
            raise ConfigError(f"gn.cg_damping must be >= 0, got {self.cg_damping}")
        if self.blocks is not None and not self.layerwise:
            raise ConfigError("gn.blocks is set but gn.layerwise is false; set gn.layerwise=true to use the blocks")
        if self.blocks is not None and (not self.blocks or any(not b for b in self.blocks)):
            raise ConfigError("gn.blocks must be a non-empty list of non-empty lists of parameter-name patterns")


def line_search_etas(ls_range: int) -> list[float]:
    """Step sizes η ∈ {(1/√2)^i : i < ls_range}, largest first (the paper's grid)."""
    return [2.0 ** (-i / 2) for i in range(ls_range)]


@torch.no_grad()
def line_search(model: nn.Module, theta0: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
                batches: list[tuple[torch.Tensor, torch.Tensor]], etas: list[float]) -> tuple[float, dict[float, float]]:
    """Pick η minimising the true loss of θ₀ + η·d averaged over ``batches``.

    The loss at η = 0 (θ₀ itself) is measured on the same batches and is a candidate: if no η > 0 lowers the loss,
    or every candidate is non-finite, η = 0 is returned and the step is skipped, so the line search never increases
    the loss on its batches. Returns (η, {η: loss}); the model's parameters are left at θ₀. Under torchrun the
    ``batches`` are this rank's shards and the losses are averaged over the ranks (all ranks pick the same η).
    """
    params = dict(model.named_parameters())
    candidates = [0.0, *etas]
    local: list[float] = []
    for eta in candidates:
        for name, p in params.items():  # η = 0 is θ₀ itself, also when the direction is non-finite (0·nan = nan)
            p.copy_(theta0[name] + eta * direction[name] if eta else theta0[name])
        local.append(sum(loss_fn(model(x), y).item() for x, y in batches) / len(batches))
    for name, p in params.items():
        p.copy_(theta0[name])
    device = next(iter(params.values())).device
    losses: dict[float, float] = dict(zip(candidates, dist.mean_of_floats(local, device)))
    finite = {eta: loss for eta, loss in losses.items() if math.isfinite(loss)}
    best = min(finite, key=lambda eta: (finite[eta], -eta)) if finite else 0.0
    return best, losses


def resolve_blocks(model: nn.Module, cfg: GNConfig) -> list[list[str]] | None:
    """The layerwise partition (None for full GN): the user's patterns or [embedding, each block, lm_head]."""
    if not cfg.layerwise:
        return None
    if cfg.blocks is not None:
        return blocks_from_patterns([n for n, _ in model.named_parameters()], cfg.blocks)
    return default_blocks(model)


class InnerSolver:
    """φ, the inner optimizer and its schedule: the state that a warm start carries across outer steps."""

    def __init__(self, model: nn.Module, cfg: GNConfig):
        self.cfg = cfg
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        self.phi = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        self.optimizer = build_optimizer(self.phi, self.cfg.inner_optim)

    def state_dict(self) -> dict[str, Any]:
        return {"phi": {n: p.detach() for n, p in self.phi.items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.phi.items():
                p.copy_(state["phi"][n])
        self.optimizer.load_state_dict(state["optimizer"])


def inner_step_forwards(cfg: GNConfig, n_blocks: int) -> float:
    """Forward-pass equivalents of one first-order inner step, per token (measured constants, curvature.py)."""
    if n_blocks > 1:
        return n_blocks * forward_equivalents("layerwise_gn_block")
    return forward_equivalents(cfg.surrogate)


def train_gn(run) -> dict[str, Any]:
    """The GN outer loop. Reads like design.md: inner solve on fresh batches, line search, warm start, EMA."""
    from gnlm.train import CheckpointTimer, progress_bar, target_summary

    cfg, gn, model, st = run.cfg, run.cfg.gn, run.model, run.state
    params = dict(model.named_parameters())
    blocks = resolve_blocks(model, gn)
    solver = InnerSolver(model, gn)
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema_decay else None
    resume_inner: dict[str, Any] | None = None
    if run.checkpoint is not None:
        ckpt = run.restore()
        solver.load_state_dict(ckpt["inner"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        resume_inner = ckpt.get("inner_position")  # a checkpoint taken inside an outer step
    seq = cfg.data.seq_len
    inner_tokens = gn.inner_steps * gn.inner_batch_size * seq
    ls_tokens = gn.ls_batches * gn.inner_batch_size * seq if gn.line_search else 0
    etas = line_search_etas(gn.ls_range)
    summary: dict[str, Any] = {"reached_target": False, "diverged": False}
    timer = CheckpointTimer(cfg.train.checkpoint_every_seconds)

    def extra() -> dict[str, Any]:
        out = {"inner": solver.state_dict()}
        if ema is not None:
            out["ema"] = ema.state_dict()
        return out

    def inner_checkpoint(k_done: int, total: float, spent: float) -> None:
        """After inner step ``k_done`` of the current outer step: save if one is due (the model holds θₜ)."""
        every = gn.checkpoint_every_inner and k_done % gn.checkpoint_every_inner == 0
        if k_done < gn.inner_steps and (every or timer.due()):
            run.save({**extra(), "inner_position": {"k": k_done, "total": total, "wall_time": spent}})
            timer.reset()

    if run.checkpoint is None:
        st["eval_loss"] = run.evaluate(ema)
        run.log(step=0, tokens=0, eval_loss=st["eval_loss"], wall_time=0.0, forward_equivalents=0.0)
    bar = progress_bar(run, cfg.train.steps, "outer step")
    while st["step"] < cfg.train.steps:
        if cfg.train.target_loss is not None and st.get("eval_loss", math.inf) <= cfg.train.target_loss:
            break
        t0 = time.perf_counter()
        start_k, start_total, spent_before = 0, 0.0, 0.0
        if resume_inner is not None:  # continue the inner loop of a checkpoint taken inside this outer step
            start_k, start_total = int(resume_inner["k"]), float(resume_inner["total"])
            spent_before = float(resume_inner.get("wall_time", 0.0))
            resume_inner = None
        elif not gn.warm_start:
            solver.reset(model)
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        surrogate_loss, step_forwards = inner_solve(
            run, solver, theta0, blocks, st["step"], start=start_k, total=start_total,
            on_step=lambda k, total: inner_checkpoint(k, total, spent_before + time.perf_counter() - t0))
        direction = {n: solver.phi[n].detach() - theta0[n] for n in theta0}
        if gn.line_search:
            batches = [run.next_batch(gn.inner_batch_size) for _ in range(gn.ls_batches)]
            eta, losses = line_search(model, theta0, direction, batches, etas)
            step_forwards += ls_tokens * (len(etas) + 1)
        else:
            eta, losses = 1.0, {}
        with torch.no_grad():
            for n, p in params.items():  # a skipped step (η = 0) keeps θ₀ exactly, even for a non-finite direction
                p.copy_(theta0[n] + eta * direction[n] if eta else theta0[n])
        if ema is not None:
            ema.update(params)
        dt = spent_before + time.perf_counter() - t0
        st["step"] += 1
        st["tokens"] += inner_tokens + ls_tokens
        st["forward_equivalents"] += step_forwards
        st["wall_time"] += dt
        row = dict(step=st["step"], tokens=st["tokens"], inner_steps=gn.inner_steps, inner_tokens=inner_tokens,
                   line_search_tokens=ls_tokens, eta=eta, surrogate_loss=surrogate_loss,
                   forward_equivalents=st["forward_equivalents"], tokens_per_s=(inner_tokens + ls_tokens) / dt,
                   wall_time=st["wall_time"], update_norm=math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values())))
        if losses:
            row["loss"] = losses[eta]
            row["line_search_losses"] = {f"{k:.4f}": v for k, v in losses.items()}
        if not math.isfinite(row["update_norm"]):  # a non-finite φ would poison every warm-started solve after it
            solver.reset(model)
            row["inner_reset"] = True
        if eta == 0.0 and gn.line_search:
            row["skipped"] = True
            if dist.is_main():
                print(f"gnlm: outer step {st['step']}: no step size lowered the loss (or every candidate loss was "
                      f"non-finite); the step was skipped", file=sys.stderr)
        last = st["step"] == cfg.train.steps
        run.evaluate_if_due(ema, row, summary)
        run.log(**row)
        bar.update(1)
        bar.set_postfix(eta=f"{eta:.3f}", eval=f"{st.get('eval_loss', math.nan):.3f}")
        if summary["diverged"]:
            break
        every = cfg.train.checkpoint_every and st["step"] % cfg.train.checkpoint_every == 0
        if (every or timer.due()) and not last:
            run.save(extra())
            timer.reset()
    bar.close()
    if not summary["diverged"]:
        run.save(extra())
    return run.finish(target_summary(run, summary))


def inner_solve(run, solver: InnerSolver, theta0: dict[str, torch.Tensor], blocks,
                outer_step: int, start: int = 0, total: float = 0.0,
                on_step: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """Minimise the surrogate linearised at θ₀ over φ: ``inner_steps`` steps, each on a fresh batch.

    ``first_order``: one step of the inner optimizer per batch on ∇_φ of the GN (or prox-linear) model.
    ``cg``: conjugate gradient on the damped GN quadratic of the batches taken together; φ = θ₀ + δ.
    Returns the mean surrogate loss seen (first-order) or the quadratic's final value (cg), and the compute spent
    in forward-pass-equivalent tokens.

    ``start``/``total`` continue a first-order loop interrupted after ``start`` steps whose surrogate losses summed
    to ``total``; ``on_step(k, total)`` is called after each step k = 1..inner_steps (it may checkpoint).
    Under torchrun the batches are this rank's shards and gradients/values are averaged over the ranks.
    """
    gn, model = run.cfg.gn, run.model
    tokens = gn.inner_steps * gn.inner_batch_size * run.cfg.data.seq_len
    if gn.solver == "cg":
        batches = [run.next_batch(gn.inner_batch_size) for _ in range(gn.inner_steps)]
        start = {n: solver.phi[n].detach() - theta0[n] for n in theta0} if gn.warm_start else None
        delta, info = cg_solve(model, theta0, batches, damping=gn.cg_damping, max_iters=gn.cg_iters, blocks=blocks,
                               init=start, reduce=dist.all_reduce_mean)
        with torch.no_grad():
            for n, p in solver.phi.items():
                p.copy_(theta0[n] + delta[n])
        products = forward_equivalents("ggn_vector_product") * (info["iterations"] + (1 if start else 0))
        per_block = 0.6 * len(blocks) if blocks else 1.0  # measured: a layerwise product ≈ 0.6·n_blocks full ones
        return float(info["quadratic"]), tokens * (forward_equivalents("gn") + products * per_block)
    world = dist.world_size()
    for k in range(start, gn.inner_steps):
        mult = inner_lr_multiplier(gn.inner_schedule, outer_step, k, run.cfg.train.steps, gn.inner_steps)
        set_lr(solver.optimizer, gn.inner_optim.lr, mult)
        x, y = run.next_batch(gn.inner_batch_size)
        phi = {n: p.detach() for n, p in solver.phi.items()}
        loss, grads = surrogate_grad(model, theta0, phi, x, y, kind=gn.surrogate, prox=gn.prox, blocks=blocks)
        if world > 1:  # mean over the equal shards = the surrogate of the global inner batch
            loss = loss.clone()
            dist.all_reduce_mean([*grads.values(), loss])
        for n, p in solver.phi.items():
            p.grad = grads[n]
        clip_grad_norm(solver.optimizer, gn.inner_optim.clip, per_group=gn.inner_optim.clip_per_group)
        solver.optimizer.step()
        solver.optimizer.zero_grad(set_to_none=True)
        total += float(loss)
        if on_step is not None:
            on_step(k + 1, total)
    return total / gn.inner_steps, tokens * inner_step_forwards(gn, len(blocks or [None]))
