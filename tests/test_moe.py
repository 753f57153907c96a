"""Mixture-of-Experts layers: routing, dispatch, balancing, parameter counts, compile, telemetry."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

DIM = 64


def make(tiny_config, layer=0, **env):
    h = tiny_config(MODEL_DIM=DIM, MLP_MULT=4, **env)
    torch.manual_seed(0)
    return tg.make_mlp(h.model, layer), h


def randomise(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def reference_routed(m, x):
    """Plain per-expert loop over the same routing decisions (no sort, no grouped product)."""
    x2 = x.reshape(-1, x.size(-1))
    _, _, choice, gate = m.route(x2)
    out = torch.zeros_like(x2)
    for slot in range(m.k):
        for e in range(m.E):
            rows = choice[:, slot] == e
            hidden = tg.mlp_act(x2[rows] @ m.up[e].T, m.act)
            out[rows] += gate[rows, slot, None] * (hidden @ m.down[e].T)
    out = out.view(x.shape)
    return out + m.shared(x) if m.shared is not None else out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_gives_exactly_k_nonzero_gates(tiny_config, k):
    m, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=4, TOP_K=k)
    randomise(m)
    _, _, choice, gate = m.route(torch.randn(50, DIM))
    dense_gates = torch.zeros(50, 4).scatter(1, choice, gate)
    assert ((dense_gates != 0).sum(1) == k).all()
    assert (choice.sort(1).values.diff(dim=1) != 0).all()  # k distinct experts per token


def test_switch_aux_loss_uniform_and_collapsed():
    E, T = 8, 64
    uniform_counts = torch.full((E,), T // E)
    assert tg.switch_aux_loss(uniform_counts, torch.full((T, E), 1 / E), 1).item() == pytest.approx(1.0)
    collapsed_counts = torch.zeros(E, dtype=torch.long)
    collapsed_counts[3] = T
    collapsed_probs = F.one_hot(torch.full((T,), 3), E).float()
    assert tg.switch_aux_loss(collapsed_counts, collapsed_probs, 1).item() == pytest.approx(E)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("mode", ["soft", "topk", "shared_routed"])
def test_parameter_matched_modes_equal_dense_plus_router(tiny_config, mode):
    dense, h = make(tiny_config, MOE_MODE="none")
    moe, _ = make(tiny_config, MOE_MODE=mode, NUM_EXPERTS=4)
    assert count(moe) == count(dense) + 4 * DIM


def test_full_size_experts_scale_with_expert_count(tiny_config):
    dense, h = make(tiny_config, MOE_MODE="none")
    for E in (2, 4):
        moe, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=E, EXPERT_HIDDEN=h.model.mlp_hidden)
        assert count(moe) == E * count(dense) + E * DIM


@pytest.mark.parametrize(
    "mode,dispatch", [("topk", "grouped"), ("topk", "capacity"), ("shared_routed", "grouped")]
)
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_matches_per_expert_loop(tiny_config, mode, dispatch, k):
    m, _ = make(
        tiny_config, MOE_MODE=mode, NUM_EXPERTS=4, TOP_K=k, MOE_DISPATCH=dispatch, CAPACITY_FACTOR=4.0
    )
    randomise(m)
    x = torch.randn(3, 20, DIM, requires_grad=True)
    out = m(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], grad_out)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_routed(m, x_ref)
    ref_grads = torch.autograd.grad(ref, [x_ref, *m.parameters()], grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_capacity_drops_overflow_and_counts_it(tiny_config):
    m, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=4, MOE_DISPATCH="capacity", CAPACITY_FACTOR=0.5)
    randomise(m)
    m.train()
    x = torch.randn(64, DIM)
    out = m(x)
    dropped = tg.RoutingStats.unpack(m.stats, 4).dropped
    _, _, choice, _ = m.route(x)
    counts = torch.bincount(choice[:, 0], minlength=4)
    capacity = math.ceil(0.5 * 64 / 4)
    assert dropped == (counts - capacity).clamp_min(0).sum().item() > 0
    # Dropped tokens pass nothing through the layer: exactly that many output rows are zero.
    assert (out.abs().sum(1) == 0).sum().item() == dropped


def test_soft_with_one_expert_and_soft_at_init_equal_dense(tiny_config):
    dense, h = make(tiny_config, MOE_MODE="none")
    randomise(dense)
    for E in (1, 4):
        # one expert is refused as a run's knob (it is the dense MLP), so that module is built directly
        h = tiny_config(MODEL_DIM=DIM, MLP_MULT=4, MOE_MODE="soft", NUM_EXPERTS=4)
        cfg = dataclasses.replace(h.model, num_experts=E, expert_mlp_hidden=4 * DIM // E)
        torch.manual_seed(0)
        soft = tg.make_mlp(cfg, 0)
        with torch.no_grad():
            soft.up.copy_(dense.fc.weight.view(E, -1, DIM))
            soft.down.copy_(dense.proj.weight.view(DIM, E, -1).transpose(0, 1))
        if E == 1:
            with torch.no_grad():  # with one expert the router cannot matter
                soft.router_weight.normal_()
        else:
            assert soft.router_weight.abs().sum() == 0  # zero-initialised router: uniform gates
        x = torch.randn(2, 10, DIM)
        torch.testing.assert_close(soft(x), dense(x), rtol=1e-5, atol=1e-6)


def test_top1_softmax_router_gets_task_gradient(tiny_config):
    m, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=4, TOP_K=1, MOE_AUX_LOSS_COEF=0, ROUTER_Z_COEF=0)
    randomise(m)
    m.train()
    m(torch.randn(40, DIM)).square().sum().backward()
    assert not m.aux_terms
    assert m.router_weight.grad.abs().sum() > 0


def test_bias_update_moves_skewed_load_towards_balance(tiny_config):
    m, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=4)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].mlp = m
    torch.manual_seed(1)
    with torch.no_grad():
        m.router_weight.normal_(0, 0.3)
        m.router_weight[0, 0] = 3.0  # tokens with a positive first channel strongly prefer expert 0
    x = torch.randn(400, DIM)
    x[:, 0] = x[:, 0].abs() + 0.05
    m.train()
    shares = []
    for _ in range(60):
        m(x)
        stats = tg.collect_routing_stats(model, 0.02, 1)
        shares.append(stats[0, :4].max().item() / 400)
    assert shares[0] > 0.5
    assert max(shares[-10:]) < 0.3  # near the balanced 0.25
    assert abs(m.router_bias.sum().item()) < 1e-5  # re-centred
    assert m.stats.abs().sum() == 0  # reset after collection
    assert tg.collect_routing_stats(model, 0.0, 1)[0, :4].sum() == 0  # nothing ran since


@pytest.mark.parametrize(
    "mode,dispatch",
    [("soft", "grouped"), ("topk", "grouped"), ("topk", "capacity"), ("shared_routed", "grouped")],
)
@pytest.mark.slow
def test_fullgraph_compile_without_recompiles(tiny_config, mode, dispatch):
    from torch._dynamo.utils import counters

    m, _ = make(tiny_config, MOE_MODE=mode, MOE_DISPATCH=dispatch, ROUTER_NOISE=0.1)
    m = randomise(m).to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    routings = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(2, 32, DIM, dtype=torch.bfloat16, requires_grad=True)
        out = compiled(x)
        assert len(m.aux_terms) == (1 if mode == "soft" else 2)  # z-loss (+ Switch aux), set inside the graph
        (out.float().square().mean() + sum(m.aux_terms)).backward()
        routings.append(m.stats[:4].clone())
        m.stats.zero_()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not torch.equal(routings[0], routings[1])  # the routings really differed


def test_telemetry_lines_and_collapse_warning(tiny_config):
    m, _ = make(tiny_config, MOE_MODE="topk", NUM_EXPERTS=4)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].mlp = m
    stats = torch.zeros(1, 4 + 6)
    stats[0, :4] = torch.tensor([90.0, 8.0, 2.0, 0.0])
    stats[0, 4 + tg.RoutingStats._fields.index("tokens") - 1] = 100
    stats[0, 4 + tg.RoutingStats._fields.index("calls") - 1] = 1
    assert tg.RoutingStats.unpack(stats[0], 4).tokens == 100
    summary = tg.routing_summary(model, stats)[0]
    assert summary["load"] == pytest.approx([0.9, 0.08, 0.02, 0.0])
    assert summary["dead"] == 2  # 2% and 0% are under a tenth of the uniform 25%
    assert summary["max_over_mean"] == pytest.approx(3.6)
    assert summary["load_std"] == pytest.approx(float(np.std([0.9, 0.08, 0.02, 0.0])))
    lines = tg.routing_log_lines(tg.routing_summary(model, stats))
    assert lines[0].startswith("moe layer:0 load:0.900,0.080,0.020,0.000")
    assert "WARNING" in lines[1] and "90.0%" in lines[1]
    stats[0, :4] = 25.0
    assert len(tg.routing_log_lines(tg.routing_summary(model, stats))) == 1


def test_aux_losses_reach_training_loss_but_not_eval(tiny_config):
    h = tiny_config(MOE_MODE="topk", MOE_AUX_LOSS_COEF=0.5, ROUTER_Z_COEF=0.1)
    model = tg.GPT(h.model)
    randomise(model, 0.05)
    x = torch.randint(0, 1024, (2, 16))
    loss, ce = model(x, x)
    assert loss.item() > ce.item() + 0.5 * h.model.num_layers * 0.9  # Switch aux >= ~1 per layer
    model.eval()
    loss_eval, ce_eval = model(x, x)
    assert loss_eval.item() == pytest.approx(ce_eval.item())


def test_routers_and_controls_survive_artifact_bit_exact(tiny_config, tmp_path):
    h = tiny_config(MOE_MODE="topk", ZSTD_LEVEL=1)
    model = randomise(tg.GPT(h.model), 0.05)
    with torch.no_grad():
        for _, m in tg.moe_layers(model):
            m.router_bias.normal_()
    path = str(tmp_path / "a.ptz")
    tg.export_artifact(model, h.quant, path, 0, lambda msg: None)
    _, state = tg.read_artifact(path)
    kept = [n for n, t in state.items() if tg.param_class(n, t) in ("router", "control")]
    assert any("router_weight" in n for n in kept) and any("router_bias" in n for n in kept)
    original = tg.artifact_state(model)
    for name in kept:
        assert torch.equal(state[name], original[name].half().float()), name


# --- sigma-MoE: the entropy regulariser, expert dropout and the preset (tools/common.py SIGMA_MOE) -------
def sigma_env(**env):
    from tools.common import SIGMA_MOE

    return {**SIGMA_MOE, **{k: str(v) for k, v in env.items()}}


def numpy_batch_mean_entropy(logits: torch.Tensor) -> float:
    """The oracle: softmax per token, mean over tokens, Shannon entropy in nats."""
    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    mean = (p / p.sum(1, keepdims=True)).mean(0)
    return float(-(mean * np.log(mean)).sum())


def test_batch_mean_entropy_matches_the_oracle_and_its_bounds():
    torch.manual_seed(0)
    logits = torch.randn(40, 8) * 3
    assert tg.batch_mean_entropy(logits).item() == pytest.approx(numpy_batch_mean_entropy(logits), rel=1e-5)
    assert tg.batch_mean_entropy(torch.zeros(10, 8)).item() == pytest.approx(math.log(8))
    confident = torch.full((10, 8), -50.0)
    confident[:, 3] = 50.0  # every token sure of expert 3: the batch mean is one-hot
    assert tg.batch_mean_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.full((8, 8), -50.0).fill_diagonal_(50.0)  # each token sure of its own expert
    assert tg.batch_mean_entropy(spread).item() == pytest.approx(math.log(8), rel=1e-6)


def test_entropy_regulariser_joins_the_loss_and_raises_the_batch_mean_entropy(tiny_config):
    m, _ = make(tiny_config, **sigma_env(NUM_EXPERTS=8, TOP_K=2, EXPERT_DROPOUT=0, ROUTER_ENTROPY_COEF=0.5))
    randomise(m)
    with torch.no_grad():
        m.router_weight[2] += 0.5 * torch.randn(DIM).sign()  # a router that prefers one expert
    x = torch.randn(4, 16, DIM)
    tokens = x.reshape(-1, DIM)
    before = numpy_batch_mean_entropy(m.router_logits(tokens).detach())
    m(x)
    assert len(m.aux_terms) == 1  # the preset turns the Switch aux and z-loss off
    assert m.aux_terms[0].item() == pytest.approx(-0.5 * before, rel=1e-5)
    m.router_weight.grad = None
    m.aux_terms[0].backward()
    with torch.no_grad():
        m.router_weight -= 0.1 * m.router_weight.grad  # one plain gradient step on the regulariser alone
    after = numpy_batch_mean_entropy(m.router_logits(tokens).detach())
    assert after > before + 1e-3, (before, after)
    m.eval()
    m(x)
    assert m.aux_terms == []  # a training term only


def test_without_the_coefficient_no_entropy_term(tiny_config):
    m, _ = make(tiny_config, **sigma_env(ROUTER_ENTROPY_COEF=0))
    m(torch.randn(2, 8, DIM))
    assert m.aux_terms == []


@pytest.mark.parametrize("dispatch", ["grouped", "capacity"])
def test_dropped_experts_get_no_tokens_and_no_gradient(tiny_config, dispatch):
    m, _ = make(tiny_config, **sigma_env(NUM_EXPERTS=8, TOP_K=2, EXPERT_DROPOUT=0.5, MOE_DISPATCH=dispatch))
    m.capacity_factor = 8.0  # room for every token: only dropout keeps an expert empty
    randomise(m)
    x = torch.randn(4, 32, DIM)
    torch.manual_seed(5)
    dropped = m.draw_dropped_experts(x.device)  # the draw the forward below repeats
    assert 0 < dropped.sum() <= m.E - m.k
    torch.manual_seed(5)
    m.stats.zero_()
    m(x).square().sum().backward()
    load = tg.RoutingStats.unpack(m.stats, m.E).load
    assert (load[dropped] == 0).all() and (load[~dropped] > 0).all()
    assert (m.up.grad[dropped] == 0).all() and (m.down.grad[dropped] == 0).all()
    assert (m.up.grad[~dropped].flatten(1).abs().sum(1) > 0).all()
    # evaluation never drops: with the same seed every expert is chosen by some token
    m.eval()
    torch.manual_seed(5)
    _, _, choice, _ = m.route(x.reshape(-1, DIM))
    assert set(choice.flatten().tolist()) == set(range(m.E))


def test_expert_dropout_always_keeps_top_k_experts(tiny_config):
    m, _ = make(tiny_config, **sigma_env(NUM_EXPERTS=8, TOP_K=3, EXPERT_DROPOUT=0.9))
    kept = []
    for seed in range(200):
        torch.manual_seed(seed)
        kept.append(int((~m.draw_dropped_experts(torch.device("cpu"))).sum()))
    assert min(kept) == 3 and max(kept) > 3
    # at p = 0.9 a draw keeps about 0.1 * 8 experts, raised to 3: the mean is near 3, never below
    assert 3 <= np.mean(kept) < 4


@pytest.mark.parametrize(
    "env,message",
    [
        ({"MOE_MODE": "soft", "ROUTER_ENTROPY_COEF": "0.01"}, "ROUTER_ENTROPY_COEF=0.01: needs a top-k"),
        ({"MOE_MODE": "soft", "EXPERT_DROPOUT": "0.1"}, "EXPERT_DROPOUT=0.1: needs a top-k"),
        ({"MOE_MODE": "topk", "NUM_EXPERTS": "4", "TOP_K": "4", "EXPERT_DROPOUT": "0.1"}, "leaves no expert"),
        ({"MOE_MODE": "topk", "EXPERT_DROPOUT": "0.95"}, "EXPERT_DROPOUT=0.95: expected 0..0.9"),
        ({"MOE_MODE": "topk", "ROUTER_ENTROPY_COEF": "-1"}, "ROUTER_ENTROPY_COEF=-1.0: expected >= 0"),
        ({"EXPERT_DROPOUT": "0.1"}, "no effect with MOE_MODE=none"),
    ],
)
def test_sigma_knobs_are_validated(tiny_config, env, message):
    with pytest.raises(tg.ConfigError, match=message):
        tiny_config(**env)


def test_sigma_preset_at_the_default_width_is_16_experts_of_128_and_parameter_matched():
    from torch._subclasses.fake_tensor import FakeTensorMode

    dense_h, sigma_h = tg.load_config({}), tg.load_config(sigma_env())
    assert (sigma_h.model.num_experts, sigma_h.model.top_k, sigma_h.model.expert_mlp_hidden) == (16, 4, 128)
    with FakeTensorMode():
        dense, sigma = tg.fake_model(dense_h.model, "cpu"), tg.fake_model(sigma_h.model, "cpu")
        routers = sigma_h.model.num_layers * 16 * sigma_h.model.model_dim
        assert count(sigma) == count(dense) + routers
        assert all(isinstance(m, tg.RoutedMoE) for _, m in tg.moe_layers(sigma))


def test_sigma_preset_routers_fp16_experts_quantized_per_expert(tiny_config, tmp_path):
    h = tiny_config(**sigma_env(ZSTD_LEVEL=1))
    model = randomise(tg.GPT(h.model), 0.05)
    x = torch.randint(0, 1024, (4, 64))
    hessians, _ = tg.collect_hessians(model.eval(), [(x, None)], 1)
    assert hessians["blocks.0.mlp.up"].shape == (
        16,
        h.model.model_dim,
        h.model.model_dim,
    )  # one Hessian per expert
    path = str(tmp_path / "a.ptz")
    tg.export_artifact(model, h.quant, path, 0, lambda msg: None, hessians)
    config, state = tg.read_artifact(path)
    assert config["ROUTER_SCORE"] == "sigmoid" and config["NUM_EXPERTS"] == 16
    original = tg.artifact_state(model)
    name = "blocks.0.mlp.router_weight"
    assert tg.param_class(name, state[name]) == "router"
    assert torch.equal(state[name], original[name].half().float())
    up = state["blocks.0.mlp.up"]
    assert up.shape == (16, h.model.expert_mlp_hidden, h.model.model_dim) and not torch.equal(
        up, original["blocks.0.mlp.up"]
    )


@pytest.mark.slow
def test_sigma_preset_compiles_fullgraph_without_recompiles(tiny_config):
    from torch._dynamo.utils import counters

    m, _ = make(tiny_config, **sigma_env(EXPERT_DROPOUT=0.3))
    m = randomise(m).to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    loads = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(2, 32, DIM, dtype=torch.bfloat16, requires_grad=True)
        out = compiled(x)
        assert len(m.aux_terms) == 1  # the entropy term, set inside the graph
        (out.float().square().mean() + sum(m.aux_terms)).backward()
        loads.append(m.stats[: m.E].clone())
        m.stats.zero_()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert any((load == 0).any() for load in loads)  # dropout emptied experts inside the compiled graph
    assert not torch.equal(loads[0], loads[1])


def test_sigma_preset_telemetry_reports_every_expert(tiny_config):
    h = tiny_config(**sigma_env(EXPERT_DROPOUT=0.5))
    model = randomise(tg.GPT(h.model), 0.05).train()
    torch.manual_seed(1)
    model(torch.randint(0, 1024, (2, 64)), torch.randint(0, 1024, (2, 64)))
    summary = tg.routing_summary(model, tg.collect_routing_stats(model, 0.0, 1))
    assert [r["layer"] for r in summary] == list(range(h.model.num_layers))
    for row, line in zip(summary, tg.routing_log_lines(summary)):
        assert len(row["load"]) == 16 and sum(row["load"]) == pytest.approx(1.0)
        assert row["dead"] >= 1  # half the experts dropped on this step: they show as empty
        assert len(line.split(" load:")[1].split(" ")[0].split(",")) == 16


@pytest.mark.slow
def test_sigma_preset_whole_compiled_run_recompiles_only_at_the_loop_switch(tmp_path):
    """A whole tiny run of the preset with the record stack's loop: dynamo logs every recompile (aot_eager
    for inductor: the same guards and graphs). Expert dropout draws a new mask every step."""
    from conftest import STACK_ENV, run_compiled

    result, recompiles = run_compiled(
        tmp_path, {**STACK_ENV, **sigma_env(), "ITERATIONS": "12", "RUN_ID": "s"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer_loop:enabled" in result.stdout
    assert recompiles.count("forward") == 1, result.stderr[-3000:]  # the loop switch only
    loads = re.findall(r"^moe layer:\d+ load:([\d.,]+) ", result.stdout, re.M)
    assert loads and all(len(line.split(",")) == 16 for line in loads)
