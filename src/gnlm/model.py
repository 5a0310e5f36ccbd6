"""The paper's LLaMA variant (reference-code-digest §4) and its presets.

Pre-norm residual blocks ``x + Attn(RMSNorm(x))``, ``x + MLP(RMSNorm(x))``; QK-norm is a LayerNorm *with bias*
over the whole projected q and k (all heads at once) before the head split and RoPE; interleaved-pair RoPE
(θ = 1e4); non-gated tanh-GELU MLP ``w2(gelu(w1 x))``; untied embedding and ``lm_head``; no biases besides the
QK-LayerNorm's. Init with r = ``initializer_range``: wte ~ N(0, r²), wq/wk/wv/wo/w1/lm_head ~ N(0, r²/d),
w2 ~ N(0, r²/d_ff), norms 1, biases 0.

Attention has two backends with identical outputs: ``sdpa`` (fused ``scaled_dot_product_attention``) and
``math`` (plain matmuls; forward-mode AD needs it). Switch with ``model.attention = "math"``.

Other models (:func:`build_model`): ``model.source: hf`` builds a Hugging Face causal LM from ``model.hf_config``
and ``model.module: pkg.mod:factory`` any ``nn.Module`` mapping ids (B, T) to logits (B, T, V) (``hf.py``). They
train with every method; GN linearises them with ``torch.func`` (``curvature.py``) where gnlm's GPT has its
hand-written stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gnlm import hf
from gnlm.config import ConfigError, from_dict


@dataclass
class ModelConfig:
    """Architecture. ``preset`` names a starting point; any field given next to it overrides the preset.

    ``source: hf`` with ``hf_config`` (fields inline with a ``model_type``, a local config.json or folder, or a name
    in the local Hugging Face cache): a ``transformers`` causal LM (``hf.py``); ``vocab_size`` and ``max_seq_len``
    are then read from its config, and the GPT fields are not used. ``module: pkg.mod:factory``: the
    ``nn.Module`` that ``factory(**module_kwargs)`` returns (ids (B, T) -> logits (B, T, V)); ``vocab_size`` and
    ``max_seq_len`` state its vocabulary and longest sequence (checked against the data)."""

    preset: str | None = None
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    vocab_size: int = 4096
    max_seq_len: int = 128
    initializer_range: float = 1.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention: Literal["sdpa", "math"] = "sdpa"
    source: Literal["gnlm", "hf"] = "gnlm"
    hf_config: str | dict[str, Any] | None = None
    module: str | None = None
    module_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``gpt`` (gnlm's), ``hf`` or ``module``."""
        return "module" if self.module is not None else "hf" if self.source == "hf" else "gpt"

    def validate(self) -> None:
        if self.source == "hf" and self.module is not None:
            raise ConfigError("model.source=hf and model.module are both set; keep one of them")
        if self.source == "hf":
            if self.hf_config is None:
                raise ConfigError("model.source=hf needs model.hf_config: the config's fields inline "
                                  "({model_type: llama, hidden_size: 64, ...}) or a local config.json path")
            self.vocab_size, longest = hf.hf_lengths(hf.hf_config(self.hf_config))
            self.max_seq_len = longest if longest is not None else self.max_seq_len
            return
        if self.hf_config is not None:
            raise ConfigError("model.hf_config is set but model.source is not hf; set model.source=hf")
        if self.module is not None:
            hf.module_factory(self.module)
            for name in ("vocab_size", "max_seq_len"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
            return
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); change one")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.initializer_range <= 0:
            raise ConfigError(f"model.initializer_range must be > 0, got {self.initializer_range}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS: dict[str, ModelConfig] = {
    # CPU presets (2 cores): vocab 4096 (the built-in BPE), sequences of 128 tokens.
    "nano": ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=128, vocab_size=4096, max_seq_len=128),
    "micro": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, vocab_size=4096, max_seq_len=128),
    # The paper's models (T5 tokenizer, vocab 32000, sequences of 1024).
    "45m": ModelConfig(d_model=512, n_layers=4, n_heads=8, d_ff=2048, vocab_size=32000, max_seq_len=2048),
    "150m": ModelConfig(d_model=768, n_layers=12, n_heads=16, d_ff=3072, vocab_size=32000, max_seq_len=1024),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"model preset '{name}' does not exist: {hint}choose one of {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], preset=name, **overrides)
    cfg.validate()
    return cfg


def resolve_model_config(raw: dict) -> ModelConfig:
    """Build a ModelConfig from a config mapping: the preset's values, then the keys given next to it."""
    raw = dict(raw)
    preset = raw.get("preset")
    if preset is None:
        return from_dict(ModelConfig, raw, prefix="model")
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset: expected a preset name ({', '.join(PRESETS)}), got {preset!r}")
    # Checked as a whole: the preset's values with the given keys on top (model=150m model.n_heads=12 is valid
    # because 150m has d_model 768, whatever the dataclass defaults say).
    base = {f.name: getattr(get_preset(preset), f.name) for f in fields(ModelConfig)}
    return from_dict(ModelConfig, {**base, **raw}, prefix="model")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles t·θ^(-2i/hd), each (max_seq_len, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, nh, T, hd) by the angles of their position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hd/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hd/2, 2)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.q_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.k_norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, x, cos, sin, backend: str):
        B, T, d = x.shape
        hd = d // self.n_heads
        q = self.q_norm(self.wq(x))  # QK-norm over all heads at once, before the split: (B, T, d)
        k = self.k_norm(self.wk(x))
        v = self.wv(x)
        q, k, v = (t.view(B, T, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if backend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = att @ v  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, backend: str):
        x = x + self.attn(self.attn_norm(x), cos, sin, backend)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Maps input ids (B, T) to logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.attention = cfg.attention
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r, d, d_ff = self.cfg.initializer_range, self.cfg.d_model, self.cfg.d_ff
        nn.init.normal_(self.wte.weight, std=r)
        for name, p in self.named_parameters():
            if name.endswith("mlp.w2.weight"):
                nn.init.normal_(p, std=r / math.sqrt(d_ff))
            elif p.ndim == 2 and name != "wte.weight":
                nn.init.normal_(p, std=r / math.sqrt(d))
            elif name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        self._check(T)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.wte(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, cos, sin, self.attention)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def _check(self, T: int) -> None:
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"attention backend must be 'sdpa' or 'math', got {self.attention!r}")

    def gn_stages(self) -> list[tuple[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple]]]:
        """The forward as a chain of linearised stages ``[(prefix, linearize)]``, for curvature.py's GN path.

        ``linearize(h, params) -> (h_out, jvp)`` runs the submodule whose parameter names start with ``prefix``
        with ``params`` (full names, e.g. ``"blocks.0.mlp.w1.weight"``; only that stage's are read) on the previous
        stage's output ``h`` (the first stage takes the input ids, the last returns the logits; chaining them with
        the module's parameters is :meth:`forward`, attention in the math form). ``jvp(h_t, p_t)`` is the stage's
        tangent map at that point: ``h_t`` a tangent of ``h`` or None, ``p_t`` tangents for some of the stage's
        parameters (by full name; the others are frozen and cost nothing); it returns the tangent of ``h_out``,
        or None when given none. It is plain differentiable torch ops, so curvature.py transposes it with
        reverse-mode autograd, and one ``linearize`` serves every layerwise-GN block passing through the stage.
        """
        cfg = self.cfg

        def stage(prefix: str, lin: Callable) -> tuple[str, Callable]:
            n = len(prefix)

            def linearize(h: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple:
                h_out, jvp = lin(h, {k[n:]: v for k, v in params.items() if k.startswith(prefix)})
                return h_out, lambda h_t, p_t: jvp(h_t, {k[n:]: v for k, v in p_t.items() if k.startswith(prefix)})

            return prefix, linearize

        def embed(idx: torch.Tensor, p: dict) -> tuple:
            self._check(idx.shape[-1])
            return F.embedding(idx, p["weight"]), lambda h_t, p_t: (
                F.embedding(idx, p_t["weight"]) if "weight" in p_t else None)

        def block(x: torch.Tensor, p: dict) -> tuple:
            T = x.shape[-2]
            return _lin_block(p, x, self.rope_cos[:T], self.rope_sin[:T], cfg.n_heads, cfg.norm_eps)

        def rms(x: torch.Tensor, p: dict) -> tuple:
            return _lin_rms_norm(x, p["weight"], cfg.norm_eps, "weight")

        def head(x: torch.Tensor, p: dict) -> tuple:
            return _lin_linear(x, p["weight"], "weight")

        return ([stage("wte.", embed)] + [stage(f"blocks.{i}.", block) for i in range(cfg.n_layers)]
                + [stage("ln_f.", rms), stage("lm_head.", head)])


# --------------------------------------------------------------------------------------------------------------
# Linearised building blocks for GPT.gn_stages: each returns its output at the given point and its tangent map
# jvp(x_t, p_t) (x_t: a tangent of x or None; p_t: parameter tangents by name, frozen ones absent). Hand-written
# because PyTorch's forward-mode AD multiplies by a materialised zero tangent for a frozen weight and splits the
# norms into many small ops, and torch.func's per-op overhead dominates small models (benchmarks/gn_step_cost.py).


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b over equal leading dims, plus ``acc`` accumulated inside the product (no separate add)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.bmm(a3, b3) if acc is None else torch.baddbmm(acc.reshape(-1, a3.shape[1], b3.shape[2]), a3, b3)
    return out.view(*a.shape[:-1], b.shape[-1])


def _lin_linear(x: torch.Tensor, w: torch.Tensor, name: str) -> tuple:
    def jvp(x_t, p_t):
        w_t = p_t.get(name)
        if w_t is None:
            return None if x_t is None else F.linear(x_t, w)
        if x_t is None:
            return F.linear(x, w_t)
        y_t = torch.addmm(F.linear(x, w_t).flatten(0, -2), x_t.flatten(0, -2), w.t())  # the sum inside the product
        return y_t.view(*x.shape[:-1], w.shape[0])

    return F.linear(x, w), jvp


def _lin_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, name: str) -> tuple:
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    n = x * r  # as RMSNorm.forward computes it
    rw = r * w

    def jvp(x_t, p_t):  # r·w ⊙ (x_t − n·mean(n ⊙ x_t)) + n ⊙ w_t
        y_t = None
        if x_t is not None:
            y_t = torch.addcmul(x_t, n, (n * x_t).mean(-1, keepdim=True), value=-1.0) * rw
        return _plus(y_t, n * p_t[name] if name in p_t else None)

    return n * w, jvp


def _lin_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, prefix: str) -> tuple:
    y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), w, b, eps)  # what F.layer_norm computes
    n = (x - mean) * rstd
    rw = rstd * w

    def jvp(x_t, p_t):  # rstd·w ⊙ (c − n·mean(n ⊙ c)) with c = x_t − mean(x_t), + n ⊙ w_t + b_t
        y_t = None
        if x_t is not None:
            c = x_t - x_t.mean(-1, keepdim=True)
            y_t = torch.addcmul(c, n, (n * c).mean(-1, keepdim=True), value=-1.0) * rw
        w_t, b_t = p_t.get(prefix + "weight"), p_t.get(prefix + "bias")
        y_t = _plus(y_t, None if w_t is None else n * w_t)
        return _plus(y_t, None if b_t is None else b_t.expand_as(n))

    return y, jvp


def _lin_block(p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, eps: float) -> tuple:
    """Block.forward (math attention) with parameters ``p`` (names relative to the block) and its tangent map."""
    T, d = x.shape[-2:]
    hd = d // n_heads

    def heads(t):  # (..., T, d) -> (..., nh, T, hd)
        return t.unflatten(-1, (n_heads, hd)).transpose(-3, -2)

    # RoPE of a tangent as x ⊙ cos + swap(x) ⊙ sin with pairs swapped and the sines signed: 3 ops instead of 7
    cos2, sin2 = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)

    def rope_t(t):
        return torch.addcmul(t * cos2, t.unflatten(-1, (hd // 2, 2)).flip(-1).flatten(-2), sin2)

    xa, j_xa = _lin_rms_norm(x, p["attn_norm.weight"], eps, "attn_norm.weight")
    q1, j_q1 = _lin_linear(xa, p["attn.wq.weight"], "attn.wq.weight")
    k1, j_k1 = _lin_linear(xa, p["attn.wk.weight"], "attn.wk.weight")
    v1, j_v1 = _lin_linear(xa, p["attn.wv.weight"], "attn.wv.weight")
    q2, j_q2 = _lin_layer_norm(q1, p["attn.q_norm.weight"], p["attn.q_norm.bias"], eps, "attn.q_norm.")
    k2, j_k2 = _lin_layer_norm(k1, p["attn.k_norm.weight"], p["attn.k_norm.bias"], eps, "attn.k_norm.")
    q, k, v = apply_rope(heads(q2), cos, sin), apply_rope(heads(k2), cos, sin), heads(v1)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    att = ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(dim=-1)
    o, j_o = _lin_linear((att @ v).transpose(-3, -2).flatten(-2), p["attn.wo.weight"], "attn.wo.weight")
    x2 = x + o
    xm, j_xm = _lin_rms_norm(x2, p["mlp_norm.weight"], eps, "mlp_norm.weight")
    h1, j_h1 = _lin_linear(xm, p["mlp.w1.weight"], "mlp.w1.weight")
    dg = torch.ops.aten.gelu_backward(torch.ones_like(h1), h1, approximate="tanh")  # gelu'(h1)
    out, j_out = _lin_linear(F.gelu(h1, approximate="tanh"), p["mlp.w2.weight"], "mlp.w2.weight")
    kt, v_scaled = k.transpose(-2, -1), v / math.sqrt(hd)

    def jvp(x_t, p_t):
        xa_t = j_xa(x_t, p_t)
        q_t, k_t, v_t = j_q2(j_q1(xa_t, p_t), p_t), j_k2(j_k1(xa_t, p_t), p_t), j_v1(xa_t, p_t)
        s_t = None if k_t is None else _bmm(q, rope_t(heads(k_t)).transpose(-2, -1))
        if q_t is not None:
            s_t = _bmm(rope_t(heads(q_t)), kt, s_t)
        y_t = None if v_t is None else _bmm(att, heads(v_t))
        if s_t is not None:  # softmax's tangent a ⊙ (s_t − Σ a s_t) is its (symmetric) backward; scale moved to v;
            # .to: under autocast the products are bf16 and att float32
            y_t = _bmm(torch._softmax_backward_data(s_t.to(att.dtype), att, -1, att.dtype), v_scaled, y_t)
        x2_t = _plus(x_t, j_o(None if y_t is None else y_t.transpose(-3, -2).flatten(-2), p_t))
        h1_t = j_h1(j_xm(x2_t, p_t), p_t)
        return _plus(x2_t, j_out(None if h1_t is None else h1_t * dg, p_t))

    return x2 + out, jvp


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes, initialised from the global RNG: gnlm's GPT, a Hugging Face causal LM
    (``source: hf``) or a user's module (``module``). Under ``torch.device("meta")`` nothing is allocated."""
    if cfg.kind == "hf":
        return hf.build_hf_model(cfg.hf_config)
    if cfg.kind == "module":
        return hf.build_module(cfg.module, cfg.module_kwargs)
    return GPT(cfg)


def model_shapes(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` on the meta device (shapes and names, no memory), or built on the CPU when its code
    does not run there."""
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - any failure on meta (e.g. a data-dependent init): build it for real
        return build_model(cfg)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B·T tokens, in float32 at least (half-precision logits are upcast;
    float64 logits stay float64)."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module) -> str:
    """Preset, exact parameter count and every parameter's shape, for ``gnlm info``."""
    cfg = getattr(model, "cfg", None)
    head = (f"model {cfg.preset or 'custom'}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}") if isinstance(
        cfg, ModelConfig) else f"model {type(model).__name__}"
    lines = [head, f"parameters: {count_parameters(model):,}"]
    width = max(len(n) for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        lines.append(f"  {name:<{width}}  {str(tuple(p.shape)):>14}  {p.numel():>12,}")
    return "\n".join(lines)
