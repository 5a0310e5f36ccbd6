"""The Gauss-Newton oracle trainer: full GN, GN-prox-linear and layerwise GN (design.md, "The method in one page").

One outer step — what a run's "steps" count — in the names of this module::

    outer_step(θ):
        θ₀ ← copy of θ                                   (the linearisation point; θ stays there until the end)
        inner_solve(θ₀, φ):                              N fresh inner batches
            first-order:  inner_step(θ₀, φ, batch) × N       g ← ∇_φ surrogate(φ; θ₀, batch)  (gn or prox_linear)
                                                              φ ← one step of the inner optimizer (Muon + AdamW)
            cg:           cg_step(θ₀, φ)                     φ ← θ₀ + CG solution of (G + λI) δ = −g on the N batches
        d ← φ − θ₀
        η ← line_search(θ₀, d, fresh batches)            η ∈ {(1/√2)^i : i < ls_range}, the lowest true loss on
                                                         another outer batch (``gn.ls_batches: auto``)
        θ ← θ₀ + η·d ;  EMA ← update(θ)
        warm start: φ and the inner optimizer carry over to the next outer step (``gn.warm_start: false`` resets them)

Layerwise GN is the same code path with a partition of the parameters into blocks (:func:`resolve_blocks`): the
surrogate gradient is then block-diagonal (``curvature.surrogate_grad(blocks=...)``). Everything around the
outer step (evaluation, logging, checkpoints, target stop) is ``run.run_loop``; :class:`GNTrainer` plugs
:func:`outer_step` into it.

Data parallel (torchrun): torch.func does not run through DDP/FSDP wrappers, so every rank holds the bare module
and a full copy of θ, φ and the inner optimizer. Each rank computes the surrogate gradient on its shard of every
inner batch and the gradients (and the surrogate value) are averaged with one all-reduce, so every rank takes the
same inner step; the CG solver averages its gradient and GGN-vector products the same way; line-search and
evaluation losses are averaged too. The results do not depend on the number of processes (up to rounding).

Checkpoints inside an outer step (``gn.checkpoint_every_inner``, ``train.checkpoint_every_seconds``; first-order
solver) store the inner-loop position (:class:`InnerPosition`): resuming continues the inner loop where it
stopped, bit for bit.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gnlm import accounting
from gnlm import distributed as dist
from gnlm.curvature import (
    blocks_from_patterns,
    cg_solve,
    default_blocks,
    ggn_vector_product,
    surrogate_grad,
)
from gnlm.model import loss_fn
from gnlm.optim import build_optimizer, clip_grad_norm, set_lr
from gnlm.run import Run, StepResult
from gnlm.runconfig import GNConfig
from gnlm.schedules import inner_lr_multiplier

Params = dict[str, torch.Tensor]


def line_search_etas(ls_range: int) -> list[float]:
    """Step sizes η ∈ {(1/√2)^i : i < ls_range}, largest first (the paper's grid)."""
    return [2.0 ** (-i / 2) for i in range(ls_range)]


@torch.no_grad()
def line_search(model: nn.Module, theta0: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
                batches: list[tuple[torch.Tensor, torch.Tensor]], etas: list[float],
                skip: bool = False) -> tuple[float | None, dict[float, float]]:
    """Pick η minimising the true loss of θ₀ + η·d averaged over ``batches`` (ties: the larger η).

    As in the paper, η is one of ``etas`` and the step always moves. ``skip=True`` adds η = 0 (θ₀ itself) as a
    candidate, so that when no η > 0 lowers the loss the step is skipped and the loss never increases on these
    batches. Returns (η, {η: loss}); η is None when every candidate loss is non-finite (nothing to move to).
    The model's parameters are left at θ₀. Under torchrun the ``batches`` are this rank's shards and the losses
    are averaged over the ranks (all ranks pick the same η).
    """
    params = dict(model.named_parameters())
    candidates = [0.0, *etas] if skip else list(etas)
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
    best = min(finite, key=lambda eta: (finite[eta], -eta)) if finite else None
    return best, losses


def resolve_blocks(model: nn.Module, cfg: GNConfig) -> list[list[str]] | None:
    """The layerwise partition (None for full GN): the user's patterns or [embedding, each block, lm_head]."""
    if not cfg.layerwise:
        return None
    if cfg.blocks is not None:
        return blocks_from_patterns([n for n, _ in model.named_parameters()], cfg.blocks)
    return default_blocks(model)


class InnerSolver:
    """φ and the inner optimizer: the state that a warm start carries across outer steps."""

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


@dataclass
class InnerPosition:
    """Where an interrupted outer step stands: ``k`` inner steps done, their surrogate losses summing to
    ``total``, ``wall_time`` seconds spent. Stored in checkpoints taken inside an outer step."""

    k: int = 0
    total: float = 0.0
    wall_time: float = 0.0


def inner_step(model: nn.Module, theta0: Params, solver: InnerSolver, batch: tuple[torch.Tensor, torch.Tensor],
               blocks: list[list[str]] | None, lr_multiplier: float) -> float:
    """One inner step on one batch: the surrogate gradient at φ (linearised at θ₀; averaged over the ranks),
    clipped, and one step of the inner optimizer. Returns the surrogate's value at φ before the step."""
    gn = solver.cfg
    set_lr(solver.optimizer, gn.inner_optim.lr, lr_multiplier)
    x, y = batch
    phi = {n: p.detach() for n, p in solver.phi.items()}
    loss, grads = surrogate_grad(model, theta0, phi, x, y, kind=gn.surrogate, prox=gn.prox, blocks=blocks)
    if dist.world_size() > 1:  # mean over the equal shards = the surrogate of the global inner batch
        loss = loss.clone()
        dist.all_reduce_mean([*grads.values(), loss])
    for n, p in solver.phi.items():
        p.grad = grads[n]
    clip_grad_norm(solver.optimizer, gn.inner_optim.clip, per_group=gn.inner_optim.clip_per_group)
    solver.optimizer.step()
    solver.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def cg_step(run: Run, solver: InnerSolver, theta0: Params, blocks: list[list[str]] | None,
            meter: accounting.FlopMeter) -> tuple[float, float, float]:
    """The inner solve by conjugate gradient: φ ← θ₀ + δ with (G + λI) δ = −g on ``gn.inner_steps`` fresh batches
    taken together (warm-started from the previous φ − θ₀). Returns the damped quadratic's value at δ, the compute
    spent (forward-pass equivalents) and its FLOPs (a gradient and a GGN-vector product on one batch are counted
    once per run, by an extra call of each)."""
    gn = solver.cfg
    batches = [run.next_batch(gn.inner_batch_size) for _ in range(gn.inner_steps)]
    meter("gn_grad", lambda: surrogate_grad(run.model, theta0, theta0, *batches[0]))
    meter("ggn_product", lambda: ggn_vector_product(run.model, theta0, *batches[0], theta0, blocks=blocks))
    init = {n: solver.phi[n].detach() - theta0[n] for n in theta0} if gn.warm_start else None
    delta, info = cg_solve(run.model, theta0, batches, damping=gn.cg_damping, max_iters=gn.cg_iters, blocks=blocks,
                           init=init, reduce=dist.all_reduce_mean)
    with torch.no_grad():
        for n, p in solver.phi.items():
            p.copy_(theta0[n] + delta[n])
    products = info["iterations"] + (1 if init else 0)
    tokens = gn.inner_steps * gn.inner_batch_size * run.cfg.data.seq_len
    flops = gn.inner_steps * (meter.per_call["gn_grad"] + products * meter.per_call["ggn_product"])
    return float(info["quadratic"]), accounting.cg_solve(tokens, products, len(blocks) if blocks else 0), flops


def inner_solve(run: Run, solver: InnerSolver, theta0: Params, blocks: list[list[str]] | None, outer_step: int,
                start: InnerPosition | None = None, on_step: Callable[[int, float], None] | None = None,
                meter: accounting.FlopMeter | None = None) -> tuple[float, float, float]:
    """Minimise the surrogate linearised at θ₀ over φ on ``gn.inner_steps`` fresh batches: one
    :func:`inner_step` per batch, or :func:`cg_step` (``gn.solver: cg``). Returns the mean surrogate value seen (cg:
    the quadratic's final value), the compute spent in forward-pass equivalents, and its FLOPs (``meter`` counts
    the first inner step of the run; every inner step has the same shape).

    ``start`` continues a first-order loop interrupted after ``start.k`` steps; ``on_step(k, total)`` is called
    after each step k = 1..inner_steps with the running sum of surrogate values (it may checkpoint)."""
    gn = solver.cfg
    meter = meter or accounting.FlopMeter()
    if gn.solver == "cg":
        return cg_step(run, solver, theta0, blocks, meter)
    start = start or InnerPosition()
    total = start.total
    for k in range(start.k, gn.inner_steps):
        mult = inner_lr_multiplier(gn.inner_schedule, outer_step, k, run.cfg.train.steps, gn.inner_steps)
        batch = run.next_batch(gn.inner_batch_size)
        total += meter("inner_step", lambda: inner_step(run.model, theta0, solver, batch, blocks, mult))
        if on_step is not None:
            on_step(k + 1, total)
    tokens = gn.inner_steps * gn.inner_batch_size * run.cfg.data.seq_len
    flops = gn.inner_steps * meter.per_call["inner_step"]
    return total / gn.inner_steps, accounting.gn_inner_steps(tokens, gn.surrogate, len(blocks or [None])), flops


def outer_step(run: Run, solver: InnerSolver, blocks: list[list[str]] | None,
               resume: InnerPosition | None = None, meter: accounting.FlopMeter | None = None) -> StepResult:
    """One GN outer step (the module docstring's pseudocode); ``resume`` continues one interrupted inside its
    inner loop (the model then holds θₜ)."""
    gn, model = run.cfg.gn, run.model
    params = dict(model.named_parameters())
    if resume is None and not gn.warm_start:
        solver.reset(model)
    start = resume or InnerPosition()
    t0 = time.perf_counter()
    theta0 = {n: p.detach().clone() for n, p in params.items()}

    def checkpoint_inside(k: int, total: float) -> None:
        every = gn.checkpoint_every_inner and k % gn.checkpoint_every_inner == 0
        if k < gn.inner_steps and (every or run.checkpoint_due()):
            position = InnerPosition(k, total, start.wall_time + time.perf_counter() - t0)
            run.save({"inner": solver.state_dict(), "inner_position": asdict(position)})

    meter = meter or accounting.FlopMeter()
    surrogate_loss, compute, flops = inner_solve(run, solver, theta0, blocks, run.state["step"], start,
                                                 checkpoint_inside, meter)
    direction = {n: solver.phi[n].detach() - theta0[n] for n in theta0}
    eta: float | None = 1.0
    losses: dict[float, float] = {}
    ls_tokens = gn.line_search_batches() * gn.inner_batch_size * run.cfg.data.seq_len
    if gn.line_search:
        batches = [run.next_batch(gn.inner_batch_size) for _ in range(gn.line_search_batches())]
        etas = line_search_etas(gn.ls_range)
        with torch.no_grad():  # a line-search forward, counted once per run by one extra call
            meter("forward", lambda: loss_fn(model(batches[0][0]), batches[0][1]))
        eta, losses = line_search(model, theta0, direction, batches, etas, skip=gn.line_search_skip)
        compute += accounting.line_search(ls_tokens, len(losses))
        flops += len(losses) * len(batches) * meter.per_call["forward"]
    if eta is None:  # every step size gives a non-finite loss: nothing to move to, θ stays at θ₀
        return StepResult(row={}, tokens=0, forward_equivalents=0.0, diverged=(
            f"every line-search step size gives a non-finite loss at outer step {run.state['step'] + 1}"))
    with torch.no_grad():
        for n, p in params.items():  # a skipped step (η = 0) keeps θ₀ exactly, even for a non-finite direction
            p.copy_(theta0[n] + eta * direction[n] if eta else theta0[n])
    if run.ema is not None:
        run.ema.update(params)

    inner_tokens = gn.inner_steps * gn.inner_batch_size * run.cfg.data.seq_len
    row = dict(inner_steps=gn.inner_steps, inner_tokens=inner_tokens, line_search_tokens=ls_tokens, eta=eta,
               surrogate_loss=surrogate_loss,
               update_norm=math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values())))
    if losses:
        row["loss"] = losses[eta]
        row["line_search_losses"] = {f"{k:.4f}": v for k, v in losses.items()}
    if not math.isfinite(row["update_norm"]):  # a non-finite φ would poison every warm-started solve after it
        solver.reset(model)
        row["inner_reset"] = True
    if eta == 0.0:
        row["skipped"] = True
        if dist.is_main():
            print(f"gnlm: outer step {run.state['step'] + 1}: no step size lowered the loss (or every candidate loss "
                  f"was non-finite); the step was skipped", file=sys.stderr)
    return StepResult(row=row, tokens=inner_tokens + ls_tokens, forward_equivalents=compute, flops=flops,
                      seconds_before=start.wall_time, postfix={"eta": f"{eta:.3f}"})


class GNTrainer:
    """The GN oracle as a trainer of ``run.run_loop``: one :func:`outer_step` per step."""

    unit = "outer step"

    def __init__(self, run: Run):
        self.run = run
        self.blocks = resolve_blocks(run.model, run.cfg.gn)
        self.solver = InnerSolver(run.model, run.cfg.gn)
        run.start_ema(dict(run.model.named_parameters()))
        self.resume: InnerPosition | None = None
        self.meter = accounting.FlopMeter()
        if run.checkpoint is not None:
            ckpt = run.restore()
            self.solver.load_state_dict(ckpt["inner"])
            if ckpt.get("inner_position") is not None:  # a checkpoint taken inside an outer step
                self.resume = InnerPosition(**ckpt["inner_position"])

    def step(self) -> StepResult:
        resume, self.resume = self.resume, None
        return outer_step(self.run, self.solver, self.blocks, resume, self.meter)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.solver.state_dict()}
