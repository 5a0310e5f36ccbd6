"""Checkpoints that are never half-written and never execute pickled code.

A checkpoint file is the ``torch.save`` payload followed by a trailer ``MAGIC + sha256(payload)``. It is written
to a temporary file, fsynced and renamed into place; the previous checkpoint is kept as ``*.prev.pt`` until the
new one is complete, and loading falls back to it when the newest file is missing, truncated or corrupt.
Loading uses ``torch.load(weights_only=True)``: plain tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

from gnlm.config import ConfigError

MAGIC = b"GNLMCKPT-SHA256:"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, corrupt)."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and fsync it; returns the temporary path.

    On failure (full disk, I/O error) the temporary file is removed and the error re-raised."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files that a killed writer left in ``directory`` (``.NAME.tmp-PID``); returns them.

    They are never read (loading only opens ``NAME`` and ``NAME.prev``), so this only tidies up."""
    removed = []
    for p in Path(directory).glob(".*.tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory to write results into, created if missing; a one-line ConfigError naming ``flag``
    when it is a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory; give {flag} DIR")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {path} ({e.strerror}); give another {flag} DIR") from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = _write_synced(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; the old ``path`` becomes ``*.prev.pt`` only once the new file is
    complete and synced. A failed write (full disk, unwritable directory) raises :class:`CheckpointError` and
    leaves the previous checkpoint as it was."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    try:
        tmp = _write_synced(path, payload + MAGIC + hashlib.sha256(payload).digest())
        try:
            if path.exists():
                os.replace(path, prev_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _sync_dir(path.parent)
    except OSError as e:
        last = path if path.exists() else prev_path(path)
        keep = f"the last good checkpoint {last} is intact" if last.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); {keep}") from None


def prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def looks_complete(path: str | Path) -> bool:
    """Whether ``path`` is a file that ends in a checkpoint trailer: a cheap check before compute (it reads the
    last bytes only; loading verifies the checksum)."""
    trailer = len(MAGIC) + 32
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < trailer:
                return False
            f.seek(-trailer, os.SEEK_END)
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file, verifying its checksum. Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    trailer = len(MAGIC) + 32
    if len(data) < trailer or data[-trailer:-32] != MAGIC:
        raise CheckpointError(f"checkpoint {path} is truncated or not a gnlm checkpoint (no checksum trailer)")
    payload, digest = data[:-trailer], data[-32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # e.g. a payload holding pickled code, refused by weights_only
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded with weights_only=True ({first})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    verbose: bool = True) -> dict[str, Any]:
    """Load ``path``, falling back to the previous checkpoint (with a message) when it is unusable."""
    path = Path(path)
    try:
        return read_checkpoint(path, map_location)
    except CheckpointError as err:
        prev = prev_path(path)
        if not prev.exists():
            raise
        if verbose:
            print(f"gnlm: {err}; falling back to the previous checkpoint {prev}", file=sys.stderr)
        try:
            return read_checkpoint(prev, map_location)
        except CheckpointError as err_prev:
            raise CheckpointError(f"{err}, and the previous one is unusable too ({err_prev}); "
                                  f"start a new run or restore a copy") from None
