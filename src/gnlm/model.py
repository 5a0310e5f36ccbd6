"""The paper's LLaMA variant (reference-code-digest §4) and its presets.

Pre-norm residual blocks ``x + Attn(RMSNorm(x))``, ``x + MLP(RMSNorm(x))``; QK-norm is a LayerNorm *with bias*
over the whole projected q and k (all heads at once) before the head split and RoPE; interleaved-pair RoPE
(θ = 1e4); non-gated tanh-GELU MLP ``w2(gelu(w1 x))``; untied embedding and ``lm_head``; no biases besides the
QK-LayerNorm's. Init with r = ``initializer_range``: wte ~ N(0, r²), wq/wk/wv/wo/w1/lm_head ~ N(0, r²/d),
w2 ~ N(0, r²/d_ff), norms 1, biases 0.

Attention has two backends with identical outputs: ``sdpa`` (fused ``scaled_dot_product_attention``) and
``math`` (plain matmuls; forward-mode AD needs it). Switch with ``model.attention = "math"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gnlm.config import ConfigError, from_dict


@dataclass
class ModelConfig:
    """Architecture. ``preset`` names a starting point; any field given next to it overrides the preset."""

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

    def validate(self) -> None:
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
    cfg = from_dict(ModelConfig, raw, prefix="model")
    if preset is None:
        return cfg
    base = get_preset(preset)
    given = {k: getattr(cfg, k) for k in raw if k != "preset"}
    return replace(base, **given)


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

    def gn_stages(self) -> list[tuple[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]]]:
        """The forward as a chain of stages ``[(prefix, fn)]``: ``fn(h, params) -> h`` applies the submodule whose
        parameter names start with ``prefix`` with the given ``params`` (full names, e.g. ``"blocks.0.mlp.w1.weight"``;
        only that stage's parameters are read) to the previous stage's output ``h``. The first stage takes the
        input ids, the last returns the logits; chaining them with the module's parameters is :meth:`forward`.

        curvature.py uses this to start a layerwise-GN block's linearisation at the block's recorded input instead
        of re-running the model from the ids (a model without ``gn_stages`` is linearised from its inputs).
        """

        def stage(module: nn.Module, prefix: str, call: Callable) -> tuple[str, Callable]:
            n = len(prefix)

            def fn(h: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
                own = {k[n:]: v for k, v in params.items() if k.startswith(prefix)}
                return call(lambda *a: functional_call(module, own, a), h)

            return prefix, fn

        def embed(f: Callable, idx: torch.Tensor) -> torch.Tensor:
            self._check(idx.shape[-1])
            return f(idx)

        def block(f: Callable, x: torch.Tensor) -> torch.Tensor:
            T = x.shape[-2]
            return f(x, self.rope_cos[:T], self.rope_sin[:T], self.attention)

        def plain(f: Callable, x: torch.Tensor) -> torch.Tensor:
            return f(x)

        return ([stage(self.wte, "wte.", embed)]
                + [stage(b, f"blocks.{i}.", block) for i, b in enumerate(self.blocks)]
                + [stage(self.ln_f, "ln_f.", plain), stage(self.lm_head, "lm_head.", plain)])


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B·T tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: GPT) -> str:
    """Preset, exact parameter count and every parameter's shape, for ``gnlm info``."""
    cfg = model.cfg
    lines = [
        f"model {cfg.preset or 'custom'}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}",
        f"parameters: {count_parameters(model):,}",
    ]
    width = max(len(n) for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        lines.append(f"  {name:<{width}}  {str(tuple(p.shape)):>14}  {p.numel():>12,}")
    return "\n".join(lines)
