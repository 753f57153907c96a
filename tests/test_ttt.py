"""Test-time training, evaluation-only runs and per-token losses: legality first."""

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, run_train
from tools.gpu import gpu_memory

CPU = torch.device("cpu")
QUIET_CPU = tg.Runtime(0, 1, CPU, lambda msg: None)
# Small and aggressive: a leak of unscored tokens into any update would show at once.
TTT_ENV = {
    "TTT_LORA_RANK": "4",
    "TTT_LORA_LR": "0.01",
    "TTT_CHUNK_SIZE": "32",
    "TTT_BATCH_SIZE": "4",
    "TTT_GRAD_STEPS": "2",
    "TTT_WEIGHT_DECAY": "0",
    "PHASED_TTT_PREFIX_DOCS": "4",
    "PHASED_TTT_NUM_PHASES": "2",
    "GLOBAL_TTT_LR": "0.05",
    "GLOBAL_TTT_CHUNK_TOKENS": "256",
}
MODES = [
    ("none", {}),
    ("soft", {}),
    ("topk", {}),
    ("topk", {"MOE_DISPATCH": "capacity", "CAPACITY_FACTOR": "0.8"}),
    ("shared_routed", {}),
    # Both layers looped once more, each pass with its own router (random, so the passes route differently);
    # topk with capacity dispatch, whose fixed shapes keep CPU rounding independent of later tokens' routing.
    ("soft", {"NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "1", "ROUTER_PER_PASS": "1"}),
    (
        "topk",
        {
            "NUM_LOOPS": "1",
            "LOOP_START": "0",
            "LOOP_END": "1",
            "ROUTER_PER_PASS": "1",
            "MOE_DISPATCH": "capacity",
        },
    ),
]


@pytest.fixture(scope="module")
def tables():
    return tg.byte_tables(tg.load_tokenizer(TINY_ENV["TOKENIZER_PATH"], 1024))


@pytest.fixture(scope="module")
def val_pair():
    """Sample validation text cut into many short documents, and a copy with every token after P replaced
    by other tokens (BOS positions, hence the documents, kept)."""
    val = tg.load_val_tokens(TINY_ENV["DATA_PATH"], 1024, 1200).clone()
    gen, p = torch.Generator().manual_seed(1), 0
    while p < val.numel():
        val[p] = tg.BOS_ID
        p += int(torch.randint(40, 150, (1,), generator=gen))
    P = 700
    changed = val.clone()
    after = (torch.arange(val.numel()) > P) & (val != tg.BOS_ID)
    changed[after] = (
        val[after] + torch.randint(3, 1000, (int(after.sum()),), generator=gen).int()
    ) % 1021 + 3
    return val, changed, P


def random_model(mode: str, **env):
    """A model with every weight random and non-zero (a fresh one has zero output projections, under which
    attention, MLPs and routers would not matter and legality would hold trivially)."""
    h = tg.load_config({**TINY_ENV, **TTT_ENV, "MOE_MODE": mode, **env})
    torch.manual_seed(0)
    model = tg.GPT(h.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.9 / p.shape[-1] ** 0.5)
    model.set_looping(h.model.num_loops > 0)  # a loop in the configuration runs
    return model.eval(), h


def token_losses(kind: str, model, h, tokens, tables, batch: int) -> torch.Tensor:
    out = torch.full((tokens.numel() - 1,), float("nan"))
    if kind == "ttt":
        evaluation = dataclasses.replace(h.evaluation, ttt_batch_size=batch)
        tg.ttt_evaluate(copy.deepcopy(model), evaluation, h.run, tokens, tables, QUIET_CPU, token_losses=out)
    else:
        spec = tg.WindowSpec(128, 0 if kind == "plain" else 32, batch)
        tg.evaluate(model.logits, tokens, tables, spec, QUIET_CPU, token_losses=out)
    return out


@pytest.mark.parametrize("mode,env", MODES, ids=[m + "-" + "-".join(e.values()) for m, e in MODES])
@pytest.mark.parametrize("kind", ["plain", "sliding", pytest.param("ttt", marks=pytest.mark.slow)])
def test_scores_before_p_ignore_tokens_after_p(mode, env, kind, val_pair, tables):
    val, changed, P = val_pair
    model, h = random_model(mode, **env)
    # CPU grouped_mm picks its kernel by an expert's row count (one row: a matrix-vector product), so with
    # grouped dispatch a row's rounding depends on the other rows in a batch, and Adam turns such 1e-7 noise
    # into visible steps. One row per batch keeps the comparison exact without hiding any information flow.
    batch = 1 if mode in ("topk", "shared_routed") and env.get("MOE_DISPATCH") != "capacity" else 4
    before, after = (token_losses(kind, model, h, t, tables, batch) for t in (val, changed))
    assert not before.isnan().any() and not after.isnan().any()  # every target scored exactly where expected
    assert torch.equal(before[:P], after[:P])
    assert (before[P:] - after[P:]).abs().max() > 0.1  # the change itself is visible


def test_no_target_reaches_an_optimizer_before_it_is_scored(monkeypatch, val_pair, tables):
    val = val_pair[0]
    model, h = random_model("soft")
    recorded = torch.full((val.numel() - 1,), float("nan"))
    window, seen = {}, {"adam": 0, "sgd": 0}
    real_windows, real_adam, real_sgd = tg.chunk_windows, torch.optim.AdamW.step, tg.global_sgd

    def windows(*args, **kwargs):
        out = real_windows(*args, **kwargs)
        window["pos"] = out[2]
        return out

    def adam_step(self, *args, **kwargs):  # every target of the window trained on must already be recorded
        pos = window["pos"]
        assert not recorded[pos[pos >= 0]].isnan().any()
        seen["adam"] += 1
        return real_adam(self, *args, **kwargs)

    def sgd(model, tokens, end, **kwargs):  # global SGD trains on targets 1..end: indices 0..end-1
        assert not recorded[:end].isnan().any() and recorded[end:].isnan().any()
        seen["sgd"] += 1
        return real_sgd(model=model, tokens=tokens, end=end, **kwargs)

    monkeypatch.setattr(tg, "chunk_windows", windows)
    monkeypatch.setattr(torch.optim.AdamW, "step", adam_step)
    monkeypatch.setattr(tg, "global_sgd", sgd)
    tg.ttt_evaluate(model, h.evaluation, h.run, val, tables, QUIET_CPU, token_losses=recorded)
    assert seen["adam"] > 20 and seen["sgd"] == 2
    assert not recorded.isnan().any()


def test_ttt_changes_the_scores_and_adapters_start_at_zero(val_pair, tables):
    val = val_pair[0]
    model, h = random_model("soft")
    adapted = token_losses("ttt", model, h, val, tables, 4)
    untrained = dataclasses.replace(h.evaluation, ttt_lora_lr=0.0, phased_ttt_prefix_docs=0)
    frozen_h = dataclasses.replace(h, evaluation=untrained)
    frozen = token_losses("ttt", model, frozen_h, val, tables, 4)
    assert (adapted - frozen).abs().max() > 0.05
    # Untrained adapters leave the model as it is: per-document scores equal the plain model's logits
    # (on documents that fit one EVAL_SEQ_LEN window).
    docs, _ = tg.ttt_schedule(val, h.evaluation)
    for start, n in [d for d in docs if d[1] <= h.evaluation.eval_seq_len][:4]:
        x, y = val[start : start + n].long()[None], val[start + 1 : start + n + 1].long()[None]
        plain = torch.nn.functional.cross_entropy(model.logits(x)[0], y[0], reduction="none")
        assert torch.allclose(frozen[start : start + n], plain.detach(), atol=1e-5)


def test_documents_cover_every_target_once(val_pair):
    val = val_pair[0]
    h = tg.load_config({**TINY_ENV, **TTT_ENV})
    docs, phases = tg.ttt_schedule(val, h.evaluation)
    assert sum(n for _, n in docs) == val.numel() - 1 and docs[0][0] == 0
    assert all(val[s] == tg.BOS_ID and s + n == e for (s, n), (e, _) in zip(docs, docs[1:]))
    # Phases in stream order; the base weights train after the prefix phases only, on earlier documents.
    order = [d for batches, _ in phases for rows in batches for d in rows]
    assert sorted(order) == list(range(len(docs)))
    assert [end for _, end in phases] == [sum(docs[1]), sum(docs[3]), 0]
    assert all(rows == sorted(rows) for batches, _ in phases for rows in batches)


def bf16_like_cuda(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# One case per dispatch: dense, soft, grouped top-2, capacity shared+routed, per-pass routers in a loop.
AUTOCAST_MODES = [
    MODES[0],
    MODES[1],
    ("topk", {"TOP_K": "2"}),
    ("shared_routed", {"MOE_DISPATCH": "capacity"}),
]
AUTOCAST_MODES.append(MODES[5])


# Grouped top-2 (grouped_mm has no autocast kernel) in the inner loop; the others with the slow tests.
@pytest.mark.parametrize(
    "mode,env",
    [case if case[0] == "topk" else pytest.param(*case, marks=pytest.mark.slow) for case in AUTOCAST_MODES],
    ids=[m + "-" + "-".join(e.values()) for m, e in AUTOCAST_MODES],
)
def test_evaluation_and_ttt_run_under_cuda_autocast_rules(mode, env, monkeypatch, val_pair, tables):
    """A GPU evaluates and adapts under bf16 autocast, which a CPU run never applies: the fake-CUDA trace
    covers the training forward only, and the autograd engine cannot run on a fake device. Here the sliding
    evaluation and TTT (adapter steps and global SGD, with their backward passes) run on the CPU under
    autocast with CUDA's fp32 rules, as train_gpt's autocast() would apply them on a GPU."""
    val = val_pair[0]
    # Gentle steps: TTT_ENV's are chaotic on purpose, and would amplify bf16 rounding into other trajectories.
    model, h = random_model(mode, **env, TTT_LORA_LR="0.0005", GLOBAL_TTT_LR="0.005")
    exact = {kind: token_losses(kind, model, h, val, tables, 4) for kind in ("sliding", "ttt")}
    monkeypatch.setattr(tg, "autocast", bf16_like_cuda)
    with gpu_memory.cpu_autocast_like_cuda():
        mixed = {kind: token_losses(kind, model, h, val, tables, 4) for kind in ("sliding", "ttt")}
    for kind in exact:
        assert not mixed[kind].isnan().any(), kind  # every target scored, none lost to an overflow
        assert not torch.equal(mixed[kind], exact[kind]), kind  # bf16 really ran
        # bf16 rounding only: the mean loss moves by well under 1%
        assert abs(mixed[kind].mean() / exact[kind].mean() - 1) < 0.01, kind


@pytest.mark.slow
def test_projection_refuses_before_training(tmp_path):
    r = run_train(tmp_path, TTT_ENABLED=1, EVAL_TIME_LIMIT=1e-9, **TTT_ENV)
    assert r.returncode == 2 and "EVAL_TIME_LIMIT" in r.stderr and "Traceback" not in r.stderr
    assert not (
        tmp_path / "logs" / "test.txt"
    ).exists()  # failed before training: RUN_ID freed, log kept aside
    log = (tmp_path / "logs" / "test.failed1.txt").read_text()
    assert re.search(r"ttt_projection: ~[\d.]+s on 8xH100", log) and "step:1/" not in log


def test_projection_grows_with_the_work(tiny_config, val_pair):
    val = val_pair[0]
    seconds = []
    for chunk in ("64", "16"):
        h = tiny_config(TTT_ENABLED=1, EVAL_TIME_LIMIT=0, **{**TTT_ENV, "TTT_CHUNK_SIZE": chunk})
        log = lambda msg: None
        log.event = lambda kind, **fields: kind == "ttt_projection" and seconds.append(fields["seconds"])
        flops = tg.final_forward_flops(tg.GPT(h.model), h.data, h.optim, h.run)
        tg.check_eval_time(flops, h.evaluation, h.run, val, log)
    assert 0 < seconds[0] < seconds[1]  # smaller chunks: more windows over the same documents


@pytest.mark.parametrize(
    "env,message",
    [
        ({"TTT_LORA_RANK": "0"}, "TTT_LORA_RANK=0"),
        ({"TTT_BETA2": "1.0"}, "TTT_BETA2=1.0"),
        ({"TTT_ENABLED": "1", "GLOBAL_TTT_CHUNK_TOKENS": "64"}, "GLOBAL_TTT_CHUNK_TOKENS=64"),
        ({"EVAL_ONLY": "1", "ARTIFACT_PATH": "/nonexistent.ptz"}, "ARTIFACT_PATH"),
        ({"EVAL_TOKEN_LOSSES": __file__}, "EVAL_TOKEN_LOSSES"),
        ({"EVAL_TOKEN_LOSSES": "/no/such/dir/x.npy"}, "EVAL_TOKEN_LOSSES"),
    ],
)
def test_bad_knobs_name_themselves(tiny_config, env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tiny_config(**env)


def final_line(text: str, label: str) -> tuple[float, float]:
    m = re.search(rf"^final_quant_zstd_{label}_exact val_loss:(\S+) val_bpb:(\S+)", text, re.M)
    return float(m[1]), float(m[2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run whose score-defining (sliding) per-token losses went to a file."""
    tmp = tmp_path_factory.mktemp("ttt_run")
    run = run_train(tmp, ITERATIONS=8, VAL_TOKEN_LIMIT=2048, EVAL_TOKEN_LOSSES=tmp / "sliding.npy")
    assert run.returncode == 0, run.stderr[-2000:]
    return tmp, (tmp / "logs" / "test.txt").read_text(), tmp / "logs" / "test_model.ptz"


@pytest.mark.slow
def test_eval_only_reproduces_the_run_and_writes_token_losses(trained):
    tmp_path, text, artifact = trained
    losses = tmp_path / "sliding.npy"
    sliding = np.load(losses)  # the run's score-defining evaluation: sliding window
    assert sliding.dtype == np.float32 and sliding.shape == (2048,)
    assert abs(float(sliding.mean(dtype=np.float64)) - final_line(text, "sliding_window")[0]) < 1e-6

    ttt_losses = tmp_path / "ttt.npy"
    again = run_train(
        tmp_path,
        RUN_ID="again",
        EVAL_ONLY=1,
        ARTIFACT_PATH=artifact,
        VAL_TOKEN_LIMIT=2048,
        TTT_ENABLED=1,
        EVAL_TOKEN_LOSSES=ttt_losses,
        **TTT_ENV,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    text2 = (tmp_path / "logs" / "again.txt").read_text()
    assert "step:" not in text2 and "eval_only artifact:" in text2
    for label in ("roundtrip", "sliding_window"):  # same artifact, same numbers, bit for bit
        assert final_line(text2, label) == final_line(text, label)
    ttt = final_line(text2, "ttt")
    assert text2.index("final_quant_zstd_sliding") < text2.index("final_quant_zstd_ttt")
    per_token = np.load(ttt_losses)
    assert per_token.shape == (2048,) and abs(float(per_token.mean(dtype=np.float64)) - ttt[0]) < 1e-6
    events = [
        e
        for e in map(__import__("json").loads, (tmp_path / "logs" / "again.jsonl").read_text().splitlines())
        if e["event"] == "final"
    ]
    assert [e["mode"] for e in events] == ["plain", "sliding", "ttt"] and events[-1][
        "val_bpb"
    ] == pytest.approx(ttt[1])
    # Nothing is overwritten, and a missing artifact is one clear line.
    refused = run_train(
        tmp_path, RUN_ID="third", EVAL_ONLY=1, ARTIFACT_PATH=artifact, EVAL_TOKEN_LOSSES=ttt_losses
    )
    missing = run_train(tmp_path, RUN_ID="fourth", EVAL_ONLY=1, ARTIFACT_PATH=tmp_path / "none.ptz")
    for r, knob in ((refused, "EVAL_TOKEN_LOSSES"), (missing, "ARTIFACT_PATH")):
        assert r.returncode == 2 and knob in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_scores(trained, tmp_path):
    artifact = trained[2]
    env = dict(EVAL_ONLY=1, ARTIFACT_PATH=artifact, VAL_TOKEN_LIMIT=2048, TTT_ENABLED=1, **TTT_ENV)
    scores = []
    for n in (1, 2):
        r = run_train(tmp_path / str(n), nproc=n, EVAL_TOKEN_LOSSES=tmp_path / f"{n}.npy", **env)
        assert r.returncode == 0, r.stderr[-2000:]
        scores.append(final_line((tmp_path / str(n) / "logs" / "test.txt").read_text(), "ttt"))
    # Documents are dealt to ranks and the global SGD averages gradients over ranks: the same numbers,
    # up to the order of float sums.
    assert scores[0] == pytest.approx(scores[1], abs=2e-6)
    one, two = np.load(tmp_path / "1.npy"), np.load(tmp_path / "2.npy")
    assert one.shape == two.shape == (2048,) and np.abs(one - two).max() < 1e-4
