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
from gnlm.optim import OptimConfig, build_optimizer
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
                          "optim.eps=1e-6"], cwd=in_tmp, env=env, capture_output=True, text=True)
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
