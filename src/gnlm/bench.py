"""Benchmark studies: how many steps each method needs to reach a target validation loss, across batch sizes.

A study is one YAML file (:class:`StudyConfig`). ``gnlm bench STUDY`` expands it into runs (method × batch size ×
learning rate × seed, :func:`expand_runs`), trains a shared AdamW warm start once, runs every run from it
(:func:`run_study`) and writes a results directory::

    study.yaml        the resolved study (a different study in the same directory is refused)
    runs.jsonl        one row per finished run, appended atomically (line + flush + fsync)
    warm_start/       the shared AdamW warm start (a normal run directory; every run starts from its checkpoint)
    runs/<method>/b<batch tokens>/lr<lr>/s<seed>/   one run directory each (config, metrics.jsonl, summary.json)
    report.md, *.png  written by ``gnlm report`` (report.py) at the end

Starting the same study again continues it: finished runs are skipped, an unfinished run is resumed from its
checkpoint when it has one and restarted otherwise.

Batch sizes are in tokens. A baseline at batch B takes ``train.batch_size = B / seq_len`` sequences per step; a
Gauss-Newton method takes ``gn.inner_steps = B / (gn.inner_batch_size · seq_len)`` inner steps per outer step,
and its line-search tokens (``gn.ls_batches · gn.inner_batch_size · seq_len`` per outer step) come on top and are
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

from gnlm import distributed as dist
from gnlm.analysis import read_rows
from gnlm.checkpoint import atomic_write_bytes
from gnlm.config import (
    ConfigError,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from gnlm.optim import resolve_optimizer_class
from gnlm.report import write_report
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
    """

    name: str
    type: str | None = None
    optimizer: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    lrs_by_batch: dict[int, list[float]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

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

    ``kind``: ``steps_to_target`` (every run stops at ``target_loss`` or after ``max_steps`` steps) or ``budget``
    (every run trains on ``token_budget`` tokens; what counts is the final validation loss).
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
    max_steps: int = 100
    token_budget: int | None = None
    count_line_search_tokens: bool = True
    critical_fraction: float = 0.2
    allow_unequal_grids: bool = False
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
            if self.target_loss is None or not self.target_loss > 0:
                raise ConfigError("a steps_to_target study needs target_loss > 0; set e.g. target_loss: 4.5")
        else:
            if self.token_budget is None:
                raise ConfigError("a budget study needs token_budget (tokens per run); set e.g. token_budget: 2000000")
            if self.token_budget < max(self.batch_tokens):
                raise ConfigError(f"token_budget ({self.token_budget}) is smaller than the largest batch "
                                  f"({max(self.batch_tokens)}); raise it")
        self._check_grids()

    def _check_grids(self) -> None:
        for m in self.methods:
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
            sizes = {m.name: len(m.grid(b)) for m in self.methods}
            if len(set(sizes.values())) > 1:
                listing = ", ".join(f"{k} {v}" for k, v in sizes.items())
                raise ConfigError(f"unequal tuning effort at batch {b}: learning-rate grid sizes {listing}; give every "
                                  f"method the same number of learning rates or set allow_unequal_grids: true")


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


def study_from_dict(raw: dict[str, Any]) -> StudyConfig:
    raw = dict(raw)
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
        per_inner = probe.gn.inner_batch_size * seq
        if batch_tokens % per_inner:
            raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of gn.inner_batch_size "
                              f"× seq_len = {per_inner}; choose batch_tokens that are")
        step_raw = {"gn": {"inner_steps": batch_tokens // per_inner, "inner_optim": {"lr": lr}}}
        ls_per_step = probe.gn.ls_batches * per_inner if probe.gn.line_search else 0
    else:
        if batch_tokens % seq:
            raise ConfigError(f"{where}: the batch ({batch_tokens} tokens) is not a multiple of data.seq_len ({seq})")
        step_raw = {"train": {"batch_size": batch_tokens // seq}, "optim": {"lr": lr}}
    if study.kind == "budget":
        per_step = batch_tokens + (ls_per_step if study.count_line_search_tokens else 0)
        steps, target = max(1, study.token_budget // per_step), None
    else:
        steps, target = study.max_steps, study.target_loss
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
            for m in study.methods:
                for lr in m.grid(b):
                    cfg, ls = method_config(study, m, b, lr, seed, results_dir)
                    specs.append(RunSpec(run_id=f"{m.name}/b{b}/lr{lr:g}/s{seed}", method=m.name, family=m.family,
                                         batch_tokens=b, lr=float(lr), seed=seed, config=cfg,
                                         line_search_tokens_per_step=ls))
    return specs


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


def _finite_or_none(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line durably: a reader (or a restarted study) sees whole rows only."""
    line = json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _repair_rows_file(path: Path) -> None:
    """Drop a torn last line so that new rows start on a line of their own."""
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in read_rows(path)).encode())


def _normalized(d: Any) -> Any:
    return json.loads(json.dumps(d))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(top level)"]


def check_results_dir(study: StudyConfig, results_dir: Path) -> None:
    """Refuse a results directory that holds a different study with finished runs."""
    saved_path = results_dir / "study.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = _diff_keys(_normalized(saved), _normalized(to_dict(study)))
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
        "run_dir": os.path.relpath(spec.run_dir, results_dir),
    }


def error_row(spec: RunSpec, err: BaseException, results_dir: Path) -> dict[str, Any]:
    first = (str(err).strip().splitlines() or [""])[0]
    return {"run_id": spec.run_id, "method": spec.method, "family": spec.family, "batch_tokens": spec.batch_tokens,
            "lr": spec.lr, "seed": spec.seed, "status": "error", "reached": False, "steps": None, "tokens": None,
            "line_search_tokens": None, "forward_equivalents": None, "wall_time": None, "final_eval_loss": None,
            "diverged": False, "steps_run": None, "tokens_run": None, "total_wall_time": None,
            "error": f"{type(err).__name__}: {first}"[:500], "run_dir": os.path.relpath(spec.run_dir, results_dir)}


def _run_plan(spec: RunSpec, results_dir: Path) -> tuple[str, Any]:
    """What to do with a run, decided from its directory: ("row", row) when it finished before an interruption
    (its row not yet written), else ("train", resume)."""
    run_dir = Path(spec.run_dir)
    saved_path = run_dir / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
    same = saved is not None and not _diff_keys(_normalized(saved), _normalized(spec.config))
    if same and (run_dir / "summary.json").exists():
        return "row", row_from_summary(spec, json.loads((run_dir / "summary.json").read_text()), results_dir)
    return "train", same and ((run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists())


def execute_run(spec: RunSpec, results_dir: Path) -> dict[str, Any]:
    """Train one run (resuming its checkpoint when there is one) and return its results row; a run that raises
    is recorded as not reached with the error, never propagated (except Ctrl-C). Under torchrun rank 0 reads the
    run directory and every rank trains."""
    try:
        action, value = dist.main_first(lambda: _run_plan(spec, results_dir))
        if action == "row":
            return value
        summary = run_training(spec.run_config(), resume=value, overwrite=not value)
        return row_from_summary(spec, summary, results_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing run is a result ("not reached"), not the end of the study
        return error_row(spec, e, results_dir)


def run_warm_start(study: StudyConfig, results_dir: Path) -> dict[str, Any]:
    """Train (or reuse) the shared warm start; returns its summary."""
    cfg_dict = warm_start_config(study, results_dir)
    wdir = results_dir / "warm_start"

    def finished() -> dict[str, Any] | None:
        summary_path, saved_path = wdir / "summary.json", wdir / "config.yaml"
        if summary_path.exists() and saved_path.exists() and warm_start_path(results_dir).exists():
            saved = yaml.safe_load(saved_path.read_text())
            if not _diff_keys(_normalized(saved), _normalized(cfg_dict)):
                return json.loads(summary_path.read_text())
        return None

    done = dist.main_first(finished)
    if done is not None:
        return done
    ws = study.warm_start
    if dist.is_main():
        print(f"gnlm bench: warm start: AdamW lr {ws.lr:g}, {ws.tokens // ws.batch_tokens} steps of "
              f"{ws.batch_tokens:,} tokens -> {wdir}", file=sys.stderr)
    summary = run_training(build_run_config(cfg_dict), overwrite=True)
    if summary.get("diverged"):
        raise ConfigError(f"the warm start diverged ({summary.get('message')}); lower warm_start.lr")
    return summary


def _fmt_row(row: dict[str, Any], kind: str) -> str:
    head = f"{row['method']} batch {row['batch_tokens']:,} lr {row['lr']:g} seed {row['seed']}"
    if row["status"] == "error":
        result = f"FAILED ({row['error']})"
    elif row["diverged"]:
        result = "diverged"
    elif kind == "budget":
        result = f"final eval loss {row['final_eval_loss']:.4f} after {row['steps_run']} steps"
    elif row["reached"]:
        result = f"reached target at step {row['steps']} ({row['tokens']:,} tokens)"
    else:
        loss = row.get("final_eval_loss")
        result = f"not reached in {row['steps_run']} steps (eval loss {loss:.4f})" if loss is not None else "not reached"
    t = row.get("total_wall_time")
    return f"{head}: {result}" + (f" [{t:.1f} s]" if t is not None else "")


def run_study(study: StudyConfig, results_dir: str | Path, max_runs: int | None = None,
              report: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) a study; returns all rows of runs.jsonl. ``max_runs`` stops after that many new runs."""
    results_dir = Path(results_dir)
    specs = expand_runs(study, results_dir)  # every config checked before anything is trained or written
    rows_path = results_dir / "runs.jsonl"
    dist.init(str(study.base.get("train", {}).get("device", "auto")))

    def prepare_results_dir() -> None:
        check_results_dir(study, results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results_dir / "study.yaml", yaml.safe_dump(to_dict(study), sort_keys=False).encode())
        _repair_rows_file(rows_path)

    dist.main_first(prepare_results_dir)  # under torchrun: rank 0 writes the results directory, every rank trains

    if study.warm_start is not None:
        ws = run_warm_start(study, results_dir)
        loss = ws.get("final_eval_loss")
        if study.kind == "steps_to_target" and loss is not None and loss <= study.target_loss:
            raise ConfigError(f"target_loss {study.target_loss} is already met by the warm start (eval loss "
                              f"{loss:.4f}); set target_loss below {loss:.4f}")

    done = dist.main_first(lambda: {r["run_id"] for r in read_rows(rows_path)})
    todo = [s for s in specs if s.run_id not in done]
    main = dist.is_main()
    if main:
        print(f"gnlm bench: study {study.name!r}: {len(specs)} runs, {len(specs) - len(todo)} already finished; "
              f"results in {results_dir}", file=sys.stderr)
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="run", dynamic_ncols=True, file=sys.stderr,
               disable=not (study.progress and main), desc="study")
    started = 0
    try:
        for spec in todo:
            if max_runs is not None and started >= max_runs:
                break
            started += 1
            row = execute_run(spec, results_dir)
            if not main:
                continue
            append_row(rows_path, row)
            bar.update(1)
            line = f"[{len(specs) - len(todo) + started}/{len(specs)}] {_fmt_row(row, study.kind)}"
            if study.progress:
                tqdm.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
    finally:
        bar.close()
    dist.barrier()
    rows = read_rows(rows_path)
    if report and main and len({r["run_id"] for r in rows}) >= len(specs):
        path = write_report(results_dir)
        print(f"gnlm bench: report written to {path}", file=sys.stderr)
    return rows
