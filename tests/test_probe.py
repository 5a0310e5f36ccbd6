"""`gnlm probe` (issue 10): the direction efficiency against dense ground truth, and the command end to end.

Ground truth (float64, tiny models): the parameters flattened into one vector, the dense Jacobian J of the logits
(``torch.func.jacrev``), the dense Hessian H of the mean cross-entropy w.r.t. the logits (``torch.func.hessian``),
G = Jᵀ H J, M = G + λI and dense solves. Every model is taken off its initialisation (``randomize_parameters``: norm
weights 1 + 0.5·N(0, 1), biases 0.5·N(0, 1), matrix rows rescaled): at init every norm weight is 1 and every bias 0,
which hides errors in their tangents.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import randomize_parameters
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from gnlm.cli import main
from gnlm.curvature import damped_ggn_product, default_blocks, math_attention
from gnlm.model import GPT, ModelConfig
from gnlm.oracle import direction_efficiency, probe_directions, step_direction
from gnlm.results import Row

DT = torch.float64
LAM = 1e-2


class TinyMLP(nn.Module):
    """Embedding -> tanh MLP -> lm_head: a 2-layer MLP language model (each token on its own)."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx):
        return self.head(torch.tanh(self.fc1(self.emb(idx))))


MLP_BLOCKS = [["emb.weight"], ["fc1.weight", "fc1.bias"], ["head.weight"]]


def make(kind: str, n_batches: int = 1):
    torch.manual_seed(0)
    if kind == "mlp":
        model, vocab, blocks = TinyMLP(), 7, MLP_BLOCKS
    else:
        model = GPT(ModelConfig(d_model=4, n_layers=1, n_heads=2, d_ff=8, vocab_size=5, max_seq_len=4))
        vocab, blocks = 5, default_blocks(model)
    model = randomize_parameters(model.to(DT)).eval()
    batches = [(torch.randint(0, vocab, (2, 4)), torch.randint(0, vocab, (2, 4))) for _ in range(n_batches)]
    if n_batches > 1:
        return model, batches, blocks
    (x, y), = batches
    return model, x, y, blocks


class Dense:
    """Dense g, G and M = G + λI of a model at its parameters on one batch, and (un)flattening."""

    def __init__(self, model, x, y, lam=LAM):
        params = {k: v.detach() for k, v in model.named_parameters()}
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        with math_attention(model):
            z0 = functional_call(model, params, (x,)).reshape(-1)
            J = jacrev(lambda th: functional_call(model, self.unflat(th), (x,)).reshape(-1))(self.flat(params))
        V = model(x).shape[-1]

        def ce(z):
            return F.cross_entropy(z.reshape(-1, V), y.reshape(-1))

        self.g = J.T @ grad(ce)(z0)
        self.G = J.T @ hessian(ce)(z0) @ J
        self.M = self.G + lam * torch.eye(len(self.g), dtype=DT)
        self.gmg = float(self.g @ torch.linalg.solve(self.M, self.g))

    def flat(self, d):
        return torch.cat([d[k].reshape(-1) for k in self.names])

    def unflat(self, v):
        return {k: t.reshape(s) for k, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def rho(self, d):
        gd = float(self.g @ d)
        return gd * gd / (float(d @ self.M @ d) * self.gmg) if gd < 0 else 0.0

    def block_diagonal(self, blocks, lam=LAM):
        owner = torch.empty(len(self.g), dtype=torch.long)
        start = 0
        for name, size in zip(self.names, self.sizes):
            owner[start:start + size] = next(b for b, names in enumerate(blocks) if name in names)
            start += size
        return torch.where(owner[:, None] == owner[None, :], self.G, 0.0) + lam * torch.eye(len(self.g), dtype=DT)


def score(dense, d_flat):
    return direction_efficiency(dense.unflat(dense.g), dense.unflat(d_flat), dense.unflat(dense.M @ d_flat),
                                dense.gmg)


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_damped_ggn_product_is_the_dense_mean_of_batch_ggns_plus_damping(kind):
    model, batches, blocks = make(kind, n_batches=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    dense = [Dense(model, x, y) for x, y in batches]
    lam = 0.37
    eye = torch.eye(len(dense[0].g), dtype=DT)
    full = sum(d.G for d in dense) / len(dense) + lam * eye
    layerwise = sum(d.block_diagonal(blocks, lam=0.0) for d in dense) / len(dense) + lam * eye
    v = torch.randn(len(dense[0].g), generator=torch.Generator().manual_seed(2), dtype=DT)
    for block_arg, m in ((None, full), (blocks, layerwise)):
        mv = damped_ggn_product(model, params, batches, dense[0].unflat(v), lam, blocks=block_arg)
        assert list(mv) == dense[0].names
        want = m @ v
        assert float((dense[0].flat(mv) - want).norm() / want.norm()) < 1e-12, block_arg


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_probe_m_products_are_the_dense_damped_ggn(kind):
    model, x, y, _ = make(kind)
    dense = Dense(model, x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    r = torch.randn(len(dense.g), generator=torch.Generator().manual_seed(3), dtype=DT)
    mr = damped_ggn_product(model, params, [(x, y)], dense.unflat(r), LAM)
    assert float((dense.flat(mr) - dense.M @ r).norm() / (dense.M @ r).norm()) < 1e-12
    res = probe_directions(model, params, x, y, {"random": dense.unflat(r)}, damping=LAM, cg_iters=4, cg_tol=1e-13)
    for name, d in (("random", r), ("gn", dense.flat(res.references["gn"])),
                    ("gradient", dense.flat(res.references["gradient"]))):
        dmd = float(d @ dense.M @ d)
        assert abs(res.scores[name]["dmd"] / dmd - 1.0) < 1e-12, name
        assert abs(res.scores[name]["gtd"] / float(dense.g @ d) - 1.0) < 1e-12, name
    g = dense.g
    assert float((dense.flat(res.references["gradient"]) + float(g @ g) / float(g @ dense.M @ g) * g).norm()
                 / g.norm()) < 1e-12  # the gradient reference is −α g with α = gᵀg / gᵀMg


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_dense_gn_step_scores_one(kind):
    model, x, y, _ = make(kind)
    dense = Dense(model, x, y)
    d_star = -torch.linalg.solve(dense.M, dense.g)
    s = score(dense, d_star)
    assert abs(s["rho"] - 1.0) < 1e-8
    assert abs(s["step_efficiency"] - 1.0) < 1e-8
    assert abs(s["best_scale"] - 1.0) < 1e-8
    assert score(dense, -d_star)["rho"] == 0.0


@pytest.mark.parametrize("kind,layerwise", [("mlp", True), ("gpt", False)])  # a layerwise CG on the GPT: ~10 s
def test_probe_directions_match_the_dense_formulas(kind, layerwise):
    model, x, y, blocks = make(kind)
    dense = Dense(model, x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(len(dense.g), generator=gen, dtype=DT)
    r = -r if float(dense.g @ r) > 0 else r  # a descent direction, so that ρ is not clamped to 0
    dirs = {"random": dense.unflat(r), "random_scaled": dense.unflat(3.7 * r), "ascent": dense.unflat(-r)}
    res = probe_directions(model, params, x, y, dirs, damping=LAM, cg_iters=10 * len(dense.g), cg_tol=1e-13,
                           blocks=blocks if layerwise else None)
    assert res.cg["gn"]["converged"]
    assert abs(res.gmg / dense.gmg - 1.0) < 1e-9
    assert abs(res.scores["gn"]["rho"] - 1.0) < 1e-8
    assert abs(res.scores["gradient"]["rho"] - dense.rho(-dense.g)) < 1e-9
    assert abs(res.scores["gradient"]["step_efficiency"] - res.scores["gradient"]["rho"]) < 1e-9  # taken at α
    assert abs(res.scores["random"]["rho"] - dense.rho(r)) < 1e-9
    assert abs(res.scores["random_scaled"]["rho"] - res.scores["random"]["rho"]) < 1e-12
    assert res.scores["ascent"]["rho"] == 0.0
    if not layerwise:
        assert "layerwise" not in res.references
        return
    assert res.cg["layerwise"]["converged"]
    d_lw = -torch.linalg.solve(dense.block_diagonal(blocks), dense.g)
    got = dense.flat(res.references["layerwise"])
    assert float((got - d_lw).norm() / d_lw.norm()) < 1e-8
    assert abs(res.scores["layerwise"]["rho"] - dense.rho(d_lw)) < 1e-9
    assert 0.0 < res.scores["layerwise"]["rho"] < 1.0


class DenseStep(torch.optim.Optimizer):
    """Test optimizer: θ ← θ + sign · M⁻¹ ∇ℓ with a dense M (sign −1: the exact GN step, +1: its opposite)."""

    def __init__(self, params, m_inv: torch.Tensor, sign: float):
        super().__init__(params, {"lr": 1.0})
        self.m_inv, self.sign = m_inv, sign

    @torch.no_grad()
    def step(self, closure=None):
        ps = [p for group in self.param_groups for p in group["params"]]
        update = self.m_inv @ torch.cat([p.grad.reshape(-1) for p in ps])
        for p, u in zip(ps, update.split([p.numel() for p in ps])):
            p.add_(self.sign * u.reshape(p.shape))


def test_an_optimizer_taking_the_exact_gn_step_scores_one_and_its_opposite_zero():
    model, x, y, blocks = make("mlp")
    dense = Dense(model, x, y)
    m_inv = torch.linalg.inv(dense.M)
    g = dense.unflat(dense.g)
    steps = {}
    for name, sign in (("newton", -1.0), ("anti_newton", 1.0)):
        theta0 = dense.flat({k: v.detach().clone() for k, v in model.named_parameters()})
        steps[name] = step_direction(model, DenseStep(model.parameters(), m_inv, sign), g)
        assert torch.equal(dense.flat(dict(model.named_parameters())), theta0)  # the step is undone
    params = {k: v.detach() for k, v in model.named_parameters()}
    res = probe_directions(model, params, x, y, steps, damping=LAM, cg_iters=500, cg_tol=1e-13, blocks=blocks)
    assert abs(res.scores["newton"]["rho"] - 1.0) < 1e-8
    assert abs(res.scores["newton"]["step_efficiency"] - 1.0) < 1e-8
    assert res.scores["anti_newton"]["rho"] == 0.0
    assert res.scores["anti_newton"]["step_efficiency"] < -2.9  # q(−d*) = 3·Δq*: the model predicts an increase


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    run = root / "run"
    rc = main(["train", f"out_dir={run}", "model=nano", "model.vocab_size=512", "data.vocab_size=512",
               "data.seq_len=32", "train.steps=4", "train.batch_size=4", "train.eval_every=4",
               "train.checkpoint_every=2", "data.eval_sequences=4", "train.progress=false", "train.threads=1"])
    assert rc == 0
    return run


PROBE = ["--probe-batches", "2", "--warmup-steps", "2", "--batch-tokens", "64", "--cg-iters", "8", "--no-progress"]


def test_probe_cli_writes_json_table_and_figure(tiny_run, capsys):
    out = tiny_run.parent / "probe_out"
    assert main(["probe", str(tiny_run), "--optimizers", "adamw,muon", "--lrs", "3e-3,2e-2", "--out", str(out),
                 "--set", "muon:optim.weight_decay=0.05", "--set", "muon:optim.kwargs.ns_coefficients=[3,-4,2]",
                 *PROBE]) == 0
    captured = capsys.readouterr()
    assert "| adamw |" in captured.out and "| layerwise GN |" in captured.out
    assert "warning: CG" in captured.err  # 8 iterations do not reach the tolerance, and it is said
    result = json.loads((out / "probe.json").read_text())
    for key in ("optimizers", "layerwise_rho", "gradient_rho", "gn_rho", "damping", "cg_rel_residual",
                "cg_iterations", "cg_converged", "etas", "references", "per_batch"):
        assert key in result, key
    assert result["cg_converged"] is False and result["damping_fixed"] is False
    assert result["damping_grid"] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0] and result["full_sweep"] is False
    grid = [d["damping"] for d in result["by_damping"]]  # the λ solved: the largest ones, down to where it stopped
    assert grid == result["damping_grid"][-len(grid):]
    # λ*: the damping whose GN step lowers the real loss on the fresh batches most at its best η
    best = {d["damping"]: min(d["oracle_real_loss_change"]) for d in result["by_damping"]}
    assert result["damping"] == min(best, key=best.get)
    at_star = result["by_damping"][grid.index(result["damping"])]
    assert result["references"]["gn"]["real_loss_change"] == at_star["oracle_real_loss_change"]
    oracle_best = result["references"]["gn"]["best_real_loss_change"]
    assert oracle_best == min(at_star["oracle_real_loss_change"])
    assert result["oracle_helps"] == (oracle_best < 0)
    if result["oracle_helps"]:
        assert result["references"]["gn"]["real_loss_fraction"] == 1.0
    assert "ρ against the damping" in captured.out
    for name, lr in (("adamw", 3e-3), ("muon", 2e-2)):
        entry = result["optimizers"][name]
        assert entry["lr"] == lr and entry["lr_source"] == "--lrs"
        assert 0.0 <= entry["rho"] <= 1.0 and entry["rho_std"] >= 0.0 and "step_efficiency" in entry
        assert len(entry["per_batch"]["rho"]) == 2 and len(entry["real_loss_change"]) == len(result["etas"])
        assert len(entry["rho_by_damping"]) == len(grid)
        assert entry["rho"] == pytest.approx(entry["rho_by_damping"][grid.index(result["damping"])])
        assert entry["best_real_loss_change"] == min(entry["real_loss_change"])
        if result["oracle_helps"]:  # the second measure: the real decrease over the oracle's at λ*
            assert entry["real_loss_fraction"] == pytest.approx(entry["best_real_loss_change"] / oracle_best)
    assert 0.0 < result["gn_rho"] <= 1.0
    muon_group = result["optimizers"]["muon"]["settings"]["param_groups"][0]
    assert muon_group["role"] == "muon" and muon_group["weight_decay"] == 0.05
    assert muon_group["ns_coefficients"] == [3, -4, 2]
    assert result["optimizers"]["adamw"]["settings"]["param_groups"][0]["weight_decay"] == 0.0
    assert (out / "probe.md").read_text().startswith("## gnlm probe")
    assert (out / "probe.png").stat().st_size > 0


def test_the_sweep_stops_at_the_first_damping_that_does_worse(tiny_run):
    """The default sweep is the full sweep cut where the rule says: the same numbers at every λ it solved (largest
    first), down to the first λ whose oracle does worse on the real loss than a larger λ that lowers it."""
    args = ["probe", str(tiny_run), "--optimizers", "adamw", "--lrs", "3e-3", "--damping-grid", "1e-5,1e-3,1e-1,10",
            "--probe-batches", "1", "--warmup-steps", "1", "--cg-iters", "30", "--no-progress"]
    full = tiny_run.parent / "probe_full"
    assert main([*args, "--full-sweep", "--out", str(full)]) == 0
    assert main([*args, "--out", str(tiny_run.parent / "probe_cut")]) == 0
    full_r = json.loads((full / "probe.json").read_text())
    cut_r = json.loads((tiny_run.parent / "probe_cut" / "probe.json").read_text())
    by_lam = {d["damping"]: d for d in full_r["by_damping"]}
    assert sorted(by_lam) == [1e-5, 1e-3, 1e-1, 10.0]
    best = {lam: d["oracle_best_real_loss_change"] for lam, d in by_lam.items()}
    want = []
    for lam in sorted(best, reverse=True):
        want.append(lam)
        if len(want) > 1 and min(best[v] for v in want[:-1]) < 0 and best[lam] > min(best[v] for v in want[:-1]):
            break
    assert [d["damping"] for d in cut_r["by_damping"]] == sorted(want)
    for d in cut_r["by_damping"]:
        assert d == by_lam[d["damping"]]
    assert cut_r["damping"] == min(want, key=lambda lam: (best[lam], -lam))
    assert len(want) < 4  # on this run λ = 1e-3 does worse than 0.1: 1e-5 is never solved
    assert "Not solved: λ = 1e-05" in (tiny_run.parent / "probe_cut" / "probe.md").read_text()


def test_probe_along_a_run_scores_every_checkpoint(tiny_run):
    assert main(["probe", "--along", str(tiny_run), "--optimizers", "adamw", *PROBE[:2], "--warmup-steps", "0",
                 "--batch-tokens", "64", "--cg-iters", "4", "--no-progress"]) == 0
    result = json.loads((tiny_run / "probe" / "probe.json").read_text())
    assert [p["step"] for p in result["along"]] == [2, 4]
    assert result["step"] == 4 and result["optimizers"]["adamw"]["lr_source"] == "the run's optim.lr"


def test_probe_of_a_study_uses_its_warm_start_and_best_lrs(tiny_run, capsys):
    study = tiny_run.parent / "study"
    (study / "warm_start").mkdir(parents=True)
    for name in ("config.yaml", "checkpoint.pt"):
        shutil.copy(tiny_run / name, study / "warm_start" / name)
    run_cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    (study / "study.yaml").write_text(yaml.safe_dump({
        "name": "t", "kind": "steps_to_target", "batch_tokens": [64, 128], "target_loss": 5.5, "seeds": [1],
        "base": {"model": run_cfg["model"], "data": run_cfg["data"]},
        "methods": [{"name": "adamw", "lrs": [1e-3, 1e-2]}, {"name": "muon", "lrs": [0.02, 0.06]}]}))
    rows = [Row(run_id=f"{m}/b{b}/lr{lr:g}/s0", method=m, family="baseline", batch_tokens=b, lr=lr, seed=0,
                run_dir="x", reached=True, steps=steps, final_eval_loss=5.0,
                crossings={"5.5": {"step": steps, "step_interp": float(steps)}})
            for m, b, lr, steps in (("adamw", 64, 1e-3, 9), ("adamw", 64, 1e-2, 5), ("muon", 128, 0.02, 3))]
    (study / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    assert main(["probe", str(study), "--optimizers", "adamw,muon", "--probe-batches", "1", "--warmup-steps", "1",
                 "--cg-iters", "4", "--no-progress"]) == 0
    assert "muon: lr 0.003 (OptimConfig default)" in capsys.readouterr().err  # no muon run at batch 64
    result = json.loads((study / "probe" / "probe.json").read_text())
    assert result["source_kind"] == "study" and result["batch_tokens"] == 64  # the study's smallest batch
    assert result["optimizers"]["adamw"]["lr"] == 1e-2
    assert result["optimizers"]["adamw"]["lr_source"] == "study best lr of adamw at batch 64"


@pytest.mark.parametrize("args,message", [
    (["{root}/missing"], "does not exist"),
    (["{root}"], "neither a run directory"),
    (["{run}", "--optimizers", "adamx"], "did you mean 'adamw'"),
    (["{run}", "--optimizers", "adamw,muon", "--lrs", "1e-3"], "1 learning rates for 2 optimizers"),
    (["{run}", "--batch-tokens", "50"], "multiple of data.seq_len"),
    (["{run}/metrics.jsonl", "--along", "{run}"], "must be a study results directory"),
    (["{root}/empty_run"], "has no checkpoint.pt"),
    (["{run}", "--set", "adamw.optim.betas=[0.9,0.99]"], "is not LABEL:KEY=VALUE"),
    (["{run}", "--optimizers", "adamw", "--set", "muon:optim.lr=1"], "is not one of --optimizers"),
    (["{run}", "--optimizers", "adamw", "--set", "adamw:model.d_model=3"], "is not an optimizer setting"),
    (["{run}", "--optimizers", "adamw", "--set", "adamw:optim.betas=[2,3]"], "--set adamw: optim.betas"),
])
def test_bad_input_is_one_line_before_compute(tiny_run, capsys, args, message):
    root = tiny_run.parent
    (root / "empty_run").mkdir(exist_ok=True)
    (root / "empty_run" / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    assert main(["probe", *(a.format(root=root, run=tiny_run) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------- faithful optimizers (issue 17 item 1)

RECORDER = '''
import json
import os

import torch


class Rec(torch.optim.SGD):
    """SGD that appends its constructor's arguments to $GNLM_TEST_RECORD."""

    def __init__(self, params, lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False, foo=1):
        params = list(params)
        with open(os.environ["GNLM_TEST_RECORD"], "a") as f:
            f.write(json.dumps({"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
                                "foo": foo, "params": sum(len(g["params"]) for g in params)}) + "\\n")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
'''

TINY_RUN = ["model=nano", "model.vocab_size=512", "data.vocab_size=512", "data.seq_len=32", "train.progress=false",
            "train.threads=1", "train.batch_size=2", "train.eval_every=100", "data.eval_sequences=4"]
ONE = ["--probe-batches", "1", "--warmup-steps", "1", "--cg-iters", "2", "--no-progress"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_probe_builds_each_optimizer_as_train_and_bench_did(tmp_path, monkeypatch):
    """A class recording its constructor's arguments gets the same ones from gnlm train, gnlm bench and gnlm probe
    (of the run and of the study); AdamW, Muon and SOAP with a study's overrides are built with the param groups of
    the runs gnlm bench made, and step at the schedule's lr of the probe's update."""
    import sys

    from gnlm.optim import build_optimizer
    from gnlm.probe import param_group_settings
    from gnlm.runconfig import build_run_config
    from gnlm.schedules import lr_multiplier

    (tmp_path / "recopt.py").write_text(RECORDER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "recopt", raising=False)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("GNLM_TEST_RECORD", str(record))
    rec = ["optim.lr=0.05", "optim.momentum=0.8", "optim.weight_decay=0.01", "optim.kwargs.foo=7"]
    assert main(["train", "out_dir=run", *TINY_RUN, "train.steps=2", "optim.name=recopt.Rec", *rec]) == 0
    trained = _records(record)
    assert len(trained) == 1 and trained[0]["foo"] == 7 and trained[0]["momentum"] == 0.8
    record.unlink()
    assert main(["probe", "run", "--optimizers", "recopt.Rec", "--batch-tokens", "64", *ONE]) == 0
    assert _records(record) == trained
    record.unlink()
    run_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    study = {"name": "faithful", "target_loss": 1.0, "max_steps": 2, "batch_tokens": [64], "seeds": [1],
             "progress": False, "allow_unequal_grids": True,
             "base": {"model": run_cfg["model"], "data": run_cfg["data"], "train": {"threads": 1, "eval_every": 100},
                      "schedule": {"name": "cosine", "warmup_steps": 3}},
             "warm_start": {"tokens": 64, "batch_tokens": 64, "lr": 0.01, "load_optimizer_state": True},
             "methods": [
                 {"name": "rec", "optimizer": "recopt.Rec", "kwargs": {"foo": 7}, "lrs": [0.05],
                  "overrides": {"optim.momentum": 0.8, "optim.weight_decay": 0.01}},
                 {"name": "adamw", "lrs": [0.002], "overrides": {"optim.betas": [0.8, 0.9], "optim.weight_decay": 0.1,
                                                                 "optim.eps": 1e-6}},
                 {"name": "muon_wd", "type": "muon", "lrs": [0.02],
                  "overrides": {"optim.momentum": 0.9, "optim.ns_steps": 3, "optim.clip": 0.5}},
                 {"name": "soap", "lrs": [0.003], "overrides": {"optim.precondition_frequency": 2}}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["bench", "study.yaml", "--results", "res"]) == 0
    benched = _records(record)
    assert len(benched) == 2 and all(r == trained[0] for r in benched)  # the selection seed and seed 1
    record.unlink()
    assert main(["probe", "res", "--optimizers", "rec,adamw,muon_wd,soap", *ONE]) == 0
    assert _records(record) == trained
    result = json.loads((tmp_path / "res" / "probe" / "probe.json").read_text())
    for label in ("rec", "adamw", "muon_wd", "soap"):
        st = result["optimizers"][label]["settings"]
        lr = study["methods"][[m["name"] for m in study["methods"]].index(label)]["lrs"][0]
        saved = yaml.safe_load(next((tmp_path / "res" / "runs" / label).glob("b64/*/s1/config.yaml")).read_text())
        assert st["optim"] == saved["optim"] and st["schedule"] == saved["schedule"], label
        assert st["train_steps"] == saved["train"]["steps"] and st["probe_update"] == 1
        cfg = build_run_config(saved)
        want_lr = lr * lr_multiplier(cfg.schedule, 1, cfg.train.steps)
        assert st["lr_at_probe_step"] == pytest.approx(want_lr)
        model = GPT(ModelConfig(**{k: v for k, v in saved["model"].items() if k in ModelConfig.__dataclass_fields__}))
        assert st["param_groups"] == param_group_settings(build_optimizer(dict(model.named_parameters()), cfg.optim))
        # AdamW continues the warm start's state (load_optimizer_state), as its runs did; the others start fresh
        assert st["state"].startswith("the checkpoint's" if label == "adamw" else "fresh"), label
    md = (tmp_path / "res" / "probe" / "probe.md").read_text()
    assert "betas [0.8, 0.9]" in md and "eps 1e-06" in md and "ns_steps 3" in md and "{'foo': 7}" in md


# ------------------------------------------------------------------------- calibrated oracle (issue 17 item 2)


@pytest.mark.parametrize("kind,grid", [("mlp", [1e-2, 1e-1, 1.0]),
                                       pytest.param("gpt", [1e-2, 1.0], marks=pytest.mark.slow)])  # gpt: ~30 s
def test_damping_sweep_is_the_dense_gn_step_at_every_damping(kind, grid):
    """Over 3 micro-batches, at every λ of a log grid: the oracle step is −(Ḡ + λI)⁻¹ḡ (Ḡ, ḡ the micro-batches'
    means), the layerwise step −(block-diag Ḡ + λI)⁻¹ḡ, gᵀM⁻¹g and every ρ the dense ones under M = Ḡ + λI."""
    from gnlm.oracle import damping_sweep

    model, batches, blocks = make(kind, n_batches=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    dense = [Dense(model, x, y) for x, y in batches]
    g = sum(d.g for d in dense) / 3
    G = sum(d.G for d in dense) / 3
    G_lw = sum(d.block_diagonal(blocks, lam=0.0) for d in dense) / 3
    eye = torch.eye(len(g), dtype=DT)
    r = torch.randn(len(g), generator=torch.Generator().manual_seed(4), dtype=DT)
    r = -r if float(g @ r) > 0 else r
    res = damping_sweep(model, params, batches, None, {"random": dense[0].unflat(r)}, grid,
                        cg_iters=5 * len(g), cg_tol=1e-10, blocks=blocks if kind == "mlp" else None)
    assert sorted(res) == grid
    for lam in grid:
        M = G + lam * eye
        want = -torch.linalg.solve(M, g)
        got = dense[0].flat(res[lam].references["gn"])
        assert res[lam].cg["gn"]["converged"], lam
        assert float((got - want).norm() / want.norm()) < 1e-8, lam
        gmg = float(g @ torch.linalg.solve(M, g))
        assert abs(res[lam].gmg / gmg - 1.0) < 1e-9, lam
        rho_r = float(g @ r) ** 2 / (float(r @ M @ r) * gmg)
        assert abs(res[lam].scores["random"]["rho"] - rho_r) < 1e-9, lam
        rho_g = float(g @ g) ** 2 / (float(g @ M @ g) * gmg)
        assert abs(res[lam].scores["gradient"]["rho"] - rho_g) < 1e-9, lam
        assert abs(res[lam].scores["gn"]["rho"] - 1.0) < 1e-8, lam
        if kind == "mlp":
            want_lw = -torch.linalg.solve(G_lw + lam * eye, g)
            got_lw = dense[0].flat(res[lam].references["layerwise"])
            assert float((got_lw - want_lw).norm() / want_lw.norm()) < 1e-8, lam
            rho_lw = float(g @ want_lw) ** 2 / (float(want_lw @ M @ want_lw) * gmg)
            assert abs(res[lam].scores["layerwise"]["rho"] - rho_lw) < 1e-9, lam


def test_a_checkpoint_where_no_damping_helps_is_warned_about(tiny_run, capsys):
    """Every weight zero: the logits are 0 whatever the input, the gradient is exactly 0 (a stationary point of
    every batch's loss), so the GN step is 0 at every λ and no λ lowers the real loss: the warning fires, on stderr
    and in the table."""
    from gnlm.checkpoint import read_checkpoint, save_checkpoint

    flat = tiny_run.parent / "flat_run"
    flat.mkdir(exist_ok=True)
    shutil.copy(tiny_run / "config.yaml", flat / "config.yaml")
    ckpt = read_checkpoint(tiny_run / "checkpoint.pt")
    ckpt["model"] = {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}
    save_checkpoint(flat / "checkpoint.pt", ckpt)
    assert main(["probe", str(flat), "--optimizers", "adamw", "--damping-grid", "1e-2,1", "--probe-batches", "1",
                 "--warmup-steps", "0", "--batch-tokens", "64", "--cg-iters", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: the GN oracle does not lower the real loss" in captured.err
    assert "**Warning: the GN oracle does not lower the real loss" in captured.out
    result = json.loads((flat / "probe" / "probe.json").read_text())
    assert result["oracle_helps"] is False and result["optimizers"]["adamw"]["real_loss_fraction"] is None
    assert all(v == 0.0 for d in result["by_damping"] for v in d["oracle_real_loss_change"])
