"""The one config of a run: model, data, optimizer, schedule, training loop and Gauss-Newton options.

``load_run_config(path, overrides)`` reads a YAML file, applies ``a.b=value`` overrides and checks everything
(types, unknown keys, ranges, cross-field constraints) before any data is touched or compute starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gnlm.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from gnlm.data import DataConfig
from gnlm.gauss_newton import GNConfig
from gnlm.model import ModelConfig, resolve_model_config
from gnlm.optim import OptimConfig, ScheduleConfig


@dataclass
class TrainConfig:
    """The training loop. For ``method: gn`` a step is an outer step and ``batch_size`` is not used
    (the outer batch is ``gn.inner_steps × gn.inner_batch_size`` sequences)."""

    steps: int = 200
    batch_size: int = 32
    micro_batch_size: int | None = None
    eval_every: int = 25
    eval_batch_size: int = 32
    target_loss: float | None = None
    ema_decay: float = 0.0
    log_every: int = 1
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 0.0
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
            import torch

            from gnlm.curvature import blocks_from_patterns
            from gnlm.model import GPT

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
    return build_run_config(raw)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return to_dict(cfg)
