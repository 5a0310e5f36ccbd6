"""The baseline trainer (AdamW, Muon, SOAP or any ``torch.optim`` optimizer) and ``run_training``, the entry
point of ``gnlm train`` that hands either trainer to the one loop (``run.run_loop``).

Under ``torchrun`` baselines wrap the model in DDP (or shard it with FSDP2, ``train.parallel=fsdp``); the GN
trainer keeps the bare module on every rank and averages what it computes (torch.func does not run through the
wrappers).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from gnlm import accounting
from gnlm import distributed as dist
from gnlm.gauss_newton import GNTrainer
from gnlm.model import loss_fn
from gnlm.optim import build_optimizer, clip_grad_norm, set_lr
from gnlm.run import Run, StepResult, run_loop, setup_run
from gnlm.runconfig import RunConfig
from gnlm.schedules import lr_multiplier


class BaselineTrainer:
    """One optimizer step per step on ``train.batch_size`` sequences (accumulated over micro-batches)."""

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
        self.optimizer = build_optimizer(self.params, cfg.optim)
        run.start_ema(self.params)
        if run.checkpoint is not None:
            dist.load_optimizer_state(self.optimizer, run.restore()["optimizer"])
        local_batch = cfg.train.batch_size // dist.world_size()
        self.micro = min(cfg.train.micro_batch_size or local_batch, local_batch)
        self.n_micro = local_batch // self.micro
        self.meter = accounting.FlopMeter()
        model.train()

    def step(self) -> StepResult:
        out = self.meter("step", self._step)  # every step has the same shape: its FLOPs are counted once
        if out.diverged is None:
            out.flops = self.meter.per_call["step"]
        return out

    def _step(self) -> StepResult:
        run, cfg = self.run, self.run.cfg
        step = run.state["step"]
        mult = lr_multiplier(cfg.schedule, step, cfg.train.steps)
        set_lr(self.optimizer, cfg.optim.lr, mult)
        lr = cfg.optim.lr * mult
        x, y = run.next_batch(cfg.train.batch_size)  # this rank's shard of the global batch
        micro, loss_sum = self.micro, 0.0
        for j, i in enumerate(range(0, x.size(0), micro)):
            # Each rank's loss is the mean over its shard; DDP/FSDP average the gradients over the (equal) shards,
            # so the update is that of the mean loss over the global batch.
            with self._no_grad_sync(last=j == self.n_micro - 1):
                loss = loss_fn(self.forward(x[i:i + micro]), y[i:i + micro]) * (x[i:i + micro].size(0) / x.size(0))
                loss.backward()
            loss_sum += loss.item()
        if dist.world_size() > 1:
            loss_sum = dist.mean_of_floats([loss_sum], run.device)[0]
        tokens = cfg.train.batch_size * cfg.data.seq_len
        if not math.isfinite(loss_sum):
            return StepResult(row={}, tokens=0, forward_equivalents=0.0,
                              diverged=f"training loss became {loss_sum} at step {step + 1}")
        grad_norm = clip_grad_norm(self.optimizer, cfg.optim.clip, per_group=cfg.optim.clip_per_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(self.params)
        return StepResult(row=dict(loss=loss_sum, lr=lr, grad_norm=grad_norm), tokens=tokens,
                          forward_equivalents=accounting.baseline_step(tokens),
                          postfix={"loss": f"{loss_sum:.3f}"})

    def _no_grad_sync(self, last: bool):
        """Skip the gradient all-reduce for all but the last micro-batch (the gradients accumulate locally)."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.run.cfg.train.parallel == "fsdp" and dist.world_size() > 1:
            self.run.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                 stop: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """Entry point of ``gnlm train``: set the run up, then loop with the trainer of ``cfg.method`` (under
    torchrun on every rank). ``stop``: see :func:`run.run_loop`."""
    run = setup_run(cfg, resume=resume, overwrite=overwrite)
    try:
        trainer = GNTrainer(run) if cfg.method == "gn" else BaselineTrainer(run)
        return run_loop(run, trainer, stop)
    finally:
        if run.logger is not None and not run.logger.file.closed:
            run.logger.close()
        if run.lock is not None:
            run.lock.release()
