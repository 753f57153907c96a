"""tools/routing/routing_analysis.py: routing of a saved artifact, per layer, expert and token class."""

import json

import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE, TOKENIZER
from tools.routing import routing_analysis


def saved_artifact(tiny_config, tmp_path, forced_expert=None, **env):
    h = tiny_config(**env)
    torch.manual_seed(0)
    model = tg.GPT(h.model)
    for _, m in tg.moe_layers(model):
        if forced_expert is not None:  # a huge balancing bias makes every token choose this expert
            m.router_bias[forced_expert] = 1e4
    path = tmp_path / "run_model.ptz"
    tg.export_artifact(model, h.quant, str(path), code_bytes=0, log=lambda msg: None)
    return path


def test_forced_expert_takes_every_token(tiny_config, tmp_path):
    path = saved_artifact(tiny_config, tmp_path, forced_expert=2, MOE_MODE="topk", NUM_EXPERTS=4)
    report = routing_analysis.analyse_artifact(
        str(path), str(SAMPLE), str(TOKENIZER), token_limit=4096, batch_seqs=4, seq_len=128
    )
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert layer["load"] == pytest.approx([0.0, 0.0, 1.0, 0.0])
        assert layer["dead"] == 3
        assert all(load[2] == pytest.approx(1.0) for load in layer["class_load"].values())
    assert report["tokens"] == 4 * 128
    assert report["classes"]["frequent"] + report["classes"]["rare"] == report["tokens"]
    kinds = sum(report["classes"][k] for k in routing_analysis.TOKEN_KINDS)
    assert kinds == report["tokens"] and report["moe_mode"] == "topk"


def test_soft_routing_load_is_a_distribution(tiny_config, tmp_path):
    path = saved_artifact(tiny_config, tmp_path, MOE_MODE="soft", NUM_EXPERTS=2)
    report = routing_analysis.analyse_artifact(
        str(path), str(SAMPLE), str(TOKENIZER), token_limit=4096, batch_seqs=2
    )
    for layer in report["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert layer["load"] == pytest.approx([0.5, 0.5])  # a zero router (soft init) splits evenly
        assert layer["entropy"] == pytest.approx(1.0)


def test_cli_writes_json_and_refuses_dense_and_overwrite(tiny_config, tmp_path, capsys):
    path = saved_artifact(tiny_config, tmp_path, MOE_MODE="topk")
    args = [
        str(path),
        "--data",
        str(SAMPLE),
        "--tokenizer",
        str(TOKENIZER),
        "--token-limit",
        "2048",
        "--batch-seqs",
        "2",
    ]
    assert routing_analysis.main(args) == 0
    out = tmp_path / "run_routing.json"
    assert json.loads(out.read_text())["num_experts"] == 4
    assert routing_analysis.main(args) == 2 and "already exists" in capsys.readouterr().err
    dense = saved_artifact(tiny_config, tmp_path / "dense", MOE_MODE="none")
    assert routing_analysis.main([str(dense), "--data", str(SAMPLE), "--tokenizer", str(TOKENIZER)]) == 2
    assert "no routing to analyse" in capsys.readouterr().err
