"""The one config of a run: model, data, optimizer, schedule, training loop and Gauss-Newton options.

``load_run_config(path, overrides)`` reads a YAML file, applies ``a.b=value`` overrides and checks everything
(types, unknown keys, ranges, cross-field constraints) before any data is touched or compute starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gnlm.config import (
    ConfigError,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from gnlm.curvature import blocks_from_patterns
from gnlm.data import DataConfig
from gnlm.model import GPT, ModelConfig, resolve_model_config
from gnlm.optim import OptimConfig
from gnlm.schedules import InnerScheduleConfig, ScheduleConfig


def _default_inner_optim() -> OptimConfig:
    # The paper's inner optimizer: Muon on hidden matrices + AdamW on the rest, b2 0.999, clip 1.0 per group.
    return OptimConfig(name="muon", lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, clip=1.0, clip_per_group=True)


@dataclass
class GNConfig:
    """Options of ``method: gn``. One outer step = ``inner_steps`` inner steps of ``inner_batch_size`` fresh
    sequences each, then a line search on ``ls_batches`` more fresh batches of ``inner_batch_size`` sequences
    (``auto``: ``inner_steps`` of them, i.e. another full outer batch, as the paper does).

    The line search picks η ∈ {(1/√2)^i : i < ls_range} with the lowest loss and always moves, as the paper does;
    ``line_search_skip: true`` adds η = 0 as a candidate, so a step that lowers the loss for no η is skipped."""

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
    line_search_skip: bool = False
    ls_range: int = 5
    ls_batches: int | Literal["auto"] = "auto"
    cg_iters: int = 20
    cg_damping: float = 1e-3
    checkpoint_every_inner: int = 0

    def validate(self) -> None:
        for name in ("inner_steps", "inner_batch_size", "ls_range", "ls_batches", "cg_iters"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
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

    def line_search_batches(self) -> int:
        """How many batches of ``inner_batch_size`` sequences the line search evaluates (0 without one)."""
        if not self.line_search:
            return 0
        return self.inner_steps if self.ls_batches == "auto" else int(self.ls_batches)


@dataclass
class TrainConfig:
    """The training loop. For ``method: gn`` a step is an outer step and ``batch_size`` is not used
    (the outer batch is ``gn.inner_steps × gn.inner_batch_size`` sequences).

    ``checkpoint_every_seconds``: a checkpoint at least this often (wall clock; 0 = off), so that a long run always
    has one to resume from; checkpoints never change what a run computes.
    Divergence (see ``run.divergence``): a run is diverged when a loss is non-finite, when a loss exceeds
    max(initial eval loss, ln V) + ``divergence_margin`` nats (V = ``model.vocab_size``; ``.inf`` = off), or when
    the eval loss returns to within ``collapse_tolerance`` of ln V (the uniform predictor) after having been below
    it (0 = off)."""

    steps: int = 200
    batch_size: int = 32
    micro_batch_size: int | None = None
    eval_every: int = 25
    eval_batch_size: int = 32
    target_loss: float | None = None
    ema_decay: float = 0.0
    log_every: int = 1
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 600.0
    divergence_margin: float = 3.0
    collapse_tolerance: float = 1e-3
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    init_from: str | None = None
    progress: bool = True
    threads: int | None = None
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gnlm"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
                raise ConfigError(
                    f"train.micro_batch_size ({self.micro_batch_size}) must divide train.batch_size "
                    f"({self.batch_size}); pick a divisor")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.checkpoint_every_seconds < 0:
            raise ConfigError(f"train.checkpoint_every_seconds must be >= 0 (0 = off), "
                              f"got {self.checkpoint_every_seconds}")
        if self.target_loss is not None and self.target_loss <= 0:
            raise ConfigError(f"train.target_loss must be > 0, got {self.target_loss}")
        if not self.divergence_margin > 0:
            raise ConfigError(f"train.divergence_margin must be > 0 nats (.inf = no bound), "
                              f"got {self.divergence_margin}")
        if not 0 <= self.collapse_tolerance < 1:
            raise ConfigError(f"train.collapse_tolerance must be in [0, 1) nats (0 = off), "
                              f"got {self.collapse_tolerance}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {self.threads}")


@dataclass
class RunConfig:
    method: Literal["baseline", "gn"] = "baseline"
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=lambda: resolve_model_config({"preset": "micro"}))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gn: GNConfig = field(default_factory=GNConfig)

    def validate(self) -> None:
        if self.gn.blocks is not None:  # check the partition against the model's parameter names, no compute
            with torch.device("meta"):
                names = [n for n, _ in GPT(self.model).named_parameters()]
            blocks_from_patterns(names, self.gn.blocks)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                f"lower data.seq_len or raise model.max_seq_len")
        if self.data.tokenizer == "bpe" and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(
                f"data.vocab_size ({self.data.vocab_size}) exceeds model.vocab_size ({self.model.vocab_size}); "
                f"lower data.vocab_size or raise model.vocab_size")


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    model_raw = raw.pop("model", {"preset": "micro"})
    if isinstance(model_raw, str):
        model_raw = {"preset": model_raw}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a preset name or a mapping of model options, got {model_raw!r}")
    if "preset" not in model_raw and not any(k != "attention" for k in model_raw):
        model_raw = {"preset": "micro", **model_raw}
    model = resolve_model_config(model_raw)
    cfg = from_dict(RunConfig, {**raw, "model": model})
    return cfg


def load_run_config(path: str | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) -> overrides -> checked RunConfig."""
    # `model=micro` is short for `model.preset=micro`, so it composes with `model.n_layers=2`.
    overrides = [("model.preset=" + o[len("model="):]) if o.startswith("model=") else o for o in overrides or []]
    layers = [base or {}, load_yaml(path) if path is not None else {}, parse_overrides(overrides)]
    raw: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer.get("model"), str):  # `model: micro` is short for `model: {preset: micro}`
            layer = {**layer, "model": {"preset": layer["model"]}}
        raw = merge(raw, layer)
    cfg = build_run_config(raw)
    if cfg.method == "gn":
        _warn_unused_optim(layers[1:])
    return cfg


def _warn_unused_optim(layers: list[dict[str, Any]]) -> None:
    """A warning (one line, not an error) when a GN run is given ``optim.*`` keys: GN's optimizer is the inner one,
    ``gn.inner_optim.*``. Keys count when given on the command line, or in a file that itself says ``method: gn``
    (a file written for baselines may keep its ``optim`` section when ``method=gn`` is given as an override)."""
    file_layer, override_layer = layers
    keys = list(override_layer.get("optim") or {})
    if file_layer.get("method") == "gn":
        keys += [k for k in (file_layer.get("optim") or {}) if k not in keys]
    if keys and os.environ.get("RANK", "0") == "0":
        given = ", ".join(f"optim.{k}" for k in keys)
        print(f"gnlm: warning: method=gn does not read {given}; GN's optimizer is the inner one: set "
              f"gn.inner_optim.{keys[0]} instead", file=sys.stderr)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return to_dict(cfg)
