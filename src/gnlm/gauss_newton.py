"""The Gauss-Newton oracle: full GN, GN-prox-linear and layerwise GN (design.md, "The method in one page").

One outer step — what a run's "steps" count — in the names of this module::

    outer_step(θ):
        θ₀ ← copy of θ                                   (the linearisation point; θ stays there until the end)
        inner solve (θ₀, φ) on N fresh inner batches:
            first_order_solve:  inner_step(θ₀, φ, batch) × N   g ← ∇_φ surrogate(φ; θ₀, batch)  (gn or prox_linear)
                                                              φ ← one step of the inner optimizer (Muon + AdamW)
            solve_by_cg:        φ ← θ₀ + CG solution of (G + λI) δ = −g on the N batches together
        d ← φ − θ₀
        η ← line_search(θ₀, d, fresh batches)            η ∈ {(1/√2)^i : i < line_search_range}, the lowest true
                                                         loss on another outer batch (``gn.line_search_batches``)
        θ ← θ₀ + η·d
        warm start: φ and the inner optimizer carry over to the next outer step (``gn.warm_start: false`` resets them)

Layerwise GN is the same code path with a partition of the parameters into blocks
(``curvature.layerwise_blocks``): the surrogate gradient is then block-diagonal
(``curvature.surrogate_grad(blocks=...)``).

This module is the method only: a model, the solver state (φ and the inner optimizer), a source of batches and
:class:`~gnlm.runconfig.GNConfig` in, θ moved and an :class:`OuterStep` record out. Everything around the step
(evaluation, EMA, logging, checkpoints, FLOP counting, the target stop) belongs to the harness: ``train.GNTrainer``
hands the step its batches and callbacks inside ``run.run_loop``.

Data parallel (torchrun): torch.func does not run through DDP/FSDP wrappers, so every rank holds the bare module
and a full copy of θ, φ and the inner optimizer. Each rank computes the surrogate gradient on its shard of every
inner batch and the gradients (and the surrogate value) are averaged with one all-reduce, so every rank takes the
same inner step; the CG solver averages its gradient and GGN-vector products the same way; line-search losses are
averaged too. The results do not depend on the number of processes (up to rounding).

Checkpoints inside an outer step (first-order solver): the harness's ``on_inner_step`` callback may save the solver
with its :class:`InnerPosition`; :func:`outer_step` with ``start`` continues the inner loop where it stopped, bit for
bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gnlm import distributed as dist
from gnlm.curvature import cg_solve, surrogate_grad
from gnlm.model import loss_fn
from gnlm.optim import build_optimizer, optimizer_step, set_lr
from gnlm.runconfig import GNConfig
from gnlm.schedules import inner_lr_multiplier

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
Blocks = list[list[str]] | None
NextBatch = Callable[[int], Batch]  # n sequences -> a fresh batch (this rank's shard), on the model's device


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


@dataclass
class OuterStep:
    """What one :func:`outer_step` did.

    ``eta``: the step size taken (0: skipped, θ kept; None: every line-search candidate was non-finite, θ kept);
    ``line_search_losses``: η -> mean true loss on the line-search batches; ``surrogate_loss``: the mean surrogate
    value seen by the first-order solve (CG: the damped quadratic at its solution); ``update_norm`` = ‖φ − θ₀‖;
    ``inner_reset``: φ was non-finite and the solver was reset; ``work``: how many times each unit of work ran
    (``inner_step``, ``forward``, ``gn_grad``, ``ggn_product``), for compute accounting outside."""

    eta: float | None
    line_search_losses: dict[float, float]
    surrogate_loss: float
    update_norm: float
    inner_reset: bool = False
    work: dict[str, int] = field(default_factory=dict)


def inner_step(model: nn.Module, theta0: Params, solver: InnerSolver, batch: Batch, blocks: Blocks,
               lr_multiplier: float) -> float:
    """One inner step on one batch: the surrogate gradient at φ (linearised at θ₀; averaged over the ranks),
    clipped, and one step of the inner optimizer. Returns the surrogate's value at φ before the step."""
    gn = solver.cfg
    set_lr(solver.optimizer, gn.inner_optim.lr, lr_multiplier)
    x, y = batch
    phi = {n: p.detach() for n, p in solver.phi.items()}
    loss, grads = surrogate_grad(model, theta0, phi, x, y, kind=gn.surrogate, prox=gn.damping, blocks=blocks)
    if dist.world_size() > 1:  # mean over the equal shards = the surrogate of the global inner batch
        loss = loss.clone()
        dist.all_reduce_mean([*grads.values(), loss])
    for n, p in solver.phi.items():
        p.grad = grads[n]
    optimizer_step(solver.optimizer, gn.inner_optim.clip, per_group=gn.inner_optim.clip_per_group)
    return float(loss)


def first_order_solve(model: nn.Module, theta0: Params, solver: InnerSolver, next_batch: NextBatch, blocks: Blocks,
                      step: int, total_steps: int, start: InnerPosition | None = None,
                      on_inner_step: Callable[[int, float], None] | None = None) -> float:
    """Minimise the surrogate linearised at θ₀ over φ: one :func:`inner_step` on each of ``gn.inner_steps`` fresh
    batches, the inner learning rate following ``gn.inner_schedule`` at outer step ``step`` of ``total_steps``.
    Returns the mean surrogate value seen. ``start`` continues a loop interrupted after ``start.k`` steps;
    ``on_inner_step(k, total)`` is called after each step k = 1..N with the running sum of surrogate values."""
    gn = solver.cfg
    start = start or InnerPosition()
    total = start.total
    for k in range(start.k, gn.inner_steps):
        mult = inner_lr_multiplier(gn.inner_schedule, step, k, total_steps, gn.inner_steps)
        total += inner_step(model, theta0, solver, next_batch(gn.inner_batch_size), blocks, mult)
        if on_inner_step is not None:
            on_inner_step(k + 1, total)
    return total / gn.inner_steps


def solve_by_cg(model: nn.Module, theta0: Params, solver: InnerSolver, next_batch: NextBatch,
                blocks: Blocks) -> tuple[float, int]:
    """The inner solve by conjugate gradient: φ ← θ₀ + δ with (G + λI) δ = −g on ``gn.inner_steps`` fresh batches
    taken together (warm-started from the previous φ − θ₀). Returns the damped quadratic's value at δ and the
    number of GGN-vector products per batch that CG spent."""
    gn = solver.cfg
    batches = [next_batch(gn.inner_batch_size) for _ in range(gn.inner_steps)]
    init = {n: solver.phi[n].detach() - theta0[n] for n in theta0} if gn.warm_start else None
    delta, info = cg_solve(model, theta0, batches, damping=gn.damping, max_iters=gn.cg_iters, blocks=blocks,
                           init=init, reduce=dist.all_reduce_mean)
    with torch.no_grad():
        for n, p in solver.phi.items():
            p.copy_(theta0[n] + delta[n])
    return float(info["quadratic"]), info["iterations"] + (1 if init else 0)


@torch.no_grad()
def line_search(model: nn.Module, theta0: Params, direction: Params, batches: list[Batch], etas: list[float],
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


def outer_step(model: nn.Module, solver: InnerSolver, blocks: Blocks, next_batch: NextBatch, step: int,
               total_steps: int, start: InnerPosition | None = None,
               on_inner_step: Callable[[int, float], None] | None = None) -> OuterStep:
    """One GN outer step (the module docstring's pseudocode) at the model's parameters θ, which it moves to
    θ₀ + η·d. ``step`` (0-based) of ``total_steps`` places the inner schedule; ``start`` continues a step
    interrupted inside its first-order inner loop (the model then holds θ₀); ``on_inner_step`` see
    :func:`first_order_solve`."""
    gn = solver.cfg
    params = dict(model.named_parameters())
    if start is None and not gn.warm_start:
        solver.reset(model)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    if gn.solver == "cg":
        surrogate, products = solve_by_cg(model, theta0, solver, next_batch, blocks)
        work = {"gn_grad": gn.inner_steps, "ggn_product": gn.inner_steps * products}
    else:
        surrogate = first_order_solve(model, theta0, solver, next_batch, blocks, step, total_steps, start,
                                      on_inner_step)
        work = {"inner_step": gn.inner_steps}
    direction = {n: solver.phi[n].detach() - theta0[n] for n in theta0}
    eta: float | None = 1.0
    losses: dict[float, float] = {}
    if gn.line_search:
        batches = [next_batch(gn.inner_batch_size) for _ in range(gn.line_search_batch_count())]
        eta, losses = line_search(model, theta0, direction, batches, gn.line_search_etas(), skip=gn.line_search_skip)
        work["forward"] = len(losses) * len(batches)
    update_norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values()))
    if eta is not None:
        with torch.no_grad():
            for n, p in params.items():  # a skipped step (η = 0) keeps θ₀ exactly, even for a non-finite direction
                p.copy_(theta0[n] + eta * direction[n] if eta else theta0[n])
    reset = eta is not None and not math.isfinite(update_norm)
    if reset:  # a non-finite φ would poison every warm-started solve after it
        solver.reset(model)
    return OuterStep(eta=eta, line_search_losses=losses, surrogate_loss=surrogate, update_norm=update_norm,
                     inner_reset=reset, work=work)
