r"""How far is an optimizer's step from the Gauss-Newton step? The probe's measure (design.md; issue 10).

One probe batch at θ₀ (one batch or equal micro-batches whose means make the batch's g and G), in the names of
this module::

    sweep_dampings(θ₀, batch, directions, λ grid):      a generator; damping_sweep collects it, probe_directions
        g  ← ∇ℓ(θ₀; batch)                                 is the sweep at one λ
        for d in directions:  Gd ← damped_ggn_product(d, λ = 0)    once; dᵀMd = dᵀGd + λ‖d‖² per λ
        for λ in the grid, largest first (the caller may stop after any λ):
            d*_λ ← cg_solve((G + λI) d = −g, init = d*_λ')   the GN step (and the layerwise one, block-diagonal G),
                                                            warm-started from the previous λ's solution
            gᵀM⁻¹g ← the largest lower bound (gᵀd)²/dᵀMd over the directions and the steps so far, CG's −gᵀd*_λ
            yield λ, scores[d] ← direction_efficiency(g, d, Md, gᵀM⁻¹g)
    d ← step_direction(optimizer, g)                    θ_after − θ₀ of one step; θ put back to θ₀
    loss_along(θ₀, directions, fresh batch, η grid)     the real loss change ℓ(θ₀ + η d) − ℓ(θ₀)

The measure. On one batch at θ₀ let ℓ be the mean next-token cross-entropy, g = ∇ℓ(θ₀), G = JᵀHJ the batch's
Gauss-Newton matrix (curvature.py), λ ≥ 0 a damping and M = G + λI. The GN model of the loss change along d is

    q(d) = gᵀd + ½ dᵀMd,      best decrease Δq* = −min_d q(d) = ½ gᵀM⁻¹g   at the GN step d* = −M⁻¹g.

* Direction efficiency ρ(d) = (gᵀd)² / (dᵀMd · gᵀM⁻¹g) if gᵀd < 0, else 0. It is the squared cosine between d and
  d* in the M inner product, i.e. the fraction of Δq* that d reaches with its best step size
  α(d) = −gᵀd / dᵀMd (reported as ``best_scale``: > 1 means the step was too short for the GN model). ρ ∈ [0, 1],
  ρ = 1 only along d*, and ρ does not depend on the scale of d.
* Step efficiency −q(d)/Δq* at the step as taken. With s = 1/α it equals ρ·(2s − s²): ρ when the step has the
  model's best length, less when it is shorter or longer, negative when it overshoots more than twofold.

References, per probe batch: the GN step d* (CG, :func:`gnlm.curvature.cg_solve`, relative residual reported), the
layerwise GN step (CG on the block-diagonal M of a partition of the parameters; scored under the full M) and the
gradient, taken at the GN model's best step size along it, −α g with α = gᵀg / gᵀMg (so its step efficiency equals
its ρ). Every M-product is :func:`gnlm.curvature.damped_ggn_product`, the operator CG itself applies.

gᵀM⁻¹g is not known exactly: CG gives −gᵀd*, and every direction d gives the lower bound (gᵀd)²/dᵀMd (Cauchy-Schwarz
in the M inner product, equality at d*). The estimate is the largest of these bounds, so no ρ exceeds 1 and every ρ
is at most slightly high. For the CG iterate, gᵀM⁻¹g − (−gᵀd*) = rᵀM⁻¹r ≤ ‖r‖²/λ (r the residual, exact
arithmetic), so ``gmg_rel_gap_bound`` = ‖r‖² / (λ · estimate) bounds the relative error of the estimate, and of
every ρ (reported when λ > 0). It is far smaller than the relative residual (≤ 0.2% at residual 1e-2 in the README
example), which is why the default CG tolerance is 1e-2. ρ(d*) ≈ 1 checks that CG and the separate M-products
agree; it is not a convergence test (the residual and the bound are).

Data parallel: every function takes ``reduce`` (e.g. :func:`gnlm.distributed.all_reduce_mean`), which averages a
list of tensors over the ranks in place; each rank then passes its shard of every batch and all ranks get the same
numbers. Parameters and directions are dicts ``name -> Tensor`` like ``dict(model.named_parameters())``; everything
here works on any module mapping ids to logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gnlm.curvature import batch_gradient, cg_solve, damped_ggn_product
from gnlm.model import loss_fn
from gnlm.optim import optimizer_step

__all__ = ["REFERENCES", "ProbeResult", "damping_sweep", "direction_efficiency", "loss_along", "probe_directions",
           "step_direction", "sweep_dampings"]

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
Reduce = Callable[[list[Tensor]], Any]
REFERENCES = ("gn", "layerwise", "gradient")


def _dot(a: Params, b: Params) -> float:
    return float(sum(torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double()) for k in a))


def direction_efficiency(g: Params, d: Params, md: Params, gmg: float) -> dict[str, float]:
    r"""Scores of direction ``d`` given the gradient ``g``, ``md`` = M d and ``gmg`` = gᵀM⁻¹g.

    Returns ``rho`` = (gᵀd)² / (dᵀMd · gᵀM⁻¹g) if gᵀd < 0 (else 0), ``step_efficiency`` = −q(d) / (½ gᵀM⁻¹g) with
    q(d) = gᵀd + ½ dᵀMd, ``best_scale`` α = −gᵀd / dᵀMd (the GN model's best multiple of d; 0 if gᵀd ≥ 0),
    ``gtd``, ``dmd``, ``q`` and ``norm`` = ‖d‖.
    """
    gtd, dmd = _dot(g, d), _dot(d, md)
    descent = gtd < 0 and dmd > 0
    q = gtd + 0.5 * dmd
    return {"rho": gtd * gtd / (dmd * gmg) if descent and gmg > 0 else 0.0,
            "step_efficiency": -q / (0.5 * gmg) if gmg > 0 else 0.0,
            "best_scale": -gtd / dmd if descent else 0.0,
            "gtd": gtd, "dmd": dmd, "q": q, "norm": math.sqrt(_dot(d, d))}


@dataclass
class ProbeResult:
    """What :func:`probe_directions` measured on one batch.

    ``references``: the directions ``gn`` (d*), ``layerwise`` (absent without blocks) and ``gradient`` (−α g);
    ``scores``: :func:`direction_efficiency` of every reference and every given direction; ``gmg``: the estimate of
    gᵀM⁻¹g used; ``cg``: per reference solve its ``iterations``, ``relative_residual``, ``converged``.
    """

    loss: float
    grad: Params
    gmg: float
    gmg_rel_gap_bound: float | None
    references: dict[str, Params]
    scores: dict[str, dict[str, float]]
    cg: dict[str, dict[str, Any]]


def probe_directions(model: nn.Module, params: Params, inputs: Tensor | Sequence[Batch],
                     targets: Tensor | None = None, directions: dict[str, Params] | None = None,
                     damping: float = 1e-3, cg_iters: int = 100, cg_tol: float = 1e-2,
                     blocks: Sequence[Sequence[str]] | None = None, grad: Params | None = None,
                     reduce: Reduce | None = None) -> ProbeResult:
    r"""Score ``directions`` (name -> dict like ``params``) against the GN step of one batch at ``params``:
    :func:`damping_sweep` at the one damping ``damping``."""
    return damping_sweep(model, params, inputs, targets, directions, [damping], cg_iters, cg_tol, blocks, grad,
                         reduce)[damping]


def damping_sweep(model: nn.Module, params: Params, inputs: Tensor | Sequence[Batch], targets: Tensor | None = None,
                  directions: dict[str, Params] | None = None, dampings: Sequence[float] = (1e-3,),
                  cg_iters: int = 100, cg_tol: float = 1e-2, blocks: Sequence[Sequence[str]] | None = None,
                  grad: Params | None = None, reduce: Reduce | None = None) -> dict[float, ProbeResult]:
    r"""Every damping of :func:`sweep_dampings` at once: λ -> :class:`ProbeResult`."""
    return dict(sweep_dampings(model, params, inputs, targets, directions, dampings, cg_iters, cg_tol, blocks, grad,
                               reduce))


def sweep_dampings(model: nn.Module, params: Params, inputs: Tensor | Sequence[Batch], targets: Tensor | None = None,
                   directions: dict[str, Params] | None = None, dampings: Sequence[float] = (1e-3,),
                   cg_iters: int = 100, cg_tol: float = 1e-2, blocks: Sequence[Sequence[str]] | None = None,
                   grad: Params | None = None, reduce: Reduce | None = None) -> Iterator[tuple[float, ProbeResult]]:
    r"""Score ``directions`` against the GN step of one batch at every damping λ of ``dampings``, largest first:
    yields ``(λ, ProbeResult)`` as each λ is solved, so a caller may stop the sweep early (the small dampings cost
    the most CG iterations).

    The batch is ``inputs, targets``, or a list of equal-sized ``(inputs, targets)`` micro-batches as ``inputs``
    (no targets): g and G are then their means (as GN's N inner batches), which is the GN matrix of their union.
    Per λ, CG solves (G + λI) d* = −g (``cg_iters``, ``cg_tol`` relative to ‖g‖) and, with ``blocks`` (a partition
    of the parameter names, e.g. :func:`gnlm.curvature.layerwise_blocks`), the layerwise system with block-diagonal
    G; each solve is warm-started from the previous (larger) λ's solution (CG converges fastest at large λ). Every
    direction's G-product is taken once (λ = 0) and dᵀ(G + λI)d follows for every λ; the lower bounds on gᵀM⁻¹g
    come from the directions and the steps solved so far. ``grad`` is g when the caller already has it (else it is
    computed). ``reduce`` averages gradients and products over the ranks; the batches are then this rank's shard.
    """
    directions = dict(directions or {})
    clash = sorted(set(directions) & set(REFERENCES))
    if clash:
        raise ValueError(f"probe_directions: direction names {clash} are reserved for the references")
    params = {k: v.detach() for k, v in params.items()}
    batches = [(inputs, targets)] if targets is not None else list(inputs)  # type: ignore[arg-type]
    loss, batch_grad = batch_gradient(model, params, batches, reduce)  # once for every solve of the sweep
    grad = batch_grad if grad is None else grad

    def g_product(d: Params) -> Params:  # G d: the damped operator at λ = 0
        return damped_ggn_product(model, params, batches, d, 0.0, reduce=reduce)

    neg_g = {k: -v for k, v in grad.items()}
    gd = {name: g_product(d) for name, d in directions.items()}
    g_neg_g = g_product(neg_g)
    # every direction gives a lower bound (gᵀd)²/dᵀMd on gᵀM⁻¹g: the sweep's steps at other λ too
    stats = [(_dot(grad, d), _dot(d, gd[name]), _dot(d, d)) for name, d in directions.items()]
    init: dict[str, Params | None] = {"gn": None, "layerwise": None}
    for lam in sorted(set(dampings), reverse=True):
        solved: dict[str, Params] = {}
        gd_refs: dict[str, Params] = {}
        infos: dict[str, dict[str, Any]] = {}
        for ref, blk in (("gn", None), ("layerwise", blocks)):
            if ref == "layerwise" and blocks is None:
                continue
            d, info = cg_solve(model, params, batches, damping=lam, max_iters=cg_iters, tol=cg_tol, blocks=blk,
                               init=init[ref], reduce=reduce, gradient=(loss, grad))
            solved[ref], infos[ref], init[ref] = d, info, d
            gd_refs[ref] = g_product(d)
            stats.append((_dot(grad, d), _dot(d, gd_refs[ref]), _dot(d, d)))

        def damped(d: Params, gdd: Params) -> Params:
            return {k: gdd[k] + lam * d[k] for k in d}

        refs: dict[str, Params] = dict(solved)
        products = {ref: damped(d, gd_refs[ref]) for ref, d in refs.items()}
        products.update({name: damped(d, gd[name]) for name, d in directions.items()})
        mg = damped(neg_g, g_neg_g)
        alpha = _dot(grad, grad) / max(_dot(neg_g, mg), 1e-300)
        refs["gradient"] = {k: alpha * v for k, v in neg_g.items()}
        products["gradient"] = {k: alpha * v for k, v in mg.items()}
        all_dirs = {**refs, **directions}
        info = infos["gn"]
        bounds = [-_dot(grad, refs["gn"]), _dot(grad, grad) * alpha]  # CG's −gᵀd*; the gradient's (gᵀg)²/gᵀMg
        bounds += [gtd * gtd / (dgd + lam * dd) for gtd, dgd, dd in stats if gtd < 0 and dgd + lam * dd > 0]
        gmg = max(bounds)
        gap = info["residual_norm"] ** 2 / (lam * gmg) if lam > 0 and gmg > 0 else None
        scores = {name: direction_efficiency(grad, d, products[name], gmg) for name, d in all_dirs.items()}
        yield lam, ProbeResult(loss=info["loss"], grad=grad, gmg=gmg, gmg_rel_gap_bound=gap, references=refs,
                               scores=scores, cg={ref: _cg_summary(i) for ref, i in infos.items()})


def _cg_summary(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("iterations", "relative_residual", "converged", "residual_norm")}


def step_direction(model: nn.Module, optimizer: torch.optim.Optimizer, grad: Params, clip: float = 0.0,
                   per_group: bool = False) -> Params:
    """d = θ_after − θ₀ of one ``optimizer`` step with gradient ``grad`` (clipped like the baseline trainer:
    :func:`gnlm.optim.optimizer_step`); the parameters are put back to θ₀, the optimizer keeps its new state."""
    params = dict(model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = grad[n].detach().to(p.dtype).clone()  # clipping and the optimizer may write into it
    optimizer_step(optimizer, clip, per_group=per_group)
    with torch.no_grad():
        d = {n: p.detach() - theta0[n] for n, p in params.items()}
        for n, p in params.items():
            p.copy_(theta0[n])
    return d


@torch.no_grad()
def loss_along(model: nn.Module, params0: Params, directions: dict[str, Params], inputs: Tensor | Sequence[Batch],
               targets: Tensor | None, etas: Sequence[float],
               reduce: Reduce | None = None) -> tuple[float, dict[str, list[float]]]:
    """ℓ(θ₀) and ℓ(θ₀ + η d) − ℓ(θ₀) for every direction and η on one batch (or, ``targets`` None, the mean over a
    list of equal-sized micro-batches ``inputs``; ``reduce``: averaged over the ranks); the model's parameters are
    left at θ₀."""
    params = dict(model.named_parameters())
    batches = [(inputs, targets)] if targets is not None else list(inputs)  # type: ignore[arg-type]

    def loss() -> float:
        return sum(loss_fn(model(x), y).item() for x, y in batches) / len(batches)

    values = [loss()]
    for d in directions.values():
        for eta in etas:
            for n, p in params.items():
                p.copy_(params0[n] + eta * d[n])
            values.append(loss())
    for n, p in params.items():
        p.copy_(params0[n])
    if reduce is not None:  # one collective for every loss
        t = torch.tensor(values, dtype=torch.float64, device=batches[0][0].device)
        reduce([t])
        values = t.tolist()
    base, rest = values[0], values[1:]
    k = len(etas)
    return base, {name: [v - base for v in rest[i * k:(i + 1) * k]] for i, name in enumerate(directions)}
