"""What ``gnlm probe`` measures, resolved and checked before any compute: the source (a run directory, a checkpoint,
a study's warm start, or every checkpoint of a run with ``--along``), its run config and study, and each optimizer
of ``--optimizers`` as the complete RunConfig ``gnlm train`` or ``gnlm bench`` built it, with ``--lrs`` and
``--set`` applied. Every problem is a one-line ConfigError."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gnlm.checkpoint import looks_complete, prev_path
from gnlm.config import ConfigError, merge, parse_overrides, to_dict
from gnlm.optim import BUILTIN_OPTIMIZERS, OptimConfig
from gnlm.results import read_rows
from gnlm.runconfig import RunConfig, build_run_config, upgrade_run_config
from gnlm.search import LR
from gnlm.selection import selected_cell
from gnlm.study import MethodConfig, StudyConfig, upgrade_saved_study


@dataclass
class Source:
    """What a probe reads: the run config, the checkpoints to probe, where its output goes by default and (a study,
    or a study supplying learning rates with ``--along``) the study's results directory."""

    kind: str  # "run" | "checkpoint" | "study" | "along"
    config_path: Path
    checkpoints: list[Path]
    default_out: Path
    study_dir: Path | None = None


def resolve_source(source: str | Path | None, along: str | Path | None) -> Source:
    what = "a run directory (config.yaml + checkpoint.pt), a checkpoint file or a study results directory"
    study_dir = None
    if source is not None:
        src = Path(source)
        if not src.exists():
            raise ConfigError(f"SOURCE {src} does not exist; give {what}")
        if src.is_dir() and (src / "study.yaml").exists():
            study_dir = src
    if along is not None:
        run = Path(along)
        if source is not None and study_dir is None:
            raise ConfigError(f"with --along {run}, SOURCE must be a study results directory (it only supplies "
                              f"learning rates), got {source}; drop SOURCE or give the study")
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--along {run}: not a run directory (no config.yaml); give a directory written by "
                              "gnlm train")
        ckpts = sorted(p for p in run.glob("*.pt") if p.is_file())
        if not ckpts:
            raise ConfigError(f"--along {run}: the run has no checkpoints (*.pt); train it with "
                              "train.checkpoint_every=N to keep some")
        return Source("along", run / "config.yaml", ckpts, run / "probe", study_dir)
    if source is None:
        raise ConfigError(f"no SOURCE given; give {what}, or --along RUN_DIR")
    src = Path(source)
    if study_dir is not None:
        ws = src / "warm_start"
        if not (ws / "checkpoint.pt").is_file() or not (ws / "config.yaml").is_file():
            raise ConfigError(f"study {src} has no shared warm start (warm_start/checkpoint.pt and config.yaml); "
                              "finish its warm start with gnlm bench or probe one of its run directories")
        return Source("study", ws / "config.yaml", [ws / "checkpoint.pt"], src / "probe", study_dir)
    if src.is_dir():
        if not (src / "config.yaml").is_file():
            raise ConfigError(f"SOURCE {src} is neither a run directory (no config.yaml) nor a study results "
                              "directory (no study.yaml); give " + what)
        if not (src / "checkpoint.pt").is_file() and not (src / "checkpoint.prev.pt").is_file():
            raise ConfigError(f"run directory {src} has no checkpoint.pt; let the run finish (gnlm train) or give "
                              "a checkpoint file")
        return Source("run", src / "config.yaml", [src / "checkpoint.pt"], src / "probe")
    if not (src.parent / "config.yaml").is_file():
        raise ConfigError(f"checkpoint {src}: no config.yaml beside it in {src.parent}, so the model and data are "
                          "unknown; copy the run's config.yaml there")
    return Source("checkpoint", src.parent / "config.yaml", [src], src.parent / "probe")


def read_mapping(path: Path, what: str, fix: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; a one-line ConfigError (naming ``what`` it should hold and ``fix``) otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror}); {fix}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{path} is not valid YAML; {fix}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold {what} (a YAML mapping); {fix}")
    return raw


def load_config(path: Path) -> RunConfig:
    raw = read_mapping(path, "a run config", "restore the run's config.yaml")
    try:
        return build_run_config(upgrade_run_config(raw))  # a run of an earlier gnlm is probed too
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_study(study_dir: Path) -> StudyConfig:
    path = study_dir / "study.yaml"
    raw = read_mapping(path, "a study", "restore it (gnlm bench writes it) or probe one of its run directories")
    try:
        return upgrade_saved_study(raw)  # a study of an earlier gnlm is read too
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_checkpoints(paths: list[Path]) -> None:
    """Refuse, before the data is prepared, a checkpoint that cannot load: neither it nor its fallback (the
    previous checkpoint) ends in a checkpoint trailer."""
    for path in paths:
        if not (looks_complete(path) or looks_complete(prev_path(path))):
            raise ConfigError(f"checkpoint {path} is empty, truncated or not a gnlm checkpoint; give another "
                              "checkpoint or run directory")


def parse_list(text: str | Sequence[str], flag: str, example: str) -> list[str]:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    if not items or any(not s for s in items):
        raise ConfigError(f"{flag}: empty entry in {text!r}; give a comma-separated list such as {example}")
    return items


def check_optimizer(name: str, flag: str = "--optimizers") -> str:
    cfg = OptimConfig(name=name)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{flag}: {str(e).removeprefix('optim.name: ')}") from None
    if cfg.needs_closure():  # the probe steps from one gradient per batch
        raise ConfigError(f"{flag}: {name}.step needs a closure, which the probe does not give; probe an "
                          f"optimizer that steps from p.grad")
    return cfg.name


# the RunConfig keys an optimizer of the probe reads: its options, its schedule and the run length it spans
_SET_KEYS = ("optim.", "schedule.", "train.steps")
_SET_EXAMPLE = "--set adamw:optim.betas=[0.9,0.99]"


def parse_sets(items: Sequence[str] | None, labels: list[str]) -> dict[str, list[str]]:
    """``--set LABEL:KEY=VALUE`` (repeatable) -> label -> ["KEY=VALUE", ...]. The label is one of ``--optimizers``
    (an import path has dots, so the label ends at the colon); KEY is a dotted RunConfig key under optim., schedule.
    or train.steps."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        label, colon, setting = str(item).partition(":")
        key, eq, _ = setting.partition("=")
        if not colon or not eq or not key.strip():
            raise ConfigError(f"--set {item!r} is not LABEL:KEY=VALUE; write e.g. {_SET_EXAMPLE}")
        label, key = label.strip(), key.strip()
        if label not in labels:
            raise ConfigError(f"--set {item!r}: {label!r} is not one of --optimizers ({','.join(labels)}); "
                              f"write e.g. {_SET_EXAMPLE}")
        if not any(key == k or key.startswith(k) for k in _SET_KEYS):
            raise ConfigError(f"--set {item!r}: {key!r} is not an optimizer setting; give a key under optim., "
                              f"schedule. or train.steps (e.g. {_SET_EXAMPLE})")
        out.setdefault(label, []).append(f"{key}={setting.partition('=')[2]}")
    return out


@dataclass
class ProbeOptimizer:
    """One optimizer of the probe: the complete RunConfig it is built from, as ``gnlm train`` (a run source) or
    ``gnlm bench`` (a study method) built it, with ``--lrs`` and ``--set`` applied."""

    label: str
    cfg: RunConfig
    lr_source: str
    settings_source: str
    continue_state: bool  # continue the checkpoint's optimizer state (a resumed run; train.init_optimizer)
    start_step: int | None  # schedule position of the first warm-up step; None: the checkpoint's step


def study_method(spec: StudyConfig, label: str, name: str | None) -> MethodConfig:
    """The study's method of ``label``: a method of that name, else the first method whose optimizer is the import
    path ``label``, else a method of its own (``name``: the optimizer it names) on the study's base."""
    for m in spec.methods:
        if m.name == label:
            return m
    for m in spec.methods:
        if m.optimizer is not None and m.optimizer == label and m.control_of is None:
            return m
    assert name is not None
    return MethodConfig(name=name) if name in BUILTIN_OPTIMIZERS else MethodConfig(name=label, optimizer=name)


def probe_optimizers(src: Source, cfg: RunConfig, spec: StudyConfig | None, labels: list[str],
                     names: dict[str, str | None], lrs: list[float] | None, sets: dict[str, list[str]],
                     batch_tokens: int) -> dict[str, ProbeOptimizer]:
    """Every optimizer's RunConfig, checked before any compute. A study (SOURCE, or with --along): the method's run
    config at ``batch_tokens`` exactly as ``gnlm bench`` builds it (:meth:`StudyConfig.run_config`: base, the method's
    optimizer, kwargs and overrides, the selected point with every searched setting, its step budget), at the
    selected point when the study selected one there. A run or checkpoint: the run's own config for the optimizer it
    trained with; another optimizer gets the run's config with a default ``optim`` section of that name."""
    rows = read_rows(src.study_dir) if spec is not None and src.study_dir is not None else []
    out = {}
    for i, label in enumerate(labels):
        lr = lrs[i] if lrs is not None else None
        if spec is not None:
            m = study_method(spec, label, names[label])
            if m.family != "baseline":
                raise ConfigError(f"--optimizers: {label} is a {m.family} method of the study; the probe scores "
                                  "baseline optimizers against the GN steps it computes itself (its references)")
            selected = m.control_of or m.name
            cell = selected_cell(spec, rows, selected, batch_tokens) if m in spec.methods else None
            point = dict(cell["best_point"]) if cell else {LR: OptimConfig().lr}
            lr_source = f"study best lr of {selected} at batch {batch_tokens}" if cell else "OptimConfig default"
            if lr is not None:
                point[LR], lr_source = lr, "--lrs"
            rc = spec.run_config(m, batch_tokens, point, spec.selection_seed, src.study_dir or ".")
            where = (f"study method {m.name} at batch {batch_tokens}" if m in spec.methods else
                     f"the study's base with optimizer {label} at batch {batch_tokens} (not a method of the study)")
            if cell:
                where += f", selected point {cell['best_point']}"
            own = src.kind == "study" and rc.train.init_optimizer
            start = 0 if src.kind == "study" else None  # a study's run starts from its warm start at step 0
        else:
            name = names[label]
            own = cfg.method == "baseline" and name == cfg.optim.name
            raw = to_dict(cfg)
            if own:
                lr_source, where = "the run's optim.lr", f"the run's config ({src.config_path})"
            else:
                raw = merge({k: v for k, v in raw.items() if k != "optim"}, {"method": "baseline", "optim": {
                    "name": name, "lr": OptimConfig().lr}})
                lr_source = "OptimConfig default"
                where = (f"the run's config ({src.config_path}) with optim: {{name: {name}}} (other optim fields "
                         "default)")
            if lr is not None:
                raw, lr_source = merge(raw, {"optim": {"lr": lr}}), "--lrs"
            rc = build_run_config(raw)
            start = None
        if label in sets:
            if any(s.startswith("optim.lr=") for s in sets[label]):
                lr_source = "--set"
            where += "; --set " + ", ".join(sets[label])
            try:
                rc = build_run_config(merge(to_dict(rc), parse_overrides(sets[label])))
            except ConfigError as e:
                raise ConfigError(f"--set {label}: {e}") from None
        if rc.optim.needs_closure():
            check_optimizer(rc.optim.name, f"--optimizers {label}")
        if src.kind != "study":  # the checkpoint's own optimizer state, for the optimizer that wrote it
            own = cfg.method == "baseline" and rc.optim.name == cfg.optim.name
        out[label] = ProbeOptimizer(label, rc, lr_source, where, own, start)
    return out
