"""The one config of a run: model, data, optimizer, schedule, training loop and Gauss-Newton options.

``load_run_config(path, overrides)`` reads a YAML file, applies ``a.b=value`` overrides and checks everything
(types, unknown keys, ranges, cross-field constraints) before any data is touched or compute starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from gnlm.config import (
    ConfigError,
    config_differences,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from gnlm.curvature import layerwise_blocks
from gnlm.data import DataConfig
from gnlm.hf import embedding_and_head
from gnlm.model import ModelConfig, model_shapes, resolve_model_config
from gnlm.optim import BUILTIN_OPTIMIZERS, CONSTRUCTOR_FIELDS, OptimConfig
from gnlm.schedules import InnerScheduleConfig, ScheduleConfig


def _default_inner_optim() -> OptimConfig:
    # The paper's inner optimizer: Muon on hidden matrices + AdamW on the rest, b2 0.999, clip 1.0 per group.
    return OptimConfig(name="muon", lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, clip=1.0, clip_per_group=True)


@dataclass
class GNConfig:
    """Options of ``method: gn``. One outer step = ``inner_steps`` inner steps of ``inner_batch_size`` fresh
    sequences each, then a line search on ``line_search_batches`` more fresh batches of ``inner_batch_size``
    sequences (``auto``: ``inner_steps`` of them, i.e. another full outer batch, as the paper does).

    ``damping`` is λ of the damped GN model q(φ) + (λ/2)‖φ − θ₀‖², i.e. (G + λI) for the GN surrogate: the
    proximal term of the first-order inner solve and the damping of the CG solve. Unset, it is the solver's
    default: 0 for ``first_order`` (the paper's surrogate), 1e-3 for ``cg`` (G itself is singular); the resolved
    value (set when the run's config is built, ``RunConfig.validate``) is what a run's config.yaml records.

    The line search picks η ∈ {(1/√2)^i : i < line_search_range} (:meth:`line_search_etas`) with the lowest loss and
    always moves, as the paper does; ``line_search_skip: true`` adds η = 0 as a candidate, so a step that lowers
    the loss for no η is skipped."""

    surrogate: Literal["gn", "prox_linear"] = "gn"
    layerwise: bool = False
    blocks: list[list[str]] | None = None
    solver: Literal["first_order", "cg"] = "first_order"
    inner_steps: int = 32
    inner_batch_size: int = 32
    inner_optim: OptimConfig = field(default_factory=_default_inner_optim)
    inner_schedule: InnerScheduleConfig = field(default_factory=InnerScheduleConfig)
    warm_start: bool = True
    damping: float | None = None
    line_search: bool = True
    line_search_skip: bool = False
    line_search_range: int = 5
    line_search_batches: int | Literal["auto"] = "auto"
    cg_iters: int = 20
    checkpoint_every_inner: int = 0

    # Keys of earlier gnlm versions: a config that uses one is refused with the new name (config.from_dict).
    RENAMED: ClassVar[dict[str, str]] = {"prox": "damping", "cg_damping": "damping",
                                         "ls_range": "line_search_range", "ls_batches": "line_search_batches"}

    def validate(self) -> None:
        for name in ("inner_steps", "inner_batch_size", "line_search_range", "line_search_batches", "cg_iters"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ConfigError(f"gn.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every_inner < 0:
            raise ConfigError(f"gn.checkpoint_every_inner must be >= 0 (0 = off), got {self.checkpoint_every_inner}")
        if self.damping is not None and not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ConfigError(f"gn.damping must be >= 0, got {self.damping}")
        if self.blocks is not None and not self.layerwise:
            raise ConfigError("gn.blocks is set but gn.layerwise is false; set gn.layerwise=true to use the blocks")
        if self.blocks is not None and (not self.blocks or any(not b for b in self.blocks)):
            raise ConfigError("gn.blocks must be a non-empty list of non-empty lists of parameter-name patterns")

    def line_search_etas(self) -> list[float]:
        """The line search's step sizes η ∈ {(1/√2)^i : i < line_search_range}, largest first (the paper's grid)."""
        return [2.0 ** (-i / 2) for i in range(self.line_search_range)]

    def line_search_batch_count(self) -> int:
        """How many batches of ``inner_batch_size`` sequences the line search evaluates (0 without one)."""
        if not self.line_search:
            return 0
        return self.inner_steps if self.line_search_batches == "auto" else int(self.line_search_batches)

    def inner_tokens(self, seq_len: int) -> int:
        """Tokens of one outer step's inner solve (the outer batch): N inner batches."""
        return self.inner_steps * self.inner_batch_size * seq_len

    def line_search_tokens(self, seq_len: int) -> int:
        """Tokens one outer step's line search reads on top of the outer batch."""
        return self.line_search_batch_count() * self.inner_batch_size * seq_len

    def split_batch(self, batch_tokens: int, seq_len: int, inner_steps: int | None = None) -> tuple[int, int]:
        """(inner steps N, inner batch in sequences) of an outer batch of ``batch_tokens`` tokens: N grows with the
        batch at this config's ``inner_batch_size``, or, given ``inner_steps``, N is fixed and the inner batch
        grows instead. A one-line ConfigError when the batch does not split evenly."""
        if inner_steps is not None:
            if batch_tokens % (inner_steps * seq_len):
                raise ConfigError(f"the batch ({batch_tokens} tokens) is not a multiple of gn_inner_steps × seq_len = "
                                  f"{inner_steps * seq_len}; choose batch_tokens that are")
            return inner_steps, batch_tokens // (inner_steps * seq_len)
        per_step = self.inner_batch_size * seq_len
        if batch_tokens % per_step:
            raise ConfigError(f"the batch ({batch_tokens} tokens) is not a multiple of gn.inner_batch_size × seq_len "
                              f"= {per_step}; choose batch_tokens that are")
        return batch_tokens // per_step, self.inner_batch_size


@dataclass
class TrainConfig:
    """The training loop. For ``method: gn`` a step is an outer step and ``batch_size`` is not used
    (the outer batch is ``gn.inner_steps × gn.inner_batch_size`` sequences).

    ``checkpoint_every_seconds``: a checkpoint at least this often (wall clock; 0 = off), so that a long run always
    has one to resume from; checkpoints never change what a run computes.
    Divergence (see ``run.divergence``): a run is diverged when a loss is non-finite, when a loss exceeds
    max(initial eval loss, ln V) + ``divergence_margin`` nats (V = ``model.vocab_size``; ``.inf`` = off), or when
    the eval loss returns to within ``collapse_tolerance`` of ln V (the uniform predictor) after having been below
    it (0 = off).

    Evaluation: every ``eval_every`` steps, or, with ``eval_every_tokens`` set, whenever the run's training tokens
    (the optimizer's batches; GN's line-search tokens not counted, :meth:`RunConfig.batch_tokens`) cross a multiple
    of it (so a small-batch run evaluates every few steps and a large-batch run every step); always after the last
    step. ``init_optimizer``: with ``init_from``, also continue the optimizer state of that checkpoint (its moments
    and step count; the hyperparameters are this run's), for a baseline whose optimizer is the one that wrote it."""

    steps: int = 200
    batch_size: int = 32
    micro_batch_size: int | None = None
    eval_every: int = 25
    eval_every_tokens: int | None = None
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
    init_optimizer: bool = False
    progress: bool = True
    threads: int | None = None
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gnlm"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every_tokens is not None and self.eval_every_tokens < 1:
            raise ConfigError(f"train.eval_every_tokens must be >= 1 (or null: every train.eval_every steps), "
                              f"got {self.eval_every_tokens}")
        if self.init_optimizer and self.init_from is None:
            raise ConfigError("train.init_optimizer needs train.init_from (the checkpoint whose optimizer state the "
                              "run continues); set train.init_from or train.init_optimizer=false")
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
        if self.gn.damping is None:  # the solver's default, recorded as a number in the run's config.yaml
            self.gn.damping = 1e-3 if self.gn.solver == "cg" else 0.0
        model = None
        if self.gn.layerwise or self.model.kind != "gpt":
            model = model_shapes(self.model)
        if self.gn.layerwise:  # the partition against the model's parameter names, before any compute
            layerwise_blocks(model, self.gn.blocks)
        if self.model.kind != "gpt":  # Muon leaves the embeddings and the output layer to AdamW, as for GPT
            default = OptimConfig().adamw_params
            for optim in (self.optim, self.gn.inner_optim):
                if optim.adamw_params == default:
                    optim.adamw_params = embedding_and_head(model)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                f"lower data.seq_len or raise model.max_seq_len")
        if self.data.tokenizer == "bpe" and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(
                f"data.vocab_size ({self.data.vocab_size}) exceeds model.vocab_size ({self.model.vocab_size}); "
                f"lower data.vocab_size or raise model.vocab_size")
        if self.train.init_optimizer and self.method == "gn":
            raise ConfigError("train.init_optimizer continues a baseline optimizer's state; method: gn has none to "
                              "continue (its inner optimizer starts afresh): set train.init_optimizer=false")

    def batch_tokens(self) -> int:
        """Tokens of one step's batch: a baseline's ``train.batch_size`` sequences, GN's outer batch (the inner
        solve's N batches; line-search tokens not counted)."""
        if self.method == "gn":
            return self.gn.inner_tokens(self.data.seq_len)
        return self.train.batch_size * self.data.seq_len


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    raw = _recorded_before_fields_reached_the_class(dict(raw))
    model_raw = raw.pop("model", {"preset": "micro"})
    if isinstance(model_raw, str):
        model_raw = {"preset": model_raw}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a preset name or a mapping of model options, got {model_raw!r}")
    if "preset" not in model_raw and not any(k != "attention" for k in model_raw):
        model_raw = {"preset": "micro", **model_raw}
    model = resolve_model_config(model_raw)
    cfg = from_dict(RunConfig, {**raw, "model": model})
    # An import-path optimizer gets the fields its constructor accepts: fit them to it (config.yaml then records
    # what it received), refusing a set field it does not accept.
    cfg.optim.resolve_for_class(_given(raw.get("optim")), "optim")
    cfg.gn.inner_optim.resolve_for_class(_given((raw.get("gn") or {}).get("inner_optim")), "gn.inner_optim")
    if cfg.method == "gn" and cfg.gn.inner_optim.needs_closure():
        raise ConfigError(f"gn.inner_optim.name: {cfg.gn.inner_optim.name}.step needs a closure, but GN's inner "
                          f"solve gives one surrogate gradient per batch; use an optimizer that steps from p.grad "
                          f"(e.g. muon, adamw)")
    return cfg


def _recorded_before_fields_reached_the_class(raw: dict[str, Any]) -> dict[str, Any]:
    """A run config.yaml written before the optim fields reached an import-path optimizer (it records every field
    and has no data.extensions): that run passed its class lr and kwargs only, so its recorded fields are dropped
    (they become the class's defaults, what it trained with) instead of refused as set."""
    data = raw.get("data")
    if not isinstance(data, dict) or "extensions" in data:
        return raw
    raw = json.loads(json.dumps(raw, default=str))

    def strip(section: Any) -> None:
        if (isinstance(section, dict) and set(CONSTRUCTOR_FIELDS) <= set(section)
                and str(section.get("name", "adamw")).lower() not in BUILTIN_OPTIMIZERS):
            for key in CONSTRUCTOR_FIELDS:
                section.pop(key)

    strip(raw.get("optim"))
    strip((raw.get("gn") or {}).get("inner_optim"))
    return raw


def _given(section: Any) -> set[str]:
    """The keys a config mapping sets (a null counts as unset)."""
    return {k for k, v in section.items() if v is not None} if isinstance(section, dict) else set()


def load_run_config(path: str | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) -> overrides -> checked RunConfig."""
    # `model=micro` is short for `model.preset=micro`, so it composes with `model.n_layers=2`.
    overrides = [("model.preset=" + o[len("model="):]) if o.startswith("model=") else o for o in overrides or []]
    layers = [base or {}, rebase_paths(load_yaml(path), Path(path).parent) if path is not None else {},
              parse_overrides(overrides)]
    raw: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer.get("model"), str):  # `model: micro` is short for `model: {preset: micro}`
            layer = {**layer, "model": {"preset": layer["model"]}}
        raw = merge(raw, layer)
    cfg = build_run_config(raw)
    if cfg.method == "gn":
        _warn_unused_optim(layers[1:])
    return cfg


def rebase_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's relative paths taken from the file's folder (absolute): ``data.paths``, ``data.data_dir``,
    ``data.cache_dir``, a tokenizer or ``data.hf_path`` file there, ``train.init_from`` and a ``model.hf_config``
    file or folder. ``out_dir`` stays relative to the working directory (where runs are written)."""
    folder = Path(folder).resolve()

    def rebased(value: Any, only_existing: bool = False) -> Any:
        if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
            return value
        if only_existing and not (folder / value).exists():
            return value
        return str(folder / value)

    raw = json.loads(json.dumps(raw, default=str))
    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("paths"), list):
            data["paths"] = [rebased(p) for p in data["paths"]]
        for key in ("data_dir", "cache_dir"):
            data[key] = rebased(data.get(key)) if key in data else None
            if data[key] is None:
                del data[key]
        tok = data.get("tokenizer")
        if isinstance(tok, str) and tok != "bpe":
            data["tokenizer"] = rebased(tok, only_existing=not tok.endswith((".json", ".model")))
        if "hf_path" in data:
            data["hf_path"] = rebased(data["hf_path"], only_existing=True)
    train = raw.get("train")
    if isinstance(train, dict) and "init_from" in train:
        train["init_from"] = rebased(train["init_from"])
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("hf_config"), str):
        model["hf_config"] = rebased(model["hf_config"], only_existing=True)
    return raw


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


# ------------------------------------------------------------------------------------------- a run's identity

# Config keys that change neither what a run computes nor where it stops: where the run directory lives (it may
# be moved), where it was initialised from (read once, before its first step), checkpoint cadence, devices, threads
# and logging mirrors.
BOOKKEEPING_KEYS = frozenset({
    "out_dir", "train.init_from", "train.progress", "train.checkpoint_every", "train.checkpoint_every_seconds",
    "train.device", "train.threads", "train.tensorboard", "train.wandb", "train.wandb_project", "train.parallel",
    "gn.checkpoint_every_inner",
})
# Config keys that may change when a run is resumed: the bookkeeping above, and where the run stops and logs.
RESUMABLE_CHANGES = BOOKKEEPING_KEYS | {
    "train.steps", "train.target_loss", "train.log_every", "train.divergence_margin", "train.collapse_tolerance",
}
# Path-valued keys: compared after resolving (./runs/t0, runs/t0 and its absolute path are one directory).
_PATH_KEYS = {"out_dir", "train.init_from", "data.data_dir", "data.cache_dir", "data.paths", "data.tokenizer"}


def _normalized_path(key: str, value: Any) -> Any:
    if key not in _PATH_KEYS:
        return value
    if key == "data.paths" and isinstance(value, list):
        return [os.path.abspath(os.path.expanduser(v)) if isinstance(v, str) else v for v in value]
    if key == "data.tokenizer" and (value == "bpe" or not isinstance(value, str)
                                   or not os.path.exists(os.path.expanduser(value))):
        return value
    if isinstance(value, str) and value:
        return os.path.abspath(os.path.expanduser(value))
    return value


def upgrade_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A run config written by an earlier gnlm (a run directory's config.yaml), brought up to date: renamed keys
    take their new names (``gn.prox`` and ``gn.cg_damping`` become the one ``gn.damping`` of the run's solver) and
    every option it lacks gets its default. A file that no longer builds is returned as it is (it then differs)."""
    raw = json.loads(json.dumps(raw or {}))
    gn = raw.get("gn")
    if isinstance(gn, dict):
        prox, cg_damping = gn.pop("prox", None), gn.pop("cg_damping", None)
        if "damping" not in gn and (prox is not None or cg_damping is not None):
            gn["damping"] = cg_damping if gn.get("solver") == "cg" else prox
        for old, new in GNConfig.RENAMED.items():
            if old in gn:
                gn.setdefault(new, gn.pop(old))
    try:
        return run_config_to_dict(build_run_config(raw))
    except ConfigError:
        return raw


def run_differences(saved: dict[str, Any], now: dict[str, Any], may_continue: bool = False) -> list[str]:
    """Is a run directory's saved config (its config.yaml, from any gnlm version) the run ``now`` describes? The
    dotted keys in which they differ, sorted; none means the same run. Bookkeeping keys never count, nor the ``gn``
    section of two baselines; with ``may_continue`` neither do the keys a resumed run may change (where it stops and
    logs)."""
    saved = upgrade_run_config(saved)
    ignore = RESUMABLE_CHANGES if may_continue else BOOKKEEPING_KEYS
    if saved.get("method") == now.get("method") == "baseline":  # a baseline never reads the gn section
        ignore = ignore | {"gn"}
    return config_differences(saved, now, ignore, _normalized_path)
