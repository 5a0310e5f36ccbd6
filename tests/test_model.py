import pytest
import torch
from conftest import randomize_parameters

from gnlm.config import ConfigError
from gnlm.model import GPT, PRESETS, count_parameters, describe, get_preset, loss_fn, resolve_model_config


@pytest.mark.parametrize("name,expected", [("45m", 45_363_712), ("150m", 134_142_720)])
def test_paper_presets_have_the_papers_parameter_counts(name, expected):
    with torch.device("meta"):
        model = GPT(get_preset(name))
    assert count_parameters(model) == expected


def test_cpu_presets_are_small():
    with torch.device("meta"):
        nano, micro = GPT(get_preset("nano")), GPT(get_preset("micro"))
    assert 100_000 <= count_parameters(nano) <= 300_000
    assert 1_000_000 <= count_parameters(micro) <= 3_000_000


def test_block_parameter_count_matches_formula():
    cfg = get_preset("45m")
    with torch.device("meta"):
        model = GPT(cfg)
    d, dff = cfg.d_model, cfg.d_ff
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert block == 4 * d * d + 2 * d * dff + 2 * d + 4 * d


def test_model_is_causal():
    torch.manual_seed(0)
    model = GPT(get_preset("nano", n_layers=2))
    for backend in ("sdpa", "math"):
        model.attention = backend
        x = torch.randint(0, 4096, (2, 16))
        y = x.clone()
        y[:, 9] = (y[:, 9] + 1) % 4096
        with torch.no_grad():
            a, b = model(x), model(y)
        assert torch.equal(a[:, :9], b[:, :9])
        assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_sdpa_and_math_backends_agree():
    torch.manual_seed(0)
    model = GPT(get_preset("micro"))
    x = torch.randint(0, 4096, (3, 128))
    with torch.no_grad():
        model.attention = "sdpa"
        a = model(x)
        model.attention = "math"
        b = model(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_init_follows_initializer_range():
    torch.manual_seed(0)
    cfg = get_preset("micro", initializer_range=0.5)
    model = GPT(cfg)
    assert abs(model.wte.weight.std().item() - 0.5) < 0.01
    assert abs(model.blocks[0].attn.wq.weight.std().item() - 0.5 / cfg.d_model ** 0.5) < 0.002
    assert abs(model.blocks[0].mlp.w2.weight.std().item() - 0.5 / cfg.d_ff ** 0.5) < 0.001
    assert torch.equal(model.blocks[0].attn.q_norm.bias, torch.zeros(cfg.d_model))
    assert torch.equal(model.ln_f.weight, torch.ones(cfg.d_model))


def test_sequence_longer_than_max_is_rejected():
    model = GPT(get_preset("nano", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'micro'"):
        get_preset("mikro")


def test_preset_fields_can_be_overridden():
    cfg = resolve_model_config({"preset": "micro", "n_layers": 2, "attention": "math"})
    assert (cfg.n_layers, cfg.d_model, cfg.attention) == (2, PRESETS["micro"].d_model, "math")


def test_bad_head_count_is_rejected():
    with pytest.raises(ConfigError, match="divisible"):
        resolve_model_config({"preset": "micro", "n_heads": 3})


def test_describe_lists_every_parameter():
    model = GPT(get_preset("nano"))
    text = describe(model)
    assert "287,136" in text
    for name, _ in model.named_parameters():
        assert name in text


def test_initial_loss_is_finite_and_learnable():
    torch.manual_seed(0)
    model = GPT(get_preset("nano"))
    x = torch.randint(0, 64, (4, 16))
    loss = loss_fn(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def gn_stage_setup():
    """A float64 nano GPT off its initialisation (random norm weights and QK-norm biases, rescaled matrix rows):
    at init every norm weight is 1 and every bias 0, where a tangent rule that drops a norm weight is exact."""
    torch.manual_seed(0)
    model = randomize_parameters(GPT(get_preset("nano", n_layers=2)).double(), seed=0)
    model.attention = "math"
    x = torch.randint(0, 4096, (2, 16))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, x, params


def test_gn_stage_setup_is_off_initialisation():
    """The stage tests below would not see a dropped norm weight or bias at init (weights 1, biases 0)."""
    _, _, params = gn_stage_setup()
    init = GPT(get_preset("nano", n_layers=2)).double()
    for name, p in params.items():
        if p.ndim == 1:
            ref = torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p)
            assert (p - ref).abs().min() > 0 and (p - ref).std() > 0.2, name
    for name, p in init.named_parameters():
        if p.ndim == 2:  # matrix rows rescaled unevenly: row norms spread more than at init
            spread = lambda w: float(w.detach().norm(dim=1).log().std())
            assert spread(params[name]) > spread(p) + 0.1, name


def test_gn_stages_chain_to_forward():
    model, x, params = gn_stage_setup()
    stages = model.gn_stages()
    assert [p for p, _ in stages] == ["wte.", "blocks.0.", "blocks.1.", "ln_f.", "lm_head."]
    h = x
    with torch.no_grad():
        for prefix, linearize in stages:
            h, _ = linearize(h, {k: v for k, v in params.items() if k.startswith(prefix)})
        assert torch.equal(h, model(x))
        # the stage reads the parameters it is given, not the module's
        h_in = x
        for _, linearize in stages[:-1]:
            h_in, _ = linearize(h_in, params)
        torch.testing.assert_close(stages[-1][1](h_in, {"lm_head.weight": 2 * params["lm_head.weight"]})[0],
                                   2 * model(x))


def test_gn_stage_tangent_maps_match_torch_func_jvp():
    """Each stage's hand-written tangent map against torch.func.jvp of the stage: an input tangent with frozen
    weights, parameter tangents alone, and both together."""
    from torch.func import jvp

    model, x, params = gn_stage_setup()
    gen = torch.Generator().manual_seed(1)
    rand = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)
    h = x
    for prefix, linearize in model.gn_stages():
        own = {k: v for k, v in params.items() if k.startswith(prefix)}
        h_out, stage_jvp = linearize(h, own)

        def f(h_, p_, linearize=linearize, own=own):
            return linearize(h_, {**own, **p_})[0]

        some = {k: rand(v) for k, v in list(own.items())[::2]}  # half of the parameters move, the rest are frozen
        at = {k: own[k] for k in some}
        _, want = jvp(lambda p_, h=h: f(h, p_), (at,), (some,))
        torch.testing.assert_close(stage_jvp(None, some), want, rtol=1e-10, atol=1e-12)
        if prefix != "wte.":  # the ids have no tangent
            h_t = rand(h)
            _, want = jvp(lambda h_: f(h_, {}), (h,), (h_t,))
            torch.testing.assert_close(stage_jvp(h_t, {}), want, rtol=1e-10, atol=1e-12)
            _, want = jvp(f, (h, at), (h_t, some))
            torch.testing.assert_close(stage_jvp(h_t, some), want, rtol=1e-10, atol=1e-12)
        h = h_out

def test_loss_is_computed_in_the_logits_precision_and_never_below_float32():
    """float64 logits give a float64 loss (a float64 run's loss and every real-loss difference are not rounded to
    float32); half-precision logits are upcast to float32 first."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    want = -(logits.log_softmax(-1).gather(-1, targets[..., None])).mean()
    got = loss_fn(logits, targets)
    assert got.dtype == torch.float64 and abs(float(got - want)) < 1e-14
    half = loss_fn(logits.to(torch.bfloat16), targets)
    assert half.dtype == torch.float32
    assert float(half) == float(F.cross_entropy(logits.to(torch.bfloat16).float().reshape(-1, 7), targets.reshape(-1)))
