"""Which runs a study needs, given the rows recorded so far (:func:`plan_runs`), and the stop that ends selection
runs that can no longer be selected (:class:`LrSearchStop`).

Per method and batch size, on the selection seed: an lr grid, extended beyond an edge while the best lr sits on it
and ``lr_budget`` allows (``selection.next_lr``; each extension waits for the rows of the lrs before it); or, for a
method with a ``search`` space, ``trials`` quasi-random points (``search.trial_points``), waves of edge
extensions while the budget allows (``selection.extension_points``), then the lr refinement around the best point
(``selection.refinement_points``). Then the reported ``seeds`` at the selected lr or point
(``selection.best_point``); a control runs the reported seeds at the point selected for the method it controls.
An lr-grid run is ``<method>/b<batch>/lr<lr>/s<seed>``, a searched one ``<method>/b<batch>/t<k>/s<seed>`` (k: the
point's place in the search, trials first). The plan is a function of the rows, so a restarted study plans the
same runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnlm.config import ConfigError, to_dict
from gnlm.curvature import layerwise_blocks
from gnlm.model import ModelConfig, model_shapes
from gnlm.results import Row, read_rows
from gnlm.runconfig import RunConfig, build_run_config
from gnlm.search import LR, search_seed, trial_points
from gnlm.selection import (
    best_point,
    extension_points,
    next_lr,
    point_key,
    point_of,
    refinement_points,
    select_lr,
    steps_to,
)
from gnlm.study import MethodConfig, StudyConfig, lr_ratio

Choice = tuple[dict[str, Any], int | None]  # a selected point and its trial number (None on an lr grid)


@dataclass
class RunSpec:
    """One run of a study: a method at a batch size, point (``hparams``: the lr and any searched settings) and
    seed, with its complete RunConfig."""

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
    hparams: dict[str, Any] = field(default_factory=dict)  # every setting the study chose for this run

    @property
    def run_dir(self) -> str:
        return self.config["out_dir"]

    def run_config(self) -> RunConfig:
        return build_run_config(self.config)

    def cost(self) -> float:
        """A rough relative cost (tokens × steps budget, GN weighted by its linearisation and blocks), so that a
        local pool starts the costliest runs first and a study does not end on one long run alone. Scheduling only:
        what runs cost is measured (FLOPs, time) and reported from the runs themselves."""
        cfg = self.config
        tokens = self.batch_tokens * cfg["train"]["steps"]
        if self.family != "gn":
            return float(tokens)
        gn = cfg["gn"]
        blocks = _block_count(json.dumps(cfg["model"], sort_keys=True), json.dumps(gn.get("blocks"))) \
            if gn.get("layerwise") else 1
        return 2.0 * tokens * blocks


@functools.lru_cache(maxsize=64)
def _block_count(model_json: str, blocks_json: str) -> int:
    """How many layerwise blocks the model of a run has (its shapes only, on the meta device)."""
    return len(layerwise_blocks(model_shapes(ModelConfig(**json.loads(model_json))), json.loads(blocks_json)))


def run_spec(study: StudyConfig, m: MethodConfig, batch: int, point: dict[str, Any], seed: int,
             results_dir: str | Path, trial: int | None = None) -> RunSpec:
    """One run of ``study`` at ``point`` (``trial``: its number in a search), its RunConfig built and checked (a bad
    method override fails here, before any training)."""
    cfg = study.run_config(m, batch, point, seed, results_dir, trial)
    ls = cfg.gn.line_search_tokens(cfg.data.seq_len) if cfg.method == "gn" else 0
    prune = (study.prune_lr_search and seed == study.selection_seed and m.control_of is None
             and study.kind == "steps_to_target")
    leaf = f"lr{point[LR]:g}" if trial is None else f"t{trial}"
    # a control's overrides replace the settings of the point it runs at
    hparams = {k: m.overrides.get(k, v) for k, v in {**point, LR: float(point[LR])}.items()}
    return RunSpec(run_id=f"{m.name}/b{batch}/{leaf}/s{seed}", method=m.name, family=m.family, batch_tokens=batch,
                   lr=float(point[LR]), seed=seed, config=to_dict(cfg), line_search_tokens_per_step=ls,
                   targets=study.crossing_levels, prune_against=study.primary_target if prune else None,
                   hparams=hparams)


def _lr_search(study: StudyConfig, m: MethodConfig, batch: int, by_id: dict[str, Row],
               results_dir: str | Path) -> tuple[list[RunSpec], Choice | None]:
    """The selection runs of an lr grid so far, and the selected lr once no run or extension waits."""
    lrs = sorted(m.grid(batch))
    ratio = lr_ratio(lrs) if study.lr_budget is not None and len(lrs) > 1 else None
    while True:
        cell = [run_spec(study, m, batch, {LR: lr}, study.selection_seed, results_dir) for lr in lrs]
        if any(c.run_id not in by_id for c in cell):
            return cell, None
        results = {c.lr: by_id[c.run_id] for c in cell}
        nxt = next_lr(results, ratio, study.lr_budget, study.primary_target) if ratio is not None else None
        if nxt is None:
            return cell, ({LR: select_lr(list(results.values()), study.primary_target)[0]}, None)
        lrs.append(float(f"{nxt:.6g}"))


def _search(study: StudyConfig, m: MethodConfig, batch: int, by_id: dict[str, Row],
            results_dir: str | Path) -> tuple[list[RunSpec], Choice | None]:
    """The selection runs of a search so far (trials, edge extensions, then the lr refinement, within
    ``study.runs_per_search``), and the selected point once no run or next point waits. Each next point is planned
    from finished rows only: a failed run holds its cell's search until ``--retry-failed`` runs it again, so that a
    trial number always names one point (a row at another point than planned is refused)."""
    points = trial_points(m.space(), study.trials, search_seed(m.name, batch, study.selection_seed))
    budget, refined = study.runs_per_search, False
    while True:
        cell = [run_spec(study, m, batch, p, study.selection_seed, results_dir, k) for k, p in enumerate(points)]
        if any(c.run_id not in by_id or by_id[c.run_id].failed for c in cell):
            return cell, None
        rows = [by_id[c.run_id] for c in cell]
        for c, r in zip(cell, rows):
            if point_key(point_of(r)) != point_key(c.hparams):
                raise ConfigError(f"runs.jsonl: {c.run_id} ran at {point_of(r)}, not at the point the search plans "
                                  f"there ({c.hparams}): its rows were edited; restore runs.jsonl or rerun the study "
                                  f"in a new results directory")
        new = [] if refined else extension_points(study, m, batch, rows, budget - study.refine - len(points))
        if not new and not refined:
            new, refined = refinement_points(study, rows)[:budget - len(points)], True
        if not new:
            k = [point_key(point_of(r)) for r in rows].index(point_key(best_point(rows, study.primary_target)))
            return cell, (points[k], k)
        points += new


def plan_runs(study: StudyConfig, results_dir: str | Path, rows: list[Row]) -> tuple[list[RunSpec], bool]:
    """The runs the study needs, given the rows recorded so far, and whether that list is final (no lr search,
    search or selection still waits for rows)."""
    by_id = {r.run_id: r for r in rows}
    specs: list[RunSpec] = []
    final = True
    selected: dict[tuple[str, int], Choice] = {}
    for b in study.batch_tokens:
        for m in [m for m in study.methods_at(b) if m.control_of is None]:
            cell, choice = (_search if m.search else _lr_search)(study, m, b, by_id, results_dir)
            specs += cell
            if choice is None:
                final = False
                continue
            selected[(m.name, b)] = choice
            specs += [run_spec(study, m, b, choice[0], seed, results_dir, choice[1]) for seed in study.seeds]
        for m in [m for m in study.methods_at(b) if m.control_of is not None]:
            choice = selected.get((m.control_of, b))
            if choice is None:
                final = False
            else:
                specs += [run_spec(study, m, b, choice[0], seed, results_dir, choice[1]) for seed in study.seeds]
    return specs, final


def most_runs(study: StudyConfig) -> int:
    """The most runs :func:`plan_runs` can ever hold for ``study``: per method and batch size, its selection runs at
    most (a search's ``runs_per_search``; an lr grid's lrs, or ``lr_budget`` when it may extend) and the reported
    seeds; a control, the reported seeds. How long a study can still take follows from this, not from the runs
    planned so far (a search plans its next runs from the rows of the last)."""
    total = 0
    for b in study.batch_tokens:
        for m in study.methods_at(b):
            if m.control_of is None:
                total += study.runs_per_search if m.search else max(len(m.grid(b)), study.lr_budget or 0)
            total += len(study.seeds)
    return total


@dataclass
class LrSearchStop:
    """Stops a selection-seed run (of an lr grid or a search) as soon as it can no longer be selected: once another
    run of the same method, batch size and seed has reached the primary target at (interpolated) step c*, a run
    whose evaluation at step k >= c* is still above the target would cross it after k, so later than c* — it cannot
    be the fewest steps (:func:`selection.selection_key`). The selected point, the edge extensions and refinement
    (which follow from the best point alone) and every reported seed are the same as without stopping; only the
    rows of losing points end early (``stopped_early``). The incumbent is read from runs.jsonl whenever that file
    changes."""

    results_dir: Path
    run_id: str
    method: str
    batch_tokens: int
    seed: int
    target: float
    _mtime: int = -1
    _best: tuple[float, str | None] = (math.inf, None)

    def __call__(self, st: dict[str, Any]) -> str | None:
        try:
            mtime = os.stat(Path(self.results_dir) / "runs.jsonl").st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            self._mtime = mtime
            cell = [r for r in read_rows(self.results_dir) if r.method == self.method and r.seed == self.seed
                    and r.batch_tokens == self.batch_tokens and r.run_id != self.run_id]
            self._best = min(((steps_to(r, self.target), _describe(point_of(r))) for r in cell),
                             default=(math.inf, None))
        step, loss = st["step"], st.get("eval_loss", math.inf)
        best, point = self._best
        if step >= best and loss > self.target:
            return (f"stopped at step {step}: {point} reached the primary target {self.target:g} at step {best:.2f}, "
                    f"so this run can no longer be selected")
        return None


def _describe(point: dict[str, Any]) -> str:
    """``lr 0.01, optim.weight_decay 0.1``."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())
