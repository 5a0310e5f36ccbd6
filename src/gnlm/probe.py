r"""``gnlm probe``: how far is an optimizer's step from the Gauss-Newton step? (design.md; issue 10)

The measure (direction efficiency ρ, step efficiency, the references d*, layerwise GN step and gradient, and the
estimate of gᵀM⁻¹g with its error bound) is :mod:`gnlm.oracle`. This module is the job around it: where the
checkpoint and the learning rates come from (a run, a checkpoint, a study or every checkpoint of a run), the
optimizers' steps and the real-loss curves; the table and figure are :mod:`gnlm.probe_report`. The layerwise
reference uses the run's partition (``gn.blocks``, default the paper's, :func:`gnlm.curvature.layerwise_blocks`).

Optimizer steps. Each optimizer is built with :func:`gnlm.optim.build_optimizer` (the paper's Muon/AdamW routing,
clipping as in the baseline trainer) at the checkpoint's parameters θ₀ and takes ``warmup_steps`` steps on the
training stream (from the checkpoint's stream position) to build its state. The parameters are then put back to
θ₀, the state is kept: every optimizer and every reference is scored at the same θ₀ on the same batches, so the
numbers compare directions and nothing else. For each probe batch the optimizer starts from that same state and
takes one step with the batch's gradient g: d = θ_after − θ₀.

Real loss. On a second fresh batch per probe batch, ℓ(θ₀ + η d) − ℓ(θ₀) for η on the line search's grid
(:meth:`gnlm.runconfig.GNConfig.line_search_etas`, ``gn.line_search_range`` of the run), next to the GN model's
prediction q(η d) from the probe batch. Every direction is taken at the scale it is reported at: an optimizer's
actual step, d* and the layerwise step at their natural scale (what the GN trainer line-searches), the gradient at α.

The oracle (issue 17). d* is the exact GN step over the whole probe batch (``--batch-tokens``, the tokens of one
training step), solved in micro-batches of the GN trainer's ``gn.inner_batch_size`` sequences (the mean of their
GN matrices is the batch's), over a log grid of λ from the largest down (:func:`gnlm.oracle.sweep_dampings`, CG
warm-started from the previous λ). λ* is the λ whose d* lowers the real loss on the fresh batches most at its best η
(mean curve over the probe batches): the damping at which the oracle is a step worth taking. The sweep stops at the
first λ whose d* does worse there than a larger λ's that lowers the real loss (smaller λ cost the most CG iterations
and, the real decrease being unimodal in λ in every probe we ran, would not win); ``--full-sweep`` solves them all.
Every headline number is at λ*; ρ(λ) of every direction is in ``by_damping`` and the figure; when no λ lowers the
real loss at any η, a warning says so.
``--damping`` fixes λ instead. Beside ρ, each direction's best real decrease as a fraction of the oracle's at λ*
(``real_loss_fraction``).

Data parallel (torchrun): every rank holds θ₀ and a shard of every batch; gradients, GGN-vector products (CG's
``reduce``) and losses are averaged over the ranks, so every rank scores the same directions; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gnlm import distributed as dist
from gnlm.checkpoint import atomic_write_bytes, load_checkpoint, output_dir
from gnlm.config import ConfigError, dumps_json, to_dict
from gnlm.curvature import layerwise_blocks
from gnlm.model import loss_fn
from gnlm.optim import optimizer_step
from gnlm.oracle import REFERENCES, loss_along, step_direction, sweep_dampings
from gnlm.probe_inputs import (
    ProbeOptimizer,
    check_checkpoints,
    check_optimizer,
    load_config,
    load_study,
    parse_list,
    parse_sets,
    probe_optimizers,
    resolve_source,
)
from gnlm.probe_report import LABELS, markdown, no_help, plot
from gnlm.resources import check_memory, resolve_device
from gnlm.run import build_model, load_weights, open_data, train_stream
from gnlm.runconfig import RunConfig
from gnlm.train import baseline_optimizer, scheduled_lr

__all__ = ["run_probe", "markdown", "add_probe_arguments", "cmd_probe"]

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------------------------------
# the whole job


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _summarize(per_batch: list[dict[str, float]], curves: list[list[float]],
               predicted: list[list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("rho", "step_efficiency", "best_scale"):
        out[key], out[f"{key}_std"] = _stats([s[key] for s in per_batch])
    out["step_norm"] = statistics.fmean(s["norm"] for s in per_batch)
    out["per_batch"] = {k: [s[k] for s in per_batch] for k in per_batch[0]}
    out["real_loss_change"] = [statistics.fmean(c) for c in zip(*curves)]
    out["predicted_loss_change"] = [statistics.fmean(c) for c in zip(*predicted)]
    out["real_loss_change_per_batch"] = curves
    return out


def _hyper(value: Any) -> Any:
    """A hyperparameter of a param group as JSON (tensors as numbers, callables by name)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_hyper(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return getattr(value, "__name__", repr(value))


def param_group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """What a built optimizer holds per param group (its constructor's arguments and defaults, the lr as set):
    every key but ``params``, with the group's parameter count."""
    return [{"params": len(g["params"]), **{k: _hyper(v) for k, v in g.items() if k != "params"}}
            for g in optimizer.param_groups]


def _settings(po: ProbeOptimizer, groups: list[dict[str, Any]], start: int, warm: int, lr: float,
              continued: bool) -> dict[str, Any]:
    """Every setting an optimizer of the probe was built and stepped with (probe.json ``settings``)."""
    return {"source": po.settings_source, "optim": to_dict(po.cfg.optim), "schedule": to_dict(po.cfg.schedule),
            "train_steps": po.cfg.train.steps, "first_warmup_update": start, "probe_update": start + warm,
            "lr_at_probe_step": lr,
            "state": ("the checkpoint's optimizer state, continued" if continued else "fresh")
            + f", then {warm} warm-up steps",
            "param_groups": groups}


Micro = list[tuple[Tensor, Tensor]]  # one batch as equal micro-batches


def _warm_optimizers(params: Params, theta0: Params, opts: dict[str, ProbeOptimizer], warm: list[Micro],
                     saved_optimizer: dict[str, Any] | None, ckpt_path: Path, step: int | None,
                     loss_grad: Callable[[Micro], Params]) -> tuple[dict[str, tuple[Any, dict]], dict[str, Any]]:
    """Each optimizer built as ``gnlm train`` builds it (continuing the checkpoint's state when asked), stepped along
    the ``warm`` batches of the training stream, the parameters put back at θ₀ after each; returns per optimizer
    (the optimizer, a snapshot of its state for the probe step) and its settings (probe.json ``settings``)."""
    optimizers: dict[str, tuple[Any, dict]] = {}
    settings: dict[str, Any] = {}
    for name, po in opts.items():
        saved = saved_optimizer if po.continue_state else None
        opt = baseline_optimizer(params, po.cfg, saved, ckpt_path)
        groups = param_group_settings(opt)  # what it was built with, before any step
        start = po.start_step if po.start_step is not None else step or 0
        for i, mbs in enumerate(warm):
            scheduled_lr(opt, po.cfg, start + i)
            grads = loss_grad(mbs)
            for n, p in params.items():
                p.grad = grads[n]
            optimizer_step(opt, po.cfg.optim.clip, per_group=po.cfg.optim.clip_per_group)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n])
        lr = scheduled_lr(opt, po.cfg, start + len(warm))  # the probe step: update number start + warm-up steps
        optimizers[name] = (opt, copy.deepcopy(opt.state_dict()))
        settings[name] = _settings(po, groups, start, len(warm), lr, saved is not None)
    return optimizers, settings


@dataclass
class _Sweep:
    """What the damping sweep of one checkpoint measured. ``lams``: the dampings solved (ascending); ``scores[λ][n]``:
    per probe batch, the scores of direction ``n`` against the references at λ; ``real[key]``: per probe batch, the
    real loss change along the line-search η grid of an optimizer (key: its name) or a reference at λ (key:
    (reference, λ)); ``oracle[λ]``: GN's mean real-loss curve at λ; ``solves[λ]``: per probe batch, the solves'
    diagnostics; ``loss``, ``real_loss_base``: per probe batch, the loss at θ₀ and on the fresh batch."""

    lams: list[float]
    scores: dict[float, dict[str, list[dict[str, float]]]]
    real: dict[Any, list[list[float]]]
    oracle: dict[float, list[float]]
    solves: dict[float, dict[str, list[Any]]]
    loss: list[float]
    real_loss_base: list[float]


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.fmean(c) for c in zip(*curves)]


def _sweep(model: torch.nn.Module, theta0: Params, batches: list[tuple[Micro, Micro]],
           optimizers: dict[str, tuple[Any, dict]], opts: dict[str, ProbeOptimizer], dampings: list[float],
           etas: list[float], blocks: list[list[str]], cg_iters: int, cg_tol: float,
           loss_grad: Callable[[Micro], Params], reduce, bar, full_sweep: bool) -> _Sweep:
    """Every optimizer's probe step on each probe batch (from the same warmed-up state) and its real-loss curve on
    the batch's fresh twin; then the references, λ-major: every probe batch's solve at λ, then the oracle's mean
    real-loss curve at λ. The sweep goes from the largest λ down and (unless ``full_sweep``) stops at the first λ
    whose oracle does worse at its best η than the best larger λ, once that one lowers the real loss: smaller λ are
    the costly solves."""
    names = [*REFERENCES, *opts]
    out = _Sweep(lams=[], scores={}, real={n: [] for n in opts}, oracle={}, solves={}, loss=[], real_loss_base=[])
    sweeps = []
    for mbs, fresh in batches:
        g = loss_grad(mbs)
        steps = {}
        for name, (opt, snapshot) in optimizers.items():  # every probe starts from the same warmed-up state
            opt.load_state_dict(copy.deepcopy(snapshot))
            ocfg = opts[name].cfg.optim
            steps[name] = step_direction(model, opt, g, ocfg.clip, ocfg.clip_per_group)
        base, changes = loss_along(model, theta0, steps, fresh, None, etas, reduce=reduce)
        for key, curve in changes.items():
            out.real[key].append(curve)
        out.real_loss_base.append(base)
        sweeps.append(sweep_dampings(model, theta0, mbs, None, steps, dampings, cg_iters=cg_iters, cg_tol=cg_tol,
                                     blocks=blocks, grad=g, reduce=reduce))
    for lam in sorted(dampings, reverse=True):
        out.lams.append(lam)
        out.scores[lam] = {n: [] for n in names}
        out.real.update({(r, lam): [] for r in REFERENCES})
        sv = out.solves[lam] = {k: [] for k in (
            "gmg", "gmg_rel_gap_bound", "cg_iterations", "cg_rel_residual", "cg_converged", "layerwise_cg_iterations",
            "layerwise_cg_rel_residual", "layerwise_cg_converged")}
        for (_, fresh), sweep in zip(batches, sweeps):
            solved, r = next(sweep)
            assert solved == lam
            _, changes = loss_along(model, theta0, {(ref, lam): r.references[ref] for ref in REFERENCES}, fresh,
                                    None, etas, reduce=reduce)
            for key, curve in changes.items():
                out.real[key].append(curve)
            for n in names:
                out.scores[lam][n].append(r.scores[n])
            sv["gmg"].append(r.gmg)
            sv["gmg_rel_gap_bound"].append(r.gmg_rel_gap_bound)
            for ref, prefix in (("gn", ""), ("layerwise", "layerwise_")):
                sv[f"{prefix}cg_iterations"].append(r.cg[ref]["iterations"])
                sv[f"{prefix}cg_rel_residual"].append(r.cg[ref]["relative_residual"])
                sv[f"{prefix}cg_converged"].append(r.cg[ref]["converged"])
            if len(out.lams) == 1:
                out.loss.append(r.loss)
            bar.update(1)
        out.oracle[lam] = _mean_curve(out.real[("gn", lam)])
        best = min(min(out.oracle[prev]) for prev in out.lams[:-1]) if len(out.lams) > 1 else None
        if not full_sweep and best is not None and best < 0 and min(out.oracle[lam]) > best:
            break
    for sweep in sweeps:
        sweep.close()
    bar.update(len(batches) * (len(dampings) - len(out.lams)))  # the dampings left unsolved
    out.lams.sort()
    return out


def _point_record(sw: _Sweep, lam_star: float, opts: dict[str, ProbeOptimizer], settings: dict[str, Any],
                  etas: list[float], ckpt_path: Path, step: int | None, n_blocks: int) -> dict[str, Any]:
    """The probe.json entry of one checkpoint: every optimizer's and reference's summary at λ*, and the sweep."""
    names = [*REFERENCES, *opts]

    def summary(name: str, curves: list[list[float]]) -> dict[str, Any]:
        sc = sw.scores[lam_star][name]
        predicted = [[eta * s["gtd"] + 0.5 * eta * eta * s["dmd"] for eta in etas] for s in sc]
        out = _summarize(sc, curves, predicted)
        best = min(range(len(etas)), key=lambda i: out["real_loss_change"][i])
        out["best_eta"], out["best_real_loss_change"] = etas[best], out["real_loss_change"][best]
        out["rho_by_damping"] = [statistics.fmean(s["rho"] for s in sw.scores[lam][name]) for lam in sw.lams]
        return out

    point: dict[str, Any] = {"checkpoint": str(ckpt_path), "step": step, "loss": statistics.fmean(sw.loss)}
    point["optimizers"] = {name: {"lr": opts[name].cfg.optim.lr, "lr_source": opts[name].lr_source,
                                  **summary(name, sw.real[name]), "settings": settings[name]} for name in opts}
    point["references"] = {ref: summary(ref, sw.real[(ref, lam_star)]) for ref in REFERENCES}
    oracle_best = point["references"]["gn"]["best_real_loss_change"]
    for entry in [*point["optimizers"].values(), *point["references"].values()]:
        # the second measure: the real loss decrease at the best η as a fraction of the oracle's (at λ*)
        entry["real_loss_fraction"] = entry["best_real_loss_change"] / oracle_best if oracle_best < 0 else None
    for ref in REFERENCES:
        point[f"{ref}_rho"] = point["references"][ref]["rho"]
        point[f"{ref}_rho_std"] = point["references"][ref]["rho_std"]
    point["damping"] = lam_star
    point["oracle_helps"] = any(v < 0 for lam in sw.lams for v in sw.oracle[lam])
    point["by_damping"] = [{
        "damping": lam, "oracle_real_loss_change": sw.oracle[lam],
        "oracle_best_real_loss_change": min(sw.oracle[lam]),
        "oracle_best_eta": etas[sw.oracle[lam].index(min(sw.oracle[lam]))],
        "rho": {n: statistics.fmean(s["rho"] for s in sw.scores[lam][n]) for n in names},
        "real_loss_change": {n: _mean_curve(sw.real[n] if n in opts else sw.real[(n, lam)]) for n in names},
        "cg_iterations": sw.solves[lam]["cg_iterations"], "cg_converged": all(sw.solves[lam]["cg_converged"]),
        "layerwise_cg_iterations": sw.solves[lam]["layerwise_cg_iterations"],
        "layerwise_cg_converged": all(sw.solves[lam]["layerwise_cg_converged"]),
        "gmg": sw.solves[lam]["gmg"]} for lam in sw.lams]
    sv = sw.solves[lam_star]
    gaps = [v for v in sv["gmg_rel_gap_bound"] if v is not None]
    point["gmg_rel_gap_bound"] = max(gaps) if gaps else None
    point["cg_rel_residual"] = max(sv["cg_rel_residual"])
    point["cg_iterations"] = sv["cg_iterations"]
    point["cg_converged"] = all(sv["cg_converged"])
    point["layerwise_cg_rel_residual"] = max(sv["layerwise_cg_rel_residual"])
    point["layerwise_cg_iterations"] = sv["layerwise_cg_iterations"]
    point["layerwise_cg_converged"] = all(sv["layerwise_cg_converged"])
    point["layerwise_blocks"] = n_blocks
    point["per_batch"] = {"loss": sw.loss, "real_loss_base": sw.real_loss_base,
                          **{k: sv[k] for k in ("gmg", "gmg_rel_gap_bound", "cg_iterations", "cg_rel_residual",
                                                "layerwise_cg_iterations", "layerwise_cg_rel_residual")}}
    return point


def _probe_point(cfg: RunConfig, ckpt_path: Path, data, opts: dict[str, ProbeOptimizer], n_seq: int, micro: int,
                 probe_batches: int, warmup_steps: int, dampings: list[float], cg_iters: int, cg_tol: float,
                 device: torch.device, bar, full_sweep: bool = False) -> dict[str, Any]:
    """Every number of one checkpoint: the model and the batches from the checkpoint's training stream (warm-up,
    then pairs of probe batch and fresh batch), the optimizers warmed up (:func:`_warm_optimizers`), the sweep
    (:func:`_sweep`), the calibrated damping λ* (the damping whose GN step lowers the real loss on the fresh
    batches most at its best η, mean curve) and the record at λ* (:func:`_point_record`)."""
    ckpt = load_checkpoint(ckpt_path, map_location=device, verbose=dist.is_main())
    model = build_model(cfg, device)
    load_weights(model, ckpt["model"], f"checkpoint {ckpt_path}")
    step = ckpt.get("state", {}).get("step")
    saved_optimizer = ckpt.get("optimizer")
    stream = train_stream(cfg, data)
    if "stream" in ckpt:
        stream.load_state_dict(ckpt["stream"])
    del ckpt
    reduce = dist.all_reduce_mean if dist.world_size() > 1 else None
    params = dict(model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    blocks = layerwise_blocks(model, cfg.gn.blocks)
    etas = cfg.gn.line_search_etas()

    def to_device(b) -> Micro:  # equal micro-batches of at most `micro` sequences
        x, y = b[0].to(device), b[1].to(device)
        size = max(d for d in range(1, min(micro, x.size(0)) + 1) if x.size(0) % d == 0)
        return list(zip(x.split(size), y.split(size)))

    def loss_grad(mbs: Micro) -> Params:  # the batch's mean loss, over its micro-batches
        model.zero_grad(set_to_none=True)
        for x, y in mbs:
            (loss_fn(model(x), y) / len(mbs)).backward()
        grads = {n: p.grad.detach() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        if reduce is not None:
            reduce(list(grads.values()))
        return grads

    warm = [to_device(stream.next(n_seq)) for _ in range(warmup_steps)]
    batches = [(to_device(stream.next(n_seq)), to_device(stream.next(n_seq))) for _ in range(probe_batches)]
    optimizers, settings = _warm_optimizers(params, theta0, opts, warm, saved_optimizer, ckpt_path, step, loss_grad)
    sw = _sweep(model, theta0, batches, optimizers, opts, dampings, etas, blocks, cg_iters, cg_tol, loss_grad, reduce,
                bar, full_sweep)

    lam_star = min(sw.lams, key=lambda lam: (min(sw.oracle[lam]), -lam))
    point = _point_record(sw, lam_star, opts, settings, etas, ckpt_path, step, len(blocks))
    if dist.is_main():
        if not point["oracle_helps"]:
            bar.write(f"gnlm probe: warning: {no_help(step, sw.lams)}", file=sys.stderr)
        sv = sw.solves[lam_star]
        for ref, prefix in (("gn", ""), ("layerwise", "layerwise_")):
            for k, ok in enumerate(sv[f"{prefix}cg_converged"]):
                if not ok:
                    bar.write(f"gnlm probe: warning: CG for the {LABELS[ref]} at λ* = {lam_star:g} stopped after "
                              f"{sv[f'{prefix}cg_iterations'][k]} iterations at relative residual "
                              f"{sv[f'{prefix}cg_rel_residual'][k]:.2e} > {cg_tol:g} (checkpoint step {step}, probe "
                              f"batch {k + 1}); its ρ and every ρ measured against it are approximate: raise "
                              f"--cg-iters", file=sys.stderr)
    return point


DAMPING_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _dampings(damping: float | None, grid: str | Sequence[float] | None) -> list[float]:
    """The dampings to solve at: ``--damping`` alone (fixed), else ``--damping-grid`` (default
    :data:`DAMPING_GRID`), checked (one-line ConfigError)."""
    if damping is not None:
        if grid is not None:
            raise ConfigError("give --damping (a fixed λ) or --damping-grid (λ calibrated on it), not both")
        if not (math.isfinite(damping) and damping >= 0):
            raise ConfigError(f"--damping must be >= 0, got {damping}; e.g. --damping 1e-3")
        return [float(damping)]
    if grid is None:
        return list(DAMPING_GRID)
    items = parse_list(grid, "--damping-grid", "1e-4,1e-2,1") if isinstance(grid, str) else [str(v) for v in grid]
    try:
        values = [float(v) for v in items]
    except ValueError:
        raise ConfigError(f"--damping-grid: {grid!r} is not a list of numbers; e.g. --damping-grid "
                          "1e-4,1e-2,1") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--damping-grid: every λ must be a positive number, got {grid!r}; e.g. "
                          "--damping-grid 1e-4,1e-2,1")
    if len(set(values)) != len(values):
        raise ConfigError(f"--damping-grid: {grid!r} gives a λ twice; list each once")
    return sorted(values)


def run_probe(source: str | Path | None = None, optimizers: str | Sequence[str] = "adamw,muon,soap",
              lrs: str | Sequence[float] | None = None, batch_tokens: int | None = None, probe_batches: int = 4,
              warmup_steps: int = 10, damping: float | None = None,
              damping_grid: str | Sequence[float] | None = None, cg_iters: int = 100, cg_tol: float = 1e-2,
              out: str | Path | None = None, along: str | Path | None = None, device: str | None = None,
              threads: int | None = None, progress: bool = True,
              sets: Sequence[str] | None = None, full_sweep: bool = False) -> dict[str, Any]:
    """Probe every optimizer at a checkpoint (or at every checkpoint of ``along``); write ``probe.json``,
    ``probe.md`` and ``probe.png`` into ``out`` (default: ``probe/`` in the source directory) and return the dict.

    ``source``: a run directory, a checkpoint file (its directory's config.yaml gives model and data) or a study
    results directory (its warm start is probed; its best-lr table at ``batch_tokens`` gives learning rates).
    ``optimizers``: built-in names, import paths or (a study) the study's method labels. Each is built exactly as
    ``gnlm train`` / ``gnlm bench`` built it for the source (:func:`~gnlm.probe_inputs.probe_optimizers`; every optim
    field, kwargs, a study method's optimizer, kwargs, overrides and selected point), warmed up and stepped at its
    schedule's learning rate (a study's run from step 0, a run from the checkpoint's step), continuing the
    checkpoint's optimizer state where the trainer would. ``sets``: ``LABEL:KEY=VALUE`` settings of one optimizer
    (KEY under optim., schedule. or train.steps). Learning rates: ``lrs`` (one per optimizer), else the study's
    selected point, else the run's own ``optim.lr`` for the optimizer it was trained with, else
    :class:`gnlm.optim.OptimConfig`'s default (each choice is reported; every setting is in probe.json
    ``settings``).
    ``batch_tokens`` (default: the study's smallest batch, or the run's batch) is the size of every warm-up step,
    probe batch and real-loss batch. ``device`` and ``threads`` default to the run's ``train.device`` and
    ``train.threads``. Every input is checked (one-line :class:`ConfigError`) before compute.
    """
    t_start = time.perf_counter()
    src = resolve_source(source, along)
    labels = parse_list(optimizers, "--optimizers", "adamw,muon,soap")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--optimizers: {','.join(labels)} names an optimizer twice; list each once")
    sets_by_label = parse_sets(sets, labels)
    lr_list = None
    if lrs is not None:
        lr_items = parse_list(lrs, "--lrs", "3e-3,2e-2,3e-3") if isinstance(lrs, str) else [str(v) for v in lrs]
        try:
            lr_list = [float(v) for v in lr_items]
        except ValueError:
            raise ConfigError(f"--lrs: {lrs!r} is not a list of numbers; give one learning rate per optimizer, "
                              "e.g. --lrs 3e-3,2e-2,3e-3") from None
        if len(lr_list) != len(labels):
            raise ConfigError(f"--lrs gives {len(lr_list)} learning rates for {len(labels)} optimizers "
                              f"({','.join(labels)}); give one per optimizer, in the same order")
        if not all(math.isfinite(v) and v > 0 for v in lr_list):
            raise ConfigError(f"--lrs: every learning rate must be a positive number, got {lrs!r}")
    for flag, value, low in (("--probe-batches", probe_batches, 1), ("--warmup-steps", warmup_steps, 0),
                             ("--cg-iters", cg_iters, 1), ("--threads", 1 if threads is None else threads, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    dampings = _dampings(damping, damping_grid)
    if not cg_tol > 0:
        raise ConfigError(f"--cg-tol must be > 0, got {cg_tol}; e.g. --cg-tol 1e-2")
    cfg = load_config(src.config_path)
    seq = cfg.data.seq_len
    study = load_study(src.study_dir) if src.study_dir else None
    methods = {m.name for m in study.methods} if study else set()
    names = {n: None if n in methods else check_optimizer(n) for n in labels}  # a method label: its optimizer
    if batch_tokens is None:
        batch_tokens = min(study.batch_tokens) if study else cfg.train.batch_size * seq
    if batch_tokens < 1 or batch_tokens % seq:
        raise ConfigError(f"--batch-tokens {batch_tokens} is not a positive multiple of data.seq_len ({seq}); "
                          f"give e.g. --batch-tokens {seq * max(1, batch_tokens // seq)}")
    n_seq = batch_tokens // seq
    # the oracle's micro-batches (as GN's inner batches; the GN matrix of the whole batch, in bounded memory)
    micro = int(((study.base if study else {}).get("gn") or {}).get("inner_batch_size") or cfg.gn.inner_batch_size)

    dist.init(device or cfg.train.device)
    world = dist.world_size()
    if n_seq % world:
        raise ConfigError(f"--batch-tokens {batch_tokens} = {n_seq} sequences do not split evenly over {world} "
                          "processes; choose a batch whose sequence count the process count divides")
    opts = probe_optimizers(src, cfg, study, labels, names, lr_list, sets_by_label, batch_tokens)
    dev = resolve_device(device or cfg.train.device, what="--device" if device else
                         f"train.device of {src.config_path}", fix="--device cpu")
    check_memory(cfg, n_seq // world, dev, f"a probe batch of {batch_tokens:,} tokens", "--batch-tokens")
    check_checkpoints(src.checkpoints)
    out_dir = Path(out) if out is not None else src.default_out
    if dist.is_main():
        output_dir(out_dir)
        if lr_list is None:  # said once every input is accepted
            for n, o in opts.items():
                print(f"gnlm probe: {n}: lr {o.cfg.optim.lr:g} ({o.lr_source}); pass --lrs to choose", file=sys.stderr)
    if threads or cfg.train.threads:
        torch.set_num_threads(threads or cfg.train.threads)
    data = open_data(cfg, progress=progress, run_dir=src.config_path.parent)  # the run's own tokenizer

    from tqdm.auto import tqdm

    bar = tqdm(total=len(src.checkpoints) * probe_batches * len(dampings), unit="solve", desc="gnlm probe",
               dynamic_ncols=True,
               disable=not (progress and dist.is_main()), file=sys.stderr)
    points = []
    for path in src.checkpoints:
        points.append(_probe_point(cfg, path, data, opts, n_seq, micro, probe_batches, warmup_steps, dampings, cg_iters,
                                   cg_tol, dev, bar, full_sweep))
    bar.close()
    unique: dict[Any, dict[str, Any]] = {}
    for p in points:  # a corrupt checkpoint.pt falls back to checkpoint.prev.pt: the same step twice
        unique.setdefault(p["step"], p)
    points = sorted(unique.values(), key=lambda p: (p["step"] is None, p["step"] or 0))
    result: dict[str, Any] = {
        **points[-1], "source": str(source if source is not None else along), "source_kind": src.kind,
        "config": str(src.config_path), "batch_tokens": batch_tokens, "probe_batches": probe_batches,
        "warmup_steps": warmup_steps, "damping_grid": dampings, "damping_fixed": damping is not None,
        "full_sweep": full_sweep,
        "micro_batch_sequences": micro, "cg_iters": cg_iters, "cg_tol": cg_tol,
        "etas": cfg.gn.line_search_etas(), "world_size": world,
        "real_loss_scales": {"optimizers": "the actual step", "gn": "d* (natural scale)",
                             "layerwise": "the layerwise GN step (natural scale)",
                             "gradient": "-alpha*g, alpha = g'g / g'Mg (the GN model's best step along -g)"},
    }
    if src.kind == "along":
        result["along"] = points
    result["wall_time"] = time.perf_counter() - t_start
    if dist.is_main():
        result["files"] = {k: str(out_dir / f"probe.{k}") for k in ("json", "md", "png")}
        atomic_write_bytes(out_dir / "probe.json", (dumps_json(result, indent=2) + "\n").encode())
        atomic_write_bytes(out_dir / "probe.md", (markdown(result) + "\n").encode())
        plot(out_dir / "probe.png", result)
    return result


# --------------------------------------------------------------------------------------------------------------
# command line


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="a run directory, a checkpoint file or a study results directory (its warm start)")
    p.add_argument("--optimizers", default="adamw,muon,soap",
                   help="comma-separated: adamw, muon, soap, import paths like torch.optim.SGD, or (a study) its "
                        "method labels")
    p.add_argument("--set", dest="sets", action="append", default=None, metavar="LABEL:KEY=VALUE",
                   help="a setting of one optimizer of --optimizers, repeatable: KEY is a dotted key under optim., "
                        "schedule. or train.steps, e.g. --set adamw:optim.betas=[0.9,0.99] "
                        "--set myopt.Lion:optim.kwargs.foo=1")
    p.add_argument("--lrs", default=None, help="one learning rate per optimizer, comma-separated (default: the "
                   "study's best lr at --batch-tokens, else the run's or the optimizer's default lr)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per warm-up step, probe batch and real-loss batch (default: the run's batch or the "
                        "study's smallest)")
    p.add_argument("--probe-batches", type=int, default=4, help="number of probe batches K (default 4)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="optimizer steps from the checkpoint that build its state before probing (default 10)")
    p.add_argument("--damping", type=float, default=None,
                   help="a fixed λ in M = G + λI (default: calibrated over --damping-grid)")
    p.add_argument("--damping-grid", default=None, metavar="L1,L2,...",
                   help="the λ the oracle is solved at; λ* is the one whose GN step lowers the real loss most on "
                        "fresh batches at its best line-search η (default 1e-4,1e-3,...,100: 7 points)")
    p.add_argument("--full-sweep", action="store_true",
                   help="solve every λ of the grid (default: the sweep goes from the largest λ down and stops at the "
                        "first λ whose GN step lowers the real loss less than a larger λ's)")
    p.add_argument("--cg-iters", type=int, default=100, help="CG iterations per solve at most (default 100)")
    p.add_argument("--cg-tol", type=float, default=1e-2, help="CG tolerance on ‖r‖/‖g‖ (default 1e-2)")
    p.add_argument("--out", default=None, help="output directory (default: probe/ in the source directory)")
    p.add_argument("--along", default=None, metavar="RUN_DIR",
                   help="probe every checkpoint (*.pt) of this run: ρ against training step")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's train.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the run's train.threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_probe(args: argparse.Namespace) -> int:
    """``gnlm probe``: print the Markdown table; files as :func:`run_probe` writes them."""
    try:
        result = run_probe(source=args.source, optimizers=args.optimizers, lrs=args.lrs,
                           batch_tokens=args.batch_tokens, probe_batches=args.probe_batches,
                           warmup_steps=args.warmup_steps, damping=args.damping, damping_grid=args.damping_grid,
                           cg_iters=args.cg_iters, full_sweep=args.full_sweep,
                           cg_tol=args.cg_tol, out=args.out, along=args.along, device=args.device,
                           threads=args.threads, progress=not args.no_progress, sets=args.sets)
        if dist.is_main():
            print(markdown(result))
            print(f"\nwrote {', '.join(result['files'].values())} ({result['wall_time']:.0f} s)", file=sys.stderr)
        dist.barrier()
    finally:
        dist.destroy()
    return 0
