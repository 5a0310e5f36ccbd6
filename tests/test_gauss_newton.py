"""The GN trainer: its inner loop against the dense GN step, the line search, layerwise partitions, short runs."""

from __future__ import annotations

import json

import pytest
import torch
from test_curvature import DT, Dense, make, rel

from gnlm.config import ConfigError
from gnlm.curvature import layerwise_blocks
from gnlm.gauss_newton import InnerSolver, first_order_solve, line_search, solve_by_cg
from gnlm.model import loss_fn
from gnlm.runconfig import GNConfig, load_run_config
from gnlm.train import run_training

torch.set_num_threads(1)


def gn_config(**gn):
    return load_run_config(None, ["method=gn", *(f"gn.{k}={v}" for k, v in gn.items())]).gn


def same_batch(x, y):
    """A batch source that repeats one batch (the setting of the exactness anchor)."""
    return lambda n: (x, y)


def dense_gn_step(dense, lam):
    return -torch.linalg.solve(dense.G + lam * torch.eye(dense.G.shape[0], dtype=DT), dense.g)


@pytest.mark.parametrize("inner,lr,steps,bound", [
    ("adamw", 3e-2, 1500, 1e-3),
    pytest.param("muon", 3e-2, 1500, 5e-3, marks=pytest.mark.slow),  # 13 s; the AdamW case anchors the default run
])
def test_first_order_inner_loop_converges_to_dense_gn_step(inner, lr, steps, bound):
    """θ + φ* − θ = −(G + λI)⁻¹g: the prox term λ makes the minimiser of the GN model exactly the damped GN step."""
    model, params0, x, y = make("gpt")
    dense = Dense(model, params0, x, y)
    lam = 1e-2
    star = dense_gn_step(dense, lam)
    cfg = gn_config(inner_steps=steps, damping=lam, **{"inner_optim.name": inner, "inner_optim.lr": lr,
                    "inner_optim.betas": "[0.9,0.999]", "inner_optim.clip": 0.0, "inner_optim.weight_decay": 0.0})
    solver = InnerSolver(model, cfg)
    first_order_solve(model, params0, solver, same_batch(x, y), None, step=0, total_steps=1)
    err = rel(dense.flat({k: solver.phi[k].detach() - params0[k] for k in params0}), star)
    print(f"inner {inner}: {steps} steps on one batch reach relative error {err:.2e} to the dense GN step")
    assert err < bound


@pytest.mark.parametrize("layerwise", [False, True])
def test_cg_inner_solver_reaches_dense_gn_step(layerwise):
    model, params0, x, y = make("gpt2")
    dense = Dense(model, params0, x, y)
    lam = 1e-3
    cfg = gn_config(solver="cg", inner_steps=1, cg_iters=400, damping=lam, layerwise=layerwise)
    blocks = layerwise_blocks(list(params0), cfg.blocks) if layerwise else None
    G = dense.G * dense.block_mask(blocks) if blocks else dense.G
    star = -torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=DT), dense.g)
    solver = InnerSolver(model, cfg)
    solve_by_cg(model, params0, solver, same_batch(x, y), blocks)
    err = rel(dense.flat({k: solver.phi[k].detach() - params0[k] for k in params0}), star)
    assert err <= 1e-3


def test_line_search_picks_the_lowest_loss_and_always_moves_like_the_paper():
    model, params0, x, y = make("gpt")
    dense = Dense(model, params0, x, y)
    step = dense.unflat(dense_gn_step(dense, 1e-3))
    etas = GNConfig(line_search_range=5).line_search_etas()
    assert etas == pytest.approx([1, 2 ** -0.5, 0.5, 2 ** -1.5, 0.25])
    eta, losses = line_search(model, params0, step, [(x, y)], etas)
    assert set(losses) == set(etas) and losses[eta] == min(losses.values())
    with torch.no_grad():  # the model is left at θ₀, and each loss is the loss of θ₀ + η·d
        assert all(torch.equal(p, params0[n]) for n, p in model.named_parameters())
        for e in etas:
            for n, p in model.named_parameters():
                p.copy_(params0[n] + e * step[n])
            assert loss_fn(model(x), y).item() == pytest.approx(losses[e], rel=1e-12)
            for n, p in model.named_parameters():
                p.copy_(params0[n])
    uphill = {k: -10 * v for k, v in step.items()}
    eta, losses = line_search(model, params0, uphill, [(x, y)], etas)
    assert eta == min(etas)  # the paper moves even uphill: the smallest step is the least bad
    nan = {k: torch.full_like(v, float("nan")) for k, v in step.items()}
    assert line_search(model, params0, nan, [(x, y)], etas)[0] is None


def test_line_search_skip_option_never_increases_the_loss():
    model, params0, x, y = make("gpt")
    dense = Dense(model, params0, x, y)
    step = dense.unflat(dense_gn_step(dense, 1e-3))
    etas = GNConfig().line_search_etas()
    descent = dense.unflat(-1e-2 * dense.g)  # a short step down the gradient lowers the loss: it is taken
    eta, losses = line_search(model, params0, descent, [(x, y)], etas, skip=True)
    assert eta > 0 and losses[eta] < losses[0.0] and losses[eta] == min(losses.values())
    uphill = {k: -10 * v for k, v in step.items()}
    eta, losses = line_search(model, params0, uphill, [(x, y)], etas, skip=True)
    assert eta == 0.0 and losses[0.0] < min(v for k, v in losses.items() if k > 0)
    nan = {k: torch.full_like(v, float("nan")) for k, v in step.items()}
    assert line_search(model, params0, nan, [(x, y)], etas, skip=True)[0] == 0.0


def test_line_search_batches_auto_is_another_full_outer_batch():
    cfg = load_run_config(None, ["method=gn", "gn.inner_steps=7"]).gn
    assert cfg.line_search_batches == "auto" and cfg.line_search_batch_count() == 7 and not cfg.line_search_skip
    assert load_run_config(None, ["method=gn", "gn.line_search_batches=2"]).gn.line_search_batch_count() == 2
    assert load_run_config(None, ["method=gn", "gn.line_search=false"]).gn.line_search_batch_count() == 0
    with pytest.raises(ConfigError, match="gn.line_search_batches"):
        load_run_config(None, ["method=gn", "gn.line_search_batches=many"])


def test_bad_layerwise_partition_is_rejected_before_training(tmp_path):
    with pytest.raises(ConfigError, match="'blocks.0.mlp.w1.weight'.* in no block"):
        load_run_config(None, ["method=gn", "model=nano", "gn.layerwise=true",
                               "gn.blocks=[['wte.*'], ['blocks.*.attn*', 'blocks.*_norm.*'], ['blocks.1.mlp.*', 'ln_f.*', 'lm_head.*']]"])
    with pytest.raises(ConfigError, match="is in blocks \\[0, 1\\]"):
        load_run_config(None, ["method=gn", "model=nano", "gn.layerwise=true",
                               "gn.blocks=[['wte.*', 'blocks.*'], ['blocks.*', 'ln_f.*', 'lm_head.*']]"])


def gn_run(tmp_path, *overrides):
    return load_run_config(None, [f"out_dir={tmp_path / 'run'}", "method=gn", "model=nano",
                                  "model.vocab_size=512", "data.vocab_size=512", "data.seq_len=64",
                                  "train.progress=false", "train.threads=1", "train.steps=3", "train.eval_every=3",
                                  "data.eval_sequences=16", "gn.inner_steps=8", "gn.inner_batch_size=4",
                                  "gn.line_search_batches=2", "gn.inner_optim.lr=3e-2", *overrides])


@pytest.mark.parametrize("variant", [[], ["gn.layerwise=true"], ["gn.surrogate=prox_linear"],
                                     ["gn.solver=cg", "gn.cg_iters=5", "gn.inner_steps=2"]],
                         ids=["full", "layerwise", "prox_linear", "cg"])
def test_short_gn_run_lowers_the_validation_loss(tmp_path, variant):
    summary = run_training(gn_run(tmp_path, *variant))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_eval_loss"] < rows[0]["eval_loss"] - 1.0, (rows[0]["eval_loss"], summary)
    step = rows[1]
    assert step["inner_steps"] == (2 if "gn.solver=cg" in variant else 8)
    assert step["line_search_tokens"] == 2 * 4 * 64
    assert step["tokens"] == step["inner_tokens"] + step["line_search_tokens"]
    assert 0 < step["eta"] <= 1 and step["flops"] > 0


def test_gn_resume_continues_exactly(tmp_path):
    common = ["gn.inner_steps=4", "train.eval_every=1"]
    full = run_training(gn_run(tmp_path / "a", *common, "train.steps=4"))
    run_training(gn_run(tmp_path / "b", *common, "train.steps=2"))
    resumed = run_training(gn_run(tmp_path / "b", *common, "train.steps=4"), resume=True)
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    read = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "wall_time")}
                      for line in (p / "run" / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "a") == read(tmp_path / "b")


def test_one_damping_for_both_solvers_and_old_keys_are_refused_by_name():
    assert gn_config().damping == 0.0 and gn_config(solver="cg").damping == 1e-3  # each solver's default
    assert gn_config(solver="cg", damping=0.1).damping == 0.1 and gn_config(damping=0.1).damping == 0.1
    for old, new in (("prox", "damping"), ("cg_damping", "damping"), ("ls_range", "line_search_range"),
                     ("ls_batches", "line_search_batches")):
        with pytest.raises(ConfigError, match=f"'gn.{old}' was renamed: write 'gn.{new}' instead"):
            load_run_config(None, ["method=gn", f"gn.{old}=1"])


def test_a_run_directory_of_an_earlier_gnlm_is_the_same_run():
    """A config.yaml written before the renames (gn.prox, gn.cg_damping, ls_*) describes the same run."""
    from gnlm.runconfig import run_config_to_dict, run_differences

    for solver, damping in (("cg", 0.01), ("first_order", 0.0)):
        now = run_config_to_dict(load_run_config(None, ["method=gn", f"gn.solver={solver}", f"gn.damping={damping}",
                                                        "gn.line_search_range=7"]))
        old = json.loads(json.dumps(now))
        gn = old["gn"]
        gn["prox"], gn["cg_damping"] = (gn.pop("damping"), 1e-3) if solver == "first_order" else (0.0, gn.pop("damping"))
        gn["ls_range"], gn["ls_batches"] = gn.pop("line_search_range"), gn.pop("line_search_batches")
        assert run_differences(old, now) == []
        gn["ls_range"] = 5
        assert run_differences(old, now) == ["gn.line_search_range"]
