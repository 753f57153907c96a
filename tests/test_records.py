"""tools/records: statistics against table values, the log parser, pack -> verify, refusals, compare."""

import hashlib
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, SAMPLE, TOKENIZER, run_train
from tools import records
from tools.dev.selfextract import self_extracting
from tools.records.base import hardware
from tools.records.checks_own import flip_probe, normalisation_check

SEEDS = (1, 2)
CHECK_TOKENS = 2048
# Even smaller than TINY_ENV: the suite trains two of these (in parallel) once per module.
RUN_ENV = dict(ITERATIONS=4, VAL_TOKEN_LIMIT=2048, MOE_MODE="none", EVAL_STRIDE=64)


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def test_welch_textbook_example():
    # Wikipedia, "Welch's t-test", example 1: t = -2.46, df = 24.99, two-sided p = 0.021.
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    result = records.welch_test(records.Sample("b", a2), records.Sample("c", a1), margin=0.0)
    assert result.t == pytest.approx(2.46, abs=0.005)
    assert result.df == pytest.approx(24.99, abs=0.005)
    assert 2 * result.p == pytest.approx(0.021, abs=0.0005)


def test_welch_by_hand_with_margin():
    # Means 1.31 and 1.21, both variances 0.0002, n=2: se = sqrt(0.0002), df = 2 exactly, so the
    # tail has the closed form 0.5 - t / (2 sqrt(2 + t^2)).
    result = records.welch_test(
        records.Sample("b", [1.30, 1.32]), records.Sample("c", [1.20, 1.22]), margin=0.005
    )
    t = 0.095 / math.sqrt(0.0002)
    assert result.t == pytest.approx(t, rel=1e-9)
    assert result.df == pytest.approx(2.0, rel=1e-9)
    assert result.p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-8)
    assert result.p == pytest.approx(0.010725, abs=1e-6)
    assert not result.significant and result.verdict.startswith("not significant")
    # Unequal sizes and variances: baseline var 4 (n=3), candidate var 1 (n=3): df = 50/17.
    result = records.welch_test(records.Sample("b", [10, 12, 14]), records.Sample("c", [5, 6, 7]), margin=0.0)
    assert result.t == pytest.approx(6 / math.sqrt(5 / 3), rel=1e-12)
    assert result.df == pytest.approx(50 / 17, rel=1e-12)
    # A fractional df lies between its neighbours' tails (closed forms of Student's t for df = 3 and 2).
    t, u = result.t, result.t / math.sqrt(3)
    assert 0.5 - (math.atan(u) + u / (1 + u * u)) / math.pi < result.p < 0.5 - t / (2 * math.sqrt(2 + t * t))


def test_welch_verdicts():
    worse = records.welch_test(records.Sample("b", [1.0, 1.1]), records.Sample("c", [1.2, 1.3]), 0.005)
    assert worse.verdict.startswith("candidate is worse") and worse.p is None
    single = records.welch_test(records.Sample("b", [1.3]), records.Sample("c", [1.2, 1.21]), 0.005)
    assert single.verdict.startswith("cannot be tested") and "n=1" in single.verdict and single.p is None
    clear = records.welch_test(
        records.Sample("b", [1.30, 1.301, 1.302]), records.Sample("c", [1.20, 1.201, 1.202]), 0.005
    )
    assert clear.significant and clear.verdict.startswith(
        "candidate beats baseline by more than the margin at p="
    )


def test_compare_cli(tmp_path, capsys):
    def submission(name, losses):
        seed_results = {str(i): {"val_loss": v, "val_bpb": v / 1.7} for i, v in enumerate(losses)}
        (tmp_path / name).mkdir()
        (tmp_path / name / "submission.json").write_text(json.dumps({"seed_results": seed_results}))
        return str(tmp_path / name)

    old, new = submission("old", [2.05, 2.06, 2.04]), submission("new", [2.00, 2.001, 1.999])
    assert records.main(["compare", "--baseline", old, "--candidate", new]) == 0
    out = capsys.readouterr().out
    assert "n=3 mean=2.05000000 std=0.01000000" in out and "improvement (baseline - candidate): +0.05" in out
    assert "verdict: candidate beats baseline by more than the margin" in out
    assert (
        records.main(
            ["compare", "--baseline", old, "--candidate", new, "--metric", "val_bpb", "--margin", "0.05"]
        )
        == 1
    )
    assert "not significant" in capsys.readouterr().out
    assert records.main(["compare", "--baseline", "1.30", "--candidate", "1.2", "1.21"]) == 1
    assert "cannot be tested" in capsys.readouterr().out
    assert records.main(["compare", "--baseline", "abc", "--candidate", "1.2"]) == 2


# ----------------------------------------------------------------------------------------------
# real record folders of the challenge (tests/fixtures/real_records)
# ----------------------------------------------------------------------------------------------
FIXTURES = REPO / "tests" / "fixtures" / "real_records"
FOLDERS = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
# Real findings, so verify fails these folders (docs/records_audit.md explains each):
EXPECTED_FAILS = {
    # the committed train_gpt.py (158,429 bytes) is no log's script (all three report 157,868); GPTQ
    # calibration after a 599.5 s training loop ends past 600 s
    "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611": [
        "code size (logs): train_gpt.py is 158429",
        "time (training incl. calibration): train_seed0.log 599.4s + calibration 4.9s > 600.2s",
    ],
    # seed 42 ran with TTT on, seeds 314 and 999 without
    "2026-04-04_SP4096_DepthRecurrence_ParallelResid_MuonEqR": [
        "same configuration across seeds: 3 logs differ in 1 of 77 settings: ttt_enabled"
    ],
    # its logs sit in logs/, where the community's validator does not look; three seeds, three revisions
    "2026-04-10_VarLenAttn": [
        "layout (community validator): missing or invalid: a train log at the top level",
        "same configuration across seeds: 3 logs differ in 5 of 97 settings: code size",
    ],
    # submission.json has no val_bpb (its val_bpb sits under val_loss)
    "2026-03-20_10L_Int5MLP_MuonWD04_SWA50": [
        "layout (community validator): missing or invalid: submission.json val_bpb or mean_val_bpb"
    ],
    # the original runs (GPTQ past 600 s) beside their reruns with an 8 s reserve
    "2026-04-29_SmearGateBOSFix_3Seed_1.06141": [
        "same configuration across seeds: 6 logs differ in 4 of 119 settings",
        "time (training incl. calibration): train_seed1234_original.log 599.5s + calibration 3.5s > 600.2s",
    ],
}
CHANGED_AFTER_THE_RUNS = "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"


def verify_main(folder, capsys, *extra) -> tuple[int, str]:
    status = records.main(["verify", str(folder), *extra])
    return status, capsys.readouterr().out


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name[:24] for f in FOLDERS])
def test_verify_real_folder(folder, capsys):
    status, out = verify_main(folder, capsys)
    failed = [line for line in out.splitlines() if line.startswith("FAIL  ")]
    expected = EXPECTED_FAILS.get(folder.name, [])
    assert status == (1 if expected else 0), out
    assert len(failed) == len(expected), out
    for line, start in zip(failed, expected):
        assert line.startswith(f"FAIL  {start}"), (line, start)
    assert "SKIP  re-evaluation" in out  # no artifact in a competitor's folder: skipped, not failed
    assert (
        re.search(r"PASS  (seed \d+ val_bpb|val_bpb from the logs|val_loss from the logs)", out)
        or "WARN" in out
    )
    assert "PASS  cap: every stated size <= 16,000,000" in out and "Traceback" not in out


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name[:24] for f in FOLDERS])
def test_verify_real_folder_fails_on_a_changed_script(folder, tmp_path, capsys):
    copy = shutil.copytree(folder, tmp_path / folder.name)
    with open(copy / "train_gpt.py", "a") as f:
        f.write("# one more line\n")
    status, out = verify_main(copy, capsys)
    assert status == 1 and re.search(r"(?m)^FAIL  code size", out), out


def test_verify_real_folder_checks_each_claim(tmp_path, capsys):
    folder = shutil.copytree(FIXTURES / "2026-04-06_SP8192_QK5_LegalTTT_1.0828", tmp_path / "f")
    text = (folder / "submission.json").read_text()
    assert text.count('"val_bpb": 1.08209788') == 1
    for old, new, failing in [
        ('"val_bpb": 1.08209788', '"val_bpb": 1.08109788', "seed 0 val_bpb"),
        ('"val_bpb": 1.08279384', '"val_bpb": 1.08179384', "val_bpb mean"),
        ('"bytes_total": 15991018', '"bytes_total": 16000001', "cap"),
        ('"bytes_total": 15991018', '"bytes_total": 15991019', "seed 0 bytes_total"),
    ]:
        (folder / "submission.json").write_text(text.replace(old, new))
        status, out = verify_main(folder, capsys)
        assert status == 1 and f"FAIL  {failing}:" in out, (failing, out)
    # std: the claimed value must be the sample or the population std of the seeds' claims.
    vl = shutil.copytree(FIXTURES / "2026-04-10_VarLenAttn", tmp_path / "v")
    (vl / "submission.json").write_text(
        (vl / "submission.json").read_text().replace("0.00084633", "0.00074633")
    )
    status, out = verify_main(vl, capsys)
    assert status == 1 and "FAIL  val_bpb_std" in out
    original = (FIXTURES / "2026-04-10_VarLenAttn" / "submission.json").read_text()
    (vl / "submission.json").write_text(original.replace("0.00084633", "0.00082"))
    status, out = verify_main(vl, capsys)  # 3% off: another rounding, a caveat only
    assert "FAIL  val_bpb_std" not in out  # (the folder fails on its seeds' configurations, not on this)
    assert "WARN  val_bpb_std: claimed 0.00082; seeds give sample 0.00084633" in out


def test_verify_real_folder_without_logs_or_with_bad_json(tmp_path, capsys):
    folder = shutil.copytree(FIXTURES / "2026-03-17_NaiveBaseline", tmp_path / "f")
    (folder / "train.log").unlink()
    status, out = verify_main(folder, capsys)
    assert "SKIP  logs: no training log" in out and "PASS  code size (bytes_code)" in out
    # Without a log the folder fails only the community validator's layout check (a train log is required).
    fails = [line for line in out.splitlines() if line.startswith("FAIL  ")]
    assert status == 1 and fails == [
        "FAIL  layout (community validator): missing or invalid: a train log at the top level"
    ], fails
    for content in ("{not json", "[1, 2]", '{"val_bpb": "abc", "bytes_code": 47642}'):
        (folder / "submission.json").write_text(content)
        (folder / "train.log").write_text((FIXTURES / "2026-03-17_NaiveBaseline" / "train.log").read_text())
        status, out = verify_main(folder, capsys)
        assert status == 1 and "FAIL" in out and "Traceback" not in out, content
    status, out = verify_main(tmp_path / "absent", capsys)
    assert status == 1 and "FAIL  submission.json" in out


def test_verify_warns_where_a_claim_is_not_the_last_evaluation(capsys):
    # (both folders fail other checks: EXPECTED_FAILS)
    status, out = verify_main(FIXTURES / "2026-04-04_SP4096_DepthRecurrence_ParallelResid_MuonEqR", capsys)
    assert (
        "WARN  seed 42 val_bpb: claimed 1.08938974 is train_seed42.log's earlier evaluation "
        "final_int6_sliding_window; its last final evaluation, final_int6_ttt, gives 1.336032"
    ) in out
    status, out = verify_main(FIXTURES / "2026-03-20_10L_Int5MLP_MuonWD04_SWA50", capsys)
    assert "WARN  val_loss from the logs" in out and "submission.json labels a val_bpb as val_loss" in out


def test_compare_real_folders(capsys):
    old = FIXTURES / "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon"  # no per-seed list: scores from its logs
    new = FIXTURES / "2026-04-06_SP8192_QK5_LegalTTT_1.0828"  # per-seed claims under "seeds"
    assert (
        records.main(["compare", "--baseline", str(old), "--candidate", str(new), "--metric", "val_bpb"]) == 0
    )
    out = capsys.readouterr().out
    assert f"from the logs of {old}: train_seed1337.log, train_seed2025.log, train_seed42.log" in out
    assert "n=3 mean=1.11937967" in out and "n=3 mean=1.08279384" in out
    assert "verdict: candidate beats baseline by more than the margin" in out
    # The other way round the improvement is negative: not significant, exit 1.
    assert (
        records.main(["compare", "--baseline", str(new), "--candidate", str(old), "--metric", "val_bpb"]) == 1
    )
    assert "candidate is worse" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# the log parser
# ----------------------------------------------------------------------------------------------
CODE_SHA, ARTIFACT_SHA = "c0de" * 16, "a7" * 32
CANNED_LOG = f"""python 3.11.7 torch 2.14.1+cu130 device cuda:0 (NVIDIA H100 80GB HBM3) world_size 8 grad_accum 1
code_sha256:{CODE_SHA} code_bytes:71124
config {{"EVAL_SEQ_LEN": 128, "EVAL_STRIDE": 32, "SEED": 1337, "TRAIN_SEQ_LEN": 128, "VAL_TOKEN_LIMIT": 0}}
params total:158857 active_matmul_per_token:141824 router:512 moe_mode:soft moe_layers:[0, 1]
step:30/30 train_loss:5.1056 train_time:9629ms step_avg:320.98ms tok/s:12761 mfu:1.0%
step:30/30 val_loss:5.4080 val_bpb:3.0533 train_time:9631ms step_avg:321.05ms
pre_quant_ema val_loss:5.41612600 val_bpb:3.05788679
Serialized model quant+zstd: 240785 bytes
Code size: 71124 bytes
Total submission size quant+zstd: 311909 bytes
size_check total:311909 cap:16000000 slack:15688091 OK artifact:logs/run_x_model.ptz sha256:{ARTIFACT_SHA}
final_quant_zstd_roundtrip_exact val_loss:5.41610870 val_bpb:3.05787703 stride:128 seq_len:128 eval_time:248ms
final_quant_zstd_sliding_window_exact val_loss:5.41674422 val_bpb:3.05823583 stride:32 seq_len:128 eval_time:1070ms
"""  # noqa: E501 (log lines verbatim, as the trainer prints them)


def test_parse_canned_log(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text(CANNED_LOG)
    run = records.parse_log(path)
    assert (run.seed, run.steps, run.train_time_ms, run.step_avg_ms) == (1337, 30, 9631, 321.05)
    assert (run.artifact_bytes, run.code_bytes, run.size_check.artifact_path) == (
        240785,
        71124,
        "logs/run_x_model.ptz",
    )
    assert run.pre_quant_val_bpb == 3.05788679
    assert hardware(run) == "8x NVIDIA H100 80GB HBM3" and run.torch == "2.14.1+cu130"
    assert (run.score.val_loss, run.score.val_bpb, run.score.stride, run.score.eval_time_ms) == (
        5.41674422,
        3.05823583,
        32,
        1070,
    )
    assert run.score.token_limit == 0
    assert (run.code_sha256, run.start_code_bytes, run.size_check.sha256) == (CODE_SHA, 71124, ARTIFACT_SHA)

    # A log of an older train_gpt.py, without the sha256 lines, still parses (pack then refuses it).
    path.write_text(
        CANNED_LOG.replace(f"code_sha256:{CODE_SHA} code_bytes:71124\n", "").replace(
            f" sha256:{ARTIFACT_SHA}", ""
        )
    )
    run = records.parse_log(path)
    assert (run.code_sha256, run.size_check.sha256, run.size_check.artifact_path) == (
        None,
        None,
        "logs/run_x_model.ptz",
    )

    # EVAL_STRIDE=0: no sliding line, the round trip is the score.
    path.write_text(
        CANNED_LOG.replace('"EVAL_STRIDE": 32', '"EVAL_STRIDE": 0').rsplit("final_quant_zstd_sliding", 1)[0]
    )
    assert records.parse_log(path).score.val_bpb == 3.05787703


def test_parse_our_jsonl_beside_the_text(tmp_path):
    """With RUN_ID.jsonl beside the text, pack reads the events; the artifact's path and sha256 come from
    the text's size_check line when the event lacks them; the token limit and geometry from the knobs."""

    def event(kind, **fields):
        return json.dumps({"event": kind, "time": 1.0, **fields})

    knobs = {
        "EVAL_SEQ_LEN": 128,
        "EVAL_STRIDE": 32,
        "SEED": 1337,
        "TRAIN_SEQ_LEN": 128,
        "VAL_TOKEN_LIMIT": 4096,
    }
    (tmp_path / "run.jsonl").write_text(
        "\n".join(
            [
                event(
                    "config",
                    knobs=knobs,
                    code_sha256=CODE_SHA,
                    code_bytes=71124,
                    torch="2.14.1",
                    python="3.12",
                    device="cpu",
                    world_size=1,
                    grad_accum=1,
                ),
                event(
                    "step",
                    step=30,
                    iterations=30,
                    train_loss=5.1,
                    train_time_ms=9629.0,
                    step_avg_ms=320.98,
                    tok_s=1.0,
                    mfu=None,
                ),
                event(
                    "size_check",
                    code_bytes=71124,
                    artifact_bytes=240785,
                    total_bytes=311909,
                    cap=16000000,
                    slack=1,
                ),
                event(
                    "final",
                    name="final_quant_zstd_roundtrip_exact",
                    mode="plain",
                    val_loss=5.4,
                    val_bpb=3.05,
                    eval_time_s=0.2,
                ),
                event(
                    "final",
                    name="final_quant_zstd_sliding_window_exact",
                    mode="sliding",
                    val_loss=5.41,
                    val_bpb=3.04,
                    eval_time_s=1.0,
                ),
                event("end", status="ok"),
            ]
        )
        + "\n"
    )
    (tmp_path / "run.txt").write_text(CANNED_LOG)
    run = records.parse_log(tmp_path / "run.txt")
    assert run.source == "jsonl" and (run.score.val_bpb, run.score.stride, run.score.seq_len) == (
        3.04,
        32,
        128,
    )
    assert (
        run.score.token_limit == 4096
    )  # a partial evaluation stays marked: pack refuses it on the record track
    assert (run.size_check.artifact_path, run.size_check.sha256) == ("logs/run_x_model.ptz", ARTIFACT_SHA)
    assert (run.seed, run.steps, run.code_sha256, run.start_code_bytes) == (1337, 30, CODE_SHA, 71124)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda log: log.rsplit("final_quant_zstd_sliding", 1)[0],
            "lacks final results",
        ),  # died in sliding eval
        (lambda log: log.split("Serialized", 1)[0], "lacks final results"),
        (lambda log: log + log, "holds 2 runs"),  # train_gpt.py appends when a RUN_ID is reused
        (lambda log: log.replace("python 3.11.7", "pithon"), "not a train_gpt.py log"),
        (lambda log: log.replace('"SEED": 1337, ', ""), "has no SEED"),
        (lambda log: log.replace('"SEED": 1337', '"SEED": 1337,'), "not valid JSON"),
    ],
)
def test_parse_refuses_incomplete_logs(tmp_path, edit, message):
    path = tmp_path / "run.txt"
    path.write_text(edit(CANNED_LOG))
    with pytest.raises(records.LogError, match=message):
        records.parse_log(path)


# ----------------------------------------------------------------------------------------------
# pack and verify on real tiny runs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny seeds trained in parallel, plus a snapshot of the train_gpt.py they ran."""
    for _attempt in range(3):  # others may edit the repo's train_gpt.py while we train: snapshot and retry
        root = tmp_path_factory.mktemp("runs")
        script = root / "train_gpt.py"
        shutil.copyfile(REPO / "train_gpt.py", script)

        def train(seed, root=root):
            (root / f"seed{seed}").mkdir()
            return run_train(root / f"seed{seed}", SEED=seed, **RUN_ENV)

        with ThreadPoolExecutor(len(SEEDS)) as pool:
            results = list(pool.map(train, SEEDS))
        for result in results:
            assert result.returncode == 0, result.stderr[-3000:]
        logs = [root / f"seed{seed}" / "logs" / "test.txt" for seed in SEEDS]
        code = script.read_bytes()
        ran = [records.parse_log(log) for log in logs]
        if all(
            r.code_sha256 == hashlib.sha256(code).hexdigest()
            and r.start_code_bytes == r.source_code_bytes == len(code)
            for r in ran
        ):
            return dict(root=root, script=script, logs=logs)
    pytest.skip("train_gpt.py kept changing while the fixture trained")


def pack_args(runs, records_dir, *extra):
    return [
        "pack",
        *map(str, runs["logs"]),
        "--name",
        "Tiny",
        "--author",
        "Test",
        "--github-id",
        "test",
        "--track",
        "track_non_record_16mb",
        "--allow-partial-eval",
        "--date",
        "2026-01-02",
        "--script",
        str(runs["script"]),
        "--records-dir",
        str(records_dir),
        "--check-data",
        str(SAMPLE),
        "--check-tokenizer",
        str(TOKENIZER),
        "--check-tokens",
        str(CHECK_TOKENS),
        *extra,
    ]


@pytest.fixture(scope="module")
def packed(runs):
    records_dir = runs["root"] / "records"
    assert records.main(pack_args(runs, records_dir)) == 0
    return records_dir / "track_non_record_16mb" / "2026-01-02_Tiny"


@pytest.fixture
def folder_copy(packed, tmp_path):
    """A private copy of the packed folder for tests that tamper with it."""
    return shutil.copytree(packed, tmp_path / packed.name)


def failed(checks):
    return [c.name for c in checks if not c.ok]


def swap_one_letter(code: bytes) -> bytes:
    """The same script but for the case of the letter after its first "# ": same size, other bytes."""
    i = code.index(b"#") + 2
    assert chr(code[i]).isalpha()
    return code[:i] + bytes([code[i] ^ 0x20]) + code[i + 1 :]


@pytest.mark.slow
def test_parse_real_log(runs):
    log = runs["logs"][0]
    run = records.parse_log(log)
    text = log.read_text()
    sliding = next(
        line for line in text.splitlines() if line.startswith("final_quant_zstd_sliding_window_exact")
    )
    fields = dict(part.split(":", 1) for part in sliding.split()[1:6])
    # The JSONL beside the log holds the exact values; the text line rounds them to 8 places.
    assert run.source == "jsonl"
    assert run.score.val_loss == pytest.approx(float(fields["val_loss"]), abs=1e-8)
    assert run.score.val_bpb == pytest.approx(float(fields["val_bpb"]), abs=1e-8)
    assert (run.score.stride, run.score.seq_len, run.score.token_limit) == (
        64,
        128,
        RUN_ENV["VAL_TOKEN_LIMIT"],
    )
    assert (run.seed, run.steps, run.world_size, run.device) == (SEEDS[0], RUN_ENV["ITERATIONS"], 1, "cpu")
    assert run.artifact_bytes == (log.parent / "test_model.ptz").stat().st_size
    assert run.source_code_bytes == runs["script"].stat().st_size
    assert run.code_bytes == len(self_extracting(runs["script"].read_bytes()))  # counted as shipped
    assert records.find_artifact(run) == log.parent / "test_model.ptz"


@pytest.mark.slow
def test_pack_writes_a_complete_folder(runs, packed):
    sub = json.loads((packed / "submission.json").read_text())
    parsed = [records.parse_log(log) for log in runs["logs"]]
    best = min(parsed, key=lambda r: r.score.val_bpb)
    assert sub["seeds"] == list(SEEDS) and sub["best_seed"] == best.seed
    assert sub["val_bpb"] == pytest.approx(sum(r.score.val_bpb for r in parsed) / 2, abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(
        abs(parsed[0].score.val_loss - parsed[1].score.val_loss) / math.sqrt(2)
    )
    assert sub["bytes_code"] == runs["script"].stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + best.artifact_bytes
    assert (
        sub["hardware"] == "1x cpu" and sub["partial_eval"]["val_token_limit"] == RUN_ENV["VAL_TOKEN_LIMIT"]
    )
    assert set(sub["seed_results"][str(best.seed)]) >= {
        "val_loss",
        "val_bpb",
        "artifact_bytes",
        "steps",
        "step_avg_ms",
        "eval_time_s",
        "pre_quant_val_bpb",
    }
    assert sub["verify_check"]["tokens"] == CHECK_TOKENS and sub["verify_check"]["seed"] == best.seed
    assert (packed / "train_gpt.py").read_bytes() == runs["script"].read_bytes()
    assert sorted(p.name for p in packed.iterdir()) == sorted(
        ["README.md", "submission.json", "train_gpt.py", f"model_seed{best.seed}.ptz"]
        + [f"train_seed{s}.{ext}" for s in SEEDS for ext in ("jsonl", "txt")]
    )
    readme = (packed / "README.md").read_text()
    assert readme.count("TODO") >= 3 and "Not a score" in readme
    assert f"| {SEEDS[0]} | {parsed[0].score.val_loss:.8f} | {parsed[0].score.val_bpb:.8f} |" in readme
    assert "ITERATIONS=4" in readme and "NUM_LAYERS=2" in readme and "SEED=$SEED" in readme
    assert (
        "RUN_ID=test" not in readme and "NUM_EXPERTS=" not in readme
    )  # identity knobs and defaults left out


@pytest.mark.slow
def test_verify_passes_quick_and_full(packed, capsys):
    assert records.main(["verify", str(packed), "--token-limit", str(CHECK_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert "PASS  quick check" in out and "FAIL" not in out
    checks = records.verify(packed)  # full: re-evaluates on the claim's own (partial) token range
    assert not failed(checks), [c.detail for c in checks if not c.ok]
    progress = capsys.readouterr().err  # the re-score's phases as they run, not minutes of silence
    assert re.search(r"^verify: seed \d+: final roundtrip evaluation: started \(", progress, re.M), progress
    assert re.search(r"^verify: seed \d+: final_quant_zstd_\w+ val_loss:", progress, re.M), progress
    assert any(c.name.endswith("re-score (EVAL_ONLY)") and "|diff|" in c.detail for c in checks)
    probes = {re.sub(r" \d+\)", ")", c.name): c.status for c in checks if "probe" in c.name}
    assert probes == {
        "causality probe (plain)": "PASS",
        "causality probe (sliding)": "PASS",
        "causality probe (ttt)": "PASS",
        "normalisation probe": "PASS",
    }, probes
    names = {c.name for c in checks}
    assert {f"seed {s} log code sha256" for s in SEEDS} <= names  # the folder's script is the one that ran
    best = json.loads((packed / "submission.json").read_text())["best_seed"]
    assert f"seed {best} artifact sha256" in names  # the packed artifact is the one the log wrote


@pytest.mark.slow
def test_verify_fails_on_one_changed_artifact_byte(folder_copy):
    artifact = next(folder_copy.glob("model_seed*.ptz"))
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    artifact.write_bytes(bytes(blob))
    bad = failed(records.verify(folder_copy, token_limit=CHECK_TOKENS))
    assert "artifact sha256" in bad and any(name.startswith("quick check") for name in bad)
    assert (
        f"{artifact.stem.replace('model_seed', 'seed ')} artifact sha256" in bad
    )  # against the log's size_check


@pytest.mark.slow
def test_verify_fails_on_a_wrong_claimed_bpb(folder_copy):
    path = folder_copy / "submission.json"
    sub = json.loads(path.read_text())
    best = sub["seed_results"][str(sub["best_seed"])]
    best["val_bpb"] -= 0.01
    sub["val_bpb"] -= 0.01 / 2  # keep the mean consistent: only the log and the re-evaluation can tell
    path.write_text(json.dumps(sub))
    bad = failed(records.verify(folder_copy))
    assert (
        f"seed {sub['best_seed']} re-score (EVAL_ONLY)" in bad and f"seed {sub['best_seed']} log score" in bad
    )


@pytest.mark.slow
def test_verify_fails_on_an_edited_script(folder_copy):
    with open(folder_copy / "train_gpt.py", "a") as f:
        f.write("# one more line\n")
    bad = failed(records.verify(folder_copy, token_limit=CHECK_TOKENS))
    assert "code size (bytes_code)" in bad and "bytes_total" in bad
    assert {f"seed {s} log code sha256" for s in SEEDS} <= set(bad)


@pytest.mark.slow
def test_verify_fails_on_a_same_size_edit_of_the_script(folder_copy):
    script = folder_copy / "train_gpt.py"
    code = script.read_bytes()
    script.write_bytes(swap_one_letter(code))
    bad = failed(records.verify(folder_copy, token_limit=CHECK_TOKENS))
    assert {f"seed {s} log code sha256" for s in SEEDS} <= set(bad)
    assert "code size (bytes_code)" not in bad and "bytes_total" not in bad  # only the sha256 can tell


@pytest.mark.slow
def test_verify_without_a_reference_for_the_token_limit(packed):
    # Another token count is another measurement, not a wrong one: shown as a warning, nothing fails.
    checks = records.verify(packed, token_limit=100)
    assert failed(checks) == []
    assert [c.status for c in checks if c.name == "quick check (100 tokens)"] == ["WARN"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "log", "script"])
def test_verify_refuses_a_folder_whose_model_log_or_script_is_a_link(folder_copy, tmp_path, kind):
    name = {"model": "model_seed*.ptz", "log": "train_seed*.txt", "script": "train_gpt.py"}[kind]
    path = next(folder_copy.glob(name))
    outside = tmp_path / "elsewhere" / path.name
    outside.parent.mkdir()
    path.rename(outside)
    path.symlink_to(outside)  # every byte the same: only the link itself can tell
    checks = records.verify(folder_copy)
    assert [(c.name, c.status) for c in checks] == [
        ("plain files only", "FAIL"),
        ("every other check", "SKIP"),
    ]
    assert f"{path.name} -> {outside}" in checks[0].detail


@pytest.mark.slow
def test_verify_lists_every_file_pack_did_not_write_and_quick_says_what_it_skipped(folder_copy, capsys):
    with open(folder_copy / "extra.bin", "wb") as f:
        f.truncate(20_000_000)
    (folder_copy / "notes").mkdir()
    (folder_copy / "notes" / "todo.txt").write_text("more")
    status, out = verify_main(folder_copy, capsys, "--quick")
    assert status == 0, out
    assert (
        "WARN  files as packed: 2 file(s) pack did not write (not checked, not counted): "
        "extra.bin (20,000,000 bytes), notes/todo.txt (4 bytes)"
    ) in out
    assert "SKIP  re-score: --quick: the artifact was not evaluated (rerun without --quick)" in out
    assert "SKIP  legality probes: --quick" in out and "re-scoring" not in capsys.readouterr().err
    (folder_copy / "passwd").symlink_to("/etc/passwd")
    status, out = verify_main(folder_copy, capsys, "--quick")
    assert status == 1 and "FAIL  plain files only: links in" in out and "passwd -> /etc/passwd" in out


@pytest.mark.slow
def test_verify_refuses_a_submission_naming_files_outside_the_folder(folder_copy, tmp_path):
    path = folder_copy / "submission.json"
    sub = json.loads(path.read_text())
    claim = sub["seed_results"][str(sub["best_seed"])]
    shutil.copyfile(folder_copy / claim["log"], tmp_path / "stray.txt")
    claim["log"] = f"../{tmp_path.name}/stray.txt"
    path.write_text(json.dumps(sub))
    checks = records.verify(folder_copy)
    assert [(c.name, c.status) for c in checks] == [
        ("files named inside the folder", "FAIL"),
        ("every other check", "SKIP"),
    ]


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pack_refuses_over_the_cap(runs, tmp_path, capsys):
    size = records.parse_log(runs["logs"][0]).artifact_bytes + runs["script"].stat().st_size
    assert records.main(pack_args(runs, tmp_path, "--cap", str(size - 1))) == 2
    assert "exceeds the cap" in capsys.readouterr().err
    assert not (tmp_path / "track_non_record_16mb").exists()


@pytest.mark.slow
def test_pack_refuses_partial_eval_on_the_record_track(runs, tmp_path, capsys):
    args = pack_args(runs, tmp_path)
    args[args.index("track_non_record_16mb")] = "track_10min_16mb"
    assert records.main(args) == 2
    assert "not a score" in capsys.readouterr().err
    args.remove("--allow-partial-eval")
    assert records.main(args) == 2


@pytest.mark.slow
def test_pack_refuses_a_different_script(runs, tmp_path, capsys):
    other = tmp_path / "train_gpt.py"
    other.write_bytes(runs["script"].read_bytes() + b"\n")
    args = pack_args(runs, tmp_path)
    args[args.index("--script") + 1] = str(other)
    assert records.main(args) == 2
    assert "different train_gpt.py" in capsys.readouterr().err


@pytest.mark.slow
def test_pack_refuses_a_same_size_script_by_its_sha256(runs, tmp_path, capsys):
    other = tmp_path / "train_gpt.py"
    other.write_bytes(swap_one_letter(runs["script"].read_bytes()))
    assert other.stat().st_size == runs["script"].stat().st_size
    args = pack_args(runs, tmp_path)
    args[args.index("--script") + 1] = str(other)
    assert records.main(args) == 2
    assert "different train_gpt.py" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda log: "\n".join(line for line in log.splitlines() if not line.startswith("code_sha256:")),
            "no code_sha256 line",
        ),
        (
            lambda log: re.sub(
                r"(?m)^(code_sha256:\S+ code_bytes:)(\d+)", lambda m: m[1] + str(int(m[2]) + 1), log
            ),
            "edited during the run",
        ),
    ],
)
def test_pack_refuses_a_log_that_does_not_identify_its_script(runs, tmp_path, capsys, edit, message):
    log = tmp_path / "edited.txt"
    log.write_text(edit(runs["logs"][1].read_text()))
    assert log.read_text() != runs["logs"][1].read_text()
    args = pack_args(runs, tmp_path)
    args[2] = str(log)
    assert records.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_pack_refuses_an_artifact_with_another_sha256(runs, tmp_path, capsys):
    artifacts = [tmp_path / f"a{i}.ptz" for i in range(len(SEEDS))]
    for log, artifact in zip(runs["logs"], artifacts):
        shutil.copyfile(log.parent / "test_model.ptz", artifact)
    blob = bytearray(artifacts[0].read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size: only the sha256 of the size_check line can tell
    artifacts[0].write_bytes(bytes(blob))
    assert records.main(pack_args(runs, tmp_path, "--artifacts", *map(str, artifacts))) == 2
    assert f"{artifacts[0]} ({len(blob)} bytes) is not the artifact" in capsys.readouterr().err
    assert not (tmp_path / "track_non_record_16mb").exists()


@pytest.mark.slow
def test_pack_refuses_a_log_without_final_results(runs, tmp_path, capsys):
    truncated = tmp_path / "truncated.txt"
    truncated.write_text(runs["logs"][1].read_text().split("final_quant_zstd_roundtrip")[0])
    args = pack_args(runs, tmp_path)
    args[2] = str(truncated)
    assert records.main(args) == 2
    assert "lacks final results" in capsys.readouterr().err


@pytest.mark.slow
def test_pack_refuses_an_existing_folder_unless_forced(runs, tmp_path, capsys):
    assert records.main(pack_args(runs, tmp_path)) == 0
    assert records.main(pack_args(runs, tmp_path)) == 2
    assert "already exists" in capsys.readouterr().err
    capsys.readouterr()
    folder = tmp_path / "track_non_record_16mb" / "2026-01-02_Tiny"
    (folder / "notes.txt").write_text("mine")  # a file pack did not write: kept, never deleted
    readme = (folder / "README.md").read_text()
    (folder / "README.md").write_text(readme + "hand-written paragraph\n")  # edited since pack wrote it
    assert records.main(pack_args(runs, tmp_path, "--force", "--all-artifacts")) == 2
    assert "edited since pack wrote them: README.md" in capsys.readouterr().err
    assert (folder / "README.md").read_text().endswith("hand-written paragraph\n")
    (folder / "README.md").write_text(readme)
    assert records.main(pack_args(runs, tmp_path, "--force", "--all-artifacts")) == 0
    err = capsys.readouterr().err
    assert (
        "replacing in" in err and "README.md" in err and "submission.json" in err and "notes.txt" not in err
    )
    assert (folder / "notes.txt").read_text() == "mine"
    assert len(list(folder.glob("model_seed*.ptz"))) == len(SEEDS)


@pytest.mark.slow
def test_pack_into_an_existing_file_is_refused_with_or_without_force(runs, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for force in ((), ("--force",)):
        assert records.main(pack_args(runs, tmp_path, "--folder", str(target), *force)) == 2
        err = capsys.readouterr().err
        assert err == f"error: --folder {target}: a file, not a folder; name a new folder\n", err
    assert target.read_text() == "mine"


@pytest.mark.slow
def test_pack_into_a_named_folder_ships_the_smallest_artifact(runs, tmp_path, capsys):
    folder = tmp_path / "study" / "shipped" / "dense"
    about = tmp_path / "about.md"
    args = pack_args(runs, tmp_path / "unused", "--folder", str(folder), "--ship", "smallest", "--about")
    assert records.main([*args, str(about)]) == 2  # no such file: refused before anything is written
    assert "about.md" in capsys.readouterr().err and not folder.exists()
    about.write_text("The dense arm of a study, shipped so it can be re-scored.\n")
    assert records.main([*args, str(about)]) == 0
    assert not (tmp_path / "unused").exists()
    parsed = [records.parse_log(log) for log in runs["logs"]]
    smallest = min(parsed, key=lambda r: (r.artifact_bytes, r.seed))
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["best_seed"] == smallest.seed == sub["verify_check"]["seed"]
    assert sub["bytes_total"] == sub["bytes_code"] + smallest.artifact_bytes
    assert [p.name for p in folder.glob("*.ptz")] == [f"model_seed{smallest.seed}.ptz"]
    readme = (folder / "README.md").read_text()
    assert "The dense arm of a study, shipped" in readme and "TODO" not in readme and "## Command" in readme


@pytest.mark.slow
def test_verify_checks_every_record_folder_packed_inside_a_study(packed, tmp_path, capsys):
    """A study folder without its own submission.json, shipping two packed arms: both are verified, each
    check named by its folder; one changed byte in one arm fails that arm only."""
    study = tmp_path / "study"
    for arm in ("dense", "soft4"):
        shutil.copytree(packed, study / "shipped" / arm)
    checks = records.verify(study, token_limit=CHECK_TOKENS)
    assert not failed(checks)
    prefixes = {c.name.split(": ", 1)[0] for c in checks}
    assert prefixes == {"shipped/dense", "shipped/soft4"}
    assert "shipped/soft4: quick check (2048 tokens) val_bpb" in {c.name for c in checks}
    artifact = next((study / "shipped" / "soft4").glob("model_seed*.ptz"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    bad = failed(records.verify(study, token_limit=CHECK_TOKENS))
    assert bad and all(name.startswith("shipped/soft4: ") for name in bad), bad
    (tmp_path / "empty_study").mkdir()
    assert records.main(["verify", str(tmp_path / "empty_study")]) == 1  # no submission anywhere: a FAIL
    assert "FAIL  submission.json" in capsys.readouterr().out


# the counted script in self-extracting form, the readable script beside it
@pytest.mark.slow
def test_pack_compress_code_counts_the_wrapper_and_verify_checks_it_is_the_same_program(
    runs, tmp_path, capsys
):
    assert records.main(pack_args(runs, tmp_path, "--compress-code")) == 0
    folder = tmp_path / "track_non_record_16mb" / "2026-01-02_Tiny"
    wrapper, readable = folder / records.SCRIPT, folder / records.READABLE
    assert readable.read_bytes() == runs["script"].read_bytes()
    assert wrapper.stat().st_size < readable.stat().st_size // 2
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_code"] == wrapper.stat().st_size
    checks = records.verify(folder, token_limit=CHECK_TOKENS)  # evaluates with the wrapper as the script
    assert not failed(checks) and any(c.name == "same program" for c in checks)
    readable.write_bytes(swap_one_letter(readable.read_bytes()))
    assert "same program" in failed(records.verify(folder, token_limit=CHECK_TOKENS))


# ----------------------------------------------------------------------------------------------
# the reviewers' checks, each on a doctored copy of a real folder
# ----------------------------------------------------------------------------------------------
CLEAN = "2026-04-06_SP8192_QK5_LegalTTT_1.0828"  # passes every reviewer check


def doctored(tmp_path, name=CLEAN, track=None):
    """A copy of a fixture folder (under tmp/<track>/ when a track is given)."""
    return shutil.copytree(FIXTURES / name, tmp_path / (track or "any") / name)


def edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def line_of(out, name):
    return next(
        (line for line in out.splitlines() if re.match(rf"(PASS|WARN|FAIL|SKIP)  {re.escape(name)}:", line)),
        "",
    )


def test_reviewer_checks_pass_on_a_clean_record(capsys):
    status, out = verify_main(FIXTURES / CLEAN, capsys)
    assert status == 0, out
    assert line_of(out, "size as shipped").startswith(
        "PASS  size as shipped: code train_gpt.py 16,719 (a compressed wrapper) + model 15,975,827"
    )
    assert (
        "PASS  data provenance: train_seed0.log, train_seed1234.log, train_seed42.log: train_shards 80, "
        in out
    )
    assert "the sp8192 export's full validation set" in out
    assert "PASS  same configuration across seeds: 3 logs agree on" in out
    assert "PASS  time (training incl. calibration): train_seed0.log 588.0s + calibration 11.3s" in out
    assert "PASS  time (evaluation): train_seed0.log 293.4s (legal_ttt_exact)" in out
    assert "PASS  recomputed mean: claimed 1.08279384; 3 log(s)" in out


def test_size_as_shipped_fails_over_the_cap(tmp_path, capsys):
    folder = doctored(tmp_path)
    with open(folder / "train_gpt.py", "a") as f:  # slack 7,454: a wrapper 7,455 bytes longer is over
        f.write("#" * 7454 + "\n")
    status, out = verify_main(folder, capsys)
    assert status == 1
    assert line_of(out, "size as shipped").startswith(
        "FAIL  size as shipped: code train_gpt.py 24,174 (a compressed wrapper) + model 15,975,827 "
        "(train_seed42.log) = 16,000,001 bytes"
    )


def test_size_as_shipped_counts_a_readable_script_as_shipped(tmp_path, capsys):
    name = "2026-04-14_MultiPhaseGlobalSGD_PhasedTTT"  # ships 122,168 readable bytes, logs count 27,610
    status, out = verify_main(FIXTURES / name, capsys)
    line = line_of(out, "size as shipped")
    assert line.startswith("WARN  size as shipped: code train_gpt.py 122,168 + model 15,912,231"), line
    assert "= 16,034,399 bytes" in line and "the logs printed totals up to 15,939,841, 94,558 less" in line
    assert "would total 15,942,481, which the folder does not contain" in line
    folder = doctored(tmp_path, name)
    with open(folder / "train_gpt.py", "a") as f:  # 100 KB that no compressor can shrink
        f.write("# " + random_text(100_000) + "\n")
    status, out = verify_main(folder, capsys)
    assert status == 1 and line_of(out, "size as shipped").endswith(": over the cap")


def random_text(n):
    import random

    rng = random.Random(0)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


def test_data_provenance_fails_on_more_shards_or_fewer_validation_tokens(tmp_path, capsys):
    folder = doctored(tmp_path)
    log = folder / "train_seed42.log"
    edit(log, "train_shards: 80\n", "train_shards: 1499\n")
    status, out = verify_main(folder, capsys)
    assert status == 1
    line = line_of(out, "data provenance")
    assert (
        line.startswith("FAIL  data provenance") and "1499 train shards, beyond the 128 of the sp8192" in line
    )
    edit(log, "train_shards: 1499\n", "train_shards: 80\n")
    edit(log, "val_tokens: 40540160\n", "val_tokens: 8108032\n")
    status, out = verify_main(folder, capsys)
    line = line_of(out, "data provenance")
    assert (
        status == 1
        and "train_seed42.log: train_shards 80, val_tokens 8,108,032: a validation set smaller "
        "than the sp8192 export's 40,540,160 tokens"
        in line
    )


def test_same_configuration_fails_on_a_changed_setting_or_code(tmp_path, capsys):
    folder = doctored(tmp_path)
    edit(folder / "train_seed42.log", "  matrix_lr: 0.02\n", "  matrix_lr: 0.03\n")
    status, out = verify_main(folder, capsys)
    line = line_of(out, "same configuration across seeds")
    assert status == 1 and "matrix_lr: train_seed0.log 0.02 vs train_seed42.log 0.03" in line
    folder = doctored(tmp_path / "2")
    edit(folder / "train_seed0.log", "Code size: 16719 bytes", "Code size: 16720 bytes")
    status, out = verify_main(folder, capsys)
    line = line_of(out, "same configuration across seeds")
    assert status == 1 and "code size: train_seed0.log 16720 vs train_seed1234.log 16719" in line


@pytest.mark.parametrize(
    "old, new, phase, shown",
    [
        (
            "train_time: 588015ms step: 5082",
            "train_time: 598015ms step: 5082",
            "training",
            "598.0s + calibration 11.3s > 600.2s",
        ),
        (
            "GPTQ:collected 67 Hessians in 11.3s",
            "GPTQ:collected 67 Hessians in 12.5s",
            "training",
            "588.0s + calibration 12.5s > 600.2s",
        ),
        (  # train_gpt.py's own line, later than train time + calibration (a pause between them)
            "GPTQ:collected 67 Hessians in 11.3s",
            "GPTQ:collected 67 Hessians in 11.3s\ntraining_and_calibration: ended at 603.5s (training 588.0s "
            "+ calibration 11.3s) of MAX_WALLCLOCK_SECONDS=600",
            "training",
            "588.0s + calibration 11.3s, ended at 603.5s > 600.2s",
        ),
        (
            "val_bpb:1.08314800 eval_time:289945ms",
            "val_bpb:1.08314800 eval_time:610000ms",
            "evaluation",
            "610.0s (legal_ttt_exact) > 600.0s",
        ),
    ],
)
def test_time_fails_past_600_seconds(tmp_path, capsys, old, new, phase, shown):
    folder = doctored(tmp_path)
    edit(folder / "train_seed42.log", old, new)
    status, out = verify_main(folder, capsys)
    name = "time (training incl. calibration)" if phase == "training" else "time (evaluation)"
    line = line_of(out, name)
    assert status == 1 and line.startswith(f"FAIL  {name}") and f"train_seed42.log {shown}" in line, line
    # The non-record track may break the limit: the same logs are a warning there.
    folder = doctored(tmp_path / "nr", track="track_non_record_16mb")
    edit(folder / "train_seed42.log", old, new)
    status, out = verify_main(folder, capsys)
    assert status == 0 and line_of(out, name).startswith(f"WARN  {name}")


def test_time_warns_where_not_logged(tmp_path, capsys):
    folder = doctored(tmp_path)
    edit(folder / "train_seed42.log", "val_bpb:1.08314800 eval_time:289945ms", "val_bpb:1.08314800")
    status, out = verify_main(folder, capsys)
    assert status == 0 and "WARN  time (evaluation)" in out and "train_seed42.log not logged" in out


def test_recomputed_mean_fails_when_the_logs_miss_the_claim(tmp_path, capsys):
    folder = doctored(tmp_path)
    edit(folder / "submission.json", '"val_bpb": 1.08279384', '"val_bpb": 1.08179384')
    status, out = verify_main(folder, capsys)
    line = line_of(out, "recomputed mean")
    assert status == 1 and line.startswith("FAIL  recomputed mean: claimed 1.08179384; 3 log(s)")
    assert "give 1.08279384" in line and "claimed - logs -0.001000" in line
    # A claim that is one seed's score, not the mean of the seeds: a warning that says so.
    status, out = verify_main(FIXTURES / "2026-03-20_11L_XSA4_EMA_Int6_MLP3x_WD04_1.1271", capsys)
    assert "the claim is the score of one run (1337), not the mean" in line_of(out, "recomputed mean")


def test_legality_hints_name_the_lines(tmp_path, capsys):
    status, out = verify_main(FIXTURES / "2026-03-17_NaiveBaseline", capsys)
    assert "PASS  legality hint: no n-gram/PPM mixture" in out
    folder = doctored(tmp_path, "2026-03-17_NaiveBaseline")
    n = len((folder / "train_gpt.py").read_text().splitlines())
    with open(folder / "train_gpt.py", "a") as f:
        f.write(
            "\n\ndef eval_ttt_doctored(model, opt, tokens):\n"  # n+3
            "    loss = model(tokens)\n"
            "    loss.backward()\n"  # n+5: an update ...
            "    opt.step()\n"
            "    loss_sum = loss.detach()\n"
            "    loss_sum += loss\n"  # n+8: ... before the score
            "\n\ndef collect_hessians_doctored(model, val_tokens):\n"  # n+11
            "    return model(val_tokens)\n"  # n+12
            "\n\nngram_cache = {}\n"  # n+15
        )
    status, out = verify_main(folder, capsys)
    assert (
        f"WARN  legality hint (update before score): score each token before any update that saw it: "
        f"eval_ttt_doctored: update at line {n + 5}, first score at line {n + 8}" in out
    )
    assert (
        "WARN  legality hint (validation data in training): " in out
        and f"{n + 12}: return model(val_tokens)" in out
    )
    assert "WARN  legality hint (n-gram / PPM): " in out and f"{n + 15}: ngram_cache = {{}}" in out


def test_compare_states_both_rules(tmp_path, capsys):
    old = FIXTURES / "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon"
    new = FIXTURES / "2026-04-06_SP8192_QK5_LegalTTT_1.0828"
    assert records.main(["compare", str(old), str(new), "--metric", "val_bpb"]) == 0
    out = capsys.readouterr().out
    assert "README rule (beat A by 0.005 at p < 0.01):" in out
    assert "chronological rule (beat A at p < 0.25):" in out


def test_verify_skips_the_rescore_with_the_data_hint(tmp_path, capsys):
    study = REPO / "records" / "track_non_record_16mb" / "2026-11-25_MoE_vs_Dense_Study"
    status, out = verify_main(study, capsys)
    hint = (
        f"rerun with: python3 -m tools.records verify {study} --data <folder with fineweb_val_*.bin> "
        "--tokenizer <tokenizer .model>"
    )
    assert status == 0 and "SKIP  re-score: validation data" in out and hint in out, out
    assert "SKIP  legality probes" in out


def test_flip_probe_catches_a_look_ahead():
    import torch

    tokens = torch.arange(40) % 7

    def causal(toks):
        return torch.cumsum(toks.float(), 0)[1:]  # loss of target p from tokens <= p

    def peeks(toks):
        return torch.cat([toks[2:].float(), torch.zeros(1)])  # loss of target p sees token p + 1

    assert flip_probe(causal, tokens, 20)[0]
    ok, detail = flip_probe(peeks, tokens, 20)
    assert not ok and "1 of 19 earlier losses changed" in detail


def test_normalisation_probe_fails_on_non_finite_logits():
    import torch

    assert normalisation_check(torch.randn(4, 32)).ok
    bad = torch.randn(4, 32)
    bad[2, 5] = float("nan")
    check = normalisation_check(bad)
    assert not check.ok and "max |sum of p - 1| inf" in check.detail
