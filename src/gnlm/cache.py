"""Where gnlm keeps what it downloads and prepares: ``data.cache_dir``, else ``$GNLM_CACHE``, else
``~/.cache/gnlm``, holding the Shakespeare texts (``shakespeare/``), hub tokenizers (``tokenizers/``) and prepared
token files (``prepared/``). Everything is written under a temporary name and renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gnlm.config import ConfigError


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$GNLM_CACHE``, else ``~/.cache/gnlm``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GNLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gnlm"


def cache_write_error(directory: Path, e: OSError) -> ConfigError:
    """The one-line error for a data cache that cannot be written (permissions, a read-only or full disk)."""
    return ConfigError(f"cannot write to the data cache {directory} ({e.strerror or type(e).__name__}); set "
                       f"data.cache_dir (or $GNLM_CACHE) to a writable directory, or data.data_dir to prepared data")


def make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A private temp dir next to its final place (same filesystem, so rename is atomic), with umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp
