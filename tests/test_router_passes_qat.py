"""Per-pass routers in the looped layers (ROUTER_PER_PASS), quantization-aware training (QAT_START_FRAC)
and EXPERT_BITS: what each does, and that both survive the artifact, compile and two ranks."""

import json
import re
import zlib

import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE, STACK_ENV, TINY_ENV, TOKENIZER, run_compiled, run_train

ROUTED_MODES = ["soft", "topk", "shared_routed"]
# The record stack in miniature (layers 1-2 looped twice more) with MoE only in the looped layers.
PER_PASS_ENV = {**STACK_ENV, "MOE_LAYERS": "1,2", "ROUTER_PER_PASS": "1"}


def per_pass_config(**env):
    return tg.load_config({**PER_PASS_ENV, **{k: str(v) for k, v in env.items()}})


def randomised(model, std=0.05, seed=0):
    """Random weights (zero-initialised projections would make every block the identity, so every pass
    would see the same input); a parameter's values depend on its name only."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            p.normal_(0, std)
    return model


def tokens(batch=2, length=32, seed=1):
    torch.manual_seed(seed)
    return torch.randint(2, 1024, (batch, length))


def single_router_twin(model, h, pass_index=0):
    """The same network with one router per layer (ROUTER_PER_PASS=0), every router = `pass_index`'s."""
    twin_h = tg.load_config({**PER_PASS_ENV, "ROUTER_PER_PASS": "0", "MOE_MODE": h.model.moe_mode})
    twin = tg.GPT(twin_h.model)
    state = {
        name: (t[pass_index] if "router" in name and t.ndim > twin.state_dict()[name].ndim else t)
        for name, t in model.state_dict().items()
    }
    twin.load_state_dict(state)
    return twin


# --- per-pass routers ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ROUTED_MODES)
def test_one_router_per_pass_in_looped_moe_layers_only(mode):
    h = per_pass_config(MOE_MODE=mode, MOE_LAYERS="0,1,2")
    model = tg.GPT(h.model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "router" in n}
    assert shapes == {
        "blocks.0.mlp.router_weight": (4, 64),  # outside the loop: one router
        "blocks.1.mlp.router_weight": (3, 4, 64),  # 1 + NUM_LOOPS passes
        "blocks.2.mlp.router_weight": (3, 4, 64),
    }
    assert model.pass_indices[1] == [0, 0, 0, 1, 1, 2, 2, 0]  # order [0, 1, 2, 1, 2, 1, 2, 3]
    for layer in (1, 2):  # every pass starts with the same router: zero for soft MoE
        router = model.blocks[layer].mlp.router_weight
        assert all(torch.equal(router[p], router[0]) for p in range(3))
        assert (router.abs().sum() == 0) == (mode == "soft")
    single = tg.GPT(per_pass_config(MOE_MODE=mode, MOE_LAYERS="0,1,2", ROUTER_PER_PASS=0).model)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in single.parameters())
    assert extra == 2 * 2 * 4 * 64  # two looped MoE layers x two extra routers; the experts are shared


@pytest.mark.parametrize("mode", ROUTED_MODES)
def test_identical_passes_equal_one_router_and_different_routers_differ(mode):
    h = per_pass_config(MOE_MODE=mode)
    model = randomised(tg.GPT(h.model)).eval()
    with torch.no_grad():  # pass routers equal, as at initialisation
        for layer in (1, 2):
            router = model.blocks[layer].mlp.router_weight
            router[1:] = router[0]
    model.set_looping(True)
    twin = single_router_twin(model, h).eval()
    twin.set_looping(True)
    idx = tokens()
    assert torch.equal(model.logits(idx), twin.logits(idx))
    with torch.no_grad():  # pass 2 of layer 1 routes differently: the output changes
        model.blocks[1].mlp.router_weight[2].normal_(0, 1.0)
    assert (model.logits(idx) - twin.logits(idx)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ROUTED_MODES)
def test_gradient_reaches_each_passes_router_only_on_its_pass(mode):
    moe = randomised(tg.GPT(per_pass_config(MOE_MODE=mode).model)).blocks[1].mlp
    x = torch.randn(64, 64)
    for p in range(3):
        moe.zero_grad()
        moe(x, pass_index=p).square().sum().backward()
        grad = moe.router_weight.grad
        assert grad[p].abs().sum() > 0
        assert all(grad[q].abs().sum() == 0 for q in range(3) if q != p)
    model = randomised(tg.GPT(per_pass_config(MOE_MODE=mode).model))
    loss, _ = model(tokens(), tokens(seed=2))  # the loop off (before the switch): passes 1, 2 get nothing
    loss.backward()
    grad = model.blocks[1].mlp.router_weight.grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_telemetry_and_balancing_bias_per_pass():
    model = randomised(tg.GPT(per_pass_config(MOE_MODE="topk").model))
    model.set_looping(True)
    with torch.no_grad():
        model.blocks[1].mlp.router_bias[1, 3] = 1e4  # pass 1 of layer 1 sends every token to expert 3
    model(tokens(), tokens(seed=2))
    stats = tg.collect_routing_stats(model, 0.001, 1)
    summary = tg.routing_summary(model, stats)
    assert [(r["layer"], r["pass"]) for r in summary] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert summary[1]["load"] == [0.0, 0.0, 0.0, 1.0] and max(summary[0]["load"]) < 1.0
    lines = tg.routing_log_lines(summary)
    assert any(line.startswith("moe layer:1 pass:1 load:0.000,0.000,0.000,1.000") for line in lines)
    assert "WARNING moe layer:1 pass:1 routing collapse" in "\n".join(lines)
    bias = model.blocks[1].mlp.router_bias
    assert bias[1, 3] < 1e4 and bias[0].abs().max() <= 0.0011  # each pass's bias follows its own load


def test_gptq_weights_each_passes_tokens_by_its_own_gates():
    """Pass p of layer 1 sends every token to expert p: experts 0-2 get Hessians, expert 3 none."""
    model = randomised(tg.GPT(per_pass_config(MOE_MODE="topk").model))
    model.set_looping(True)
    with torch.no_grad():
        for p in range(3):
            model.blocks[1].mlp.router_bias[p, p] = 1e4
    hess, warnings = tg.collect_hessians(model.eval(), [(tokens(), None)], 1)
    starved = [w for w in warnings if "blocks.1.mlp" in w]
    assert len(starved) == 2 and all("expert 3 of blocks.1.mlp." in w for w in starved)


def test_per_pass_routers_survive_the_artifact_bit_exact(tmp_path):
    h = per_pass_config(MOE_MODE="topk", ZSTD_LEVEL=1)
    model = randomised(tg.GPT(h.model))
    model.set_looping(True)
    with torch.no_grad():
        for layer in (1, 2):
            moe = model.blocks[layer].mlp
            moe.router_weight.copy_(torch.randn_like(moe.router_weight).half().float())
            moe.router_bias.copy_(torch.randn_like(moe.router_bias).half().float())
    path = str(tmp_path / "a.ptz")
    tg.export_artifact(model, h.quant, path, 0, lambda msg: None)
    loaded, h2 = tg.load_artifact_model(path, torch.device("cpu"))
    assert h2.model.router_per_pass and loaded.looping
    for name in ("router_weight", "router_bias"):
        for layer in (1, 2):
            original = getattr(model.blocks[layer].mlp, name)
            assert torch.equal(getattr(loaded.blocks[layer].mlp, name), original)
            assert original.shape[0] == 3


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"NUM_LOOPS": "0"}, "ROUTER_PER_PASS=1 needs the layer loop: with NUM_LOOPS=0"),
        ({"MOE_LAYERS": "0,3"}, "ROUTER_PER_PASS=1: no MoE layer is looped (MOE_LAYERS=0,3"),
        ({"MOE_MODE": "none", "MOE_LAYERS": ""}, "ROUTER_PER_PASS=1 needs MoE layers: MOE_MODE=none"),
        ({"MOE_MODE": "soft", "EXPERT_BITS": "1"}, "EXPERT_BITS=1"),
        ({"MOE_MODE": "soft", "QAT_START_FRAC": "1.5"}, "QAT_START_FRAC=1.5"),
    ],
)
def test_bad_input_names_the_knobs(env, needle):
    with pytest.raises(tg.ConfigError) as err:
        tg.load_config({**PER_PASS_ENV, "MOE_MODE": "soft", **env})
    assert needle in str(err.value)


def test_expert_bits_need_an_moe():
    with pytest.raises(tg.ConfigError, match="EXPERT_BITS=5: no effect with MOE_MODE=none"):
        tg.load_config({**TINY_ENV, "EXPERT_BITS": "5"})


def test_routing_analysis_reports_and_plots_each_pass(tmp_path):
    from tools.routing import routing_analysis

    h = per_pass_config(MOE_MODE="topk", ZSTD_LEVEL=1)
    model = randomised(tg.GPT(h.model))
    model.set_looping(True)
    with torch.no_grad():
        for p in range(3):
            model.blocks[2].mlp.router_bias[p, p] = 1e4  # pass p of layer 2: every token to expert p
    path = tmp_path / "run_model.ptz"
    tg.export_artifact(model, h.quant, str(path), code_bytes=0, log=lambda msg: None)
    report = routing_analysis.analyse_artifact(
        str(path), str(SAMPLE), str(TOKENIZER), token_limit=4096, batch_seqs=2, seq_len=128
    )
    assert [(e["layer"], e["pass"]) for e in report["layers"]] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    for entry in report["layers"]:
        if entry["layer"] == 2:
            assert entry["load"] == pytest.approx([float(e == entry["pass"]) for e in range(4)])
    plot = tmp_path / "passes.png"
    assert routing_analysis.plot_pass_load(report, plot) and plot.stat().st_size > 1000


# --- EXPERT_BITS --------------------------------------------------------------------------------


def test_expert_bits_reach_the_grid_the_preview_and_the_fit_ladder(tiny_config):
    h6, h4 = (tiny_config(MOE_MODE="shared_routed", EXPERT_BITS=b, MLP_MULT=4) for b in (6, 4))
    model = tg.GPT(h6.model)
    assert tg.storage_grid("blocks.0.mlp.up", model.blocks[0].mlp.up, h4.quant)[0] == 4
    shared = model.blocks[0].mlp.shared.fc.weight  # the shared MLP is not an expert: MATRIX_BITS
    assert tg.storage_grid("blocks.0.mlp.shared.fc.weight", shared, h4.quant)[0] == 6
    (est6, classes6), (est4, classes4) = (tg.estimate_artifact_bytes(model, h.quant) for h in (h6, h4))
    assert classes4["mlp"] < classes6["mlp"] and est4 < est6
    state = tg.artifact_state(model)
    entries, _ = tg.quantize_state(
        state, h4.quant, bits_drop={"mlp": 1}
    )  # the ladder's "one bit less for MLP"
    assert entries["blocks.0.mlp.up"][0] == 3 and entries["blocks.0.mlp.shared.fc.weight"][0] == 5


# --- QAT ----------------------------------------------------------------------------------------


def test_fake_quantized_weights_equal_the_dequantized_export_bit_exact(tiny_config):
    h = tiny_config(
        MOE_MODE="soft", MODEL_DIM=128, EXPERT_BITS=5, QUANT_METHOD="rtn", LQER_ENABLED=0, QAT_START_FRAC=0.5
    )
    trainer = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), lambda msg: None))
    randomised(trainer.model, std=0.1)
    state = {n: t.clone() for n, t in tg.artifact_state(trainer.model).items()}
    entries, _ = tg.quantize_state(state, h.quant)
    trainer.fake_quantize_weights()
    quantized = {b for b, _ in entries.values()}
    assert quantized == {16, 5, 6, 7}  # fp16-kept, experts, attention and BigramHash, embedding
    faked = tg.artifact_state(trainer.model)
    for name, (bits, tensors) in entries.items():
        expected = state[name] if bits == 16 else tg.dequantize_entry(bits, tensors, state[name].shape)
        assert torch.equal(faked[name], expected), name  # routers and fp16-kept tensors untouched
    trainer.restore_float_weights()
    assert all(torch.equal(t, state[n]) for n, t in tg.artifact_state(trainer.model).items())


def test_straight_through_gradient_is_the_gradient_at_the_quantized_weights(tiny_config):
    h = tiny_config(MOE_MODE="topk", QAT_START_FRAC=0.5)
    trainer = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), lambda msg: None))
    model = randomised(trainer.model, std=0.1)
    x, y = tokens(), tokens(seed=2)
    reference = tg.GPT(h.model)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():  # the reference holds the export grid's weights as its own
        for name, p in reference.named_parameters():
            bits, sigmas = tg.storage_grid(name, p, h.quant)
            if bits < 16:
                p.copy_(tg.fake_quantize(p, bits, sigmas))
    reference(x, y)[0].backward()
    floats = [p.detach().clone() for p in model.parameters()]
    trainer.fake_quantize_weights()
    model(x, y)[0].backward()
    trainer.restore_float_weights()
    for (name, p), ref, before in zip(model.named_parameters(), reference.parameters(), floats):
        assert torch.equal(p, before)  # the float weights are back ...
        assert torch.equal(p.grad, ref.grad), name  # ... with the quantized weights' gradient
    assert all(p.grad.abs().sum() > 0 for p, _, _ in trainer.qat_grids)


def final_gap(tmp_path, **env) -> tuple[float, str]:
    result = run_train(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "logs" / "test.jsonl").read_text().splitlines()]
    pre = next(e["val_bpb"] for e in events if e["event"] == "pre_quant")
    final = next(e["val_bpb"] for e in events if e["event"] == "final" and e["mode"] == "plain")
    return final - pre, result.stdout


@pytest.mark.slow
def test_qat_shrinks_the_round_trip_gap_of_a_tiny_run(tmp_path):
    """A coarse grid (3-bit matrices, 4-bit embedding, round to nearest) makes the gap large; the same
    run with QAT for its second half loses less in the round trip. Fails if QAT is a no-op."""
    env = dict(
        ITERATIONS=40,
        MATRIX_BITS=3,
        EMBED_BITS=4,
        QUANT_METHOD="rtn",
        LQER_ENABLED=0,
        EMA_DECAY=0,
        EVAL_STRIDE=0,
    )
    plain, _ = final_gap(tmp_path / "plain", **env)
    qat, log = final_gap(tmp_path / "qat", QAT_START_FRAC=0.5, **env)
    assert "qat:enabled step:20 progress:0.500" in log
    assert plain > 0.02 and qat < 0.5 * plain, (plain, qat)


@pytest.mark.slow
def test_per_pass_routers_and_qat_two_ranks_match_one_and_stay_in_sync(tmp_path):
    env = {
        **PER_PASS_ENV,
        "MOE_MODE": "topk",
        "ITERATIONS": "6",
        "TRAIN_LOG_EVERY": "1",
        "QAT_START_FRAC": "0.5",
    }
    one, two = run_train(tmp_path / "one", **env), run_train(tmp_path / "two", nproc=2, **env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    for result in (one, two):
        assert "layer_loop:enabled step:3 " in result.stdout and "qat:enabled step:3 " in result.stdout
        assert "moe layer:1 pass:2 load:" in result.stdout
    assert "ranks_in_sync:yes ranks:2" in two.stdout
    step = re.compile(r"^step:(\d+)/6 train_loss:([\d.]+)", re.M)
    for (s1, l1), (s2, l2) in zip(step.findall(one.stdout), step.findall(two.stdout), strict=True):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), abs=2e-4)


@pytest.mark.slow
def test_per_pass_run_reevaluates_from_the_artifact_alone(tmp_path):
    env = {**PER_PASS_ENV, "MOE_MODE": "soft", "ITERATIONS": "8", "EVAL_STRIDE": "0"}
    result = run_train(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    score = re.search(r"final_quant_zstd_roundtrip_exact val_loss:([\d.]+)", result.stdout)[1]
    again = run_train(
        tmp_path, **env, EVAL_ONLY=1, RUN_ID="again", ARTIFACT_PATH=tmp_path / "logs" / "test_model.ptz"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"final_quant_zstd_roundtrip_exact val_loss:([\d.]+)", again.stdout)[1] == score


@pytest.mark.slow
def test_per_pass_and_qat_compile_fullgraph_with_one_recompile_at_the_loop_switch(tmp_path):
    """A whole tiny run, routers per pass, QAT from the same step as the loops: dynamo logs every
    recompile. The wrapper swaps inductor for aot_eager (same guards and graphs)."""
    result, recompiles = run_compiled(
        tmp_path,
        {
            **PER_PASS_ENV,
            "MOE_MODE": "topk",
            "ITERATIONS": "12",
            "QAT_START_FRAC": "0.6",
            "RUN_ID": "compiled",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer_loop:enabled step:5" in result.stdout and "qat:enabled step:8" in result.stdout
    assert recompiles.count("forward") == 1, result.stderr[-3000:]  # the loop switch; QAT adds none
