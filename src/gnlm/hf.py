"""Models gnlm did not write: Hugging Face ``transformers`` causal LMs built from a config, and any ``nn.Module``
from a factory (``model.source: hf`` / ``model.module``; built by ``model.build_model``).

A Hugging Face model is built from its config alone (``AutoModelForCausalLM.from_config``): random initialisation
from the run's seed, eager attention (forward-mode AD does not run through fused attention kernels, and GN's
generic linearisation is ``torch.func.jvp``), no KV cache, and every dropout probability the config has set to 0
unless given inline (GN linearises a deterministic function; gnlm's GPT has no dropout either). No weights are
downloaded: ``hf_config`` is the config's fields inline (``{model_type: llama, hidden_size: 64, ...}``), a local
``config.json`` or a folder holding one, or a name already in the local Hugging Face cache. ``transformers`` is an
optional dependency (``pip install 'gnlm[hf]'``), imported only here and only for such a model.

:class:`CausalLM` wraps the model so that it maps ids (B, T) to logits (B, T, V) like gnlm's GPT; its parameter
names are the model's with the prefix ``lm.``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gnlm.config import ConfigError, first_line, import_module_from_cwd

__all__ = ["CausalLM", "build_hf_model", "build_module", "embedding_and_head", "hf_config", "hf_lengths"]

_INSTALL = "pip install 'gnlm[hf]' (or pip install transformers)"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model.source=hf needs transformers: {_INSTALL}") from None
    transformers.logging.set_verbosity_error()  # e.g. a tiny config's bos_token_id outside its vocabulary
    return transformers


def hf_config(spec: str | dict[str, Any]) -> Any:
    """The ``transformers`` config of ``model.hf_config`` (see the module docstring), with dropout off unless set
    inline. One-line ConfigErrors for a missing ``model_type``, an unknown one and a name not available offline."""
    return _hf_config(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _hf_config(spec_json: str) -> Any:
    spec = json.loads(spec_json)
    auto = _transformers().AutoConfig
    given: set[str] = set()
    if isinstance(spec, dict):
        fields = dict(spec)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ConfigError("model.hf_config: the inline config needs model_type (e.g. llama, gpt2); write "
                              "{model_type: llama, hidden_size: 64, ...}")
        given = set(fields)
        try:
            config = auto.for_model(model_type, **fields)
        except ValueError as e:
            raise ConfigError(f"model.hf_config: {first_line(e)}; give a model_type transformers knows") from None
    else:
        path = Path(os.path.expanduser(spec))
        if path.is_file():
            try:
                fields = json.loads(path.read_text())
            except (ValueError, OSError, UnicodeDecodeError):
                raise ConfigError(f"model.hf_config: {spec} is not a JSON config file; give a config.json") from None
            if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
                raise ConfigError(f"model.hf_config: {spec} has no model_type; give a transformers config.json")
            return _hf_config(json.dumps(fields, sort_keys=True))
        try:
            config = auto.from_pretrained(str(path) if path.is_dir() else spec, local_files_only=True)
        except (OSError, ValueError):
            raise ConfigError(f"model.hf_config: {spec!r} is not available offline (no local config of that name; "
                              f"gnlm downloads nothing); pass the config's fields inline (model.hf_config: "
                              f"{{model_type: llama, hidden_size: 64, ...}}) or a local path to its config.json") from None
    for key, value in config.to_dict().items():
        if (key.endswith(("dropout", "pdrop")) and isinstance(value, float) and key not in given):
            setattr(config, key, 0.0)
    config.use_cache = False
    return config


def hf_lengths(config: Any) -> tuple[int, int | None]:
    """(vocabulary size, longest sequence) of a ``transformers`` config (None: no fixed limit found)."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    longest = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length",
                                               "seq_length") if isinstance(getattr(text, k, None), int)), None)
    return int(text.vocab_size), longest


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as a map ids (B, T) -> logits (B, T, V) (eager attention, no cache)."""

    def __init__(self, config: Any):
        super().__init__()
        self.lm = _transformers().AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx, use_cache=False).logits


def build_hf_model(spec: str | dict[str, Any]) -> CausalLM:
    return CausalLM(hf_config(spec))


def module_factory(path: str) -> Any:
    """The callable ``pkg.mod:factory`` names (a module in the working directory is importable)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model.module: {path!r} is not of the form package.module:factory; write e.g. "
                          f"mymodel:build")
    try:
        module = import_module_from_cwd(module_name)
    except ImportError as e:
        raise ConfigError(f"model.module: cannot import {module_name!r} ({first_line(e)}; looked in the working "
                          f"directory and the installed packages); fix the path") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ConfigError(f"model.module: {module_name!r} has no callable {attr!r}; name a function or class that "
                          f"builds the nn.Module")
    return factory


def build_module(path: str, kwargs: dict[str, Any]) -> nn.Module:
    """``factory(**kwargs)`` of ``model.module``: an ``nn.Module`` mapping ids (B, T) to logits (B, T, V)."""
    model = module_factory(path)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.module: {path} returned {type(model).__name__}, not an nn.Module mapping ids "
                          f"(B, T) to logits (B, T, V)")
    return model


def embedding_and_head(model: nn.Module) -> list[str]:
    """Names of the parameters of a model's input embeddings and output layer (what Muon leaves to AdamW): a
    ``transformers`` model's ``get_input_embeddings``/``get_output_embeddings``, otherwise every ``nn.Embedding``
    and the last module whose weight has as many rows as the largest embedding has entries (the vocabulary)."""
    wanted: list[nn.Module] = []
    lm = getattr(model, "lm", None)
    if isinstance(model, CausalLM) and lm is not None:
        wanted = [m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None]
    else:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        wanted = list(embeddings)
        if embeddings:
            vocab = max(m.num_embeddings for m in embeddings)
            heads = [m for m in model.modules() if not isinstance(m, nn.Embedding)
                     and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
                     and m.weight.shape[0] == vocab]
            wanted += heads[-1:]
    ids = {id(p) for m in wanted for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) in ids]

