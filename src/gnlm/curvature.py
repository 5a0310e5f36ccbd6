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

How it is computed. The map Δ ↦ u = JΔ is linear, so the reverse pass of its tangent computation *with respect to
the tangent* is Jᵀ: the tangent pass is recorded for reverse-mode autograd (θ₀ is a constant, so the primal is not
recorded) and the pull-back of a logit-space vector w is Jᵀw. One inner GN step costs one primal pass, one
tangent pass and its transpose; in matrix products 1 + 2 + 2 forwards against 1 + 2 for a baseline step.

Layerwise GN drops cross-block curvature. For a partition of the parameters into blocks b, block b is linearised
in its own parameters only (all others frozen at θ₀): u_b = J_b Δ_b and ∇_{φ_b} = J_bᵀ (g + H u_b). Only block b's
parameters carry a tangent, so the tangent starts at the first use of block b and the reverse pass stops there;
blocks near the output are cheap. The implied preconditioner is the block-diagonal G_bd = blockdiag_b(J_bᵀ H J_b).
Full GN is the special case of one block holding every parameter (same code path).

Two ways to linearise, same maths (the dense float64 tests run both):

* A model with ``gn_stages()`` (gnlm's GPT, see ``GPT.gn_stages``) describes its forward as a chain of stages, each
  with a hand-written tangent rule. The primal runs once, stage by stage, and every block's tangent joins at its
  first stage, so all blocks share one primal; a frozen weight costs one product in the tangent pass and one in
  its transpose (PyTorch's forward-mode AD multiplies by a materialised zero tangent instead); the norms, RoPE and
  attention-softmax tangents are a few fused ops; and there is no torch.func per-op overhead, which dominated
  small models. One reverse pass through the recorded tangents gives every block's J_bᵀ w_b.
* Any other model (a Hugging Face causal LM, a user's module): per block, one ``torch.func.jvp`` of the whole
  model from the inputs (z₀ and u together), transposed by wrapping it in ``torch.func.vjp`` with the tangent as
  the differentiated input. On a tiny HF Llama of the micro preset's sizes a GN inner step costs 2.04× an AdamW
  step and layerwise GN 4.19× full GN with 6 blocks (``benchmarks/gn_step_cost.py``, README "Bring your own").

Measured (``benchmarks/gn_step_cost.py``, CPU, 1 thread, BENCHMARKS.md): with the hand-written stages a GN inner
step costs 1.5–1.75× an AdamW step at the micro preset (torch.func: 2.1×) and layerwise GN 2.2–2.35× full GN with
6 blocks (3.7×), where the counted matrix products alone give 2.31× (2.42× for the 45m preset): every block's
tangent passes the vocabulary-sized output layer and back. Measured and dropped: stacking the blocks' tangents
through the frozen stages (one product per stage for all blocks) was 3–5% slower than one block at a time (the
copies that broadcasting the primal costs outweigh the larger products); ``torch.compile`` of ``surrogate_grad``
made the micro step 5–9% faster at 1.4× the memory after a first call of 20–80 s, and the nano step 22% faster
with one model per process but slower than eager with several (guards and recompilation).

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
    "batch_gradient",
    "damped_ggn_product",
    "cg_solve",
    "default_blocks",
    "blocks_from_patterns",
    "layerwise_blocks",
    "repeated_layer_blocks",
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


Cotangent = Callable[[Tensor, Tensor], Tensor]


class _Linearization:
    r"""Linearisation of one batch at θ₀ for a partition of the parameters into blocks.

    :meth:`pullback` forms u_b = J_b t_b for every block b (t_b: the tangent restricted to the block's parameters,
    all others frozen at θ₀), asks ``cotangent(z₀, u_b)`` for a logit-space vector w_b (it may overwrite u_b),
    and returns J_bᵀ w_b for every block (one dict over all parameters). The caller must be inside
    :func:`math_attention` and ``torch.no_grad``.

    With ``gn_stages`` the primal runs once, stage by stage, and each block's tangent goes through every stage from
    its first one; the last stage (the logits) is taken and transposed one block at a time, so that one
    logit-sized u_b exists at a time, and one reverse pass through the earlier stages finishes all blocks. Without
    stages each block is one ``torch.func.jvp`` of the whole model from the inputs, transposed by ``torch.func.vjp``.
    """

    def __init__(self, model: nn.Module, params0: Params, inputs: Tensor, blocks: list[list[str]]):
        self.model, self.params0, self.inputs, self.blocks = model, params0, inputs, blocks
        get = getattr(model, "gn_stages", None)
        self.stages = list(get()) if callable(get) else None
        if self.stages is None:
            return
        prefixes = [prefix for prefix, _ in self.stages]
        self.stage_of: dict[str, int] = {}
        for name in params0:
            owners = [i for i, prefix in enumerate(prefixes) if name.startswith(prefix)]
            if not owners:
                raise ValueError(f"{type(model).__name__}.gn_stages(): parameter {name!r} belongs to no stage "
                                 f"(prefixes {prefixes})")
            self.stage_of[name] = owners[0]
        self.stage_params: list[Params] = [{} for _ in self.stages]
        for name, v in params0.items():
            self.stage_params[self.stage_of[name]][name] = v
        self.owner = {n: b for b, names in enumerate(blocks) for n in names}

    def pullback(self, tangent: Params, cotangent: Cotangent) -> Params:
        if self.stages is None:
            return self._pullback_func(tangent, cotangent)
        return self._pullback_stages(tangent, cotangent)

    def _pullback_func(self, tangent: Params, cotangent: Cotangent) -> Params:
        out: Params = {}
        for names in self.blocks:
            primal = {k: self.params0[k] for k in names}
            frozen = {k: v for k, v in self.params0.items() if k not in primal}

            def f(p_s: Params, frozen: Params = frozen) -> Tensor:
                return _logits(functional_call(self.model, {**frozen, **p_s}, (self.inputs,)))

            def lin(t_s: Params, f: Callable = f, primal: Params = primal) -> tuple[Tensor, Tensor]:
                z0, u = jvp(f, (primal,), (t_s,))
                return u, z0  # differentiate u (linear in t_s); z0 rides along as aux

            u, pull, z0 = vjp(lin, {k: tangent[k] for k in names}, has_aux=True)
            w = cotangent(z0, u)
            out.update(pull(w.to(u.dtype).reshape(u.shape))[0])
        return out

    def _pullback_stages(self, tangent: Params, cotangent: Cotangent) -> Params:
        leaf = {n: t.detach().requires_grad_(True) for n, t in tangent.items()}
        own = [{n: leaf[n] for n in stage_params} for stage_params in self.stage_params]
        last = len(self.stages) - 1
        grads: dict[str, Tensor | None] = {}
        with torch.enable_grad():  # records the tangent computation only: the primal does not require grad
            h, flowing = self.inputs, {}  # flowing: block -> the tangent of h it has so far
            for s in range(last):
                h, stage_jvp = self.stages[s][1](h, self.stage_params[s])
                flowing = {b: stage_jvp(flowing.get(b), self._of(own[s], b))
                           for b in range(len(self.blocks)) if b in flowing or self._of(own[s], b)}
            z0, stage_jvp = self.stages[last][1](h, self.stage_params[last])
            cot: dict[int, Tensor] = {}
            for b in range(len(self.blocks)):  # one logit-sized u_b and w_b at a time
                t_in, p_t = flowing.get(b), self._of(own[last], b)
                u = stage_jvp(t_in, p_t)
                with torch.no_grad():  # w is written over u, which the reverse pass never reads; .data (unlike
                    # .detach) has its own version counter, so autograd does not rebuild u's view history for it
                    w = cotangent(z0, u.data).to(u.dtype).reshape(u.shape)
                got = torch.autograd.grad(u, ([] if t_in is None else [t_in]) + list(p_t.values()), w,
                                          allow_unused=True)
                del u, w
                if t_in is not None:
                    cot[b], got = got[0], got[1:]
                grads.update(zip(p_t, got))
            rest = [n for n in self.params0 if n not in grads]
            if rest:
                got = torch.autograd.grad([flowing[b] for b in cot], [leaf[n] for n in rest], list(cot.values()),
                                          allow_unused=True)
                grads.update(zip(rest, got))
        return {n: torch.zeros_like(self.params0[n]) if g is None else g for n, g in grads.items()}

    def _of(self, stage_tangents: Params, b: int) -> Params:
        """The tangents of block b's parameters among one stage's."""
        return {n: t for n, t in stage_tangents.items() if self.owner[n] == b}


def _work_dtype(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _flat(z: Tensor) -> Tensor:
    return _work_dtype(z.reshape(-1, z.shape[-1]))


def _minus_onehot_(w: Tensor, t: Tensor, value: float) -> Tensor:
    return w.scatter_add_(1, t, torch.full(t.shape, -value, dtype=w.dtype, device=w.device))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


# Logit-space work touches (tokens, V) tensors, the largest in the step. On CPU a fresh tensor of that size costs
# more in page faults than the arithmetic, so the functions below allocate at most one each and work in place.
# The block-independent part (p/N with p = softmax(z₀), ℓ(z₀)) is computed once per batch (_LogitBase) and shared
# by the blocks of a layerwise step.


def _softmax_ce(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(z) (a new tensor) and Σ_tok CE = Σ (m − log p_m − z_y) with m the row max: its probability is
    p_m = 1/Σ exp(z − m), so the log-sum-exp needs no second pass over z and cannot underflow."""
    p = torch.softmax(z, dim=-1)
    ce = (z.amax(-1) - p.amax(-1).log() - z.gather(1, t).squeeze(1)).sum()
    return p, ce


class _LogitBase:
    """What the logit-space terms need from z₀, computed once per batch and shared by the blocks: pn = p/N with
    p = softmax(z₀) and ℓ(z₀) (``kind`` "gn"), z₀ and ℓ(z₀) ("prox_linear"), or pn alone ("ggn", label-free)."""

    def __init__(self, z0: Tensor, targets: Tensor | None, kind: str):
        z = _flat(z0)
        self.n = z.shape[0]
        self.t = targets.reshape(-1, 1) if targets is not None else None
        self.kind = kind
        if kind == "prox_linear":
            self.z0 = z
            self.loss0 = (torch.logsumexp(z, dim=-1).sum() - z.gather(1, self.t).sum()) / self.n
        elif kind == "gn":
            p, ce = _softmax_ce(z, self.t)
            self.pn, self.loss0 = p.div_(self.n), ce / self.n
        else:
            self.pn = torch.softmax(z, dim=-1).div_(self.n)

    def terms_(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """The block's logit-space cotangent w, written over u, and a part of its surrogate value (see
        :func:`_gn_terms_`, :func:`_prox_linear_terms_`)."""
        if self.kind == "gn":
            return _gn_terms_(self.pn, u, self.t)
        return _prox_linear_terms_(self.z0, u, self.t)

    def hvp_(self, u: Tensor) -> Tensor:
        """H u = (p ⊙ u − p (pᵀu)) / N per token (N the number of tokens), written over u."""
        u = _flat(u)
        return u.sub_(_rowdot(self.pn, u), alpha=self.n).mul_(self.pn)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a ⊙ b per row, (N, 1), without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)


def _gn_terms_(pn: Tensor, u: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """gᵀu and the cotangent w = g + H u = (p ⊙ (1 + u − pᵀu) − e_y) / N written over u, from pn = p/N.

    The quadratic term ½ uᵀHu is not formed here: wᵀu = gᵀu + uᵀHu and wᵀu = ⟨Jᵀw, Δ⟩ in parameter space,
    which :func:`surrogate_grad` reads off the gradient (no pass over the logits).
    """
    u, t = _flat(u), targets
    n = t.shape[0]
    s = _rowdot(pn, u)  # pᵀu / N per token
    gu = s.sum() - u.gather(1, t).sum() / n
    torch.addcmul(pn, pn, u.sub_(s, alpha=n), out=u)  # p ⊙ (1 + u − pᵀu) / N
    return gu, _minus_onehot_(u, t, 1.0 / n)


def _prox_linear_terms_(z0: Tensor, u: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """r = ℓ(z₀ + u) and its cotangent ∇ℓ(z₀ + u) = (softmax(z₀ + u) − e_y) / N (z₀ + u formed in u)."""
    u, t = _flat(u), targets
    n = t.shape[0]
    w, r = _softmax_ce(u.add_(z0), t)
    return r / n, _minus_onehot_(w.div_(n), t, 1.0 / n)


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
    base: list[_LogitBase] = []

    def cotangent(z0: Tensor, u: Tensor) -> Tensor:
        if not base:
            base.append(_LogitBase(z0, None, "ggn"))
        return base[0].hvp_(u)

    with math_attention(model), torch.no_grad():
        out = _Linearization(model, params, inputs, blocks_).pullback(vector, cotangent)
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
    base: list[_LogitBase] = []
    parts: list[Tensor] = []  # per block: gᵀu_b (gn) or r_b (prox_linear)

    def cotangent(z0: Tensor, u: Tensor) -> Tensor:
        if not base:
            base.append(_LogitBase(z0, targets, kind))
        part, w = base[0].terms_(u)
        parts.append(part)
        return w

    with math_attention(model), torch.no_grad():
        grads = _Linearization(model, params0, inputs, blocks_).pullback(delta, cotangent)
        loss0 = base.pop().loss0  # frees p
        if kind == "gn":  # Σ_b (gᵀu_b + ½ u_bᵀHu_b) = ½ Σ_b (gᵀu_b + w_bᵀu_b), and Σ_b w_bᵀu_b = ⟨grads, Δ⟩
            wu = torch.stack([_dot(grads[k], delta[k]) for k in names_all]).sum()
            loss = loss0 + 0.5 * (torch.stack(parts).sum() + wu.to(loss0.dtype))
        else:
            loss = loss0 + (torch.stack(parts) - loss0).sum()
        if prox:
            sq = torch._foreach_norm(list(delta.values()))
            loss = loss + 0.5 * prox * torch.stack(sq).pow(2).sum().to(loss.dtype)
            names_g = list(grads)
            torch._foreach_add_([grads[k] for k in names_g], [delta[k] for k in names_g], alpha=prox)
    return loss.detach(), {k: grads[k] for k in params0}


def damped_ggn_product(model: nn.Module, params: Params, batches: Sequence[Batch], vector: Params, damping: float,
                       blocks: Sequence[Sequence[str]] | None = None,
                       reduce: Callable[[list[Tensor]], Any] | None = None) -> Params:
    r"""M v = (G + λI) v at ``params`` with G the mean GGN of ``batches`` (a list of ``(inputs, targets)``).

    M v = (1/n_b) Σ_b G_b v + λ v, G_b = J_bᵀ H_b J_b of batch b (:func:`ggn_vector_product`; block-diagonal with
    ``blocks``). ``reduce`` (data parallel, e.g. an all-reduce mean) is called in place on the list of the
    (1/n_b) Σ_b G_b v entries before λ v is added, so every process gets M of all processes' batches. The one
    damped-curvature operator: CG's products (:func:`cg_solve`) and the probe's (``gnlm.oracle``) are this.
    """
    if not batches:
        raise ValueError("damped_ggn_product: no batches given")
    names = list(params)
    nb = len(batches)
    out = [torch.zeros_like(vector[k]) for k in names]
    for x, y in batches:
        gv = ggn_vector_product(model, params, x, y, vector, blocks=blocks)
        torch._foreach_add_(out, [gv[k] for k in names], alpha=1.0 / nb)
    if reduce is not None:
        reduce(out)
    torch._foreach_add_(out, [vector[k] for k in names], alpha=damping)
    return dict(zip(names, out))


def batch_gradient(model: nn.Module, params0: Params, batches: Sequence[Batch],
                   reduce: Callable[[list[Tensor]], None] | None = None) -> tuple[float, Params]:
    """The mean loss ℓ(z₀) and gradient g = Jᵀ∇ℓ(z₀) at ``params0`` over equal-sized ``batches`` (the GN surrogate's
    gradient at φ = θ), ``reduce``d over the ranks (data parallel) like every product of :func:`cg_solve`."""
    names = list(params0)
    loss_t = torch.zeros((), dtype=torch.float64, device=params0[names[0]].device)
    g = [torch.zeros_like(params0[k]) for k in names]
    for x, y in batches:
        l_b, g_b = surrogate_grad(model, params0, params0, x, y, kind="gn")
        loss_t += float(l_b) / len(batches)
        torch._foreach_add_(g, [g_b[k] for k in names], alpha=1.0 / len(batches))
    if reduce is not None:
        reduce([*g, loss_t])
    return float(loss_t), dict(zip(names, g))


def cg_solve(model: nn.Module, params0: Params, inputs: Tensor | Sequence[Batch], targets: Tensor | None = None,
             damping: float = 1e-4, max_iters: int = 100, tol: float = 1e-6,
             blocks: Sequence[Sequence[str]] | None = None, init: Params | None = None,
             reduce: Callable[[list[Tensor]], None] | None = None,
             gradient: tuple[float, Params] | None = None) -> tuple[Params, dict]:
    r"""Hessian-free GN step (Martens 2010): conjugate gradient on (G + λI) δ = −g for a fixed batch.

    G = Jᵀ H J and g = Jᵀ ∇ℓ(z₀) at ``params0``; with ``blocks``, G is block-diagonal (layerwise GN) and each CG
    iteration costs one jvp + transposed jvp per block. ``inputs, targets`` is one batch; alternatively pass a list
    of ``(inputs, targets)`` batches as ``inputs`` (and no targets): G and g are then averaged over the batches.
    ``init`` warm-starts δ. CG stops when ‖r‖ ≤ tol·‖g‖ or after ``max_iters`` products. ``gradient``: the batches'
    ``(loss, g)`` from :func:`batch_gradient` when the caller has it (several solves on one batch), else computed.
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
    loss, grad = gradient if gradient is not None else batch_gradient(model, params0, batches, reduce)
    g = [grad[k] for k in names]

    def apply_a(v: list[Tensor]) -> list[Tensor]:
        out = damped_ggn_product(model, params0, batches, dict(zip(names, v)), damping, blocks=blocks, reduce=reduce)
        return [out[k] for k in names]

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


def layerwise_blocks(model_or_names: nn.Module | Sequence[str],
                     patterns: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """The layerwise partition of a model's parameters (or of parameter names): the blocks of ``patterns``
    (:func:`blocks_from_patterns`), or by default the paper's partition for gnlm's GPT (:func:`default_blocks`)
    and the repeated layers for any other module (:func:`repeated_layer_blocks`). The one place both the config
    check (before any compute) and the trainers resolve it."""
    if isinstance(model_or_names, nn.Module):
        names = [n for n, _ in model_or_names.named_parameters()]
    else:
        names = list(model_or_names)
    if patterns is not None:
        return blocks_from_patterns(names, patterns)
    if isinstance(model_or_names, nn.Module) and not callable(getattr(model_or_names, "gn_stages", None)):
        return repeated_layer_blocks(model_or_names)
    return default_blocks(names)


def repeated_layer_blocks(model: nn.Module) -> list[list[str]]:
    """The layerwise partition of a module gnlm did not write: its repeated layers (the ``nn.ModuleList`` of two or
    more modules of one type holding the most parameters, e.g. a Hugging Face model's decoder layers) one block
    each, the parameters before them (embeddings) one block and those after them (final norm and output layer)
    one block. A one-line ConfigError when the module has no such list."""
    names = [n for n, _ in model.named_parameters()]
    best: tuple[int, str, nn.ModuleList] | None = None
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, prefix, module)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of repeated layers (an nn.ModuleList) to make the "
                          f"layerwise blocks of; give gn.blocks as lists of parameter-name patterns")
    _, prefix, layers = best
    per_layer = [[f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()] for i, layer in enumerate(layers)]
    inside = {n for b in per_layer for n in b}
    first = min(names.index(b[0]) for b in per_layer if b)
    before = [n for n in names[:first] if n not in inside]
    after = [n for n in names[first:] if n not in inside]
    blocks = [b for b in [before, *per_layer, after] if b]
    _check_partition(names, blocks)
    return blocks


def default_blocks(model_or_names: nn.Module | Sequence[str]) -> list[list[str]]:
    """The paper's layerwise partition for gnlm's GPT: [embedding], each transformer block (``ln_f`` joins the last
    one), [lm_head]; i.e. n_layers + 2 blocks."""
    if isinstance(model_or_names, nn.Module):
        names = [n for n, _ in model_or_names.named_parameters()]
    else:
        names = list(model_or_names)
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
    if not layers or not any(n.startswith("wte.") for n in names) or not any(n.startswith("lm_head.") for n in names):
        raise ConfigError("default_blocks needs gnlm's GPT parameter names (wte, blocks.i, ln_f, lm_head); "
                          "give gn.blocks as lists of patterns instead")
    patterns = [["wte.*"]] + [[f"blocks.{i}.*"] for i in layers] + [["lm_head.*"]]
    patterns[-2].append("ln_f.*")
    return blocks_from_patterns(names, patterns)
