"""Training runs: the pieces every trainer shares (run directory, data, evaluation, metrics, checkpoints) and
the baseline training loop. The Gauss-Newton loop lives in ``gauss_newton.py`` and uses the same ``Run``.

Run directory layout::

    config.yaml       the resolved config of the run
    metrics.jsonl     one JSON row per logged step (and one per evaluation)
    checkpoint.pt     the latest checkpoint (checkpoint.prev.pt: the one before)
    summary.json      written when the run ends: final eval loss, target reached at step/tokens, diverged, time
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from gnlm.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from gnlm.config import ConfigError
from gnlm.data import BatchStream, PreparedData, eval_set, prepare_data
from gnlm.model import GPT, loss_fn
from gnlm.optim import EMA, build_optimizer, clip_grad_norm, lr_multiplier, set_lr
from gnlm.runconfig import RunConfig, run_config_to_dict

# Forward-pass equivalents per token: a backward costs about two forwards.
BASELINE_STEP_FORWARDS = 3.0

# Config keys that may change when a run is resumed (they do not change what the run computes).
RESUMABLE_CHANGES = {
    "train.steps", "train.progress", "train.checkpoint_every", "train.target_loss", "train.log_every",
    "train.device", "train.threads", "train.tensorboard", "train.wandb", "train.wandb_project",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use train.device=cpu")
    return device


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Create (or check) the run directory; returns (path, resuming). Never deletes anything unless asked."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    run_dir = Path(cfg.out_dir)
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not (resume or overwrite):
        raise ConfigError(
            f"run directory {run_dir} already exists; pass --resume to continue it or --overwrite to replace it, "
            f"or set out_dir=...")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out_dir {run_dir} is a file; choose a directory path")
    resuming = False
    if exists and resume:
        saved_path = run_dir / "config.yaml"
        if saved_path.exists():
            saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
            now = _flatten(run_config_to_dict(cfg))
            changed = sorted(k for k in set(saved) | set(now)
                             if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise ConfigError(
                    f"cannot resume {run_dir}: the config differs in {', '.join(changed[:5])}; "
                    f"use the run's own config ({saved_path}) or start a new out_dir")
        resuming = (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists()
    if exists and overwrite:
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {run_dir} ({e.strerror}); choose a writable directory") from None
    return run_dir, resuming


class MetricsLogger:
    """Appends JSON rows to ``metrics.jsonl``; mirrors scalars to TensorBoard / W&B when enabled."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop rows logged after the checkpoint we resume from, so the file reads as one clean run.
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        self.tb = self.wandb = None
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs tensorboard: pip install 'gnlm[log]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.wandb needs wandb: pip install 'gnlm[log]'") from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir),
                                    config=run_config_to_dict(cfg), resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy over the fixed held-out set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, inputs.size(0), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        total += loss_fn(model(x), y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


@dataclass
class Run:
    """Everything a trainer needs, built from the config before any compute starts."""

    cfg: RunConfig
    dir: Path
    data: PreparedData
    model: GPT
    stream: BatchStream
    eval_inputs: torch.Tensor
    eval_targets: torch.Tensor
    device: torch.device
    checkpoint: dict[str, Any] | None
    logger: MetricsLogger | None = None
    state: dict[str, Any] = field(default_factory=lambda: {
        "step": 0, "tokens": 0, "forward_equivalents": 0.0, "wall_time": 0.0})

    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        return evaluate(model or self.model, self.eval_inputs, self.eval_targets, self.cfg.train.eval_batch_size)

    def next_batch(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.next(n_sequences)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def log(self, **row: Any) -> None:
        if self.logger is not None:
            self.logger.log(row)

    def save(self, extra: dict[str, Any]) -> None:
        """Checkpoint the model, the run state, the data position and RNG states, plus trainer ``extra``."""
        state = {
            "model": self.model.state_dict(),
            "state": dict(self.state),
            "stream": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            **extra,
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        save_checkpoint(self.dir / "checkpoint.pt", state)

    def restore(self) -> dict[str, Any]:
        """Load the checkpoint we resume from into the model, state and stream; returns it for the trainer."""
        ckpt = self.checkpoint
        assert ckpt is not None
        self.model.load_state_dict(ckpt["model"])
        self.state.update(ckpt["state"])
        self.stream.load_state_dict(ckpt["stream"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        return ckpt

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = {"method": self.cfg.method, **summary, **{k: self.state[k] for k in
                                                             ("step", "tokens", "forward_equivalents", "wall_time")}}
        atomic_write_bytes(self.dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if self.logger is not None:
            self.logger.close()
        return summary


def setup_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Run:
    """Check everything, prepare data, build the model; load the checkpoint when resuming."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if cfg.train.init_from is not None and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from: checkpoint {cfg.train.init_from} does not exist; give a checkpoint path")
    run_dir, resuming = prepare_run_dir(cfg, resume, overwrite)
    data = prepare_data(cfg.data, progress=cfg.train.progress)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"raise model.vocab_size or use a smaller tokenizer")
    eval_inputs, eval_targets = eval_set(data, cfg.data.seq_len, cfg.data.eval_sequences)
    stream = BatchStream(data.train_tokens(), cfg.data.seq_len, seed=cfg.data.seed + cfg.train.seed)

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    model.to(device=device, dtype=getattr(torch, cfg.train.dtype))
    if cfg.train.init_from is not None and not resuming:
        init = load_checkpoint(cfg.train.init_from, map_location=device)
        try:
            model.load_state_dict(init["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"train.init_from: the checkpoint does not fit this model ({first}); "
                              f"use a checkpoint of the same model config") from None
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt", map_location=device) if resuming else None
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False).encode())
    run = Run(cfg=cfg, dir=run_dir, data=data, model=model, stream=stream, eval_inputs=eval_inputs,
              eval_targets=eval_targets, device=device, checkpoint=checkpoint)
    run.logger = MetricsLogger(run_dir, cfg, resume_step=checkpoint["state"]["step"] if checkpoint else None)
    return run


def progress_bar(run: Run, total: int, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=run.state["step"], unit=unit, dynamic_ncols=True,
                disable=not run.cfg.train.progress, file=sys.stderr)


def train_baseline(run: Run) -> dict[str, Any]:
    """First-order (or any torch.optim) training: the loop every baseline in the benchmark runs."""
    cfg, model, st = run.cfg, run.model, run.state
    params = dict(model.named_parameters())
    optimizer = build_optimizer(params, cfg.optim)
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if run.checkpoint is not None:
        ckpt = run.restore()
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    summary: dict[str, Any] = {"reached_target": False, "diverged": False}

    def eval_model() -> float:
        if ema is None:
            return run.evaluate()
        with ema.swap_into(model):
            return run.evaluate()

    if st["step"] == 0:
        st["eval_loss"] = eval_model()
        run.log(step=0, tokens=0, eval_loss=st["eval_loss"], wall_time=0.0, forward_equivalents=0.0)
    bar = progress_bar(run, cfg.train.steps, "step")
    model.train()
    while st["step"] < cfg.train.steps:
        if cfg.train.target_loss is not None and st.get("eval_loss", math.inf) <= cfg.train.target_loss:
            break
        t0 = time.perf_counter()
        mult = lr_multiplier(cfg.schedule, st["step"], cfg.train.steps)
        set_lr(optimizer, cfg.optim.lr, mult)
        lr = cfg.optim.lr * mult
        x, y = run.next_batch(cfg.train.batch_size)
        loss_sum = 0.0
        for i in range(0, x.size(0), micro):
            loss = loss_fn(model(x[i:i + micro]), y[i:i + micro]) * (x[i:i + micro].size(0) / x.size(0))
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            summary.update(diverged=True, message=f"training loss became {loss_sum} at step {st['step'] + 1}")
            print(f"gnlm: run diverged: {summary['message']}; lower the learning rate", file=sys.stderr)
            break
        grad_norm = clip_grad_norm(optimizer, cfg.optim.clip, per_group=cfg.optim.clip_per_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(params)
        dt = time.perf_counter() - t0
        st["step"] += 1
        st["tokens"] += tokens_per_step
        st["forward_equivalents"] += BASELINE_STEP_FORWARDS * tokens_per_step
        st["wall_time"] += dt
        row = dict(step=st["step"], tokens=st["tokens"], loss=loss_sum, lr=lr, grad_norm=grad_norm,
                   tokens_per_s=tokens_per_step / dt, wall_time=st["wall_time"],
                   forward_equivalents=st["forward_equivalents"])
        last = st["step"] == cfg.train.steps
        if st["step"] % cfg.train.eval_every == 0 or last:
            st["eval_loss"] = eval_model()
            row["eval_loss"] = st["eval_loss"]
            if not math.isfinite(st["eval_loss"]):
                summary.update(diverged=True, message=f"eval loss became {st['eval_loss']} at step {st['step']}")
        if st["step"] % cfg.train.log_every == 0 or "eval_loss" in row:
            run.log(**row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", eval=f"{st.get('eval_loss', math.nan):.3f}",
                        tok_s=f"{tokens_per_step / dt:,.0f}")
        if summary["diverged"]:
            break
        if cfg.train.checkpoint_every and st["step"] % cfg.train.checkpoint_every == 0 and not last:
            run.save(_baseline_extra(optimizer, ema))
    bar.close()
    if not summary["diverged"]:
        run.save(_baseline_extra(optimizer, ema))
    return run.finish(target_summary(run, summary))


def _baseline_extra(optimizer, ema) -> dict[str, Any]:
    extra = {"optimizer": optimizer.state_dict()}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    return extra


def target_summary(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Add the eval loss and, if a target is set, where it was first reached (read back from the metrics)."""
    summary["final_eval_loss"] = run.state.get("eval_loss")
    target = run.cfg.train.target_loss
    summary["target_loss"] = target
    if target is not None and run.logger is not None:
        run.logger.file.flush()
        for line in run.logger.path.read_text().splitlines():
            row = json.loads(line)
            if row.get("eval_loss") is not None and row["eval_loss"] <= target:
                summary.update(reached_target=True, target_step=row["step"], target_tokens=row["tokens"],
                               target_forward_equivalents=row.get("forward_equivalents"),
                               target_wall_time=row.get("wall_time"))
                break
    return summary


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Entry point of ``gnlm train``: dispatch on ``cfg.method``."""
    run = setup_run(cfg, resume=resume, overwrite=overwrite)
    if cfg.method == "gn":
        from gnlm.gauss_newton import train_gn

        return train_gn(run)
    return train_baseline(run)
