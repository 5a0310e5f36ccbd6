"""One run: its data, model, metrics, evaluation and checkpoints, and the one training loop, :func:`run_loop`,
that both trainers use. A trainer (``train.py``: the baseline trainer and the GN trainer, which drives
``gauss_newton.outer_step``) supplies only its step; everything around the step lives here and works the same for
both. The run directory itself (lock, resume/overwrite checks, layout) is ``rundir.py``.

Under ``torchrun`` (see ``distributed.py``) every rank builds the same run; only rank 0 writes the directory
(config, metrics, checkpoints, summary, progress bar) and every rank reads the checkpoint when resuming.

A checkpoint holds everything a run needs to continue as if it had never stopped: parameters, run state (step,
tokens, FLOPs, wall time), EMA, data-stream position and RNG states, plus the trainer's own state (optimizer;
for GN φ, the inner optimizer and, for a checkpoint taken inside an outer step, the inner-loop position).
Parameters and optimizer states are stored as full (unsharded) tensors, so a run can resume on any number of
processes, with DDP or FSDP.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from gnlm import distributed as dist
from gnlm.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from gnlm.config import ConfigError, dumps_json
from gnlm.data import BatchStream, PreparedData, eval_set, load_prepared, prepare_data
from gnlm.model import build_model as build_module
from gnlm.model import loss_fn
from gnlm.optim import EMA
from gnlm.resources import check_parallel, check_run_memory, resolve_device
from gnlm.runconfig import RunConfig, run_config_to_dict
from gnlm.rundir import RunDirLock, has_checkpoint, prepare_run_dir, read_saved_config


def _parse_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class MetricsLogger:
    """Appends JSON rows to ``metrics.jsonl``; mirrors scalars to TensorBoard / W&B when enabled."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop rows logged after the checkpoint we resume from, so the file reads as one clean run (and a
            # last line cut short by a killed process).
            keep = [line for line in self.path.read_text().splitlines()
                    if (row := _parse_row(line)) is not None and row.get("step", 0) <= resume_step]
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
        self.file.write(dumps_json(row) + "\n")
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


@dataclass
class Evaluation:
    """One evaluation on the held-out set: the mean loss over its tokens and the standard error of that mean over
    its ``sequences`` (None for a set of one sequence)."""

    loss: float
    se: float | None
    sequences: int
    tokens: int


@torch.no_grad()
def _eval_sums(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
               device: torch.device) -> list[float]:
    """[loss sum over tokens, tokens, sum and sum of squares of the per-sequence mean losses, sequences]."""
    was_training = model.training
    model.eval()
    total, count, s1, s2 = 0.0, 0, 0.0, 0.0
    for i in range(0, inputs.size(0), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        logits = model(x)
        total += loss_fn(logits, y).item() * y.numel()
        count += y.numel()
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
        per_sequence = per_token.double().view(y.shape).mean(dim=1)
        s1 += per_sequence.sum().item()
        s2 += per_sequence.square().sum().item()
    model.train(was_training)
    return [total, float(count), s1, s2, float(inputs.size(0))]


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Evaluation:
    """Mean next-token cross-entropy over the fixed held-out set, and its standard error over the n sequences,
    SE = s/√n with s² = Σᵢ(ℓᵢ − ℓ̄)²/(n − 1) over the sequences' mean losses ℓᵢ (each sequence has the same number
    of tokens, so ℓ̄ is the mean loss).

    Under torchrun, when the set splits evenly, each rank evaluates its contiguous share and the sums are
    all-reduced (the same number as one process, up to rounding); otherwise every rank evaluates everything."""
    device = next(model.parameters()).device
    n, w = inputs.size(0), dist.world_size()
    if w == 1 or n % w:
        total, count, s1, s2, seqs = _eval_sums(model, inputs, targets, batch_size, device)
    else:
        share = n // w
        lo = dist.rank() * share
        sums = torch.tensor(_eval_sums(model, inputs[lo:lo + share], targets[lo:lo + share], batch_size, device),
                            dtype=torch.float64, device=dist.comm_device(device))
        dist.all_reduce_sum(sums)
        total, count, s1, s2, seqs = sums.tolist()
    se = math.sqrt(max(s2 - s1 * s1 / seqs, 0.0) / (seqs - 1) / seqs) if seqs > 1 else None
    return Evaluation(loss=total / count, se=se, sequences=n, tokens=targets.numel())


class CheckpointTimer:
    """``train.checkpoint_every_seconds``: is a time-based checkpoint due? Rank 0's clock decides for all."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last = time.monotonic()

    def due(self) -> bool:
        if not self.seconds:
            return False
        due = dist.broadcast_object(time.monotonic() - self.last >= self.seconds)
        if due:
            self.last = time.monotonic()
        return due

    def reset(self) -> None:
        self.last = time.monotonic()


@dataclass
class StepResult:
    """What a trainer's step reports to :func:`run_loop`.

    ``row``: the step's own metrics (the loop adds step, tokens, FLOPs, throughput, wall time and evaluation);
    ``tokens`` and ``flops`` (counted, ``accounting.py``): what the step consumed; ``seconds_before``: time this
    step had already spent before a resume (a GN step resumed inside its inner loop); ``postfix``: progress-bar
    fields; ``diverged``: a message when the step found the run diverged (the step is then not counted)."""

    row: dict[str, Any]
    tokens: int
    seconds_before: float = 0.0
    flops: float | None = None
    postfix: dict[str, str] = field(default_factory=dict)
    diverged: str | None = None


class Trainer(Protocol):
    """A training method as the loop sees it: one step at a time, and its state for checkpoints."""

    unit: str  # what one step is called in the progress bar ("step", "outer step")

    def step(self) -> StepResult: ...

    def state_dict(self) -> dict[str, Any]: ...


@dataclass
class Run:
    """Everything a trainer needs, built from the config before any compute starts."""

    cfg: RunConfig
    dir: Path
    data: PreparedData
    model: torch.nn.Module
    stream: BatchStream
    eval_inputs: torch.Tensor
    eval_targets: torch.Tensor
    device: torch.device
    checkpoint: dict[str, Any] | None
    init_optimizer: dict[str, Any] | None = None  # train.init_optimizer: the optimizer state of train.init_from
    lock: RunDirLock | None = None
    logger: MetricsLogger | None = None
    ema: EMA | None = None
    timer: CheckpointTimer = field(default_factory=lambda: CheckpointTimer(0.0))
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0, "tokens": 0, "wall_time": 0.0})

    def start_ema(self, params: dict[str, torch.Tensor]) -> None:
        """The EMA of ``params`` (``train.ema_decay``; off at 0), restored from the checkpoint when resuming.
        Call it once the parameters are in their final form (after FSDP sharding)."""
        if not self.cfg.train.ema_decay:
            return
        self.ema = EMA(params, self.cfg.train.ema_decay)
        if self.checkpoint is not None:
            self.ema.load_state_dict(dist.shard_ema_state(self.checkpoint["ema"], params))

    def evaluate(self) -> Evaluation:
        """Loss on the fixed held-out set, of the EMA weights when there is an EMA (as the paper evaluates)."""
        if self.ema is None:
            return evaluate(self.model, self.eval_inputs, self.eval_targets, self.cfg.train.eval_batch_size)
        with self.ema.swap_into(self.model):
            return evaluate(self.model, self.eval_inputs, self.eval_targets, self.cfg.train.eval_batch_size)

    def next_batch(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.next(n_sequences)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def log(self, **row: Any) -> None:
        if self.logger is not None:
            self.logger.log(row)

    def checkpoint_due(self) -> bool:
        """Is a time-based checkpoint due (``train.checkpoint_every_seconds``)? The same answer on every rank."""
        return self.timer.due()

    def save(self, extra: dict[str, Any]) -> None:
        """Checkpoint the model, the run state, the EMA, the data position and RNG states, plus trainer ``extra``.

        Call it on every rank: sharded (FSDP) tensors are gathered to full tensors (a collective), then rank 0
        writes the file."""
        state = {
            "model": self.model.state_dict(),
            "state": dict(self.state),
            "stream": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            **extra,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        state = dist.full_tensors(state)
        if dist.is_main():
            save_checkpoint(self.dir / "checkpoint.pt", state)
        self.timer.reset()

    def restore(self) -> dict[str, Any]:
        """Load the checkpoint we resume from into the model, state and stream; returns it for the trainer."""
        ckpt = self.checkpoint
        assert ckpt is not None
        dist.load_model_state(self.model, ckpt["model"])
        self.state.update(ckpt["state"])
        self.stream.load_state_dict(ckpt["stream"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        return ckpt

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = {"method": self.cfg.method, **summary, **{k: self.state[k] for k in ("step", "tokens", "wall_time")}}
        if dist.world_size() > 1:
            summary["world_size"] = dist.world_size()
        if dist.is_main():
            atomic_write_bytes(self.dir / "summary.json", (dumps_json(summary, indent=2) + "\n").encode())
        if self.logger is not None:
            self.logger.close()
        return summary


def run_loop(run: Run, trainer: Trainer, stop: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """The training loop of every method: evaluation, logging, progress, target stop, divergence and
    checkpoints around ``trainer.step()``. Returns the run's summary (also written to ``summary.json``).

    A run stops at ``train.steps``, at the first evaluation at or below ``train.target_loss``, or when it diverges
    (a step reports a non-finite loss, or :func:`divergence` finds it in the step's row); it is checkpointed every
    ``train.checkpoint_every`` steps, every ``train.checkpoint_every_seconds`` and at the end (not after a
    divergence: the last good checkpoint stays). Every diverged run, of either trainer, says so in one stderr line.
    ``stop`` (a study's learning-rate search, ``bench.LrSearchStop``) is asked after every evaluation that did not
    reach the target; a reason it returns ends the run there (``summary["stopped_early"]``), checkpointed as usual.
    """
    cfg, st = run.cfg, run.state
    summary: dict[str, Any] = {"reached_target": False, "diverged": False}
    run.timer = CheckpointTimer(cfg.train.checkpoint_every_seconds)
    if run.checkpoint is None:
        first: dict[str, Any] = {"step": 0, "tokens": 0}
        st["initial_eval_loss"] = _evaluate_into(run, first)
        run.log(**first, wall_time=0.0)
        if (found := divergence(cfg, st, {"step": 0, "eval_loss": st["eval_loss"]})) is not None:
            summary.update(diverged=True, diverged_reason=found[0], message=found[1])
    bar = tqdm(total=cfg.train.steps, initial=st["step"], unit=trainer.unit, dynamic_ncols=True,
               disable=not (cfg.train.progress and dist.is_main()), file=sys.stderr)
    while st["step"] < cfg.train.steps and not summary["diverged"]:
        if cfg.train.target_loss is not None and st.get("eval_loss", math.inf) <= cfg.train.target_loss:
            break
        t0 = time.perf_counter()
        out = trainer.step()
        if out.diverged is not None:
            summary.update(diverged=True, diverged_reason="non_finite", message=out.diverged)
            break
        dt = out.seconds_before + time.perf_counter() - t0
        st["step"] += 1
        st["tokens"] += out.tokens
        st["wall_time"] += dt
        row = {"step": st["step"], "tokens": st["tokens"], **out.row, "tokens_per_s": out.tokens / dt,
               "wall_time": st["wall_time"]}
        if out.flops is not None:  # every process does its equal share
            row["flops"] = st["flops"] = st.get("flops", 0) + out.flops * dist.world_size()
        last = st["step"] == cfg.train.steps
        if evaluation_due(cfg, st["step"]) or last:
            _evaluate_into(run, row)
        if out.row.get("skipped"):  # a GN outer step whose line search kept θ (η = 0)
            st["skipped_steps"] = st.get("skipped_steps", 0) + 1
        if (found := divergence(cfg, st, row)) is not None:
            summary.update(diverged=True, diverged_reason=found[0], message=found[1])
        if st["step"] % cfg.train.log_every == 0 or "eval_loss" in row:
            run.log(**row)
        bar.update(1)
        bar.set_postfix(**out.postfix, eval=f"{st.get('eval_loss', math.nan):.3f}")
        if summary["diverged"]:
            break
        if stop is not None and "eval_loss" in row and not last:
            # rank 0 decides (it reads files other processes write), so that every rank stops at the same step
            if (reason := dist.broadcast_object(stop(st) if dist.is_main() else None)) is not None:
                summary["stopped_early"] = reason
                break
        every = cfg.train.checkpoint_every and st["step"] % cfg.train.checkpoint_every == 0
        if (every or run.checkpoint_due()) and not last:
            run.save(trainer.state_dict())
    bar.close()
    summary["skipped_steps"] = skipped = st.get("skipped_steps", 0)
    summary["best_eval_loss"] = st.get("best_eval_loss")
    if summary["diverged"]:
        if dist.is_main():
            print(f"gnlm: run diverged: {summary['message']}; lower the learning rate", file=sys.stderr)
    else:
        run.save(trainer.state_dict())
        if skipped and skipped == st["step"] and dist.is_main():
            print(f"gnlm: every outer step of the run was skipped ({skipped} of {skipped}): no line-search step "
                  f"size lowered the loss, so the model never moved; lower gn.inner_optim.lr", file=sys.stderr)
    return run.finish(target_summary(run, summary))


def evaluation_due(cfg: RunConfig, step: int) -> bool:
    """Is an evaluation due after ``step``: every ``train.eval_every`` steps, or, with ``train.eval_every_tokens``
    = E, when the step's batch carries the run's training tokens across a multiple of E (the batch is the same at
    every step, so this depends on the step alone and a resumed run evaluates where it would have)."""
    every = cfg.train.eval_every_tokens
    if every is None:
        return step % cfg.train.eval_every == 0
    per_step = cfg.batch_tokens()
    return step * per_step // every > (step - 1) * per_step // every


def _evaluate_into(run: Run, row: dict[str, Any]) -> float:
    """Evaluate; the loss and its standard error go into the run's state and the metrics ``row``."""
    ev = run.evaluate()
    run.state["eval_loss"] = row["eval_loss"] = ev.loss
    run.state["eval_loss_se"] = row["eval_loss_se"] = ev.se
    return ev.loss


def divergence(cfg: RunConfig, st: dict[str, Any], row: dict[str, Any]) -> tuple[str, str] | None:
    """The divergence rule of every run, both trainers: ``(reason, message)`` when the logged ``row`` of step
    ``row["step"]`` shows the run diverged, else None. With V = ``model.vocab_size`` (ln V is the loss of the
    uniform predictor) the run diverged when

    * ``non_finite``: its training loss (``loss``) or eval loss is nan or ±inf;
    * ``above_bound``: either loss exceeds max(initial eval loss, ln V) + ``train.divergence_margin``: a finite
      blow-up (an lr far too high reaches 1e5 and more);
    * ``collapsed``: the eval loss is within ``train.collapse_tolerance`` of ln V after having been below
      ln V − tolerance: the model fell back to the uniform predictor (a dead model, with zero gradient).

    ``st`` is the run's state (checkpointed, so the rule continues across a resume): it reads
    ``initial_eval_loss`` and keeps ``best_eval_loss``, the lowest eval loss so far."""
    step, log_v = row["step"], math.log(cfg.model.vocab_size)
    start = st.get("initial_eval_loss")
    start = start if start is not None and math.isfinite(start) else log_v
    bound = max(start, log_v) + cfg.train.divergence_margin
    for key, name in (("loss", "training loss"), ("eval_loss", "eval loss")):
        v = row.get(key)
        if v is None:
            continue
        if not math.isfinite(v):
            return "non_finite", f"{name} became {v} at step {step}"
        if v > bound:
            return "above_bound", (f"{name} {v:.4g} at step {step} is above max(initial eval loss {start:.4g}, "
                                   f"ln V {log_v:.4g}) + train.divergence_margin {cfg.train.divergence_margin:g}")
    v = row.get("eval_loss")
    if v is not None:
        tol, best = cfg.train.collapse_tolerance, st.get("best_eval_loss", math.inf)
        if tol and abs(v - log_v) <= tol and best < log_v - tol:
            return "collapsed", (f"eval loss {v:.6g} at step {step} is ln V = {log_v:.6g}, the loss of the uniform "
                                 f"predictor, after having been {best:.4g}: the model collapsed")
        st["best_eval_loss"] = min(best, v)
    return None


def setup_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Run:
    """Check everything, prepare data, build the model; load the checkpoint when resuming.

    Under torchrun: the process group is started here; rank 0 checks/creates the run directory and prepares the
    data while the others wait, then every rank opens the prepared data and (when resuming) reads the checkpoint.
    """
    dist.init(cfg.train.device)
    check_parallel(cfg, dist.world_size())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    check_run_memory(cfg, device, dist.world_size())
    init_from = cfg.train.init_from
    if init_from is not None and not (resume and has_checkpoint(cfg.out_dir)):
        if not Path(init_from).exists():
            raise ConfigError(f"train.init_from: checkpoint {init_from} does not exist; give a checkpoint path")
        if cfg.train.init_optimizer:
            check_optimizer_source(cfg)
    lock = RunDirLock(cfg.out_dir)  # taken by rank 0 only, inside prepare_run_dir
    run_dir, resuming = dist.main_first(lambda: prepare_run_dir(cfg, resume, overwrite, lock))
    try:
        run = _open_run(cfg, run_dir, resuming, device)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def check_optimizer_source(cfg: RunConfig) -> None:
    """``train.init_optimizer``: refuse, before any compute, a checkpoint whose optimizer state another kind of
    optimizer wrote (as its run directory's config.yaml, beside it, records): one line naming the mismatch."""
    where = Path(cfg.train.init_from)
    saved = read_saved_config(where.parent)
    if saved is None:
        raise ConfigError(f"train.init_optimizer: no config.yaml beside {where} says which optimizer wrote its state; "
                          f"give a checkpoint in a gnlm run directory or set train.init_optimizer=false")
    method, name = saved.get("method"), (saved.get("optim") or {}).get("name")
    if method != "baseline":
        raise ConfigError(f"train.init_optimizer: {where} was written by a method: {method} run, which has no "
                          f"baseline optimizer state; set train.init_optimizer=false")
    if name != cfg.optim.name:
        raise ConfigError(f"train.init_optimizer: the optimizer state in {where} is {name}'s but this run's "
                          f"optimizer is {cfg.optim.name}; use optim.name={name} or set train.init_optimizer=false")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def run_tokenizer(run_dir: str | Path) -> Path | None:
    """The tokenizer a run saved in its directory (tokenizer.json or tokenizer.model), or None."""
    return next((Path(run_dir) / n for n in TOKENIZER_FILES if (Path(run_dir) / n).is_file()), None)


def open_data(cfg: RunConfig, progress: bool = False, run_dir: str | Path | None = None) -> PreparedData:
    """The run's prepared data (tokenized on first use; under torchrun rank 0 prepares it while the others wait),
    checked against the model's vocabulary. ``run_dir``: a run directory holding the run's tokenizer (resume,
    probe), which the data must have been tokenized with (and is tokenized with when prepared again)."""
    tokenizer = run_tokenizer(run_dir) if run_dir is not None else None
    data_dir = dist.main_first(lambda: str(prepare_data(cfg.data, progress=progress and dist.is_main(),
                                                        tokenizer_file=tokenizer).dir))
    data = load_prepared(data_dir)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"raise model.vocab_size or use a smaller tokenizer")
    return data


def train_stream(cfg: RunConfig, data: PreparedData) -> BatchStream:
    """The run's deterministic stream of training batches (this rank's shard of each)."""
    return BatchStream(data.train_tokens(), cfg.data.seq_len, seed=cfg.data.seed + cfg.train.seed,
                       rank=dist.rank(), world_size=dist.world_size())


def build_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The run's model (gnlm's GPT, a Hugging Face causal LM or a user's module, ``model.build_model``),
    initialised from ``train.seed``, on ``device`` in ``train.dtype``."""
    torch.manual_seed(cfg.train.seed)
    model = build_module(cfg.model)
    return model.to(device=device, dtype=getattr(torch, cfg.train.dtype))


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's model state; one ConfigError (naming ``where``) when it does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: the checkpoint does not fit this model ({first}); "
                          f"use a checkpoint of the same model config") from None


def _open_run(cfg: RunConfig, run_dir: Path, resuming: bool, device: torch.device) -> Run:
    data = open_data(cfg, progress=cfg.train.progress, run_dir=run_dir if resuming else None)
    if dist.is_main() and run_tokenizer(run_dir) is None:  # the run keeps its tokenizer (resume and probe use it)
        atomic_write_bytes(run_dir / data.tokenizer_path.name, data.tokenizer_path.read_bytes())
    eval_inputs, eval_targets = eval_set(data, cfg.data.seq_len, cfg.data.eval_sequences, cfg.data.eval_sampling)
    stream = train_stream(cfg, data)
    model = build_model(cfg, device)
    init_optimizer = None
    if cfg.train.init_from is not None and not resuming:
        init = load_checkpoint(cfg.train.init_from, map_location=device, verbose=dist.is_main())
        load_weights(model, init["model"], "train.init_from")
        if cfg.train.init_optimizer:
            if "optimizer" not in init:
                raise ConfigError(f"train.init_optimizer: {cfg.train.init_from} holds no optimizer state; set "
                                  f"train.init_optimizer=false")
            init_optimizer = init["optimizer"]
    checkpoint = (load_checkpoint(run_dir / "checkpoint.pt", map_location=device, verbose=dist.is_main())
                  if resuming else None)
    if checkpoint is not None and checkpoint["state"]["step"] > cfg.train.steps:
        raise ConfigError(f"cannot resume {run_dir}: its checkpoint is at step {checkpoint['state']['step']} but "
                          f"train.steps is {cfg.train.steps}; set train.steps >= {checkpoint['state']['step']}")
    if dist.is_main():
        atomic_write_bytes(run_dir / "config.yaml",
                           yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False).encode())
    run = Run(cfg=cfg, dir=run_dir, data=data, model=model, stream=stream, eval_inputs=eval_inputs,
              eval_targets=eval_targets, device=device, checkpoint=checkpoint, init_optimizer=init_optimizer)
    if dist.is_main():
        run.logger = MetricsLogger(run_dir, cfg, resume_step=checkpoint["state"]["step"] if checkpoint else None)
    dist.barrier()  # no rank starts before rank 0 has trimmed the metrics of a resumed run
    return run


def target_summary(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Add the eval loss with its standard error and the eval set's size and, if a target is set, where it was first
    reached (read back from the metrics)."""
    summary["final_eval_loss"] = run.state.get("eval_loss")
    summary["final_eval_loss_se"] = run.state.get("eval_loss_se")
    summary["eval_sequences"], summary["eval_tokens"] = run.eval_targets.size(0), run.eval_targets.numel()
    target = run.cfg.train.target_loss
    summary["target_loss"] = target
    if target is not None and run.logger is not None:
        run.logger.file.flush()
        for line in run.logger.path.read_text().splitlines():
            row = json.loads(line)
            if row.get("eval_loss") is not None and row["eval_loss"] <= target:
                summary.update(reached_target=True, target_step=row["step"], target_tokens=row["tokens"],
                               target_flops=row.get("flops"),
                               target_wall_time=row.get("wall_time"))
                break
    return summary


