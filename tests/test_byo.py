"""Bring your own optimizer, data and model (issue 18): an optimizer class in the working directory gets exactly
what its config says and config.yaml records it; closure optimizers; data folders with any text extension, paths
relative to the config file, the tokenizer in the run directory; Hugging Face causal LMs and any ids -> logits
module under the trainers, with the generic (torch.func) GN path checked against dense float64 Jacobians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gnlm.cli import main
from gnlm.config import ConfigError
from gnlm.optim import build_optimizer
from gnlm.runconfig import load_run_config
from gnlm.train import run_training

LION = '''
import torch


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
'''

TINY = ["model=nano", "model.vocab_size=512", "data.vocab_size=512", "data.seq_len=32", "train.progress=false",
        "train.threads=1", "train.batch_size=4", "train.eval_every=100", "data.eval_sequences=4"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The working directory is tmp_path, holding myopt.py (a Lion class); sys.path as the console script has it
    (without the working directory)."""
    (tmp_path / "myopt.py").write_text(LION)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    monkeypatch.delitem(sys.modules, "myopt", raising=False)
    return tmp_path


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------- optimizers


def test_optimizer_in_the_working_directory_gets_exactly_its_config(in_tmp):
    cfg = load_run_config(None, [f"out_dir={in_tmp / 'run'}", *TINY, "train.steps=2", "optim.name=myopt.Lion",
                                 "optim.betas=[0.9,0.95]", "optim.lr=1e-3"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.0
    # fields Lion does not take are not passed and recorded as null
    assert cfg.optim.eps is None and cfg.optim.momentum is None and cfg.optim.ns_steps is None
    opt = build_optimizer({"w": torch.zeros(3, requires_grad=True)}, cfg.optim)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-3
    summary = run_training(cfg)
    assert summary["step"] == 2 and not summary["diverged"]
    saved = read_yaml(in_tmp / "run" / "config.yaml")["optim"]
    assert saved["betas"] == [0.9, 0.95] and saved["eps"] is None and saved["weight_decay"] == 0.0
    # the saved config is the same run: it resolves to itself
    again = load_run_config(str(in_tmp / "run" / "config.yaml"))
    assert again.optim == cfg.optim


def test_unset_fields_take_the_class_defaults(in_tmp):
    cfg = load_run_config(None, ["optim.name=myopt.Lion"])
    assert cfg.optim.betas == (0.9, 0.99)  # Lion's own default, not gnlm's AdamW default
    cfg = load_run_config(None, ["optim.name=torch.optim.SGD", "optim.momentum=0.9"])
    assert cfg.optim.momentum == 0.9 and cfg.optim.nesterov is False and cfg.optim.betas is None


def test_a_set_field_the_class_does_not_accept_is_one_line(in_tmp, capsys):
    with pytest.raises(ConfigError, match=r"optim.eps: myopt.Lion does not accept 'eps'.*optim.kwargs"):
        load_run_config(None, ["optim.name=myopt.Lion", "optim.eps=1e-6"])
    rc = main(["train", f"out_dir={in_tmp / 'r'}", "optim.name=myopt.Lion", "optim.momentum=0.9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "optim.momentum" in err[0] and "optim.kwargs" in err[0]
    assert not (in_tmp / "r").exists()


def test_lbfgs_steps_with_a_closure_counted_in_the_flops(in_tmp):
    cfg = load_run_config(None, [f"out_dir={in_tmp / 'run'}", *TINY, "train.steps=2", "optim.name=torch.optim.LBFGS",
                                 "optim.lr=0.01", "optim.kwargs={max_iter: 3}"])
    summary = run_training(cfg)
    rows = [json.loads(x) for x in (in_tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 2 and not summary["diverged"]
    steps = [r for r in rows if r["step"] > 0]
    calls = [r["closure_calls"] for r in steps]
    assert all(1 <= c <= 4 for c in calls)
    per_call = steps[0]["flops"] / calls[0]
    assert steps[1]["flops"] - steps[0]["flops"] == pytest.approx(calls[1] * per_call)


def test_gn_refuses_a_closure_inner_optimizer(in_tmp):
    with pytest.raises(ConfigError, match="needs a closure"):
        load_run_config(None, ["method=gn", "gn.inner_optim.name=torch.optim.LBFGS"])


def test_console_script_imports_from_the_working_directory(in_tmp):
    """`gnlm` (not python -m) finds myopt.py beside the command."""
    env = {**os.environ, "PYTHONPATH": ""}
    script = Path(sys.executable).with_name("gnlm")
    out = subprocess.run([str(script), "train", f"out_dir={in_tmp / 'r'}", "optim.name=myopt.Lion",
                          "optim.eps=1e-6"], cwd=in_tmp, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "does not accept 'eps'" in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------------------- data


def own_text(root: Path, small_docs: list[str]) -> Path:
    """A folder of one's own text: Python source, Markdown, an image and a hidden folder."""
    src = root / "mytext"
    (src / "pkg").mkdir(parents=True)
    (src / ".git").mkdir()
    for i, doc in enumerate(small_docs[:24]):
        (src / "pkg" / f"m{i}.py").write_text(f"# module {i}\n'''{doc}'''\n")
    for i, doc in enumerate(small_docs[24:30]):
        (src / f"notes{i}.md").write_text(doc)
    (src / "logo.png").write_bytes(b"\x89PNG\r\n")
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return src


def test_own_folder_relative_paths_run_tokenizer_and_probe_elsewhere(tmp_path, small_docs, monkeypatch, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    own_text(proj, small_docs)
    (proj / "train.yaml").write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "run"), "model": {"preset": "nano", "vocab_size": 512},
        "data": {"source": "files", "paths": ["mytext"], "vocab_size": 512, "seq_len": 32, "eval_sequences": 4,
                 "data_dir": "prepared"},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "threads": 1, "checkpoint_every": 1}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's relative paths are its folder's, not the working directory's
    assert main(["train", str(proj / "train.yaml"), "train.progress=false"]) == 0
    err = capsys.readouterr().err
    assert "data.paths: took 30 files (.py 24, .md 6), skipped 2 (.png 1, hidden 1)" in err
    saved = read_yaml(tmp_path / "run" / "config.yaml")
    assert saved["data"]["paths"] == [str(proj / "mytext")] and saved["data"]["data_dir"] == str(proj / "prepared")
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (proj / "prepared" / "tokenizer.json").read_bytes()
    # the prepared data is gone: resuming (from yet another directory) tokenizes with the run's own tokenizer
    import shutil

    shutil.rmtree(proj / "prepared")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tmp_path / "run" / "config.yaml"), "train.steps=3", "--resume"]) == 0
    assert "tokenizing with the run's tokenizer" in capsys.readouterr().err
    # probed from another working directory
    monkeypatch.chdir(elsewhere)
    assert main(["probe", str(tmp_path / "run"), "--optimizers", "adamw", "--lrs", "3e-3", "--probe-batches", "1",
                 "--warmup-steps", "1", "--batch-tokens", "64", "--cg-iters", "4", "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------------------- models

HF_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2, "vocab_size": 11, "n_positions": 8},
    "llama": {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11, "max_position_embeddings": 8},
}


def tiny_hf(kind: str, seed: int = 0):
    pytest.importorskip("transformers")
    from conftest import randomize_parameters

    from gnlm.hf import build_hf_model

    torch.manual_seed(seed)
    model = randomize_parameters(build_hf_model(HF_CONFIGS[kind]).double(), seed=seed).eval()
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}, x, y


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_surrogate_gradient_and_ggn_products_match_dense_float64(kind, monkeypatch):
    from test_curvature import Dense, plus, random_like, rel

    from gnlm.curvature import ggn_vector_product, layerwise_blocks, surrogate_grad

    if kind == "llama":  # LlamaRMSNorm computes in float32 whatever the dtype: keep float64 for a 1e-8 check
        from transformers.models.llama import modeling_llama

        def rms_norm(self, h):
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model, params0, x, y = tiny_hf(kind)
    dense = Dense(model, params0, x, y)
    delta = random_like(params0, 0.05)
    d = dense.flat(delta)
    loss, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn")
    assert rel(dense.flat(grads), dense.g + dense.G @ d) < 1e-8
    assert abs(float(loss) - float(dense.loss + dense.g @ d + 0.5 * d @ dense.G @ d)) < 1e-10
    v = random_like(params0, 1.0, seed=2)
    assert rel(dense.flat(ggn_vector_product(model, params0, x, y, v)), dense.G @ dense.flat(v)) < 1e-8
    # layerwise: the default blocks are the embeddings, each decoder layer, the final norm + head
    blocks = layerwise_blocks(model)
    assert len(blocks) == 4 and all(n.startswith(("lm.model.layers.0.", "lm.transformer.h.0."))
                                    for n in blocks[1])
    gbd = dense.G * dense.block_mask(blocks)
    _, grads = surrogate_grad(model, params0, plus(params0, delta), x, y, kind="gn", blocks=blocks)
    assert rel(dense.flat(grads), dense.g + gbd @ d) < 1e-8
    assert rel(dense.flat(ggn_vector_product(model, params0, x, y, v, blocks=blocks)), gbd @ dense.flat(v)) < 1e-8


MYMODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm(x)
        mean = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[:, None]
        x = x + self.mix(mean)
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """ids (B, T) -> logits (B, T, V): embedding, causal running-mean mixing blocks, head."""

    def __init__(self, vocab_size, d=32, n_layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build(vocab_size=512, d=32):
    return TinyLM(vocab_size, d)
'''

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 64}
MODELS = {
    "hf-llama": ["model.source=hf", f"model.hf_config={json.dumps(LLAMA)}"],
    "hf-gpt2": ["model.source=hf", f"model.hf_config={json.dumps(GPT2)}"],
    "module": ["model.module=mymodel:build", "model.vocab_size=512", "model.max_seq_len=64"],
}
METHODS = {
    "adamw": ["optim.name=adamw", "optim.lr=1e-2", "train.steps=3"],
    "muon": ["optim.name=muon", "optim.lr=2e-2", "train.steps=3"],
    "gn": ["method=gn", "gn.inner_steps=3", "gn.inner_batch_size=4", "train.steps=1"],
    "gn-layerwise": ["method=gn", "gn.layerwise=true", "gn.inner_steps=3", "gn.inner_batch_size=4",
                     "train.steps=1"],
}
BASE = ["data.vocab_size=512", "data.seq_len=32", "data.eval_sequences=8", "train.progress=false", "train.threads=1",
        "train.batch_size=4", "train.eval_every=100"]


@pytest.mark.parametrize("model", list(MODELS))
def test_models_we_did_not_write_train_with_every_method(model, tmp_path, monkeypatch):
    if model.startswith("hf"):
        pytest.importorskip("transformers")
    (tmp_path / "mymodel.py").write_text(MYMODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    for method, overrides in METHODS.items():
        cfg = load_run_config(None, [f"out_dir={tmp_path / method}", *BASE, *MODELS[model], *overrides])
        if method == "muon":  # Muon leaves the embedding and the output layer to AdamW, as for gnlm's GPT
            assert len(cfg.optim.adamw_params) in (1, 2) and any("emb" in n or "wte" in n
                                                                for n in cfg.optim.adamw_params)
        summary = run_training(cfg)
        rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert not summary["diverged"], (model, method)
        assert summary["final_eval_loss"] < rows[0]["eval_loss"], (model, method)
        assert rows[-1]["flops"] > 0


def test_hf_model_under_gn_resumes_bitwise_and_is_probed(tmp_path):
    pytest.importorskip("transformers")
    from gnlm.checkpoint import read_checkpoint

    common = [*BASE, *MODELS["hf-llama"], "method=gn", "gn.inner_steps=2", "gn.inner_batch_size=4"]
    run_training(load_run_config(None, [f"out_dir={tmp_path / 'straight'}", *common, "train.steps=2"]))
    run_training(load_run_config(None, [f"out_dir={tmp_path / 'split'}", *common, "train.steps=1"]))
    run_training(load_run_config(None, [f"out_dir={tmp_path / 'split'}", *common, "train.steps=2"]), resume=True)
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["inner"]["phi"]:
        assert torch.equal(a["inner"]["phi"][k], b["inner"]["phi"][k]), k
    # and it is probed like any run
    assert main(["probe", str(tmp_path / "split"), "--optimizers", "adamw", "--lrs", "1e-3", "--probe-batches", "1",
                 "--warmup-steps", "1", "--batch-tokens", "64", "--cg-iters", "4", "--no-progress"]) == 0


def test_hf_config_not_available_offline_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    rc = main(["train", f"out_dir={tmp_path / 'r'}", "model.source=hf", "model.hf_config=nosuch-org/nosuch-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not available offline" in err[0] and "inline" in err[0], err


# -------------------------------------------------------------------------------------------------------- README


def readme_blocks() -> dict[str, str]:
    """The README's Bring-your-own files and commands: each fenced block after a ``<!-- byo:NAME -->`` line."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    out = {}
    for part in text.split("<!-- byo:")[1:]:
        name, rest = part.split(" -->", 1)
        out[name] = rest.split("```", 2)[1].split("\n", 1)[1]
    return out


SHORTER = {
    "train": ["train.steps=2", "train.progress=false", "train.threads=1", "gn.inner_steps=2"],
    "bench": ["max_steps=2", "base.train.threads=1", "progress=false"],
    "probe": ["--probe-batches", "1", "--warmup-steps", "1", "--batch-tokens", "128", "--cg-iters", "4",
              "--no-progress"],
}


def test_readme_bring_your_own(tmp_path, small_docs, monkeypatch, capsys):
    """The README's example, shortened: Lion from a file trained, in a study next to Muon and GN, probed; a tiny HF
    Llama trained with GN; a folder of one's own text as data."""
    import shlex

    blocks = readme_blocks()
    assert set(blocks) == {"myopt.py", "commands", "lion-study.yaml"}
    for name in ("myopt.py", "lion-study.yaml"):
        (tmp_path / name).write_text(blocks[name])
    (tmp_path / "mytext").mkdir()
    for i, doc in enumerate(small_docs):
        (tmp_path / "mytext" / (f"m{i}.py" if i % 3 else f"n{i}.md")).write_text(doc)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myopt", raising=False)
    commands = [shlex.split(line) for line in blocks["commands"].strip().splitlines()]
    assert [c[:2] for c in commands] == [["gnlm", "train"], ["gnlm", "bench"], ["gnlm", "probe"], ["gnlm", "train"]]
    for cmd in commands:
        if cmd[1] == "train" and "model.source=hf" in cmd:
            pytest.importorskip("transformers")
        args = cmd[1:] + SHORTER[cmd[1]] + (["--results", str(tmp_path / "results")] if cmd[1] == "bench" else [])
        assert main(args) == 0, cmd
    out = capsys.readouterr()
    assert "| myopt.Lion |" in out.out
    assert read_yaml(tmp_path / "runs" / "lion" / "config.yaml")["optim"]["betas"] == [0.9, 0.99]
    rows = [json.loads(x) for x in (tmp_path / "results" / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"lion", "muon", "gn"} and not any(r.get("status") == "error" for r in rows)
    gn = [json.loads(x) for x in (tmp_path / "runs" / "llama-gn" / "metrics.jsonl").read_text().splitlines()]
    assert gn[-1]["eval_loss"] < gn[0]["eval_loss"]


def test_a_run_recorded_before_this_resumes(in_tmp):
    """An import-path run's config.yaml of an earlier gnlm records every optim field (its class got lr and kwargs
    only): it still builds, with the class defaults it trained with."""
    from gnlm.config import to_dict
    from gnlm.runconfig import build_run_config

    old = to_dict(load_run_config(None, ["optim.name=adamw"]))
    old["optim"]["name"] = "torch.optim.SGD"
    del old["data"]["extensions"]
    cfg = build_run_config(old)
    assert cfg.optim.betas is None and cfg.optim.momentum == 0 and cfg.optim.nesterov is False
