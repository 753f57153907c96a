"""Document-isolated attention (RESPECT_DOC_BOUNDARIES): segments cut as the 1.0611 record's loader cuts them,
the flex_attention path equal to the SDPA path, no token reading another document (training and evaluation),
the loader's layout, and the FLOP count from document lengths."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import SAMPLE, TOKENIZER

REPO = Path(__file__).resolve().parents[1]
RECORD = (
    REPO
    / "tests/fixtures/real_records/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py"
)
PLAIN_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "LANG")}
SMALL = {
    "VOCAB_SIZE": "64",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "2048",
    "MICRO_BATCH_TOKENS": "320",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "NUM_LOOPS": "1",
    "PARALLEL_START_LAYER": "3",
    "BIGRAM_VOCAB_SIZE": "64",
    "BIGRAM_DIM": "16",
}


def record_cu_seqlens():
    """The record's _build_cu_seqlens, read from its script (which needs FlashAttention to import)."""
    tree = ast.parse(RECORD.read_text())
    wanted = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("_build_cu_seqlens", "get_next_multiple_of_n")
    ]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(RECORD), "exec"), namespace)
    return namespace["_build_cu_seqlens"]


def random_row(n: int, docs: int, seed: int) -> torch.Tensor:
    """(1, n) token ids >= 2 with `docs` BOS tokens at random positions (sometimes position 0)."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.randint(2, 64, (1, n), generator=gen)
    row[0, torch.randperm(n, generator=gen)[:docs]] = tg.BOS_ID
    return row


@pytest.mark.parametrize("seed", range(6))
def test_segments_are_the_records_cu_seqlens(seed):
    build = record_cu_seqlens()
    n, span = 1000, 64
    row = random_row(n, docs=[0, 1, 3, 9, 30, 200][seed], seed=seed)
    bos = (row[0] == tg.BOS_ID).nonzero().flatten().tolist()
    cu, max_len = build(bos, n, "cpu", span, 64)
    bounds = sorted(set(cu.tolist()))
    segments = tg.document_segments(row, span)[0]
    ours = [0] + (torch.nonzero(segments.diff()).flatten() + 1).tolist() + [n]
    assert ours == bounds
    assert max_len == max(b - a for a, b in zip(ours, ours[1:])) <= span


def dense_reference(q, k, v, segments):
    """Causal attention within segments through one dense (T x T) mask: the definition."""
    T = q.size(2)
    allowed = (segments[:, :, None] == segments[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)


@pytest.mark.parametrize("T,span", [(320, 64), (256, 256), (100, 100), (384, 128)])
def test_flex_and_sdpa_paths_equal_the_dense_definition(T, span):
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 16, generator=gen)
    k, v = torch.randn(2, 2, T, 16, generator=gen), torch.randn(2, 2, T, 16, generator=gen)
    idx = torch.cat((random_row(T, 5, 1), random_row(T, 40, 2)))
    expected = dense_reference(q, k, v, tg.document_segments(idx, span))
    with torch.no_grad():  # flex_attention has no backward on a CPU
        sdpa = tg.causal_attention(q, k, v, tg.document_mask(idx, span, flex=False))
        flex = tg.causal_attention(q, k, v, tg.document_mask(idx, span, flex=True))
    torch.testing.assert_close(sdpa, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, expected, atol=1e-5, rtol=1e-5)


def small_model(**env) -> tuple[tg.GPT, object]:
    h = tg.load_config({**SMALL, **env})
    torch.manual_seed(0)
    model = tg.GPT(h.model).eval()
    with torch.no_grad():  # away from the zero-initialised identity start, so every path carries signal
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.set_looping(True)
    return model, h


@pytest.mark.parametrize("flex", [False, True], ids=["sdpa", "flex"])
def test_training_row_tokens_ignore_other_documents(flex):
    """A packed training row: documents at 0, 30, 100 (190 tokens, cut at 164) and 290."""
    model, h = small_model()
    model.flex_attention = flex
    row = random_row(320, 0, 3)
    row[0, [0, 30, 100, 290]] = tg.BOS_ID
    changed = row.clone()
    changed[0, 5:30] = torch.randint(2, 64, (25,))  # inside the first document only
    with torch.no_grad():
        before, after = (model.logits(x, h.data.train_seq_len) for x in (row, changed))
    moved = (after - before)[0].abs().amax(-1)
    assert moved[:5].max() == 0 and moved[5:30].min() > 0
    assert moved[30:].max() == 0  # every later document, including the cut one
    # The long document's piece from 164 on attends from 164 only. The smear gate (token 163) and the bigram
    # (tokens 162, 163) still read across the cut, as in the record, where only a BOS stops them.
    piece = row.clone()
    piece[0, 110:162] = torch.randint(2, 64, (52,))
    with torch.no_grad():
        moved = (model.logits(piece, h.data.train_seq_len) - before)[0].abs().amax(-1)
    assert moved[164:].max() == 0 and moved[110:162].min() > 0


def test_plain_causal_rows_do_read_other_documents():
    """The same change with RESPECT_DOC_BOUNDARIES=0 reaches later documents: the test above can fail."""
    model, h = small_model(RESPECT_DOC_BOUNDARIES="0")
    row = random_row(320, 0, 3)
    row[0, [0, 30, 100, 290]] = tg.BOS_ID
    changed = row.clone()
    changed[0, 5:30] = torch.randint(2, 64, (25,))
    with torch.no_grad():
        moved = (model.logits(changed, h.data.train_seq_len) - model.logits(row, h.data.train_seq_len))[0]
    assert moved[30:].abs().max() > 0


@pytest.mark.parametrize("stride", [0, 16])
def test_evaluation_windows_stop_at_a_bos(stride):
    """Plain and sliding windows: each scored token's loss is that of its own document alone, read from its
    BOS or the window's start; so changing one document changes no other document's losses."""
    model, h = small_model()
    tokens = random_row(600, 0, 5)[0].int()
    tokens[[0, 50, 220, 400, 410]] = tg.BOS_ID
    changed = tokens.clone()
    changed[230:400] = torch.randint(2, 64, (170,)).int()  # inside the document at 220..399
    tables = (
        torch.ones(64, dtype=torch.int16),
        torch.zeros(64, dtype=torch.bool),
        torch.zeros(64, dtype=torch.bool),
    )
    rt = tg.Runtime(0, 1, torch.device("cpu"), lambda *a, **k: None)
    losses = []
    for t in (tokens, changed):
        out = torch.zeros(t.numel() - 1)
        tg.evaluate(model.logits, t, tables, tg.WindowSpec(64, stride, 4), rt, token_losses=out)
        losses.append(out)
    moved = (losses[1] - losses[0]).abs()  # at target position - 1; the BOS at 400 is its document's target
    assert moved[:229].max() == 0 and moved[400:].max() == 0 and moved[229:400].min() > 0


def test_loader_packs_one_row_of_the_same_tokens(tmp_path):
    """RESPECT_DOC_BOUNDARIES reads the same tokens per step and rank, as one row instead of TRAIN_SEQ_LEN
    rows."""
    files = tg.shard_files(str(SAMPLE), "train")
    batches = {}
    for respect in ("1", "0"):
        h = tg.load_config(
            {"TRAIN_SEQ_LEN": "128", "MICRO_BATCH_TOKENS": "512", "RESPECT_DOC_BOUNDARIES": respect}
        )
        loader = tg.TrainLoader(files, 1, 2, tg.train_rows(h.data)[1], 512, 2, torch.device("cpu"), 1024)
        batches[respect] = [loader.next_step() for _ in range(3)]
    for on_step, off_step in zip(batches["1"], batches["0"]):
        for (x1, y1), (x0, y0) in zip(on_step, off_step):
            assert x1.shape == (1, 512) and x0.shape == (4, 128)
            assert torch.equal(x1.flatten(), x0.flatten()) and torch.equal(y1.flatten(), y0.flatten())


def test_mean_context_counts_pairs_within_segments():
    tokens = np.full(20, 5)
    tokens[[0, 3, 10]] = tg.BOS_ID  # documents of 3, 7 and 10 tokens; span 4 cuts 7 -> 4 + 3, 10 -> 4 + 4 + 2
    pairs = 6 + (10 + 6) + (10 + 10 + 3)
    assert tg.mean_context(tokens, 4) == pytest.approx(pairs / 20)
    assert tg.mean_context(np.full(8, 5), 8) == pytest.approx(36 / 8)  # one segment: (T + 1) / 2


def test_flop_count_follows_document_lengths():
    h = tg.load_config({})
    with torch.device("meta"):
        model = tg.GPT(h.model)
    plain = tg.flops_per_token(model, h.data, False)
    attention = 6 * len(model.orders[0]) * h.data.train_seq_len * h.model.model_dim  # plain causal rows
    assert plain == 6 * tg.matmul_params_per_token(model, False) + attention
    short = tg.flops_per_token(model, h.data, False, context=100.0)
    assert plain - short == pytest.approx(
        12 * len(model.orders[0]) * (h.data.train_seq_len / 2 - 100) * h.model.model_dim
    )
    tokens = tg.read_shard(tg.shard_files(str(SAMPLE), "train")[0])
    context, how = tg.training_context(h.data, tokens)
    assert context == pytest.approx(tg.mean_context(tokens, h.data.train_seq_len)) and "measured" in how
    assert tg.training_context(tg.load_config({"RESPECT_DOC_BOUNDARIES": "0"}).data, tokens)[0] is None


@pytest.mark.slow
def test_dry_run_counts_attention_from_the_shards_documents():
    env = {"DRY_RUN": "1", "DATA_PATH": str(SAMPLE), "TOKENIZER_PATH": str(TOKENIZER), "VOCAB_SIZE": "1024"}
    out = {}
    for respect in ("1", "0"):
        run = subprocess.run(
            [sys.executable, str(REPO / "train_gpt.py")],
            env={**PLAIN_ENV, **env, "RESPECT_DOC_BOUNDARIES": respect},
            capture_output=True,
            text=True,
            check=True,
        )
        lines = run.stdout.splitlines()
        out[respect] = (
            next(line for line in lines if "attention_flops" in line),
            float(
                next(line for line in lines if "loops:off" in line).split("flops_per_token:")[1].split()[0]
            ),
        )
    assert "measured on" in out["1"][0] and "plain causal" in out["0"][0]
    assert out["1"][1] < out["0"][1]  # the sample's documents are shorter than TRAIN_SEQ_LEN


def test_memory_estimate_of_the_packed_row_matches_plain_rows():
    """One packed row saves what rows of TRAIN_SEQ_LEN save (flash-like attention either way), up to the
    segment ids."""
    env = {
        "NUM_LAYERS": "2",
        "MICRO_BATCH_TOKENS": "8192",
        "LOOP_START": "0",
        "LOOP_END": "0",
        "PARALLEL_START_LAYER": "0",
    }
    on, off = (tg.load_config({**env, "RESPECT_DOC_BOUNDARIES": flag}) for flag in ("1", "0"))
    on = tg.saved_activations(on.model, on.data, "cpu", looping=False)
    off = tg.saved_activations(off.model, off.data, "cpu", looping=False)
    assert sum(on.values()) == pytest.approx(sum(off.values()), rel=0.01)


@pytest.mark.slow
def test_flex_path_compiles_with_fullgraph():
    """The whole forward, block mask included, in one graph (CPU inductor here; the same trace on a GPU)."""
    model, h = small_model()
    model.flex_attention = True
    row = random_row(320, 6, 7)
    with torch.no_grad():
        eager = model.logits(row, h.data.train_seq_len)
        compiled = torch.compile(model.logits, fullgraph=True, dynamic=False)(row, h.data.train_seq_len)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
