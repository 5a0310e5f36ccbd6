"""Baseline optimizers, parameter routing, learning-rate schedules, EMA and gradient clipping.

Everything here works on ``named_params: dict[str, Tensor]`` (the output of ``dict(model.named_parameters())``, or
the dict of plain leaf tensors φ that the Gauss-Newton trainer optimises), so the same code serves the baseline
trainer and the GN inner loop.

Routing (the paper's): ``muon`` gives every 2-D hidden matrix to ``torch.optim.Muon`` and the embedding, lm_head
(``OptimConfig.adamw_params``) and every non-2-D tensor to ``torch.optim.AdamW``, with the same lr; ``soap`` gives
every >=2-D tensor (embedding and lm_head included) to ``pytorch_optimizer.SOAP`` and the 1-D tensors to AdamW.
Multi-optimizer setups are wrapped in :class:`CombinedOptimizer`; every param group carries ``group["role"]``.

Learning rates are pure functions of the step (:func:`lr_multiplier`, :func:`inner_lr_multiplier`) applied with
:func:`set_lr`, so a resumed run only needs the step counters.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gnlm.config import ConfigError

__all__ = [
    "OptimConfig",
    "ScheduleConfig",
    "InnerScheduleConfig",
    "CombinedOptimizer",
    "EMA",
    "BUILTIN_OPTIMIZERS",
    "routing",
    "build_optimizer",
    "resolve_optimizer_class",
    "matches_pattern",
    "lr_multiplier",
    "inner_lr_multiplier",
    "set_lr",
    "clip_grad_norm",
]

BUILTIN_OPTIMIZERS = ("adamw", "muon", "soap")
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------------------------
# configuration


def _optimizer_classes_in(module: Any) -> list[str]:
    out = []
    for attr in dir(module):
        obj = getattr(module, attr, None)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            out.append(attr)
    return out


def resolve_optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    """Import ``"package.module.Class"`` and check it is a ``torch.optim.Optimizer`` subclass.

    Raises :class:`ConfigError` (one line, with the closest valid name suggested) otherwise.
    """
    fix = "give adamw, muon, soap or an import path like torch.optim.SGD"
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"optim.name: {path!r} is not an import path; {fix}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        parent = module_name.rpartition(".")[0]
        hint = ""
        if parent:
            try:
                pmod = importlib.import_module(parent)
                subs = [n for n in dir(pmod) if not n.startswith("_")]
                close = difflib.get_close_matches(module_name.rpartition(".")[2], subs, n=1)
                if close:
                    hint = f" (did you mean '{parent}.{close[0]}.{attr}'?)"
            except ImportError:
                pass
        raise ConfigError(f"optim.name: cannot import module '{module_name}' of {path!r}{hint}; {fix}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        names = _optimizer_classes_in(module)
        close = difflib.get_close_matches(attr, names, n=1, cutoff=0.5)
        if not close:
            close = [n for n in names if n.lower() == attr.lower()]
        hint = f" (did you mean '{module_name}.{close[0]}'?)" if close else ""
        raise ConfigError(f"optim.name: cannot import {path!r}{hint}; {fix}")
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optim.name: {path!r} is not a torch.optim.Optimizer subclass; {fix}")
    return cls


def _accepted_kwargs(cls: type) -> set[str] | None:
    """Keyword names the constructor accepts (None when it takes **kwargs)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("self", "params")}


def _builtin_classes(name: str) -> list[type]:
    if name == "adamw":
        return [torch.optim.AdamW]
    if name == "muon":
        return [torch.optim.Muon, torch.optim.AdamW]
    from pytorch_optimizer import SOAP

    return [SOAP, torch.optim.AdamW]


@dataclass
class OptimConfig:
    """Options of the (baseline or GN-inner) optimizer.

    ``name``: ``adamw`` | ``muon`` (Muon on 2-D hidden matrices + AdamW on the rest) | ``soap`` (SOAP on >=2-D
    tensors + AdamW on 1-D) | an import path of a ``torch.optim.Optimizer`` subclass (``torch.optim.SGD``,
    ``pytorch_optimizer.Lion``), which gets every parameter with ``lr`` and ``kwargs`` only.

    ``adamw_params``: name patterns that Muon never gets (used by ``muon`` only; SOAP follows the reference and
    preconditions the embedding and lm_head too). A plain pattern matches a parameter name equal to it or starting
    with it at a ``.`` boundary (``"wte"`` matches ``wte.weight``, not ``wte2.weight``); a pattern with a glob
    character (``* ? [``) is matched with ``fnmatch`` against the full name (``"*.wte.*"``).

    ``kwargs``: extra constructor keywords. For an import path they all go to that class; for built-ins each key
    goes to every part whose constructor accepts it (e.g. ``amsgrad`` -> AdamW, ``ns_coefficients`` -> Muon,
    ``shampoo_beta`` -> SOAP) and overrides the value derived from the fields above.

    ``clip``: global gradient-norm clip used by the trainers via :func:`clip_grad_norm` (0 = off);
    ``clip_per_group``: clip each role's parameters (muon / adamw / soap) separately, as the reference GN inner
    optimizer does (its partition is {wte, lm_head} vs the rest; ours is by role). Clip 0 never zeroes updates.
    """

    name: str = "adamw"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    adamw_params: list[str] = field(default_factory=lambda: ["wte", "lm_head"])
    precondition_frequency: int = 10
    max_precondition_dim: int = 10000
    kwargs: dict[str, Any] = field(default_factory=dict)
    clip: float = 1.0
    clip_per_group: bool = False

    def validate(self) -> None:
        p = "optim"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{p}.name: empty; give adamw, muon, soap or an import path like torch.optim.SGD")
        if self.name.lower() in BUILTIN_OPTIMIZERS:
            self.name = self.name.lower()
        elif "." in self.name:
            resolve_optimizer_class(self.name)
        else:
            close = difflib.get_close_matches(self.name.lower(), BUILTIN_OPTIMIZERS, n=1)
            if not close:
                torch_names = {n.lower(): n for n in _optimizer_classes_in(torch.optim)}
                if self.name.lower() in torch_names:
                    close = [f"torch.optim.{torch_names[self.name.lower()]}"]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{p}.name: unknown optimizer {self.name!r}{hint}; give adamw, muon, soap or an import path like "
                f"torch.optim.SGD")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{p}.lr: must be a positive number, got {self.lr!r}; set e.g. optim.lr=3e-3")
        if len(tuple(self.betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
            raise ConfigError(f"{p}.betas: each beta must lie in [0, 1), got {list(self.betas)!r}; "
                              f"set e.g. optim.betas=[0.9,0.95]")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.eps >= 0:
            raise ConfigError(f"{p}.eps: must be >= 0, got {self.eps!r}; set e.g. optim.eps=1e-8")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{p}.weight_decay: must be >= 0, got {self.weight_decay!r}; "
                              f"set optim.weight_decay=0 to disable it")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{p}.momentum: must lie in [0, 1), got {self.momentum!r}; set e.g. optim.momentum=0.95")
        if self.ns_steps < 1:
            raise ConfigError(f"{p}.ns_steps: must be >= 1, got {self.ns_steps!r}; set e.g. optim.ns_steps=5")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            raise ConfigError(f"{p}.muon_adjust_lr: {self.muon_adjust_lr!r} is not one of "
                              f"['original', 'match_rms_adamw']")
        if self.precondition_frequency < 1:
            raise ConfigError(f"{p}.precondition_frequency: must be >= 1, got {self.precondition_frequency!r}; "
                              f"set e.g. optim.precondition_frequency=10")
        if self.max_precondition_dim < 1:
            raise ConfigError(f"{p}.max_precondition_dim: must be >= 1, got {self.max_precondition_dim!r}; "
                              f"set e.g. optim.max_precondition_dim=10000")
        if not (isinstance(self.clip, (int, float)) and self.clip >= 0):
            raise ConfigError(f"{p}.clip: must be >= 0 (0 = no clipping), got {self.clip!r}; set e.g. optim.clip=1.0")
        if isinstance(self.adamw_params, str) or not all(isinstance(s, str) for s in self.adamw_params):
            raise ConfigError(f"{p}.adamw_params: must be a list of name patterns, got {self.adamw_params!r}; "
                              f"write e.g. [wte, lm_head]")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"{p}.kwargs: must be a mapping, got {self.kwargs!r}; write e.g. {{momentum: 0.9}}")
        self._check_kwargs()

    def optimizer_classes(self) -> list[type]:
        return _builtin_classes(self.name) if self.name in BUILTIN_OPTIMIZERS else [
            resolve_optimizer_class(self.name)]

    def _check_kwargs(self) -> None:
        if not self.kwargs:
            return
        accepted: set[str] = set()
        for cls in self.optimizer_classes():
            names = _accepted_kwargs(cls)
            if names is None:
                return
            accepted |= names
        accepted.discard("lr")
        for key in self.kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (accepted: {', '.join(sorted(accepted))})"
                what = "lr is set by optim.lr" if key == "lr" else f"no optimizer of {self.name!r} accepts it"
                raise ConfigError(f"optim.kwargs: unknown keyword '{key}'{hint}; {what}, remove or rename it")


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


# --------------------------------------------------------------------------------------------------------------
# routing and construction


def matches_pattern(name: str, pattern: str) -> bool:
    """``pattern`` equals ``name`` or is a prefix of it at a ``.`` boundary; with glob characters: fnmatch."""
    if _GLOB_CHARS & set(pattern):
        return fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def routing(named_params: Mapping[str, Tensor], cfg: OptimConfig) -> dict[str, str]:
    """Which optimizer gets each parameter: name -> ``"muon"`` | ``"adamw"`` | ``"soap"`` | ``cfg.name``.

    Parameters with ``requires_grad=False`` are reported as ``"frozen"`` and given to no optimizer.
    """
    out: dict[str, str] = {}
    for name, p in named_params.items():
        if not p.requires_grad:
            out[name] = "frozen"
        elif cfg.name == "muon":
            hidden = p.ndim == 2 and not any(matches_pattern(name, pat) for pat in cfg.adamw_params)
            out[name] = "muon" if hidden else "adamw"
        elif cfg.name == "soap":
            out[name] = "soap" if p.ndim >= 2 else "adamw"
        else:
            out[name] = cfg.name
    return out


def _kwargs_for(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _accepted_kwargs(cls)
    return dict(kwargs) if names is None else {k: v for k, v in kwargs.items() if k in names}


def build_optimizer(named_params: Mapping[str, Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` describes over ``named_params`` (see :func:`routing`).

    ``adamw`` and import paths return that optimizer itself (one group, ``role`` = ``"adamw"`` / the path);
    ``muon`` and ``soap`` return a :class:`CombinedOptimizer` with roles ``muon``+``adamw`` / ``soap``+``adamw``
    (a role with no parameters is left out). Every group also carries ``base_lr`` (= cfg.lr) and ``lr_scale``
    (= 1.0) for :func:`set_lr`. Clipping is not part of ``step()``: call :func:`clip_grad_norm` before it.
    """
    cfg.validate()
    if not named_params:
        raise ConfigError("optim: no parameters to optimise; pass a non-empty dict of named parameters")
    route = routing(named_params, cfg)
    by_role: dict[str, list[str]] = {}
    for name, role in route.items():
        if role != "frozen":
            by_role.setdefault(role, []).append(name)
    if not by_role:
        raise ConfigError("optim: every parameter has requires_grad=False; unfreeze the parameters to train")

    def group(role: str) -> dict[str, Any]:
        return {"params": [named_params[n] for n in by_role[role]], "role": role, "base_lr": cfg.lr,
                "lr_scale": 1.0}

    def adamw(role: str = "adamw") -> torch.optim.Optimizer:
        kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        kw.update(_kwargs_for(torch.optim.AdamW, cfg.kwargs))
        kw.pop("lr", None)
        return torch.optim.AdamW([group(role)], lr=cfg.lr, **kw)

    if cfg.name == "adamw":
        return adamw()
    if cfg.name not in BUILTIN_OPTIMIZERS:
        cls = resolve_optimizer_class(cfg.name)
        kw = {k: v for k, v in cfg.kwargs.items() if k != "lr"}
        return cls([group(cfg.name)], lr=cfg.lr, **kw)

    parts: dict[str, torch.optim.Optimizer] = {}
    if cfg.name == "muon" and "muon" in by_role:
        kw = dict(weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.muon_adjust_lr)
        kw.update(_kwargs_for(torch.optim.Muon, cfg.kwargs))
        kw.pop("lr", None)
        parts["muon"] = torch.optim.Muon([group("muon")], lr=cfg.lr, **kw)
    if cfg.name == "soap" and "soap" in by_role:
        from pytorch_optimizer import SOAP

        kw = dict(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  precondition_frequency=cfg.precondition_frequency, max_precondition_dim=cfg.max_precondition_dim)
        kw.update(_kwargs_for(SOAP, cfg.kwargs))
        kw.pop("lr", None)
        parts["soap"] = SOAP([group("soap")], lr=cfg.lr, **kw)
    if "adamw" in by_role:
        parts["adamw"] = adamw()
    names = {role: list(by_role[role]) for role in parts}
    return CombinedOptimizer(parts, param_names=names)


# --------------------------------------------------------------------------------------------------------------
# combined optimizer


class _MergedState(Mapping):
    """Read-only view ``param -> state`` over the parts of a :class:`CombinedOptimizer`."""

    def __init__(self, owner: CombinedOptimizer):
        self._owner = owner

    def _states(self) -> Iterator[Mapping]:
        for opt in self._owner.optimizers.values():
            yield opt.state

    def __getitem__(self, p: Tensor) -> Any:
        for st in self._states():
            if p in st:
                return st[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[Tensor]:
        for st in self._states():
            yield from st

    def __len__(self) -> int:
        return sum(len(st) for st in self._states())


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameter sets, stepped together (e.g. Muon + AdamW).

    ``param_groups`` is the concatenation of the parts' groups (the same dict objects, so writing ``group["lr"]``
    reaches the part); each group is labelled ``group["role"]``. It is a real ``torch.optim.Optimizer`` subclass,
    so ``torch.optim.lr_scheduler`` works on it. ``state`` is a read-only merged view.
    ``state_dict()`` = ``{"roles": [...], "param_names": {role: [...]}, "optimizers": {role: part.state_dict()}}``
    (plain tensors, numbers and strings: loads with ``torch.load(weights_only=True)``); ``load_state_dict``
    checks the roles (and parameter names when both sides have them) before loading.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer],
                 param_names: Mapping[str, list[str]] | None = None):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        all_params: list[Tensor] = []
        for role, opt in optimizers.items():
            for g in opt.param_groups:
                g.setdefault("role", role)
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError(f"a parameter is given to more than one optimizer (role {role!r})")
                    seen.add(id(p))
                    all_params.append(p)
        # The base class sets up hooks and profiling; its own groups/state are replaced by views of the parts.
        super().__init__(all_params, defaults={})
        self.__dict__["optimizers"] = dict(optimizers)
        self.param_names = {k: list(v) for k, v in (param_names or {}).items()}

    # param_groups / state are views of the parts (they must stay fresh after a part's load_state_dict).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        opts = self.__dict__.get("optimizers")
        if opts is None:
            return self.__dict__.setdefault("_init_groups", [])
        return [g for opt in opts.values() for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if "optimizers" in self.__dict__:
            raise AttributeError("CombinedOptimizer.param_groups is a view of its parts; edit the groups in place")
        self.__dict__["_init_groups"] = value

    @property  # type: ignore[override]
    def state(self) -> Mapping[Tensor, Any]:
        if "optimizers" not in self.__dict__:
            return self.__dict__.setdefault("_init_state", {})
        return _MergedState(self)

    @state.setter
    def state(self, value: Any) -> None:
        if "optimizers" in self.__dict__:
            raise AttributeError("CombinedOptimizer.state is a view of its parts; load a state dict instead")
        self.__dict__["_init_state"] = value

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = ", ".join(f"{role}={type(opt).__name__}" for role, opt in self.optimizers.items())
        return f"CombinedOptimizer({inner})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizers" not in self.__dict__:  # called by the base constructor
            self.__dict__.setdefault("_init_groups", []).append(param_group)
            return
        role = param_group.get("role")
        if role not in self.optimizers:
            raise ValueError(f"add_param_group needs group['role'] in {list(self.optimizers)}, got {role!r}")
        self.optimizers[role].add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "roles": list(self.optimizers),
            "param_names": {k: list(v) for k, v in self.param_names.items()},
            "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        roles = list(state_dict.get("roles", []))
        if roles != list(self.optimizers):
            raise ValueError(f"optimizer state has roles {roles} but this optimizer has {list(self.optimizers)}; "
                             f"resume with the same optim.name and parameter routing")
        saved_names = state_dict.get("param_names") or {}
        for role in roles:
            if role in saved_names and role in self.param_names and saved_names[role] != self.param_names[role]:
                diff = sorted(set(saved_names[role]) ^ set(self.param_names[role]))
                raise ValueError(f"optimizer state for role {role!r} was saved for other parameters "
                                 f"(differing: {diff[:5]}); resume with the same model and optim.adamw_params")
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state_dict["optimizers"][role])


# --------------------------------------------------------------------------------------------------------------
# schedules


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


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float | None, multiplier: float) -> None:
    """Set every group's lr to ``group_base · multiplier``.

    ``base_lr`` given: ``group["base_lr"] = base_lr · group.get("lr_scale", 1.0)`` (a per-group relative
    factor; :func:`build_optimizer` sets it to 1.0, so all roles share the lr as in the paper).
    ``base_lr=None``: each group keeps its own ``group["base_lr"]`` (recorded from its current lr the first
    time), so groups with different base lrs scale correctly.
    """
    for group in optimizer.param_groups:
        if base_lr is not None:
            group["base_lr"] = float(base_lr) * float(group.get("lr_scale", 1.0))
        elif "base_lr" not in group:
            group["base_lr"] = float(group["lr"])
        lr = group["base_lr"] * float(multiplier)
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# --------------------------------------------------------------------------------------------------------------
# EMA


def _named_of(target: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(target.named_parameters()) if isinstance(target, nn.Module) else dict(target)


class EMA:
    """Exponential moving average of a dict of tensors: ``ema ← d·ema + (1 - d)·θ`` (no bias correction).

    Starts at a copy of ``named_params``. ``copy_to`` writes the averages into tensors (or a module's
    parameters) in place; ``swap_into`` does so temporarily (``with ema.swap_into(model): evaluate(model)``).
    """

    def __init__(self, named_params: nn.Module | Mapping[str, Tensor], decay: float):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ConfigError(f"ema decay must lie in [0, 1), got {decay!r}; set e.g. 0.999")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {n: p.detach().clone() for n, p in _named_of(named_params).items()}

    def _check(self, named: Mapping[str, Tensor]) -> None:
        if set(named) != set(self.shadow):
            diff = sorted(set(named) ^ set(self.shadow))
            raise ValueError(f"EMA tracks other tensors (differing names: {diff[:5]})")

    @torch.no_grad()
    def update(self, named_params: nn.Module | Mapping[str, Tensor]) -> None:
        named = _named_of(named_params)
        self._check(named)
        d = self.decay
        for n, e in self.shadow.items():
            e.mul_(d).add_(named[n].detach().to(e.dtype), alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, named_params: nn.Module | Mapping[str, Tensor]) -> None:
        named = _named_of(named_params)
        self._check(named)
        for n, p in named.items():
            p.copy_(self.shadow[n])

    @contextlib.contextmanager
    def swap_into(self, target: nn.Module | Mapping[str, Tensor]) -> Iterator[None]:
        """Temporarily load the averages into ``target``; the original values come back on exit."""
        named = _named_of(target)
        self._check(named)
        backup = {n: p.detach().clone() for n, p in named.items()}
        self.copy_to(named)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        shadow = state_dict["shadow"]
        self._check(shadow)
        for n, t in shadow.items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"EMA state for {n!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t)
        self.decay = float(state_dict["decay"])
        self.num_updates = int(state_dict["num_updates"])


# --------------------------------------------------------------------------------------------------------------
# clipping


def _grad_groups(params_or_groups: Any) -> dict[str, list[Tensor]]:
    """Normalise the accepted inputs to ``{group_name: [tensors]}``."""
    if isinstance(params_or_groups, torch.optim.Optimizer):
        out: dict[str, list[Tensor]] = {}
        for idx, g in enumerate(params_or_groups.param_groups):
            out.setdefault(str(g.get("role", idx)), []).extend(g["params"])
        return out
    if isinstance(params_or_groups, nn.Module):
        return {"all": list(params_or_groups.parameters())}
    if isinstance(params_or_groups, Tensor):
        return {"all": [params_or_groups]}
    if isinstance(params_or_groups, Mapping):
        values = list(params_or_groups.values())
        if all(isinstance(v, Tensor) for v in values):  # named params: one group
            return {"all": values}
        return {str(k): (list(v) if not isinstance(v, Tensor) else [v]) for k, v in params_or_groups.items()}
    if isinstance(params_or_groups, Iterable):
        return {"all": list(params_or_groups)}
    raise TypeError(f"cannot clip gradients of {type(params_or_groups).__name__}")


def clip_grad_norm(params_or_groups: Any, max_norm: float, per_group: bool = False) -> float:
    """Clip gradients in place; return the total gradient norm before clipping (over all groups).

    ``params_or_groups``: an optimizer (grouped by ``group["role"]``), a module, an iterable of tensors, a dict
    of named tensors (one group) or a dict ``{group_name: [tensors]}``. ``per_group=True`` clips each group to
    ``max_norm`` on its own (the reference GN inner optimizer's per-partition clipping); otherwise all together.
    ``max_norm <= 0`` only measures (never zeroes the gradients).
    """
    groups = {k: [p for p in v if p.grad is not None] for k, v in _grad_groups(params_or_groups).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return 0.0
    if max_norm > 0 and not per_group:
        flat = [p for v in groups.values() for p in v]
        return float(torch.nn.utils.clip_grad_norm_(flat, max_norm))
    norms = []
    for v in groups.values():
        if max_norm > 0:
            norms.append(torch.nn.utils.clip_grad_norm_(v, max_norm).detach().float())
        else:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in v]).detach().float())
    return float(torch.linalg.vector_norm(torch.stack([n.cpu() for n in norms])))
