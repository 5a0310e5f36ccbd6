"""The training loop, the run directory and the config checks of `gnlm train` (built-in corpus, CPU presets)."""

import json
from dataclasses import replace

import pytest
import torch

from gnlm.accounting import count_flops
from gnlm.checkpoint import read_checkpoint
from gnlm.cli import main
from gnlm.config import ConfigError
from gnlm.curvature import surrogate_grad
from gnlm.model import GPT, PRESETS, loss_fn
from gnlm.runconfig import load_run_config
from gnlm.train import run_training

TINY = ["model=nano", "model.vocab_size=512", "data.vocab_size=512", "data.seq_len=64"]


def micro_run(tmp_path, *overrides):
    return load_run_config(None, [f"out_dir={tmp_path / 'run'}", "model=micro", "train.progress=false",
                                  "train.threads=1", *overrides])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("muon", 3e-2), ("soap", 1e-2)])
def test_each_baseline_lowers_the_validation_loss(tmp_path, name, lr):
    cfg = micro_run(tmp_path, *TINY, f"optim.name={name}", f"optim.lr={lr}", "train.threads=1",
                    "train.steps=12", "train.batch_size=8", "train.eval_every=12", "data.eval_sequences=16")
    summary = run_training(cfg)
    rows = read_metrics(tmp_path / "run")
    first, last = rows[0]["eval_loss"], summary["final_eval_loss"]
    assert last < first - 0.5, (name, first, last)
    assert summary["step"] == 12 and not summary["diverged"]


def test_metrics_rows_have_the_documented_fields(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=4", "train.batch_size=4", "train.eval_every=2",
                    "data.eval_sequences=4", "train.micro_batch_size=2")
    run_training(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "wall_time", "flops"):
        assert key in rows[1]
    assert rows[2]["tokens"] == 2 * 4 * 128
    assert "eval_loss" in rows[2] and "eval_loss" not in rows[1]


def test_target_loss_stops_the_run(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=50", "train.batch_size=4", "train.eval_every=1",
                    "data.eval_sequences=4", "train.target_loss=20.0")
    summary = run_training(cfg)
    assert summary["reached_target"] and summary["target_step"] == 0 and summary["step"] == 0


def test_resume_continues_exactly(tmp_path):
    common = ["model=nano", "train.batch_size=4", "train.eval_every=3", "data.eval_sequences=4",
              "optim.name=muon", "train.ema_decay=0.9"]
    full = run_training(micro_run(tmp_path / "a", *common, "train.steps=6"))
    run_training(micro_run(tmp_path / "b", *common, "train.steps=3"))
    resumed = run_training(micro_run(tmp_path / "b", *common, "train.steps=6"), resume=True)
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    a, b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_time")} for r in rows]
    assert strip(a) == strip(b)
    ckpt = read_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")
    assert ckpt["state"]["step"] == 6


def test_existing_run_dir_is_not_overwritten_unless_asked(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=1", "train.batch_size=2", "data.eval_sequences=2")
    run_training(cfg)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="already exists; pass --resume .* or --overwrite"):
        run_training(cfg)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    run_training(cfg, overwrite=True)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=1", "train.batch_size=2", "data.eval_sequences=2")
    run_training(cfg)
    other = micro_run(tmp_path, "model=nano", "train.steps=2", "train.batch_size=2", "data.eval_sequences=2",
                      "optim.lr=1e-2")
    with pytest.raises(ConfigError, match="optim.lr"):
        run_training(other, resume=True)


def test_divergence_ends_the_run_cleanly(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=30", "train.batch_size=4", "data.eval_sequences=4",
                    "optim.lr=1e3", "optim.clip=0", "train.eval_every=1", "optim.name=torch.optim.SGD")
    summary = run_training(cfg)
    assert summary["diverged"] and not summary["reached_target"]


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1e-3", "unknown config key 'optim.lrr': did you mean 'optim.lr'"),
    ("trian.steps=3", "unknown config key 'trian': did you mean 'train'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("optim.lr=-1", "lr"),
    ("data.seq_len=256", "data.seq_len (256) exceeds model.max_seq_len (128)"),
    ("data.vocab_size=8192", "data.vocab_size (8192) exceeds model.vocab_size (4096)"),
    ("model.preset=mikro", "did you mean 'micro'"),
    ("optim.name=adamx", "optim.name"),
    ("method=gauss", "method: 'gauss' is not one of"),
    ("gn.inner_batch_size=0", "gn.inner_batch_size must be >= 1, got 0"),
    ("gn.line_search_range=0", "gn.line_search_range must be >= 1, got 0"),
    ("gn.checkpoint_every_inner=-1", "gn.checkpoint_every_inner must be >= 0 (0 = off), got -1"),
    ("gn.damping=-0.1", "gn.damping must be >= 0, got -0.1"),
    ("gn.blocks=[[wte]]", "gn.blocks is set but gn.layerwise is false"),
    ("train.eval_every_tokens=0", "train.eval_every_tokens must be >= 1 (or null"),
    ("train.init_optimizer=true", "train.init_optimizer needs train.init_from"),
    ("train.micro_batch_size=3", "train.micro_batch_size (3) must divide train.batch_size"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1) (0 = off), got 1.0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0 (0 = only at the end)"),
    ("train.checkpoint_every_seconds=-5", "train.checkpoint_every_seconds must be >= 0 (0 = off)"),
    ("train.target_loss=0", "train.target_loss must be > 0, got 0"),
    ("train.divergence_margin=0", "train.divergence_margin must be > 0 nats"),
    ("train.collapse_tolerance=1", "train.collapse_tolerance must be in [0, 1) nats"),
    ("train.device=tpu", "train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("train.threads=0", "train.threads must be >= 1, got 0"),
    ("model=[1, 2]", "model.preset: expected a preset name (nano, micro, 45m, 150m), got [1, 2]"),
])
def test_bad_config_is_rejected_with_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        micro_run(tmp_path, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_tokenizer_larger_than_the_model_is_rejected_before_training(tmp_path):
    cfg = micro_run(tmp_path, "model.vocab_size=1000", "data.vocab_size=512", "data.tokenizer=bpe")
    cfg.data.vocab_size = 2048  # bypass the config-time check to reach the tokenizer-time one
    with pytest.raises(ConfigError, match="tokenizer has 2048 tokens but model.vocab_size is 1000"):
        run_training(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_config_file_and_bad_override_syntax(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "train.steps"]) == 2  # a bare word is read as a config path that does not exist
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_missing_init_checkpoint_is_rejected(tmp_path):
    cfg = micro_run(tmp_path, f"train.init_from={tmp_path / 'missing.pt'}")
    with pytest.raises(ConfigError, match="init_from"):
        run_training(cfg)


def test_corrupt_checkpoint_is_detected(tmp_path):
    cfg = micro_run(tmp_path, "model=nano", "train.steps=2", "train.batch_size=2", "data.eval_sequences=2",
                    "train.checkpoint_every=1")
    run_training(cfg)
    path = tmp_path / "run" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from gnlm.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)
    assert load_checkpoint(path)["state"]["step"] == 1  # falls back to the previous checkpoint
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_info_prints_exact_parameter_count(capsys):
    assert main(["info", "--model", "45m"]) == 0
    out = capsys.readouterr().out
    assert "45,363,712" in out and "lm_head.weight" in out and "(32000, 512)" in out


class Bigram(torch.nn.Module):
    """A one-layer language model: embedding, then a linear head (no attention, no MLP)."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.wte(x))


def test_flop_count_matches_a_hand_count_on_a_one_layer_model():
    V, d, B, T = 50, 8, 3, 7
    n = B * T
    model = Bigram(V, d)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    # forward: one (n×d)·(d×V) product = 2ndV; backward: the head's weight gradient and its input gradient (the
    # embedding is trained) = 4ndV
    flops, _ = count_flops(lambda: loss_fn(model(x), y).backward())
    assert flops == 6 * n * d * V
    # a GN inner step: primal 2ndV, tangent of x·Wᵀ (dx·Wᵀ + x·dWᵀ) 4ndV, its transpose (two products) 4ndV, and
    # in logit space the per-token dot product pᵀu of H u = p ⊙ u − p (pᵀu), computed as a batched product: 2nV
    params = {k: v.detach() for k, v in model.named_parameters()}
    flops, _ = count_flops(lambda: surrogate_grad(model, params, params, x, y))
    assert flops == 10 * n * d * V + 2 * n * V


def test_fused_and_math_attention_count_the_same_flops():
    """On CPU, fused SDPA runs a kernel FlopCounterMode does not know; accounting maps it, so a baseline step
    (sdpa) counts its attention like GN's math attention does."""
    model = GPT(replace(PRESETS["nano"], vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (2, 16))
    counts = {}
    for backend in ("sdpa", "math"):
        model.attention = backend
        counts[backend], _ = count_flops(lambda: loss_fn(model(x), x).backward())
    assert counts["sdpa"] == counts["math"]


def test_runs_record_counted_flops_per_step(tmp_path):
    cfg = load_run_config(None, [f"out_dir={tmp_path / 'run'}", "model=nano", "data.seq_len=32",
                                 "train.progress=false", "train.steps=3", "train.batch_size=4", "optim.name=adamw"])
    run_training(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = rows[1]["flops"]
    assert [r["flops"] for r in rows[1:]] == [per_step, 2 * per_step, 3 * per_step]
    model = GPT(cfg.model)
    x = torch.zeros(4, 32, dtype=torch.long)
    expected, _ = count_flops(lambda: loss_fn(model(x), x).backward())  # AdamW adds no matrix product
    assert per_step == expected
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3
