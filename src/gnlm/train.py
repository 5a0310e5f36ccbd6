"""The two trainers of ``run.run_loop``: the baseline trainer (AdamW, Muon, SOAP or any ``torch.optim`` optimizer)
and the GN trainer (one ``gauss_newton.outer_step`` per step), and ``run_training``, the entry point of
``gnlm train`` that hands either to the loop.

Under ``torchrun`` baselines wrap the model in DDP (or shard it with FSDP2, ``train.parallel=fsdp``); the GN
trainer keeps the bare module on every rank and averages what it computes (torch.func does not run through the
wrappers).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from gnlm import accounting
from gnlm import distributed as dist
from gnlm.config import ConfigError
from gnlm.curvature import ggn_vector_product, layerwise_blocks, surrogate_grad
from gnlm.gauss_newton import InnerPosition, InnerSolver, inner_step, outer_step
from gnlm.model import loss_fn
from gnlm.optim import Optimizer, build_optimizer, optimizer_step, set_lr
from gnlm.run import Run, StepResult, run_loop, setup_run
from gnlm.runconfig import RunConfig
from gnlm.schedules import lr_multiplier


class BaselineTrainer:
    """One optimizer step per step on ``train.batch_size`` sequences (accumulated over micro-batches). An optimizer
    whose ``step`` needs a closure (``torch.optim.LBFGS``) gets one that recomputes the loss and gradients on the
    step's batch; each call is counted in the step's FLOPs."""

    unit = "step"

    def __init__(self, run: Run):
        cfg, model = run.cfg, run.model
        self.run = run
        self.ddp = None
        if dist.world_size() > 1 and cfg.train.parallel == "fsdp":
            dist.shard_model(model)  # in place: parameters become DTensor shards
        elif dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                               else None)
        self.forward = self.ddp if self.ddp is not None else model
        self.params = dict(model.named_parameters())
        self.optimizer = baseline_optimizer(self.params, cfg, None if run.checkpoint is not None
                                            else run.init_optimizer, cfg.train.init_from)
        run.start_ema(self.params)
        if run.checkpoint is not None:
            dist.load_optimizer_state(self.optimizer, run.restore()["optimizer"])
        local_batch = cfg.train.batch_size // dist.world_size()
        self.micro = min(cfg.train.micro_batch_size or local_batch, local_batch)
        self.n_micro = local_batch // self.micro
        self.step_flops: int | None = None
        self.closure = cfg.optim.needs_closure()
        self.closure_flops: int | None = None  # FLOPs of one closure call (forward and backward of the batch)
        model.train()

    def step(self) -> StepResult:
        if self.closure:  # the optimizer decides how many forward-backward passes a step takes
            return self._step()
        if self.step_flops is None:  # every step has the same shape: its FLOPs are counted once, on the first
            self.step_flops, out = accounting.count_flops(self._step)
        else:
            out = self._step()
        if out.diverged is None:
            out.flops = self.step_flops
        return out

    def _step(self) -> StepResult:
        run, cfg = self.run, self.run.cfg
        step = run.state["step"]
        lr = scheduled_lr(self.optimizer, cfg, step)
        x, y = run.next_batch(cfg.train.batch_size)  # this rank's shard of the global batch
        tokens = cfg.train.batch_size * cfg.data.seq_len
        if self.closure:
            losses: list[float] = []

            def closure() -> float:
                if self.closure_flops is None:
                    self.closure_flops, loss = accounting.count_flops(lambda: self._loss_and_grad(x, y))
                else:
                    loss = self._loss_and_grad(x, y)
                losses.append(loss)
                return loss

            grad_norm = optimizer_step(self.optimizer, cfg.optim.clip, per_group=cfg.optim.clip_per_group,
                                       closure=closure)
            loss_sum, flops = losses[0], len(losses) * self.closure_flops
        else:
            loss_sum, flops = self._loss_and_grad(x, y), None
        if not math.isfinite(loss_sum):
            return StepResult(row={}, tokens=0, diverged=f"training loss became {loss_sum} at step {step + 1}")
        if not self.closure:
            grad_norm = optimizer_step(self.optimizer, cfg.optim.clip, per_group=cfg.optim.clip_per_group)
        if run.ema is not None:
            run.ema.update(self.params)
        row = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm}
        if self.closure:
            row["closure_calls"] = len(losses)
        return StepResult(row=row, tokens=tokens, flops=flops, postfix={"loss": f"{loss_sum:.3f}"})

    def _loss_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The mean loss of the batch (over every rank), its gradients accumulated into ``p.grad``."""
        micro, loss_sum = self.micro, 0.0
        for j, i in enumerate(range(0, x.size(0), micro)):
            # Each rank's loss is the mean over its shard; DDP/FSDP average the gradients over the (equal) shards,
            # so the update is that of the mean loss over the global batch.
            with self._no_grad_sync(last=j == self.n_micro - 1):
                loss = loss_fn(self.forward(x[i:i + micro]), y[i:i + micro]) * (x[i:i + micro].size(0) / x.size(0))
                loss.backward()
            loss_sum += loss.item()
        if dist.world_size() > 1:
            loss_sum = dist.mean_of_floats([loss_sum], self.run.device)[0]
        return loss_sum

    def _no_grad_sync(self, last: bool):
        """Skip the gradient all-reduce for all but the last micro-batch (the gradients accumulate locally)."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.run.cfg.train.parallel == "fsdp" and dist.world_size() > 1:
            self.run.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}


def baseline_optimizer(params: dict[str, torch.Tensor], cfg: RunConfig, saved_state: dict[str, Any] | None = None,
                       where: str | None = None) -> Optimizer:
    """The baseline optimizer of ``cfg`` over ``params``, as ``gnlm train`` builds it (:class:`BaselineTrainer`;
    ``gnlm bench`` runs the same trainer and ``gnlm probe`` calls this too): :func:`gnlm.optim.build_optimizer` of
    ``cfg.optim`` (every field, ``kwargs``, routing) and, with ``saved_state`` (``train.init_optimizer``: another
    run's optimizer state, read from ``where``), that state continued with this config's hyperparameters
    (:func:`continued_optimizer_state`)."""
    optimizer = build_optimizer(params, cfg.optim)
    if saved_state is not None:
        dist.load_optimizer_state(optimizer, continued_optimizer_state(optimizer.state_dict(), saved_state,
                                                                       str(where)))
    return optimizer


def scheduled_lr(optimizer: Optimizer, cfg: RunConfig, step: int) -> float:
    """Set the learning rate of optimizer update number ``step`` (0-based) of a run of ``cfg``
    (``schedule`` over ``train.steps``, warm-up included) into every group of ``optimizer``; return it."""
    mult = lr_multiplier(cfg.schedule, step, cfg.train.steps)
    set_lr(optimizer, cfg.optim.lr, mult)
    return cfg.optim.lr * mult


def continued_optimizer_state(ours: dict[str, Any], saved: dict[str, Any], where: str) -> dict[str, Any]:
    """The state that continues ``saved`` (another run's optimizer of the same kind, ``train.init_optimizer``) in
    this run's optimizer, whose ``state_dict()`` is ``ours``: each parameter's state (moments, step count) from
    ``saved``, every hyperparameter (lr, betas, eps, weight decay) from ``ours`` (AMSGrad over a state saved without
    it starts its maximum of the second moment at the saved second moment). Parameters are matched by name:
    both optimizers were built from the same model's ``named_parameters()`` (the weights were loaded strictly by
    name), so group by group, in order, the i-th parameter is the same one; a combined optimizer (Muon, SOAP) also
    checks its roles' parameter names. One ConfigError naming ``where`` when the groups differ."""
    if "optimizers" in ours:  # optim.CombinedOptimizer: one state per role
        if saved.get("roles") != ours["roles"] or saved.get("param_names") != ours["param_names"]:
            raise ConfigError(f"train.init_optimizer: the optimizer state in {where} routes the parameters "
                              f"differently (roles {saved.get('roles')}); use the optim settings of the run that "
                              f"wrote it or set train.init_optimizer=false")
        return {**ours, "optimizers": {role: continued_optimizer_state(ours["optimizers"][role],
                                                                        saved["optimizers"][role], where)
                                       for role in ours["roles"]}}

    def layout(state: dict[str, Any]) -> list[tuple[Any, int]]:
        return [(g.get("role"), len(g["params"])) for g in state.get("param_groups", [])]

    if layout(saved) != layout(ours):
        raise ConfigError(f"train.init_optimizer: the optimizer state in {where} has parameter groups "
                          f"{layout(saved)}, this run's optimizer {layout(ours)}; use a checkpoint of the same model "
                          f"and optimizer or set train.init_optimizer=false")
    state = dict(saved["state"])
    for group in ours["param_groups"]:  # AMSGrad continuing a state saved without it: its running maximum of the
        if group.get("amsgrad"):        # second moment starts at the second moment (the history's last value)
            for i in group["params"]:
                s = state.get(i)
                if s is not None and "exp_avg_sq" in s and "max_exp_avg_sq" not in s:
                    state[i] = {**s, "max_exp_avg_sq": s["exp_avg_sq"].clone()}
    return {"state": state, "param_groups": ours["param_groups"]}


class GNTrainer:
    """The GN oracle as a trainer of ``run.run_loop``: one :func:`gauss_newton.outer_step` per step, fed with the
    run's batches; around it the EMA, checkpoints inside the inner loop and the step's FLOPs (each unit of work
    counted once per run, before the first step, on copies: :meth:`_unit_flops`)."""

    unit = "outer step"

    def __init__(self, run: Run):
        self.run = run
        gn = run.cfg.gn
        params = dict(run.model.named_parameters())
        self.blocks = layerwise_blocks(run.model, gn.blocks) if gn.layerwise else None
        self.solver = InnerSolver(run.model, gn)
        run.start_ema(params)
        self.resume: InnerPosition | None = None
        if run.checkpoint is not None:
            ckpt = run.restore()
            self.solver.load_state_dict(ckpt["inner"])
            if ckpt.get("inner_position") is not None:  # a checkpoint taken inside an outer step
                self.resume = InnerPosition(**ckpt["inner_position"])
        self.flops = self._unit_flops()

    def _unit_flops(self) -> dict[str, int]:
        """FLOPs of each unit of work an outer step reports (``OuterStep.work``), counted once on a batch of the
        run's shape (the count depends on shapes only) and on copies of the solver, so that nothing of the run
        changes and no step's measured time includes the counting."""
        run, gn = self.run, self.run.cfg.gn
        model = run.model
        x = torch.zeros(gn.inner_batch_size // dist.world_size(), run.cfg.data.seq_len, dtype=torch.long,
                        device=run.device)
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        units: dict[str, Callable[[], Any]] = {}
        if gn.solver == "cg":
            units["gn_grad"] = lambda: surrogate_grad(model, theta0, theta0, x, x)
            units["ggn_product"] = lambda: ggn_vector_product(model, theta0, x, x, theta0, blocks=self.blocks)
        else:
            units["inner_step"] = lambda: inner_step(model, theta0, copy.deepcopy(self.solver), (x, x), self.blocks,
                                                     1.0)
        if gn.line_search:
            units["forward"] = torch.no_grad()(lambda: loss_fn(model(x), x))
        return {k: accounting.count_flops(fn)[0] for k, fn in units.items()}

    def step(self) -> StepResult:
        run, gn = self.run, self.run.cfg.gn
        start, self.resume = self.resume, None
        before = start.wall_time if start is not None else 0.0
        t0 = time.perf_counter()

        def checkpoint_inside(k: int, total: float) -> None:
            every = gn.checkpoint_every_inner and k % gn.checkpoint_every_inner == 0
            if k < gn.inner_steps and (every or run.checkpoint_due()):
                position = InnerPosition(k, total, before + time.perf_counter() - t0)
                run.save({"inner": self.solver.state_dict(), "inner_position": asdict(position)})

        out = outer_step(run.model, self.solver, self.blocks, run.next_batch, run.state["step"], run.cfg.train.steps,
                         start, checkpoint_inside)
        number = run.state["step"] + 1
        if out.eta is None:  # every step size gives a non-finite loss: nothing to move to, θ stays at θ₀
            return StepResult(row={}, tokens=0, diverged=(
                f"every line-search step size gives a non-finite loss at outer step {number}"))
        if run.ema is not None:
            run.ema.update(dict(run.model.named_parameters()))
        seq = run.cfg.data.seq_len
        row: dict[str, Any] = dict(inner_steps=gn.inner_steps, inner_tokens=gn.inner_tokens(seq),
                                   line_search_tokens=gn.line_search_tokens(seq), eta=out.eta,
                                   surrogate_loss=out.surrogate_loss, update_norm=out.update_norm)
        if out.line_search_losses:
            row["loss"] = out.line_search_losses[out.eta]
            row["line_search_losses"] = {f"{k:.4f}": v for k, v in out.line_search_losses.items()}
        if out.inner_reset:
            row["inner_reset"] = True
        if out.eta == 0.0:
            row["skipped"] = True
            if dist.is_main():
                print(f"gnlm: outer step {number}: no step size lowered the loss (or every candidate loss was "
                      f"non-finite); the step was skipped", file=sys.stderr)
        flops = sum(n * self.flops[unit] for unit, n in out.work.items())
        return StepResult(row=row, tokens=gn.inner_tokens(seq) + gn.line_search_tokens(seq), flops=flops,
                          seconds_before=before, postfix={"eta": f"{out.eta:.3f}"})

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.solver.state_dict()}


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                 stop: Callable[[dict[str, Any]], str | None] | None = None,
                 notice: str | None = None) -> dict[str, Any]:
    """Entry point of ``gnlm train``: set the run up, then loop with the trainer of ``cfg.method`` (under
    torchrun on every rank). ``stop``: see :func:`run.run_loop`. ``notice``: a stderr line printed once the run
    is set up (never before a refusal)."""
    run = setup_run(cfg, resume=resume, overwrite=overwrite)
    if notice is not None:
        print(notice, file=sys.stderr)
    try:
        trainer = GNTrainer(run) if cfg.method == "gn" else BaselineTrainer(run)
        return run_loop(run, trainer, stop)
    finally:
        if run.logger is not None and not run.logger.file.closed:
            run.logger.close()
        if run.lock is not None:
            run.lock.release()
