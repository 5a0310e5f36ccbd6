r"""How far is an optimizer's step from the Gauss-Newton step? The probe's measure (design.md; issue 10).

One probe batch at θ₀, in the names of this module::

    probe_directions(θ₀, batch, directions):
        g  ← ∇ℓ(θ₀; batch)
        d* ← cg_solve((G + λI) d = −g)                   the GN step; the layerwise GN step with block-diagonal G
        for d in directions ∪ references:  Md ← damped_ggn_product(d)
        gᵀM⁻¹g ← the largest lower bound (gᵀd)²/dᵀMd, CG's −gᵀd* among them
        scores[d] ← direction_efficiency(g, d, Md, gᵀM⁻¹g)
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gnlm.curvature import cg_solve, damped_ggn_product, surrogate_grad
from gnlm.model import loss_fn
from gnlm.optim import optimizer_step

__all__ = ["REFERENCES", "ProbeResult", "direction_efficiency", "probe_directions", "step_direction", "loss_along"]

Params = dict[str, Tensor]
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


def probe_directions(model: nn.Module, params: Params, inputs: Tensor, targets: Tensor,
                     directions: dict[str, Params] | None = None, damping: float = 1e-3, cg_iters: int = 100,
                     cg_tol: float = 1e-2, blocks: Sequence[Sequence[str]] | None = None, grad: Params | None = None,
                     reduce: Reduce | None = None) -> ProbeResult:
    r"""Score ``directions`` (name -> dict like ``params``) against the GN step of one batch at ``params``.

    Solves (G + λI) d* = −g by CG (``cg_iters``, ``cg_tol`` relative to ‖g‖) and, with ``blocks`` (a partition of
    the parameter names, e.g. :func:`gnlm.curvature.layerwise_blocks`), the layerwise system with block-diagonal
    G; then one M-product per direction. ``grad`` is g when the caller already has it (else it is computed).
    ``reduce`` averages gradients and products over the ranks; ``inputs, targets`` are then this rank's shard.
    """
    directions = dict(directions or {})
    clash = sorted(set(directions) & set(REFERENCES))
    if clash:
        raise ValueError(f"probe_directions: direction names {clash} are reserved for the references")
    params = {k: v.detach() for k, v in params.items()}
    batch = [(inputs, targets)]
    if grad is None:
        _, grad = surrogate_grad(model, params, params, inputs, targets, kind="gn")
        if reduce is not None:
            reduce(list(grad.values()))
    d_star, info = cg_solve(model, params, batch, damping=damping, max_iters=cg_iters, tol=cg_tol, reduce=reduce)
    cg = {"gn": _cg_summary(info)}
    refs: dict[str, Params] = {"gn": d_star}
    if blocks is not None:
        refs["layerwise"], info_lw = cg_solve(model, params, batch, damping=damping, max_iters=cg_iters, tol=cg_tol,
                                              blocks=blocks, reduce=reduce)
        cg["layerwise"] = _cg_summary(info_lw)

    def m_product(d: Params) -> Params:
        return damped_ggn_product(model, params, batch, d, damping, reduce=reduce)

    products = {name: m_product(d) for name, d in {**refs, **directions}.items()}
    neg_g = {k: -v for k, v in grad.items()}
    mg = m_product(neg_g)
    alpha = _dot(grad, grad) / max(_dot(neg_g, mg), 1e-300)
    refs["gradient"] = {k: alpha * v for k, v in neg_g.items()}
    products["gradient"] = {k: alpha * v for k, v in mg.items()}
    all_dirs = {**refs, **directions}
    # gᵀM⁻¹g ≥ (gᵀd)²/dᵀMd for every d (equality at d*); CG's −gᵀd* is the same bound for an exact CG iterate
    bounds = [-_dot(grad, d_star)]
    for name, d in all_dirs.items():
        gtd, dmd = _dot(grad, d), _dot(d, products[name])
        if gtd < 0 and dmd > 0:
            bounds.append(gtd * gtd / dmd)
    gmg = max(bounds)
    gap = info["residual_norm"] ** 2 / (damping * gmg) if damping > 0 and gmg > 0 else None
    scores = {name: direction_efficiency(grad, d, products[name], gmg) for name, d in all_dirs.items()}
    return ProbeResult(loss=info["loss"], grad=grad, gmg=gmg, gmg_rel_gap_bound=gap, references=refs, scores=scores,
                       cg=cg)


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
def loss_along(model: nn.Module, params0: Params, directions: dict[str, Params], inputs: Tensor, targets: Tensor,
               etas: Sequence[float], reduce: Reduce | None = None) -> tuple[float, dict[str, list[float]]]:
    """ℓ(θ₀) and ℓ(θ₀ + η d) − ℓ(θ₀) for every direction and η on one batch (``reduce``: averaged over the ranks);
    the model's parameters are left at θ₀."""
    params = dict(model.named_parameters())
    values = [loss_fn(model(inputs), targets).item()]
    for d in directions.values():
        for eta in etas:
            for n, p in params.items():
                p.copy_(params0[n] + eta * d[n])
            values.append(loss_fn(model(inputs), targets).item())
    for n, p in params.items():
        p.copy_(params0[n])
    if reduce is not None:  # one collective for every loss
        t = torch.tensor(values, dtype=torch.float64, device=inputs.device)
        reduce([t])
        values = t.tolist()
    base, rest = values[0], values[1:]
    k = len(etas)
    return base, {name: [v - base for v in rest[i * k:(i + 1) * k]] for i, name in enumerate(directions)}
