"""Tokenizers: a uniform face over HF ``tokenizers`` and SentencePiece (:class:`Tokenizer`), loaded from a file, a
folder or a hub name (:func:`load_tokenizer`), and the byte-level BPE that ``data.tokenizer: bpe`` trains
(:func:`train_bpe`)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Literal

from gnlm.cache import cache_write_error, resolve_cache_dir
from gnlm.config import ConfigError, first_line

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")
BPE_EOS = "<|endoftext|>"


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
                raise ConfigError(f"tokenizer {spec!r} is not a valid SentencePiece model ({first_line(e)})") from None
            return Tokenizer(sp, "spm", path)
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"tokenizer {spec!r} is not a valid tokenizer.json ({first_line(e)})") from None
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
        raise cache_write_error(local.parent, e) from None
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


def looks_like_path(spec: str) -> bool:
    """A tokenizer spec that names a file or folder (not ``bpe``, not a hub name)."""
    return spec != "bpe" and (spec.endswith((".json", ".model")) or spec.startswith((".", "/", "~"))
                              or Path(spec).expanduser().exists())
