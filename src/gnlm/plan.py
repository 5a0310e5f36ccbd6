"""Which runs a study needs, given the rows recorded so far (:func:`plan_runs`), and the stop that ends lr-search
runs that can no longer be selected (:class:`LrSearchStop`).

Per method and batch size: the declared learning-rate grid on the selection seed, extended beyond an edge while the
best lr sits on it and ``lr_budget`` allows (``analysis.next_lr``; each extension waits for the rows of the lrs
before it), then the reported ``seeds`` at the selected lr (``analysis.select_lr``); a control runs the reported
seeds at the lr selected for the method it controls. The plan is a function of the rows, so a restarted study
plans the same runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnlm.config import to_dict
from gnlm.results import Row, read_rows
from gnlm.runconfig import RunConfig, build_run_config
from gnlm.selection import next_lr, select_lr, steps_to
from gnlm.study import MethodConfig, StudyConfig, lr_ratio


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
        blocks = (len(gn["blocks"]) if gn.get("blocks") else cfg["model"]["n_layers"] + 2) if gn.get("layerwise") else 1
        return 2.0 * tokens * blocks


def run_spec(study: StudyConfig, m: MethodConfig, batch: int, lr: float, seed: int,
             results_dir: str | Path) -> RunSpec:
    """One run of ``study``, its RunConfig built and checked (a bad method override fails here, before any
    training)."""
    cfg = study.run_config(m, batch, lr, seed, results_dir)
    ls = cfg.gn.line_search_tokens(cfg.data.seq_len) if cfg.method == "gn" else 0
    prune = (study.prune_lr_search and seed == study.selection_seed and m.control_of is None
             and study.kind == "steps_to_target")
    return RunSpec(run_id=f"{m.name}/b{batch}/lr{lr:g}/s{seed}", method=m.name, family=m.family, batch_tokens=batch,
                   lr=float(lr), seed=seed, config=to_dict(cfg), line_search_tokens_per_step=ls,
                   targets=study.crossing_levels, prune_against=study.primary_target if prune else None,
                   hparams={"lr": float(lr)})


def plan_runs(study: StudyConfig, results_dir: str | Path, rows: list[Row]) -> tuple[list[RunSpec], bool]:
    """The runs the study needs, given the rows recorded so far, and whether that list is final (no lr search or
    selection still waits for rows)."""
    by_id = {r.run_id: r for r in rows}
    target = study.primary_target
    specs: list[RunSpec] = []
    final = True
    selected: dict[tuple[str, int], float] = {}
    for b in study.batch_tokens:
        for m in [m for m in study.methods_at(b) if m.control_of is None]:
            lrs = sorted(m.grid(b))
            ratio = lr_ratio(lrs) if study.lr_budget is not None and len(lrs) > 1 else None
            while True:
                cell = [run_spec(study, m, b, lr, study.selection_seed, results_dir) for lr in lrs]
                specs += [c for c in cell if c.run_id not in {s.run_id for s in specs}]
                if any(c.run_id not in by_id for c in cell):
                    final = False
                    break
                results = {c.lr: by_id[c.run_id] for c in cell}
                nxt = next_lr(results, ratio, study.lr_budget, target) if ratio is not None else None
                if nxt is None:
                    best = select_lr(list(results.values()), target)[0]
                    selected[(m.name, b)] = best
                    specs += [run_spec(study, m, b, best, seed, results_dir) for seed in study.seeds]
                    break
                lrs.append(float(f"{nxt:.6g}"))
        for m in [m for m in study.methods_at(b) if m.control_of is not None]:
            lr = selected.get((m.control_of, b))
            if lr is None:
                final = False
            else:
                specs += [run_spec(study, m, b, lr, seed, results_dir) for seed in study.seeds]
    return specs, final


@dataclass
class LrSearchStop:
    """Stops a selection-seed run of the learning-rate search as soon as it can no longer be selected: once another
    lr of the same method, batch size and seed has reached the primary target at (interpolated) step c*, a run whose
    evaluation at step k >= c* is still above the target would cross it after k, so later than c* — it cannot be the
    fewest steps (:func:`analysis.selection_key`). The selected lr, the edge extensions (:func:`analysis.next_lr`)
    and every reported seed are the same as without stopping; only the rows of losing lrs end early
    (``stopped_early``). The incumbent is read from runs.jsonl whenever that file changes."""

    results_dir: Path
    run_id: str
    method: str
    batch_tokens: int
    seed: int
    target: float
    _mtime: int = -1
    _best: tuple[float, float | None] = (math.inf, None)

    def __call__(self, st: dict[str, Any]) -> str | None:
        try:
            mtime = os.stat(Path(self.results_dir) / "runs.jsonl").st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            self._mtime = mtime
            cell = [r for r in read_rows(self.results_dir) if r.method == self.method and r.seed == self.seed
                    and r.batch_tokens == self.batch_tokens and r.run_id != self.run_id]
            self._best = min(((steps_to(r, self.target), r.lr) for r in cell), default=(math.inf, None))
        step, loss = st["step"], st.get("eval_loss", math.inf)
        best, lr = self._best
        if step >= best and loss > self.target:
            return (f"stopped at step {step}: lr {lr:g} reached the primary target {self.target:g} at step {best:.2f}, "
                    f"so this lr can no longer be selected")
        return None
