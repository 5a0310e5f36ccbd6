"""Baseline optimizers, parameter routing, EMA and gradient clipping (schedules: ``schedules.py``).

Everything here works on ``named_params: dict[str, Tensor]`` (the output of ``dict(model.named_parameters())``, or
the dict of plain leaf tensors φ that the Gauss-Newton trainer optimises), so the same code serves the baseline
trainer and the GN inner loop.

Routing (the paper's): ``muon`` gives every 2-D hidden matrix to ``torch.optim.Muon`` and the embedding, lm_head
(``OptimConfig.adamw_params``) and every non-2-D tensor to ``torch.optim.AdamW``, with the same lr; ``soap`` gives
every >=2-D tensor (embedding and lm_head included) to ``pytorch_optimizer.SOAP`` and the 1-D tensors to AdamW.
Multi-optimizer setups are wrapped in :class:`CombinedOptimizer`; every param group carries ``group["role"]``.

Learning rates are pure functions of the step (``schedules.py``) applied with :func:`set_lr`, so a resumed run only
needs the step counters.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gnlm.config import ConfigError, _coerce, import_module_from_cwd

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "CONSTRUCTOR_FIELDS",
    "EMA",
    "CombinedOptimizer",
    "OptimConfig",
    "build_optimizer",
    "clip_grad_norm",
    "matches_pattern",
    "needs_closure",
    "resolve_optimizer_class",
    "routing",
    "set_lr",
]

BUILTIN_OPTIMIZERS = ("adamw", "muon", "soap")
# OptimConfig field -> the constructor keyword it is passed as, to an import-path optimizer that accepts it.
CONSTRUCTOR_FIELDS = {"betas": "betas", "eps": "eps", "weight_decay": "weight_decay", "momentum": "momentum",
                      "nesterov": "nesterov", "ns_steps": "ns_steps", "muon_adjust_lr": "adjust_lr_fn",
                      "precondition_frequency": "precondition_frequency",
                      "max_precondition_dim": "max_precondition_dim"}
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

    A module in the working directory is importable (``optim.name=myopt.Lion`` with ``myopt.py`` beside the
    command), as under ``python -m``. Raises :class:`ConfigError` (one line, with the closest valid name suggested)
    otherwise.
    """
    fix = "give adamw, muon, soap or an import path like torch.optim.SGD"
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"optim.name: {path!r} is not an import path; {fix}")
    try:
        module = import_module_from_cwd(module_name)
    except ImportError as e:
        if e.name is not None and e.name != module_name and not module_name.startswith(e.name + "."):
            # the module exists but an import inside it fails: say which
            raise ConfigError(f"optim.name: importing '{module_name}' of {path!r} failed: {e}; install what it "
                              f"needs") from None
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
        raise ConfigError(f"optim.name: cannot import module '{module_name}' of {path!r}{hint} (looked in the "
                          f"working directory and the installed packages); {fix}") from None
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


def needs_closure(cls: type) -> bool:
    """Does ``cls.step`` require a closure (``torch.optim.LBFGS``), i.e. take ``closure`` without a default?"""
    try:
        param = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


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
    ``pytorch_optimizer.Lion``, ``myopt.Lion`` from ``myopt.py`` in the working directory), which gets every
    parameter with ``lr``, each field of :data:`CONSTRUCTOR_FIELDS` that its constructor accepts, and ``kwargs``.

    For an import path the config is resolved against the class (:meth:`resolve_for_class`, when the run's config is
    built): a field its constructor does not accept is a one-line error when set, and ``null`` otherwise; a field
    left unset takes the constructor's own default. So a run's config.yaml records exactly what the optimizer
    received (``null``: not passed). An optimizer whose ``step`` needs a closure (``torch.optim.LBFGS``) gets one
    that recomputes the loss and gradients on the step's batch (baselines only).

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
    betas: tuple[float, float] | None = (0.9, 0.95)
    eps: float | None = 1e-8
    weight_decay: float | None = 0.0
    momentum: float | None = 0.95
    nesterov: bool | None = True
    ns_steps: int | None = 5
    muon_adjust_lr: Literal["original", "match_rms_adamw"] | None = "original"
    adamw_params: list[str] = field(default_factory=lambda: ["wte", "lm_head"])
    precondition_frequency: int | None = 10
    max_precondition_dim: int | None = 10000
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
        if self.name in BUILTIN_OPTIMIZERS:
            unset = [k for k in CONSTRUCTOR_FIELDS if getattr(self, k) is None]
            if unset:
                raise ConfigError(f"{p}.{unset[0]}: null, but {self.name} needs a value; set e.g. "
                                  f"{p}.{unset[0]}={_coerce_example(unset[0])}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{p}.lr: must be a positive number, got {self.lr!r}; set e.g. optim.lr=3e-3")
        if self.betas is not None:
            if len(tuple(self.betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
                raise ConfigError(f"{p}.betas: each beta must lie in [0, 1), got {list(self.betas)!r}; "
                                  f"set e.g. optim.betas=[0.9,0.95]")
            self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.eps is not None and not self.eps >= 0:
            raise ConfigError(f"{p}.eps: must be >= 0, got {self.eps!r}; set e.g. optim.eps=1e-8")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError(f"{p}.weight_decay: must be >= 0, got {self.weight_decay!r}; "
                              f"set optim.weight_decay=0 to disable it")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{p}.momentum: must lie in [0, 1), got {self.momentum!r}; set e.g. optim.momentum=0.95")
        if self.ns_steps is not None and self.ns_steps < 1:
            raise ConfigError(f"{p}.ns_steps: must be >= 1, got {self.ns_steps!r}; set e.g. optim.ns_steps=5")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw", None):
            raise ConfigError(f"{p}.muon_adjust_lr: {self.muon_adjust_lr!r} is not one of "
                              f"['original', 'match_rms_adamw']")
        if self.precondition_frequency is not None and self.precondition_frequency < 1:
            raise ConfigError(f"{p}.precondition_frequency: must be >= 1, got {self.precondition_frequency!r}; "
                              f"set e.g. optim.precondition_frequency=10")
        if self.max_precondition_dim is not None and self.max_precondition_dim < 1:
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

    def resolve_for_class(self, given: set[str], prefix: str = "optim") -> None:
        """Fit the fields to an import-path optimizer's constructor (nothing for the built-ins). ``given``: the
        fields the user set (keys of the config's ``optim`` mapping; a null counts as unset). A given field the
        constructor does not accept is a one-line ConfigError naming ``optim.kwargs``; an unset one becomes the
        constructor's default when it takes the keyword (null when that default is not a plain value), else null.
        :func:`build_optimizer` resolves a config built in code (not resolved yet) with the fields that differ from
        their defaults as the given ones."""
        self._resolved_for = self.name
        if self.name in BUILTIN_OPTIMIZERS:
            return
        cls = resolve_optimizer_class(self.name)
        accepted = _accepted_kwargs(cls)
        params = inspect.signature(cls.__init__).parameters
        types_ = typing.get_type_hints(type(self))
        for name, keyword in CONSTRUCTOR_FIELDS.items():
            if name in given and getattr(self, name) is not None:
                if accepted is not None and keyword not in accepted:
                    raise ConfigError(f"{prefix}.{name}: {self.name} does not accept '{keyword}'; remove it (put "
                                      f"settings only this class takes in {prefix}.kwargs)")
                continue
            default = params[keyword].default if keyword in params else inspect.Parameter.empty
            if default is inspect.Parameter.empty:
                # not accepted, or required / swallowed by **kwargs: nothing is passed unless the user sets it
                setattr(self, name, None)
                continue
            try:
                value = _coerce(list(default) if isinstance(default, tuple) else default, types_[name], name)
            except ConfigError:
                value = None  # not a plain value of this field (e.g. a callable): the class's default, unrecorded
            setattr(self, name, value)

    def needs_closure(self) -> bool:
        """Does this optimizer's ``step`` need a closure (``torch.optim.LBFGS``)?"""
        return self.name not in BUILTIN_OPTIMIZERS and needs_closure(resolve_optimizer_class(self.name))

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


# --------------------------------------------------------------------------------------------------------------
# routing and construction


def _coerce_example(name: str) -> str:
    return {"betas": "[0.9,0.95]", "eps": "1e-8", "weight_decay": "0", "momentum": "0.95", "nesterov": "true",
            "ns_steps": "5", "muon_adjust_lr": "original", "precondition_frequency": "10",
            "max_precondition_dim": "10000"}[name]


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


def build_optimizer(named_params: Mapping[str, Tensor], cfg: OptimConfig) -> Optimizer:
    """The optimizer ``cfg`` describes over ``named_params`` (see :func:`routing`).

    ``adamw`` and import paths return that optimizer itself (one group, ``role`` = ``"adamw"`` / the path);
    ``muon`` and ``soap`` return a :class:`CombinedOptimizer` with roles ``muon``+``adamw`` / ``soap``+``adamw``
    (a role with no parameters is left out). Clipping is not part of ``step()``: call :func:`clip_grad_norm`
    before it.
    """
    cfg.validate()
    if getattr(cfg, "_resolved_for", None) != cfg.name:
        defaults = OptimConfig()
        cfg.resolve_for_class({k for k in CONSTRUCTOR_FIELDS if getattr(cfg, k) != getattr(defaults, k)})
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
        return {"params": [named_params[n] for n in by_role[role]], "role": role}

    def adamw(role: str = "adamw") -> torch.optim.Optimizer:
        kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        kw.update(_kwargs_for(torch.optim.AdamW, cfg.kwargs))
        kw.pop("lr", None)
        return torch.optim.AdamW([group(role)], lr=cfg.lr, **kw)

    if cfg.name == "adamw":
        return adamw()
    if cfg.name not in BUILTIN_OPTIMIZERS:
        cls = resolve_optimizer_class(cfg.name)
        accepted = _accepted_kwargs(cls)
        kw = {key: getattr(cfg, name) for name, key in CONSTRUCTOR_FIELDS.items()
              if getattr(cfg, name) is not None and (accepted is None or key in accepted)}
        kw.update({k: v for k, v in cfg.kwargs.items() if k != "lr"})
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


class CombinedOptimizer:
    """Several optimizers over disjoint parameter sets, stepped together (Muon + AdamW, SOAP + AdamW).

    ``param_groups`` is the concatenation of the parts' groups (the same dict objects, so writing ``group["lr"]``
    reaches the part); each group is labelled ``group["role"]``. ``state_dict()`` = ``{"roles": [...],
    "param_names": {role: [...]}, "optimizers": {role: part.state_dict()}}`` (plain tensors, numbers and strings:
    loads with ``torch.load(weights_only=True)``); ``load_state_dict`` checks the roles and parameter names first.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], param_names: Mapping[str, list[str]]):
        self.optimizers = dict(optimizers)
        self.param_names = {k: list(v) for k, v in param_names.items()}
        for role, opt in self.optimizers.items():
            for g in opt.param_groups:
                g.setdefault("role", role)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        """``param -> state`` over every part (a merged copy of the mappings; the values are the parts' own)."""
        return {p: st for opt in self.optimizers.values() for p, st in opt.state.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{role}={type(opt).__name__}" for role, opt in self.optimizers.items())
        return f"CombinedOptimizer({inner})"

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "roles": list(self.optimizers),
            "param_names": {k: list(v) for k, v in self.param_names.items()},
            "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        roles = list(state_dict.get("roles", []))
        if roles != list(self.optimizers):
            raise ValueError(f"optimizer state has roles {roles} but this optimizer has {list(self.optimizers)}; "
                             f"resume with the same optim.name and parameter routing")
        saved_names = state_dict.get("param_names") or {}
        for role in roles:
            if role in saved_names and saved_names[role] != self.param_names.get(role):
                diff = sorted(set(saved_names[role]) ^ set(self.param_names.get(role, [])))
                raise ValueError(f"optimizer state for role {role!r} was saved for other parameters "
                                 f"(differing: {diff[:5]}); resume with the same model and optim.adamw_params")
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state_dict["optimizers"][role])


Optimizer = torch.optim.Optimizer | CombinedOptimizer


def set_lr(optimizer: Optimizer, base_lr: float, multiplier: float) -> None:
    """Set every group's lr to ``base_lr · multiplier`` (all roles share the lr, as in the paper)."""
    for group in optimizer.param_groups:
        lr = float(base_lr) * float(multiplier)
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


def clip_grad_norm(optimizer: Optimizer, max_norm: float, per_group: bool = False) -> float:
    """Clip the gradients of ``optimizer``'s parameters in place; return their total norm before clipping.

    ``per_group=True`` clips each role's parameters (``group["role"]``) to ``max_norm`` on its own (the reference
    GN inner optimizer's per-partition clipping); otherwise all together. ``max_norm <= 0`` only measures.
    """
    by_role: dict[str, list[Tensor]] = {}
    for idx, g in enumerate(optimizer.param_groups):
        by_role.setdefault(str(g.get("role", idx)), []).extend(g["params"])
    groups = {k: [p for p in v if p.grad is not None] for k, v in by_role.items()}
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


def optimizer_step(optimizer: Optimizer, clip: float, per_group: bool = False,
                   closure: Callable[[], float] | None = None) -> float:
    """One update from the gradients already in ``p.grad``: clip (:func:`clip_grad_norm`), step, zero the gradients.
    Every optimizer step of gnlm (baseline, GN inner step, the probe) goes through here. Returns the gradient norm
    before clipping.

    ``closure`` (for an optimizer whose ``step`` needs one, :func:`needs_closure`): a function that computes the
    loss and its gradients into ``p.grad`` at the current parameters and returns the loss; the optimizer calls it
    as often as it needs, each time from zeroed gradients and clipped after. The norm returned is the first call's.
    """
    if closure is None:
        if not isinstance(optimizer, CombinedOptimizer) and needs_closure(type(optimizer)):
            raise ConfigError(f"{type(optimizer).__name__}.step needs a closure, which only gnlm train's baselines "
                              f"give; use an optimizer that steps from p.grad here")
        grad_norm = clip_grad_norm(optimizer, clip, per_group=per_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    norms: list[float] = []

    def evaluate() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        norms.append(clip_grad_norm(optimizer, clip, per_group=per_group))
        return loss

    optimizer.step(evaluate)
    optimizer.zero_grad(set_to_none=True)
    return norms[0]
