"""train_gpt.py pieces in-process: knobs, shards and loaders, byte accounting, model, optimizer,
quantization and the artifact file, evaluation windows, EMA."""

import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE, TOKENIZER


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return str(path)


# --- knobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"NUM_LAYERS": "ten"}, "NUM_LAYERS='ten': expected int"),
        ({"MATRIX_LR": "nan"}, "MATRIX_LR='nan': expected a finite number"),
        ({"MOE_MODE": "dense"}, "MOE_MODE='dense': expected one of none, soft"),
        ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS='yes': expected 0 or 1"),
        ({"MOE_LAYERS": "1,x"}, "MOE_LAYERS='1,x': expected a comma-separated list"),
        ({"NUM_LAYER": "12"}, "unknown variable NUM_LAYER: did you mean NUM_LAYERS?"),
        ({"MODEL_DIM": "100"}, "MODEL_DIM=100 is not divisible by NUM_HEADS=8"),
        ({"MOE_MODE": "topk", "TOP_K": "5"}, "TOP_K=5: must be between 1 and NUM_EXPERTS=4"),
        ({"MOE_MODE": "soft", "MOE_LAYERS": "3,12"}, "MOE_LAYERS: layer 12 is outside 0..10"),
        (
            {"NUM_EXPERTS": "8", "TOP_K": "2"},
            "NUM_EXPERTS=8, TOP_K=2: no effect with MOE_MODE=none (the dense MLP, the default)",
        ),
        (
            {"MOE_MODE": "soft", "NUM_EXPERTS": "5"},
            "NUM_EXPERTS=5: the parameter-matched expert size 2048/5 is not whole; set EXPERT_HIDDEN",
        ),
        ({"MATRIX_BITS": "12"}, "MATRIX_BITS=12: expected 2..8"),
        ({"QUANT_BITS_MLP": "5"}, "QUANT_BITS_MLP is no longer a knob: use MATRIX_BITS"),
        ({"COMPRESSOR": "zip"}, "COMPRESSOR='zip': expected one of zstd, brotli"),
        (
            {"GPTQ_RESERVE_SECONDS": "700"},
            "GPTQ_RESERVE_SECONDS=700.0: must be in [0, MAX_WALLCLOCK_SECONDS=600.0)",
        ),
        (
            {"TRAIN_SEQ_LEN": "1000"},
            "MICRO_BATCH_TOKENS=98304 (unset: TRAIN_BATCH_TOKENS=786432 / 8) is not a positive multiple of "
            "TRAIN_SEQ_LEN=1000",
        ),
    ],
)
def test_bad_knobs_fail_naming_the_knob(env, needle):
    with pytest.raises(tg.ConfigError, match=None) as err:
        tg.load_config(env)
    assert needle in str(err.value)


def test_knob_defaults_and_parsing():
    h = tg.load_config({"MOE_MODE": "topk", "MOE_LAYERS": "5,6, 7", "SMEAR_GATE": "0", "EMA_DECAY": "0.997"})
    assert h.model.moe_mode == "topk" and h.model.moe_layer_ids == (5, 6, 7) and h.model.smear_gate is False
    assert (
        h.optim.ema_decay == 0.997
        and h.data.micro_batch_tokens == 786_432 // 8
        and h.evaluation.eval_seq_len == 2048
    )
    assert tg.load_config({"MOE_MODE": "soft"}).model.moe_layer_ids == tuple(
        range(11)
    )  # empty MOE_LAYERS: every layer
    assert tg.load_config({}).model.moe_mode == "none" and tg.load_config({}).model.moe_layer_ids == ()
    assert tg.load_config({"MOE_MODE": "soft"}).model.expert_mlp_hidden == 2048 // 4


def test_grad_accum_is_derived_and_checked():
    h = tg.load_config({})
    assert [tg.grad_accum_steps(h.data, w) for w in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(tg.ConfigError, match="TRAIN_BATCH_TOKENS=786432 is not divisible by WORLD_SIZE=3"):
        tg.grad_accum_steps(h.data, 3)


# --- shards and loaders ------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 7], dtype=np.uint16)
    path = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert os.path.getsize(path) == 1024 + 2 * 5
    np.testing.assert_array_equal(tg.read_shard(path), tokens)


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("magic", "bad magic 123"),
        ("version", "unsupported shard version 2"),
        ("truncated", "header promises 10 tokens"),
        ("extra", "header promises 2 tokens (1028 bytes)"),
        ("short", "shorter than the 1024-byte shard header"),
        ("missing", "no such shard file"),
    ],
)
def test_corrupt_shards_fail_naming_file_and_problem(tmp_path, kind, needle):
    path = tmp_path / "fineweb_train_000000.bin"
    if kind == "magic":
        write_shard(path, [1, 2], magic=123)
    elif kind == "version":
        write_shard(path, [1, 2], version=2)
    elif kind == "truncated":
        write_shard(path, [1, 2, 3], count=10)
    elif kind == "extra":
        write_shard(path, [1, 2, 3], count=2)
    elif kind == "short":
        path.write_bytes(b"\0" * 100)
    with pytest.raises(tg.DataError) as err:
        tg.read_shard(str(path))
    assert str(path) in str(err.value) and needle in str(err.value)


def test_missing_data_path_and_tokenizer_fail_clearly(tmp_path):
    with pytest.raises(tg.DataError, match="DATA_PATH=.*nope: no such directory"):
        tg.shard_files(str(tmp_path / "nope"), "train")
    with pytest.raises(tg.DataError, match="no fineweb_val_\\*.bin shards"):
        tg.shard_files(str(tmp_path), "val")
    with pytest.raises(tg.DataError, match="TOKENIZER_PATH=.*missing.model: no such file"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)
    with pytest.raises(tg.DataError, match="tokenizer has 1024 pieces but VOCAB_SIZE=2048"):
        tg.load_tokenizer(str(TOKENIZER), 2048)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(tg.DataError, match="bad.model: not a SentencePiece model"):
        tg.load_tokenizer(str(tmp_path / "bad.model"), 1024)


def test_val_tokens_outside_vocab_fail(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 2000])
    with pytest.raises(tg.DataError, match="token id 2000 is outside VOCAB_SIZE=1024"):
        tg.load_val_tokens(str(tmp_path), 1024)


def loaders(tmp_path, world, accum, micro=8, seq=4):
    files = [
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(i * 1000, i * 1000 + 300) % 60000)
        for i in range(2)
    ]
    return [tg.TrainLoader(files, r, world, seq, micro, accum, torch.device("cpu")) for r in range(world)]


def test_ranks_get_disjoint_spans_of_one_global_batch(tmp_path):
    two = loaders(tmp_path, world=2, accum=2)
    one = loaders(tmp_path, world=1, accum=4)[0]
    for _ in range(25):  # enough steps to cross the shard boundary and wrap around
        per_rank = [loader.next_step() for loader in two]
        single = one.next_step()
        seen = [set(x.flatten().tolist()) for batches in per_rank for x, _ in batches]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
        # rank r's micro-step m is piece m*world + r of the span the one-process run reads in order
        merged = [per_rank[p % 2][p // 2] for p in range(4)]
        for (x1, y1), (x2, y2) in zip(single, merged):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert torch.equal(x1.flatten()[1:], y1.flatten()[:-1])


def test_train_loader_never_opens_validation_shards(monkeypatch):
    opened = []
    real = tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda p: opened.append(p) or real(p))
    loader = tg.TrainLoader(tg.shard_files(str(SAMPLE), "train"), 0, 1, 128, 128 * 64, 8, torch.device("cpu"))
    for _ in range(40):  # 40 x 65 K tokens wraps the 1.5 M-token sample train split
        loader.next_step()
    assert len(opened) > 3 and not [p for p in opened if "_val_" in p]
    with pytest.raises(tg.DataError, match="must never feed training"):
        tg.TokenStream(tg.shard_files(str(SAMPLE), "val"))


def test_bpb_bytes_match_decoded_utf8_of_validation_text():
    sp = tg.load_tokenizer(str(TOKENIZER), 1024)
    val = tg.read_shard(str(SAMPLE / "fineweb_val_000000.bin")).astype(np.int64)
    docs = np.split(val, np.flatnonzero(val == tg.BOS_ID)[1:])
    independent = sum(len(sp.decode(doc[1:].tolist()).encode("utf-8")) for doc in docs)
    tokens = torch.from_numpy(val)
    counted = tg.target_bytes(tokens[:-1], tokens[1:], tg.byte_tables(sp)).sum().item()
    assert counted == independent and len(docs) > 10


# --- model -------------------------------------------------------------------------------------


def test_smear_gate_never_mixes_across_bos():
    smear = tg.SmearGate(4)
    x = torch.randn(1, 6, 8)
    idx = torch.tensor([[5, 6, tg.BOS_ID, 7, 8, tg.BOS_ID]])
    assert torch.equal(smear(x, idx), x)  # zero init: the identity
    with torch.no_grad():
        smear.lam.fill_(0.8)
        smear.weight.copy_(torch.randn(1, 4))
    out = smear(x, idx)
    for t in (0, 2, 5):  # the first position and every BOS keep their own embedding
        assert torch.equal(out[0, t], x[0, t])
    gate = torch.sigmoid(x[0, 3, :4] @ smear.weight[0])  # read from the first GATE_WINDOW channels
    torch.testing.assert_close(out[0, 3], x[0, 3] + 0.8 * gate * x[0, 2])


def test_bigram_hash_buckets():
    bigram = tg.BigramHash(97, 4, 8)
    idx = torch.randint(2, 1024, (3, 50))  # no BOS: a BOS gets the reserved bucket (test_stack.py)
    with torch.no_grad():
        bigram.table.weight.copy_(torch.arange(97).float()[:, None].expand(97, 4))
        bigram.proj.weight.copy_(torch.eye(8, 4))
    buckets = (bigram(idx)[..., 0] / bigram.scale).round().long()
    assert (buckets[:, 0] == 96).all() and (buckets[:, 1:] < 96).all()
    # the same (previous, current) pair always maps to the same bucket
    again = (bigram(torch.cat((idx[:, :1], idx), 1))[..., 0] / bigram.scale).round().long()
    assert torch.equal(again[:, 2:], buckets[:, 1:])


def test_partial_rope_leaves_other_channels_alone():
    rot = tg.Rotary(8, 10000.0)
    x = torch.randn(2, 3, 5, 16)
    out = rot(x)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert not torch.allclose(out[:, :, 1:, :8], x[:, :, 1:, :8])
    torch.testing.assert_close(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))  # a rotation


def test_model_starts_with_zero_output_projections(tiny_config):
    dense, soft = (
        tg.GPT(tiny_config().model),
        tg.GPT(tiny_config(MOE_MODE="soft").model),
    )
    for block, soft_block in zip(dense.blocks, soft.blocks, strict=True):
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
        assert soft_block.mlp.down.abs().sum() == 0
        assert soft_block.mlp.router_weight.abs().sum() == 0
    w = dense.blocks[0].attn.c_q.weight
    torch.testing.assert_close(w @ w.T, torch.eye(w.size(0)), atol=1e-5, rtol=0)  # orthogonal


# --- optimizer ---------------------------------------------------------------------------------


def test_newton_schulz_is_near_orthogonal():
    torch.manual_seed(0)
    g = torch.randn(64, 128) * torch.logspace(-2, 1, 128)  # widely spread singular values
    for matrix in (g, g.T):
        s = torch.linalg.svdvals(tg.newton_schulz(matrix, 5).float())
        assert s.min() > 0.6 and s.max() < 1.25
    stack = torch.stack((g, 2 * g))
    out = tg.newton_schulz(stack, 5).float()
    torch.testing.assert_close(out[0], tg.newton_schulz(g, 5).float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("mode", ["none", "soft", "topk", "shared_routed"])
@pytest.mark.parametrize("tie", ["0", "1"])
def test_parameter_groups_cover_every_parameter_once(tiny_config, mode, tie):
    model = tg.GPT(tiny_config(MOE_MODE=mode, TIE_EMBEDDINGS=tie).model)
    optimizers = tg.build_optimizers(model, tiny_config(MOE_MODE=mode, TIE_EMBEDDINGS=tie).optim)
    grouped = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    muon = next(o for o in optimizers if isinstance(o, tg.Muon))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "router" not in names[id(p)] for p in muon.param_groups[0]["params"])
    for g in optimizers[0].param_groups:
        if any("router" in names[id(p)] for p in g["params"]):
            assert g["weight_decay"] == 0 and all("router" in names[id(p)] for p in g["params"])


def test_lr_schedule_is_a_fraction_of_the_run():
    assert tg.lr_scale(0.1, 0.45) == 1.0
    assert tg.lr_scale(0.55, 0.45) == 1.0
    assert tg.lr_scale(0.775, 0.45) == pytest.approx(0.5)
    assert tg.lr_scale(1.0, 0.45) == 0.0
    assert tg.lr_scale(0.99, 0.0) == 1.0


@pytest.mark.parametrize(
    "old,new",
    [
        ("BIGRAM_BUCKETS", "BIGRAM_VOCAB_SIZE"),
        ("EMA_HORIZON", "EMA_DECAY"),
        ("ALLOW_OVER_BUDGET", "BUDGET_MARGIN=-1"),
        ("MOE_START_LAYER", "MOE_LAYERS"),
    ],
)
def test_replaced_knobs_name_their_successor(old, new):
    with pytest.raises(tg.ConfigError) as err:
        tg.load_config({old: "1"})
    assert f"{old} is no longer a knob: use {new}" in str(err.value)
    with pytest.raises(tg.ConfigError, match="expected one of none, soft, topk, shared_routed"):
        tg.load_config({"MOE_MODE": "standard"})


def test_ema_off_equals_raw_weights_and_on_matches_hand_computation(tiny_config, tmp_path):
    def trainer_with(**env):
        h = tiny_config(**env, DATA_PATH=SAMPLE)
        return tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), lambda msg: None))

    off = trainer_with(EMA_DECAY=0)
    for _ in range(3):
        off.train_step()
        off.step += 1
        off.update_ema(1 / 20)
    assert off.ema is None  # evaluation and export use the raw weights

    on = trainer_with(EMA_DECAY=0.9)
    history = []
    for _ in range(3):
        on.train_step()
        on.step += 1
        on.update_ema(1 / 20)
        history.append([p.detach().clone() for p in on.model.parameters()])
    w1, w2, w3 = history  # the average starts at step 1's weights, then decays by 0.9 per step
    for i in range(len(w1)):
        expected = 0.9 * (0.9 * w1[i] + 0.1 * w2[i]) + 0.1 * w3[i]
        torch.testing.assert_close(on.ema.shadow[i], expected)
    on.ema.copy_to_model()
    torch.testing.assert_close(next(on.model.parameters()), on.ema.shadow[0])


# --- quantization and artifact -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,sigmas,bound", [(8, 4.0, 2e-4), (6, 4.0, 1.5e-3), (6, 12.85, 1.5e-2), (4, 3.0, 3e-2)]
)
def test_quantization_error_within_bound(bits, sigmas, bound):
    """SDClip round-to-nearest: the grid spans +-sigmas row standard deviations; inside it the error is
    at most half a step, and the relative squared error follows from the step."""
    torch.manual_seed(0)
    w = torch.randn(256, 512) / 512**0.5
    q, scale = tg.quantize_matrix(w, None, bits, sigmas)
    assert q.abs().max() <= 2 ** (bits - 1) - 1
    back = tg.dequantize_entry(bits, [q, scale], w.shape)
    assert ((back - w).square().sum() / w.square().sum()).item() < bound
    inside = w.abs() <= scale.float()[:, None] * (2 ** (bits - 1) - 1)
    assert ((back - w).abs()[inside] <= scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-7).all()


def test_pruning_zeroes_the_smallest_weights():
    w = torch.randn(64, 64)
    zero = w.abs() <= w.abs().flatten().kthvalue(int(0.25 * w.numel())).values
    for H in (None, torch.eye(64) + 0.1):  # round-to-nearest and GPTQ
        q, _ = tg.quantize_matrix(w, H, 8, 4.0, zero)
        assert (q == 0).float().mean() >= 0.25 and (q[zero] == 0).all()
        assert (
            q[w.abs() > w.abs().flatten().kthvalue(int(0.3 * w.numel())).values] != 0
        ).float().mean() > 0.95


def small_quant_config(tiny_config, **env):
    return tiny_config(
        **{"MODEL_DIM": 128, "MLP_MULT": 3, "FP16_KEEP_MAX_NUMEL": 1024, "ZSTD_LEVEL": 19, **env}
    )


def test_artifact_round_trip_is_bit_exact(tiny_config, tmp_path):
    h = small_quant_config(tiny_config, MOE_MODE="topk")
    model = tg.GPT(h.model)
    path = str(tmp_path / "m.ptz")
    tg.export_artifact(model, h.quant, path, 1000, lambda msg: None)
    config, state = tg.read_artifact(path)
    entries, _ = tg.quantize_state(tg.artifact_state(model), h.quant)
    for name, (bits, tensors) in entries.items():
        assert torch.equal(state[name], tg.dequantize_entry(bits, tensors, state[name].shape)), name
    rebuilt, h2 = tg.load_artifact_model(path, torch.device("cpu"))
    assert h2.model.moe_mode == "topk" and h2.model.model_dim == 128 and config["MOE_MODE"] == "topk"
    assert set(tg.artifact_state(rebuilt)) == set(state)


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("flip", "corrupt or truncated artifact"),
        ("truncate", "corrupt or truncated artifact"),
        ("garbage", "corrupt or truncated artifact"),
        ("magic", "bad magic"),
        ("missing", "no such artifact"),
    ],
)
def test_corrupt_artifacts_fail_clearly(tiny_config, tmp_path, damage, needle):
    h = tiny_config(ZSTD_LEVEL=1, COMPRESSOR="zstd")
    path = tmp_path / "m.ptz"
    tg.export_artifact(tg.GPT(h.model), h.quant, str(path), 0, lambda msg: None)
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    elif damage == "truncate":
        blob = blob[:-100]
    elif damage == "garbage":
        blob = bytearray(b"x" * 500)
    elif damage == "magic":  # valid zstd frames whose header is not ours (with a matching checksum)
        import zlib
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(blob[16 + int.from_bytes(blob[8:12], "little") :])
        head, crc = (
            zstandard.ZstdCompressor().compress(b"NOTPG" + bytes(100)),
            zlib.crc32(data, zlib.crc32(b"NOTPG" + bytes(100))),
        )
        blob = bytearray(
            blob[:8]
            + len(head).to_bytes(4, "little")
            + crc.to_bytes(4, "little")
            + head
            + zstandard.ZstdCompressor().compress(data)
        )
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(blob))
    with pytest.raises(tg.ArtifactError) as err:
        tg.read_artifact(str(path))
    assert str(path) in str(err.value) and needle in str(err.value)


@pytest.mark.slow
def test_fit_loop_gets_an_over_cap_model_under_the_cap(tiny_config, tmp_path):
    h = small_quant_config(tiny_config, ZSTD_LEVEL=3, MLP_MULT=8, NUM_LAYERS=4)  # MLP-heavy, like real models
    model = tg.GPT(h.model)
    path = str(tmp_path / "m.ptz")
    natural = tg.export_artifact(model, h.quant, path, 0, lambda msg: None)
    quant = dataclasses.replace(h.quant, size_cap_bytes=int(natural * 0.85))
    messages = []
    size = tg.export_artifact(model, quant, path, 0, messages.append)
    assert size <= quant.size_cap_bytes and os.path.getsize(path) == size
    fit_steps = [m for m in messages if m.startswith("fit:")]
    paid = [m for m in fit_steps if "predicted" not in m]  # steps predicted to fit: quantized and compressed
    assert paid and all("relative squared error" in m for m in paid)
    assert fit_steps[-1].endswith(f"artifact {size} bytes")
    tiny = tiny_config(ZSTD_LEVEL=1, SIZE_CAP_BYTES=1000)  # impossible: say so loudly, still write it
    messages.clear()
    size = tg.export_artifact(tg.GPT(tiny.model), tiny.quant, path, 0, messages.append)
    assert any("ARTIFACT OVER THE CAP" in m for m in messages) and os.path.getsize(path) == size


# --- evaluation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,seq,stride",
    [(1001, 100, 10), (1001, 100, 100), (1001, 100, 0), (57, 100, 8), (1000, 64, 64), (5000, 128, 50)],
)
def test_eval_windows_score_every_target_exactly_once(n, seq, stride):
    windows = tg.eval_windows(n, seq, stride)
    length = min(seq, n - 1)
    scored = np.zeros(n, dtype=int)
    for start, count in windows:
        assert 0 <= start and start + length <= n - 1 and 0 < count <= length
        scored[start + length - count + 1 : start + length + 1] += 1
    assert scored[0] == 0 and (scored[1:] == 1).all()
    if stride and len(windows) > 2:
        assert all(c == stride for _, c in windows[1:-1])


def test_sliding_eval_with_stride_equal_window_equals_plain_eval(tiny_config):
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(MOE_MODE="topk").model)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.eval()
    sp = tg.load_tokenizer(str(TOKENIZER), 1024)
    tables = tg.byte_tables(sp)
    tokens = tg.load_val_tokens(str(SAMPLE), 1024, limit=16 * 64)  # 16 windows of 64 exactly
    rt = tg.Runtime(0, 1, torch.device("cpu"), lambda msg: None)
    loss, bpb = tg.evaluate(model.logits, tokens, tables, tg.WindowSpec(64, 64, 5), rt)
    x, y = tokens[:-1].long().view(16, 64), tokens[1:].long().view(16, 64)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            model.logits(x).reshape(-1, 1024), y.reshape(-1), reduction="sum"
        )
    n_bytes = tg.target_bytes(x, y, tables).sum()
    assert loss == pytest.approx(nll.item() / y.numel(), rel=1e-6)
    assert bpb == pytest.approx(nll.item() / math.log(2) / n_bytes.item(), rel=1e-6)
    assert tg.evaluate(model.logits, tokens, tables, tg.WindowSpec(64, 0, 3), rt) == pytest.approx(
        (loss, bpb), rel=1e-9
    )
    # the windows' positions reach the device once, not twice per batch (16 windows, batches of 3: 6)
    made = []
    tensor = torch.tensor
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "tensor", lambda *a, **k: made.append(called_by_trainer()) or tensor(*a, **k))
        assert tg.evaluate(model.logits, tokens, tables, tg.WindowSpec(64, 0, 3), rt) == pytest.approx(
            (loss, bpb), rel=1e-9
        )
    assert made.count(True) == 1


def test_one_parameter_classification_for_optimizer_and_quantizer(tiny_config):
    h = tiny_config(MOE_MODE="shared_routed", TIE_EMBEDDINGS=0)
    model = tg.GPT(h.model)
    classes = {name: tg.param_class(name, t) for name, t in tg.artifact_state(model).items()}
    assert classes["tok_emb.weight"] == "embed" and classes["lm_head.weight"] == "head"
    assert classes["bigram.table.weight"] == "bigram_table" and classes["bigram.proj.weight"] == "bigram_proj"
    assert classes["bigram.scale"] == classes["smear.weight"] == classes["blocks.0.resid_mix"] == "control"
    assert classes["blocks.0.mlp.router_weight"] == classes["blocks.0.mlp.router_bias"] == "router"
    assert classes["blocks.0.mlp.up"] == classes["blocks.0.mlp.shared.fc.weight"] == "mlp"
    assert classes["blocks.1.attn.c_q.weight"] == "attn"
    muon = next(o for o in tg.build_optimizers(model, h.optim) if isinstance(o, tg.Muon))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (classes[name] in tg.MATRIX_CLASSES), name
        assert (tg.storage_grid(name, p, h.quant)[0] == 16) == (
            classes[name] in ("router", "control") or p.numel() <= h.quant.fp16_keep_max_numel
        ), name


def test_artifact_written_with_a_replaced_knob_fails_clearly(tiny_config, tmp_path):
    h = tiny_config()
    state = tg.artifact_state(tg.GPT(h.model))
    entries, _ = tg.quantize_state(state, h.quant)
    config = tg.stored_knobs(h.model)
    config["BIGRAM_BUCKETS"] = config.pop(
        "BIGRAM_VOCAB_SIZE"
    )  # as artifacts of the earlier knob names were written
    blob = tg.serialize_artifact(entries, config, {n: list(t.shape) for n, t in state.items()}, "zstd", 1)
    (tmp_path / "old.ptz").write_bytes(blob)
    with pytest.raises(tg.ConfigError, match="BIGRAM_BUCKETS is no longer a knob: use BIGRAM_VOCAB_SIZE"):
        tg.load_artifact_model(str(tmp_path / "old.ptz"), torch.device("cpu"))


def test_model_receives_only_the_model_contract(tiny_config):
    """The network is built from a ModelConfig: stored model knobs and derived values, nothing of training
    beyond the routers' own terms and the init scale; a run configuration is refused by name."""
    h = tiny_config()
    with pytest.raises(TypeError, match=r"GPT\(h\.model\)"):
        tg.GPT(h)
    stored = {name.lower() for name in tg.MODEL_KNOBS}
    derived = {
        "head_dim",
        "mlp_hidden",
        "moe_layer_ids",
        "expert_mlp_hidden",
        "shared_mlp_hidden",
        "router_passes",
    }
    router_terms = {
        "router_noise",
        "router_z_coef",
        "moe_aux_loss_coef",
        "router_entropy_coef",
        "expert_dropout",
        "tied_embed_init_std",
    }
    attention_pattern = {"respect_doc_boundaries"}  # no weight depends on it: the reading run's knob applies
    names = {f.name for f in dataclasses.fields(tg.ModelConfig)}
    assert names - stored - derived == router_terms | attention_pattern
    cfg = h.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model_dim = 8


def test_schedule_is_one_table_of_the_run_stages(tiny_config):
    h = tiny_config(
        NUM_LOOPS="1",
        LOOP_START="0",
        LOOP_END="0",
        ENABLE_LOOPING_AT="0.35",
        QAT_START_FRAC="0.85",
        WARMDOWN_FRAC="0.5",
        MIN_LR="0.1",
    )
    start, loop_on, late = (tg.schedule(p, h.model, h.optim) for p in (0.0, 0.35, 0.9))
    assert start == (1.0, h.optim.muon_momentum_warmup_start, False, False)
    assert loop_on.looping and not loop_on.qat and loop_on.lr_scale == 1.0
    assert late.looping and late.qat and late.lr_scale == pytest.approx(0.2)
    assert late.muon_momentum == h.optim.muon_momentum
    assert tg.ema_decay(0.058, h.optim) == pytest.approx(math.exp(-1))
    assert tg.ema_decay(0.5, tiny_config(EMA_DECAY="0.99").optim) == 0.99


def called_by_trainer(depth: int = 2) -> bool:
    """Whether the Python frame `depth` up is train_gpt.py's. On a CPU every tensor lives on the host, so
    torch's own reads of host-side tensors (Adam's step counter is a CPU tensor on a GPU too) are told apart
    from the trainer's by the caller."""
    return sys._getframe(depth).f_code.co_filename == tg.__file__


class HostReadMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails when train_gpt.py reads a tensor's value on the host: .item(), bool(), float() and int() all
    dispatch aten._local_scalar_dense, and on a GPU each waits for the device to drain."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and called_by_trainer():
            raise AssertionError("a host read of a tensor value (bool(), float(), .item()) in the step")
        return func(*args, **(kwargs or {}))


def routers(model) -> list[torch.Tensor]:
    return [m.router_bias for _, m in tg.moe_layers(model) if isinstance(m, tg.RoutedMoE)]


def refuse_from_trainer(original, what: str):
    def method(self, *args, **kwargs):
        targets = [*args, kwargs.get("device")] if what == ".to('cpu')" else ["cpu"]
        to_host = any(str(t).split(":")[0] == "cpu" for t in targets if isinstance(t, (str, torch.device)))
        if to_host and called_by_trainer():
            raise AssertionError(f"{what} in the training step: a host sync on a GPU")
        return original(self, *args, **kwargs)

    return method


@pytest.mark.parametrize(
    "env",
    [
        dict(MOE_MODE="topk", MOE_DISPATCH="grouped"),
        dict(MOE_MODE="topk", MOE_DISPATCH="capacity", TOP_K=2),
        dict(MOE_MODE="shared_routed"),
        dict(MOE_MODE="soft"),
        dict(MOE_MODE="none"),
    ],
)
def test_a_training_step_never_reads_values_on_the_host(tiny_config, monkeypatch, env):
    """Outside logging steps the trainer only queues work: no .item(), .tolist(), .numpy(), .cpu() or
    .to('cpu') (each a sync on a GPU), with every balancing mechanism on."""
    balancing = dict(ROUTER_BIAS_RATE=0.01, MOE_AUX_LOSS_COEF=0.01, ROUTER_Z_COEF=0.001, ROUTER_NOISE=0.1)
    h = tiny_config(**env, **(balancing if env["MOE_MODE"] != "none" else {}))
    trainer = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), lambda *a, **k: None))
    bias_before = [
        m.router_bias.clone() for _, m in tg.moe_layers(trainer.model) if hasattr(m, "router_bias")
    ]
    for name in ("item", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(
            torch.Tensor, name, refuse_from_trainer(getattr(torch.Tensor, name), f".{name}()")
        )
    monkeypatch.setattr(torch.Tensor, "to", refuse_from_trainer(torch.Tensor.to, ".to('cpu')"))
    moved = []
    with HostReadMode():
        for _ in range(2):  # the second step adds to the first one's routing totals
            ce = trainer.train_step()
            moved.append([not torch.equal(a, b) for a, b in zip(bias_before, routers(trainer.model))])
    monkeypatch.undo()
    assert torch.isfinite(ce) and trainer.step == 0
    if env["MOE_MODE"] != "none":  # the routing totals were kept, on the device, for the next step line
        assert trainer.routing_totals is not None and trainer.routing_totals.sum() > 0
    assert all(moved[0])  # balancing really ran (a second step may nudge a bias back where it was)
