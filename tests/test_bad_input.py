"""Every sub-command on a table of bad inputs: one line on stderr, no traceback, a non-zero exit, refused before any
compute starts and with nothing already written changed. A new sub-command gets its rows in ``CASES`` (a test fails
until it has some). Then one focused test per fix the sweep called for."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from gnlm import cli
from gnlm.checkpoint import save_checkpoint
from gnlm.config import to_dict
from gnlm.runconfig import load_run_config, run_config_to_dict
from gnlm.study import load_study

HUGE = 10**15
JUNK = bytes(range(256)) * 8  # invalid UTF-8, NUL bytes and newlines: no text file at all
ROOT_SKIP = "running as root: chmod 000 does not stop root from reading (the directory-as-file case covers the path)"


class Inputs:
    """The bad (and the few good) files the cases point at, under one directory that the sweep checks is left
    exactly as it was."""

    def __init__(self, root: Path):
        self.root = root
        quick = to_dict(load_study("quick"))
        self.missing = root / "nosuch" / "missing.yaml"
        self.empty = self._write("empty.yaml", "")
        self.not_yaml = self._write("not_yaml.yaml", "name: [unclosed\n")
        self.not_mapping = self._write("list.yaml", "- a\n- b\n")
        self.binary = self._write("binary.yaml", JUNK)
        self.unreadable = self._write("unreadable.yaml", "train: {steps: 3}\n")
        self.unreadable.chmod(0)
        self.a_dir = root / "a_dir"
        self.a_dir.mkdir()
        self.a_file = self._write("a_file", "keep me\n")
        self.steps_many = self._write("steps_many.yaml", "train: {steps: many}\n")
        self.study_steps_many = self._write("study_steps_many.yaml", yaml.safe_dump({**quick, "max_steps": "many"}))
        self.unknown_key = self._write("unknown_key.yaml", "train: {stepz: 3}\n")

        run = load_run_config(None, ["model=nano", "data.seq_len=32", f"out_dir={root / 'run'}"])
        self.run_config = yaml.safe_dump(run_config_to_dict(run), sort_keys=False)
        self.run = self._run_dir("run", self.run_config)
        self.run_no_ckpt = self._run_dir("run_no_ckpt", self.run_config, checkpoint=False)
        self.run_empty_ckpt = self._run_dir("run_empty_ckpt", self.run_config, checkpoint=False)
        self._write("run_empty_ckpt/checkpoint.pt", b"")
        self.run_garbage = self._run_dir("run_garbage", "name: [unclosed\n")
        self.run_binary = self._run_dir("run_binary", JUNK)
        self.run_list = self._run_dir("run_list", "- a\n")
        self.run_wrong_type = self._run_dir("run_wrong_type", self.run_config.replace("steps: 200", "steps: many"))
        self.run_unknown = self._run_dir("run_unknown", self.run_config + "nosuch: 1\n")

        study = yaml.safe_dump(quick, sort_keys=False)
        self.results_garbage = self._results("results_garbage", "name: [unclosed\n")
        self.results_binary_study = self._results("results_binary_study", JUNK)
        self.results_list = self._results("results_list", "- a\n")
        self.results_empty_study = self._results("results_empty_study", "")
        self.results_wrong_type = self._results("results_wrong_type", yaml.safe_dump({**quick, "max_steps": "many"}))
        self.results_unknown = self._results("results_unknown", study + "nosuch: 1\n")
        self.results_negative = self._results("results_negative", yaml.safe_dump({**quick, "max_steps": -5}))
        self.results_binary_runs = self._results("results_binary_runs", study, runs=JUNK)
        self.results_runs_dir = self._results("results_runs_dir", study)
        (self.results_runs_dir / "runs.jsonl").mkdir()
        self.results_report_dir = self._results("results_report_dir", study)
        (self.results_report_dir / "report.md").mkdir()
        self.results_ws_junk = self._results("results_ws_junk", study)
        self._write("results_ws_junk/warm_start/summary.json", JUNK)
        self.results_no_study = root / "results_no_study"
        self.results_no_study.mkdir()
        self.results_quick = self._results("results_quick", study)
        other = {**quick, "targets": [3.5, 3.4, 3.3], "primary_target": 3.3}
        self.results_other_targets = self._results("results_other_targets", yaml.safe_dump(other, sort_keys=False))
        self.study_garbage = self._results("study_garbage", "name: [unclosed\n", warm_start=True)
        self.study_binary_runs = self._results("study_binary_runs", study, runs=JUNK, warm_start=True)

    def _write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def _run_dir(self, name: str, config: str | bytes, checkpoint: bool = True) -> Path:
        self._write(f"{name}/config.yaml", config)
        if checkpoint:
            save_checkpoint(self.root / name / "checkpoint.pt", {"model": {}, "state": {"step": 0}})
        return self.root / name

    def _results(self, name: str, study: str | bytes, runs: bytes | None = None, warm_start: bool = False) -> Path:
        self._write(f"{name}/study.yaml", study)
        if runs is not None:
            self._write(f"{name}/runs.jsonl", runs)
        if warm_start:
            self._run_dir(f"{name}/warm_start", self.run_config)
        return self.root / name


Case = tuple[str, Callable[[Inputs], list[str]]]

# sub-command as typed ("data prepare") -> (case id, argv builder over Inputs); a new sub-command adds its list here.
CASES: dict[str, list[Case]] = {
    "train": [
        ("no config", lambda p: ["train"]),
        ("missing path", lambda p: ["train", str(p.missing)]),
        ("empty file", lambda p: ["train", str(p.empty)]),
        ("unreadable file", lambda p: ["train", str(p.unreadable)]),
        ("directory as config", lambda p: ["train", str(p.a_dir)]),
        ("not YAML", lambda p: ["train", str(p.not_yaml)]),
        ("not a mapping", lambda p: ["train", str(p.not_mapping)]),
        ("binary junk", lambda p: ["train", str(p.binary)]),
        ("wrong type in file", lambda p: ["train", str(p.steps_many)]),
        ("wrong type override", lambda p: ["train", "train.steps=many"]),
        ("unknown key in file", lambda p: ["train", str(p.unknown_key)]),
        ("unknown key override", lambda p: ["train", "train.stepz=3"]),
        ("unknown flag", lambda p: ["train", "model=nano", "--nosuch"]),
        ("override without =", lambda p: ["train", "model=nano", "steps"]),
        ("negative steps", lambda p: ["train", "train.steps=-1"]),
        ("negative lr", lambda p: ["train", "optim.lr=-1"]),
        ("nan lr", lambda p: ["train", "optim.lr=.nan"]),
        ("unknown preset", lambda p: ["train", "model=nosuch"]),
        ("out_dir is a file", lambda p: ["train", "model=nano", f"out_dir={p.a_file}"]),
        ("out_dir under a file", lambda p: ["train", "model=nano", f"out_dir={p.a_file}/run"]),
        ("resume and overwrite", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", "--resume",
                                            "--overwrite"]),
        ("huge batch_size", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", f"train.batch_size={HUGE}"]),
        ("huge micro_batch_size", lambda p: ["train", "model=nano", f"out_dir={p.root}/new",
                                             f"train.batch_size={HUGE}", f"train.micro_batch_size={HUGE // 2}"]),
        ("huge d_model", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", "model.d_model=1000000000"]),
        ("huge max_seq_len", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", f"model.max_seq_len={HUGE}"]),
        ("huge GN inner batch", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", "method=gn",
                                           f"gn.inner_batch_size={HUGE}"]),
        ("unknown device", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", "train.device=cudax"]),
        ("init_from missing", lambda p: ["train", "model=nano", f"out_dir={p.root}/new",
                                         f"train.init_from={p.missing}"]),
        ("optimizer field the class does not take", lambda p: ["train", "model=nano", f"out_dir={p.root}/new",
                                                               "optim.name=torch.optim.SGD", "optim.betas=[0.9,0.9]"]),
        ("closure optimizer as GN's inner one", lambda p: ["train", "model=nano", f"out_dir={p.root}/new",
                                                           "method=gn", "gn.inner_optim.name=torch.optim.LBFGS"]),
        ("HF config name not available offline", lambda p: ["train", f"out_dir={p.root}/new", "model.source=hf",
                                                            "model.hf_config=nosuch-org/nosuch-model"]),
        ("HF config without model_type", lambda p: ["train", f"out_dir={p.root}/new", "model.source=hf",
                                                    "model.hf_config={hidden_size: 8}"]),
        ("model.module not importable", lambda p: ["train", f"out_dir={p.root}/new", "model.module=nosuch:build"]),
    ],
    "data prepare": [
        ("missing path", lambda p: ["data", "prepare", str(p.missing)]),
        ("empty file", lambda p: ["data", "prepare", str(p.empty)]),
        ("unreadable file", lambda p: ["data", "prepare", str(p.unreadable)]),
        ("directory as config", lambda p: ["data", "prepare", str(p.a_dir)]),
        ("not YAML", lambda p: ["data", "prepare", str(p.not_yaml)]),
        ("not a mapping", lambda p: ["data", "prepare", str(p.not_mapping)]),
        ("binary junk", lambda p: ["data", "prepare", str(p.binary)]),
        ("wrong type", lambda p: ["data", "prepare", "data.seq_len=many"]),
        ("unknown key", lambda p: ["data", "prepare", "data.nosuch=1"]),
        ("negative seq_len", lambda p: ["data", "prepare", "data.seq_len=-1"]),
        ("huge vocab", lambda p: ["data", "prepare", f"data.vocab_size={HUGE}"]),
        ("cache_dir is a file", lambda p: ["data", "prepare", f"data.cache_dir={p.a_file}"]),
        ("data_dir is a file", lambda p: ["data", "prepare", f"data.data_dir={p.a_file}"]),
        ("data_dir is not prepared data", lambda p: ["data", "prepare", f"data.data_dir={p.a_dir}"]),
        ("missing corpus file", lambda p: ["data", "prepare", "data.source=files", f"data.paths=[{p.missing}]"]),
        ("missing tokenizer", lambda p: ["data", "prepare", f"data.tokenizer={p.missing}"]),
        ("no file with a wanted extension", lambda p: ["data", "prepare", "data.source=files",
                                                        f"data.paths=[{p.a_dir}]", "data.extensions=[.py]"]),
        ("empty extensions", lambda p: ["data", "prepare", "data.source=files", f"data.paths=[{p.a_file}]",
                                        "data.extensions=[]"]),
    ],
    "bench": [
        ("missing path", lambda p: ["bench", str(p.missing)]),
        ("empty file", lambda p: ["bench", str(p.empty)]),
        ("unreadable file", lambda p: ["bench", str(p.unreadable)]),
        ("directory as study", lambda p: ["bench", str(p.a_dir)]),
        ("not YAML", lambda p: ["bench", str(p.not_yaml)]),
        ("not a mapping", lambda p: ["bench", str(p.not_mapping)]),
        ("binary junk", lambda p: ["bench", str(p.binary)]),
        ("a train config", lambda p: ["bench", str(p.steps_many)]),
        ("wrong type in file", lambda p: ["bench", str(p.study_steps_many)]),
        ("wrong type override", lambda p: ["bench", "quick", "max_steps=many"]),
        ("wrong type flag", lambda p: ["bench", "quick", "--max-runs", "many"]),
        ("unknown key", lambda p: ["bench", "quick", "nosuch=1"]),
        ("unknown preset", lambda p: ["bench", "quik"]),
        ("negative max_steps", lambda p: ["bench", "quick", "max_steps=-1"]),
        ("negative max-runs", lambda p: ["bench", "quick", "--max-runs", "-1", "--results", f"{p.root}/new"]),
        ("zero jobs", lambda p: ["bench", "quick", "--jobs", "0"]),
        ("results is a file", lambda p: ["bench", "quick", "--results", str(p.a_file)]),
        ("results under a file", lambda p: ["bench", "quick", "--results", f"{p.a_file}/sub"]),
        ("results with garbage study.yaml", lambda p: ["bench", "quick", "--results", str(p.results_garbage)]),
        ("results with binary runs.jsonl", lambda p: ["bench", "quick", "--results", str(p.results_binary_runs)]),
        ("results with runs.jsonl a directory", lambda p: ["bench", "quick", "--results", str(p.results_runs_dir)]),
        ("huge batch", lambda p: ["bench", "quick", "--results", f"{p.root}/new", f"batch_tokens=[4096, {HUGE}]"]),
        ("huge model", lambda p: ["bench", "quick", "--results", f"{p.root}/new", "base.model.d_model=1000000000"]),
        ("zero same_within", lambda p: ["bench", "shakespeare-nano-ablations", "--results", f"{p.root}/new",
                                        "same_within=0"]),
    ],
    "report": [
        ("no directory", lambda p: ["report"]),
        ("missing path", lambda p: ["report", str(p.missing)]),
        ("a file", lambda p: ["report", str(p.a_file)]),
        ("no study.yaml", lambda p: ["report", str(p.results_no_study)]),
        ("garbage study.yaml", lambda p: ["report", str(p.results_garbage)]),
        ("binary study.yaml", lambda p: ["report", str(p.results_binary_study)]),
        ("study.yaml not a mapping", lambda p: ["report", str(p.results_list)]),
        ("empty study.yaml", lambda p: ["report", str(p.results_empty_study)]),
        ("wrong type in study.yaml", lambda p: ["report", str(p.results_wrong_type)]),
        ("unknown key in study.yaml", lambda p: ["report", str(p.results_unknown)]),
        ("negative max_steps in study.yaml", lambda p: ["report", str(p.results_negative)]),
        ("binary runs.jsonl", lambda p: ["report", str(p.results_binary_runs)]),
        ("runs.jsonl a directory", lambda p: ["report", str(p.results_runs_dir)]),
        ("report.md a directory", lambda p: ["report", str(p.results_report_dir)]),
        ("binary warm-start summary.json", lambda p: ["report", str(p.results_ws_junk)]),
    ],
    "probe": [
        ("no source", lambda p: ["probe"]),
        ("missing path", lambda p: ["probe", str(p.missing)]),
        ("empty file", lambda p: ["probe", str(p.empty)]),
        ("directory without a run", lambda p: ["probe", str(p.a_dir)]),
        ("run without checkpoint", lambda p: ["probe", str(p.run_no_ckpt)]),
        ("closure optimizer", lambda p: ["probe", str(p.run), "--optimizers", "torch.optim.LBFGS"]),
        ("empty checkpoint", lambda p: ["probe", str(p.run_empty_ckpt)]),
        ("garbage config.yaml", lambda p: ["probe", str(p.run_garbage)]),
        ("binary config.yaml", lambda p: ["probe", str(p.run_binary)]),
        ("config.yaml not a mapping", lambda p: ["probe", str(p.run_list)]),
        ("wrong type in config.yaml", lambda p: ["probe", str(p.run_wrong_type)]),
        ("unknown key in config.yaml", lambda p: ["probe", str(p.run_unknown)]),
        ("wrong type flag", lambda p: ["probe", str(p.run), "--batch-tokens", "many"]),
        ("unknown flag", lambda p: ["probe", str(p.run), "--nosuch"]),
        ("huge batch-tokens", lambda p: ["probe", str(p.run), "--batch-tokens", str(HUGE * 32)]),
        ("negative batch-tokens", lambda p: ["probe", str(p.run), "--batch-tokens", "-32"]),
        ("negative probe-batches", lambda p: ["probe", str(p.run), "--probe-batches", "-1"]),
        ("negative damping", lambda p: ["probe", str(p.run), "--damping", "-1"]),
        ("negative damping grid", lambda p: ["probe", str(p.run), "--damping-grid", "-1e-2,1"]),
        ("empty damping grid", lambda p: ["probe", str(p.run), "--damping-grid", ""]),
        ("damping and damping grid", lambda p: ["probe", str(p.run), "--damping", "1e-3", "--damping-grid", "1e-2,1"]),
        ("batch-tokens not a multiple of seq_len", lambda p: ["probe", str(p.run), "--batch-tokens", "33"]),
        ("set without a label", lambda p: ["probe", str(p.run), "--set", "optim.lr=1"]),
        ("set of an unknown label", lambda p: ["probe", str(p.run), "--optimizers", "adamw", "--set", "muon:optim.lr=1"]),
        ("zero threads", lambda p: ["probe", str(p.run), "--threads", "0"]),
        ("bad lrs", lambda p: ["probe", str(p.run), "--lrs", "abc"]),
        ("unknown optimizer", lambda p: ["probe", str(p.run), "--optimizers", "nosuch"]),
        ("out is a file", lambda p: ["probe", str(p.run), "--out", str(p.a_file)]),
        ("out under a file", lambda p: ["probe", str(p.run), "--out", f"{p.a_file}/sub"]),
        ("unknown device", lambda p: ["probe", str(p.run), "--device", "cudax"]),
        ("along a file", lambda p: ["probe", "--along", str(p.a_file)]),
        ("study with garbage study.yaml", lambda p: ["probe", str(p.study_garbage)]),
        ("study with binary runs.jsonl", lambda p: ["probe", str(p.study_binary_runs)]),
    ],
    "compare": [
        ("no directory", lambda p: ["compare"]),
        ("one directory", lambda p: ["compare", str(p.results_quick)]),
        ("missing path", lambda p: ["compare", str(p.results_quick), str(p.missing)]),
        ("a file", lambda p: ["compare", str(p.results_quick), str(p.a_file)]),
        ("no study.yaml", lambda p: ["compare", str(p.results_quick), str(p.results_no_study)]),
        ("garbage study.yaml", lambda p: ["compare", str(p.results_quick), str(p.results_garbage)]),
        ("binary runs.jsonl", lambda p: ["compare", str(p.results_quick), str(p.results_binary_runs)]),
        ("no shared target", lambda p: ["compare", str(p.results_quick), str(p.results_other_targets)]),
        ("out is a file", lambda p: ["compare", str(p.results_quick), str(p.results_quick), "--out", str(p.a_file)]),
        ("unknown flag", lambda p: ["compare", str(p.results_quick), str(p.results_quick), "--nosuch"]),
    ],
    "info": [
        ("unknown model", lambda p: ["info", "--model", "nosuch"]),
        ("empty model name", lambda p: ["info", "--model", ""]),
        ("a path as model", lambda p: ["info", "--model", str(p.a_file)]),
        ("unknown flag", lambda p: ["info", "--nosuch"]),
    ],
}
if not torch.cuda.is_available():
    CASES["train"].append(("cuda without CUDA", lambda p: ["train", "model=nano", f"out_dir={p.root}/new",
                                                           "train.device=cuda"]))
    CASES["probe"].append(("cuda without CUDA", lambda p: ["probe", str(p.run), "--device", "cuda"]))

NEEDS_NON_ROOT = {"unreadable file"}


class ComputeStarted(AssertionError):
    """A bad input got past every check: the sweep stops it where compute would start."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("bad_input"))


@pytest.fixture
def no_compute(monkeypatch):
    """Every place where a sub-command starts real work (data, training, a study, a probe) raises instead."""
    import gnlm.bench
    import gnlm.data
    import gnlm.probe
    import gnlm.run

    def started(*args, **kwargs):
        raise ComputeStarted("a bad input reached compute")

    for module, name in ((gnlm.run, "_open_run"), (gnlm.probe, "open_data"), (gnlm.bench, "_run"),
                         (gnlm.data, "train_bpe"), (gnlm.data, "_write_split")):
        monkeypatch.setattr(module, name, started)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None: a directory, or a file we may not read)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and os.access(p, os.R_OK) else None)
            for p in sorted(root.rglob("*"))}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _sweep() -> list:
    return [pytest.param(command, build, id=f"{command}: {name}",
                         marks=[pytest.mark.skipif(os.geteuid() == 0, reason=ROOT_SKIP)] if name in NEEDS_NON_ROOT
                         else [])
            for command, cases in CASES.items() for name, build in cases]


@pytest.mark.parametrize("command, build", _sweep())
def test_bad_input_is_one_line_on_stderr_and_a_non_zero_exit(command, build, inputs, no_compute, monkeypatch,
                                                            capsys):
    monkeypatch.chdir(inputs.root)  # a default out_dir or results directory would land in the checked tree
    argv = build(inputs)
    assert argv[:len(command.split())] == command.split()  # filed under the sub-command it runs
    before = _snapshot(inputs.root)
    code, out, err = run_main(argv, capsys)
    assert code not in (0, None), (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    after = _snapshot(inputs.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, ...) != after.get(k, ...))
    assert not changed, f"written or deleted: {changed}"


def _sub_commands(parser) -> set[str]:
    """Every leaf sub-command of the parser, nested ones as 'data prepare'."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _sub_commands(sub)
                out |= {f"{name} {n}" for n in nested} if nested else {name}
    return out


def test_every_sub_command_is_in_the_bad_input_sweep():
    commands = _sub_commands(cli.build_parser())
    missing = commands - {c for c, cases in CASES.items() if cases}
    assert not missing, f"add bad inputs for {sorted(missing)} to CASES in tests/test_bad_input.py"
    assert set(CASES) <= commands, f"CASES names no sub-command: {sorted(set(CASES) - commands)}"


# ------------------------------------------------------------------------- the fixes the sweep called for, one each

# (fix, argv builder, what the one line must say): each line names the problem and the fix.
MESSAGES: list[tuple[str, Callable[[Inputs], list[str]], tuple[str, ...]]] = [
    ("empty config", lambda p: ["train", str(p.empty)], ("is empty", "write its options")),
    ("binary config", lambda p: ["data", "prepare", str(p.binary)], ("is not a text file", "YAML file")),
    ("directory as config", lambda p: ["train", str(p.a_dir)], ("is a directory", "YAML file")),
    ("argparse error", lambda p: ["probe", str(p.run), "--batch-tokens", "many"],
     ("invalid int value: 'many'", "see gnlm probe --help")),
    ("negative --max-runs", lambda p: ["bench", "quick", "--max-runs", "-1"], ("--max-runs must be >= 0",)),
    ("junk runs.jsonl", lambda p: ["report", str(p.results_binary_runs)],
     ("is not a study's runs file", "restore the file")),
    ("runs.jsonl a directory", lambda p: ["report", str(p.results_runs_dir)], ("cannot read", "Is a directory")),
    ("report.md a directory", lambda p: ["report", str(p.results_report_dir)],
     ("cannot write the report", "report.md", "move it away")),
    ("junk warm-start summary", lambda p: ["report", str(p.results_ws_junk)],
     ("summary.json is not a run summary", "delete it")),
    ("unknown device", lambda p: ["train", "model=nano", "train.device=cudax"],
     ("train.device is 'cudax', not a device", "use auto, cpu")),
    ("huge train batch", lambda p: ["train", "model=nano", f"out_dir={p.root}/new", f"train.batch_size={HUGE}"],
     ("needs at least", "GiB are free", "lower train.batch_size")),
    ("huge model", lambda p: ["train", f"out_dir={p.root}/new", "model.d_model=1000000000"],
     ("needs at least", "choose a smaller model")),
    ("huge study batch", lambda p: ["bench", "quick", "--results", f"{p.root}/new", f"batch_tokens=[4096, {HUGE}]"],
     ("b1000000000000000", "needs at least", "GiB are free")),
    ("huge probe batch", lambda p: ["probe", str(p.run), "--batch-tokens", str(HUGE * 32)],
     ("a probe batch of", "needs at least", "lower --batch-tokens")),
    ("probe binary config.yaml", lambda p: ["probe", str(p.run_binary)], ("is not valid YAML", "restore")),
    ("probe config.yaml a list", lambda p: ["probe", str(p.run_list)], ("does not hold a run config",)),
    ("probe garbage study.yaml", lambda p: ["probe", str(p.study_garbage)], ("study.yaml is not valid YAML",)),
    ("probe empty checkpoint", lambda p: ["probe", str(p.run_empty_ckpt)], ("is empty, truncated or not a gnlm",)),
    ("probe --out a file", lambda p: ["probe", str(p.run), "--out", str(p.a_file)], ("--out", "is a file")),
    ("prepared data_dir a file", lambda p: ["data", "prepare", f"data.data_dir={p.a_file}"],
     ("is a file", "data.data_dir")),
]


@pytest.mark.parametrize("build, says", [pytest.param(b, s, id=i) for i, b, s in MESSAGES])
def test_the_line_names_the_problem_and_the_fix(build, says, inputs, no_compute, monkeypatch, capsys):
    monkeypatch.chdir(inputs.root)
    code, _, err = run_main(build(inputs), capsys)
    assert code == 2 and err.startswith("gnlm: error: ") and err.count("\n") == 1, err
    assert all(s in err for s in says), err


def test_probe_without_cuda_names_its_device_flag(inputs, no_compute, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(["probe", str(inputs.run), "--device", "cuda"], capsys)
    assert code == 2 and "--device is 'cuda' but CUDA is not available; use --device cpu" in err
    assert "train.device" not in err


def test_refused_train_and_probe_print_no_notice_first(inputs, no_compute, monkeypatch, capsys):
    """The built-in-defaults notice of gnlm train and the lr notices of gnlm probe come only once a run starts."""
    monkeypatch.chdir(inputs.root)
    _, _, err = run_main(["train", "model=nano", f"out_dir={inputs.a_file}"], capsys)
    assert "no config file given" not in err and err.count("\n") == 1
    _, _, err = run_main(["probe", str(inputs.run), "--out", str(inputs.a_file)], capsys)
    assert "pass --lrs to choose" not in err and err.count("\n") == 1


def test_an_unreadable_config_is_one_line(inputs, monkeypatch):
    """What chmod 000 does for a user who is not root, whoever runs the tests."""
    from gnlm.config import ConfigError, load_yaml

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=r"cannot read config file .* \(Permission denied\); make it readable"):
        load_yaml(inputs.steps_many)


def test_a_runs_file_cut_off_in_its_first_row_is_still_read_as_no_rows(tmp_path, capsys):
    """Only a file in which no line is a JSON object is refused, not one whose first row a killed writer cut off."""
    from gnlm.results import read_rows

    (tmp_path / "runs.jsonl").write_text('{"run_id": "adamw/b4096')
    assert read_rows(tmp_path, warn=True) == []
    assert "cut off" in capsys.readouterr().err


def test_the_memory_check_refuses_only_beyond_its_floor(monkeypatch):
    """The floor: parameters, gradients and buffers, plus two logit tensors of the batch; exactly that fits."""
    import gnlm.resources as resources
    from gnlm.config import ConfigError
    from gnlm.model import GPT

    cfg = load_run_config(None, ["model=nano", "data.seq_len=32"])
    model = GPT(cfg.model)
    weights = 2 * sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    floor = weights + 2 * 8 * 32 * cfg.model.vocab_size * 4
    monkeypatch.setattr(resources, "available_memory", lambda device: floor)
    resources.check_memory(cfg, 8, torch.device("cpu"), "the run", "train.batch_size")
    monkeypatch.setattr(resources, "available_memory", lambda device: floor - 1)
    with pytest.raises(ConfigError, match="needs at least .* lower train.batch_size"):
        resources.check_memory(cfg, 8, torch.device("cpu"), "the run", "train.batch_size")


def test_the_default_runs_fit_in_this_machines_memory():
    from gnlm.resources import available_memory, check_run_memory

    assert available_memory(torch.device("cpu")) > 0
    for preset in ("nano", "micro"):
        check_run_memory(load_run_config(None, [f"model={preset}"]), torch.device("cpu"))


def test_a_truncated_checkpoint_does_not_look_complete(tmp_path):
    from gnlm.checkpoint import looks_complete

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {}})
    assert looks_complete(path)
    path.write_bytes(path.read_bytes()[:-1])
    assert not looks_complete(path) and not looks_complete(tmp_path / "missing.pt")


def test_what_really_reaches_stderr_is_one_line(inputs):
    """In a real process (imports, library warnings, the huge allocation it refuses): stderr is the one line."""
    done = subprocess.run([sys.executable, "-m", "gnlm", "probe", str(inputs.run), "--batch-tokens", str(HUGE * 32)],
                          capture_output=True, text=True, timeout=120, cwd=inputs.root)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "needs at least" in done.stderr and "lower --batch-tokens" in done.stderr
    assert not (inputs.run / "probe").exists()
