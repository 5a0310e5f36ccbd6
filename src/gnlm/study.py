"""A benchmark study's declaration: the YAML file of ``gnlm bench`` (:class:`StudyConfig`), its checks, the
packaged presets, and the complete RunConfig of each of its runs (:meth:`StudyConfig.run_config`).

The protocol (the only one): each method's learning rate is selected at each batch size on ``selection_seed``
(an lr search from a declared log-spaced grid, extended beyond an edge while ``lr_budget`` allows; or, for a
method that declares a ``search`` space, the same number of quasi-random ``trials`` for every method, edge
extensions and an lr refinement within ``search_budget``; see ``plan.py``), then the reported ``seeds`` run at the
selected lr (point). ``kind: steps_to_target`` measures steps to the declared ``targets`` (selection: fewest steps
to ``primary_target``); ``kind: budget`` gives every run the same token budget and measures the final eval loss
(selection: the lowest).

Batch sizes are in tokens. A baseline at batch B takes ``train.batch_size = B / seq_len`` sequences per step; a
Gauss-Newton method takes ``gn.inner_steps = B / (gn.inner_batch_size · seq_len)`` inner steps per outer step
(``GNConfig.split_batch``), and its line-search tokens come on top and are reported separately. "Steps" are
optimizer steps for baselines and outer steps for GN: what the paper counts.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gnlm.config import ConfigError, config_differences, flatten, from_dict, load_yaml, merge, parse_overrides, to_dict
from gnlm.optim import resolve_optimizer_class
from gnlm.runconfig import BOOKKEEPING_KEYS, GNConfig, RunConfig, build_run_config, rebase_paths
from gnlm.search import LR, Dim

PRESET_DIR = Path(__file__).parent / "configs" / "studies"

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
PLACEMENT_KEYS = {"train.threads", "train.device"}  # where a run runs (tasks.Placement), not what it computes
# The base.train keys the warm start shares with the runs (numerics, placement, evaluation batch); the rest of
# base.train describes the runs.
WARM_START_TRAIN_KEYS = ("dtype", "device", "threads", "parallel", "micro_batch_size", "eval_batch_size")
STUDY_SCHEMA = 2  # 2: the warm start takes only base.model, base.data and WARM_START_TRAIN_KEYS from base
# RunConfig keys the study sets for each run (run_config) or that say where a run runs: never searched.
_PER_RUN_KEYS = BOOKKEEPING_KEYS | PLACEMENT_KEYS | {
    "optim.name", "train.batch_size", "train.steps", "train.target_loss", "train.seed", "train.init_optimizer",
    "gn.inner_steps", "gn.inner_batch_size"}


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
    ``search`` (instead of ``lrs``, in a study with ``trials``): the method's search space, one dimension per key:
    ``lr`` (its learning rate, as ``lrs``) and any dotted RunConfig key the method reads (``optim.weight_decay``,
    ``optim.betas.1``: an element of a tuple by index, ``optim.momentum``: Muon's, ``train.ema_decay``,
    ``schedule.warmup_steps``, ``gn.line_search_range``, ``gn.inner_optim.weight_decay``, ...), each
    ``{low, high, log: bool, int: bool}`` or ``{choices: [...]}`` (:class:`search.Dim`). A searched key may not
    also be in ``overrides``.
    ``control_of``: a control of another method: no grid of its own, it runs the reported seeds at the lr (point)
    selected for that method, with its ``overrides`` (e.g. no warm-up; they win over a searched point's settings),
    and is reported apart from the comparison. ``batches``: run this method at these batch sizes only (default: all).
    ``max_steps``: this method's step budget (default: the study's), e.g. fewer outer steps for GN.
    ``max_tokens``: this method's token budget per run (default: the study's): at batch B a run takes at most
    ``max_tokens // B`` steps (B: the batch, GN's outer batch; line-search tokens not counted), so that a large-batch
    trial that never reaches the target does not run ``max_steps`` costly steps.
    ``claim`` and ``expect`` (a study with a ``reference``): a published finding about this method against the
    reference, declared before the runs: ``claim`` its words (and source), ``expect`` what it predicts for the
    method's steps over the reference's: ``more_steps``, ``fewer_steps`` or ``same`` (within the study's
    ``same_within``). The report says whether the measured ratio agrees (:func:`gnlm.stats.verdict`).
    """

    name: str
    type: str | None = None
    optimizer: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    lrs_by_batch: dict[int, list[float]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    control_of: str | None = None
    batches: list[int] | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    claim: str | None = None
    expect: Literal["more_steps", "fewer_steps", "same"] | None = None

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

    def space(self) -> list[Dim]:
        """The dimensions of ``search``, in declared order (empty: an lr grid)."""
        return [Dim.parse(k, spec, f"methods.{self.name}.search.{k}") for k, spec in self.search.items()]


@dataclass
class WarmStartConfig:
    """The shared AdamW warm start: ``tokens`` tokens at ``batch_tokens`` per step, constant lr ``lr``, on the
    study's model and data (:meth:`StudyConfig.warm_start_config`); ``overrides``: dotted RunConfig keys of the warm
    start only. ``load_optimizer_state``: every baseline run whose optimizer is the warm start's (AdamW) continues
    its optimizer state (``train.init_optimizer``) instead of starting a fresh optimizer."""

    tokens: int
    batch_tokens: int
    lr: float = 3e-3
    overrides: dict[str, Any] = field(default_factory=dict)
    load_optimizer_state: bool = False

    def continues_optimizer(self, run: RunConfig) -> bool:
        """Does ``run`` continue the warm start's optimizer state (``train.init_optimizer``)?"""
        warm_optim = _nest(self.overrides).get("optim", {}).get("name", "adamw")
        return self.load_optimizer_state and run.method == "baseline" and run.optim.name == warm_optim

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
    ``trials``, ``refine``, ``search_budget``: the equal-budget search of the methods that declare ``search``
    (every method, unless ``allow_unequal_grids``). At each batch size a method first runs ``trials`` points of its
    space (scrambled Sobol, seeded by method, batch and selection seed: :func:`search.trial_points`); then, while
    the best point's value of a dimension sits on an edge of what was tried (:meth:`search.Dim.edge`: the outer
    1/``trials`` of a range, the outermost choice), one point beyond that edge per such dimension (the best point
    with that value moved one spacing out), each wave waiting for the rows of the last, unless the run config
    refuses the value (a weight decay below 0: the setting's own limit is no edge); then ``refine`` points of the
    best point's lr only, ×√2, ÷√2, ×2, ÷2, ... (:func:`search.refined_lrs`). At most ``search_budget`` runs per
    method and batch (default ``trials + refine``: no extensions), the same for every method.
    ``selection_seed``: each (method, batch)'s lr (or point) is selected on this seed alone (fewest steps to the
    primary target; budget studies: the lowest final eval loss); then ``seeds`` run at the selected lr (point)
    only, so that the selection does not flatter the reported medians.
    ``prune_lr_search`` (default true): a selection-seed run stops as soon as another lr or point of its method and
    batch has reached the primary target in fewer steps than it has already run (:class:`LrSearchStop`); the
    selection and every reported run are unchanged, the losing runs' rows end early (``stopped_early``).
    ``gn_inner_steps``: fix N, the inner steps per outer step, at every batch size (the inner batch grows
    instead: ``gn.inner_batch_size = B / (N · seq_len)``), to separate more data per step from more inner steps.
    ``restart_level``: a loss above every target that each run reaches soon after its restart from the warm start
    (once a fresh optimizer's early rise is behind it); rows record where each run first crosses it, so that steps
    can also be counted from there (what the restart spike costs). None: not recorded.
    ``reference`` (steps-to-target): the method every other method is compared against, as in an ablation study:
    the report gives each method's steps to each target over the reference's at every batch size, with a bootstrap
    interval over seeds (``summary.json`` ``against_reference``). None: no such table.
    ``same_within``: with a reference, a method expected to take the ``same`` steps (``expect``) agrees when the
    ratio's interval lies within [1/(1 + same_within), 1 + same_within] (default 0.1).
    ``base``: the RunConfig options shared by every run, written like a ``gnlm train`` YAML file.
    ``allow_unequal_grids``: by default every method must get the same number of learning rates at each batch size
    and, in a study with ``trials``, declare a ``search`` (equal tuning effort); set true to allow otherwise.
    ``count_line_search_tokens`` (budget): GN line-search tokens count against the token budget.
    ``schema``: the version of the study format, written by gnlm into study.yaml (one without it is schema 1,
    brought up to date by :func:`upgrade_saved_study`); a study you write leaves it out.
    """

    methods: list[MethodConfig]
    batch_tokens: list[int]
    name: str = "study"
    schema: int = STUDY_SCHEMA
    kind: Literal["steps_to_target", "budget"] = "steps_to_target"
    base: dict[str, Any] = field(default_factory=dict)
    warm_start: WarmStartConfig | None = None
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    target_loss: float | None = None
    targets: list[float] = field(default_factory=list)
    primary_target: float | None = None
    restart_level: float | None = None
    reference: str | None = None
    same_within: float = 0.1
    lr_budget: int | None = None
    trials: int | None = None
    refine: int = 2
    search_budget: int | None = None
    selection_seed: int = 0
    gn_inner_steps: int | None = None
    max_steps: int = 100
    max_tokens: int | None = None
    token_budget: int | None = None
    count_line_search_tokens: bool = True
    allow_unequal_grids: bool = False
    prune_lr_search: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.schema != STUDY_SCHEMA:
            raise ConfigError(f"schema: {self.schema} is not the study schema of this gnlm ({STUDY_SCHEMA}); gnlm "
                              f"writes it into study.yaml: leave it out of a study you write")
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
        for where, tokens in [("max_tokens", self.max_tokens)] + [(f"methods.{m.name}.max_tokens", m.max_tokens)
                                                                  for m in self.methods]:
            if tokens is not None and tokens < max(self.batch_tokens):
                raise ConfigError(f"{where} ({tokens}) is smaller than the largest batch ({max(self.batch_tokens)}): a "
                                  f"run could not take one step; raise it")
        if self.kind == "steps_to_target":
            self._check_targets()
        else:
            if self.token_budget is None:
                raise ConfigError("a budget study needs token_budget (tokens per run); set e.g. token_budget: 2000000")
            if self.token_budget < max(self.batch_tokens):
                raise ConfigError(f"token_budget ({self.token_budget}) is smaller than the largest batch "
                                  f"({max(self.batch_tokens)}); raise it")
        if self.selection_seed in self.seeds:
            raise ConfigError(f"selection_seed {self.selection_seed} is also in seeds {self.seeds}; report seeds other "
                              f"than the one learning rates are selected on")
        if self.gn_inner_steps is not None and self.gn_inner_steps < 1:
            raise ConfigError(f"gn_inner_steps must be >= 1 (or unset), got {self.gn_inner_steps}")
        self._check_grids()
        self._check_search()
        if self.lr_budget is not None:
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
            got = "it is not set" if self.primary_target is None else f"got {self.primary_target}"
            raise ConfigError(f"primary_target must be one of targets {self.targets} ({got}); declare it, e.g. "
                              f"primary_target: {self.targets[-1]:g} (the deepest)")
        self.primary_target = float(self.primary_target)
        if self.restart_level is not None and not float(self.restart_level) > max(self.targets):
            raise ConfigError(f"restart_level ({self.restart_level}) must lie above every target ({max(self.targets)}): "
                              f"it is the loss a run gets back to after its restart spike, before any target")

    @property
    def crossing_levels(self) -> tuple[float, ...]:
        """The losses whose first crossing every row records: the declared targets and the restart level."""
        return (*self.targets, *(() if self.restart_level is None else (self.restart_level,)))

    @property
    def deepest_target(self) -> float | None:
        """Where the runs of a steps_to_target study stop (the lowest declared target)."""
        return min(self.targets) if self.targets else None

    def _check_lr_search(self) -> None:
        if self.lr_budget < 2:
            raise ConfigError(f"lr_budget must be >= 2 (lrs tried per method and batch size), got {self.lr_budget}")
        for m in self.grid_methods:
            for b in self.batch_tokens:
                grid = sorted(m.grid(b))
                if len(grid) > self.lr_budget:
                    raise ConfigError(f"methods.{m.name}: the declared grid at batch {b} has {len(grid)} lrs, more than "
                                      f"lr_budget {self.lr_budget}; shrink the grid or raise the budget")
                lr_ratio(grid, f"methods.{m.name} at batch {b}")

    def _check_controls(self) -> None:
        names = {m.name for m in self.methods if m.control_of is None}
        if self.reference is not None and self.reference not in names:
            raise ConfigError(f"reference: {self.reference!r} is not a (non-control) method of the study; use one of "
                              f"{sorted(names)}")
        if self.reference is not None and self.kind != "steps_to_target":
            raise ConfigError("reference: only a steps-to-target study compares its methods with a reference; remove "
                              "it from this budget study")
        if not (math.isfinite(self.same_within) and self.same_within > 0):
            raise ConfigError(f"same_within must be > 0 (a ratio tolerance, e.g. 0.1 for ±10%), got {self.same_within}")
        for m in self.methods:
            if (m.claim is None) != (m.expect is None):
                raise ConfigError(f"methods.{m.name}: declare claim (the finding's words) and expect (more_steps, "
                                  f"fewer_steps or same) together")
            if m.expect is not None and (self.reference is None or m.name == self.reference or m.control_of):
                raise ConfigError(f"methods.{m.name}.expect: a claim compares a method with the study's reference; "
                                  f"declare reference: and put claims on the other methods")
            if m.batches is not None and not set(m.batches) <= set(self.batch_tokens):
                raise ConfigError(f"methods.{m.name}.batches {m.batches} must be among batch_tokens {self.batch_tokens}")
            if m.control_of is None:
                continue
            if m.control_of not in names:
                raise ConfigError(f"methods.{m.name}.control_of: {m.control_of!r} is not a (non-control) method of the "
                                  f"study; use one of {sorted(names)}")
            if m.lrs or m.lrs_by_batch or m.search:
                raise ConfigError(f"methods.{m.name}: a control takes the lr (point) selected for {m.control_of}; "
                                  f"remove its lrs and search")

    @property
    def grid_methods(self) -> list[MethodConfig]:
        """The methods tuned on a learning-rate grid (``lrs``): neither a control nor searched."""
        return [m for m in self.methods if m.control_of is None and not m.search]

    @property
    def runs_per_search(self) -> int:
        """The most selection-seed runs of a searched method at one batch size: ``search_budget``, by default
        ``trials + refine``."""
        assert self.trials is not None
        return self.search_budget if self.search_budget is not None else self.trials + self.refine

    def _check_search(self) -> None:
        """Every searched method's space, before any run: each dimension well formed, each key one the method's
        RunConfig reads and the study does not set per run, and each end of a range (every choice) a value the run
        config accepts."""
        searched = [m for m in self.methods if m.control_of is None and m.search]
        if self.trials is None:
            if searched:
                raise ConfigError(f"methods.{searched[0].name}.search: a search needs trials: N at the study level "
                                  f"(the quasi-random points every method gets per batch size)")
            if self.search_budget is not None:
                raise ConfigError("search_budget: no method declares a search (and trials is unset); remove it")
            return
        if self.trials < 1 or self.refine < 0:
            raise ConfigError(f"trials must be >= 1 and refine >= 0, got trials {self.trials}, refine {self.refine}")
        if self.search_budget is not None and self.search_budget < self.trials + self.refine:
            raise ConfigError(f"search_budget ({self.search_budget}) is below trials + refine ({self.trials} + "
                              f"{self.refine}); raise it (the room beyond is for edge extensions)")
        if self.lr_budget is not None and not self.grid_methods:
            raise ConfigError("lr_budget: no method has an lr grid (every method searches); the search's budget is "
                              "search_budget")
        for m in searched:
            if m.lrs or m.lrs_by_batch:
                raise ConfigError(f"methods.{m.name}: give either lrs or search (whose lr key is the lr), not both")
            dims = m.space()
            if LR not in m.search:
                raise ConfigError(f"methods.{m.name}.search: needs lr: {{low: ..., high: ..., log: true}} (every "
                                  f"method searches its learning rate)")
            flat = flatten(json.loads(json.dumps(to_dict(self.method_run_config(m.name)))))
            for d in dims:
                self._check_search_key(m, d, flat)
            lr_low = next(d for d in dims if d.key == LR).extremes()[0]
            batch = (m.batches or self.batch_tokens)[0]
            self.run_config(m, batch, {LR: lr_low}, self.selection_seed, ".")  # what fails without the search, as is
            for d in dims:
                for value in d.extremes():
                    try:
                        self.run_config(m, batch, {LR: lr_low, d.key: value}, self.selection_seed, ".")
                    except ConfigError as e:
                        raise ConfigError(f"methods.{m.name}.search.{d.key}: the run config refuses {value!r} ({e}); "
                                          f"narrow the range") from None

    def _check_search_key(self, m: MethodConfig, d: Dim, flat: dict[str, Any]) -> None:
        """A one-line ConfigError unless ``d.key`` is a setting of ``m``'s RunConfig that a search may vary."""
        key, where = d.key, f"methods.{m.name}.search.{d.key}"
        if key == LR:
            return
        if key in ("optim.lr", "gn.inner_optim.lr"):
            raise ConfigError(f"{where}: the method's learning rate is the search key lr")
        if key in _PER_RUN_KEYS or key.split(".")[0] in ("method", "model", "data", "out_dir"):
            raise ConfigError(f"{where}: set by the study for each run (or not a training setting); search another key")
        unread = "optim." if m.family == "gn" else "gn."
        if key.startswith(unread):
            fix = "gn.inner_optim.* are its inner optimizer's keys" if m.family == "gn" else "its keys are optim.*"
            raise ConfigError(f"{where}: a {m.family} method never reads {unread}*; {fix}")
        head, _, last = key.rpartition(".")
        indexed = last.isdigit() and isinstance(flat.get(head), list) and int(last) < len(flat[head])
        if not indexed and (key not in flat or isinstance(flat[key], (list, dict))):
            if isinstance(flat.get(key), list):
                raise ConfigError(f"{where}: a list; search one element by its index, e.g. {key}.1")
            close = difflib.get_close_matches(key, list(flat), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key {key!r}{hint}")
        if any(o == key or o.startswith(key + ".") or key.startswith(o + ".") for o in map(str, m.overrides)):
            raise ConfigError(f"{where}: also in methods.{m.name}.overrides; a setting is either searched or fixed")
        current = flat[head][int(last)] if indexed else flat[key]
        whole = d.integer or (d.choices is not None and all(isinstance(c, int) for c in d.choices))
        if isinstance(current, int) and not isinstance(current, bool) and not whole:
            raise ConfigError(f"{where}: {key} is a whole number; add int: true to its range")

    def method(self, name: str) -> MethodConfig:
        return next(m for m in self.methods if m.name == name)

    @property
    def controls(self) -> dict[str, str]:
        """control method -> the method it controls."""
        return {m.name: m.control_of for m in self.methods if m.control_of is not None}

    def _method_raw(self, m: MethodConfig, point: dict[str, Any] | None = None) -> dict[str, Any]:
        """``base``, the method's built-in keys, the searched settings of ``point`` (all but its lr, which
        :meth:`run_config` sets) and the method's overrides, which win (a control's, over the point it runs at)."""
        raw = merge(self.base, BUILTIN_METHODS[m.builtin])
        if m.optimizer is not None:
            raw = merge(raw, {"optim": {"name": m.optimizer, "kwargs": dict(m.kwargs)}})
        settings = {k: v for k, v in (point or {}).items() if k != LR}
        if any(k.rpartition(".")[2].isdigit() for k in settings):  # a tuple element: the rest of its tuple as is
            settings = _with_elements(to_dict(_build(self._method_raw(m), f"methods.{m.name}")), settings)
        raw = merge(raw, _nest(settings))
        raw = merge(raw, _nest(m.overrides))
        if isinstance(raw.get("model"), str):
            raw["model"] = {"preset": raw["model"]}
        return raw

    def method_run_config(self, name: str, point: dict[str, Any] | None = None) -> RunConfig:
        """A method's RunConfig before batch size, lr, seed and step budget are set: ``base`` with the method's
        built-in keys, the searched settings of ``point`` and its overrides (e.g. its ``gn.line_search_range``)."""
        return _build(self._method_raw(self.method(name), point), f"methods.{name}")

    def point_is_valid(self, m: MethodConfig, batch_tokens: int, point: dict[str, Any]) -> bool:
        """Whether the run config of ``m`` at ``point`` passes its checks (an edge extension past a setting's own
        limit, e.g. a weight decay below 0, does not)."""
        try:
            self.run_config(m, batch_tokens, point, self.selection_seed, ".")
        except ConfigError:
            return False
        return True

    def run_config(self, m: MethodConfig, batch_tokens: int, point: dict[str, Any], seed: int,
                   results_dir: str | Path, trial: int | None = None) -> RunConfig:
        """The complete, checked RunConfig of one run at ``point`` (``{"lr": ...}`` and, for a searched method,
        its other settings): ``base``, the method's built-in keys, the point's settings and the overrides, the
        batch (a baseline's ``train.batch_size``; GN's N inner steps of ``gn.inner_batch_size`` sequences, or N
        fixed by ``gn_inner_steps``), the lr, the step budget (budget studies: the token budget over the tokens
        per step, GN's line-search tokens included when ``count_line_search_tokens``), the seed and the run
        directory ``runs/<method>/b<batch>/lr<lr>/s<seed>``, or ``.../t<trial>/s<seed>`` for a searched point."""
        where = f"methods.{m.name} at batch {batch_tokens}"
        lr = point[LR]
        raw = self._method_raw(m, point)
        probe = _build(raw, where)
        seq = probe.data.seq_len
        if probe.method == "gn":
            try:
                inner_steps, inner_batch = probe.gn.split_batch(batch_tokens, seq, self.gn_inner_steps)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            step_raw = {"gn": {"inner_steps": inner_steps, "inner_batch_size": inner_batch, "inner_optim": {"lr": lr}}}
        else:
            if batch_tokens % seq:
                raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of data.seq_len "
                                  f"({seq})")
            step_raw = {"train": {"batch_size": batch_tokens // seq}, "optim": {"lr": lr}}
        raw = merge(raw, step_raw)
        if self.kind == "budget":
            gn = _build(raw, where).gn if probe.method == "gn" else None
            per_step = batch_tokens + (gn.line_search_tokens(seq) if gn and self.count_line_search_tokens else 0)
            steps, target = max(1, self.token_budget // per_step), None
        else:
            steps, target = self.step_budget(m, batch_tokens), self.deepest_target
        leaf = f"lr{lr:g}" if trial is None else f"t{trial}"
        run_dir = Path(results_dir) / "runs" / m.name / f"b{batch_tokens}" / leaf / f"s{seed}"
        train = {"steps": steps, "target_loss": target, "seed": seed, "progress": False,
                 "init_from": str(warm_start_path(results_dir)) if self.warm_start else None,
                 "init_optimizer": self.warm_start is not None and self.warm_start.continues_optimizer(probe)}
        return _build(merge(raw, {"train": train, "out_dir": str(run_dir)}), where)

    def step_budget(self, m: MethodConfig, batch_tokens: int) -> int:
        """The most steps a steps-to-target run of method ``m`` takes at ``batch_tokens``: its (or the study's)
        ``max_steps``, capped by ``max_tokens // batch_tokens`` when a token budget is declared."""
        steps, tokens = m.max_steps or self.max_steps, m.max_tokens or self.max_tokens
        return steps if tokens is None else max(1, min(steps, tokens // batch_tokens))

    def warm_start_config(self, results_dir: str | Path) -> RunConfig:
        """The RunConfig of the shared AdamW warm start (``results_dir/warm_start``): ``base.model``, ``base.data``
        and the ``base.train`` keys of :data:`WARM_START_TRAIN_KEYS`, AdamW at ``warm_start.lr`` with every other
        option at its default (a constant lr, no warm-up), then ``warm_start.overrides``. Nothing else of ``base``
        (the runs' schedule, optimizer, GN settings) reaches it, so studies that differ only in their runs share
        one warm start."""
        ws = self.warm_start
        assert ws is not None
        train = {k: v for k, v in (self.base.get("train") or {}).items() if k in WARM_START_TRAIN_KEYS}
        raw = {**{k: self.base[k] for k in ("model", "data") if k in self.base}, "train": train,
               "method": "baseline", "optim": {"name": "adamw", "lr": ws.lr}}
        raw = merge(raw, _nest(ws.overrides))
        if isinstance(raw.get("model"), str):
            raw["model"] = {"preset": raw["model"]}
        seq = _build(raw, "warm_start").data.seq_len
        if ws.batch_tokens % seq:
            raise ConfigError(f"warm_start.batch_tokens ({ws.batch_tokens}) is not a multiple of data.seq_len ({seq})")
        raw = merge(raw, {"out_dir": str(Path(results_dir) / "warm_start"), "train": {
            "batch_size": ws.batch_tokens // seq, "steps": ws.tokens // ws.batch_tokens, "target_loss": None,
            "eval_every": ws.tokens // ws.batch_tokens, "eval_every_tokens": None,  # only the final loss matters
            "init_from": None, "init_optimizer": False, "seed": WARM_START_SEED, "progress": self.progress}})
        return _build(raw, "warm_start")

    def methods_at(self, batch: int) -> list[MethodConfig]:
        return [m for m in self.methods if m.batches is None or batch in m.batches]

    def _check_grids(self) -> None:
        self._check_controls()
        for m in self.grid_methods:
            for key in m.lrs_by_batch:
                if key not in self.batch_tokens:
                    raise ConfigError(f"methods.{m.name}.lrs_by_batch: {key} is not one of batch_tokens "
                                      f"{self.batch_tokens}")
            for b in self.batch_tokens:
                grid = m.grid(b)
                if not grid:
                    raise ConfigError(f"methods.{m.name}: empty learning-rate grid at batch {b}; give lrs: [...] (the "
                                      f"same number of values for every method) or, with trials, search: {{lr: ...}}")
                if any(not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)) for lr in grid):
                    raise ConfigError(f"methods.{m.name}: learning rates must be positive numbers, got {grid}")
                if len(set(grid)) != len(grid):
                    raise ConfigError(f"methods.{m.name}: the learning-rate grid at batch {b} has duplicates: {grid}")
        if self.allow_unequal_grids:
            return
        searched = [m.name for m in self.methods if m.search and m.control_of is None]
        if self.grid_methods and searched:
            raise ConfigError(f"unequal tuning effort: {searched[0]} searches {self.trials} trials, "
                              f"{self.grid_methods[0].name} a grid of learning rates; give every method a search or "
                              f"set allow_unequal_grids: true")
        for b in self.batch_tokens:
            sizes = {m.name: len(m.grid(b)) for m in self.methods_at(b) if m in self.grid_methods}
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
    """A study from a YAML file or a packaged preset name (``quick``, ``shakespeare-nano``, ...), then ``a.b=value``
    overrides. ``None`` is the ``quick`` preset."""
    file = resolve_study_path(path)
    raw = load_yaml(file)
    if isinstance(raw.get("base"), dict) and file.parent != PRESET_DIR:  # its paths are its folder's
        raw["base"] = rebase_paths(raw["base"], file.parent)
    raw = merge(raw, parse_overrides(overrides or []))
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
    missing = [k for k in ("methods", "batch_tokens") if k not in raw]
    if missing:
        raise ConfigError(f"a study needs methods: [...] and batch_tokens: [...]; this one lacks {' and '.join(missing)} "
                          f"(see the quick preset)")
    if isinstance(raw.get("methods"), list):
        # `- adamw` is short for `- {name: adamw}`
        raw["methods"] = [{"name": m} if isinstance(m, str) else m for m in raw["methods"]]
    return from_dict(StudyConfig, raw)


def preset_names() -> list[str]:
    """The packaged study presets (``configs/studies/*.yaml`` of the package)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


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


def _with_elements(full: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Dotted settings with each tuple element (``optim.betas.1``) written as its whole tuple, the other elements as
    the resolved config ``full`` has them."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        head, _, last = key.rpartition(".")
        if not last.isdigit():
            out[key] = value
            continue
        node: Any = full
        for part in head.split("."):
            node = node[part]
        items = list(out.get(head, node))
        items[int(last)] = value
        out[head] = items
    return out


def _build(raw: dict[str, Any], where: str) -> RunConfig:
    try:
        return build_run_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def warm_start_path(results_dir: str | Path) -> Path:
    """The checkpoint every run of a study starts from."""
    return Path(results_dir) / "warm_start" / "checkpoint.pt"




# ------------------------------------------------------------------------------------------ the same study?

# Options that change how a study runs, never what it measures: the progress display, and stopping lr-search runs
# that can no longer be selected (plan.LrSearchStop: the selected lrs and every reported run are the same either
# way).
EXECUTION_ONLY_KEYS = frozenset({"progress", "prune_lr_search"})
_REMOVED_KEYS = ("critical_fraction",)  # study keys of earlier gnlm versions that no longer mean anything


def _renamed_run_keys(dotted: dict[str, Any]) -> dict[str, Any]:
    """Dotted RunConfig keys (a method's ``overrides``) with renamed GN keys under their new names."""
    out = {}
    for key, value in dotted.items():
        head, _, last = str(key).rpartition(".")
        new = GNConfig.RENAMED.get(last) if head == "gn" else None
        out[f"gn.{new}" if new else key] = value
    return out


def _renamed_nested(raw: Any) -> Any:
    """A nested RunConfig dict (a study's ``base``) with renamed GN keys under their new names."""
    if not isinstance(raw, dict) or not isinstance(raw.get("gn"), dict):
        return raw
    gn = {GNConfig.RENAMED.get(k, k): v for k, v in raw["gn"].items()}
    return {**raw, "gn": gn}


# The train keys the warm start sets itself (StudyConfig.warm_start_config): a schema-1 base never reached them.
_WARM_START_OWN_TRAIN_KEYS = ("batch_size", "steps", "target_loss", "eval_every", "eval_every_tokens", "init_from",
                              "init_optimizer", "seed", "progress")


def _inherited_warm_start_keys(base: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys a schema-1 warm start took from its study's ``base`` that a warm start no longer takes and
    that differ from the value it now uses (the default): its schedule, optimizer settings and other train keys.
    As ``warm_start.overrides`` they keep a schema-1 study's warm start the one it trained. The ``gn`` section never
    mattered (the warm start is a baseline), nor bookkeeping keys or the keys the warm start sets itself."""
    defaults = flatten(json.loads(json.dumps(to_dict(RunConfig()))))
    shared = {*(f"train.{k}" for k in (*WARM_START_TRAIN_KEYS, *_WARM_START_OWN_TRAIN_KEYS)),
              *BOOKKEEPING_KEYS, "method", "optim.name", "optim.lr"}
    return {key: value for key, value in flatten(json.loads(json.dumps(base))).items()
            if key.split(".")[0] not in ("model", "data", "gn") and key not in shared and value != defaults.get(key)}


def upgrade_saved_study(raw: dict[str, Any]) -> StudyConfig:
    """A study.yaml written by any gnlm version, as a StudyConfig of this one: removed keys dropped, renamed run
    keys under their new names, defaults for keys it lacks; a schema-1 study's warm start gets the base keys it
    used to inherit as ``warm_start.overrides`` (:func:`_inherited_warm_start_keys`). A one-line ConfigError when
    it is not a study this gnlm can continue (e.g. one of the earlier protocol without a selection seed)."""
    raw = {k: v for k, v in dict(raw).items() if k not in _REMOVED_KEYS}
    raw["base"] = _renamed_nested(raw.get("base") or {})
    if isinstance(raw.get("warm_start"), dict):
        raw["warm_start"] = {**raw["warm_start"], "overrides": _renamed_run_keys(raw["warm_start"].get("overrides") or {})}
    if raw.get("schema", 1) == 1:  # its warm start took every key of base
        if isinstance(raw.get("warm_start"), dict):
            raw["warm_start"]["overrides"] = {**_inherited_warm_start_keys(raw["base"]),
                                              **raw["warm_start"]["overrides"]}
        raw["schema"] = STUDY_SCHEMA
    if isinstance(raw.get("methods"), list):
        raw["methods"] = [{**m, "overrides": _renamed_run_keys(m.get("overrides") or {})} if isinstance(m, dict) else m
                          for m in raw["methods"]]
    if "selection_seed" in raw and raw["selection_seed"] is None:
        raise ConfigError("it holds a study of an earlier gnlm protocol (no selection_seed: every lr judged by its "
                          "median over seeds); rerun the study in a new results directory")
    return study_from_dict(raw)


def study_differences(saved: dict[str, Any], now: StudyConfig) -> list[str]:
    """The keys in which a results directory's study.yaml (any gnlm version) differs from the study ``now``; none
    means the same study (execution-only options aside)."""
    return config_differences(to_dict(upgrade_saved_study(saved)), to_dict(now), EXECUTION_ONLY_KEYS)
