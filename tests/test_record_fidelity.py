"""Our trainer against the 1.0611 record's own train_gpt.py (imported unmodified, CPU stand-ins in
tools/dev/record_oracle.py): the stand-ins against the kernels' math, then parameters, forward, backward,
optimizer and schedule on the same weights (tools/dev/record_fidelity.py writes docs/record_fidelity.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from tools.dev import record_fidelity as rf
from tools.dev import record_oracle as oracle


# ---- the stand-ins -------------------------------------------------------------------------------
def naive_attention(q, k, v, allowed):
    """q (T, H, D), k/v (T, H_kv, D), allowed (T, T) bool: softmax attention written out."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.size(-1))
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v)


def test_flash_attn_standins_are_causal_grouped_and_per_document():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, n, 8, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    out = oracle.flash_attn_func(q[None], k[None], v[None], causal=True)[0]
    torch.testing.assert_close(out, naive_attention(q, k, v, causal))
    # documents [0, 5) and [5, 12), cu_seqlens padded with repeats as the record buckets them
    cu = torch.tensor([0, 5, 12, 12, 12], dtype=torch.int32)
    doc = torch.tensor([0] * 5 + [1] * 7)
    out = oracle.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal & (doc[:, None] == doc[None, :])))
    with pytest.raises(NotImplementedError, match="window"):
        oracle.flash_attn_func(q[None], k[None], v[None], causal=True, window_size=(4, 0))


def streamed_softcapped_ce(logits, targets, softcap, block=1024):
    """_softcapped_ce_fwd_kernel's loop, one row at a time: an online max / sum of exponentials over
    column blocks of the sigmoid-form softcap."""
    losses, lses = [], []
    for row, t in zip(logits.double(), targets.tolist()):
        running_max, sum_exp = -math.inf, 0.0
        for off in range(0, row.numel(), block):
            z = 2 * softcap * torch.sigmoid(row[off : off + block] * (2 / softcap))
            new_max = max(running_max, z.max().item())
            sum_exp = sum_exp * math.exp(running_max - new_max) + torch.exp(z - new_max).sum().item()
            running_max = new_max
        lse = running_max + math.log(sum_exp)
        lses.append(lse)
        losses.append(lse - 2 * softcap * torch.sigmoid(row[t] * (2 / softcap)).item())
    return torch.tensor(losses), torch.tensor(lses)


def test_softcapped_ce_standin_is_the_kernels_math():
    gen = torch.Generator().manual_seed(1)
    logits = (20 * torch.randn(6, 2500, generator=gen)).requires_grad_()
    targets = torch.randint(0, 2500, (6,), generator=gen)
    losses, lse = oracle.softcapped_ce_rows(logits.detach(), targets, 30.0)
    ref_losses, ref_lse = streamed_softcapped_ce(logits.detach(), targets, 30.0)
    torch.testing.assert_close(losses.double(), ref_losses.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-6, atol=1e-4)
    # the backward kernel's gradient is that of the cross-entropy of tanh-softcapped logits
    oracle.softcapped_cross_entropy(logits, targets, 30.0).backward()
    eager = logits.detach().clone().requires_grad_()
    F.cross_entropy(30.0 * torch.tanh(eager / 30.0), targets).backward()
    torch.testing.assert_close(logits.grad, eager.grad, rtol=1e-4, atol=1e-7)


def test_fused_mlp_standin_under_the_records_autograd_function():
    rec = oracle.load_record(oracle.RECORD_1061)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    w1 = torch.randn(64, 16, generator=gen, requires_grad=True)
    w2 = torch.randn(16, 64, generator=gen, requires_grad=True)
    out = rec.FusedLeakyReLUSquareMLP(x, w1, w2)  # the record's Function, our kernel stand-in inside
    eager = F.linear(F.leaky_relu(F.linear(x, w1), 0.5).square(), w2)
    torch.testing.assert_close(out, eager)
    seed = torch.randn(out.shape, generator=gen)
    fused_grads = torch.autograd.grad(out, (x, w1, w2), seed)
    eager_grads = torch.autograd.grad(eager, (x, w1, w2), seed)
    for a, b in zip(fused_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_record_is_imported_unmodified_with_its_logged_configuration():
    rec = oracle.load_record(oracle.RECORD_1061)
    assert rec.__file__ == str(oracle.RECORD_1061 / "train_gpt.py")
    assert rec.softcapped_cross_entropy is oracle.softcapped_cross_entropy
    h = oracle.record_hparams(oracle.RECORD_1061)
    assert (h.skip_gates_enabled, h.smear_gate_enabled, h.sparse_attn_gate_scale) == (True, True, 0.5)
    with pytest.raises(KeyError, match="not_a_setting"):
        oracle.record_hparams(oracle.RECORD_1061, not_a_setting=1)


# ---- parameters ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return rf.paired_models()


def test_every_record_tensor_maps_at_the_small_shape(pair):
    _, rmodel, ours = pair
    rows = rf.parameter_map(rmodel, {n for n, _ in ours.named_parameters()})
    unmapped = {r["record"].split("[")[0] for r in rows if r["ours"] is None}
    assert unmapped == {"parallel_post_lambdas", "parallel_resid_lambdas"}  # layers 0-7: never read
    mapped = [r["ours"] for r in rows if r["ours"] is not None]
    assert sorted(mapped) == sorted(n for n, _ in ours.named_parameters())  # each of ours exactly once


@pytest.mark.slow
def test_full_shape_parameter_difference_is_explained_row_by_row():
    count, logged = rf.full_param_counts(oracle.RECORD_1061)
    assert count == logged == 35945671
    total, diff = rf.count_difference(oracle.RECORD_1061)
    assert total == count - rf.ours_full_count()
    assert sum(n for _, n in diff) == total
    kinds = {what.split(" ")[1].strip("`").split("[")[0]: 0 for what, _ in diff}
    for what, n in diff:
        kinds[what.split(" ")[1].strip("`").split("[")[0]] += n
    assert kinds == {"parallel_post_lambdas": 32, "parallel_resid_lambdas": 16}  # layers 0-7, never read


# ---- forward and backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("looping", [False, True])
def test_forward_matches_the_record(pair, looping):
    _, rmodel, ours = pair
    x, _ = rf.tokens(bos_every=17)
    assert rf.forward_gap(rmodel, ours, x, looping) < 1e-4  # fp32 round-off through 11-17 layers
    assert rf.hidden_gap64(looping) < 1e-10  # in fp64: the same function


@pytest.mark.parametrize("looping", [False, True])
def test_backward_matches_the_record(pair, looping):
    _, rmodel, ours = pair
    x, y = rf.tokens(bos_every=17)
    loss_gap, gaps, silent = rf.backward_gaps(rmodel, ours, x, y, looping)
    assert loss_gap < 1e-5 and not silent
    assert len(gaps) == len(list(ours.parameters()))
    assert max(gaps.values()) < 1e-3


def test_a_misplaced_tensor_is_caught(pair):
    """The comparison can fail: swapping two layers' query weights in ours moves the logits."""
    _, rmodel, ours = pair
    x, _ = rf.tokens(bos_every=17)
    q3, q4 = ours.blocks[3].attn.c_q.weight, ours.blocks[4].attn.c_q.weight
    saved = q3.detach().clone()
    with torch.no_grad():
        q3.copy_(q4)
    try:
        assert rf.forward_gap(rmodel, ours, x, False) > 1e-2
    finally:
        with torch.no_grad():
            q3.copy_(saved)


def test_rope_frequencies_are_the_records(pair):
    _, rmodel, ours = pair
    for rblock, oblock in zip(rmodel.blocks, ours.blocks):
        assert torch.equal(rblock.attn.rotary.inv_freq.float(), oblock.attn.rotary.inv_freq)


@pytest.mark.parametrize("looping", [False, True])
def test_document_isolated_forward_matches(looping):
    """One packed row with a BOS every 17 tokens and one document longer than the training sequence: the
    record's varlen forward (cu_seqlens at every BOS, long documents cut) against our default."""
    assert rf.document_isolated_gap(looping) < 1e-4


def test_without_document_isolation_the_packed_row_differs():
    """The comparison above sees the isolation: ours attending across the row is not the record."""
    rec, rmodel, ours = rf.paired_models()  # OURS_ALIGNED: isolation off
    x, _ = rf.tokens(batch=1, seq=3 * rf.DOC_SPAN, bos_every=17)
    bos = (x[0] == 1).nonzero().flatten().tolist()
    cu, max_len = rec._build_cu_seqlens(bos, x.size(1), x.device, rf.DOC_SPAN)
    rmodel.eval()
    ours.eval()
    with torch.no_grad():
        gap = (rmodel.forward_logits(x, cu_seqlens=cu, max_seqlen=max_len) - ours.logits(x)).abs().max()
    assert gap > 1e-2


@pytest.mark.parametrize("off", ["SKIP_GATES_ENABLED", "SMEAR_GATE"])
def test_without_the_records_gates_the_forward_differs(off):
    """The comparison sees the gated skips and the SmearGate: ours without either is not the record."""
    _, rmodel, ours = rf.paired_models(our_env={**rf.OURS_ALIGNED, off: 0})
    x, _ = rf.tokens(bos_every=17)
    assert rf.forward_gap(rmodel, ours, x, False) > 1e-2


# ---- optimizer and schedule --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("frac", [0.0, 0.2, 0.9])
def test_one_optimizer_step_matches_the_records_step_fn(frac):
    x, y = rf.tokens(bos_every=17)
    result = rf.step_gaps(frac, round(frac * rf.RECORD_STEPS), x, y, muon="fp64")
    assert result["lrs"][0] == result["lrs"][1]  # peak lr, applied lr and weight decay of every group
    assert max(result["gaps"].values()) < 1e-4, result["gaps"]
    assert abs(result["momenta"][0] - result["momenta"][1]) < 1e-3


def test_schedule_matches_the_records_lr_mul_and_loop_switch():
    for frac, rec_lr, our_lr, rec_mom, our_mom, rec_loop, our_loop in rf.schedule_rows():
        assert rec_lr == pytest.approx(our_lr, abs=1e-12), frac
        assert rec_loop == our_loop, frac
        assert abs(rec_mom - our_mom) < 1e-3, frac


# ---- data, quantization, evaluation --------------------------------------------------------------------
def test_same_training_tokens_per_step_and_rank_until_a_shard_runs_out(tmp_path):
    rows = rf.data_rows(tmp_path, steps=4)
    by_step = {}
    for step, _, _, equal in rows:
        by_step.setdefault(step, []).append(equal)
    # 2 ranks x 2 micro-steps x 513 tokens per step: the 6,000-token shard holds 2 whole steps and a half;
    # then the record jumps to the next shard and we read on (docs/record_fidelity.md row 10)
    assert all(by_step[0]) and all(by_step[1])
    assert not all(by_step[2]) and not any(by_step[3])


@pytest.mark.slow
def test_gptq_core_and_scales_are_the_records():
    rows = rf.quant_rows()
    assert all(r["grid"][0] == r["grid"][1] for r in rows)  # bits and clip sigmas per tensor
    assert all(r["scale_equal"] and r["core_equal"] == 1.0 for r in rows)


def test_byte_accounting_is_the_records():
    assert rf.byte_tables_equal()


@pytest.mark.slow
def test_evaluation_matches_the_records_eval_val_without_the_smear_across_cuts():
    e = rf.eval_gaps(smear=False)
    assert abs(e["record"][0] - e["ours"][0]) < 1e-6 and abs(e["record"][1] - e["ours"][1]) < 1e-6
    assert e["token_gap"] < 1e-4
    crossing = rf.eval_gaps(smear=True)  # row 14: the record's smear crosses its segment cuts
    assert abs(crossing["record"][0] - crossing["ours"][0]) > 1e-4


# ---- part 3: the other records -------------------------------------------------------------------------
def test_the_1_06141_record_is_ours_with_its_sparse_gate_scale():
    folder = oracle.RECORD_10614
    assert rf.fixture_env(folder) == {"SPARSE_ATTN_GATE_SCALE": "1.0"}
    env, gap_off, gap_on = rf.fixture_forward_gaps(folder)
    assert gap_off < 1e-4 and gap_on < 1e-4
    differing = {name for name, _, _ in rf.config_rows(folder)}
    assert {"warmdown_frac", "beta2", "ttt_lora_rank", "sparse_attn_gate_scale"} <= differing


def test_an_older_fixture_without_a_configuration_block_is_reported_not_run():
    row = rf.fixture_row(oracle.RECORDS / "2026-03-17_NaiveBaseline")
    assert "no log prints its configuration" in row
    assert "self-extracting" in rf.fixture_row(oracle.RECORDS / "2026-04-06_SP8192_QK5_LegalTTT_1.0828")


def test_the_written_report_has_every_component_and_row():
    text = (REPO / "docs" / "record_fidelity.md").read_text()
    for heading in (
        "parameters",
        "Forward and backward",
        "Optimizer step and schedule",
        "Data",
        "Quantization",
        "Evaluation",
        "Differences, row by row",
        "Other fixtures",
    ):
        assert any(line.startswith("## ") and heading in line for line in text.splitlines()), heading
    rows = [
        line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))
    assert "**fixed**" in rows[0] and "test_document_isolated_forward_matches" in rows[0]
