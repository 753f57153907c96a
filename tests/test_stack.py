"""The April-2026 record stack: one test per mechanism showing what it does, the MoE
compositions, the loop switch under torch.compile, DRY_RUN and the end-to-end tiny run."""

import json
import math
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REPO, STACK_ENV, run_compiled, run_train

MOE_MODES = ["none", "soft", "topk", "shared_routed"]


def stack(**env):
    return tg.load_config({**STACK_ENV, **{k: str(v) for k, v in env.items()}})


def randomised(model, std=0.05, seed=0):
    """Random weights everywhere (zero-initialised projections would hide every mechanism); a
    parameter's values depend on its name only, so models that differ in one knob share the rest."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            p.normal_(0, std)
    return model


def tokens(batch=2, length=32, seed=1):
    torch.manual_seed(seed)
    return torch.randint(2, 1024, (batch, length))  # no BOS unless a test puts one


def capture_inputs(module):
    """Records the first positional input of every call of `module`."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen, handle


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_are_the_record_stack():
    h = tg.load_config({})
    assert (
        h.data.vocab_size,
        h.model.num_layers,
        h.model.model_dim,
        h.model.num_heads,
        h.model.num_kv_heads,
        h.model.mlp_mult,
    ) == (
        8192,
        11,
        512,
        8,
        4,
        4.0,
    )
    assert h.data.data_path.endswith("fineweb10B_sp8192") and h.data.tokenizer_path.endswith(
        "fineweb_8192_bpe.model"
    )
    assert (
        h.model.mlp_act,
        h.model.xsa_last_n,
        h.model.rope_dims,
        h.model.ln_scale,
        h.model.qk_gain_init,
    ) == (
        "leaky_relu2",
        11,
        16,
        True,
        5.0,
    )
    assert (
        h.model.parallel_start_layer,
        h.model.num_loops,
        h.model.loop_start,
        h.model.loop_end,
        h.optim.enable_looping_at,
    ) == (
        8,
        2,
        3,
        5,
        0.35,
    )
    assert (
        h.model.sparse_attn_gate_enabled
        and h.model.smear_gate
        and h.model.bigram_vocab_size == 0
        and h.model.moe_mode == "none"
    )
    assert (
        h.optim.min_lr,
        h.optim.warmdown_frac,
        h.optim.beta2,
        h.optim.muon_wd,
        h.optim.embed_wd,
        h.optim.adam_wd,
    ) == (
        0.1,
        0.85,
        0.99,
        0.095,
        0.085,
        0.02,
    )
    assert h.optim.muon_row_normalize and h.optim.matrix_lr == 0.026 and h.optim.muon_momentum == 0.97
    # EMA stays a fraction of the run: the record's 0.9965 per step at its ~4,930 steps.
    assert h.optim.ema_decay is None and math.exp(-1 / 4930 / tg.EMA_RUN_HORIZON) == pytest.approx(
        0.9965, abs=2e-4
    )


def test_default_shape_matches_the_record_parameter_count():
    with torch.device("meta"):
        model = tg.GPT(tg.load_config({"MOE_MODE": "none"}).model)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 35_945_671) / 35_945_671 < 1e-3  # the record's model_params (its log)
    assert model.orders[1] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]  # the record's loop order


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"LOOP_END": "4"}, "LOOP_START=1, LOOP_END=4: need 0 <= LOOP_START <= LOOP_END < NUM_LAYERS=4"),
        ({"LOOP_START": "2", "LOOP_END": "1"}, "LOOP_START=2, LOOP_END=1"),
        ({"PARALLEL_START_LAYER": "2"}, "PARALLEL_START_LAYER=2: must be 0 (off) or at least 3"),
        ({"GATE_WINDOW": "65"}, "GATE_WINDOW=65: must be in 1..MODEL_DIM=64"),
        ({"MIN_LR": "1.5"}, "MIN_LR=1.5: expected 0..1"),
        ({"ENABLE_LOOPING_AT": "-0.1"}, "ENABLE_LOOPING_AT=-0.1: expected 0..1"),
        ({"NUM_LOOPS": "-1"}, "NUM_LOOPS=-1: expected >= 0"),
        ({"XSA_LAST_N": "-1"}, "XSA_LAST_N=-1: expected >= 0"),
        ({"EMBED_WD": "-0.1"}, "EMBED_WD=-0.1: expected >= 0"),
        ({"MUON_ROW_NORMALIZE": "yes"}, "MUON_ROW_NORMALIZE='yes': expected 0 or 1"),
    ],
)
def test_bad_stack_knobs_fail_naming_the_knob(env, needle):
    with pytest.raises(tg.ConfigError) as err:
        stack(**env)
    assert needle in str(err.value)


# --- model mechanisms --------------------------------------------------------------------------


def test_leaky_relu2_keeps_a_quarter_of_negative_squares():
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0])
    assert torch.equal(tg.mlp_act(x, "leaky_relu2"), torch.tensor([1.0, 0.0625, 0.0, 9.0]))
    assert torch.equal(tg.mlp_act(x, "relu2"), torch.tensor([0.0, 0.0, 0.0, 9.0]))


def attention_heads(h, layer, x):
    """(attention module with identity output projection, per-head output (B, H, T, D), values)."""
    attn = randomised(tg.Attention(h.model, layer), std=0.2)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(h.model.model_dim))
    B, T, _ = x.shape
    y = attn(x).view(B, T, h.model.num_heads, h.model.head_dim).transpose(1, 2)
    v = attn.c_v(x).view(B, T, h.model.num_kv_heads, h.model.head_dim).transpose(1, 2)
    return attn, y, v


def test_xsa_removes_each_heads_component_along_its_own_value():
    x = torch.randn(2, 16, 64)
    h = stack(SPARSE_ATTN_GATE_ENABLED=0, XSA_LAST_N=2)
    assert [tg.Attention(h.model, i).xsa for i in range(4)] == [
        False,
        False,
        True,
        True,
    ]  # the last N layers
    _, y, v = attention_heads(h, 3, x)
    unit = F.normalize(v, dim=-1).repeat_interleave(h.model.num_heads // h.model.num_kv_heads, dim=1)
    assert (y * unit).sum(-1).abs().max() < 1e-5  # nothing left along the token's own value
    _, y_plain, _ = attention_heads(h, 0, x)  # same seed, same weights, no XSA
    assert (y_plain * unit).sum(-1).abs().mean() > 0.01
    torch.testing.assert_close(y, y_plain - (y_plain * unit).sum(-1, keepdim=True) * unit)


def test_sparse_attention_gate_scales_each_head_by_a_window_of_the_input():
    x = torch.randn(2, 16, 64)
    gated, ungated = stack(XSA_LAST_N=0), stack(XSA_LAST_N=0, SPARSE_ATTN_GATE_ENABLED=0)
    attn, y, _ = attention_heads(gated, 0, x)
    _, y_plain, _ = attention_heads(ungated, 0, x)
    expected = torch.sigmoid(gated.model.sparse_attn_gate_scale * x[..., :12] @ attn.attn_gate.T)  # (B, T, H)
    torch.testing.assert_close(y, y_plain * expected.transpose(1, 2).unsqueeze(-1))
    assert tuple(attn.attn_gate.shape) == (4, 12)  # heads x GATE_WINDOW
    fresh = tg.Attention(gated.model, 0)
    assert fresh.attn_gate.abs().sum() == 0  # zero init: every head starts at sigmoid(0) = 0.5


def test_ln_scale_shrinks_block_inputs_by_depth():
    for ln_scale, expected in ((1, [1, 2**-0.5, 3**-0.5, 0.5]), (0, [1, 1, 1, 1])):
        model = randomised(tg.GPT(stack(LN_SCALE=ln_scale, PARALLEL_START_LAYER=0, NUM_LOOPS=0).model))
        hooks = [capture_inputs(block.attn) for block in model.blocks]
        model.logits(tokens())
        rms = [seen[0].square().mean(-1).sqrt().mean().item() for seen, _ in hooks]
        assert rms == pytest.approx(expected, rel=1e-3)


def test_rope_dims_default_is_partial_and_small_heads_rotate_everything():
    assert tg.load_config({}).model.rope_dims == 16  # 16 of 64 channels, as the record
    assert tg.load_config({"MODEL_DIM": "64", "NUM_HEADS": "8"}).model.rope_dims == 8  # head dim 8: all of it
    with pytest.raises(tg.ConfigError, match="ROPE_DIMS=7: must be even"):
        stack(ROPE_DIMS=7)


def test_qk_gain_starts_at_five_and_sharpens_attention():
    h = stack(XSA_LAST_N=0, SPARSE_ATTN_GATE_ENABLED=0)
    assert torch.equal(tg.Attention(h.model, 0).q_gain.data, torch.full((4,), 5.0))
    x = torch.randn(2, 32, 64)
    norms = {}
    for gain in (1.5, 5.0):
        attn, y, v = attention_heads(h, 0, x)
        with torch.no_grad():
            attn.q_gain.fill_(gain)
        y = attn(x).view(2, 32, 4, 16).transpose(1, 2)
        # A head's output mixes value vectors; the sharper the attention, the less they average out.
        norms[gain] = (y.norm(dim=-1) / v.norm(dim=-1).mean()).mean().item()
    assert norms[5.0] > 1.1 * norms[1.5]


@pytest.mark.parametrize("mode", MOE_MODES)
def test_parallel_lanes_mlp_does_not_read_its_own_layers_attention(mode):
    """From PARALLEL_START_LAYER on, attention and MLP (dense or MoE) read separate lanes."""
    results = {}
    for start in (0, 3):
        h = stack(MOE_MODE=mode, PARALLEL_START_LAYER=start, NUM_LOOPS=0)
        model = randomised(tg.GPT(h.model))
        seen, _ = capture_inputs(model.blocks[3].mlp)
        model.logits(tokens())
        with torch.no_grad():
            model.blocks[3].attn.proj.weight.mul_(3.0)
        model.logits(tokens())
        results[start] = torch.equal(seen[0], seen[1])
    assert results == {0: False, 3: True}


def test_parallel_lanes_mix_skip_and_final_mean():
    h = stack(NUM_LOOPS=0)
    model = randomised(tg.GPT(h.model))
    block = model.blocks[3]
    assert block.parallel and not model.blocks[2].parallel
    fresh = tg.GPT(h.model).blocks[3]
    assert torch.equal(fresh.lane_resid.data, torch.full((2,), 1.1)) and torch.equal(
        fresh.lane_post.data, torch.ones(2, 2)
    )
    lane0, lane1, x0 = torch.randn(3, 2, 8, 64).unbind(0)
    out0, out1 = block.forward_lanes((lane0, lane1), x0)
    mix = block.resid_mix
    attn = block.attn_scale * block.attn(tg.rms_norm(mix[0] * lane0 + mix[1] * x0) * block.ln_scale)
    mlp = block.mlp_scale * block.mlp(tg.rms_norm(lane1) * block.ln_scale)
    r, p = block.lane_resid, block.lane_post
    torch.testing.assert_close(out0, r[0] * lane0 + p[0, 0] * attn + p[0, 1] * mlp)
    torch.testing.assert_close(out1, r[1] * lane1 + p[1, 0] * attn + p[1, 1] * mlp)
    # In the model: lane 0 alone gets the U-Net skip; the final state is the normed mean of the lanes.
    calls, encoder_out = [], []
    run_lanes = block.forward_lanes
    block.forward_lanes = lambda lanes, x0, docs: (
        calls.append((lanes, run_lanes(lanes, x0, docs))) or calls[-1][1]
    )
    model.blocks[0].register_forward_hook(lambda m, a, out: encoder_out.append(out))
    hidden = model.hidden(tokens())
    ((lanes_in, lanes_out),) = calls
    # the gated skip: lane 0 = lerp(w * skip, lane, sigmoid(gate)); lane 1 is the lane as it was
    gate = torch.sigmoid(model.skip_gates[1])
    skip = model.skip_weights[1] * encoder_out[0]
    torch.testing.assert_close(lanes_in[0], torch.lerp(skip, lanes_in[1], gate))
    torch.testing.assert_close(hidden, tg.rms_norm(0.5 * (lanes_out[0] + lanes_out[1])))


def count_attention_calls(model):
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("mode", MOE_MODES)
def test_depth_recurrence_reruns_the_same_modules(mode):
    h = stack(MOE_MODE=mode)
    model = randomised(tg.GPT(h.model))
    n_params = sum(p.numel() for p in model.parameters())
    assert model.orders == ([0, 1, 2, 3], [0, 1, 2, 1, 2, 1, 2, 3])
    mlp_inputs, _ = capture_inputs(model.blocks[1].mlp)
    counts = count_attention_calls(model)
    idx = tokens()
    plain = model.logits(idx)
    assert counts == [1, 1, 1, 1] and len(mlp_inputs) == 1
    model.set_looping(True)
    looped = model.logits(idx)
    assert counts == [2, 4, 4, 2]  # layers 1-2 ran NUM_LOOPS=2 more times, with the same modules
    assert len(mlp_inputs) == 4 and not torch.equal(mlp_inputs[1], mlp_inputs[2])  # each pass its own input
    assert sum(p.numel() for p in model.parameters()) == n_params  # no new weights
    assert not torch.allclose(plain, looped)
    if mode != "none":
        moe = model.blocks[1].mlp
        moe.stats.zero_()
        loss, ce = model(idx, idx)
        assert tg.RoutingStats.unpack(moe.stats, moe.E).calls == 3  # one MoE, telemetry from all three passes
        per_call = 1 if mode == "soft" else 2  # z-loss (+ Switch aux loss)
        assert len(model.routing_aux) == per_call * len(model.orders[1])  # every pass's routing losses count
        torch.testing.assert_close(loss - ce, torch.stack(model.routing_aux).sum())


def test_loop_flops_count_each_pass():
    with torch.device("meta"):
        model = tg.GPT(tg.load_config({"MOE_MODE": "none"}).model)
    h = tg.load_config({"MOE_MODE": "none"})
    block = sum(
        p.numel()
        for n, p in model.blocks[0].named_parameters()
        if p.ndim == 2 and not any(s in n for s in tg.CONTROL_PATTERNS)
    )
    plain, looped = tg.matmul_params_per_token(model, False), tg.matmul_params_per_token(model, True)
    assert looped - plain == 6 * block  # three looped layers, two extra passes each
    extra_attention = 6 * 6 * h.data.train_seq_len * h.model.model_dim
    assert (
        tg.flops_per_token(model, h.data, True) - tg.flops_per_token(model, h.data, False)
        == 6 * 6 * block + extra_attention
    )


def test_smear_gate_and_bigram_never_leak_into_a_bos_position():
    """The record's fix: the token before a BOS (the last of the previous document) must not reach it."""
    model = randomised(tg.GPT(stack(BIGRAM_VOCAB_SIZE=256).model), std=0.5)
    assert model.bigram is not None and model.smear is not None
    idx = tokens(1, 12)
    idx[0, 6] = tg.BOS_ID
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 7) % 1000 + 2
    a, b = model.embed(idx), model.embed(changed)
    assert torch.equal(a[0, 6], b[0, 6])  # the BOS position does not see the changed token
    assert not torch.allclose(a[0, 5], b[0, 5])
    changed_mid = idx.clone()
    changed_mid[0, 2] = (idx[0, 2] + 7) % 1000 + 2
    assert not torch.allclose(
        model.embed(changed_mid)[0, 3], a[0, 3]
    )  # elsewhere the previous token mixes in


def test_bigram_hash_is_off_by_default():
    with torch.device("meta"):
        model = tg.GPT(tg.load_config({}).model)
    assert model.bigram is None and not any(n.startswith("bigram") for n, _ in model.named_parameters())


# --- optimizer ---------------------------------------------------------------------------------


def classic_newton_schulz(G, steps):
    X = G / G.norm()
    X = X.mT if X.size(0) > X.size(1) else X
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X


def test_polar_express_is_closer_to_orthogonal_than_the_fixed_quintic():
    torch.manual_seed(0)
    for g in (torch.randn(128, 256), torch.randn(128, 256) * torch.logspace(-3, 0, 128)[:, None]):
        pe = torch.linalg.svdvals(tg.newton_schulz(g, 5))
        classic = torch.linalg.svdvals(classic_newton_schulz(g, 5))
        assert (pe - 1).abs().mean() < 0.75 * (classic - 1).abs().mean()
    assert len(tg.POLAR_EXPRESS) == 5
    s = torch.linalg.svdvals(tg.newton_schulz(torch.randn(64, 128), 8))  # past the fifth step: the last tuple
    assert (s - 1).abs().max() < 0.2


def test_muon_row_normalize_equalises_row_updates():
    torch.manual_seed(0)
    g = torch.randn(64, 128)
    g[0] *= 1000  # one row dominates the gradient
    plain = tg.newton_schulz(g, 5).norm(dim=-1)
    rows = tg.newton_schulz(g, 5, row_normalize=True).norm(dim=-1)
    assert plain.max() / plain.min() > 1.2
    assert rows.max() / rows.min() < 1.1
    h = stack(MUON_ROW_NORMALIZE=0)
    muon = [o for o in tg.build_optimizers(tg.GPT(h.model), h.optim) if isinstance(o, tg.Muon)][0]
    assert muon.row_normalize is False
    h = stack()
    assert [o for o in tg.build_optimizers(tg.GPT(h.model), h.optim) if isinstance(o, tg.Muon)][
        0
    ].row_normalize is True


def test_min_lr_floors_the_warm_down_and_warm_down_starts_at_fifteen_percent():
    h = tg.load_config({})
    assert tg.lr_scale(0.149, h.optim.warmdown_frac, h.optim.min_lr) == 1.0
    assert tg.lr_scale(0.575, h.optim.warmdown_frac, h.optim.min_lr) == pytest.approx(0.5)
    assert tg.lr_scale(0.95, h.optim.warmdown_frac, h.optim.min_lr) == pytest.approx(0.1)
    assert tg.lr_scale(1.0, h.optim.warmdown_frac, h.optim.min_lr) == pytest.approx(0.1)
    assert tg.lr_scale(1.0, h.optim.warmdown_frac, 0.0) == 0.0


def test_weight_decays_and_beta2_reach_the_optimizers():
    h = stack(TIED_EMBED_LR=0.1, SCALAR_LR=0.1, EMBED_WD=0.5, ADAM_WD=0.25, MUON_WD=0.3, MATRIX_LR=0.1)
    model = tg.GPT(h.model)
    optimizers = tg.build_optimizers(model, h.optim)
    adam, muon = optimizers[0], [o for o in optimizers if isinstance(o, tg.Muon)][0]
    assert adam.defaults["betas"] == (0.9, 0.99)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()
    after = dict(model.named_parameters())
    # With zero gradients only the decoupled decay moves a weight: p <- p (1 - lr wd).
    torch.testing.assert_close(after["tok_emb.weight"], before["tok_emb.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["blocks.0.attn_scale"], before["blocks.0.attn_scale"] * (1 - 0.1 * 0.25))
    torch.testing.assert_close(
        after["blocks.0.attn.c_q.weight"], before["blocks.0.attn.c_q.weight"] * (1 - 0.1 * 0.3)
    )
    assert muon.param_groups[0]["weight_decay"] == 0.3
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert not any(
        "attn_gate" in n or "lane_" in n for n in muon_names
    )  # gates and lane mixes are Adam scalars


# --- loop switch under torch.compile -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "topk"])
def test_loop_switch_compiles_one_more_graph_and_never_recompiles_per_step(mode):
    """fullgraph compile: one graph per loop state, nothing per step (aot_eager: the same dynamo
    guards and graphs as inductor, without its minutes of C++ compilation on a CPU)."""
    from torch._dynamo.utils import counters

    model = randomised(tg.GPT(stack(MOE_MODE=mode).model))
    if mode != "none":
        model = model.to(torch.bfloat16)  # grouped_mm compiles in bf16 only
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    graphs = []
    for step in range(8):
        if step == 3:
            model.set_looping(True)
        loss, ce = compiled(tokens(seed=step), tokens(seed=step + 100))
        loss.backward()
        assert (loss > ce) == (mode == "topk")  # routing losses of every pass reach the compiled loss
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2, 2, 2, 2, 2]
    assert not counters["graph_break"]


# --- artifact and end to end -------------------------------------------------------------------


@pytest.mark.parametrize("looping", [False, True])
def test_artifact_reloads_in_the_loop_state_it_was_trained_in(tmp_path, looping):
    h = stack(
        ZSTD_LEVEL=1,
        MOE_MODE="none",
        SKIP_GATES_ENABLED=0,  # the gated skips' even mix halves the loop's effect, measured against noise
        MATRIX_BITS=8,
        EMBED_BITS=8,
        MATRIX_CLIP_SIGMAS=4,  # fine grid: small noise
        MLP_CLIP_SIGMAS=4,
        ATTN_CLIP_SIGMAS=4,
        EMBED_CLIP_SIGMAS=4,
    )
    model = randomised(tg.GPT(h.model), std=0.1)
    model.set_looping(looping)
    path = str(tmp_path / "a.ptz")
    tg.export_artifact(model, h.quant, path, 0, lambda msg: None)
    loaded, h2 = tg.load_artifact_model(path, torch.device("cpu"))
    assert loaded.looping is looping and h2.model.num_loops == 2 and h2.model.parallel_start_layer == 3
    model.eval(), loaded.eval()
    idx = tokens()
    reference, reread = model.logits(idx), loaded.logits(idx)
    loaded.set_looping(not looping)
    other = loaded.logits(idx)
    assert (reread - reference).abs().mean() < 0.2 * (other - reference).abs().mean()


FINAL = re.compile(r"final_quant_zstd_(roundtrip|sliding_window)_exact val_loss:([\d.]+) val_bpb:([\d.]+)")


@pytest.mark.slow
def test_tiny_run_with_every_mechanism_trains_quantizes_and_round_trips(tmp_path):
    result = run_train(tmp_path, **{**STACK_ENV, "BIGRAM_VOCAB_SIZE": "256", "ITERATIONS": "20"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout
    switch = re.search(
        r"layer_loop:enabled step:(\d+) progress:([\d.]+) order:\[0, 1, 2, 1, 2, 1, 2, 3\]", log
    )
    assert switch and int(switch[1]) == 7  # 35% of 20 steps
    events = [json.loads(line) for line in (tmp_path / "logs" / "test.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "layer_loop"] == [7]
    losses = [float(v) for v in re.findall(r"^step:\d+/20 train_loss:([\d.]+)", log, re.M)]
    assert losses[-1] < losses[0] - 0.5
    pre = float(re.search(r"pre_quant_ema val_loss:([\d.]+)", log)[1])
    finals = {kind: float(loss) for kind, loss, _ in FINAL.findall(log)}
    assert set(finals) == {"roundtrip", "sliding_window"}
    assert abs(finals["roundtrip"] - pre) < 0.05  # reread with the loops on, as trained
    assert re.search(r"size_check total:\d+ cap:16000000 slack:\d+ OK", log)


@pytest.mark.slow
def test_stack_under_two_processes_matches_one_process(tmp_path):
    """DDP with the loop switch mid-run, lanes and a routed MoE: 2 processes x 1 micro-step match
    1 process x 2 micro-steps (gloo, CPU), before and after the switch."""
    env = {**STACK_ENV, "ITERATIONS": "6", "TRAIN_LOG_EVERY": "1", "MOE_MODE": "topk"}
    one, two = run_train(tmp_path / "one", **env), run_train(tmp_path / "two", nproc=2, **env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    for result in (one, two):
        assert "layer_loop:enabled step:3 " in result.stdout  # 3 / 6 >= 0.35
    step = re.compile(r"^step:(\d+)/6 train_loss:([\d.]+)", re.M)
    for (s1, l1), (s2, l2) in zip(step.findall(one.stdout), step.findall(two.stdout), strict=True):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), abs=2e-4)


@pytest.mark.slow
def test_routed_moe_run_under_compile_recompiles_at_most_once(tmp_path):
    """A whole tiny run with a routed MoE, loops switching on mid-run, compiled with fullgraph; dynamo
    logs every recompile. The wrapper only swaps inductor for aot_eager (same guards and graphs)."""
    result, recompiles = run_compiled(
        tmp_path,
        {**STACK_ENV, "MOE_MODE": "topk", "ITERATIONS": "12", "WARMUP_STEPS": "0", "RUN_ID": "compiled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer_loop:enabled step:5" in result.stdout  # 5 / 12 >= 0.35
    assert recompiles.count("forward") == 1, result.stderr[-3000:]  # the loop switch, once
    assert "final_quant_zstd_roundtrip_exact" in result.stdout


# --- DRY_RUN and the benchmark ------------------------------------------------------------------


def dry_run(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DATA_PATH", "TOKENIZER_PATH"))}
    full.update(
        DRY_RUN="1",
        DATA_PATH=str(tmp_path / "nothing"),
        TOKENIZER_PATH=str(tmp_path / "none.model"),
        LOG_DIR=str(tmp_path / "logs"),
        OMP_NUM_THREADS="1",
        **env,
    )
    return subprocess.run(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_dry_run_needs_no_data_and_prints_size_and_speed(tmp_path):
    result = dry_run(tmp_path, MOE_MODE="none")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    total = int(re.search(r"params total:(\d+)", out)[1])
    assert abs(total - 35_945_671) / 35_945_671 < 1e-3
    assert re.search(rf"\+ code \d+ \({re.escape(tg.CODE_COUNTED_AS)}\) = ~\d+ of 16000000", out)
    rows = dict(re.findall(r"projection loops:(off|on) flops_per_token:[\d.e+]+ ms_per_step:([\d.]+)", out))
    # 30% MFU reproduces the record's own step times (96 ms before the loop switch, 138 ms after).
    assert 85 < float(rows["off"]) < 105 and 125 < float(rows["on"]) < 150
    assert re.search(r"projection run_average tok/s_per_gpu:\d+", out)
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_dry_run_reports_bad_knobs_like_a_real_run(tmp_path):
    result = dry_run(tmp_path, LOOP_END="11")
    assert result.returncode == 2 and "LOOP_END=11" in result.stderr


@pytest.mark.slow
def test_bench_stack_tiny_times_both_phases_with_one_graph_each():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.gpu.bench_stack",
            "--tiny",
            "--iters",
            "2",
            "--warmup",
            "1",
            "MOE_MODE=topk",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    phases = re.findall(
        r"phase:(loops_off|loops_on) ms_per_step:([\d.]+) tok/s:(\d+) graphs:(\d+)", result.stdout
    )
    assert [p[0] for p in phases] == ["loops_off", "loops_on"] and all(p[3] == "1" for p in phases)
    assert all(float(p[1]) > 0 for p in phases)
    assert re.search(r"run_average tok/s_per_gpu:\d+ goal:1000000", result.stdout)
