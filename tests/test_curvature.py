"""Curvature maths against dense ground truth (float64, tiny models).

Ground truth: the parameters flattened into one vector, the dense Jacobian J of the logits (``torch.func.jacrev``),
the dense Hessian H of the mean cross-entropy w.r.t. the logits (``torch.func.hessian``, not the closed form), and
G = Jᵀ H J.

Every model is taken off its initialisation (``randomize_parameters``: norm weights 1 + 0.5·N(0, 1), biases
0.5·N(0, 1), matrix rows rescaled): at init every norm weight is 1 and every bias 0, and a tangent rule that drops
a norm weight gives the same numbers. ``tests/mutation_check.py`` checks that such bugs make these tests fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_parameters
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from gnlm.config import ConfigError
from gnlm.curvature import (
    blocks_from_patterns,
    cg_solve,
    default_blocks,
    ggn_vector_product,
    math_attention,
    surrogate_grad,
)
from gnlm.model import GPT, ModelConfig

torch.set_num_threads(1)
DT = torch.float64


class TinyLM(nn.Module):
    """Embedding -> causal running mean -> tanh MLP -> lm_head: a non-transformer language model."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x.cumsum(1) / torch.arange(1, idx.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.head(x + self.fc2(torch.tanh(self.fc1(x))))


class FuncGPT(GPT):
    """gnlm's GPT without its hand-written linearisation (``gn_stages``): curvature.py uses torch.func instead."""

    gn_stages = None


def tiny_gpt(n_layers: int = 1, attention: str = "math", cls: type = GPT):
    cfg = ModelConfig(d_model=16, n_layers=n_layers, n_heads=2, d_ff=32, vocab_size=11, max_seq_len=5,
                      initializer_range=1.0, attention=attention)
    return cls(cfg)


def make(kind: str, seed: int = 0):
    """``kind``: mlp | gpt | gpt2 (layers), with ``-func`` the GPT linearised by torch.func instead of its
    hand-written rules (same parameters). The parameters are off their initialisation (``randomize_parameters``)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model, vocab = TinyLM(), 7
    else:
        cls = FuncGPT if kind.endswith("-func") else GPT
        model, vocab = tiny_gpt(n_layers=2 if kind.startswith("gpt2") else 1, cls=cls), 11
    model = randomize_parameters(model.to(DT), seed=seed).eval()
    x = torch.randint(0, vocab, (2, 5))
    y = torch.randint(0, vocab, (2, 5))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params, x, y


class Dense:
    """Dense J, H, g, G of a model at params on one batch."""

    def __init__(self, model, params, x, y):
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        theta = self.flat(params)
        with math_attention(model):
            z0 = functional_call(model, params, (x,))
            self.J = jacrev(lambda th: functional_call(model, self.unflat(th), (x,)).reshape(-1))(theta)
        V = z0.shape[-1]

        def ce(z):
            return F.cross_entropy(z.reshape(-1, V), y.reshape(-1))

        zf = z0.reshape(-1)
        self.z0, self.ce = zf, ce
        self.loss = ce(zf)
        self.gz = grad(ce)(zf)
        self.H = hessian(ce)(zf)
        self.G = self.J.T @ self.H @ self.J
        self.g = self.J.T @ self.gz

    def flat(self, d):
        return torch.cat([d[k].reshape(-1) for k in self.names])

    def unflat(self, v):
        return {k: t.reshape(s) for k, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def block_owner(self, blocks):
        """The block of every entry of the flat parameter vector."""
        owner = torch.empty(sum(self.sizes), dtype=torch.long)
        offset = dict(zip(self.names, torch.tensor([0, *self.sizes]).cumsum(0).tolist()))
        for b, names in enumerate(blocks):
            for n in names:
                owner[offset[n]: offset[n] + self.sizes[self.names.index(n)]] = b
        return owner

    def block_mask(self, blocks):
        owner = self.block_owner(blocks)
        return owner[:, None] == owner[None, :]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def random_like(params, scale=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


def plus(a, b, s=1.0):
    return {k: a[k] + s * b[k] for k in a}


@pytest.mark.parametrize("kind", ["gpt", "gpt2"])
def test_models_are_off_initialisation(kind):
    """At init (norm weights 1, biases 0) the exactness tests cannot see a dropped norm weight or bias."""
    _, params, _, _ = make(kind)
    one_d = {k: v for k, v in params.items() if v.ndim == 1}
    assert any(k.endswith("norm.bias") for k in one_d) and any(k.endswith("norm.weight") for k in one_d)
    for k, v in one_d.items():
        ref = torch.zeros_like(v) if k.endswith("bias") else torch.ones_like(v)
        assert (v - ref).abs().min() > 0 and (v - ref).std() > 0.2, k


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "gpt2-func"])
def test_ggn_vector_product_matches_dense(kind):
    model, params, x, y = make(kind)
    dense = Dense(model, params, x, y)
    v = random_like(params, 1.0)
    gv = ggn_vector_product(model, params, x, y, v)
    assert rel(dense.flat(gv), dense.G @ dense.flat(v)) < 1e-8


@pytest.mark.parametrize("kind", ["mlp", "gpt", "gpt-func"])
def test_gn_surrogate_grad_matches_dense(kind):
    model, params0, x, y = make(kind)
    dense = Dense(model, params0, x, y)
    delta = random_like(params0, 0.05)
    d = dense.flat(delta)
    loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn")
    assert rel(dense.flat(grads), dense.g + dense.G @ d) < 1e-8
    q = dense.loss + dense.g @ d + 0.5 * d @ dense.G @ d
    assert abs(float(loss - q)) < 1e-10


@pytest.mark.parametrize("kind", ["gn", "prox_linear"])
@pytest.mark.parametrize("model_kind", ["mlp", "gpt", "gpt-func"])
def test_surrogate_with_prox_matches_dense(kind, model_kind):
    """Value and gradient with the prox term against the dense ones: gn ℓ + gᵀu + ½uᵀHu, gradient g + GΔ;
    prox_linear ℓ(z₀ + JΔ), gradient Jᵀ∇ℓ(z₀ + JΔ) (torch.func.grad of the cross-entropy); both + (λ/2)‖Δ‖², + λΔ."""
    model, params0, x, y = make(model_kind)
    dense = Dense(model, params0, x, y)
    delta, lam = random_like(params0, 0.1), 0.3
    d = dense.flat(delta)
    loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind=kind, prox=lam)
    if kind == "gn":
        want_loss, want_grad = dense.loss + dense.g @ d + 0.5 * d @ dense.G @ d, dense.g + dense.G @ d
    else:
        z = dense.z0 + dense.J @ d
        want_loss, want_grad = dense.ce(z), dense.J.T @ grad(dense.ce)(z)
    assert abs(float(loss - (want_loss + 0.5 * lam * d @ d))) < 1e-10
    assert rel(dense.flat(grads), want_grad + lam * d) < 1e-8


@pytest.mark.parametrize("kind", ["gn", "prox_linear"])
@pytest.mark.parametrize("model_kind", ["mlp", "gpt", "gpt-func"])
def test_surrogate_grad_equals_finite_differences(kind, model_kind):
    model, params0, x, y = make(model_kind)
    phi = plus(params0, random_like(params0, 0.1))
    _, grads = surrogate_grad(model, params0, phi, x, y, kind=kind, prox=0.3)
    eps = 1e-5
    for seed in (2, 3):
        v = random_like(params0, 1.0, seed=seed)
        lp, _ = surrogate_grad(model, params0, plus(phi, v, eps), x, y, kind=kind, prox=0.3)
        lm, _ = surrogate_grad(model, params0, plus(phi, v, -eps), x, y, kind=kind, prox=0.3)
        fd = float(lp - lm) / (2 * eps)
        an = float(sum((grads[k] * v[k]).sum() for k in v))
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), (fd, an)


def test_gn_and_prox_linear_agree_to_second_order():
    model, params0, x, y = make("gpt")
    delta = random_like(params0, 0.05)
    diffs = []
    for t in (1.0, 0.5, 0.25):
        phi = plus(params0, delta, t)
        q, gq = surrogate_grad(model, params0, phi, x, y, kind="gn")
        r, gr = surrogate_grad(model, params0, phi, x, y, kind="prox_linear")
        diffs.append(abs(float(q - r)))
    ratios = [diffs[i] / diffs[i + 1] for i in range(2)]
    print("gn vs prox-linear |q - r| at t=1, 1/2, 1/4:", diffs, "ratios", ratios)
    assert all(6.0 < r < 10.0 for r in ratios), ratios  # ≈ 8: the difference is O(‖Δ‖³)
    # at Δ = 0 both surrogates equal the loss and have the true gradient
    q0, g0 = surrogate_grad(model, params0, params0, x, y, kind="gn")
    r0, h0 = surrogate_grad(model, params0, params0, x, y, kind="prox_linear")
    dense = Dense(model, params0, x, y)
    assert abs(float(q0 - dense.loss)) < 1e-12 and abs(float(r0 - dense.loss)) < 1e-12
    assert rel(dense.flat(g0), dense.g) < 1e-10 and rel(dense.flat(h0), dense.g) < 1e-10


@pytest.mark.parametrize("kind", ["gn", "prox_linear"])
def test_prox_term_pulls_toward_params0(kind):
    model, params0, x, y = make("mlp")
    delta = random_like(params0, 0.1)
    phi = plus(params0, delta)
    lam = 0.7
    l0, g0 = surrogate_grad(model, params0, phi, x, y, kind=kind, prox=0.0)
    l1, g1 = surrogate_grad(model, params0, phi, x, y, kind=kind, prox=lam)
    sq = sum(float(d.pow(2).sum()) for d in delta.values())
    assert abs(float(l1 - l0) - 0.5 * lam * sq) < 1e-12
    for k in delta:  # the prox gradient alone is +λΔ: a descent step moves φ back toward θ₀
        torch.testing.assert_close(g1[k] - g0[k], lam * delta[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_cg_solve_converges_to_dense_gn_step(kind):
    model, params0, x, y = make(kind)
    dense = Dense(model, params0, x, y)
    lam = 1e-3
    star = -torch.linalg.solve(dense.G + lam * torch.eye(dense.G.shape[0], dtype=DT), dense.g)
    delta, info = cg_solve(model, params0, x, y, damping=lam, max_iters=400, tol=1e-10)
    err = rel(dense.flat(delta), star)
    print(f"{kind}: CG reached relative error {err:.2e} to the dense GN step in {info['iterations']} iterations")
    assert err <= 1e-6
    d = dense.flat(delta)
    quad = dense.loss + dense.g @ d + 0.5 * d @ (dense.G @ d + lam * d)
    assert abs(info["quadratic"] - float(quad)) < 1e-8
    assert info["loss"] == pytest.approx(float(dense.loss), abs=1e-12)


def test_cg_solve_on_several_batches_averages_them():
    model, params0, x, y = make("mlp")
    _, _, x2, y2 = make("mlp", seed=5)
    d1, d2 = Dense(model, params0, x, y), Dense(model, params0, x2, y2)
    G, g = (d1.G + d2.G) / 2, (d1.g + d2.g) / 2
    lam = 1e-2
    star = -torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=DT), g)
    delta, info = cg_solve(model, params0, [(x, y), (x2, y2)], damping=lam, max_iters=300, tol=1e-10)
    assert rel(d1.flat(delta), star) <= 1e-6
    # a warm start at the solution stops at once
    _, info2 = cg_solve(model, params0, [(x, y), (x2, y2)], damping=lam, max_iters=300, tol=1e-6, init=delta)
    assert info2["iterations"] <= 1


@pytest.mark.parametrize("kind", ["gpt", "gpt-func"])
def test_layerwise_gradients_match_dense_block_diagonal(kind):
    model, params0, x, y = make(kind)
    blocks = default_blocks(model)
    dense = Dense(model, params0, x, y)
    Gbd = dense.G * dense.block_mask(blocks)
    delta = random_like(params0, 0.05)
    d = dense.flat(delta)
    loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn", blocks=blocks)
    assert rel(dense.flat(grads), dense.g + Gbd @ d) < 1e-8
    # the loss is the block-diagonal quadratic model: ℓ + gᵀJΔ + ½ Δᵀ G_bd Δ
    assert abs(float(loss) - float(dense.loss + dense.g @ d + 0.5 * d @ Gbd @ d)) < 1e-10
    # cross-block curvature really is dropped (the test would be vacuous otherwise)
    assert rel(dense.flat(grads), dense.g + dense.G @ d) > 1e-3
    # ggn_vector_product with blocks is the block-diagonal product
    gv = ggn_vector_product(model, params0, x, y, delta, blocks=blocks)
    assert rel(dense.flat(gv), Gbd @ d) < 1e-8
    # one block holding everything is full GN
    l_full, g_full = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn", blocks=[list(params0)])
    l_none, g_none = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn")
    assert abs(float(l_full - l_none)) < 1e-12 and rel(dense.flat(g_full), dense.flat(g_none)) < 1e-12


@pytest.mark.parametrize("kind", ["gpt", "gpt-func"])
def test_layerwise_prox_linear_matches_dense(kind):
    """Block b is linearised in its own parameters: value ℓ(z₀) + Σ_b [ℓ(z₀ + J Δ_b) − ℓ(z₀)] + (λ/2)‖Δ‖² and
    gradient (Jᵀ∇ℓ(z₀ + J Δ_b)) on block b's entries + λΔ, with Δ_b = Δ restricted to block b (dense J)."""
    model, params0, x, y = make(kind)
    blocks = default_blocks(model)
    dense = Dense(model, params0, x, y)
    owner = dense.block_owner(blocks)
    delta, lam = random_like(params0, 0.1), 0.2
    d = dense.flat(delta)
    loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="prox_linear", prox=lam,
                                 blocks=blocks)
    want_loss, want_grad = dense.loss + 0.5 * lam * d @ d, lam * d
    for b in range(len(blocks)):
        z = dense.z0 + dense.J @ (d * (owner == b))
        want_loss = want_loss + dense.ce(z) - dense.loss
        want_grad = want_grad + (dense.J.T @ grad(dense.ce)(z)) * (owner == b)
    assert abs(float(loss - want_loss)) < 1e-10
    assert rel(dense.flat(grads), want_grad) < 1e-8


@pytest.mark.parametrize("kind", ["gpt", "gpt-func"])
def test_layerwise_prox_linear_matches_finite_differences(kind):
    model, params0, x, y = make(kind)
    blocks = default_blocks(model)
    phi = plus(params0, random_like(params0, 0.1))
    _, grads = surrogate_grad(model, params0, phi, x, y, kind="prox_linear", prox=0.2, blocks=blocks)
    v, eps = random_like(params0, 1.0, seed=4), 1e-5
    lp, _ = surrogate_grad(model, params0, plus(phi, v, eps), x, y, kind="prox_linear", prox=0.2, blocks=blocks)
    lm, _ = surrogate_grad(model, params0, plus(phi, v, -eps), x, y, kind="prox_linear", prox=0.2, blocks=blocks)
    fd, an = float(lp - lm) / (2 * eps), float(sum((grads[k] * v[k]).sum() for k in v))
    assert abs(fd - an) <= 1e-7 * max(1.0, abs(an))


def test_layerwise_cg_matches_dense_block_diagonal_solve():
    model, params0, x, y = make("gpt")
    blocks = default_blocks(model)
    dense = Dense(model, params0, x, y)
    Gbd = dense.G * dense.block_mask(blocks)
    lam = 1e-3
    star = -torch.linalg.solve(Gbd + lam * torch.eye(Gbd.shape[0], dtype=DT), dense.g)
    delta, info = cg_solve(model, params0, x, y, damping=lam, max_iters=400, tol=1e-7, blocks=blocks)
    err = rel(dense.flat(delta), star)
    print(f"layerwise CG: relative error {err:.2e} in {info['iterations']} iterations")
    assert err <= 1e-5


@pytest.mark.parametrize("kind", ["gn", "prox_linear"])
def test_hand_written_linearisation_equals_torch_func(kind):
    """GPT's hand-written stage rules (one primal shared by all blocks) give what torch.func gives from the ids,
    for the default partition, full GN, and partitions whose blocks share stages or skip some."""
    model, params0, x, y = make("gpt2")
    func, _, _, _ = make("gpt2-func")
    names = list(params0)
    delta = random_like(params0, 0.05)
    partitions = [default_blocks(model), None,
                  [["wte.weight", "lm_head.weight"], [n for n in names if n[:3] not in ("wte", "lm_")]],
                  [[n for n in names if ".attn." in n],
                   [n for n in names if n.startswith("blocks.") and ".attn." not in n],
                   ["wte.weight", "ln_f.weight"], ["lm_head.weight"]]]
    for bl in partitions:
        l1, g1 = surrogate_grad(model, params0, plus(params0, delta), x, y, kind=kind, prox=0.1, blocks=bl)
        l2, g2 = surrogate_grad(func, params0, plus(params0, delta), x, y, kind=kind, prox=0.1, blocks=bl)
        assert abs(float(l1 - l2)) < 1e-13
        gv1 = ggn_vector_product(model, params0, x, y, delta, blocks=bl)
        gv2 = ggn_vector_product(func, params0, x, y, delta, blocks=bl)
        for k in params0:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(gv1[k], gv2[k], rtol=1e-12, atol=1e-14)


def test_counted_flops_of_the_hand_written_linearisation():
    """Every product is counted (FlopCounterMode skips in-place products such as addmm_): full GN is a primal, a
    tangent and a transposed pass, 1 + 2 + 2 forwards, plus the logit-space pᵀu (2NV); layerwise GN with frozen
    weights at one product each costs less than torch.func's."""
    from gnlm.accounting import count_flops

    model, params0, x, y = make("gpt2")
    func, _, _, _ = make("gpt2-func")
    phi = plus(params0, random_like(params0))
    forward, _ = count_flops(lambda: model(x))
    n, V = x.numel(), model.cfg.vocab_size
    for m in (model, func):
        gn, _ = count_flops(lambda m=m: surrogate_grad(m, params0, phi, x, y))
        assert gn == 5 * forward + 2 * n * V
    blocks = default_blocks(model)
    layerwise, _ = count_flops(lambda: surrogate_grad(model, params0, phi, x, y, blocks=blocks))
    layerwise_func, _ = count_flops(lambda: surrogate_grad(func, params0, phi, x, y, blocks=blocks))
    assert layerwise < 0.7 * layerwise_func


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-func"])
def test_bf16_autocast_stays_close_to_float32(kind):
    model, params0, x, y = make(kind)
    model = model.float()
    p32 = {k: v.float() for k, v in params0.items()}
    phi = plus(p32, random_like(p32, 0.05))
    for bl in (None, default_blocks(model)):
        l32, g32 = surrogate_grad(model, p32, phi, x, y, blocks=bl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16, g16 = surrogate_grad(model, p32, phi, x, y, blocks=bl)
        assert abs(float(l16 - l32)) < 1e-2 and all(rel(g16[k], g32[k]) < 0.1 for k in p32)


def test_default_blocks_partition_the_gpt():
    model = tiny_gpt(n_layers=2)
    blocks = default_blocks(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for b in blocks for n in b) == sorted(names)
    assert len(blocks) == 2 + 2
    assert blocks[0] == ["wte.weight"] and blocks[-1] == ["lm_head.weight"]
    assert "ln_f.weight" in blocks[-2] and all(n.startswith(("blocks.1.", "ln_f.")) for n in blocks[-2])
    assert all(n.startswith("blocks.0.") for n in blocks[1])


def test_blocks_from_patterns_rejects_bad_partitions():
    names = [n for n, _ in tiny_gpt(n_layers=2).named_parameters()]
    ok = blocks_from_patterns(names, [["wte.*", "lm_head.*"], ["blocks.*", "ln_f.*"]])
    assert sorted(ok[0]) == ["lm_head.weight", "wte.weight"]
    with pytest.raises(ConfigError, match=r"parameter 'blocks\.1\.mlp\.w1\.weight' is in no block; add a pattern"):
        blocks_from_patterns(names, [["wte.*", "lm_head.*", "ln_f.*"], ["blocks.0.*"],
                                     ["blocks.1.attn*", "blocks.1.mlp_norm.*", "blocks.1.mlp.w2.*"]])
    with pytest.raises(ConfigError, match=r"'ln_f\.weight' is in blocks \[0, 1\]; make the patterns disjoint"):
        blocks_from_patterns(names, [["wte.*", "ln_f.*"], ["blocks.*", "ln_f.*", "lm_head.*"]])
    with pytest.raises(ConfigError, match="matches no parameter"):
        blocks_from_patterns(names, [["*"], ["nothing.*"]])
    # blocks.1.* must not capture blocks.10.* (the reference's prefix bug)
    many = ["blocks.1.w", "blocks.10.w"]
    assert blocks_from_patterns(many, [["blocks.1.*"], ["blocks.10.*"]]) == [["blocks.1.w"], ["blocks.10.w"]]
    with pytest.raises(ConfigError, match="default_blocks needs gnlm's GPT parameter names"):
        default_blocks(TinyLM())
    model, params0, x, y = make("mlp")
    with pytest.raises(ConfigError, match=r"parameter 'head\.weight' is in no block"):
        surrogate_grad(model, params0, params0, x, y, blocks=[[n for n in params0 if n != "head.weight"]])


def test_results_do_not_depend_on_sdpa_or_math():
    model, params0, x, y = make("gpt")
    delta = random_like(params0, 0.05)
    out = {}
    for backend in ("math", "sdpa"):
        model.attention = backend
        loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="prox_linear")
        gv = ggn_vector_product(model, params0, x, y, delta)
        assert model.attention == backend  # restored
        out[backend] = (loss, grads, gv)
    assert abs(float(out["math"][0] - out["sdpa"][0])) < 1e-12
    for k in params0:
        torch.testing.assert_close(out["math"][1][k], out["sdpa"][1][k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["math"][2][k], out["sdpa"][2][k], rtol=1e-10, atol=1e-12)
    # restored after an error too
    model.attention = "sdpa"
    with pytest.raises(RuntimeError), math_attention(model):
        assert model.attention == "math"
        raise RuntimeError("boom")
    assert model.attention == "sdpa"


def test_surrogate_grad_keeps_float32():
    model, params0, x, y = make("gpt")
    model = model.float()
    p32 = {k: v.float() for k, v in params0.items()}
    loss, grads = surrogate_grad(model, p32, plus(p32, random_like(p32, 0.01)), x, y)
    assert loss.dtype == torch.float32 and all(grads[k].dtype == torch.float32 for k in p32)
