"""A method's hyperparameter search space (``MethodConfig.search``): its dimensions (:class:`Dim`), the
quasi-random trials (:func:`trial_points`), when a value sits on an edge of what was tried and the value beyond it
(:meth:`Dim.edge`, :meth:`Dim.beyond`), and the learning-rate refinement around a point (:func:`refined_lrs`).

Pure functions of the declaration and the values tried: which point is best is ``selection.py``'s job, which runs a
study needs ``plan.py``'s.

A dimension lives in its own coordinate t: t = ln v for ``log: true``, t = v otherwise. Its spacing (the step of an
edge extension) is, for a range ``{low, high}``, the range's width in t over the number of trials N, so an
extension goes as far beyond the edge as the trials lie apart on average; for ``choices``, the t-distance between
the outermost two choices on that side (the lr search's "next point of the grid"). A value is on an edge when it
lies in the outer spacing of the range tried (declared bounds or choices, and every value tried beyond them):
for a range, within one spacing of its end (the outer 1/N); for choices, at the outermost one. Unordered choices
(strings, booleans) have no edge. (``selection.py`` adds that no point differing from the best in this setting alone
was tried beyond it, and that the run config accepts the value beyond.)
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from gnlm.config import ConfigError

LR = "lr"  # the search key of a method's learning rate (optim.lr; GN: gn.inner_optim.lr)
SIGNIFICANT_DIGITS = 4  # sampled and derived values are rounded so that run configs and ids are stable
SPEC_KEYS = ("low", "high", "log", "int", "choices")
Side = Literal["low", "high"]


def rounded(x: float) -> float:
    """``x`` to :data:`SIGNIFICANT_DIGITS` significant digits."""
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v: Any) -> Any:
    """``v``, or the float a string spells (YAML 1.1 reads ``1e-3``, without a dot, as a string)."""
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


@dataclass(frozen=True)
class Dim:
    """One dimension of a search space: ``key`` (``lr`` or a dotted RunConfig key), and either a range
    ``low``..``high`` (``log``: sampled uniformly in ln v; ``integer``: whole numbers, ``int: true`` in YAML) or
    ``choices`` (``log`` then sets how the choices are spaced for an edge extension: by ratio, not difference)."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def parse(cls, key: str, spec: Any, where: str) -> Dim:
        """The dimension declared as ``spec`` (``{low, high, log, int}`` or ``{choices: [...], log}``); a one-line
        ConfigError naming ``where`` when it is not one."""
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where}: expected {{low: ..., high: ..., log: true|false}} or {{choices: [...]}}, "
                              f"got {spec!r}")
        for k in spec:
            if k not in SPEC_KEYS:
                close = difflib.get_close_matches(str(k), SPEC_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: unknown key {k!r}{hint}; a dimension takes {', '.join(SPEC_KEYS)}")
        log, integer = spec.get("log", False), spec.get("int", False)
        if not isinstance(log, bool) or not isinstance(integer, bool):
            raise ConfigError(f"{where}: log and int are true or false, got log {log!r}, int {integer!r}")
        if "choices" in spec:
            choices = spec["choices"]
            if "low" in spec or "high" in spec or integer:
                raise ConfigError(f"{where}: give either choices: [...] or low/high (with int), not both")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
            keys = [json.dumps(c, sort_keys=True) for c in choices]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{where}.choices has duplicates: {choices}")
            if log and not all(_is_number(c) and c > 0 for c in choices):
                raise ConfigError(f"{where}: log: true needs positive numbers as choices, got {choices}")
            return cls(key, log=log, choices=tuple(choices))
        low, high = _number(spec.get("low")), _number(spec.get("high"))
        if not (_is_number(low) and _is_number(high)):
            raise ConfigError(f"{where}: low and high must be numbers, got low {low!r}, high {high!r}")
        if not low < high:
            raise ConfigError(f"{where}: empty range: low ({low}) must be below high ({high})")
        if log and not low > 0:
            raise ConfigError(f"{where}: a log range must be positive, got low {low}; raise low or set log: false")
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int: true needs whole-number bounds, got low {low}, high {high}")
        return cls(key, low=float(low), high=float(high), log=log, integer=integer)

    @property
    def ordered(self) -> bool:
        """Whether its values have an order (a range, or numeric choices), so that an edge means something."""
        return self.choices is None or all(_is_number(c) for c in self.choices)

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can take: both ends of a range, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        return [self._value(self._t(self.low)), self._value(self._t(self.high))]

    def at(self, u: float) -> Any:
        """The value at ``u`` ∈ [0, 1) of the unit interval: uniform in t over the range (an integer range: every
        whole number equally likely), or one of the choices."""
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        lo, hi = self._t(self.low), self._t(self.high)
        if self.integer and not self.log:
            return min(int(self.low + math.floor(u * (self.high - self.low + 1))), int(self.high))
        return self._value(lo + u * (hi - lo))

    def edge(self, value: Any, tried: list[Any], trials: int) -> Side | None:
        """The edge of what was tried (the declaration and ``tried``) that ``value`` sits on, if any."""
        if not self.ordered or not _is_number(value):
            return None
        t, (lo, hi) = self._t(value), self._span(tried)
        if self.choices is not None:
            if len(self.choices) < 2:
                return None
            return "high" if t >= hi else "low" if t <= lo else None
        step = self._spacing("high", trials)
        high, low = t > hi - step, t < lo + step
        if high and low:  # a range narrower than two spacings: the nearer end
            return "high" if hi - t < t - lo else "low"
        return "high" if high else "low" if low else None

    def beyond(self, side: Side, tried: list[Any], trials: int) -> Any:
        """The next value beyond the ``side`` edge of what was tried: one spacing past its outermost value."""
        lo, hi = self._span(tried)
        step = self._spacing(side, trials)
        t = hi + step if side == "high" else lo - step
        whole = self.integer or (self.choices is not None and all(isinstance(c, int) for c in self.choices))
        if not whole:
            return self._value(t)
        to_value = math.exp if self.log else float
        v, edge = to_value(t), round(to_value(hi if side == "high" else lo))
        # a whole number strictly beyond the edge, however small the spacing (1e-9: float noise of an exact step)
        return max(math.ceil(v - 1e-9), edge + 1) if side == "high" else min(math.floor(v + 1e-9), edge - 1)

    def _t(self, v: float) -> float:
        return math.log(v) if self.log else float(v)

    def _value(self, t: float) -> Any:
        v = math.exp(t) if self.log else t
        return round(v) if self.integer else rounded(v)

    def _span(self, tried: list[Any]) -> tuple[float, float]:
        """(lowest, highest) t of the declaration and the numeric values tried."""
        ts = [self._t(v) for v in [*self.extremes(), *tried] if _is_number(v) and (not self.log or v > 0)]
        return min(ts), max(ts)

    def _spacing(self, side: Side, trials: int) -> float:
        """The step of an edge extension in t: the range's width over the trials, or the distance of the outermost
        two choices on that side."""
        if self.choices is None:
            return (self._t(self.high) - self._t(self.low)) / max(trials, 1)
        ts = sorted(self._t(c) for c in self.choices)
        return ts[-1] - ts[-2] if side == "high" else ts[1] - ts[0]


def search_seed(method: str, batch_tokens: int, selection_seed: int) -> int:
    """The Sobol scrambling seed of one method at one batch size: a hash of the three, so that a restarted study
    plans the same trials and two methods or batches do not share points by accident."""
    digest = hashlib.sha256(f"{method}/b{batch_tokens}/s{selection_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def trial_points(dims: list[Dim], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct points of the space: the first points of a scrambled Sobol sequence (``scipy.stats.qmc``)
    mapped through each dimension (:meth:`Dim.at`), a point equal to an earlier one skipped (integer and choice
    dimensions), so every method gets ``n`` trials unless its space holds fewer points. Deterministic in ``seed``."""
    from scipy.stats import qmc  # scipy.stats takes about a second to import; only a searched study needs it

    # A prefix of 2^m scrambled Sobol points is the same whatever m: draw 16n, keep the first n distinct points.
    units = qmc.Sobol(d=len(dims), scramble=True, rng=seed).random_base2(math.ceil(math.log2(16 * n)))
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    for u in units:
        point = {d.key: d.at(float(x)) for d, x in zip(dims, u)}
        key = json.dumps(point, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(point)
        if len(points) == n:
            break
    return points


def refined_lrs(lr: float, count: int) -> list[float]:
    """``count`` learning rates around ``lr``, √2 apart and nearest first: lr·√2, lr/√2, lr·2, lr/2, ... (so that,
    with ``lr``, neighbours are at most 2× apart)."""
    return [rounded(lr * 2.0 ** (((i // 2) + 1) / 2 * (1 if i % 2 == 0 else -1))) for i in range(count)]
