"""A study's results file, ``runs.jsonl``: one :class:`Row` per finished (or failed) run, written and read here only.

Rows are appended durably under the file's lock (``runs.jsonl.lock``; several processes append): line + flush +
fsync, so a reader (or a restarted study) sees whole rows only, and a row is never half-written. A line that is not
a complete row (cut off by a killed writer, or edited by hand) is left out and named on stderr; the first
``gnlm bench`` on the directory then rewrites the file without it. Each row carries its ``schema`` version; rows of
earlier gnlm versions are read and brought up to date (:func:`Row.from_json`).

Nothing here trains: a row is built from a run's ``summary.json`` and ``metrics.jsonl`` (:func:`finished_row`) or
from the error that ended it (:func:`error_row`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from filelock import FileLock

from gnlm.checkpoint import atomic_write_bytes
from gnlm.config import ConfigError, dumps_json

SCHEMA = 3  # 1: before the redesign (forward-pass equivalents, ls_range); 2: no hparams; 3: this Row
RUNS_FILE = "runs.jsonl"
FAILED_FILE = "runs.failed.jsonl"  # rows set aside by --retry-failed (every failure stays on record)
CURVE_KEYS = ("step", "eval_loss", "tokens", "flops", "wall_time")
_DROPPED_V1 = ("forward_equivalents", "ls_range")  # fields of schema 1 that no longer exist


@dataclass
class Row:
    """One run of a study, as recorded in runs.jsonl.

    Identity: ``run_id`` (``method/b<batch>/lr<lr>/s<seed>``; a searched point's ``method/b<batch>/t<k>/s<seed>``),
    ``method``, ``family`` (``baseline`` or ``gn``), ``batch_tokens``, ``lr``, ``seed``, ``run_dir`` (relative to
    the results directory), and ``hparams``: every setting the study chose for this run (``lr`` and, in a
    multi-dimensional search, dotted RunConfig keys).
    Outcome: ``status`` (``finished``, or ``error`` with the ``error`` message: a failure, which ``--retry-failed``
    runs again); ``reached`` the run's stop target (the deepest declared target) at ``steps`` (the first
    evaluation at or below it) with ``tokens``/``line_search_tokens``/``wall_time`` to there; ``final_eval_loss``,
    ``best_eval_loss``; ``diverged`` with ``diverged_reason``; ``steps_run``, ``tokens_run``, ``total_wall_time``;
    ``skipped_steps`` (GN outer steps whose line search kept θ); ``stopped_early`` (an lr-search run stopped once
    it could no longer be selected).
    Curve (so that runs.jsonl alone recomputes every number): ``curve``, the columns ``CURVE_KEYS`` of the
    evaluation rows; ``crossings``, per declared target (``target_key``) where the curve first reaches it
    (:func:`target_crossing`); ``flops_per_step``; for GN ``inner_steps`` (N) and ``etas`` (the line search's
    η per outer step)."""

    run_id: str
    method: str
    family: str
    batch_tokens: int
    lr: float
    seed: int
    run_dir: str
    status: Literal["finished", "error"] = "finished"
    reached: bool = False
    steps: int | None = None
    tokens: int | None = None
    line_search_tokens: int | None = None
    wall_time: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    diverged: bool = False
    diverged_reason: str | None = None
    error: str | None = None
    steps_run: int | None = None
    tokens_run: int | None = None
    total_wall_time: float | None = None
    skipped_steps: int = 0
    stopped_early: str | None = None
    curve: dict[str, list[Any]] = field(default_factory=dict)
    crossings: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    flops_per_step: float | None = None
    inner_steps: int | None = None
    etas: list[float] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def failed(self) -> bool:
        return self.status == "error"

    @property
    def all_steps_skipped(self) -> bool:
        """Every step the run took was skipped (GN, η = 0 each time): it never moved from its starting point."""
        return bool(self.steps_run) and self.skipped_steps >= self.steps_run

    def to_json(self) -> str:
        return dumps_json(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: Any) -> Row:
        """A row from its JSON object (any schema up to :data:`SCHEMA`); ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        data = dict(data)
        schema = data.pop("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise ValueError(f"schema {schema!r} is newer than this gnlm's ({SCHEMA}); upgrade gnlm to read it")
        if schema == 1:
            for key in _DROPPED_V1:
                data.pop(key, None)
        if schema < 3 and "lr" in data:  # the lr was the only setting a study chose
            data["hparams"] = {"lr": data["lr"]}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fields {', '.join(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return cls(**data)


def runs_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / RUNS_FILE


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


def _parse(path: Path) -> tuple[list[Row], list[str]]:
    """The rows of ``path`` and, for every line that is not one, why (naming the line). A one-line ConfigError
    when the file cannot be read, or when no line of it is a JSON object (a torn last line aside): no runs file."""
    rows, bad = [], []
    try:
        text = path.read_bytes().decode(errors="replace") if path.exists() else ""
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror}); restore the file or give another results "
                          f"directory") from None
    lines = text.split("\n")
    torn = not text.endswith("\n") and text != ""
    junk, objects = None, 0  # the first bad line that no killed writer cut off; lines that are JSON objects
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            objects += isinstance(data, dict)
            rows.append(Row.from_json(data))
        except ValueError as e:
            cut = " (cut off: a process died while writing it)" if torn and i == len(lines) else ""
            why = "not valid JSON" if isinstance(e, json.JSONDecodeError) else str(e)
            bad.append(f"{path}: line {i} is not a complete study row{cut}: {why}; it is left out")
            junk = junk or (None if cut else f"line {i}: {why}")
    if junk and not objects:  # leaving every line out (and a repair rewriting the file) would lose all of it
        raise ConfigError(f"{path} is not a study's runs file: no line of it is a JSON object ({junk}); restore "
                          f"the file, or move it away to run the study afresh")
    return rows, bad


def read_rows(results_dir: str | Path, warn: bool = False) -> list[Row]:
    """Every complete row of the study's runs.jsonl (none when there is no file). ``warn``: name each line left
    out on stderr."""
    rows, bad = _parse(runs_path(results_dir))
    if warn:
        for message in bad:
            print(f"gnlm: warning: {message}", file=sys.stderr)
    return rows


def find_row(results_dir: str | Path, run_id: str) -> Row | None:
    return next((r for r in read_rows(results_dir) if r.run_id == run_id), None)


def append_row(results_dir: str | Path, row: Row) -> bool:
    """Append ``row`` durably under the file's lock, unless a row of the same run is there already. Returns whether
    it was written."""
    path = runs_path(results_dir)
    with _lock(path):
        if any(r.run_id == row.run_id for r in _parse(path)[0]):
            return False
        with open(path, "a") as f:
            f.write(row.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
    return True


def repair(results_dir: str | Path) -> None:
    """Rewrite runs.jsonl without the lines that are not complete rows (each named on stderr first), so that new
    rows start on a line of their own and the dropped runs run again. Atomic: the old file stays until the new one
    is complete."""
    path = runs_path(results_dir)
    with _lock(path):
        rows, bad = _parse(path)
        for message in bad:
            print(f"gnlm: warning: {message} (the file is rewritten without it, and that run runs again)",
                  file=sys.stderr)
        if bad:
            atomic_write_bytes(path, "".join(r.to_json() + "\n" for r in rows).encode())


def set_aside_failed(results_dir: str | Path) -> int:
    """Move the rows with status "error" from runs.jsonl to runs.failed.jsonl (appended: every failure stays on
    record), so that their runs count as not run and run again; returns how many moved. runs.jsonl is replaced
    atomically only after the failed rows are safely in runs.failed.jsonl."""
    path = runs_path(results_dir)
    with _lock(path):
        rows = _parse(path)[0]
        failed = [r for r in rows if r.failed]
        if failed:
            with open(path.with_name(FAILED_FILE), "a") as f:
                f.write("".join(r.to_json() + "\n" for r in failed))
                f.flush()
                os.fsync(f.fileno())
            atomic_write_bytes(path, "".join(r.to_json() + "\n" for r in rows if not r.failed).encode())
    return len(failed)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file such as a run's metrics.jsonl (a line that is not one is skipped)."""
    path = Path(path)
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def target_key(target: float) -> str:
    """How a target loss is written as a JSON key (rows' ``crossings``)."""
    return f"{target:g}"


def target_crossing(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Where a run's eval curve first reaches ``target``: the integer step of the first evaluation at or below it
    (``step``) and the interpolated crossing (``step_interp``): linear in loss between the last evaluation above
    the target and the first at or below it. ``tokens``, ``flops`` and ``wall_time`` are interpolated the same
    way (``*_interp``) next to their values at the integer step. None when the target is never reached."""
    prev = None
    keys = ("step", "tokens", "flops", "wall_time")
    for row in curve:
        loss = row.get("eval_loss")
        if loss is None or not math.isfinite(loss):
            continue
        if loss <= target:
            out = {k: row.get(k) for k in keys}
            t = 1.0 if prev is None else (prev["eval_loss"] - target) / (prev["eval_loss"] - loss)
            for k in keys:
                a, b = (prev or row).get(k), row.get(k)
                out[f"{k}_interp"] = None if a is None or b is None else a + t * (b - a)
            return out
        prev = row
    return None


class RunIdentity(Protocol):
    """What a row needs to know of its run beyond its summary (``plan.RunSpec`` is one): identity, where it lives,
    the declared targets and GN's line-search tokens per outer step."""

    run_id: str
    method: str
    family: str
    batch_tokens: int
    lr: float
    seed: int
    targets: tuple[float, ...]
    line_search_tokens_per_step: int
    hparams: dict[str, Any]

    @property
    def run_dir(self) -> str: ...


def _identity(run: RunIdentity, results_dir: Path) -> dict[str, Any]:
    return dict(run_id=run.run_id, method=run.method, family=run.family, batch_tokens=run.batch_tokens,
                lr=float(run.lr), seed=run.seed, run_dir=os.path.relpath(run.run_dir, results_dir),
                hparams=dict(run.hparams))


def finished_row(run: RunIdentity, summary: dict[str, Any], results_dir: str | Path) -> Row:
    """The row of a run that ended (reached, not reached, stopped early or diverged), from its ``summary.json``
    and its metrics.jsonl."""
    reached = bool(summary.get("reached_target")) and not summary.get("diverged")
    steps = summary.get("target_step") if reached else None
    diverged = bool(summary.get("diverged"))
    metrics = read_jsonl(Path(run.run_dir) / "metrics.jsonl")
    evals = [r for r in metrics if r.get("eval_loss") is not None]
    row = Row(
        **_identity(run, Path(results_dir)), reached=reached, steps=steps,
        tokens=summary.get("target_tokens") if reached else None,
        line_search_tokens=steps * run.line_search_tokens_per_step if reached else None,
        wall_time=summary.get("target_wall_time") if reached else None,
        final_eval_loss=summary.get("final_eval_loss"), best_eval_loss=summary.get("best_eval_loss"),
        diverged=diverged, diverged_reason=summary.get("diverged_reason") if diverged else None,
        error=summary.get("message") if diverged else None, steps_run=summary.get("step"),
        tokens_run=summary.get("tokens"), total_wall_time=summary.get("wall_time"),
        skipped_steps=summary.get("skipped_steps", 0), stopped_early=summary.get("stopped_early"),
        curve={k: [r.get(k) for r in evals] for k in CURVE_KEYS},
        crossings={target_key(t): target_crossing(metrics, t) for t in run.targets},
        flops_per_step=next((r["flops"] / r["step"] for r in metrics if r.get("flops") and r.get("step")), None))
    if run.family == "gn":
        row.inner_steps = next((r["inner_steps"] for r in metrics if "inner_steps" in r), None)
        row.etas = [r["eta"] for r in metrics if "eta" in r]
    return row


def error_row(run: RunIdentity, err: BaseException, results_dir: str | Path) -> Row:
    """The row of a run that failed (an exception, a dead worker or job): not reached, with the error's first line."""
    first = (str(err).strip().splitlines() or [""])[0]
    return Row(**_identity(run, Path(results_dir)), status="error", error=f"{type(err).__name__}: {first}"[:500])


def check_readable(results_dir: str | Path) -> None:
    """A one-line ConfigError when runs.jsonl exists but cannot be read at all (not a file, no permission)."""
    path = runs_path(results_dir)
    if path.exists() and (not path.is_file() or not os.access(path, os.R_OK)):
        raise ConfigError(f"{path} is not a readable file; restore it (gnlm bench writes it) or remove it")
