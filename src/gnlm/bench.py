"""Benchmark studies: how many steps each method needs to reach a target validation loss, across batch sizes.

A study is one YAML file (:class:`StudyConfig`). ``gnlm bench STUDY`` expands it into runs (method × batch size ×
learning rate × seed, :func:`expand_runs`), trains a shared AdamW warm start once, runs every run from it
(:func:`run_study`) and writes a results directory::

    study.yaml        the resolved study (a different study in the same directory is refused)
    runs.jsonl        one row per finished run, appended atomically under runs.jsonl.lock (line + flush + fsync)
    locks/            one claim file per run, held while it runs (launch.py): no run runs twice, even from two processes
    slurm/            --launcher slurm: submitit's job folders and logs, jobs.jsonl (run -> Slurm job id)
    warm_start/       the shared AdamW warm start (a normal run directory; every run starts from its checkpoint)
    runs/<method>/b<batch tokens>/lr<lr>/s<seed>/   one run directory each (config, metrics.jsonl, summary.json)
    report.md, *.png  written by ``gnlm report`` (report.py) at the end

Starting the same study again continues it: finished runs are skipped, an unfinished run is resumed from its
checkpoint when it has one and restarted otherwise.

Batch sizes are in tokens. A baseline at batch B takes ``train.batch_size = B / seq_len`` sequences per step; a
Gauss-Newton method takes ``gn.inner_steps = B / (gn.inner_batch_size · seq_len)`` inner steps per outer step,
and its line-search tokens (``gn.ls_batches · gn.inner_batch_size · seq_len`` per outer step; by default another
outer batch of B tokens) come on top and are
reported separately. "Steps" are optimizer steps for baselines and outer steps for GN: what the paper counts.

The analysis of the rows (steps to target, best learning rate, critical batch) is in ``analysis.py``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from filelock import FileLock
from tqdm.auto import tqdm

from gnlm import accounting, launch
from gnlm import distributed as dist
from gnlm.analysis import next_lr, read_rows, selection_key, steps_to, target_crossing, target_key
from gnlm.checkpoint import atomic_write_bytes
from gnlm.config import (
    ConfigError,
    dumps_json,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from gnlm.optim import resolve_optimizer_class
from gnlm.report import write_report
from gnlm.run import BOOKKEEPING_KEYS, RESUMABLE_CHANGES, config_differences, has_checkpoint
from gnlm.runconfig import RunConfig, build_run_config
from gnlm.train import run_training

PRESET_DIR = Path(__file__).parent / "configs"

# Built-in methods: the family (trainer) and the RunConfig keys that define them.
BUILTIN_METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"method": "baseline", "optim": {"name": "adamw"}},
    "muon": {"method": "baseline", "optim": {"name": "muon"}},
    "soap": {"method": "baseline", "optim": {"name": "soap"}},
    "gn": {"method": "gn", "gn": {"surrogate": "gn", "layerwise": False}},
    "gn_prox_linear": {"method": "gn", "gn": {"surrogate": "prox_linear", "layerwise": False}},
    "gn_layerwise": {"method": "gn", "gn": {"surrogate": "gn", "layerwise": True}},
    "gn_layerwise_prox_linear": {"method": "gn", "gn": {"surrogate": "prox_linear", "layerwise": True}},
}
WARM_START_SEED = 10_000  # the warm start reads other batches than the runs (stream seed = data.seed + train.seed)
PLACEMENT_KEYS = {"train.threads", "train.device"}  # where a run runs (launch.Placement), not what it computes


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class MethodConfig:
    """One method of a study.

    ``name``: a built-in method (adamw, muon, soap, gn, gn_prox_linear, gn_layerwise, gn_layerwise_prox_linear) or
    any label together with ``type`` (the built-in it derives from) or ``optimizer`` (the import path of a
    ``torch.optim.Optimizer``, trained like a baseline with ``kwargs``).
    ``lrs``: the learning-rate grid (GN: the inner learning rate ``gn.inner_optim.lr``); ``lrs_by_batch`` replaces
    it at given batch sizes (keys: batch tokens). ``overrides``: dotted RunConfig keys for this method only, e.g.
    ``{gn.warm_start: false, train.eval_every: 1}``.
    ``control_of``: a control of another method (needs the study's ``selection_seed``): no grid of its own, it runs
    the reported seeds at the lr selected for that method, with its ``overrides`` (e.g. no warm-up), and is
    reported apart from the comparison. ``batches``: run this method at these batch sizes only (default: all).
    ``max_steps``: this method's step budget (default: the study's), e.g. fewer outer steps for GN.
    """

    name: str
    type: str | None = None
    optimizer: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    lrs_by_batch: dict[int, list[float]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    control_of: str | None = None
    batches: list[int] | None = None
    max_steps: int | None = None

    @property
    def builtin(self) -> str:
        """The built-in method this entry runs as."""
        if self.optimizer is not None:
            return "adamw"  # a baseline; the optimizer name is replaced below
        return self.type or self.name

    @property
    def family(self) -> str:
        return BUILTIN_METHODS[self.builtin]["method"]

    def grid(self, batch_tokens: int) -> list[float]:
        return list(self.lrs_by_batch.get(batch_tokens, self.lrs))


@dataclass
class WarmStartConfig:
    """The shared AdamW warm start: ``tokens`` tokens at ``batch_tokens`` per step, constant lr ``lr``."""

    tokens: int
    batch_tokens: int
    lr: float = 3e-3
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.batch_tokens < 1 or self.tokens < self.batch_tokens:
            raise ConfigError(f"warm_start.tokens ({self.tokens}) must be >= warm_start.batch_tokens "
                              f"({self.batch_tokens}) >= 1")
        if not self.lr > 0:
            raise ConfigError(f"warm_start.lr must be > 0, got {self.lr}")


@dataclass
class StudyConfig:
    """A benchmark study.

    ``kind``: ``steps_to_target`` (every run stops at its deepest target or after ``max_steps`` steps) or
    ``budget`` (every run trains on ``token_budget`` tokens; what counts is the final validation loss).
    ``targets``: the declared target losses (at least three, so that no single target carries the conclusion) and
    ``primary_target``, one of them, on which learning rates are selected and the critical batch is fitted; steps
    to every target are read off each run's logged curve. ``target_loss: x`` is short for one target x (a quick
    check, not a study to publish). Declare them before running: a results directory refuses a changed study.
    ``lr_budget``: learning-rate search. Each method starts from its declared grid (log-spaced) and, while its best
    lr at a batch size sits on an edge of what was tried, gets the next point beyond that edge (same spacing),
    until it has tried ``lr_budget`` lrs; every method gets the same budget. None: the declared grid only.
    ``selection_seed``: select each (method, batch)'s lr on this seed alone, then run ``seeds`` at the selected lr
    only (so that the selection does not flatter the reported medians). None: every lr runs on every seed and is
    judged by the median over seeds.
    ``prune_lr_search`` (default true): a selection-seed run stops as soon as another lr of its method and batch has
    reached the primary target in fewer steps than it has already run (:class:`LrSearchStop`); the selection and
    every reported run are unchanged, the losing lrs' rows end early (``stopped_early``).
    ``gn_inner_steps``: fix N, the inner steps per outer step, at every batch size (the inner batch grows
    instead: ``gn.inner_batch_size = B / (N · seq_len)``), to separate more data per step from more inner steps.
    ``base``: the RunConfig options shared by every run, written like a ``gnlm train`` YAML file.
    ``critical_fraction``: the critical batch size of a method is the smallest batch B from which on every
    doubling of the batch cuts the steps to target by less than this fraction (see :func:`critical_batch`).
    ``allow_unequal_grids``: by default every method must get the same number of learning rates at each batch size
    (equal tuning effort); set true to allow otherwise.
    ``count_line_search_tokens`` (budget): GN line-search tokens count against the token budget.
    """

    methods: list[MethodConfig]
    batch_tokens: list[int]
    name: str = "study"
    kind: Literal["steps_to_target", "budget"] = "steps_to_target"
    base: dict[str, Any] = field(default_factory=dict)
    warm_start: WarmStartConfig | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    target_loss: float | None = None
    targets: list[float] = field(default_factory=list)
    primary_target: float | None = None
    lr_budget: int | None = None
    selection_seed: int | None = None
    gn_inner_steps: int | None = None
    max_steps: int = 100
    token_budget: int | None = None
    count_line_search_tokens: bool = True
    critical_fraction: float = 0.2
    allow_unequal_grids: bool = False
    prune_lr_search: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("methods is empty; list at least one method, e.g. methods: [{name: adamw, lrs: [3e-3]}]")
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"methods: the name {dup[0]!r} appears twice; give each method entry its own name")
        for m in self.methods:
            _check_method(m)
        if not self.batch_tokens or any(b < 1 for b in self.batch_tokens):
            raise ConfigError(f"batch_tokens must be a non-empty list of positive token counts, got {self.batch_tokens}")
        if len(set(self.batch_tokens)) != len(self.batch_tokens):
            raise ConfigError(f"batch_tokens has duplicates: {self.batch_tokens}")
        self.batch_tokens = sorted(self.batch_tokens)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 < self.critical_fraction < 1.0:
            raise ConfigError(f"critical_fraction must lie in (0, 1) (0.2 = 'less than 20% fewer steps per doubling'), "
                              f"got {self.critical_fraction}")
        if self.kind == "steps_to_target":
            self._check_targets()
        else:
            if self.token_budget is None:
                raise ConfigError("a budget study needs token_budget (tokens per run); set e.g. token_budget: 2000000")
            if self.token_budget < max(self.batch_tokens):
                raise ConfigError(f"token_budget ({self.token_budget}) is smaller than the largest batch "
                                  f"({max(self.batch_tokens)}); raise it")
        if self.selection_seed is not None and self.selection_seed in self.seeds:
            raise ConfigError(f"selection_seed {self.selection_seed} is also in seeds {self.seeds}; report seeds other "
                              f"than the one learning rates are selected on")
        if self.gn_inner_steps is not None and self.gn_inner_steps < 1:
            raise ConfigError(f"gn_inner_steps must be >= 1 (or unset), got {self.gn_inner_steps}")
        self._check_grids()
        if self.lr_budget is not None:
            if self.selection_seed is None:
                raise ConfigError("lr_budget needs selection_seed: the learning-rate search runs on one seed; set e.g. "
                                  "selection_seed: 0 and seeds: [1, 2, 3]")
            self._check_lr_search()

    def _check_targets(self) -> None:
        if self.target_loss is not None and self.targets:
            raise ConfigError("give either target_loss (one target) or targets: [...] with primary_target, not both")
        if self.target_loss is not None:
            self.targets, self.primary_target = [self.target_loss], self.target_loss
            self.target_loss = None
        if not self.targets:
            raise ConfigError("a steps_to_target study needs targets: [...] (at least three, with primary_target) "
                              "or one target_loss; set e.g. targets: [4.6, 4.5, 4.4] and primary_target: 4.5")
        if any(not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)) for t in self.targets):
            raise ConfigError(f"targets must be positive losses, got {self.targets}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets has duplicates: {self.targets}")
        if len(self.targets) == 2:
            raise ConfigError(f"targets: declare at least three target losses (got {self.targets}) so that no single "
                              f"target carries the conclusion, or one target_loss for a quick check")
        self.targets = sorted((float(t) for t in self.targets), reverse=True)
        if self.primary_target is None or float(self.primary_target) not in self.targets:
            raise ConfigError(f"primary_target must be one of targets {self.targets}, got {self.primary_target}")
        self.primary_target = float(self.primary_target)

    @property
    def deepest_target(self) -> float | None:
        """Where the runs of a steps_to_target study stop (the lowest declared target)."""
        return min(self.targets) if self.targets else None

    def _check_lr_search(self) -> None:
        if self.lr_budget < 2:
            raise ConfigError(f"lr_budget must be >= 2 (lrs tried per method and batch size), got {self.lr_budget}")
        for m in [m for m in self.methods if m.control_of is None]:
            for b in self.batch_tokens:
                grid = sorted(m.grid(b))
                if len(grid) > self.lr_budget:
                    raise ConfigError(f"methods.{m.name}: the declared grid at batch {b} has {len(grid)} lrs, more than "
                                      f"lr_budget {self.lr_budget}; shrink the grid or raise the budget")
                lr_ratio(grid, f"methods.{m.name} at batch {b}")

    def _check_controls(self) -> None:
        names = {m.name for m in self.methods if m.control_of is None}
        for m in self.methods:
            if m.batches is not None and not set(m.batches) <= set(self.batch_tokens):
                raise ConfigError(f"methods.{m.name}.batches {m.batches} must be among batch_tokens {self.batch_tokens}")
            if m.control_of is None:
                continue
            if m.control_of not in names:
                raise ConfigError(f"methods.{m.name}.control_of: {m.control_of!r} is not a (non-control) method of the "
                                  f"study; use one of {sorted(names)}")
            if self.selection_seed is None:
                raise ConfigError(f"methods.{m.name}: a control runs at the lr selected for {m.control_of}, which needs "
                                  f"selection_seed; set e.g. selection_seed: 0")
            if m.lrs or m.lrs_by_batch:
                raise ConfigError(f"methods.{m.name}: a control takes the lr selected for {m.control_of}; remove its lrs")

    def methods_at(self, batch: int) -> list[MethodConfig]:
        return [m for m in self.methods if m.batches is None or batch in m.batches]

    def _check_grids(self) -> None:
        self._check_controls()
        for m in [m for m in self.methods if m.control_of is None]:
            for key in m.lrs_by_batch:
                if key not in self.batch_tokens:
                    raise ConfigError(f"methods.{m.name}.lrs_by_batch: {key} is not one of batch_tokens "
                                      f"{self.batch_tokens}")
            for b in self.batch_tokens:
                grid = m.grid(b)
                if not grid:
                    raise ConfigError(f"methods.{m.name}: empty learning-rate grid at batch {b}; "
                                      f"give lrs: [...] (the same number of values for every method)")
                if any(not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)) for lr in grid):
                    raise ConfigError(f"methods.{m.name}: learning rates must be positive numbers, got {grid}")
                if len(set(grid)) != len(grid):
                    raise ConfigError(f"methods.{m.name}: the learning-rate grid at batch {b} has duplicates: {grid}")
        if self.allow_unequal_grids:
            return
        for b in self.batch_tokens:
            sizes = {m.name: len(m.grid(b)) for m in self.methods_at(b) if m.control_of is None}
            if len(set(sizes.values())) > 1:
                listing = ", ".join(f"{k} {v}" for k, v in sizes.items())
                raise ConfigError(f"unequal tuning effort at batch {b}: learning-rate grid sizes {listing}; give every "
                                  f"method the same number of learning rates or set allow_unequal_grids: true")


def lr_ratio(grid: list[float], where: str = "lrs") -> float:
    """The constant ratio between neighbours of a log-spaced learning-rate grid (the lr search's step)."""
    grid = sorted(grid)
    if len(grid) < 2:
        raise ConfigError(f"{where}: an lr search needs a declared grid of at least two log-spaced lrs, got {grid}")
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    if max(ratios) > min(ratios) * 1.2:
        raise ConfigError(f"{where}: the lr grid {grid} is not log-spaced (neighbour ratios {[f'{r:.3g}' for r in ratios]}); "
                          f"use a constant ratio, e.g. [0.001, 0.003, 0.01]")
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _check_method(m: MethodConfig) -> None:
    known = list(BUILTIN_METHODS)
    if m.optimizer is not None:
        if m.type is not None:
            raise ConfigError(f"methods.{m.name}: give either type or optimizer, not both")
        try:
            resolve_optimizer_class(m.optimizer)
        except ConfigError as e:
            raise ConfigError(f"methods.{m.name}.optimizer: {str(e).split(': ', 1)[-1]}") from None
        return
    base = m.type or m.name
    if base not in BUILTIN_METHODS:
        close = difflib.get_close_matches(base, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = f"methods.{m.name}.type" if m.type else "methods"
        raise ConfigError(f"{what}: unknown method {base!r}{hint}; use one of {', '.join(known)}, or give "
                          f"optimizer: <import path> (e.g. torch.optim.SGD)")
    if m.kwargs:
        raise ConfigError(f"methods.{m.name}.kwargs: only for an optimizer given by import path; use overrides "
                          f"(optim.kwargs or gn.inner_optim.kwargs) for built-in methods")


def load_study(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """A study from a YAML file or a packaged preset name (``quick``, ``cpu-full``, ...), then ``a.b=value``
    overrides. ``None`` is the ``quick`` preset."""
    raw = merge(load_yaml(resolve_study_path(path)), parse_overrides(overrides or []))
    return study_from_dict(raw)


# Top-level keys of a `gnlm train` config (RunConfig) that a study never has.
_TRAIN_CONFIG_KEYS = {"method", "out_dir", "model", "data", "optim", "schedule", "train", "gn"}


def study_from_dict(raw: dict[str, Any]) -> StudyConfig:
    raw = dict(raw)
    train_keys = sorted(_TRAIN_CONFIG_KEYS & set(raw))
    if "methods" not in raw and train_keys:
        raise ConfigError(f"this is a gnlm train config (top-level {', '.join(train_keys)}), not a study; run it with "
                          f"gnlm train, or give gnlm bench a study (methods, batch_tokens, base: ...; see the quick "
                          f"preset)")
    if isinstance(raw.get("methods"), list):
        # `- adamw` is short for `- {name: adamw}`
        raw["methods"] = [{"name": m} if isinstance(m, str) else m for m in raw["methods"]]
    return from_dict(StudyConfig, raw)


def preset_names() -> list[str]:
    """The packaged study presets (``train.yaml`` beside them is a ``gnlm train`` config, not a study)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "train")


def resolve_study_path(path: str | Path | None) -> Path:
    if path is None:
        path = "quick"
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{p.name.removesuffix('.yaml')}.yaml"
    if p.parent == Path(".") and preset.is_file():
        return preset
    close = difflib.get_close_matches(str(path), preset_names(), n=1)
    hint = f" (did you mean the preset {close[0]!r}?)" if close else ""
    raise ConfigError(f"study {str(path)!r} is neither a YAML file nor a packaged preset{hint}; presets: "
                      f"{', '.join(preset_names())}")


# ------------------------------------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One run of a study: a method at a batch size, learning rate and seed, with its complete RunConfig."""

    run_id: str
    method: str
    family: str
    batch_tokens: int
    lr: float
    seed: int
    config: dict[str, Any]
    line_search_tokens_per_step: int = 0
    targets: tuple[float, ...] = ()
    prune_against: float | None = None  # a selection-seed run of an lr search: stop it once it cannot be selected

    @property
    def run_dir(self) -> str:
        return self.config["out_dir"]

    def run_config(self) -> RunConfig:
        return build_run_config(self.config)


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"gn.warm_start": False}`` -> ``{"gn": {"warm_start": False}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return merge({}, out)


def _build(raw: dict[str, Any], where: str) -> RunConfig:
    try:
        return build_run_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def warm_start_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / "warm_start" / "checkpoint.pt"


def method_config(study: StudyConfig, m: MethodConfig, batch_tokens: int, lr: float, seed: int,
                  results_dir: str | Path) -> tuple[dict[str, Any], int]:
    """The complete RunConfig dict of one run and its line-search tokens per step."""
    where = f"methods.{m.name} at batch {batch_tokens}"
    raw = merge(study.base, BUILTIN_METHODS[m.builtin])
    if m.optimizer is not None:
        raw = merge(raw, {"optim": {"name": m.optimizer, "kwargs": dict(m.kwargs)}})
    raw = merge(raw, _nest(m.overrides))
    if isinstance(raw.get("model"), str):
        raw["model"] = {"preset": raw["model"]}
    probe = _build(raw, where)
    seq = probe.data.seq_len
    ls_per_step = 0
    if probe.method == "gn":
        if study.gn_inner_steps is not None:  # N fixed: the inner batch grows with the batch
            inner_steps = study.gn_inner_steps
            if batch_tokens % (inner_steps * seq):
                raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of gn_inner_steps × "
                                  f"seq_len = {inner_steps * seq}; choose batch_tokens that are")
            inner_batch = batch_tokens // (inner_steps * seq)
        else:
            inner_batch = probe.gn.inner_batch_size
            if batch_tokens % (inner_batch * seq):
                raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of "
                                  f"gn.inner_batch_size × seq_len = {inner_batch * seq}; choose batch_tokens that are")
            inner_steps = batch_tokens // (inner_batch * seq)
        step_raw = {"gn": {"inner_steps": inner_steps, "inner_batch_size": inner_batch, "inner_optim": {"lr": lr}}}
        ls_batches = inner_steps if probe.gn.ls_batches == "auto" else probe.gn.ls_batches
        ls_per_step = ls_batches * inner_batch * seq if probe.gn.line_search else 0
    else:
        if batch_tokens % seq:
            raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of data.seq_len ({seq})")
        step_raw = {"train": {"batch_size": batch_tokens // seq}, "optim": {"lr": lr}}
    if study.kind == "budget":
        per_step = batch_tokens + (ls_per_step if study.count_line_search_tokens else 0)
        steps, target = max(1, study.token_budget // per_step), None
    else:
        steps, target = m.max_steps or study.max_steps, study.deepest_target
    run_dir = Path(results_dir) / "runs" / m.name / f"b{batch_tokens}" / f"lr{lr:g}" / f"s{seed}"
    train = {"steps": steps, "target_loss": target, "seed": seed, "progress": False,
             "init_from": str(warm_start_path(results_dir)) if study.warm_start else None}
    raw = merge(raw, merge(step_raw, {"train": train, "out_dir": str(run_dir)}))
    cfg = _build(raw, where)
    return to_dict(cfg), ls_per_step


def expand_runs(study: StudyConfig, results_dir: str | Path = "results") -> list[RunSpec]:
    """Every run of the study, in the order they are run: seed, batch size, method, learning rate.

    Builds and checks each run's RunConfig, so a bad method override fails here, before any training."""
    specs = []
    for seed in study.seeds:
        for b in study.batch_tokens:
            for m in study.methods_at(b):
                specs += [_spec(study, m, b, lr, seed, results_dir) for lr in m.grid(b)]
    return specs


def _spec(study: StudyConfig, m: MethodConfig, b: int, lr: float, seed: int, results_dir: str | Path) -> RunSpec:
    cfg, ls = method_config(study, m, b, lr, seed, results_dir)
    prune = (study.prune_lr_search and study.selection_seed is not None and seed == study.selection_seed
             and m.control_of is None and study.kind == "steps_to_target")
    return RunSpec(run_id=f"{m.name}/b{b}/lr{lr:g}/s{seed}", method=m.name, family=m.family, batch_tokens=b,
                   lr=float(lr), seed=seed, config=cfg, line_search_tokens_per_step=ls, targets=tuple(study.targets),
                   prune_against=study.primary_target if prune else None)


@dataclass
class LrSearchStop:
    """Stops a selection-seed run of the learning-rate search as soon as it can no longer be selected: once another
    lr of the same method, batch size and seed has reached the primary target at (interpolated) step c*, a run whose
    evaluation at step k >= c* is still above the target would cross it after k, so later than c* — it cannot be the
    fewest steps (:func:`analysis.selection_key`). The selected lr, the edge extensions (:func:`analysis.next_lr`)
    and every reported seed are the same as without stopping; only the rows of losing lrs end early
    (``stopped_early``). The incumbent is read from runs.jsonl whenever that file changes."""

    rows_path: Path
    run_id: str
    method: str
    batch_tokens: int
    seed: int
    target: float
    _mtime: int = -1
    _best: tuple[float, float | None] = (math.inf, None)

    def __call__(self, st: dict[str, Any]) -> str | None:
        try:
            mtime = os.stat(self.rows_path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            self._mtime = mtime
            cell = [r for r in read_rows(self.rows_path) if r.get("method") == self.method and r.get("seed") == self.seed
                    and r.get("batch_tokens") == self.batch_tokens and r.get("run_id") != self.run_id]
            self._best = min(((steps_to(r, self.target), r["lr"]) for r in cell), default=(math.inf, None))
        step, loss = st["step"], st.get("eval_loss", math.inf)
        best, lr = self._best
        if step >= best and loss > self.target:
            return (f"stopped at step {step}: lr {lr:g} reached the primary target {self.target:g} at step {best:.2f}, "
                    f"so this lr can no longer be selected")
        return None


def plan_runs(study: StudyConfig, results_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[list[RunSpec], bool]:
    """The runs the study needs, given the rows recorded so far, and whether that list is final.

    Without ``selection_seed`` it is :func:`expand_runs` (final). With it, per method and batch size: the declared
    grid on the selection seed, extended by :func:`analysis.next_lr` while ``lr_budget`` allows (each extension
    waits for the rows of the lrs before it), then ``seeds`` at the selected lr (:func:`analysis.selection_key` on
    the primary target). The plan is a function of the rows, so a restarted study plans the same runs."""
    if study.selection_seed is None:
        return expand_runs(study, results_dir), True
    by_id = {r["run_id"]: r for r in rows}
    target = study.primary_target
    specs: list[RunSpec] = []
    final = True
    selected: dict[tuple[str, int], float] = {}
    for b in study.batch_tokens:
        for m in [m for m in study.methods_at(b) if m.control_of is None]:
            lrs = sorted(m.grid(b))
            ratio = lr_ratio(lrs) if study.lr_budget is not None and len(lrs) > 1 else None
            while True:
                cell = [_spec(study, m, b, lr, study.selection_seed, results_dir) for lr in lrs]
                specs += [c for c in cell if c.run_id not in {s.run_id for s in specs}]
                if any(c.run_id not in by_id for c in cell):
                    final = False
                    break
                results = {c.lr: by_id[c.run_id] for c in cell}
                nxt = next_lr(results, ratio, study.lr_budget, target) if ratio is not None else None
                if nxt is None:
                    best = min(lrs, key=lambda lr: (*selection_key(results[lr], target), lr))
                    selected[(m.name, b)] = best
                    specs += [_spec(study, m, b, best, seed, results_dir) for seed in study.seeds]
                    break
                lrs.append(float(f"{nxt:.6g}"))
        for m in [m for m in study.methods_at(b) if m.control_of is not None]:
            lr = selected.get((m.control_of, b))
            if lr is None:
                final = False
            else:
                specs += [_spec(study, m, b, lr, seed, results_dir) for seed in study.seeds]
    return specs, final


def warm_start_config(study: StudyConfig, results_dir: str | Path) -> dict[str, Any]:
    ws = study.warm_start
    assert ws is not None
    raw = merge(study.base, {"method": "baseline", "optim": {"name": "adamw", "lr": ws.lr}})
    raw = merge(raw, _nest(ws.overrides))
    if isinstance(raw.get("model"), str):
        raw["model"] = {"preset": raw["model"]}
    seq = _build(raw, "warm_start").data.seq_len
    if ws.batch_tokens % seq:
        raise ConfigError(f"warm_start.batch_tokens ({ws.batch_tokens}) is not a multiple of data.seq_len ({seq})")
    raw = merge(raw, {"out_dir": str(Path(results_dir) / "warm_start"), "train": {
        "batch_size": ws.batch_tokens // seq, "steps": ws.tokens // ws.batch_tokens, "target_loss": None,
        "eval_every": ws.tokens // ws.batch_tokens,  # only the final loss matters
        "init_from": None, "seed": WARM_START_SEED, "progress": study.progress}})
    return to_dict(_build(raw, "warm_start"))


# ---------------------------------------------------------------------------------------------- results files


def append_row(path: Path, row: dict[str, Any], once: bool = False) -> bool:
    """Append one JSON line durably, under the file's lock (``<path>.lock``; several processes append): a reader
    (or a restarted study) sees whole rows only. ``once``: not when a row of the same run_id is there already.
    Returns whether the row was written."""
    line = dumps_json(row) + "\n"
    with FileLock(str(path) + ".lock"):
        if once and any(r.get("run_id") == row["run_id"] for r in read_rows(path)):
            return False
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    return True


def _repair_rows_file(path: Path) -> None:
    """Drop a torn last line so that new rows start on a line of their own."""
    with FileLock(str(path) + ".lock"):
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            atomic_write_bytes(path, "".join(dumps_json(r) + "\n" for r in read_rows(path)).encode())


def _normalized(d: Any) -> Any:
    return json.loads(json.dumps(d))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(top level)"]


# Options that change how a study runs, never what it measures: the progress display, and stopping lr-search runs
# that can no longer be selected (LrSearchStop: the selected lrs and every reported run are the same either way).
EXECUTION_ONLY_KEYS = ("progress", "prune_lr_search")


def check_results_dir(study: StudyConfig, results_dir: Path) -> None:
    """Refuse a results directory that holds a different study with finished runs (EXECUTION_ONLY_KEYS aside)."""
    saved_path = results_dir / "study.yaml"
    if not saved_path.exists():
        return
    saved, now = _normalized(yaml.safe_load(saved_path.read_text()) or {}), _normalized(to_dict(study))
    for key in EXECUTION_ONLY_KEYS:
        saved.pop(key, None)
        now.pop(key, None)
    diff = _diff_keys(saved, now)
    if not diff:
        return
    if read_rows(results_dir / "runs.jsonl"):
        raise ConfigError(f"results directory {results_dir} holds a different study (differs in {', '.join(diff[:4])});"
                          f" use another results directory (--results DIR) or pass --overwrite to replace it")
    # A different study with no finished run: its partial run directories must not be resumed.
    shutil.rmtree(results_dir / "runs", ignore_errors=True)


def row_from_summary(spec: RunSpec, summary: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    reached = bool(summary.get("reached_target")) and not summary.get("diverged")
    steps = summary.get("target_step") if reached else None
    return {
        "run_id": spec.run_id, "method": spec.method, "family": spec.family, "batch_tokens": spec.batch_tokens,
        "lr": spec.lr, "seed": spec.seed, "status": "finished", "reached": reached,
        "steps": steps,
        "tokens": summary.get("target_tokens") if reached else None,
        "line_search_tokens": steps * spec.line_search_tokens_per_step if reached else None,
        "forward_equivalents": summary.get("target_forward_equivalents") if reached else None,
        "wall_time": summary.get("target_wall_time") if reached else None,
        "final_eval_loss": summary.get("final_eval_loss"), "diverged": bool(summary.get("diverged")),
        "steps_run": summary.get("step"), "tokens_run": summary.get("tokens"),
        "total_wall_time": summary.get("wall_time"), "error": summary.get("message") if summary.get("diverged") else None,
        "diverged_reason": summary.get("diverged_reason") if summary.get("diverged") else None,
        "skipped_steps": summary.get("skipped_steps", 0), "best_eval_loss": summary.get("best_eval_loss"),
        "stopped_early": summary.get("stopped_early"), "run_dir": os.path.relpath(spec.run_dir, results_dir),
        **curve_fields(spec),
    }


CURVE_KEYS = ("step", "eval_loss", "tokens", "flops", "wall_time")


def curve_fields(spec: RunSpec) -> dict[str, Any]:
    """What a study row keeps of the run's metrics, so that runs.jsonl alone recomputes every number: the eval curve
    (columns of the evaluation rows), the crossing of every declared target (:func:`analysis.target_crossing`),
    the FLOPs per step and, for GN, the inner steps per outer step and the line search's η per outer step."""
    path = Path(spec.run_dir) / "metrics.jsonl"
    metrics = read_rows(path) if path.exists() else []
    evals = [r for r in metrics if r.get("eval_loss") is not None]
    out: dict[str, Any] = {
        "curve": {k: [r.get(k) for r in evals] for k in CURVE_KEYS},
        "crossings": {target_key(t): target_crossing(metrics, t) for t in spec.targets},
        "flops_per_step": next((r["flops"] / r["step"] for r in metrics if r.get("flops") and r.get("step")), None),
    }
    if spec.family == "gn":
        out["inner_steps"] = next((r["inner_steps"] for r in metrics if "inner_steps" in r), None)
        out["etas"] = [r["eta"] for r in metrics if "eta" in r]
        out["ls_range"] = spec.config["gn"]["ls_range"]
    return out


def error_row(spec: RunSpec, err: BaseException, results_dir: Path) -> dict[str, Any]:
    first = (str(err).strip().splitlines() or [""])[0]
    return {"run_id": spec.run_id, "method": spec.method, "family": spec.family, "batch_tokens": spec.batch_tokens,
            "lr": spec.lr, "seed": spec.seed, "status": "error", "reached": False, "steps": None, "tokens": None,
            "line_search_tokens": None, "forward_equivalents": None, "wall_time": None, "final_eval_loss": None,
            "diverged": False, "steps_run": None, "tokens_run": None, "total_wall_time": None,
            "error": f"{type(err).__name__}: {first}"[:500], "diverged_reason": None, "skipped_steps": 0,
            "best_eval_loss": None, "run_dir": os.path.relpath(spec.run_dir, results_dir)}


def _run_plan(spec: RunSpec, results_dir: Path) -> tuple[str, Any]:
    """What to do with a run, decided from its directory: ("row", row) when it finished before an interruption
    (its row not yet written), else ("train", resume)."""
    run_dir = Path(spec.run_dir)
    saved_path = run_dir / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
    # Bookkeeping keys (where the directory lives, threads, device, checkpoint cadence: run.BOOKKEEPING_KEYS, a
    # superset of PLACEMENT_KEYS) never make a run directory another run's.
    same = saved is not None and not config_differences(saved, spec.config, BOOKKEEPING_KEYS | PLACEMENT_KEYS)
    if same and (run_dir / "summary.json").exists():
        return "row", row_from_summary(spec, json.loads((run_dir / "summary.json").read_text()), results_dir)
    resumable = saved is not None and not config_differences(saved, spec.config, RESUMABLE_CHANGES | PLACEMENT_KEYS)
    return "train", resumable and has_checkpoint(run_dir)


def execute_run(spec: RunSpec, results_dir: Path) -> dict[str, Any]:
    """Train one run (resuming its checkpoint when there is one) and return its results row; a run that raises
    is recorded as not reached with the error, never propagated (except Ctrl-C). Under torchrun rank 0 reads the
    run directory and every rank trains."""
    try:
        action, value = dist.main_first(lambda: _run_plan(spec, results_dir))
        if action == "row":
            return value
        stop = None if spec.prune_against is None else LrSearchStop(
            results_dir / "runs.jsonl", spec.run_id, spec.method, spec.batch_tokens, spec.seed, spec.prune_against)
        summary = run_training(spec.run_config(), resume=value, overwrite=not value, stop=stop)
        return row_from_summary(spec, summary, results_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing run is a result ("not reached"), not the end of the study
        return error_row(spec, e, results_dir)


def record_run(spec: RunSpec, results_dir: str | Path, placement: launch.Placement | None = None) -> dict[str, Any]:
    """One run as a launcher's task (``launch.py``), in whichever process it lands, holding the run's claim: its
    row when runs.jsonl has one already, else train it (:func:`execute_run`) and append its row. ``placement`` (a
    worker of the local pool): the run's CPU threads and GPU."""
    results_dir = Path(results_dir)
    rows_path = results_dir / "runs.jsonl"
    found = dist.main_first(lambda: next((r for r in read_rows(rows_path) if r.get("run_id") == spec.run_id), None))
    if found is not None:
        return found
    if placement is not None:
        spec = replace(spec, config=merge(spec.config, {"train": placement.train_overrides(spec.config["train"])}))
    row = execute_run(spec, results_dir)
    if dist.is_main():
        append_row(rows_path, row, once=True)
    return row


def run_cost(spec: RunSpec) -> float:
    """A guess of a run's compute (forward-pass equivalents at its full step budget, ``accounting.py``), so that a
    local pool starts the costliest runs first and the study does not end on one long run alone."""
    cfg = spec.config
    tokens = spec.batch_tokens * cfg["train"]["steps"]
    if spec.family != "gn":
        return accounting.baseline_step(tokens)
    gn = cfg["gn"]
    blocks = (len(gn["blocks"]) if gn.get("blocks") else cfg["model"]["n_layers"] + 2) if gn.get("layerwise") else 1
    return accounting.gn_inner_steps(tokens, gn.get("surrogate", "gn"), blocks)


def run_warm_start(study: StudyConfig, results_dir: Path) -> dict[str, Any]:
    """Train (or reuse) the shared warm start; returns its summary."""
    cfg_dict = warm_start_config(study, results_dir)
    wdir = results_dir / "warm_start"

    def plan() -> tuple[dict[str, Any] | None, bool]:
        """(its summary when it finished, whether to resume its checkpoint)."""
        summary_path, saved_path = wdir / "summary.json", wdir / "config.yaml"
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
        if saved is None:
            return None, False
        if (summary_path.exists() and warm_start_path(results_dir).exists()
                and not config_differences(saved, cfg_dict, BOOKKEEPING_KEYS)):
            return json.loads(summary_path.read_text()), False
        return None, has_checkpoint(wdir) and not config_differences(saved, cfg_dict)

    done, resume = dist.main_first(plan)
    if done is not None:
        return done
    ws = study.warm_start
    if dist.is_main():
        how = "resuming its checkpoint" if resume else "training"
        print(f"gnlm bench: warm start ({how}): AdamW lr {ws.lr:g}, {ws.tokens // ws.batch_tokens} steps of "
              f"{ws.batch_tokens:,} tokens -> {wdir}", file=sys.stderr)
    # An interrupted warm start continues from its checkpoint like every run; anything else there is replaced.
    summary = run_training(build_run_config(cfg_dict), resume=resume, overwrite=not resume)
    if summary.get("diverged"):
        raise ConfigError(f"the warm start diverged ({summary.get('message')}); lower warm_start.lr")
    return summary


FAILED_ROWS = "runs.failed.jsonl"


def set_aside_failed_rows(rows_path: Path) -> int:
    """Move the rows with status "error" from runs.jsonl to runs.failed.jsonl (appended: every failure stays on
    record), so that their runs count as not run and run again; returns how many moved. Under runs.jsonl's lock,
    and runs.jsonl is replaced atomically only after the failed rows are safely in runs.failed.jsonl."""
    with FileLock(str(rows_path) + ".lock"):
        rows = read_rows(rows_path)
        failed = [r for r in rows if r.get("status") == "error"]
        if failed:
            with open(rows_path.with_name(FAILED_ROWS), "a") as f:
                f.write("".join(dumps_json(r) + "\n" for r in failed))
                f.flush()
                os.fsync(f.fileno())
            atomic_write_bytes(rows_path, "".join(dumps_json(r) + "\n" for r in rows
                                                  if r.get("status") != "error").encode())
    return len(failed)


def failed_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of runs that failed (status "error"; a diverged run is a result, not a failure)."""
    return [r for r in rows if r.get("status") == "error"]


def _fmt_row(row: dict[str, Any], kind: str) -> str:
    head = f"{row['method']} batch {row['batch_tokens']:,} lr {row['lr']:g} seed {row['seed']}"
    if row["status"] == "error":
        result = f"FAILED ({row['error']})"
    elif row["diverged"]:
        result = f"diverged ({row.get('error') or row.get('diverged_reason') or 'no reason recorded'})"
    elif row.get("skipped_steps") and row.get("skipped_steps") == row.get("steps_run"):
        result = f"every one of its {row['steps_run']} steps was skipped (the model never moved)"
    elif kind == "budget":
        result = f"final eval loss {row['final_eval_loss']:.4f} after {row['steps_run']} steps"
    elif row["reached"]:
        result = f"reached target at step {row['steps']} ({row['tokens']:,} tokens)"
    elif row.get("stopped_early"):
        result = f"lr search: {row['stopped_early']}"
    else:
        loss = row.get("final_eval_loss")
        result = f"not reached in {row['steps_run']} steps (eval loss {loss:.4f})" if loss is not None else "not reached"
    t = row.get("total_wall_time")
    return f"{head}: {result}" + (f" [{t:.1f} s]" if t is not None else "")


def _run_wave(study: StudyConfig, results_dir: Path, launcher: Any, todo: list[RunSpec], bar: Any, finished: int,
              total: int, main: bool) -> bool:
    """Run ``todo`` with the launcher, showing each finished run; returns whether any run was recorded here."""
    rows_path = results_dir / "runs.jsonl"
    by_id = {s.run_id: s for s in todo}
    tasks = [launch.Task(s.run_id, record_run, (s, results_dir), str(launch.lock_path(results_dir, s.run_id)),
                         cost=run_cost(s)) for s in todo]
    progress, left, recorded = launch.Progress(launcher.slots), len(tasks), 0
    for out in launcher.run(tasks):  # each task appends its row itself; here: failures of its process, display
        row = out.result
        if out.task is not None:
            left -= 1
            progress.add(out.seconds)
            if out.error is not None:  # its process died (pool worker, Slurm job): the run failed
                row = error_row(by_id[out.task.key], out.error, results_dir)
                if main:
                    append_row(rows_path, row, once=True)
        bar.set_postfix_str(progress.text(left, launcher.running), refresh=out.task is None)
        if out.task is None or not main:
            continue
        if row is None:
            tqdm.write(f"{out.task.key}: another gnlm bench process on {results_dir} is running it; skipped",
                       file=sys.stderr)
            continue
        finished += 1
        recorded += 1
        bar.update(1)
        line = f"[{finished}/{total}] {_fmt_row(row, study.kind)}"
        if study.progress:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
    return dist.broadcast_object(recorded > 0)


def run_study(study: StudyConfig, results_dir: str | Path, max_runs: int | None = None,
              report: bool = True, launch_cfg: launch.LaunchConfig | None = None,
              retry_failed: bool = False) -> list[dict[str, Any]]:
    """Run (or continue) a study; returns all rows of runs.jsonl. ``max_runs`` stops after that many new runs
    (0: nothing is trained, the warm start neither). ``launch_cfg``: where the runs run (``launch.py``; default: one
    after another in this process). ``retry_failed``: run again the runs recorded with status "error" (their rows
    move to runs.failed.jsonl, see :func:`set_aside_failed_rows`)."""
    results_dir = Path(results_dir)
    specs, _ = plan_runs(study, results_dir, [])  # every config checked before anything is trained or written
    rows_path = results_dir / "runs.jsonl"
    dist.init(str(study.base.get("train", {}).get("device", "auto")))
    launcher = launch.make_launcher(launch_cfg, results_dir, study.name)

    def prepare_results_dir() -> None:
        check_results_dir(study, results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results_dir / "study.yaml", yaml.safe_dump(to_dict(study), sort_keys=False).encode())
        _repair_rows_file(rows_path)
        if retry_failed and (n := set_aside_failed_rows(rows_path)):
            print(f"gnlm bench: --retry-failed: {n} failed run(s) will run again (their rows moved to "
                  f"{rows_path.with_name(FAILED_ROWS)})", file=sys.stderr)

    dist.main_first(prepare_results_dir)  # under torchrun: rank 0 writes the results directory, every rank trains

    if max_runs == 0 and dist.is_main():
        print("gnlm bench: --max-runs 0: nothing is trained (the warm start neither)", file=sys.stderr)
    if study.warm_start is not None and max_runs != 0:  # trained once, before any run (on Slurm as a job of its own)
        ws = launcher.call(launch.Task("warm_start", run_warm_start, (study, results_dir),
                                       str(launch.lock_path(results_dir, "warm_start")), wait=True))
        loss = ws.get("final_eval_loss")
        if study.kind == "steps_to_target" and loss is not None and loss <= max(study.targets):
            raise ConfigError(f"target {max(study.targets)} is already met by the warm start (eval loss {loss:.4f}); "
                              f"declare targets below {loss:.4f}")

    main = dist.is_main()
    finished, started, first_wave = 0, 0, True
    bar = tqdm(total=len(specs), initial=0, unit="run", dynamic_ncols=True, file=sys.stderr,
               disable=not (study.progress and main), desc="study", bar_format=launch.BAR_FORMAT)
    try:
        while True:  # waves: an lr search plans its next runs from the rows of the previous ones
            recorded = dist.main_first(lambda: read_rows(rows_path))
            specs, final = plan_runs(study, results_dir, recorded)
            done = {r["run_id"] for r in recorded}
            todo = [s for s in specs if s.run_id not in done]
            finished = len(specs) - len(todo)
            bar.total, bar.n = len(specs), finished
            bar.refresh()
            if first_wave and main:
                more = "" if final else " so far (the learning-rate search adds runs as results come in)"
                print(f"gnlm bench: study {study.name!r}: {len(specs)} runs{more}, {finished} already finished; "
                      f"results in {results_dir}", file=sys.stderr)
                if launcher.slots > 1:
                    print(f"gnlm bench: {launcher.describe()}", file=sys.stderr)
            first_wave = False
            if max_runs is not None:
                todo = todo[:max(0, max_runs - started)]
            if not todo:
                break
            started += len(todo)
            if not _run_wave(study, results_dir, launcher, todo, bar, finished, len(specs), main):
                break  # every run of the wave was taken by another gnlm bench process: nothing more to plan here
    finally:
        bar.close()
    dist.barrier()
    rows = read_rows(rows_path)
    specs, final = plan_runs(study, results_dir, rows)
    if report and main and final and {s.run_id for s in specs} <= {r["run_id"] for r in rows}:
        path = write_report(results_dir)
        print(f"gnlm bench: report written to {path}", file=sys.stderr)
    return rows
