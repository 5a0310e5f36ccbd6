import io
import math
import sys

import pytest
import torch

from gnlm.config import ConfigError, from_dict
from gnlm.optim import (
    EMA,
    CombinedOptimizer,
    OptimConfig,
    build_optimizer,
    clip_grad_norm,
    matches_pattern,
    routing,
    set_lr,
)
from gnlm.schedules import (
    InnerScheduleConfig,
    ScheduleConfig,
    inner_lr_multiplier,
    lr_multiplier,
)

torch.set_num_threads(1)

V, D, F = 40, 16, 24


def llama_like(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small LLaMA-like named-parameter dict of plain leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "wte.weight": (V, D),
        "blocks.0.attn.wq.weight": (D, D),
        "blocks.0.attn.wk.weight": (D, D),
        "blocks.0.attn.q_norm.weight": (D,),
        "blocks.0.attn.q_norm.bias": (D,),
        "blocks.0.ln1.weight": (D,),
        "blocks.0.mlp.w1.weight": (F, D),
        "blocks.0.mlp.w2.weight": (D, F),
        "ln_f.weight": (D,),
        "lm_head.weight": (V, D),
    }
    return {n: (torch.randn(s, generator=g) * 0.2).requires_grad_() for n, s in shapes.items()}


def clone(params):
    return {n: p.detach().clone().requires_grad_() for n, p in params.items()}


def set_grads(params, step):
    """Deterministic, state-dependent gradients (the same for every copy of the params)."""
    for i, p in enumerate(params.values()):
        g = torch.Generator().manual_seed(1000 * step + i)
        p.grad = 0.3 * p.detach() + torch.randn(p.shape, generator=g)


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


HIDDEN = ["blocks.0.attn.wq.weight", "blocks.0.attn.wk.weight", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight"]


# ---------------------------------------------------------------------------------------------------- routing


def test_muon_routing_is_the_papers():
    r = routing(llama_like(), OptimConfig(name="muon"))
    assert sorted(n for n, role in r.items() if role == "muon") == sorted(HIDDEN)
    for n in ["wte.weight", "lm_head.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.q_norm.bias",
              "ln_f.weight", "blocks.0.ln1.weight"]:
        assert r[n] == "adamw"


def test_soap_and_adamw_routing():
    params = llama_like()
    r = routing(params, OptimConfig(name="soap"))
    assert {n for n, role in r.items() if role == "soap"} == set(HIDDEN) | {"wte.weight", "lm_head.weight"}
    assert all(role == "adamw" for n, role in r.items() if params[n].ndim == 1)
    assert set(routing(params, OptimConfig()).values()) == {"adamw"}
    assert set(routing(params, OptimConfig(name="torch.optim.SGD")).values()) == {"torch.optim.SGD"}


def test_patterns_and_frozen():
    assert matches_pattern("wte.weight", "wte")
    assert not matches_pattern("wte2.weight", "wte")
    assert matches_pattern("blocks.0.mlp.w1.weight", "blocks.0.mlp")
    assert not matches_pattern("blocks.01.mlp.w1.weight", "blocks.0")
    assert matches_pattern("_orig_mod.wte.weight", "*.wte.*")
    params = llama_like()
    params["blocks.0.attn.wk.weight"].requires_grad_(False)
    r = routing(params, OptimConfig(name="muon", adamw_params=["wte", "lm_head", "*.mlp.w2.*"]))
    assert r["blocks.0.mlp.w2.weight"] == "adamw"
    assert r["blocks.0.attn.wk.weight"] == "frozen"
    opt = build_optimizer(params, OptimConfig(name="muon"))
    assert all(p is not params["blocks.0.attn.wk.weight"] for g in opt.param_groups for p in g["params"])


# ------------------------------------------------------------------------------------- equality to references


def test_muon_combination_equals_separate_torch_optimizers():
    cfg = OptimConfig(name="muon", lr=0.02, weight_decay=0.01, muon_adjust_lr="match_rms_adamw")
    ours, ref = llama_like(), llama_like()
    opt = build_optimizer(ours, cfg)
    assert isinstance(opt, CombinedOptimizer)
    assert {g["role"] for g in opt.param_groups} == {"muon", "adamw"}
    hidden = [ref[n] for n in HIDDEN]
    rest = [p for n, p in ref.items() if n not in HIDDEN]
    m = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_steps=5,
                         adjust_lr_fn="match_rms_adamw")
    a = torch.optim.AdamW(rest, lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    run(opt, ours, 4)
    for s in range(4):
        set_grads(ref, s)
        m.step()
        a.step()
    assert_same(ours, ref)
    assert not torch.equal(ours["wte.weight"], llama_like()["wte.weight"])


def test_soap_equals_pytorch_optimizer_soap_plus_adamw():
    from pytorch_optimizer import SOAP

    cfg = OptimConfig(name="soap", lr=0.01, precondition_frequency=2, max_precondition_dim=32)
    ours, ref = llama_like(), llama_like()
    opt = build_optimizer(ours, cfg)
    mats = [p for p in ref.values() if p.ndim >= 2]
    vecs = [p for p in ref.values() if p.ndim < 2]
    s_opt = SOAP(mats, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, precondition_frequency=2,
                 max_precondition_dim=32)
    a = torch.optim.AdamW(vecs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    run(opt, ours, 5)
    for s in range(5):
        set_grads(ref, s)
        s_opt.step()
        a.step()
    assert_same(ours, ref)


def test_adamw_and_import_path_equal_their_torch_classes():
    ours, ref = llama_like(), llama_like()
    opt = build_optimizer(ours, OptimConfig(lr=0.01, weight_decay=0.1, kwargs={"amsgrad": True}))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["role"] == "adamw"
    a = torch.optim.AdamW(list(ref.values()), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          amsgrad=True)
    run(opt, ours, 3)
    run(a, ref, 3)
    assert_same(ours, ref)

    ours, ref = llama_like(), llama_like()
    opt = build_optimizer(ours, OptimConfig(name="torch.optim.SGD", lr=0.05, kwargs={"momentum": 0.9}))
    assert type(opt) is torch.optim.SGD
    sgd = torch.optim.SGD(list(ref.values()), lr=0.05, momentum=0.9)
    run(opt, ours, 3)
    run(sgd, ref, 3)
    assert_same(ours, ref)


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", ["adamw", "muon", "soap"])
def test_resume_through_torch_save_is_bit_identical(name):
    cfg = OptimConfig(name=name, lr=0.01, precondition_frequency=2, max_precondition_dim=32, weight_decay=0.01)
    straight = llama_like()
    opt = build_optimizer(straight, cfg)
    run(opt, straight, 7)

    first = llama_like()
    opt1 = build_optimizer(first, cfg)
    run(opt1, first, 3)
    buf = io.BytesIO()
    torch.save({"params": {n: p.detach() for n, p in first.items()}, "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = {n: t.clone().requires_grad_() for n, t in ckpt["params"].items()}
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(ckpt["optim"])
    run(opt2, resumed, 4, start=3)
    assert_same(resumed, straight)


def test_combined_load_rejects_other_routing():
    cfg = OptimConfig(name="muon")
    sd = build_optimizer(llama_like(), cfg).state_dict()
    with pytest.raises(ValueError, match="roles"):
        build_optimizer(llama_like(), OptimConfig(name="soap")).load_state_dict(sd)
    other = build_optimizer(llama_like(), OptimConfig(name="muon", adamw_params=["wte", "lm_head", "*.w2.*"]))
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict(sd)


def test_set_lr_reaches_every_part_of_a_combined_optimizer():
    params = llama_like()
    opt = build_optimizer(params, OptimConfig(name="muon", lr=0.02))
    run(opt, params, 1)
    set_lr(opt, 0.1, 0.5)
    assert all(g["lr"] == pytest.approx(0.05) for part in opt.optimizers.values() for g in part.param_groups)
    # the lr is honoured by the parts after a state-dict round trip too
    opt.load_state_dict(opt.state_dict())
    assert {g["role"]: g["lr"] for g in opt.param_groups} == pytest.approx({"muon": 0.05, "adamw": 0.05})
    assert set(opt.state) == {p for p in params.values()}  # every parameter has state after one step


# -------------------------------------------------------------------------------------------------- schedules


def test_outer_schedules():
    c = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_multiplier(c, s, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])

    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cos, 0, 110) == pytest.approx(0.1)
    assert lr_multiplier(cos, 9, 110) == pytest.approx(1.0)
    assert lr_multiplier(cos, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(cos, 60, 110) == pytest.approx(0.55)  # midpoint of the decay: (1 + r) / 2
    assert lr_multiplier(cos, 110, 110) == pytest.approx(0.1)
    assert lr_multiplier(cos, 500, 110) == pytest.approx(0.1)
    assert 0.1 < lr_multiplier(cos, 109, 110) < 0.11

    wsd = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(wsd, 0, 100) == 1.0
    assert lr_multiplier(wsd, 79, 100) == 1.0
    assert lr_multiplier(wsd, 80, 100) == pytest.approx(1.0)  # decay starts
    assert lr_multiplier(wsd, 90, 100) == pytest.approx(0.5)
    assert lr_multiplier(wsd, 99, 100) == pytest.approx(0.05)  # last update still moves
    assert lr_multiplier(wsd, 100, 100) == pytest.approx(0.0)


def test_inner_schedules():
    T, I = 5, 8
    cwic = InnerScheduleConfig()
    for k in range(T):
        for i in range(I):
            assert inner_lr_multiplier(cwic, k, i, T, I) == pytest.approx(0.5 * (1 + math.cos(math.pi * i / I)))
    warm = InnerScheduleConfig(global_warmup=0.4, end_lr_ratio=0.1)  # 2 outer warm-up steps: 0.1 -> 0.55 -> 1
    assert inner_lr_multiplier(warm, 0, 0, T, I) == pytest.approx(0.1)
    assert inner_lr_multiplier(warm, 1, 0, T, I) == pytest.approx(0.55)
    assert inner_lr_multiplier(warm, 2, 0, T, I) == pytest.approx(1.0)
    assert inner_lr_multiplier(warm, 2, I // 2, T, I) == pytest.approx(0.55)

    assert inner_lr_multiplier(InnerScheduleConfig(name="constant"), 3, 5, T, I) == 1.0

    gc = InnerScheduleConfig(name="global_cosine", global_warmup=0.2, end_lr_ratio=0.0)  # Wg = 1 outer step
    assert inner_lr_multiplier(gc, 0, 0, T, I) == pytest.approx(0.1)
    assert inner_lr_multiplier(gc, 0, 4, T, I) == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert inner_lr_multiplier(gc, 1, 0, T, I) == pytest.approx(1.0)
    assert inner_lr_multiplier(gc, 3, 0, T, I) == pytest.approx(0.5)  # midpoint of 8..40
    assert 0 < inner_lr_multiplier(gc, T - 1, I - 1, T, I) < 0.01


def test_cosine_with_global_schedule_has_no_off_by_one():
    T, I, e = 4, 6, 0.05
    cfg = InnerScheduleConfig(name="cosine_with_global_schedule", end_lr_ratio=e)

    def G(k):
        return e + (1 - e) * 0.5 * (1 + math.cos(math.pi * k / T))

    for k in range(T):
        assert inner_lr_multiplier(cfg, k, 0, T, I) == pytest.approx(G(k))  # outer step k uses G(k)
        assert inner_lr_multiplier(cfg, k, I // 2, T, I) == pytest.approx(e + (G(k) - e) * 0.5)
    assert inner_lr_multiplier(cfg, 0, 0, T, I) == pytest.approx(1.0)
    assert inner_lr_multiplier(cfg, T - 1, 0, T, I) > e + 0.1  # the last outer step does not run at end_lr
    assert inner_lr_multiplier(cfg, T - 1, I - 1, T, I) > e

    iw = InnerScheduleConfig(name="cosine_with_global_schedule", inner_warmup=2, global_warmup=0.0)
    g1 = 0.5 * (1 + math.cos(math.pi / 4))  # G(1) with e = 0 and no global warm-up
    assert inner_lr_multiplier(iw, 1, 0, T, I) == pytest.approx(0.1 * g1)
    assert inner_lr_multiplier(iw, 1, 1, T, I) == pytest.approx(0.55 * g1)
    assert inner_lr_multiplier(iw, 1, 2, T, I) == pytest.approx(g1)


# -------------------------------------------------------------------------------------------------------- EMA


def test_ema_math_state_and_swap():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    ema = EMA(params, 0.9)
    params["a"].copy_(torch.tensor([3.0, 4.0]))
    params["b"].fill_(10.0)
    ema.update(params)
    assert torch.allclose(ema.shadow["a"], torch.tensor([1.2, 2.2]))
    assert torch.allclose(ema.shadow["b"], torch.tensor([[1.0]]))
    ema.update(params)
    assert torch.allclose(ema.shadow["a"], 0.9 * torch.tensor([1.2, 2.2]) + 0.1 * torch.tensor([3.0, 4.0]))

    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA({"a": torch.zeros(2), "b": torch.zeros(1, 1)}, 0.5)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.decay == 0.9 and other.num_updates == 2 and torch.equal(other.shadow["a"], ema.shadow["a"])

    model = torch.nn.Linear(2, 1, bias=False)
    m_ema = EMA(model, 0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    m_ema.update(model)
    with m_ema.swap_into(model):
        assert torch.allclose(model.weight, before + 1.0)
    assert torch.equal(model.weight, before + 2.0)
    with pytest.raises(ConfigError, match="decay"):
        EMA(params, 1.0)


# --------------------------------------------------------------------------------------------------- clipping


def test_clip_grad_norm_global_and_per_group():
    params = llama_like()
    opt = build_optimizer(params, OptimConfig(name="muon"))
    for n, p in params.items():
        p.grad = torch.zeros_like(p)
    params["blocks.0.attn.wq.weight"].grad[0, :2] = torch.tensor([3.0, 4.0])  # muon group norm 5
    params["wte.weight"].grad[0, 0] = 12.0  # adamw group norm 12
    total = clip_grad_norm(opt, 1.0, per_group=True)
    assert total == pytest.approx(13.0)
    assert params["blocks.0.attn.wq.weight"].grad.norm() == pytest.approx(1.0, rel=1e-5)
    assert params["wte.weight"].grad.norm() == pytest.approx(1.0, rel=1e-5)

    params["blocks.0.attn.wq.weight"].grad[0, :2] = torch.tensor([3.0, 4.0])
    params["wte.weight"].grad[0, 0] = 12.0
    assert clip_grad_norm(opt, 0.0, per_group=True) == pytest.approx(13.0)  # 0 = off: measures only
    assert clip_grad_norm(opt, 0.0) == pytest.approx(13.0)
    assert params["wte.weight"].grad[0, 0] == 12.0
    assert clip_grad_norm(opt, 2.6) == pytest.approx(13.0)  # global clip keeps proportions
    assert params["wte.weight"].grad[0, 0] == pytest.approx(2.4, rel=1e-5)
    assert params["blocks.0.attn.wq.weight"].grad[0, 0] == pytest.approx(0.6, rel=1e-5)


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("data,match", [
    ({"name": "torch.optim.Adamx"}, r"cannot import 'torch.optim.Adamx' \(did you mean 'torch.optim.Adam"),
    ({"name": "mun"}, r"did you mean 'muon'"),
    ({"name": "sgd"}, r"did you mean 'torch.optim.SGD'"),
    ({"name": "nonexistent_pkg_xyz.Opt"}, r"cannot import module"),
    ({"name": "torch.nn.Linear"}, r"not a torch.optim.Optimizer"),
    ({"lr": 0}, r"optim.lr: must be a positive number"),
    ({"lr": -1e-3}, r"optim.lr"),
    ({"betas": [0.9, 1.0]}, r"optim.betas: each beta must lie in \[0, 1\)"),
    ({"betas": [-0.1, 0.9]}, r"optim.betas"),
    ({"weight_decay": -0.1}, r"optim.weight_decay: must be >= 0"),
    ({"clip": -1.0}, r"optim.clip"),
    ({"muon_adjust_lr": "match_rms"}, r"did you mean 'match_rms_adamw'"),
    ({"name": "muon", "kwargs": {"nesterv": False}}, r"unknown keyword 'nesterv' \(did you mean 'nesterov'\?\)"),
    ({"name": "torch.optim.SGD", "kwargs": {"lr": 0.1}}, r"lr is set by optim.lr"),
    ({"name": ""}, r"optim.name: empty; give adamw, muon, soap or an import path"),
    ({"name": "adamw", "eps": None}, r"optim.eps: null, but adamw needs a value; set e.g. optim.eps=1e-8"),
    ({"eps": -1e-8}, r"optim.eps: must be >= 0, got -1e-08"),
    ({"momentum": 1.0}, r"optim.momentum: must lie in \[0, 1\), got 1.0"),
    ({"ns_steps": 0}, r"optim.ns_steps: must be >= 1, got 0"),
    ({"precondition_frequency": 0}, r"optim.precondition_frequency: must be >= 1, got 0"),
    ({"max_precondition_dim": 0}, r"optim.max_precondition_dim: must be >= 1, got 0"),
    ({"adamw_params": "wte"}, r"optim.adamw_params: expected a list, got 'wte'"),
    ({"kwargs": [1, 2]}, r"optim.kwargs: expected a mapping, got \[1, 2\]"),
    ({"name": "torch.optim."}, r"optim.name: 'torch.optim.' is not an import path"),
    ({"name": "torch.optim.sgd"}, r"did you mean 'torch.optim.SGD'"),
    ({"name": "torch.optm.SGD"}, r"cannot import module 'torch.optm' of 'torch.optm.SGD' \(did you mean "
                                 r"'torch.optim.SGD'\?\)"),
])
def test_bad_optim_config_raises_one_line_config_error(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(OptimConfig, data, prefix="optim")
    assert "\n" not in str(info.value)


def test_an_optimizer_module_whose_own_import_fails_names_what_is_missing(tmp_path, monkeypatch):
    """optim.name=brokenopt.Lion where brokenopt.py (in the working directory) imports a package that is not
    installed: the error names that import, not a missing brokenopt."""
    (tmp_path / "brokenopt.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "brokenopt", raising=False)
    with pytest.raises(ConfigError) as err:
        from_dict(OptimConfig, {"name": "brokenopt.Lion"}, prefix="optim")
    assert "importing 'brokenopt' of 'brokenopt.Lion' failed: No module named 'not_installed_pkg_xyz'" in str(err.value)
    assert "install what it needs" in str(err.value) and "\n" not in str(err.value)


def test_bad_schedule_configs():
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(ScheduleConfig, {"warmup_steps": -1}, prefix="schedule")
    with pytest.raises(ConfigError, match="decay_fraction"):
        from_dict(ScheduleConfig, {"name": "wsd", "decay_fraction": 1.5}, prefix="schedule")
    with pytest.raises(ConfigError, match="did you mean 'global_cosine'"):
        from_dict(InnerScheduleConfig, {"name": "global_cosin"}, prefix="inner_schedule")
    with pytest.raises(ConfigError, match="end_lr_ratio"):
        from_dict(InnerScheduleConfig, {"end_lr_ratio": 2.0}, prefix="inner_schedule")
    assert from_dict(OptimConfig, {"name": "AdamW", "betas": [0.9, 0.99]}).name == "adamw"
