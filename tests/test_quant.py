"""Quantization and the artifact: GPTQ against round-to-nearest, LQER, MoE-aware Hessians, compressors,
the budget preview, the checkpoint and tools/quant/quant_study.py."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SAMPLE, TOKENIZER, TINY_ENV, run_train
import train_gpt as tg


def output_error(w, w_hat, X):
    return ((w_hat - w) @ X.T).square().sum().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dense model trained 40 steps on the sample corpus, with Hessians from 4 more batches."""
    torch.manual_seed(0)
    h = tg.load_config({**TINY_ENV, "ITERATIONS": "40", "MOE_MODE": "none", "MODEL_DIM": "128"})
    trainer = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), tg.Logger(None)))
    trainer.run(lambda step: None)
    model = trainer.model.eval()
    batches = [b for _ in range(4) for b in trainer.loader.next_step()]
    hessians, warnings = tg.collect_hessians(model, batches, 1)
    held_out = trainer.loader.next_step()
    return h, model, hessians, held_out


def layer_inputs(model, module, batches):
    """The inputs a module sees on `batches` (held-out training tokens)."""
    seen = []
    hook = module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].size(-1)).float())
    )
    with torch.no_grad():
        for x, _ in batches:
            model.hidden(x)
    hook.remove()
    return torch.cat(seen)


def test_one_hessian_per_distinct_input_and_each_is_its_inputs_gram_matrix(trained, monkeypatch):
    """c_q, c_k and c_v read the same tensor: one X^T X, computed once, serves all three."""
    h, model, hessians, held_out = trained
    attn = model.blocks[0].attn
    shared = [hessians[f"blocks.0.attn.{m}.weight"] for m in ("c_q", "c_k", "c_v")]
    assert shared[0] is shared[1] is shared[2]
    assert hessians["blocks.0.attn.proj.weight"] is not shared[0]
    products = []
    addmm = torch.Tensor.addmm_
    monkeypatch.setattr(
        torch.Tensor, "addmm_", lambda t, *a, **k: products.append(t.shape) or addmm(t, *a, **k)
    )
    fresh, _ = tg.collect_hessians(model, held_out, 1)
    distinct = {id(H) for H in fresh.values()}
    assert len(products) == len(distinct) * len(held_out)  # each product once per batch (loops off here)
    assert len(distinct) == len(fresh) - 2 * len(model.blocks)  # c_k and c_v of every block share
    X = layer_inputs(model, attn.c_q, held_out)
    assert torch.allclose(fresh["blocks.0.attn.c_k.weight"], X.T @ X, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,sigmas,gain", [(6, 11.5, 0.8), (5, 11.5, 0.8), (4, 5.0, 0.8), (4, 11.5, 1.0)])
def test_gptq_has_less_output_error_than_rtn_and_no_more_bytes(trained, bits, sigmas, gain):
    """On a trained layer and held-out inputs. At 4 bits with the int6 clip (a step of 1.6 standard
    deviations, most weights round to 0) GPTQ cannot win at equal bytes: it must then not lose."""
    h, model, hessians, held_out = trained
    fc = model.blocks[1].mlp.fc
    w, H = fc.weight.detach().float(), hessians["blocks.1.mlp.fc.weight"]
    X = layer_inputs(model, fc, held_out)
    q_r, s_r = tg.quantize_matrix(w, None, bits, sigmas)
    q_g, s_g = tg.quantize_matrix(w, H, bits, sigmas)
    err_r = output_error(w, q_r * s_r.float()[:, None], X)
    err_g = output_error(w, q_g * s_g.float()[:, None], X)
    assert err_g <= gain * err_r, (err_g, err_r)
    assert tg.packed_bits(q_g) <= 1.002 * tg.packed_bits(q_r)  # within the compressor's noise


def test_lqer_lowers_the_output_error_of_the_tensors_it_corrects(trained):
    h, model, hessians, _ = trained
    state = tg.artifact_state(model)
    plain_quant = dataclasses.replace(h.quant, lqer_enabled=False)
    lqer_quant = dataclasses.replace(h.quant, lqer_enabled=True, lqer_top_k=2, lqer_rank=4)
    plain, err_plain = tg.quantize_state(state, plain_quant, hessians)
    corrected, err_lqer = tg.quantize_state(state, lqer_quant, hessians)
    fixed = [n for n, (_, ts) in corrected.items() if len(ts) == 6]
    assert len(fixed) == 2 and err_lqer < err_plain
    for name in fixed:  # LQER fits the error as the layer's inputs see it: tr(E H E^T)
        w, H = state[name].float(), hessians[name]
        before, after = (tg.dequantize_entry(*e[name], w.shape) - w for e in (plain, corrected))
        # rank 4 of a trained 64-wide layer removes a few % to 30% (1.5% on one tensor of this model since the
        # gated skips and document isolation; quantization error is near white, so rank 4 of 64 takes little)
        assert (after @ H * after).sum() < 0.99 * (before @ H * before).sum()


def moe_model(tiny_config, mode, **env):
    torch.manual_seed(1)
    model = tg.GPT(tiny_config(MOE_MODE=mode, NUM_EXPERTS=4, TOP_K=1, **env).model).eval()
    with torch.no_grad():
        for p in model.parameters():  # make every matrix (and router) non-trivial
            if p.ndim >= 2:
                p.normal_(0, 0.05)
    return model


def test_routed_expert_hessian_comes_from_its_routed_tokens_only(tiny_config):
    model = moe_model(tiny_config, "topk")
    moe = model.blocks[0].mlp
    x = torch.randint(0, 1024, (8, 128))  # enough tokens per expert: no damping
    inputs = layer_inputs(model, moe, [(x, None)])
    hessians, _ = tg.collect_hessians(model, [(x, None)], 1)
    _, _, choice, gate = moe.route(inputs)
    for e in range(moe.E):
        routed = choice[:, 0] == e
        xe = inputs[routed] * gate[routed, :1]
        assert torch.allclose(hessians["blocks.0.mlp.up"][e], xe.T @ xe, rtol=1e-4, atol=1e-5)
        hidden = tg.mlp_act(inputs[routed] @ moe.up[e].T, moe.act) * gate[routed, :1]
        assert torch.allclose(hessians["blocks.0.mlp.down"][e], hidden.T @ hidden, rtol=1e-4, atol=1e-5)


def test_soft_expert_hessian_is_weighted_by_its_gate(tiny_config):
    model = moe_model(tiny_config, "soft")
    moe = model.blocks[1].mlp
    x = torch.randint(0, 1024, (8, 128))  # enough tokens per expert: no damping
    inputs = layer_inputs(model, moe, [(x, None)])
    hessians, _ = tg.collect_hessians(model, [(x, None)], 1)
    gates = moe.E * torch.softmax(moe.router_logits(inputs), -1)
    for e in range(moe.E):
        xe = inputs * gates[:, e : e + 1]
        assert torch.allclose(hessians["blocks.1.mlp.up"][e], xe.T @ xe, rtol=1e-4, atol=1e-5)


def test_an_expert_without_calibration_tokens_gets_a_damped_hessian_and_a_warning(tiny_config):
    model = moe_model(tiny_config, "topk")
    with torch.no_grad():
        model.blocks[0].mlp.router_bias[2] = -100.0  # expert 2 of layer 0 is never chosen
    hessians, warnings = tg.collect_hessians(model, [(torch.randint(0, 1024, (8, 128)), None)], 1)
    assert any("expert 2 of blocks.0.mlp.up saw 0 calibration tokens" in w for w in warnings), warnings
    assert not any("blocks.1" in w for w in warnings)
    H = hessians["blocks.0.mlp.up"][2]
    assert torch.linalg.eigvalsh(H).min() > 0  # still invertible: GPTQ degrades to round-to-nearest
    q, _ = tg.quantize_matrix(model.blocks[0].mlp.up[2].detach(), H, 6, 12.0, None)
    assert q.abs().max() <= 31


@pytest.mark.parametrize("compressor", [c for c in tg.COMPRESSORS if not tg.compressor_missing(c)])
def test_each_compressor_round_trips_the_artifact(tiny_config, tmp_path, compressor):
    h = tiny_config(
        COMPRESSOR=compressor, LQER_ENABLED=1, LQER_TOP_K=1, MOE_MODE="topk", NUM_EXPERTS=4, TOP_K=1
    )
    model = moe_model(tiny_config, "topk")
    path = str(tmp_path / "model.ptz")
    size = tg.export_artifact(model, h.quant, path, 0, lambda msg: None)
    assert os.path.getsize(path) == size
    config, state = tg.read_artifact(path)
    entries, _ = tg.quantize_state(tg.artifact_state(model), h.quant)
    for name, (bits, tensors) in entries.items():
        assert torch.equal(state[name], tg.dequantize_entry(bits, tensors, state[name].shape)), name
    assert config["MOE_MODE"] == "topk"


@pytest.mark.slow
def test_a_missing_compressor_binary_stops_the_run_before_training(tmp_path):
    result = run_train(tmp_path, COMPRESSOR="lrzip", PATH=str(tmp_path))  # no lrzip on this PATH
    assert result.returncode == 2
    assert "COMPRESSOR=lrzip" in result.stderr and "lrzip" in result.stderr
    assert "step:" not in result.stdout


@pytest.mark.slow
def test_budget_preview_is_within_two_percent_of_the_written_artifact(tiny_config, tmp_path):
    """Gaussian matrices of a realistic width (trained weights are near-Gaussian row by row)."""
    h = tiny_config(
        MODEL_DIM=256, NUM_LAYERS=2, MLP_MULT=4, BIGRAM_VOCAB_SIZE=0, COMPRESSOR="zstd", ZSTD_LEVEL=19
    )
    torch.manual_seed(0)
    model = tg.GPT(h.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    estimate, _ = tg.estimate_artifact_bytes(model, h.quant)
    real = tg.export_artifact(model, h.quant, str(tmp_path / "m.ptz"), 0, lambda msg: None)
    assert abs(estimate - real) / real < 0.02, (estimate, real)


@pytest.mark.slow
def test_checkpoint_and_quant_study(tmp_path):
    result = run_train(tmp_path, ITERATIONS=10, SAVE_CHECKPOINT=1, GPTQ_CALIBRATION_BATCHES=2)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = tmp_path / "logs" / "test_fp.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"]["MODEL_DIM"] == 64 and "tok_emb.weight" in saved["state"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.quant.quant_study",
            str(ckpt),
            "--data-path",
            str(SAMPLE),
            "--tokenizer",
            str(TOKENIZER),
            "--val-token-limit",
            "4096",
            "--calibration-batches",
            "2",
            "--seq-len",
            "128",
            "--batch-tokens",
            "1024",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    schemes = [r["scheme"] for r in rows]
    assert schemes[:3] == ["rtn/zstd", "gptq/zstd", "gptq+lqer/zstd"] and rows[0]["bits"] == 6
    assert all(set(r) >= {"scheme", "bytes", "val_bpb", "pre_quant_val_bpb"} for r in rows)
    assert len({r["pre_quant_val_bpb"] for r in rows}) == 1 and all(r["bytes"] > 1000 for r in rows)
    only = subprocess.run(
        [*out.args[:-1], "--only", "mlp", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert only.returncode == 0, only.stderr[-2000:]
    mlp_only = json.loads(only.stdout)  # the other classes stay fp16: more bytes, a smaller gap
    assert mlp_only[0]["scheme"] == "rtn/zstd" and mlp_only[0]["bytes"] > rows[0]["bytes"]


@pytest.mark.slow
def test_self_extracting_script_runs_the_same_program(tmp_path):
    from tools.dev import selfextract

    source = (REPO / "train_gpt.py").read_bytes()
    wrapper = selfextract.self_extracting(source)
    assert len(wrapper) < len(source) // 2 and selfextract.extracted_source(wrapper) == source
    assert selfextract.extracted_source(wrapper.replace(b"exec", b"eval")) is None
    path = tmp_path / "train_gpt.py"
    path.write_bytes(wrapper)
    out = subprocess.run(
        [sys.executable, "-c", "import train_gpt as t; print(t.code_bytes(), t.ARTIFACT_VERSION)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        str(len(wrapper)),
        str(tg.ARTIFACT_VERSION),
    ]  # counts its own (compressed) bytes


@pytest.mark.slow
def test_budget_preview_counts_the_script_as_shipped(tmp_path):
    """The preview counts the self-extracting wrapper's bytes (what a record ships), not the readable
    script's; a wrapper counts itself, not a wrapper of itself."""
    source = (REPO / "train_gpt.py").read_bytes()
    assert tg.code_bytes() == len(tg.self_extracting(source)) < len(source) // 2
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_bytes(tg.self_extracting(source))
    probe = "import train_gpt as t; print(t.code_bytes(), t.script_bytes())"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(wrapper.stat().st_size)] * 2
