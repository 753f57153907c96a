"""Pack, verify and compare Parameter Golf record folders (see docs/challenge.md, "Records").

    python tools/records.py pack logs/a.txt logs/b.txt --name MoE10L --author "Ada" --github-id ada \\
        --track track_10min_16mb --check-data data/datasets/fineweb10B_sp1024 \\
        --check-tokenizer data/tokenizers/fineweb_1024_bpe.model
    python tools/records.py verify records/track_10min_16mb/2026-05-01_MoE10L --token-limit 16384
    python tools/records.py verify records/track_10min_16mb/2026-05-01_MoE10L --device cuda --data ... --tokenizer ...
    python tools/records.py compare --baseline records/.../2026-04-27_Old --candidate records/.../2026-05-01_New

Exit status: 0 on success, 1 when a verification check fails or a comparison is not significant,
2 on bad input (a refusal to pack, an unreadable log).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from . import runlog  # imported as tools.records
    from .selfextract import extracted_source, self_extracting
except ImportError:
    import runlog  # run as a script, or with tools/ on sys.path
    from selfextract import extracted_source, self_extracting

FinalEval = runlog.FinalEval

REPO = Path(__file__).resolve().parents[1]
CAP_BYTES = 16_000_000  # the challenge cap, decimal bytes; --cap overrides it for what-ifs and tests
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
RECORD_TRACK = TRACKS[0]
TRAIN_LIMIT_MS = 600_000
# Knobs that name a run rather than define its recipe: they may differ between the seeds of a record.
RUN_IDENTITY_KNOBS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH")
SUBMISSION = "submission.json"
SCRIPT = "train_gpt.py"
READABLE = "train_gpt_readable.py"  # beside a self-extracting SCRIPT (pack --compress-code): what the logs ran


class RecordError(Exception):
    """Bad input or a refusal; the message says what and why."""


# ----------------------------------------------------------------------------------------------
# Statistics: Student's t tail via the regularized incomplete beta function, Welch's t-test
# ----------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float, tol: float = 1e-15, max_iter: int = 1000) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, max_iter + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d, c = 1.0 / guard(1.0 + even * d), guard(1.0 + even / c)
        result *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1.0 / guard(1.0 + odd * d), guard(1.0 + odd / c)
        result *= d * c
        if abs(d * c - 1.0) < tol:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast only below the mean; above it use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (possibly fractional) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@dataclass
class Sample:
    label: str
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for a single value."""
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass
class WelchResult:
    improvement: float  # baseline mean - candidate mean (lower is better)
    margin: float
    alpha: float
    t: float | None = None
    df: float | None = None
    p: float | None = None
    verdict: str = ""

    @property
    def significant(self) -> bool:
        return self.p is not None and self.improvement > 0 and self.p < self.alpha


def welch_test(baseline: Sample, candidate: Sample, margin: float, alpha: float = 0.01) -> WelchResult:
    """One-sided Welch test of H1: baseline mean - candidate mean > margin."""
    result = WelchResult(baseline.mean - candidate.mean, margin, alpha)
    if result.improvement <= 0:
        result.verdict = f"candidate is worse (improvement {result.improvement:+.6g} <= 0)"
        return result
    if baseline.n < 2 or candidate.n < 2:
        small = ", ".join(f"{s.label} has n={s.n}" for s in (baseline, candidate) if s.n < 2)
        result.verdict = f"cannot be tested: {small}, so there is no variance estimate (run more seeds)"
        return result
    var_b, var_c = baseline.std ** 2 / baseline.n, candidate.std ** 2 / candidate.n
    if var_b + var_c == 0:
        result.verdict = "cannot be tested: both samples have zero variance"
        return result
    result.t = (result.improvement - margin) / math.sqrt(var_b + var_c)
    # Welch-Satterthwaite approximation of the degrees of freedom.
    result.df = (var_b + var_c) ** 2 / (var_b ** 2 / (baseline.n - 1) + var_c ** 2 / (candidate.n - 1))
    result.p = t_sf(result.t, result.df)
    if result.p < alpha:
        result.verdict = f"candidate beats baseline by more than the margin at p={result.p:.4g} < {alpha:g}"
    else:
        below = f"; the improvement {result.improvement:.6g} is below the margin" if result.improvement <= margin else ""
        result.verdict = f"not significant: p={result.p:.4g} >= {alpha:g}{below}"
    return result


# ----------------------------------------------------------------------------------------------
# Run logs: tools/runlog.py reads them; a record needs one complete run, checked here
# ----------------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """One complete run, as pack and verify rely on it."""
    path: Path
    torch_version: str
    device: str
    device_name: str
    world_size: int
    config: dict
    steps: int
    train_time_ms: int
    step_avg_ms: float
    pre_quant_val_bpb: float
    artifact_bytes: int
    code_bytes: int
    artifact_path: str
    finals: dict[str, FinalEval] = field(default_factory=dict)
    code_sha256: str | None = None  # of the train_gpt.py that ran (None in logs of older versions)
    start_code_bytes: int | None = None  # its size at the start; code_bytes is the size at export
    artifact_sha256: str | None = None  # from the size_check line (None in logs of older versions)

    @property
    def seed(self) -> int:
        return int(self.config["SEED"])

    @property
    def score(self) -> FinalEval:
        """The official number: the sliding-window eval when it ran, else the round-trip eval."""
        return self.finals.get("sliding_window", self.finals["roundtrip"])

    @property
    def hardware(self) -> str:
        return f"{self.world_size}x {self.device_name or self.device}"


class LogError(RecordError):
    """A log that does not hold one complete run."""


def parse_log(path: str | Path) -> RunLog:
    """Read one train_gpt.py log; raises LogError when the run is incomplete or the log holds several runs."""
    path = Path(path)
    try:
        log = runlog.read(path)
    except OSError as err:
        raise LogError(f"{path}: cannot read the log ({err.strerror})") from None
    if not log.header or not log.config_text:
        raise LogError(f"{path}: no 'python ... torch ... device' header or no 'config' line: not a train_gpt.py log")
    runs = max(log.runs_in_file, log.counts["config"])
    if runs > 1:
        # A reused RUN_ID mixes runs (even interleaved ones): a record must not pick one silently.
        raise LogError(f"{path}: holds {runs} runs (RUN_ID reused?); give each run its own log")
    config = log.config
    if config is None:
        raise LogError(f"{path}: the config line is not valid JSON")
    if "SEED" not in config:
        raise LogError(f"{path}: the config line has no SEED")
    found = dict(step_val=log.last_val, artifact_bytes=log.artifact_bytes, code_bytes=log.code_bytes,
                 total_bytes=log.total_bytes, size_check=log.size_check)
    missing = [k for k, v in found.items() if v is None]
    if "roundtrip" not in log.finals:
        missing.append("final_quant_zstd_roundtrip_exact")
    stride, seq_len = config.get("EVAL_STRIDE", 0), config.get("EVAL_SEQ_LEN") or config.get("TRAIN_SEQ_LEN")
    if stride not in (0, seq_len) and "sliding_window" not in log.finals:
        missing.append("final_quant_zstd_sliding_window_exact")
    if missing:
        raise LogError(f"{path}: lacks final results ({', '.join(missing)} missing): the run crashed or is still running")
    step_val, header = log.last_val, log.header
    return RunLog(
        path=path, torch_version=header.torch, device=header.device, device_name=header.device_name,
        world_size=header.world_size, config=config, steps=step_val.step, train_time_ms=step_val.train_time_ms,
        step_avg_ms=step_val.step_avg_ms,
        # Without EMA the pre-quantization number is the final validation of the raw weights.
        pre_quant_val_bpb=log.pre_quant.val_bpb if log.pre_quant else step_val.val_bpb,
        artifact_bytes=log.artifact_bytes, code_bytes=log.code_bytes,
        artifact_path=log.size_check.artifact_path.strip(), finals=dict(log.finals),
        code_sha256=log.code_sha256, start_code_bytes=log.header_code_bytes, artifact_sha256=log.size_check.sha256)


# ----------------------------------------------------------------------------------------------
# The trainer script: imported by file path, so a record folder is checked with its own copy
# ----------------------------------------------------------------------------------------------
_script_ids = itertools.count()


def load_script(path: str | Path):
    """Import a train_gpt.py by path under a fresh module name (never the repo's cached `train_gpt`)."""
    path = Path(path).resolve()
    name = f"_records_train_gpt_{next(_script_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():
        raise RecordError(f"{path}: no such script")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    val_tokens_sha256: str
    tokenizer_sha256: str


def evaluate_artifact(script, artifact: str | Path, data: str, tokenizer: str, token_limit: int,
                      seq_len: int, stride: int, batch_seqs: int, device: str) -> EvalResult:
    """val_loss/val_bpb of an artifact rebuilt by `script` (a loaded train_gpt module) on the first
    token_limit validation tokens (0: all), plus hashes that identify the data the numbers came from."""
    import torch  # only pack and verify need torch; compare stays light

    dev = torch.device(device)
    model, h = script.load_artifact_model(str(artifact), dev)
    model.eval()
    tables = script.byte_tables(script.load_tokenizer(tokenizer, h.vocab_size))
    tokens = script.load_val_tokens(data, h.vocab_size, token_limit)
    val_loss, val_bpb = script.evaluate(model.logits, tokens, tables, seq_len, stride, batch_seqs, dev)
    tokens_sha = hashlib.sha256(tokens.numpy().astype("<u2").tobytes()).hexdigest()
    return EvalResult(val_loss, val_bpb, tokens_sha, sha256_file(tokenizer))


# ----------------------------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------------------------


def check_same_recipe(runs: list[RunLog]) -> None:
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"duplicate seeds {seeds}: each log must be a different seed")
    recipe = [{k: v for k, v in r.config.items() if k not in RUN_IDENTITY_KNOBS} for r in runs]
    for run, other in zip(runs[1:], recipe[1:]):
        differ = sorted(k for k in recipe[0].keys() | other.keys() if recipe[0].get(k) != other.get(k))
        if differ:
            raise RecordError(f"{run.path} differs from {runs[0].path} in {', '.join(differ)}: "
                              "a record's seeds must share one recipe")


def check_scores(runs: list[RunLog], track: str, allow_partial_eval: bool) -> None:
    for run in runs:
        score = run.score
        if not (math.isfinite(score.val_loss) and math.isfinite(score.val_bpb)):
            raise RecordError(f"{run.path}: non-finite score val_loss={score.val_loss} val_bpb={score.val_bpb}")
        if score.token_limit and not (allow_partial_eval and track != RECORD_TRACK):
            raise RecordError(f"{run.path}: evaluated on the first {score.token_limit} validation tokens only "
                              "(VAL_TOKEN_LIMIT): not a score; only a non-record track with --allow-partial-eval "
                              "may pack it")
        if track == RECORD_TRACK and run.train_time_ms > TRAIN_LIMIT_MS:
            raise RecordError(f"{run.path}: trained {run.train_time_ms / 1000:.1f}s, over the 600s limit of "
                              f"{RECORD_TRACK}; use --track {TRACKS[1]}")
        if track == RECORD_TRACK and (run.world_size != 8 or "H100" not in run.device_name):
            print(f"warning: {run.path}: ran on {run.hardware}, not the 8xH100 of {RECORD_TRACK}", file=sys.stderr)


def check_script(script: Path, runs: list[RunLog]) -> int:
    """The script must be the one every log ran: same size and, from its code_sha256 line, same bytes."""
    if not script.is_file():
        raise RecordError(f"{script}: no such script")
    size, sha = script.stat().st_size, sha256_file(script)
    for run in runs:
        if run.code_sha256 is None:
            raise RecordError(f"{run.path}: no code_sha256 line, so the train_gpt.py that ran cannot be identified "
                              "(a log of an older train_gpt.py?)")
        if run.start_code_bytes is not None and run.start_code_bytes != run.code_bytes:
            raise RecordError(f"{run.path}: train_gpt.py was {run.start_code_bytes} bytes at the start of the run but "
                              f"{run.code_bytes} at export: it was edited during the run, so no script matches the log")
        if run.code_bytes != size or run.code_sha256 != sha:
            raise RecordError(f"{script} ({size} bytes, sha256 {sha[:16]}...) is not the script of {run.path} "
                              f"(Code size {run.code_bytes}, code_sha256 {run.code_sha256[:16]}...): the log came "
                              "from a different train_gpt.py (pass the one that ran with --script)")
    return size


def find_artifact(run: RunLog) -> Path:
    """The artifact the size_check line names: as written, relative to the cwd, or beside the log."""
    named = Path(run.artifact_path)
    tries = [named] if named.is_absolute() else [Path.cwd() / named, run.path.parent.parent / named]
    tries.append(run.path.parent / named.name)
    for path in tries:
        if path.is_file():
            return path
    raise RecordError(f"{run.path}: artifact {run.artifact_path} not found (tried {', '.join(map(str, tries))}); "
                      "pass --artifacts")


def check_artifacts(runs: list[RunLog], artifacts: list[Path], code_bytes: int, cap: int) -> None:
    for run, artifact in zip(runs, artifacts):
        if not artifact.is_file():
            raise RecordError(f"{artifact}: no such artifact")
        size = artifact.stat().st_size
        if size != run.artifact_bytes or (run.artifact_sha256 and sha256_file(artifact) != run.artifact_sha256):
            raise RecordError(f"{artifact} ({size} bytes) is not the artifact {run.path} reports ({run.artifact_bytes} "
                              "bytes, sha256 of its size_check line): overwritten by a later run?")
        if size + code_bytes > cap:
            raise RecordError(f"seed {run.seed}: artifact {size} + code {code_bytes} = {size + code_bytes} bytes "
                              f"exceeds the cap of {cap} bytes by {size + code_bytes - cap}")


def seed_result(run: RunLog) -> dict:
    score = run.score
    return dict(val_loss=score.val_loss, val_bpb=score.val_bpb, artifact_bytes=run.artifact_bytes,
                steps=run.steps, step_avg_ms=run.step_avg_ms, eval_time_s=score.eval_time_ms / 1000,
                pre_quant_val_bpb=run.pre_quant_val_bpb, train_time_s=run.train_time_ms / 1000,
                eval_stride=score.stride, eval_seq_len=score.seq_len, eval_token_limit=score.token_limit,
                log=f"train_seed{run.seed}.txt")


def summarize_config(config: dict) -> str:
    """A one-line description of the recipe, for technique_summary when no --blurb is given."""
    c = config
    parts = [f"{c['NUM_LAYERS']}L x {c['MODEL_DIM']}d, {c['NUM_HEADS']} heads / {c['NUM_KV_HEADS']} KV, "
             f"{c['MLP_ACT']} MLP x{c['MLP_MULT']:g}"]
    if c.get("MOE_MODE", "none") != "none":
        layers = f"layers {c['MOE_LAYERS']}" if c.get("MOE_LAYERS") else f"layers from {c.get('MOE_START_LAYER', 0)}"
        routing = "" if c["MOE_MODE"] == "soft" else f" top-{c['TOP_K']}"  # soft gating uses every expert
        parts.append(f"MoE {c['MOE_MODE']} {c['NUM_EXPERTS']} experts{routing}, {layers}")
    if c.get("BIGRAM_BUCKETS"):
        parts.append(f"BigramHash({c['BIGRAM_BUCKETS']})")
    if c.get("SMEAR_GATE"):
        parts.append("SmearGate")
    if c.get("EMA_DECAY") is not None or c.get("EMA_HORIZON", 0) > 0:
        parts.append("EMA")
    if "MATRIX_BITS" in c:  # issue 11's quantizer
        parts.append(f"{c['QUANT_METHOD'].upper()} int{c['MATRIX_BITS']} / int{c['EMBED_BITS']} embed"
                     f"{' + LQER' if c.get('LQER_ENABLED') else ''} + {c['COMPRESSOR']}")
    else:
        parts.append(f"int{c['QUANT_BITS_MLP']} MLP / int{c['QUANT_BITS_ATTN']} attn / int{c['QUANT_BITS_EMBED']} embed "
                     f"+ zstd-{c['ZSTD_LEVEL']}")
    if c.get("EVAL_STRIDE"):
        parts.append(f"sliding eval stride {c['EVAL_STRIDE']}")
    return ", ".join(parts)


def env_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def changed_knobs(config: dict, knobs: dict) -> dict:
    """Knobs whose logged value differs from the script's default (run identity knobs left out)."""
    return {k: v for k, v in sorted(config.items())
            if k in knobs and k not in RUN_IDENTITY_KNOBS and v != knobs[k][1]}


def render_readme(sub: dict, changed: dict, world_size: int) -> str:
    rows = [f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['pre_quant_val_bpb']:.8f} | "
            f"{r['artifact_bytes']:,} | {r['artifact_bytes'] + sub['bytes_code']:,} | {r['steps']} | "
            f"{r['step_avg_ms']:.2f} | {r['eval_time_s']:.1f} |" for seed, r in sub["seed_results"].items()]

    def fmt(v, spec=".8f"):
        return "n/a" if v is None else format(v, spec)

    rows.append(f"| **mean** | {fmt(sub['val_loss'])} | **{fmt(sub['val_bpb'])}** | | | | | | |")
    rows.append(f"| std | {fmt(sub['val_loss_std'])} | {fmt(sub['val_bpb_std'])} | | | | | | |")
    env = " ".join(f"{k}={env_value(v)}" for k, v in changed.items())
    partial = sub.get("partial_eval")
    warning = (f"\n> **Not a score:** every seed was evaluated on the first {partial['val_token_limit']} "
               "validation tokens only (VAL_TOKEN_LIMIT).\n" if partial else "")
    check = sub["verify_check"]
    return f"""# {sub['name']}

TODO: one paragraph: what is new in this submission and why it should lower val_bpb.
{warning}
- Track: `{sub['track']}`
- Author: {sub['author']} (@{sub['github_id']}), {sub['date']}
- Result: val_bpb **{fmt(sub['val_bpb'])}** (std {fmt(sub['val_bpb_std'])}), val_loss {fmt(sub['val_loss'])} nats, mean of {len(sub['seeds'])} seeds
- Size: {sub['bytes_total']:,} bytes = code {sub['bytes_code']:,} + model {sub['bytes_total'] - sub['bytes_code']:,} (cap {sub['cap_bytes']:,})
- Hardware: {sub['hardware']}, PyTorch {sub['pytorch_version']}
- Recipe: {sub['technique_summary']}

## Results

| seed | val_loss | val_bpb | pre-quant val_bpb | artifact bytes | total bytes | steps | step_avg ms | eval s |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Command

```bash
for SEED in {' '.join(map(str, sub['seeds']))}; do
  RUN_ID={sub['name']}_seed$SEED SEED=$SEED {env} \\
    torchrun --standalone --nproc_per_node={world_size} train_gpt.py
done
```

Knobs not listed keep the defaults of the `train_gpt.py` in this folder.

## What changed and why

TODO: the ideas, with evidence (what each change gained).

## Ablations

TODO: a table of runs that isolate each change.

## Verification

```bash
python tools/records.py verify <this folder> --token-limit {check['tokens']}   # quick CPU check
python tools/records.py verify <this folder> --device cuda --data <val data> --tokenizer <tokenizer>
```
"""


def pack(opts: argparse.Namespace) -> Path:
    """Check everything first, then write the folder, so a refusal leaves nothing behind."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", opts.name):
        raise RecordError(f"--name {opts.name!r}: use letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", opts.date):
        raise RecordError(f"--date {opts.date!r}: expected YYYY-MM-DD")
    runs = [parse_log(p) for p in opts.logs]
    check_same_recipe(runs)
    check_scores(runs, opts.track, opts.allow_partial_eval)
    script = Path(opts.script)
    code_bytes = check_script(script, runs)
    if opts.artifacts and len(opts.artifacts) != len(runs):
        raise RecordError(f"--artifacts: {len(opts.artifacts)} paths for {len(runs)} logs")
    artifacts = [Path(a) for a in opts.artifacts] if opts.artifacts else [find_artifact(r) for r in runs]
    check_artifacts(runs, artifacts, code_bytes, opts.cap)
    folder = Path(opts.records_dir) / opts.track / f"{opts.date}_{opts.name}"
    if folder.exists() and not opts.force:
        raise RecordError(f"{folder} already exists (pass --force to replace it)")

    best = min(range(len(runs)), key=lambda i: runs[i].score.val_bpb)
    module = load_script(script)
    verify_check = quick_check(opts, module, runs[best], artifacts[best])

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(script, folder / SCRIPT)
    if opts.compress_code:
        code_bytes = write_compressed_script(folder, script)
    results = {}
    for i, (run, artifact) in enumerate(zip(runs, artifacts)):
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.txt")
        results[str(run.seed)] = seed_result(run)
        if opts.all_artifacts or i == best:
            shutil.copyfile(artifact, folder / f"model_seed{run.seed}.ptz")
            results[str(run.seed)]["artifact"] = f"model_seed{run.seed}.ptz"
    if sha256_file(folder / verify_check["artifact"]) != verify_check["artifact_sha256"]:
        raise RecordError(f"{folder}: the copied artifact differs from {artifacts[best]} (changed while packing?)")
    sub = build_submission(opts, runs, results, runs[best], code_bytes, verify_check)
    (folder / SUBMISSION).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    readme = render_readme(sub, changed_knobs(runs[0].config, module.KNOBS), runs[0].world_size)
    (folder / "README.md").write_text(readme, encoding="utf-8")
    return folder


def write_compressed_script(folder: Path, script: Path) -> int:
    """Issue 11: the counted train_gpt.py as an lzma self-extracting wrapper, the exact script beside it."""
    source = script.read_bytes()
    (folder / READABLE).write_bytes(source)
    (folder / SCRIPT).write_bytes(self_extracting(source))
    return (folder / SCRIPT).stat().st_size


def quick_check(opts, module, run: RunLog, artifact: Path) -> dict:
    """Evaluate the best artifact on CPU on the first --check-tokens tokens: `verify --token-limit` reference."""
    data = opts.check_data or run.config["DATA_PATH"]
    tokenizer = opts.check_tokenizer or run.config["TOKENIZER_PATH"]
    if not Path(data).is_dir() or not Path(tokenizer).is_file():
        raise RecordError(f"quick check: validation data {data} or tokenizer {tokenizer} not found; "
                          "pass --check-data and --check-tokenizer")
    seq_len = run.score.seq_len
    stride = opts.check_stride or seq_len
    sha = sha256_file(artifact)
    result = evaluate_artifact(module, artifact, data, tokenizer, opts.check_tokens, seq_len, stride,
                               opts.batch_seqs, "cpu")
    return dict(seed=run.seed, artifact=f"model_seed{run.seed}.ptz", artifact_sha256=sha, data=str(data),
                tokenizer=str(tokenizer), tokens=opts.check_tokens, stride=stride, seq_len=seq_len,
                device="cpu", val_loss=result.val_loss, val_bpb=result.val_bpb,
                val_tokens_sha256=result.val_tokens_sha256, tokenizer_sha256=result.tokenizer_sha256)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    sample = Sample("", values)
    return sample.mean, sample.std


def build_submission(opts, runs, results: dict, best: RunLog, code_bytes: int, verify_check: dict) -> dict:
    loss_mean, loss_std = mean_std([r.score.val_loss for r in runs])
    bpb_mean, bpb_std = mean_std([r.score.val_bpb for r in runs])
    limit = best.score.token_limit
    return dict(
        author=opts.author, github_id=opts.github_id, name=opts.name,
        blurb=opts.blurb or "TODO: one-line blurb", date=opts.date, track=opts.track,
        val_loss=loss_mean, val_bpb=bpb_mean, val_loss_std=loss_std, val_bpb_std=bpb_std,
        bytes_total=code_bytes + best.artifact_bytes, bytes_code=code_bytes, cap_bytes=opts.cap,
        seeds=[r.seed for r in runs], best_seed=best.seed, seed_results=results,
        hardware=best.hardware, pytorch_version=best.torch_version,
        technique_summary=opts.blurb or summarize_config(best.config),
        partial_eval=dict(val_token_limit=limit, note="first tokens only: not a score") if limit else None,
        verify_check=verify_check)


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


def size_checks(folder: Path, sub: dict, cap: int) -> list[Check]:
    checks = []
    script = folder / SCRIPT
    code = script.stat().st_size if script.is_file() else -1
    script_sha = sha256_file(script) if script.is_file() else "missing"
    checks.append(Check("code size", code == sub["bytes_code"], f"{SCRIPT} is {code} bytes, bytes_code {sub['bytes_code']}"))
    logged, logged_code, logged_sha = script, code, script_sha
    if (folder / READABLE).is_file() and script.is_file():  # a self-extracting SCRIPT: the logs ran READABLE
        logged = folder / READABLE
        logged_code, logged_sha = logged.stat().st_size, sha256_file(logged)
        checks.append(Check("same program", extracted_source(script.read_bytes()) == logged.read_bytes(),
                            f"{SCRIPT} decompresses to exactly {READABLE}"))
    for seed, claim in sub["seed_results"].items():
        checks += seed_checks(folder, seed, claim, sub["bytes_code"] if logged is script else logged_code,
                              logged_code, logged_sha, cap)
    best = sub["seed_results"][str(sub["best_seed"])]
    artifact = folder / best.get("artifact", "")
    size = artifact.stat().st_size if artifact.is_file() else -1
    checks.append(Check("bytes_total", sub["bytes_total"] == code + size,
                        f"claimed {sub['bytes_total']}, files: code {code} + {artifact.name} {size} = {code + size}"))
    checks.append(Check("cap", code + size <= cap and sub["bytes_total"] <= cap,
                        f"total {code + size} <= cap {cap} (slack {cap - code - size})"))
    for key in ("val_loss", "val_bpb"):
        mean, std = mean_std([r[key] for r in sub["seed_results"].values()])
        ok = close(mean, sub[key], 1e-9) and (std is None) == (sub[f"{key}_std"] is None) \
            and (std is None or close(std, sub[f"{key}_std"], 1e-9))
        checks.append(Check(f"{key} mean/std", ok, f"claimed {sub[key]} / {sub[f'{key}_std']}, "
                                                   f"seeds give {mean} / {std}"))
    return checks


def seed_checks(folder: Path, seed: str, claim: dict, bytes_code: int, code: int, script_sha: str,
                cap: int) -> list[Check]:
    """The seed's log against the claim and the folder: same score, same sizes, the script's sha256; the
    artifact's size and sha256 (against the log's size_check line) if it was packed. The sha256 checks
    run where the log has the line (logs of older train_gpt.py versions lack it)."""
    name = f"seed {seed}"
    try:
        run = parse_log(folder / claim["log"])
    except RecordError as err:
        return [Check(f"{name} log", False, str(err))]
    checks = [
        Check(f"{name} log seed", run.seed == int(seed), f"log SEED {run.seed}"),
        Check(f"{name} log code size", run.code_bytes == bytes_code == code,
              f"log Code size {run.code_bytes}, bytes_code {bytes_code}, {SCRIPT} {code}"),
        Check(f"{name} log artifact size", run.artifact_bytes == claim["artifact_bytes"],
              f"log {run.artifact_bytes}, claimed {claim['artifact_bytes']}"),
        Check(f"{name} log score", run.score.val_bpb == claim["val_bpb"] and run.score.val_loss == claim["val_loss"],
              f"log val_bpb {run.score.val_bpb} val_loss {run.score.val_loss}, "
              f"claimed {claim['val_bpb']} {claim['val_loss']}"),
        Check(f"{name} under cap", claim["artifact_bytes"] + bytes_code <= cap,
              f"{claim['artifact_bytes']} + {bytes_code} = {claim['artifact_bytes'] + bytes_code} <= {cap}"),
    ]
    if run.code_sha256:
        checks.append(Check(f"{name} log code sha256", run.code_sha256 == script_sha,
                            f"log code_sha256 {run.code_sha256[:16]}..., {SCRIPT} {script_sha[:16]}..."))
    if "artifact" in claim:
        artifact = folder / claim["artifact"]
        size = artifact.stat().st_size if artifact.is_file() else -1
        checks.append(Check(f"{name} artifact size", size == claim["artifact_bytes"],
                            f"{claim['artifact']} is {size} bytes, claimed {claim['artifact_bytes']}"))
        if run.artifact_sha256:
            sha = sha256_file(artifact) if artifact.is_file() else "missing"
            checks.append(Check(f"{name} artifact sha256", sha == run.artifact_sha256,
                                f"{claim['artifact']} {sha[:16]}..., log size_check {run.artifact_sha256[:16]}..."))
    return checks


def eval_check(name: str, run_eval, claimed: float, tol: float) -> Check:
    """Run one re-evaluation; a load or data failure is a FAIL with the reason, not a crash."""
    try:
        result = run_eval()
    except Exception as err:  # the folder's own script raises its own error classes (ArtifactError, ...)
        return Check(name, False, f"could not evaluate: {type(err).__name__}: {err}")
    return Check(name, close(result.val_bpb, claimed, tol),
                 f"val_bpb {result.val_bpb:.8f} (val_loss {result.val_loss:.8f}) vs claimed {claimed:.8f}, "
                 f"|diff| {abs(result.val_bpb - claimed):.2e} <= tolerance {tol:g}")


def verify(opts: argparse.Namespace) -> list[Check]:
    folder = Path(opts.folder)
    try:
        sub = json.loads((folder / SUBMISSION).read_text(encoding="utf-8"))
        checks = size_checks(folder, sub, opts.cap)
        check = sub["verify_check"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [Check(SUBMISSION, False, f"unreadable or incomplete: {type(err).__name__}: {err}")]
    artifact = folder / check["artifact"]
    sha = sha256_file(artifact) if artifact.is_file() else "missing"
    checks.append(Check("artifact sha256", sha == check["artifact_sha256"],
                        f"{check['artifact']} {sha[:16]}..., verify_check {check['artifact_sha256'][:16]}..."))
    try:
        module = load_script(folder / SCRIPT)
    except Exception as err:  # an edited script may not even import
        return checks + [Check("import train_gpt.py", False, f"{type(err).__name__}: {err}")]
    data, tokenizer = opts.data or check["data"], opts.tokenizer or check["tokenizer"]
    if opts.token_limit:
        checks += quick_eval_checks(opts, module, folder, check, data, tokenizer)
    else:
        tol = opts.tolerance if opts.tolerance is not None else 1e-3
        for seed, claim in sub["seed_results"].items():
            if "artifact" in claim:
                checks.append(eval_check(
                    f"seed {seed} val_bpb", lambda c=claim: evaluate_artifact(
                        module, folder / c["artifact"], data, tokenizer, c["eval_token_limit"], c["eval_seq_len"],
                        c["eval_stride"], opts.batch_seqs, opts.device), claim["val_bpb"], tol))
    return checks


def quick_eval_checks(opts, module, folder: Path, check: dict, data: str, tokenizer: str) -> list[Check]:
    if opts.token_limit != check["tokens"]:
        return [Check("quick check", False, f"--token-limit {opts.token_limit}: verify_check has a reference "
                                            f"for {check['tokens']} tokens only")]
    tol = opts.tolerance if opts.tolerance is not None else 1e-5  # same code, same device class: near exact
    results = []

    def run_eval():
        result = evaluate_artifact(module, folder / check["artifact"], data, tokenizer, check["tokens"],
                                   check["seq_len"], check["stride"], opts.batch_seqs, opts.device)
        results.append(result)
        return result

    checks = [eval_check(f"quick check ({check['tokens']} tokens) val_bpb", run_eval, check["val_bpb"], tol)]
    if results:  # a mismatch in these explains a val_bpb mismatch: different data, not a different model
        checks.append(Check("quick check data", results[0].val_tokens_sha256 == check["val_tokens_sha256"],
                            f"validation tokens of {data} match verify_check"))
        checks.append(Check("quick check tokenizer", results[0].tokenizer_sha256 == check["tokenizer_sha256"],
                            f"{tokenizer} matches verify_check"))
    return checks


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def load_sample(spec: list[str], label: str, metric: str) -> Sample:
    """Numbers, or one submission.json / record folder (its per-seed `metric`)."""
    if len(spec) == 1 and Path(spec[0]).exists():
        path = Path(spec[0])
        path = path / SUBMISSION if path.is_dir() else path
        try:
            sub = json.loads(path.read_text(encoding="utf-8"))
            values = [float(r[metric]) for r in sub["seed_results"].values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise RecordError(f"{path}: no per-seed {metric} ({type(err).__name__}: {err})") from None
        return Sample(f"{label} ({metric} of {path})", values)
    try:
        return Sample(label, [float(v) for v in spec])
    except ValueError:
        raise RecordError(f"--{label} {' '.join(spec)}: expected numbers, a submission.json or a record folder") from None


def compare(opts: argparse.Namespace) -> WelchResult:
    baseline = load_sample(opts.baseline, "baseline", opts.metric)
    candidate = load_sample(opts.candidate, "candidate", opts.metric)
    result = welch_test(baseline, candidate, opts.margin, opts.alpha)
    for s in (baseline, candidate):
        std = "n/a (n=1)" if s.std is None else f"{s.std:.8f}"
        print(f"{s.label}: n={s.n} mean={s.mean:.8f} std={std}")
    print(f"improvement (baseline - candidate): {result.improvement:+.8f} (margin {opts.margin:g})")
    if result.t is not None:
        print(f"Welch t={result.t:.4f} df={result.df:.2f} one-sided p={result.p:.4g} "
              f"(H1: improvement > {opts.margin:g})")
    print(f"verdict: {result.verdict}")
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="create records/<track>/<date>_<name>/ from run logs")
    p.add_argument("logs", nargs="+", help="one train_gpt.py log per seed")
    p.add_argument("--name", required=True, help="short name, the folder suffix")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", choices=TRACKS, default=RECORD_TRACK)
    p.add_argument("--blurb", default="", help="one line; also the technique_summary (default: from the config)")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--script", default=str(REPO / SCRIPT), help="the train_gpt.py that ran (default: the repo's)")
    p.add_argument("--artifacts", nargs="+", help="artifact per log, in order (default: from the size_check lines)")
    p.add_argument("--all-artifacts", action="store_true", help="include every seed's artifact, not only the best")
    p.add_argument("--records-dir", default=str(REPO / "records"))
    p.add_argument("--cap", type=int, default=CAP_BYTES, help="size cap in bytes (default %(default)s)")
    p.add_argument("--allow-partial-eval", action="store_true",
                   help="accept VAL_TOKEN_LIMIT runs (not a score), on the non-record track only")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--compress-code", action="store_true",
                   help=f"count {SCRIPT} in lzma self-extracting form, with the readable script as {READABLE}")
    p.add_argument("--check-data", help="validation data for the quick check (default: the log's DATA_PATH)")
    p.add_argument("--check-tokenizer", help="tokenizer for the quick check (default: the log's TOKENIZER_PATH)")
    p.add_argument("--check-tokens", type=int, default=16384)
    p.add_argument("--check-stride", type=int, default=0, help="quick check stride (default: non-overlapping)")
    p.add_argument("--batch-seqs", type=int, default=32)

    v = sub.add_parser("verify", help="check a record folder's sizes and re-evaluate its artifact")
    v.add_argument("folder")
    v.add_argument("--data", help="validation data (default: verify_check's)")
    v.add_argument("--tokenizer", help="tokenizer (default: verify_check's)")
    v.add_argument("--token-limit", type=int, default=0,
                   help="quick check on the first N tokens against verify_check (default: full re-evaluation)")
    v.add_argument("--tolerance", type=float, help="max |val_bpb diff| (default 1e-5 quick, 1e-3 full)")
    v.add_argument("--device", default="cpu", help="cpu or cuda")
    v.add_argument("--batch-seqs", type=int, default=32)
    v.add_argument("--cap", type=int, default=CAP_BYTES)

    c = sub.add_parser("compare", help="one-sided Welch t-test: does the candidate beat the baseline by a margin")
    c.add_argument("--baseline", nargs="+", required=True, help="numbers, a submission.json or a record folder")
    c.add_argument("--candidate", nargs="+", required=True, help="numbers, a submission.json or a record folder")
    c.add_argument("--metric", choices=("val_loss", "val_bpb"), default="val_loss",
                   help="per-seed value read from submissions (the 0.005 rule is in nats: val_loss)")
    c.add_argument("--margin", type=float, default=0.005)
    c.add_argument("--alpha", type=float, default=0.01)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        if opts.command == "pack":
            folder = pack(opts)
            print(f"packed {folder}")
            return 0
        if opts.command == "verify":
            checks = verify(opts)
            for check in checks:
                print(check)
            failed = sum(not c.ok for c in checks)
            print(f"{'FAILED' if failed else 'PASSED'}: {len(checks) - failed}/{len(checks)} checks pass")
            return 1 if failed else 0
        return 0 if compare(opts).significant else 1
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
