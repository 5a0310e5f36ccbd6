"""Learning-rate schedules: the outer (baseline) schedule and the Gauss-Newton inner schedules.

A schedule is a function of the step that returns a multiplier of the peak learning rate; the trainers apply it
with ``optim.set_lr``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal

from gnlm.config import ConfigError


@dataclass
class ScheduleConfig:
    """Outer (baseline) learning-rate schedule; see :func:`lr_multiplier`."""

    name: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.name not in ("constant", "cosine", "wsd"):
            raise ConfigError(f"schedule.name: {self.name!r} is not one of ['constant', 'cosine', 'wsd']")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps!r}; "
                              f"set schedule.warmup_steps=0 for no warm-up")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction: must lie in [0, 1], got {self.decay_fraction!r}; "
                              f"set e.g. schedule.decay_fraction=0.2")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio!r}; "
                              f"set e.g. schedule.min_lr_ratio=0.1")


@dataclass
class InnerScheduleConfig:
    """Learning-rate schedule of the Gauss-Newton inner optimizer; see :func:`inner_lr_multiplier`.

    ``global_warmup``: outer warm-up length; a value <= 1 is a fraction of the outer steps, a value > 1 a number
    of outer steps. ``inner_warmup``: inner warm-up length; <= 1 a fraction of the inner steps, > 1 a number of
    inner steps. ``end_lr_ratio``: the final lr as a fraction of the peak lr.
    """

    name: Literal["constant_with_inner_cosine", "global_cosine", "cosine_with_global_schedule",
                  "constant"] = "constant_with_inner_cosine"
    global_warmup: float = 0.0
    inner_warmup: float = 0.0
    end_lr_ratio: float = 0.0

    def validate(self) -> None:
        names = ["constant_with_inner_cosine", "global_cosine", "cosine_with_global_schedule", "constant"]
        if self.name not in names:
            close = difflib.get_close_matches(str(self.name), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"inner_schedule.name: {self.name!r} is not one of {names}{hint}")
        for key in ("global_warmup", "inner_warmup"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"inner_schedule.{key}: must be >= 0 (<= 1: a fraction, > 1: steps), got {v!r}; "
                                  f"set e.g. inner_schedule.{key}=0")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"inner_schedule.end_lr_ratio: must lie in [0, 1], got {self.end_lr_ratio!r}; "
                              f"set e.g. inner_schedule.end_lr_ratio=0")



def _cosine(frac: float, end: float, start: float = 1.0) -> float:
    """``end + (start - end) * ½(1 + cos(π·frac))`` with frac clamped to [0, 1]."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer update number ``step`` (0-based) out of ``total_steps``.

    With W = warmup_steps, T = total_steps, r = min_lr_ratio:

    * warm-up (all schedules), s < W: m(s) = (s + 1) / W. It starts at 1/W (never a zero-lr step) and reaches 1
      at s = W - 1.
    * ``constant``: m(s) = 1 for s >= W.
    * ``cosine``: m(s) = r + (1 - r)·½(1 + cos(π (s - W) / (T - W))) for s >= W; m(W) = 1, m at the middle of
      the decay = (1 + r)/2, and m reaches r at s = T (after the last update).
    * ``wsd`` (warm-up, stable, decay): with D = round(decay_fraction·T) and s₀ = T - D, m(s) = 1 for
      W <= s < s₀, then m(s) = 1 - (1 - r)(s - s₀)/D, linear from 1 at s₀ to r at s = T.

    Steps past T give the final value r (constant: 1).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    s, T, W, r = int(step), int(total_steps), int(cfg.warmup_steps), float(cfg.min_lr_ratio)
    if s < W:
        return (s + 1) / W
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return _cosine((s - W) / max(1, T - W), r)
    if cfg.name == "wsd":
        D = int(round(cfg.decay_fraction * T))
        s0 = T - D
        if s < s0:
            return 1.0
        if D == 0:
            return r
        return 1.0 - (1.0 - r) * min(1.0, (s - s0) / D)
    raise ConfigError(f"schedule.name: {cfg.name!r} is not one of ['constant', 'cosine', 'wsd']")


def _length(value: float, total: int) -> float:
    """A warm-up length: a fraction of ``total`` if value <= 1, else a number of steps."""
    return value * total if value <= 1.0 else float(value)


def _warmup_cosine(pos: float, total: float, warmup: float, peak: float, end: float) -> float:
    """Linear warm-up 0.1·peak -> peak over ``warmup`` steps, then cosine peak -> end reaching end at ``total``."""
    if pos < warmup:
        return peak * (0.1 + 0.9 * pos / warmup)
    return _cosine((pos - warmup) / max(total - warmup, 1e-12), end, peak)


def inner_lr_multiplier(cfg: InnerScheduleConfig, outer_step: int, inner_step: int, total_outer: int,
                        inner_steps: int) -> float:
    """Multiplier of the peak lr for inner step i (0-based, < I) of outer step k (0-based, < T).

    T = total_outer, I = inner_steps, e = end_lr_ratio, Wg = global warm-up (in outer steps: global_warmup·T if
    global_warmup <= 1, else global_warmup), Wi = inner warm-up (in inner steps: inner_warmup·I if <= 1, else
    inner_warmup). Warm-ups go linearly from 0.1× to 1× of their target (as in the reference).

    * ``constant``: m = 1.
    * ``global_cosine``: one warm-up + cosine over the global inner-step count c = k·I + i of N = T·I steps:
      m = 0.1 + 0.9·c/(Wg·I) for c < Wg·I, else e + (1 - e)·½(1 + cos(π (c - Wg·I)/(N - Wg·I))).
    * inner profile of a target value E (shared by the two next schedules):
      P(E, i) = E·(0.1 + 0.9·i/Wi) for i < Wi, else e + (E - e)·½(1 + cos(π (i - Wi)/(I - Wi))).
      It starts each outer step at E (0.1·E with an inner warm-up) and would reach e at i = I, so the last inner
      step is still above e.
    * ``constant_with_inner_cosine``: E(k) = 0.1 + 0.9·k/Wg for k < Wg, else 1; m = P(E(k), i). With no
      warm-ups and e = 0: m = ½(1 + cos(π i / I)).
    * ``cosine_with_global_schedule``: G(k) = 0.1 + 0.9·k/Wg for k < Wg, else
      e + (1 - e)·½(1 + cos(π (k - Wg)/(T - Wg))); m = P(G(k), i). Outer step k uses G(k) (the reference uses
      G(k+1), an off-by-one that makes its last outer step run at end_lr); here G(T - 1) > e, so the last outer
      step still moves.

    Steps past the end are clamped to the final value.
    """
    if total_outer < 1 or inner_steps < 1:
        raise ValueError(f"total_outer and inner_steps must be >= 1, got {total_outer}, {inner_steps}")
    k, i, T, I = int(outer_step), int(inner_step), int(total_outer), int(inner_steps)
    e = float(cfg.end_lr_ratio)
    Wg = _length(cfg.global_warmup, T)
    Wi = _length(cfg.inner_warmup, I)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "global_cosine":
        return _warmup_cosine(k * I + i, T * I, Wg * I, 1.0, e)

    def inner(target: float) -> float:
        if i < Wi:
            return target * (0.1 + 0.9 * i / Wi)
        return _cosine((i - Wi) / max(I - Wi, 1e-12), e, target)

    if cfg.name == "constant_with_inner_cosine":
        envelope = 0.1 + 0.9 * k / Wg if k < Wg else 1.0
        return inner(envelope)
    if cfg.name == "cosine_with_global_schedule":
        return inner(_warmup_cosine(k, T, Wg, 1.0, e))
    raise ConfigError(f"inner_schedule.name: {cfg.name!r} is not a known inner schedule")
