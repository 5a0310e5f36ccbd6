"""A study's shared warm start and what a run takes from it: its optimizer state (``train.init_optimizer``), a
warm start that depends on the study's model and data only, ``gnlm bench --warm-start-only``; and the evaluation
every run reports (its standard error, ``train.eval_every_tokens``)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from gnlm import bench
from gnlm.checkpoint import read_checkpoint
from gnlm.cli import main
from gnlm.config import ConfigError, to_dict
from gnlm.model import GPT, loss_fn
from gnlm.plan import plan_runs
from gnlm.run import evaluate, evaluation_due, open_data, train_stream
from gnlm.runconfig import load_run_config
from gnlm.study import STUDY_SCHEMA, load_study, study_from_dict, upgrade_saved_study
from gnlm.train import run_training

PUBLISHED = Path(__file__).resolve().parents[1] / "studies" / "shakespeare-nano"
NANO = ["model=nano", "model.vocab_size=512", "data.vocab_size=512", "data.seq_len=64", "train.progress=false",
        "train.threads=1", "data.eval_sequences=4", "train.eval_batch_size=4"]


def _run(out_dir, *overrides):
    return load_run_config(None, [f"out_dir={out_dir}", *NANO, *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- the optimizer state


@pytest.fixture(scope="module")
def adamw_warm_start(tmp_path_factory):
    """Three AdamW steps in float64: a run directory whose checkpoint holds moments and a step count."""
    out = tmp_path_factory.mktemp("warm") / "run"
    run_training(_run(out, "train.dtype=float64", "train.steps=3", "train.batch_size=4", "train.eval_every=3",
                      "optim.lr=0.01"))
    return out / "checkpoint.pt"


def _first_update(tmp_path, warm, init_optimizer):
    """The parameters after one step of an AdamW run from ``warm`` (weight decay 0.1, no clipping: its own
    hyperparameters, not the warm start's), and the run's config."""
    cfg = _run(tmp_path / f"continued-{init_optimizer}", "train.dtype=float64", "train.steps=1", "train.batch_size=4",
               "optim.lr=0.005", "optim.weight_decay=0.1", "optim.clip=0", f"train.init_from={warm}",
               f"train.init_optimizer={str(init_optimizer).lower()}")
    run_training(cfg)
    ckpt = read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    return cfg, ckpt


def test_init_optimizer_takes_the_adamw_step_of_the_loaded_moments(tmp_path, adamw_warm_start):
    """The continued run's first update is AdamW's update from the warm start's moments and step count t0, on the
    run's first batch, with the run's own lr and weight decay: m = β1·m0 + (1−β1)g, v = β2·v0 + (1−β2)g²,
    θ ← θ(1 − lr·wd) − lr/(1 − β1^t) · m / (√(v/(1 − β2^t)) + ε), t = t0 + 1. A fresh optimizer (the default)
    takes another step."""
    warm = read_checkpoint(adamw_warm_start)
    cfg, ckpt = _first_update(tmp_path, adamw_warm_start, init_optimizer=True)
    model = GPT(cfg.model).to(torch.float64)
    model.load_state_dict(warm["model"])
    x, y = train_stream(cfg, open_data(cfg)).next(cfg.train.batch_size)
    loss_fn(model(x), y).backward()
    (b1, b2), eps, lr, wd = cfg.optim.betas, cfg.optim.eps, cfg.optim.lr, cfg.optim.weight_decay
    saved = warm["optimizer"]["state"]
    assert ckpt["optimizer"]["state"][0]["step"] == saved[0]["step"] + 1 == 4
    expected = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        t = float(saved[i]["step"]) + 1
        m = b1 * saved[i]["exp_avg"] + (1 - b1) * p.grad
        v = b2 * saved[i]["exp_avg_sq"] + (1 - b2) * p.grad ** 2
        expected[name] = p.detach() * (1 - lr * wd) - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
    for name, value in expected.items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-9, atol=1e-12)
    _, fresh = _first_update(tmp_path, adamw_warm_start, init_optimizer=False)
    assert fresh["optimizer"]["state"][0]["step"] == 1
    assert max((fresh["model"][n] - v).abs().max().item() for n, v in expected.items()) > 1e-4


def test_amsgrad_continues_a_state_saved_without_it(tmp_path, adamw_warm_start):
    """AdamW with amsgrad from a warm start without it (a study's shared warm start): its running maximum of v starts
    at the saved v0, so the first update divides by √max(v0, v) (it used to fail with KeyError 'max_exp_avg_sq')."""
    warm = read_checkpoint(adamw_warm_start)
    cfg = _run(tmp_path / "ams", "train.dtype=float64", "train.steps=1", "train.batch_size=4", "optim.lr=0.005",
               "optim.clip=0", "optim.kwargs.amsgrad=true", f"train.init_from={adamw_warm_start}",
               "train.init_optimizer=true")
    run_training(cfg)
    ckpt = read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    model = GPT(cfg.model).to(torch.float64)
    model.load_state_dict(warm["model"])
    x, y = train_stream(cfg, open_data(cfg)).next(cfg.train.batch_size)
    loss_fn(model(x), y).backward()
    (b1, b2), eps, lr = cfg.optim.betas, cfg.optim.eps, cfg.optim.lr
    saved = warm["optimizer"]["state"]
    for i, (name, p) in enumerate(model.named_parameters()):
        assert "max_exp_avg_sq" not in saved[i]
        t = float(saved[i]["step"]) + 1
        m = b1 * saved[i]["exp_avg"] + (1 - b1) * p.grad
        vmax = torch.maximum(saved[i]["exp_avg_sq"], b2 * saved[i]["exp_avg_sq"] + (1 - b2) * p.grad ** 2)
        want = p.detach() - lr / (1 - b1 ** t) * m / ((vmax / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(ckpt["model"][name], want, rtol=1e-9, atol=1e-12)


def test_init_optimizer_refuses_another_optimizers_state_before_any_compute(tmp_path, adamw_warm_start):
    cfg = _run(tmp_path / "muon", "optim.name=muon", f"train.init_from={adamw_warm_start}", "train.init_optimizer=true",
               "train.dtype=float64")
    with pytest.raises(ConfigError, match="the optimizer state in .* is adamw's but this run's optimizer is muon") as e:
        run_training(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "muon").exists()
    with pytest.raises(ConfigError, match="train.init_optimizer needs train.init_from"):
        _run(tmp_path / "x", "train.init_optimizer=true")
    with pytest.raises(ConfigError, match="method: gn has none to continue"):
        _run(tmp_path / "x", "method=gn", f"train.init_from={adamw_warm_start}", "train.init_optimizer=true")


def _study(**changes):
    raw = {
        "name": "ws", "progress": False, "target_loss": 6.0, "max_steps": 2, "batch_tokens": [256],
        "selection_seed": 0, "seeds": [1],
        "base": {"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
                 "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1},
                 "schedule": {"warmup_steps": 2}, "gn": {"inner_batch_size": 2}},
        "warm_start": {"tokens": 512, "batch_tokens": 256, "lr": 0.01},
        "methods": [{"name": "adamw", "lrs": [0.01, 0.03]}],
    }
    raw.update(changes)
    return study_from_dict(raw)


def test_load_optimizer_state_continues_the_warm_start_in_its_adamw_baselines_only(tmp_path):
    methods = [{"name": "adamw", "lrs": [0.01, 0.03]}, {"name": "muon", "lrs": [0.01, 0.03]},
               {"name": "gn", "lrs": [0.01, 0.03]},
               {"name": "adamw_no_warmup", "type": "adamw", "control_of": "adamw",
                "overrides": {"schedule.warmup_steps": 0}}]
    study = _study(methods=methods, warm_start={"tokens": 512, "batch_tokens": 256, "load_optimizer_state": True})
    continued = {s.method: s.config["train"]["init_optimizer"] for s in plan_runs(study, tmp_path, [])[0]}
    assert continued == {"adamw": True, "muon": False, "gn": False}
    assert not any(s.config["train"]["init_optimizer"] for s in plan_runs(_study(methods=methods), tmp_path, [])[0])


# ------------------------------------------------------------------------------------------ the warm start


def test_the_warm_start_does_not_depend_on_the_runs_settings(tmp_path):
    """Two studies that differ in their runs' schedule, optimizer, GN and loop settings share one warm start; the
    model, the data (its eval set included) and the evaluation batch do reach it."""
    a = _study()
    b = _study(base={**a.base, "schedule": {"name": "cosine", "warmup_steps": 7},
                     "optim": {"weight_decay": 0.1, "betas": [0.9, 0.99]}, "gn": {"inner_batch_size": 4},
                     "train": {**a.base["train"], "eval_every": 3, "ema_decay": 0.9, "eval_every_tokens": 512}})
    assert to_dict(a.warm_start_config(tmp_path)) == to_dict(b.warm_start_config(tmp_path))
    ws = a.warm_start_config(tmp_path)
    assert ws.schedule.warmup_steps == 0 and ws.schedule.name == "constant" and ws.optim.lr == 0.01
    c = _study(base={**a.base, "data": {"eval_sequences": 8, "eval_sampling": "spread"},
                     "train": {**a.base["train"], "eval_batch_size": 8}})
    wc = c.warm_start_config(tmp_path)
    assert (wc.data.eval_sequences, wc.data.eval_sampling, wc.train.eval_batch_size) == (8, "spread", 8)
    assert _study(warm_start={"tokens": 512, "batch_tokens": 256, "overrides": {"schedule.warmup_steps": 5}}
                  ).warm_start_config(tmp_path).schedule.warmup_steps == 5


def test_a_schema_1_study_keeps_the_warm_start_it_trained():
    """A study.yaml without ``schema`` (written before warm starts stopped reading ``base``) gets the base keys its
    warm start used to take as ``warm_start.overrides``; gnlm now writes the schema."""
    saved = to_dict(_study())
    del saved["schema"]
    saved["base"]["optim"] = {"weight_decay": 0.1, "lr": 5.0}  # optim.lr was always the warm start's own
    upgraded = upgrade_saved_study(saved)
    assert upgraded.schema == STUDY_SCHEMA == to_dict(_study())["schema"]
    assert upgraded.warm_start.overrides == {"schedule.warmup_steps": 2, "optim.weight_decay": 0.1}
    cfg = upgraded.warm_start_config("r")
    assert cfg.schedule.warmup_steps == 2 and cfg.optim.weight_decay == 0.1 and cfg.gn.inner_batch_size == 32
    with pytest.raises(ConfigError, match="schema: 1 is not the study schema"):
        _study(schema=1)


def test_the_published_study_keeps_its_committed_warm_start():
    """studies/shakespeare-nano (schema 1) is the packaged preset, and its committed warm start is found done:
    gnlm bench would not train it again."""
    from gnlm.study import study_differences

    study = load_study("shakespeare-nano")
    assert study_differences(yaml.safe_load((PUBLISHED / "study.yaml").read_text()), study) == []
    done, _ = bench._warm_start_done(study, PUBLISHED)
    assert done is not None and done["final_eval_loss"] == pytest.approx(3.9648, abs=1e-4)


def test_warm_start_only_then_the_study_reuses_it(tmp_path, capsys, monkeypatch):
    res = tmp_path / "res"
    path = tmp_path / "study.yaml"
    raw = to_dict(_study(warm_start={"tokens": 512, "batch_tokens": 256, "lr": 0.01, "load_optimizer_state": True}))
    del raw["schema"]  # a study as a person writes it
    path.write_text(yaml.safe_dump(raw))
    assert main(["bench", str(path), "--results", str(res), "--warm-start-only"]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "± " in out and "standard error over 4 sequences, 512 tokens" in out
    assert sorted(p.name for p in res.iterdir()) == ["study.yaml", "warm_start"]
    summary = json.loads((res / "warm_start" / "summary.json").read_text())
    assert summary["final_eval_loss_se"] > 0 and (summary["eval_sequences"], summary["eval_tokens"]) == (4, 512)
    checkpoint = (res / "warm_start" / "checkpoint.pt").read_bytes()

    trained = []
    real = bench.run_training

    def recording(cfg, **kwargs):
        trained.append(cfg)
        return real(cfg, **kwargs)

    monkeypatch.setattr(bench, "run_training", recording)
    assert main(["bench", str(path), "--results", str(res), "--warm-start-only"]) == 0  # found done
    assert trained == []
    rows = bench.run_study(load_study(path), res)
    assert rows and all(r.status == "finished" for r in rows)
    assert not any(c.out_dir.endswith("warm_start") for c in trained)
    assert all(c.train.init_optimizer for c in trained)  # the AdamW runs continued the warm start's state
    assert (res / "warm_start" / "checkpoint.pt").read_bytes() == checkpoint
    pilot = _study(base={**raw["base"], "schedule": {"name": "cosine"}}, warm_start=raw["warm_start"])
    shutil.copytree(res / "warm_start", tmp_path / "pilot" / "warm_start")
    assert bench._warm_start_done(pilot, tmp_path / "pilot")[0] is not None  # a pilot of other runs shares it
    assert "adamw continue(s) the warm start's optimizer state" in capsys.readouterr().err
    assert main(["bench", str(path), "--results", str(res), "--warm-start-only", "--max-runs", "1"]) == 2


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_reports_the_standard_error_over_sequences_and_keeps_the_mean():
    torch.manual_seed(0)
    cfg = _run("unused").model
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (10, 17))
    inputs, targets = x[:, :-1], x[:, 1:]
    ev = evaluate(model, inputs, targets, batch_size=4)
    with torch.no_grad():
        per_sequence = torch.stack([loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]) for i in range(10)]).double()
        before = sum(loss_fn(model(inputs[i:i + 4]), targets[i:i + 4]).item() * targets[i:i + 4].numel()
                     for i in range(0, 10, 4)) / targets.numel()
    assert ev.loss == before  # the mean over tokens, computed as before: bit for bit
    assert ev.se == pytest.approx(per_sequence.std().item() / math.sqrt(10), rel=1e-5)
    assert (ev.sequences, ev.tokens) == (10, 160)
    assert evaluate(model, inputs[:1], targets[:1], 4).se is None


def test_eval_every_tokens_evaluates_where_training_tokens_cross_a_multiple(tmp_path):
    """512 tokens a step, an evaluation every 1,200 tokens: after steps 3 (1,536 tokens) and 5 (2,560), then at the
    end (step 7); every evaluation row and the summary carry the standard error and the eval set's size."""
    cfg = _run(tmp_path / "run", "data.seq_len=128", "train.batch_size=4", "train.steps=7",
               "train.eval_every_tokens=1200")
    summary = run_training(cfg)
    rows = _metrics(cfg.out_dir)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 5, 7]
    assert all(r["eval_loss_se"] > 0 for r in rows if "eval_loss" in r)
    assert summary["final_eval_loss_se"] == rows[-1]["eval_loss_se"]
    assert (summary["eval_sequences"], summary["eval_tokens"]) == (4, 4 * 128)
    gn = _run(tmp_path / "gn", "method=gn", "gn.inner_steps=2", "gn.inner_batch_size=2", "train.eval_every_tokens=512")
    assert gn.batch_tokens() == 2 * 2 * 64  # the outer batch; line-search tokens do not count
    assert [s for s in range(1, 9) if evaluation_due(gn, s)] == [2, 4, 6, 8]
