r"""Linearisation of a language model: Gauss-Newton (GN) and prox-linear surrogates, GGN-vector products, CG.

Notation (design.md, "The method in one page"). A model f maps input ids x (B, T) to logits z = f(θ; x) of shape
(B, T, V). The loss is the mean next-token cross-entropy over all N = B·T tokens,

    ℓ(z) = (1/N) Σ_tokens [ logsumexp(z_tok) − z_tok[y_tok] ].

At the linearisation point θ₀: z₀ = f(θ₀), J = ∂f/∂θ(θ₀), and in logit space, per token with p = softmax(z₀_tok),

    g_tok   = (p − e_y) / N                       (∇_z ℓ)
    (H u)_tok = (p ⊙ u − p (pᵀu)) / N             (∇²_z ℓ applied to u; closed form, no double differentiation)

The generalised Gauss-Newton matrix is G = Jᵀ H J. For an inner iterate φ with Δ = φ − θ₀ and u = J Δ:

    gn:           q(φ) = ℓ(z₀) + gᵀu + ½ uᵀH u            ∇_φ q = Jᵀ (g + H u)
    prox_linear:  r(φ) = ℓ(z₀ + u)                         ∇_φ r = Jᵀ ∇ℓ(z₀ + u)
    prox term:    + (λ/2) ‖Δ‖²  (sum over every entry)     gradient + λ Δ   (pulls φ back toward θ₀)

How it is computed. One ``torch.func.jvp`` at θ₀ with tangent Δ gives z₀ and u together (no separate forward for
z₀). The map Δ ↦ u = JΔ is linear, so the reverse pass of that same jvp *with respect to its tangent* is Jᵀ:
we wrap the jvp in ``torch.func.vjp`` taking the tangent as the differentiated input, and the pull-back of a
logit-space vector w is Jᵀw. Only the tangent computation is recorded for the reverse pass (θ₀ is a constant),
which measured faster than reverse mode through the primal path or a separate forward + vjp
(benchmarks/gn_step_cost.py). One inner GN step therefore costs one jvp plus one transposed jvp.

Layerwise GN drops cross-block curvature. For a partition of the parameters into blocks b, block b is linearised
in its own parameters only (all others frozen at θ₀): u_b = J_b Δ_b and ∇_{φ_b} = J_bᵀ (g + H u_b). Only block b's
parameters carry a tangent, so the tangent starts at the first use of block b and the reverse pass stops there;
blocks near the output are cheap. The implied preconditioner is the block-diagonal G_bd = blockdiag_b(J_bᵀ H J_b).
Full GN is the special case of one block holding every parameter (same code path).

Work shared by the blocks of one batch. A model may describe its forward as a chain of stages (``gn_stages()``, see
``GPT.gn_stages``): then one plain forward at θ₀ records the input of each stage where a block starts, and block b's
jvp runs from its recorded input instead of from the ids; without stages the model is one stage and every block
starts at the inputs (only where the forward starts differs; the maths is the same). The logit-space quantities
that do not depend on the block (p = softmax(z₀), ℓ(z₀)) are computed once. Measured and dropped (micro preset,
1 CPU thread): running the blocks together through the shared suffix (vmap over stacked tangents, one primal per
stage) was within noise of this (±5%) at 4 layers and ≈10% faster at 8, at K times the logit-space memory; the
cost that remains is forward-mode AD itself: PyTorch's jvp of ``mm`` materialises a zero tangent for a weight that
has none and multiplies by it, so a frozen Linear costs two matmuls and an add in the tangent pass instead of one.

Forward-mode AD does not run through fused attention kernels, so every computation here runs inside
:func:`math_attention`, which selects the math SDPA backend and switches a model's ``attention`` attribute from
``"sdpa"`` to ``"math"`` for the duration (gnlm's GPT has one).

Parameters and vectors are plain dicts ``name -> Tensor`` like ``dict(model.named_parameters())``. Buffers are
taken from the module. The module should be deterministic (no active dropout). Logit-space arithmetic runs in
float32 when the logits are half precision, otherwise in the logits' dtype.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnlm.config import ConfigError

__all__ = [
    "math_attention",
    "ggn_vector_product",
    "surrogate_grad",
    "cg_solve",
    "default_blocks",
    "blocks_from_patterns",
]

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------------------------
# attention backend


@contextlib.contextmanager
def math_attention(model: nn.Module) -> Iterator[None]:
    """Run attention without fused kernels (forward-mode AD needs this).

    Selects ``SDPBackend.MATH`` for ``scaled_dot_product_attention`` and, if ``model.attention == "sdpa"``, sets it
    to ``"math"`` (gnlm's GPT then uses plain matmuls); the attribute is restored on exit, also after an error.
    """
    switched = isinstance(getattr(model, "attention", None), str) and model.attention == "sdpa"
    if switched:
        model.attention = "math"
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switched:
            model.attention = "sdpa"


# --------------------------------------------------------------------------------------------------------------
# the linearisation


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"the model must return logits (B, T, V), got {type(out).__name__}")


Stage = tuple[str, Callable[[Any, Params], Tensor]]


def _stages(model: nn.Module) -> list[Stage]:
    """The model's forward as a chain of stages ``(prefix, fn(h, params) -> h)`` (see ``GPT.gn_stages``).

    A model without ``gn_stages`` is one stage: inputs -> logits with every parameter.
    """
    get = getattr(model, "gn_stages", None)
    if callable(get):
        return list(get())
    return [("", lambda x, p: _logits(functional_call(model, p, (x,))))]


class _Linearization:
    r"""Linearisation of one batch at θ₀, shared by the blocks of a partition.

    Every parameter belongs to one stage (the first whose prefix starts its name). Block b starts at the first stage
    holding one of its parameters; the plain forward at θ₀ runs once up to the latest start and records the input
    of each starting stage, so block b's jvp runs only stages start_b.. (full GN: one block, starting at the inputs;
    nothing is recorded). The caller must be inside :func:`math_attention` and ``torch.no_grad``.
    """

    def __init__(self, model: nn.Module, params0: Params, inputs: Tensor, blocks: list[list[str]]):
        self.stages = _stages(model)
        prefixes = [prefix for prefix, _ in self.stages]
        stage_of: dict[str, int] = {}
        for name in params0:
            owners = [i for i, prefix in enumerate(prefixes) if name.startswith(prefix)]
            if not owners:
                raise ValueError(f"{type(model).__name__}.gn_stages(): parameter {name!r} belongs to no stage "
                                 f"(prefixes {prefixes})")
            stage_of[name] = owners[0]
        self.stage_of = stage_of
        self.stage_params: list[Params] = [{} for _ in self.stages]
        for name, v in params0.items():
            self.stage_params[stage_of[name]][name] = v
        starts = {min(stage_of[n] for n in names) for names in blocks}
        self.inputs: dict[int, Any] = {0: inputs}
        h = inputs
        for s in range(max(starts)):
            h = self.stages[s][1](h, self.stage_params[s])
            if s + 1 in starts:
                self.inputs[s + 1] = h

    def block(self, names: Sequence[str], tangent: Params) -> tuple[Tensor, Tensor, Callable[[Tensor], Params]]:
        """z₀ = f(θ₀), u = J_S t_S and the pull-back w ↦ J_Sᵀ w, for the parameter subset S = ``names``.

        Parameters outside S are constants at θ₀ (no tangent), so the tangent computation starts where S is first
        used and the transposed pass stops there.
        """
        start = min(self.stage_of[n] for n in names)
        h0 = self.inputs[start]
        primal = {k: self.stage_params[self.stage_of[k]][k] for k in names}

        def f(p_s: Params) -> Tensor:
            h = h0
            for s in range(start, len(self.stages)):
                own = {k: v for k, v in p_s.items() if self.stage_of[k] == s}
                h = self.stages[s][1](h, {**self.stage_params[s], **own} if own else self.stage_params[s])
            return h

        def lin(t_s: Params) -> tuple[Tensor, Tensor]:
            z0, u = jvp(f, (primal,), (t_s,))
            return u, z0  # differentiate u (linear in t_s); z0 rides along as aux

        u, pull, z0 = vjp(lin, {k: tangent[k] for k in names}, has_aux=True)

        def pullback(w: Tensor) -> Params:
            return pull(w.to(u.dtype).reshape(u.shape))[0]

        return z0, u, pullback


def _work_dtype(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _flat(z: Tensor) -> Tensor:
    return _work_dtype(z.reshape(-1, z.shape[-1]))


def _minus_onehot_(w: Tensor, t: Tensor) -> Tensor:
    return w.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=w.dtype, device=w.device))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


# Logit-space work touches (tokens, V) tensors, the largest in the step. On CPU a fresh tensor of that size costs
# more in page faults than the arithmetic, so the functions below allocate at most one each and work in place.
# The block-independent part (softmax p of z₀, ℓ(z₀)) is computed once per batch (_LogitBase) and shared by the
# blocks of a layerwise step.


def _softmax_ce_(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(z) computed in place in ``z``, and Σ_tok CE = Σ (log Σ exp(z − m) + m − z_y), m the row max."""
    m = z.amax(dim=-1, keepdim=True)
    zy = z.gather(1, t)
    s = z.sub_(m).exp_().sum(-1, keepdim=True)
    ce = (s.log() + m - zy).sum()
    return z.div_(s), ce


class _LogitBase:
    """What the logit-space terms need from z₀, computed once per batch and shared by the blocks: p = softmax(z₀)
    and ℓ(z₀) (``kind`` "gn"), z₀ and ℓ(z₀) ("prox_linear"), or p alone ("ggn", label-free)."""

    def __init__(self, z0: Tensor, targets: Tensor | None, kind: str):
        z = _flat(z0)
        self.n = z.shape[0]
        self.t = targets.reshape(-1, 1) if targets is not None else None
        self.kind = kind
        if kind == "prox_linear":
            self.z0 = z
            self.loss0 = (torch.logsumexp(z, dim=-1).sum() - z.gather(1, self.t).sum()) / self.n
        elif kind == "gn":
            # a copy: the model's last tangent op may have saved its primal output for the transposed pass
            self.p, ce = _softmax_ce_(z.clone(), self.t)
            self.loss0 = ce / self.n
        else:
            self.p = torch.softmax(z, dim=-1)

    def terms(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """The block's surrogate value and its logit-space cotangent w (see :func:`_gn_terms`)."""
        if self.kind == "gn":
            return _gn_terms(self.p, self.loss0, u, self.t)
        return _prox_linear_terms(self.z0, u, self.t)

    def hvp(self, u: Tensor) -> Tensor:
        """H u = (p ⊙ u − p (pᵀu)) / N per token, N the number of tokens."""
        u = _flat(u)
        w = self.p * u
        pu = w.sum(-1, keepdim=True)
        return torch.sub(u, pu, out=w).mul_(self.p).div_(self.n)


def _gn_terms(p: Tensor, loss0: Tensor, u: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """q = ℓ(z₀) + gᵀu + ½ uᵀHu and the cotangent w = g + H u = (p ⊙ (1 + u − pᵀu) − e_y) / N, p = softmax(z₀).

    uᵀHu is read off w: N·wᵀu = N·gᵀu + N·uᵀHu.
    """
    u, t = _flat(u), targets
    n = t.shape[0]
    w = p * u  # the one allocation
    pu = w.sum(-1, keepdim=True)  # pᵀu per token
    torch.sub(u, pu, out=w).add_(1.0).mul_(p)
    _minus_onehot_(w, t)  # N·w
    gu = pu.sum() - u.gather(1, t).sum()  # N·gᵀu
    uhu = _dot(w, u) - gu  # N·uᵀHu
    value = loss0 + (gu + 0.5 * uhu) / n
    return value, w.div_(n)


def _prox_linear_terms(z0: Tensor, u: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """r = ℓ(z₀ + u) and its cotangent ∇ℓ(z₀ + u) = (softmax(z₀ + u) − e_y) / N."""
    u, t = _flat(u), targets
    n = t.shape[0]
    z = z0 + u  # the one allocation
    w, r = _softmax_ce_(z, t)
    return r / n, _minus_onehot_(w, t).div_(n)


def _resolve_blocks(params: Params, blocks: Sequence[Sequence[str]] | None) -> list[list[str]]:
    names = list(params)
    if blocks is None:
        return [names]
    _check_partition(names, [list(b) for b in blocks])
    return [list(b) for b in blocks]


def _check_partition(names: Sequence[str], blocks: list[list[str]]) -> None:
    known = set(names)
    owner: dict[str, int] = {}
    for i, block in enumerate(blocks):
        if not block:
            raise ConfigError(f"layerwise blocks: block {i} is empty; remove it or give it parameters")
        for n in block:
            if n not in known:
                raise ConfigError(f"layerwise blocks: block {i} names {n!r}, which is not a parameter of the model")
            if n in owner:
                raise ConfigError(f"layerwise blocks: parameter {n!r} is in two blocks ({owner[n]} and {i}); "
                                  "make the patterns disjoint")
            owner[n] = i
    missing = [n for n in names if n not in owner]
    if missing:
        raise ConfigError(f"layerwise blocks: {_name_list(missing)} in no block; add a pattern that matches it")


def _name_list(names: list[str]) -> str:
    if len(names) == 1:
        return f"parameter {names[0]!r} is"
    shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"parameters {shown} are"


def _detached(d: Params) -> Params:
    return {k: v.detach() for k, v in d.items()}


# --------------------------------------------------------------------------------------------------------------
# public API


def ggn_vector_product(model: nn.Module, params: Params, inputs: Tensor, targets: Tensor, vector: Params,
                       blocks: Sequence[Sequence[str]] | None = None) -> Params:
    r"""G v = Jᵀ H J v at ``params`` on one batch, H the logit-space Hessian of the mean cross-entropy.

    (H u)_tok = (p ⊙ u − p (pᵀu)) / N with p = softmax of the token's logits and N = B·T (closed form). With
    ``blocks`` (a partition of the parameter names) the product is with the block-diagonal GGN,
    (G_bd v)_b = J_bᵀ H J_b v_b. ``targets`` only fixes N here (H does not depend on the labels). Costs one jvp and
    one transposed jvp per block.
    """
    del targets  # H is label-free; N = B·T is read off the logits
    params, vector = _detached(params), _detached(vector)
    blocks_ = _resolve_blocks(params, blocks)
    out: Params = {}
    base: _LogitBase | None = None
    with math_attention(model), torch.no_grad():
        lin = _Linearization(model, params, inputs, blocks_)
        for names in blocks_:
            z0, u, pullback = lin.block(names, vector)
            base = _LogitBase(z0, None, "ggn") if base is None else base
            del z0
            hu = base.hvp(u)
            del u
            out.update(pullback(hu))
    return {k: out[k] for k in params}


def surrogate_grad(model: nn.Module, params0: Params, params: Params, inputs: Tensor, targets: Tensor,
                   kind: Literal["gn", "prox_linear"] = "gn", prox: float = 0.0,
                   blocks: Sequence[Sequence[str]] | None = None) -> tuple[Tensor, Params]:
    r"""Value and gradient w.r.t. ``params`` (φ) of the surrogate linearised at ``params0`` (θ₀) on one batch.

    With Δ = φ − θ₀, z₀ = f(θ₀), u = JΔ:

    * ``kind="gn"``: q = ℓ(z₀) + gᵀu + ½ uᵀHu, gradient Jᵀ(g + H u);
    * ``kind="prox_linear"``: r = ℓ(z₀ + u), gradient Jᵀ ∇ℓ(z₀ + u);
    * plus (prox/2)·‖Δ‖² (sum of squares of every entry) with gradient + prox·Δ.

    ``blocks`` (a partition of the parameter names, e.g. :func:`default_blocks`) selects layerwise GN: block b uses
    u_b = J_b Δ_b (other blocks frozen at θ₀) and gets gradient J_bᵀ(g + H u_b) (gn) or J_bᵀ∇ℓ(z₀ + u_b)
    (prox_linear). The returned loss is then

        ℓ(z₀) + Σ_b [s_b(Δ_b) − ℓ(z₀)] + (prox/2)‖Δ‖²,     s_b the block's surrogate,

    i.e. the loss at θ₀ plus every block's predicted change. It is exactly the function whose gradient is returned
    (for gn it is the quadratic model with the block-diagonal GGN) and equals the full surrogate for one block.
    ``blocks=None`` is full GN (one block of every parameter).

    Returns ``(loss, grads)``: a detached 0-d tensor and a dict covering every parameter of ``params``.
    """
    if kind not in ("gn", "prox_linear"):
        raise ConfigError(f"surrogate kind must be 'gn' or 'prox_linear', got {kind!r}")
    if set(params) != set(params0):
        raise ValueError("surrogate_grad: params and params0 must have the same names")
    params0 = _detached(params0)
    names_all = list(params0)
    delta = dict(zip(names_all, torch._foreach_sub([params[k].detach() for k in names_all],
                                                   [params0[k] for k in names_all])))
    blocks_ = _resolve_blocks(params0, blocks)
    grads: Params = {}
    base: _LogitBase | None = None
    change = None
    with math_attention(model), torch.no_grad():
        lin = _Linearization(model, params0, inputs, blocks_)
        for names in blocks_:
            z0, u, pullback = lin.block(names, delta)
            base = _LogitBase(z0, targets, kind) if base is None else base
            del z0
            value, w = base.terms(u)
            del u
            change = value - base.loss0 if change is None else change + (value - base.loss0)
            grads.update(pullback(w))
            del w, pullback
        loss0 = base.loss0
        del base, lin
        loss = loss0 + change
        if prox:
            sq = torch._foreach_norm(list(delta.values()))
            loss = loss + 0.5 * prox * torch.stack(sq).pow(2).sum().to(loss.dtype)
            names_g = list(grads)
            torch._foreach_add_([grads[k] for k in names_g], [delta[k] for k in names_g], alpha=prox)
    return loss.detach(), {k: grads[k] for k in params0}


def cg_solve(model: nn.Module, params0: Params, inputs: Tensor | Sequence[Batch], targets: Tensor | None = None,
             damping: float = 1e-4, max_iters: int = 100, tol: float = 1e-6,
             blocks: Sequence[Sequence[str]] | None = None, init: Params | None = None,
             reduce: Callable[[list[Tensor]], None] | None = None) -> tuple[Params, dict]:
    r"""Hessian-free GN step (Martens 2010): conjugate gradient on (G + λI) δ = −g for a fixed batch.

    G = Jᵀ H J and g = Jᵀ ∇ℓ(z₀) at ``params0``; with ``blocks``, G is block-diagonal (layerwise GN) and each CG
    iteration costs one jvp + transposed jvp per block. ``inputs, targets`` is one batch; alternatively pass a list
    of ``(inputs, targets)`` batches as ``inputs`` (and no targets): G and g are then averaged over the batches.
    ``init`` warm-starts δ. CG stops when ‖r‖ ≤ tol·‖g‖ or after ``max_iters`` products.
    ``reduce`` (data parallel): called in place on [g..., loss] and on every product G v of this process's batches,
    e.g. an all-reduce mean, so that every process runs the same iterations on the quadratic of all batches.

    Returns ``(delta, info)`` with info keys ``iterations``, ``residual_norm`` (‖(G+λI)δ + g‖), ``grad_norm``,
    ``relative_residual``, ``converged``, ``loss`` (ℓ(z₀)) and ``quadratic``: the damped model value
    ℓ + gᵀδ + ½ δᵀ(G + λI)δ at the returned δ (computed from CG's residual, no extra product).
    """
    if targets is None:
        batches = [(x, y) for x, y in inputs]  # type: ignore[misc]
    else:
        batches = [(inputs, targets)]  # type: ignore[list-item]
    if not batches:
        raise ValueError("cg_solve: no batches given")
    params0 = _detached(params0)
    names = list(params0)
    blocks = _resolve_blocks(params0, blocks) if blocks is not None else None
    nb = len(batches)

    loss_t = torch.zeros((), dtype=torch.float64, device=params0[names[0]].device)
    g = [torch.zeros_like(params0[k]) for k in names]
    for x, y in batches:
        l_b, g_b = surrogate_grad(model, params0, params0, x, y, kind="gn")
        loss_t += float(l_b) / nb
        torch._foreach_add_(g, [g_b[k] for k in names], alpha=1.0 / nb)
    if reduce is not None:
        reduce([*g, loss_t])
    loss = float(loss_t)

    def apply_a(v: list[Tensor]) -> list[Tensor]:
        vd = dict(zip(names, v))
        out = [torch.zeros_like(t) for t in v]
        for x, y in batches:
            gv = ggn_vector_product(model, params0, x, y, vd, blocks=blocks)
            torch._foreach_add_(out, [gv[k] for k in names], alpha=1.0 / nb)
        if reduce is not None:
            reduce(out)
        torch._foreach_add_(out, v, alpha=damping)
        return out

    def dot(a: list[Tensor], b: list[Tensor]) -> float:
        return float(sum((ai * bi).sum() for ai, bi in zip(a, b)))

    g_norm = math.sqrt(dot(g, g))
    if init is not None:
        x_ = [init[k].detach().clone() for k in names]
        r = torch._foreach_neg(g)
        torch._foreach_sub_(r, apply_a(x_))
    else:
        x_ = [torch.zeros_like(t) for t in g]
        r = torch._foreach_neg(g)
    p = [t.clone() for t in r]
    rs = dot(r, r)
    it = 0
    while it < max_iters and math.sqrt(rs) > tol * g_norm:
        ap = apply_a(p)
        pap = dot(p, ap)
        if pap <= 0:  # cannot happen for G ⪰ 0 and λ > 0 except through round-off
            break
        alpha = rs / pap
        torch._foreach_add_(x_, p, alpha=alpha)
        torch._foreach_add_(r, ap, alpha=-alpha)
        rs_new = dot(r, r)
        torch._foreach_mul_(p, rs_new / rs)
        torch._foreach_add_(p, r)
        rs = rs_new
        it += 1
    res = math.sqrt(rs)
    # (G+λI)δ = −g − r  ⇒  ℓ + gᵀδ + ½δᵀ(G+λI)δ = ℓ + ½(gᵀδ − rᵀδ)
    quad = loss + 0.5 * (dot(g, x_) - dot(r, x_))
    info = dict(iterations=it, residual_norm=res, grad_norm=g_norm,
                relative_residual=res / g_norm if g_norm > 0 else 0.0,
                converged=res <= tol * g_norm, loss=loss, quadratic=quad)
    return dict(zip(names, x_)), info


def blocks_from_patterns(names: Sequence[str], patterns: Sequence[Sequence[str]]) -> list[list[str]]:
    """Partition parameter ``names`` into blocks given ``fnmatch`` patterns per block.

    Each parameter must match the patterns of exactly one block; otherwise a one-line :class:`ConfigError` names the
    offending parameters. A block whose patterns match nothing is also an error. Names keep the model's order.
    """
    names = list(names)
    blocks: list[list[str]] = [[] for _ in patterns]
    owners: dict[str, list[int]] = {n: [] for n in names}
    for i, pats in enumerate(patterns):
        if isinstance(pats, str):
            raise ConfigError(f"layerwise blocks: block {i} must be a list of patterns, got the string {pats!r}")
        for n in names:
            if any(fnmatch.fnmatchcase(n, pat) for pat in pats):
                owners[n].append(i)
                blocks[i].append(n)
    missing = [n for n, o in owners.items() if not o]
    if missing:
        raise ConfigError(f"layerwise blocks: {_name_list(missing)} in no block; add a pattern that matches it")
    repeated = [n for n, o in owners.items() if len(o) > 1]
    if repeated:
        n = repeated[0]
        more = f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else ""
        raise ConfigError(f"layerwise blocks: parameter {n!r}{more} is in blocks {owners[n]}; "
                          "make the patterns disjoint")
    for i, b in enumerate(blocks):
        if not b:
            raise ConfigError(f"layerwise blocks: block {i} (patterns {list(patterns[i])}) matches no parameter; "
                              "fix or remove it")
    return blocks


def default_blocks(model: nn.Module) -> list[list[str]]:
    """The paper's layerwise partition for gnlm's GPT: [embedding], each transformer block (``ln_f`` joins the last
    one), [lm_head]; i.e. n_layers + 2 blocks."""
    names = [n for n, _ in model.named_parameters()]
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
    if not layers or not any(n.startswith("wte.") for n in names) or not any(n.startswith("lm_head.") for n in names):
        raise ConfigError("default_blocks needs gnlm's GPT parameter names (wte, blocks.i, ln_f, lm_head); "
                          "give gn.blocks as lists of patterns instead")
    patterns = [["wte.*"]] + [[f"blocks.{i}.*"] for i in layers] + [["lm_head.*"]]
    patterns[-2].append("ln_f.*")
    return blocks_from_patterns(names, patterns)
