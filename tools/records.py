"""Pack, verify and compare Parameter Golf record folders (rules: docs/challenge_rules.md).

    python tools/records.py pack logs/a.txt logs/b.txt --name MoE10L --author "Ada" --github-id ada \\
        --track track_10min_16mb --check-data data/datasets/fineweb10B_sp1024 \\
        --check-tokenizer data/tokenizers/fineweb_1024_bpe.model
    python tools/records.py verify records/track_10min_16mb/2026-05-01_MoE10L --token-limit 16384
    python tools/records.py verify records/track_10min_16mb/2026-05-01_MoE10L --device cuda \\
        --data ... --tokenizer ...
    python tools/records.py compare records/.../2026-04-27_Old records/.../2026-05-01_New   # A, then B
    python tools/records.py audit <challenge clone>/records > records_audit_table.md

verify checks what the challenge's reviewers checked (size as shipped, data provenance, one
configuration across seeds, time, the recomputed mean, legality hints from the script text, the
community validator's layout); on a folder this tool packed it also re-scores each artifact with
EVAL_ONLY and runs the one-token-flip causality and normalisation probes on it.

Exit status: 0 on success, 1 when a verification check fails or a comparison is not significant,
2 on bad input (a refusal to pack, an unreadable log).
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import importlib.util
import itertools
import json
import lzma
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
import dataclasses
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

try:
    from . import runlog  # imported as tools.records
    from .common import mean_std, sha256_file
    from .selfextract import extracted_source, self_extracting
except ImportError:
    import runlog  # run as a script, or with tools/ on sys.path
    from common import mean_std, sha256_file
    from selfextract import extracted_source, self_extracting

RunLog = runlog.RunLog

REPO = Path(__file__).resolve().parents[1]
CAP_BYTES = 16_000_000  # the challenge cap, decimal bytes; --cap overrides it for what-ifs and tests
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
RECORD_TRACK = TRACKS[0]
TRAIN_LIMIT_MS = 600_000
# Knobs that name a run rather than define its recipe: they may differ between the seeds of a record.
RUN_IDENTITY_KNOBS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH")
SUBMISSION = "submission.json"
SCRIPT = "train_gpt.py"
READABLE = (
    "train_gpt_readable.py"  # beside a self-extracting SCRIPT (pack --compress-code): what the logs ran
)


class RecordError(Exception):
    """Bad input or a refusal; the message says what and why."""


# ----------------------------------------------------------------------------------------------
# Statistics: Welch's t-test (scipy.stats)
# ----------------------------------------------------------------------------------------------
README_MARGIN, README_ALPHA = 0.005, 0.01  # the README's rule: beat the record by 0.005 nats at p < 0.01
CHRONOLOGICAL_ALPHA = 0.25  # the maintainers' final audit: beat the previous row at one-sided p < 0.25


@dataclass
class Sample:
    label: str
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for a single value."""
        return mean_std(self.values)[1]


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
    var_b, var_c = baseline.std**2 / baseline.n, candidate.std**2 / candidate.n
    if var_b + var_c == 0:
        result.verdict = "cannot be tested: both samples have zero variance"
        return result
    from scipy import stats  # only compare needs it

    shifted = [v - margin for v in baseline.values]  # H1: baseline - margin > candidate
    test = stats.ttest_ind(shifted, candidate.values, equal_var=False, alternative="greater")
    result.t, result.df, result.p = float(test.statistic), float(test.df), float(test.pvalue)
    if result.p < alpha:
        result.verdict = f"candidate beats baseline by more than the margin at p={result.p:.4g} < {alpha:g}"
    else:
        below = (
            f"; the improvement {result.improvement:.6g} is below the margin"
            if result.improvement <= margin
            else ""
        )
        result.verdict = f"not significant: p={result.p:.4g} >= {alpha:g}{below}"
    return result


# ----------------------------------------------------------------------------------------------
# Run logs: tools/runlog.py reads them; a record of ours needs one complete run, checked here
# ----------------------------------------------------------------------------------------------


class LogError(RecordError):
    """A log that does not hold one complete run."""


def hardware(run: RunLog) -> str:
    return f"{run.world_size}x {run.device_name or run.device}"


def parse_log(path: str | Path) -> RunLog:
    """One of our train_gpt.py logs (its JSONL when beside it), refused with LogError when the run is
    incomplete or the file holds several runs."""
    path = Path(path)
    try:
        log = runlog.read(path)
        text = path.read_text(encoding="utf-8", errors="replace") if log.source == "text" else ""
    except OSError as err:
        raise LogError(f"{path}: cannot read the log ({err.strerror})") from None
    configs = len(re.findall(r"(?m)^config ", text)) if log.source == "text" else int(log.config is not None)
    if not log.torch or not configs:
        raise LogError(
            f"{path}: no 'python ... torch ... device' header or no 'config' line: not a train_gpt.py log"
        )
    runs = max(log.runs_in_file, configs)
    if runs > 1:
        # A reused RUN_ID mixes runs (even interleaved ones): a record must not pick one silently.
        raise LogError(f"{path}: holds {runs} runs (RUN_ID reused?); give each run its own log")
    if (
        log.source == "jsonl"
        and log.size_check
        and not (log.size_check.artifact_path and log.size_check.sha256)
    ):
        # The artifact's path and sha256 are printed on the text log's size_check line.
        try:
            printed = runlog.read(path, text_only=True).size_check
        except OSError:
            printed = None
        if printed:
            log.size_check.artifact_path = log.size_check.artifact_path or printed.artifact_path
            log.size_check.sha256 = log.size_check.sha256 or printed.sha256
    if log.config is None:
        raise LogError(f"{path}: the config line is not valid JSON")
    if "SEED" not in log.config:
        raise LogError(f"{path}: the config line has no SEED")
    found = dict(
        validation=log.steps,
        artifact_bytes=log.artifact_bytes,
        code_bytes=log.code_bytes,
        total_bytes=log.total_bytes,
        size_check=log.size_check,
        final_evaluation=log.score,
        train_time=log.train_time_ms,
    )
    missing = [k for k, v in found.items() if v is None]
    config = log.config
    stride, seq_len = config.get("EVAL_STRIDE", 0), config.get("EVAL_SEQ_LEN") or config.get("TRAIN_SEQ_LEN")
    if stride not in (0, seq_len) and not any(e.mode == "sliding" for e in log.finals):
        missing.append("sliding-window final evaluation")
    if missing:
        raise LogError(
            f"{path}: lacks final results ({', '.join(missing)} missing): the run crashed or is still running"
        )
    return log


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


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    val_tokens_sha256: str
    tokenizer_sha256: str


def quiet_runtime(script, device):
    """The script's one-process Runtime with a silent log, or None for a script older than Runtime (its
    evaluation functions took the device, rank and world size as separate arguments)."""
    runtime = getattr(script, "Runtime", None)
    return runtime(0, 1, device, lambda _msg: None) if runtime is not None else None


def script_evaluate(
    script, logits_fn, tokens, tables, windows: tuple[int, int, int], device, token_losses=None
):
    """A folder's own `evaluate` on one process, whichever of its two signatures the script has.
    windows: (seq_len, stride, batch_seqs)."""
    rt = quiet_runtime(script, device)
    if rt is None:
        return script.evaluate(logits_fn, tokens, tables, *windows, device, token_losses=token_losses)
    return script.evaluate(logits_fn, tokens, tables, script.WindowSpec(*windows), rt, token_losses)


def script_ttt_evaluate(script, model, h, tokens, tables, device, token_losses):
    """A folder's own `ttt_evaluate` on one process, whichever of its three signatures the script has."""
    rt = quiet_runtime(script, device)
    if rt is None:
        return script.ttt_evaluate(
            model, h, tokens, tables, device, token_losses=token_losses, log=lambda _: None
        )
    if dataclasses.is_dataclass(h):  # a configuration in frozen groups: the groups TTT reads
        return script.ttt_evaluate(model, h.evaluation, h.run, tokens, tables, rt, token_losses)
    return script.ttt_evaluate(model, h, tokens, tables, rt, token_losses)


def script_value(h, name: str):
    """A knob's value in a folder script's configuration: one namespace (older scripts) or frozen groups."""
    if not dataclasses.is_dataclass(h):
        return getattr(h, name)
    return next(getattr(g, name) for g in vars(h).values() if hasattr(g, name))


def with_script_values(h, values: dict):
    """A folder script's configuration with these knobs' values (lower-case names; unknown ones ignored): set
    on one namespace (older scripts), or new frozen groups."""
    if not dataclasses.is_dataclass(h):
        vars(h).update({k: v for k, v in values.items() if k in vars(h)})
        return h
    changed = {}
    for name, group in vars(h).items():
        mine = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(group)}}
        if mine:
            changed[name] = dataclasses.replace(group, **mine)
    return dataclasses.replace(h, **changed)


def evaluate_artifact(
    script,
    artifact: str | Path,
    data: str,
    tokenizer: str,
    token_limit: int,
    windows: tuple[int, int, int],
    device: str,
) -> EvalResult:
    """val_loss/val_bpb of an artifact rebuilt by `script` (a loaded train_gpt module) on the first
    token_limit validation tokens (0: all), in windows (seq_len, stride, batch_seqs), plus hashes that
    identify the data the numbers came from."""
    import torch  # only pack and verify need torch; compare stays light

    dev = torch.device(device)
    model, h = script.load_artifact_model(str(artifact), dev)
    model.eval()
    vocab_size = script_value(h, "vocab_size")
    tables = script.byte_tables(script.load_tokenizer(tokenizer, vocab_size))
    tokens = script.load_val_tokens(data, vocab_size, token_limit)
    val_loss, val_bpb = script_evaluate(script, model.logits, tokens, tables, windows, dev)
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
            raise RecordError(
                f"{run.path} differs from {runs[0].path} in {', '.join(differ)}: "
                "a record's seeds must share one recipe"
            )


def check_scores(runs: list[RunLog], track: str, allow_partial_eval: bool) -> None:
    for run in runs:
        score = run.score
        if not (math.isfinite(score.val_loss) and math.isfinite(score.val_bpb)):
            raise RecordError(
                f"{run.path}: non-finite score val_loss={score.val_loss} val_bpb={score.val_bpb}"
            )
        if score.token_limit and not (allow_partial_eval and track != RECORD_TRACK):
            raise RecordError(
                f"{run.path}: evaluated on the first {score.token_limit} validation tokens only "
                "(VAL_TOKEN_LIMIT): not a score; only a non-record track with --allow-partial-eval "
                "may pack it"
            )
        if track == RECORD_TRACK and run.train_time_ms > TRAIN_LIMIT_MS:
            raise RecordError(
                f"{run.path}: trained {run.train_time_ms / 1000:.1f}s, over the 600s limit of "
                f"{RECORD_TRACK}; use --track {TRACKS[1]}"
            )
        if track == RECORD_TRACK and (run.world_size != 8 or "H100" not in run.device_name):
            print(
                f"warning: {run.path}: ran on {hardware(run)}, not the 8xH100 of {RECORD_TRACK}",
                file=sys.stderr,
            )


def check_script(script: Path, runs: list[RunLog]) -> int:
    """The script must be the one every log ran: same size and, from its code_sha256 line, same bytes."""
    if not script.is_file():
        raise RecordError(f"{script}: no such script")
    size, sha = script.stat().st_size, sha256_file(script)
    for run in runs:
        if run.code_sha256 is None:
            raise RecordError(
                f"{run.path}: no code_sha256 line, so the train_gpt.py that ran cannot be identified "
                "(a log of an older train_gpt.py?)"
            )
        ran = script_size_logged(run)
        if run.start_code_bytes is not None and run.start_code_bytes != ran:
            raise RecordError(
                f"{run.path}: train_gpt.py was {run.start_code_bytes} bytes at the start of the run but "
                f"{ran} at export: it was edited during the run, so no script matches the log"
            )
        if ran != size or run.code_sha256 != sha:
            raise RecordError(
                f"{script} ({size} bytes, sha256 {sha[:16]}...) is not the script of {run.path} "
                f"(Code size {ran}, code_sha256 {run.code_sha256[:16]}...): the log came "
                "from a different train_gpt.py (pass the one that ran with --script)"
            )
    return size


def script_size_logged(run: RunLog) -> int | None:
    """The size of the script as it ran, from the log's export lines: a log that counts the code as its
    compressed wrapper states the script's own size beside it; older logs counted the script as run."""
    return run.source_code_bytes or run.code_bytes


def find_artifact(run: RunLog) -> Path:
    """The artifact the size_check line names: as written, relative to the cwd, or beside the log."""
    if not run.size_check or not run.size_check.artifact_path:
        raise RecordError(f"{run.path}: the log does not name its artifact; pass --artifacts")
    named = Path(run.size_check.artifact_path)
    tries = [named] if named.is_absolute() else [Path.cwd() / named, run.path.parent.parent / named]
    tries.append(run.path.parent / named.name)
    for path in tries:
        if path.is_file():
            return path
    raise RecordError(
        f"{run.path}: artifact {run.size_check.artifact_path} not found "
        f"(tried {', '.join(map(str, tries))}); "
        "pass --artifacts"
    )


def check_artifacts(
    runs: list[RunLog], artifacts: list[Path], code_bytes: int, cap: int, compressed: bool = False
) -> None:
    for run, artifact in zip(runs, artifacts):
        if not artifact.is_file():
            raise RecordError(f"{artifact}: no such artifact")
        size = artifact.stat().st_size
        if size != run.artifact_bytes or (
            run.size_check.sha256 and sha256_file(artifact) != run.size_check.sha256
        ):
            raise RecordError(
                f"{artifact} ({size} bytes) is not the artifact {run.path} reports ({run.artifact_bytes} "
                "bytes, sha256 of its size_check line): overwritten by a later run?"
            )
        if size + code_bytes > cap:
            raise RecordError(
                f"seed {run.seed}: artifact {size} + code {code_bytes} = {size + code_bytes} bytes "
                f"exceeds the cap of {cap} bytes by {size + code_bytes - cap}"
                + ("" if compressed else " (the run counted the code compressed: pass --compress-code)")
            )


def seed_result(run: RunLog) -> dict:
    score = run.score
    eval_time_s = None if score.eval_time_ms is None else score.eval_time_ms / 1000
    return dict(
        val_loss=score.val_loss,
        val_bpb=score.val_bpb,
        artifact_bytes=run.artifact_bytes,
        steps=run.steps,
        step_avg_ms=run.step_avg_ms,
        eval_time_s=eval_time_s,
        pre_quant_val_bpb=run.pre_quant_val_bpb,
        train_time_s=run.train_time_ms / 1000,
        eval_stride=score.stride,
        eval_seq_len=score.seq_len,
        eval_token_limit=score.token_limit,
        log=f"train_seed{run.seed}.txt",
    )


def summarize_config(config: dict) -> str:
    """A one-line description of the recipe, for technique_summary when no --blurb is given."""
    c = config
    parts = [
        f"{c['NUM_LAYERS']}L x {c['MODEL_DIM']}d, {c['NUM_HEADS']} heads / {c['NUM_KV_HEADS']} KV, "
        f"{c['MLP_ACT']} MLP x{c['MLP_MULT']:g}"
    ]
    if c.get("MOE_MODE", "none") != "none":
        layers = f"layers {c['MOE_LAYERS']}" if c.get("MOE_LAYERS") else "every layer"
        routing = "" if c["MOE_MODE"] == "soft" else f" top-{c['TOP_K']}"  # soft gating uses every expert
        parts.append(f"MoE {c['MOE_MODE']} {c['NUM_EXPERTS']} experts{routing}, {layers}")
    if c.get("BIGRAM_VOCAB_SIZE"):
        parts.append(f"BigramHash({c['BIGRAM_VOCAB_SIZE']})")
    if c.get("SMEAR_GATE"):
        parts.append("SmearGate")
    if c.get("EMA_DECAY") != 0:  # unset: the default horizon; 0: off
        parts.append("EMA")
    if "MATRIX_BITS" in c:  # the GPTQ/SDClip quantizer's knobs
        parts.append(
            f"{c['QUANT_METHOD'].upper()} int{c['MATRIX_BITS']} / int{c['EMBED_BITS']} embed"
            f"{' + LQER' if c.get('LQER_ENABLED') else ''} + {c['COMPRESSOR']}"
        )
    else:
        parts.append(
            f"int{c['QUANT_BITS_MLP']} MLP / int{c['QUANT_BITS_ATTN']} attn / "
            f"int{c['QUANT_BITS_EMBED']} embed + zstd-{c['ZSTD_LEVEL']}"
        )
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
    return {
        k: v
        for k, v in sorted(config.items())
        if k in knobs and k not in RUN_IDENTITY_KNOBS and v != knobs[k][1]
    }


RESULTS_HEADER = (
    "| seed | val_loss | val_bpb | pre-quant val_bpb | artifact bytes | total bytes | steps "
    "| step_avg ms | eval s |\n|---|---|---|---|---|---|---|---|---|"
)


def render_readme(sub: dict, changed: dict, world_size: int, about: str | None = None) -> str:
    """The folder's README; `about` (pack --about) replaces the paragraphs left TODO for the author."""

    def fmt(v, spec=".8f"):
        return "n/a" if v is None else format(v, spec)

    rows = [
        f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['pre_quant_val_bpb']:.8f} | "
        f"{r['artifact_bytes']:,} | {r['artifact_bytes'] + sub['bytes_code']:,} | {r['steps']} | "
        f"{r['step_avg_ms']:.2f} | {fmt(r['eval_time_s'], '.1f')} |"
        for seed, r in sub["seed_results"].items()
    ]
    rows.append(f"| **mean** | {fmt(sub['val_loss'])} | **{fmt(sub['val_bpb'])}** | | | | | | |")
    rows.append(f"| std | {fmt(sub['val_loss_std'])} | {fmt(sub['val_bpb_std'])} | | | | | | |")
    env = " ".join(f"{k}={env_value(v)}" for k, v in changed.items())
    partial = sub.get("partial_eval")
    warning = (
        f"\n> **Not a score:** every seed was evaluated on the first {partial['val_token_limit']} "
        "validation tokens only (VAL_TOKEN_LIMIT).\n"
        if partial
        else ""
    )
    check = sub["verify_check"]
    intro = (
        about.strip()
        if about
        else "TODO: one paragraph: what is new in this submission and why it should lower val_bpb."
    )
    later = (
        ""
        if about
        else """
## What changed and why

TODO: the ideas, with evidence (what each change gained).

## Ablations

TODO: a table of runs that isolate each change.
"""
    )
    return f"""# {sub["name"]}

{intro}
{warning}
- Track: `{sub["track"]}`
- Author: {sub["author"]} (@{sub["github_id"]}), {sub["date"]}
- Result: val_bpb **{fmt(sub["val_bpb"])}** (std {fmt(sub["val_bpb_std"])}),
  val_loss {fmt(sub["val_loss"])} nats, mean of {len(sub["seeds"])} seeds
- Size: {sub["bytes_total"]:,} bytes = code {sub["bytes_code"]:,}
  + model {sub["bytes_total"] - sub["bytes_code"]:,} (cap {sub["cap_bytes"]:,})
- Hardware: {sub["hardware"]}, PyTorch {sub["pytorch_version"]}
- Recipe: {sub["technique_summary"]}

## Results

{RESULTS_HEADER}
{chr(10).join(rows)}

## Command

```bash
for SEED in {" ".join(map(str, sub["seeds"]))}; do
  RUN_ID={sub["name"]}_seed$SEED SEED=$SEED {env} \\
    torchrun --standalone --nproc_per_node={world_size} train_gpt.py
done
```

Knobs not listed keep the defaults of the `train_gpt.py` in this folder.
{later}
## Verification

```bash
python tools/records.py verify <this folder> --token-limit {check["tokens"]}   # quick CPU check
python tools/records.py verify <this folder> --device cuda --data <val data> --tokenizer <tokenizer>
```
"""


def pack(opts: argparse.Namespace) -> Path:
    """Check everything first, then write the folder, so a refusal leaves nothing behind."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", opts.name):
        raise RecordError(f"--name {opts.name!r}: use letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", opts.date):
        raise RecordError(f"--date {opts.date!r}: expected YYYY-MM-DD")
    about = Path(opts.about).read_text(encoding="utf-8") if opts.about else None
    runs = [parse_log(p) for p in opts.logs]
    check_same_recipe(runs)
    check_scores(runs, opts.track, opts.allow_partial_eval)
    script = Path(opts.script)
    code_bytes = check_script(script, runs)
    if opts.compress_code:  # the cap counts the code as it will ship
        code_bytes = len(self_extracting(script.read_bytes()))
    if opts.artifacts and len(opts.artifacts) != len(runs):
        raise RecordError(f"--artifacts: {len(opts.artifacts)} paths for {len(runs)} logs")
    artifacts = [Path(a) for a in opts.artifacts] if opts.artifacts else [find_artifact(r) for r in runs]
    check_artifacts(runs, artifacts, code_bytes, opts.cap, opts.compress_code)
    folder = (
        Path(opts.folder) if opts.folder else Path(opts.records_dir) / opts.track / f"{opts.date}_{opts.name}"
    )
    if folder.exists() and not folder.is_dir():  # --force replaces a folder pack wrote, never a file
        raise RecordError(f"--folder {folder}: a file, not a folder; name a new folder")
    if folder.exists() and not opts.force:
        raise RecordError(f"{folder} already exists (pass --force to replace it)")
    outputs = pack_outputs(runs, opts.compress_code)
    replaced = files_to_replace(folder, outputs) if folder.exists() else []

    best = shipped_run(runs, opts.ship)
    module = load_script(script)
    verify_check = quick_check(opts, module, runs[best], artifacts[best])

    for name in replaced:
        (folder / name).unlink()
    if replaced:
        print(f"replacing in {folder}: {', '.join(replaced)}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(script, folder / SCRIPT)
    if opts.compress_code:
        code_bytes = write_compressed_script(folder, script)
    results = {}
    for i, (run, artifact) in enumerate(zip(runs, artifacts)):
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.txt")
        events = runlog.jsonl_beside(run.path)
        if events is not None and events != run.path:  # verify then reads the run exactly
            shutil.copyfile(events, folder / f"train_seed{run.seed}.jsonl")
        results[str(run.seed)] = seed_result(run)
        if opts.all_artifacts or i == best:
            shutil.copyfile(artifact, folder / f"model_seed{run.seed}.ptz")
            results[str(run.seed)]["artifact"] = f"model_seed{run.seed}.ptz"
    if sha256_file(folder / verify_check["artifact"]) != verify_check["artifact_sha256"]:
        raise RecordError(
            f"{folder}: the copied artifact differs from {artifacts[best]} (changed while packing?)"
        )
    sub = build_submission(opts, runs, results, runs[best], code_bytes, verify_check)
    readme = render_readme(sub, changed_knobs(runs[0].config, module.KNOBS), runs[0].world_size, about)
    (folder / "README.md").write_text(readme, encoding="utf-8")
    # What pack wrote, so a later --force replaces exactly these and never a file edited since.
    written = [n for n in sorted(outputs) if n != SUBMISSION and (folder / n).is_file()]
    sub["packed_files"] = {n: sha256_file(folder / n) for n in written}
    (folder / SUBMISSION).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    return folder


def shipped_run(runs: list[RunLog], rule: str) -> int:
    """Index of the run whose artifact the folder ships (its best_seed): the lowest val_bpb, or the
    smallest artifact (a study shipping an arm's smallest model; ties go to the lower seed)."""
    if rule == "smallest":
        return min(range(len(runs)), key=lambda i: (runs[i].artifact_bytes, runs[i].seed))
    return min(range(len(runs)), key=lambda i: runs[i].score.val_bpb)


def pack_outputs(runs: list[RunLog], compress_code: bool) -> set[str]:
    """Every name pack may write into a record folder."""
    names = {SCRIPT, SUBMISSION, "README.md"} | ({READABLE} if compress_code else set())
    for run in runs:
        names |= {f"train_seed{run.seed}.txt", f"train_seed{run.seed}.jsonl", f"model_seed{run.seed}.ptz"}
    return names


def files_to_replace(folder: Path, outputs: set[str]) -> list[str]:
    """The files an earlier pack wrote into folder, unchanged since (replaced by --force). Refused: a file
    pack would write that it did not write, or one edited since; every other file stays untouched."""
    try:
        previous = json.loads((folder / SUBMISSION).read_text(encoding="utf-8")).get("packed_files", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    edited = [n for n in present if n in previous and sha256_file(folder / n) != previous[n]]
    foreign = [n for n in present if n in outputs and n not in previous and n != SUBMISSION]
    if (folder / SUBMISSION).is_file() and not previous:
        foreign.append(SUBMISSION)
    if edited or foreign:
        raise RecordError(
            f"{folder}: pack --force never replaces what it did not write: "
            + "; ".join(
                part
                for part in (
                    f"edited since pack wrote them: {', '.join(edited)}" if edited else "",
                    f"not written by pack: {', '.join(foreign)}" if foreign else "",
                )
                if part
            )
            + " (move them away first)"
        )
    return [n for n in present if n in previous] + ([SUBMISSION] if SUBMISSION in present else [])


def write_compressed_script(folder: Path, script: Path) -> int:
    """The counted train_gpt.py as an lzma self-extracting wrapper, the exact script beside it."""
    source = script.read_bytes()
    (folder / READABLE).write_bytes(source)
    (folder / SCRIPT).write_bytes(self_extracting(source))
    return (folder / SCRIPT).stat().st_size


def quick_check(opts, module, run: RunLog, artifact: Path) -> dict:
    """Evaluate the best artifact on CPU on the first --check-tokens tokens: the `verify --token-limit`
    reference."""
    data = opts.check_data or run.config["DATA_PATH"]
    tokenizer = opts.check_tokenizer or run.config["TOKENIZER_PATH"]
    if not Path(data).is_dir() or not Path(tokenizer).is_file():
        raise RecordError(
            f"quick check: validation data {data} or tokenizer {tokenizer} not found; "
            "pass --check-data and --check-tokenizer"
        )
    seq_len = run.score.seq_len
    stride = opts.check_stride or seq_len
    sha = sha256_file(artifact)
    result = evaluate_artifact(
        module, artifact, data, tokenizer, opts.check_tokens, (seq_len, stride, opts.batch_seqs), "cpu"
    )
    return dict(
        seed=run.seed,
        artifact=f"model_seed{run.seed}.ptz",
        artifact_sha256=sha,
        data=str(data),
        tokenizer=str(tokenizer),
        tokens=opts.check_tokens,
        stride=stride,
        seq_len=seq_len,
        device="cpu",
        val_loss=result.val_loss,
        val_bpb=result.val_bpb,
        val_tokens_sha256=result.val_tokens_sha256,
        tokenizer_sha256=result.tokenizer_sha256,
    )


def build_submission(opts, runs, results: dict, best: RunLog, code_bytes: int, verify_check: dict) -> dict:
    loss_mean, loss_std = mean_std([r.score.val_loss for r in runs])
    bpb_mean, bpb_std = mean_std([r.score.val_bpb for r in runs])
    limit = best.score.token_limit
    return dict(
        author=opts.author,
        github_id=opts.github_id,
        name=opts.name,
        blurb=opts.blurb or "TODO: one-line blurb",
        date=opts.date,
        track=opts.track,
        val_loss=loss_mean,
        val_bpb=bpb_mean,
        val_loss_std=loss_std,
        val_bpb_std=bpb_std,
        bytes_total=code_bytes + best.artifact_bytes,
        bytes_code=code_bytes,
        cap_bytes=opts.cap,
        seeds=[r.seed for r in runs],
        best_seed=best.seed,
        seed_results=results,
        hardware=hardware(best),
        pytorch_version=best.torch,
        technique_summary=opts.blurb or summarize_config(best.config),
        partial_eval=dict(val_token_limit=limit, note="first tokens only: not a score") if limit else None,
        verify_check=verify_check,
    )


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    # PASS, FAIL, SKIP (cannot be checked here: what it needs is absent) or WARN (passed, with a caveat
    # a reviewer should read); only FAIL fails the verification.
    status: str = ""
    brief: str = ""  # the number a summary table shows (records.py audit)

    def __post_init__(self) -> None:
        self.status = self.status or ("PASS" if self.ok else "FAIL")

    def __str__(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}"


def skip(name: str, detail: str) -> Check:
    return Check(name, True, detail, "SKIP")


def warn(name: str, detail: str) -> Check:
    return Check(name, True, detail, "WARN")


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


def size_checks(folder: Path, sub: dict, cap: int) -> list[Check]:
    """Our folder's exact sizes and hashes: each seed's log, artifact and script, the total and the cap.
    (The code size against bytes_code and the claimed means are general checks.)"""
    checks = []
    script = folder / SCRIPT
    code = script.stat().st_size if script.is_file() else -1
    script_sha = sha256_file(script) if script.is_file() else "missing"
    logged, logged_code, logged_sha = script, code, script_sha
    if (folder / READABLE).is_file() and script.is_file():  # a self-extracting SCRIPT: the logs ran READABLE
        logged = folder / READABLE
        logged_code, logged_sha = logged.stat().st_size, sha256_file(logged)
        checks.append(
            Check(
                "same program",
                extracted_source(script.read_bytes()) == logged.read_bytes(),
                f"{SCRIPT} decompresses to exactly {READABLE}",
            )
        )
    for seed, claim in sub["seed_results"].items():
        checks += seed_checks(
            folder,
            seed,
            claim,
            sub["bytes_code"] if logged is script else logged_code,
            logged_code,
            logged_sha,
            cap,
        )
    best = sub["seed_results"][str(sub["best_seed"])]
    artifact = folder / best.get("artifact", "")
    size = artifact.stat().st_size if artifact.is_file() else -1
    checks.append(
        Check(
            "bytes_total",
            sub["bytes_total"] == code + size,
            f"claimed {sub['bytes_total']}, files: code {code} + {artifact.name} {size} = {code + size}",
        )
    )
    checks.append(
        Check(
            "cap",
            code + size <= cap and sub["bytes_total"] <= cap,
            f"total {code + size} <= cap {cap} (slack {cap - code - size})",
        )
    )
    return checks


def seed_checks(
    folder: Path, seed: str, claim: dict, bytes_code: int, code: int, script_sha: str, cap: int
) -> list[Check]:
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
        Check(
            f"{name} log code size",
            script_size_logged(run) == bytes_code == code,
            f"log Code size {script_size_logged(run)}, bytes_code {bytes_code}, {SCRIPT} {code}",
        ),
        Check(
            f"{name} log artifact size",
            run.artifact_bytes == claim["artifact_bytes"],
            f"log {run.artifact_bytes}, claimed {claim['artifact_bytes']}",
        ),
        Check(
            f"{name} log score",
            run.score.val_bpb == claim["val_bpb"] and run.score.val_loss == claim["val_loss"],
            f"log val_bpb {run.score.val_bpb} val_loss {run.score.val_loss}, "
            f"claimed {claim['val_bpb']} {claim['val_loss']}",
        ),
        Check(
            f"{name} under cap",
            claim["artifact_bytes"] + bytes_code <= cap,
            f"{claim['artifact_bytes']} + {bytes_code} = {claim['artifact_bytes'] + bytes_code} <= {cap}",
        ),
    ]
    if run.code_sha256:
        checks.append(
            Check(
                f"{name} log code sha256",
                run.code_sha256 == script_sha,
                f"log code_sha256 {run.code_sha256[:16]}..., {SCRIPT} {script_sha[:16]}...",
            )
        )
    if "artifact" in claim:
        artifact = folder / claim["artifact"]
        size = artifact.stat().st_size if artifact.is_file() else -1
        checks.append(
            Check(
                f"{name} artifact size",
                size == claim["artifact_bytes"],
                f"{claim['artifact']} is {size} bytes, claimed {claim['artifact_bytes']}",
            )
        )
        logged = run.size_check.sha256
        if logged:
            sha = sha256_file(artifact) if artifact.is_file() else "missing"
            checks.append(
                Check(
                    f"{name} artifact sha256",
                    sha == logged,
                    f"{claim['artifact']} {sha[:16]}..., log size_check {logged[:16]}...",
                )
            )
    return checks


def eval_check(name: str, run_eval, claimed: float, tol: float) -> Check:
    """Run one re-evaluation; a load or data failure is a FAIL with the reason, not a crash."""
    try:
        result = run_eval()
    except Exception as err:  # the folder's own script raises its own error classes (ArtifactError, ...)
        return Check(name, False, f"could not evaluate: {type(err).__name__}: {err}")
    return Check(
        name,
        close(result.val_bpb, claimed, tol),
        f"val_bpb {result.val_bpb:.8f} (val_loss {result.val_loss:.8f}) vs claimed {claimed:.8f}, "
        f"|diff| {abs(result.val_bpb - claimed):.2e} <= tolerance {tol:g}",
    )


def verify(opts: argparse.Namespace) -> list[Check]:
    """One verifier: every check a record folder's files allow (any folder, as the challenge's reviewers
    checked them); a folder of ours (its submission.json has a verify_check) adds the strict checks, the
    re-score of its artifacts and the legality probes. Record folders packed inside the folder (a study
    shipping several arms' models) are verified too, each with its own script; their checks carry the
    inner folder's path. A folder holding only packed folders is verified through them; so is a study
    whose top-level submission.json names its study (`study`), which only gets the layout check."""
    folder = Path(opts.folder)
    inner = packed_inside(folder)
    sub_path = named_file(folder, SUBMISSION, "submission*.json")[0]
    if inner and sub_path.is_file() and "study" in read_json_object(sub_path):
        # A study's top level (submission.json naming its study) holds many arms' logs: only its layout is
        # checked; its models are the packed folders'.
        checks = [layout_check(folder, read_json_object(sub_path))]
    else:
        checks = verify_one(opts, folder) if sub_path.is_file() or not inner else []
    for path in inner:
        where = path.relative_to(folder).as_posix()
        for check in verify_one(opts, path):
            check.name = f"{where}: {check.name}"
            checks.append(check)
    return checks


def read_json_object(path: Path) -> dict:
    """A JSON file's object, or {} when it is unreadable or not an object (the checks then say so)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def packed_inside(folder: Path) -> list[Path]:
    """Record folders below `folder` (any depth): those holding a submission.json."""
    return sorted({p.parent for p in folder.glob(f"*/**/{SUBMISSION}") if p.is_file()})


def verify_one(opts: argparse.Namespace, folder: Path) -> list[Check]:
    """Every check of one record folder (see verify)."""
    links = link_check(folder)
    if not links.ok:  # what verify would read is not what the folder ships: check nothing else
        return [links, skip("every other check", "refused: a record folder holds plain files only")]
    try:
        text = named_file(folder, SUBMISSION, "submission*.json")[0].read_text(encoding="utf-8")
        sub, claims = json.loads(text), json.loads(text, parse_float=Decimal)
    except (OSError, ValueError) as err:
        return [Check(SUBMISSION, False, f"{folder / SUBMISSION}: unreadable ({type(err).__name__}: {err})")]
    if not isinstance(sub, dict):
        return [Check(SUBMISSION, False, f"{folder / SUBMISSION}: not a JSON object")]
    ours = "verify_check" in sub
    if ours:
        named = named_outside(folder, sub)
        if not named.ok:
            return [named, skip("every other check", "refused: the folder names files outside itself")]
    # Our folders name their runs' logs (a study folder holds other arms' logs too); others: every log.
    try:
        logs = own_logs(folder, sub) if ours else folder_logs(folder)
    except (AttributeError, TypeError) as err:
        return [Check(SUBMISSION, False, f"unreadable or incomplete: {type(err).__name__}: {err}")]
    checks = general_checks(folder, claims, logs, opts.cap)
    if not ours:
        return checks + [
            skip(
                "re-evaluation", "no artifact and verify_check in the folder: the score cannot be recomputed"
            )
        ]
    return [links, unexpected_files_check(folder, sub), *checks, *own_folder_checks(folder, sub, opts)]


def folder_entries(folder: Path) -> list[Path]:
    """Every file, link and folder below `folder` (links not followed), except inside record folders
    packed within it (verified on their own)."""
    inner = set(packed_inside(folder))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if Path(root, d) not in inner]
        found += [Path(root, name) for name in sorted(dirs + files)]
    return found


def link_check(folder: Path) -> Check:
    """A record folder holds plain files: a link (its model, a log, its script or any other file) is
    refused, since verify would read the link's target and a reviewer's copy would not have it."""
    name = "plain files only"
    links = [p for p in folder_entries(folder) if p.is_symlink()]
    if links:
        shown = ", ".join(f"{p.relative_to(folder).as_posix()} -> {os.readlink(p)}" for p in links)
        return Check(name, False, f"links in {folder}: {shown}")
    return Check(name, True, f"no links in {folder}")


def named_outside(folder: Path, sub: dict) -> Check:
    """Every log and artifact submission.json names lies inside the folder (no `..`, no absolute path)."""
    root = folder.resolve()
    names = [sub.get("verify_check", {}).get("artifact", "")]
    for claim in sub.get("seed_results", {}).values():
        names += [claim.get("log", ""), claim.get("artifact", "")] if isinstance(claim, dict) else []
    outside = [n for n in names if n and not (root / n).resolve().is_relative_to(root)]
    if outside:
        return Check(
            "files named inside the folder", False, f"{SUBMISSION} names files outside it: {outside}"
        )
    return Check("files named inside the folder", True, f"every file {SUBMISSION} names is in {folder}")


def unexpected_files_check(folder: Path, sub: dict) -> Check:
    """Every file of a folder of ours is one pack wrote (its packed_files; before those existed: the
    script, README, submission.json and each seed's logs and artifact); any other is listed."""
    expected = set(sub.get("packed_files") or ()) | {SUBMISSION}
    if not sub.get("packed_files"):
        expected |= {SCRIPT, READABLE, "README.md"}
        for claim in sub.get("seed_results", {}).values():
            log = claim.get("log", "")
            expected |= {log, str(Path(log).with_suffix(".jsonl")), claim.get("artifact", "")}
    extra = [
        p for p in folder_entries(folder) if p.is_file() and p.relative_to(folder).as_posix() not in expected
    ]
    name = "files as packed"
    if extra:
        shown = ", ".join(f"{p.relative_to(folder).as_posix()} ({p.stat().st_size:,} bytes)" for p in extra)
        return warn(name, f"{len(extra)} file(s) pack did not write (not checked, not counted): {shown}")
    return Check(name, True, "every file is one pack wrote")


def own_folder_checks(folder: Path, sub: dict, opts: argparse.Namespace) -> list[Check]:
    """A folder of ours, strictly: exact sizes and sha256s against its files, its artifacts re-scored with
    its own script, and the legality probes on the best seed's artifact."""
    try:
        checks = size_checks(folder, sub, opts.cap)
        check = sub["verify_check"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [Check(SUBMISSION, False, f"unreadable or incomplete: {type(err).__name__}: {err}")]
    artifact = folder / check["artifact"]
    sha = sha256_file(artifact) if artifact.is_file() else "missing"
    checks.append(
        Check(
            "artifact sha256",
            sha == check["artifact_sha256"],
            f"{check['artifact']} {sha[:16]}..., verify_check {check['artifact_sha256'][:16]}...",
        )
    )
    try:
        module = load_script(folder / SCRIPT)
    except Exception as err:  # an edited script may not even import
        return checks + [Check("import train_gpt.py", False, f"{type(err).__name__}: {err}")]
    data = stored_path(opts.data or check["data"], folder)
    tokenizer = stored_path(opts.tokenizer or check["tokenizer"], folder)
    hint = data_hint(folder, data, tokenizer)
    if opts.quick:
        rescored = "re-score" if not opts.token_limit else "quick check"
        return checks + [
            skip(rescored, "--quick: the artifact was not evaluated (rerun without --quick)"),
            skip("legality probes", "--quick: causality and normalisation probes not run"),
        ]
    if hint:
        return checks + [skip("re-score", hint), skip("legality probes", hint)]
    if opts.token_limit:
        checks += quick_eval_checks(opts, module, folder, check, str(data), str(tokenizer))
    else:
        for seed, claim in sub["seed_results"].items():
            if "artifact" in claim:
                checks.append(rescore_check(folder, module, seed, claim, data, tokenizer, opts))
    best = sub["seed_results"].get(str(check["seed"]), {})
    print(f"verify: legality probes on {check['artifact']} ...", file=sys.stderr, flush=True)
    try:
        config = parse_log(folder / best["log"]).config if "log" in best else {}
        checks += probe_checks(
            module, folder / check["artifact"], data, tokenizer, opts.device, config, check["seq_len"]
        )
    except Exception as err:  # an artifact or script the probes cannot load
        checks.append(Check("legality probes", False, f"could not run: {type(err).__name__}: {err}"))
    return checks


def own_logs(folder: Path, sub: dict) -> list[FolderLog]:
    """The seed logs a folder of ours names in seed_results (one each: its seed's run)."""
    found = []
    for seed, claim in sub["seed_results"].items():
        path = folder / claim.get("log", "")
        if path.is_file():
            found.append(FolderLog(path, runlog.read(path), int(seed)))
    return found


def quick_eval_checks(opts, module, folder: Path, check: dict, data: str, tokenizer: str) -> list[Check]:
    if opts.token_limit != check["tokens"]:
        # Another measurement, not a wrong one: its numbers are shown, with nothing to compare them to.
        name = f"quick check ({opts.token_limit} tokens)"
        try:
            result = evaluate_artifact(
                module,
                folder / check["artifact"],
                data,
                tokenizer,
                opts.token_limit,
                (check["seq_len"], check["stride"], opts.batch_seqs),
                opts.device,
            )
        except Exception as err:  # the folder's own script raises its own error classes
            return [Check(name, False, f"could not evaluate: {type(err).__name__}: {err}")]
        return [
            warn(
                name,
                f"val_bpb {result.val_bpb:.8f} (val_loss {result.val_loss:.8f}); verify_check holds a "
                f"reference for {check['tokens']} tokens only, so nothing to compare with",
            )
        ]
    tol = opts.tolerance if opts.tolerance is not None else 1e-5  # same code, same device class: near exact
    results = []

    def run_eval():
        result = evaluate_artifact(
            module,
            folder / check["artifact"],
            data,
            tokenizer,
            check["tokens"],
            (check["seq_len"], check["stride"], opts.batch_seqs),
            opts.device,
        )
        results.append(result)
        return result

    checks = [eval_check(f"quick check ({check['tokens']} tokens) val_bpb", run_eval, check["val_bpb"], tol)]
    if results:  # a mismatch in these explains a val_bpb mismatch: different data, not a different model
        checks.append(
            Check(
                "quick check data",
                results[0].val_tokens_sha256 == check["val_tokens_sha256"],
                f"validation tokens of {data} match verify_check",
            )
        )
        checks.append(
            Check(
                "quick check tokenizer",
                results[0].tokenizer_sha256 == check["tokenizer_sha256"],
                f"{tokenizer} matches verify_check",
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------
# Our own artifacts: re-scored by the folder's script with EVAL_ONLY, and two legality probes
# ----------------------------------------------------------------------------------------------
# Knobs a re-score sets itself (or that would write files beside the artifact): never copied from the log.
RESCORE_OWN_KNOBS = ("DATA_PATH", "TOKENIZER_PATH", "EVAL_ONLY", "ARTIFACT_PATH", "VAL_TOKEN_LIMIT")
RESCORE_NO_FILES = ("EVAL_TOKEN_LOSSES", "SAVE_CHECKPOINT")
PROBE_POSITIONS = 16  # positions whose predicted distribution must sum to one
NORM_TOLERANCE = 1e-5


def stored_path(value: str, folder: Path) -> Path:
    """A path stored in verify_check: absolute as written; a relative one from the cwd, the repository
    or the folder, whichever exists (so a packed folder verifies from any directory)."""
    path = Path(value)
    if path.is_absolute():
        return path
    for base in (Path.cwd(), REPO, folder):
        if (base / path).exists():
            return (base / path).resolve()
    return path


def data_hint(folder: Path, data: Path, tokenizer: Path) -> str | None:
    """None when the validation data and tokenizer are here, else what is missing and the command."""
    missing = [f"validation data {data}" for _ in [0] if not data.is_dir()]
    missing += [f"tokenizer {tokenizer}" for _ in [0] if not tokenizer.is_file()]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not found here; rerun with: python3 tools/records.py verify {folder} "
        "--data <folder with fineweb_val_*.bin> --tokenizer <tokenizer .model>"
    )


def rescore_env(module, run: RunLog, artifact: Path, data: Path, tokenizer: Path, log_dir: Path, limit: int):
    """The environment of an EVAL_ONLY run of the seed's configuration: the knobs its log changed from the
    script's defaults, nothing from the caller's environment that the script reads."""
    env = {k: v for k, v in os.environ.items() if k not in module.KNOBS}
    changed = changed_knobs(run.config, module.KNOBS)
    env.update(
        {
            k: env_value(v)
            for k, v in changed.items()
            if v is not None and k not in RESCORE_OWN_KNOBS and k not in RESCORE_NO_FILES
        }
    )
    env.update(
        EVAL_ONLY="1",
        ARTIFACT_PATH=str(artifact.resolve()),
        DATA_PATH=str(data),
        TOKENIZER_PATH=str(tokenizer),
        VAL_TOKEN_LIMIT=str(limit),
        LOG_DIR=str(log_dir),
        RUN_ID="rescore",
    )
    return env


def rescore_check(folder: Path, module, seed: str, claim: dict, data: Path, tokenizer: Path, opts) -> Check:
    """`EVAL_ONLY=1 python3 FOLDER/train_gpt.py` on the seed's artifact; its score against the claim."""
    name = f"seed {seed} re-score (EVAL_ONLY)"
    try:
        run = parse_log(folder / claim["log"])
    except RecordError as err:
        return Check(name, False, f"the seed's log: {err}")
    tol = opts.tolerance if opts.tolerance is not None else 1e-3
    with tempfile.TemporaryDirectory(prefix="verify_") as tmp:
        env = rescore_env(
            module, run, folder / claim["artifact"], data, tokenizer, Path(tmp), claim["eval_token_limit"]
        )
        if opts.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        print(f"verify: re-scoring seed {seed} with EVAL_ONLY ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        status, last = run_showing_progress(
            [sys.executable, str((folder / SCRIPT).resolve())], env, tmp, f"verify: seed {seed}: "
        )
        seconds = time.monotonic() - started
        log = Path(tmp) / "rescore.txt"
        scored = runlog.read(log).score if log.is_file() else None
    if status != 0 or scored is None:
        return Check(name, False, f"EVAL_ONLY exited {status}: {last}")
    return Check(
        name,
        close(scored.val_bpb, claim["val_bpb"], tol),
        f"{scored.name} val_bpb {scored.val_bpb:.8f} vs claimed {claim['val_bpb']:.8f}, "
        f"|diff| {abs(scored.val_bpb - claim['val_bpb']):.2e} <= tolerance {tol:g} ({seconds:.0f}s)",
    )


# The lines of a run that say how far a long phase is: its start, its tenths and its score lines.
PROGRESS_LINE = re.compile(r"^[\w ()-]+: (started \(|\d+% \()|^final_\w+ val_loss:")


def run_showing_progress(command: list[str], env: dict, cwd: str, prefix: str) -> tuple[int, str]:
    """Runs command, echoing its progress lines to stderr as they come -> (exit status, its last line)."""
    last = "no output"
    with subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            last = line.rstrip() or last
            if PROGRESS_LINE.match(line):
                print(prefix + line.rstrip(), file=sys.stderr, flush=True)
    return proc.returncode, last


def flip_probe(evaluate_losses, tokens, position: int) -> tuple[bool, str]:
    """Losses of every target before `position` bit-identical after token `position` changes; the changed
    token's own loss (or a later one) must move, or the probe did not probe anything."""
    import torch

    before = evaluate_losses(tokens)
    flipped = tokens.clone()
    flipped[position] = (int(tokens[position]) + 1) % int(tokens.max() + 2)
    after = evaluate_losses(flipped)
    earlier = slice(0, position - 1)  # token_losses[p - 1] is the loss of target p
    same = torch.equal(before[earlier], after[earlier])
    moved = not torch.equal(before[position - 1 :], after[position - 1 :])
    changed = int((before[earlier] != after[earlier]).sum())
    return same and moved, (
        f"token {position} flipped: {changed} of {position - 1} earlier losses changed"
        + ("" if moved else "; no later loss changed either (the flip reached nothing)")
    )


def probe_checks(
    module, artifact: Path, data: Path, tokenizer: Path, device: str, config: dict, seq_len: int
) -> list[Check]:
    """The reviewers' two probes on the artifact itself: one-token-flip causality for every evaluation mode
    (plain windows, sliding windows, score-first TTT) and the normalisation of the scored distribution.
    The run's own evaluation knobs (its log's config) apply; the network is the artifact's."""
    import copy

    import torch

    dev = torch.device(device)
    model, h = module.load_artifact_model(str(artifact), dev)
    model.eval()
    model_knobs = set(getattr(module, "MODEL_KNOBS", ()))
    run_knobs = {knob.lower(): value for knob, value in config.items() if knob not in model_knobs}
    h = with_script_values(h, {**run_knobs, "eval_seq_len": seq_len})
    vocab_size, eval_stride = script_value(h, "vocab_size"), script_value(h, "eval_stride")
    tables = module.byte_tables(module.load_tokenizer(str(tokenizer), vocab_size))
    tokens = module.load_val_tokens(str(data), vocab_size, 3 * seq_len + 1)
    position = 2 * seq_len + seq_len // 3  # inside a later window, after any first-window special case
    stride = eval_stride if eval_stride not in (0, seq_len) else max(1, seq_len // 4)

    def windows(step):
        def losses(toks):
            out = torch.zeros(toks.numel() - 1)
            script_evaluate(module, model.logits, toks, tables, (seq_len, step, 8), dev, out)
            return out

        return losses

    def ttt_losses(toks):
        out = torch.zeros(toks.numel() - 1)
        script_ttt_evaluate(module, copy.deepcopy(model), h, toks, tables, dev, out)
        return out

    checks = []
    for mode, fn in (("plain", windows(0)), (f"sliding {stride}", windows(stride)), ("ttt", ttt_losses)):
        print(f"verify: causality probe ({mode}) ...", file=sys.stderr, flush=True)
        try:
            ok, detail = flip_probe(fn, tokens, position)
        except Exception as err:  # the folder's own script raises its own error classes
            ok, detail = False, f"could not run: {type(err).__name__}: {err}"
        checks.append(Check(f"causality probe ({mode})", ok, detail))
    with torch.no_grad(), module.autocast(dev):
        logits = model.logits(tokens[None, :seq_len].long().to(dev))
    logits = logits[0].float()
    picks = torch.linspace(0, seq_len - 1, PROBE_POSITIONS).long().to(logits.device)
    checks.append(normalisation_check(logits[picks]))
    return checks


def normalisation_check(logits) -> Check:
    """The probability the scorer gives each candidate token (exp of minus its cross-entropy), summed over
    the vocabulary, is 1 within NORM_TOLERANCE at every given position (rows of logits)."""
    import torch
    import torch.nn.functional as F

    sums = []
    candidates = torch.arange(logits.size(-1), device=logits.device)
    for row in logits:
        ce = F.cross_entropy(row.float().expand(len(candidates), -1), candidates, reduction="none")
        sums.append(float(torch.exp(-ce.double()).sum()))
    errors = [abs(total - 1.0) for total in sums]
    worst = max(errors) if all(math.isfinite(e) for e in errors) else math.inf
    return Check(
        "normalisation probe",
        worst <= NORM_TOLERANCE,
        f"{len(sums)} positions: max |sum of p - 1| {worst:.2e} <= {NORM_TOLERANCE:g}",
    )


# ----------------------------------------------------------------------------------------------
# verify any record folder (the challenge's): every check its files allow, SKIP what needs more
# ----------------------------------------------------------------------------------------------
# submission.json spells the code size several ways; its per-seed results sit under one of these.
CODE_KEYS = ("bytes_code", "code_bytes", "code_size", "bytes_code_uncompressed")
SEED_KEYS = ("seed_results", "seeds")
SIZE_KEYS = ("artifact_bytes", "bytes_total", "total_bytes")
SEED_IN_NAME = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)
NOT_LOGS = ("requirements.txt",)


@dataclass
class FolderLog:
    """A training log found in a record folder, with its seed (from its text, else its file name)."""

    path: Path
    run: RunLog
    seed: int | None


def folder_logs(folder: Path) -> list[FolderLog]:
    """The training logs anywhere in a folder (some keep them in logs/ or an eval-only subfolder):
    text files with steps or evaluations."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in (".log", ".txt") or path.name in NOT_LOGS:
            continue
        try:
            run = runlog.read(path)
        except OSError:
            continue
        if run.train_steps or run.val_steps or run.finals:
            named = SEED_IN_NAME.search(path.name)
            seed = run.seed if run.seed is not None else int(named[1]) if named else None
            found.append(FolderLog(path, run, seed))
    return found


def named_file(folder: Path, name: str, pattern: str) -> tuple[Path, str]:
    """folder/name, else the only file matching pattern (some folders say submission_x.json or
    train_gpt_x.py), with a note saying which was taken."""
    exact = folder / name
    if exact.is_file():
        return exact, ""
    others = sorted(folder.glob(pattern))
    if len(others) == 1:
        return others[0], f" (no {name}: read {others[0].name})"
    return exact, ""


def is_number(value) -> bool:
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


def unit(claim) -> float:
    """One unit in the last printed digit of a claimed number (0 for integers: exact)."""
    if isinstance(claim, Decimal):
        return float(Decimal(1).scaleb(claim.as_tuple().exponent))
    return 0.0


def matches(claim, value) -> bool:
    """A value equals a claim to the claim's printed precision (rounded or truncated: within one unit)."""
    if not is_number(claim) or value is None:
        return False
    return abs(float(claim) - value) <= unit(claim) * (1 + 1e-9) + 1e-12


def seed_claims(sub: dict, where: str = "") -> list[tuple[str, str, dict]]:
    """(where, seed, claim) for every per-seed result in submission.json, nested ones included."""
    found = []
    for key, value in sub.items():
        if not isinstance(value, dict):
            continue
        per_seed = (
            key in SEED_KEYS
            and value
            and all(re.fullmatch(r"\d+", k) and isinstance(v, dict) for k, v in value.items())
        )
        if per_seed:
            found += [(where + key, seed, claim) for seed, claim in value.items()]
        else:
            found += seed_claims(value, f"{where}{key}.")
    return found


def code_size_checks(folder: Path, sub: dict, logs: list[FolderLog]) -> list[Check]:
    """The script's size against submission.json (binding) and the logs (their Code size line)."""
    script, note = named_file(folder, SCRIPT, "train_gpt*.py")
    if not script.is_file():
        return [Check("code size", False, f"no {SCRIPT} in the folder")]
    size = script.stat().st_size
    claims = {k: sub[k] for k in CODE_KEYS if isinstance(sub.get(k), int)}
    checks = [
        Check(f"code size ({k})", v == size, f"{script.name} is {size} bytes, submission.json {k} {v}{note}")
        for k, v in claims.items()
    ]
    # A self-extracting SCRIPT (pack --compress-code) ships READABLE compressed: the runs executed READABLE.
    ran = folder / READABLE if (folder / READABLE).is_file() else script
    ran_size = ran.stat().st_size
    logged = {fl.path.name: fl.run.source_code_bytes or fl.run.code_bytes for fl in logs}
    logged = {name: v for name, v in logged.items() if v is not None}
    same = [name for name, v in logged.items() if v == ran_size]
    other = ", ".join(f"{name} {v}" for name, v in logged.items() if v != ran_size)
    if same:
        checks.append(
            Check("code size (logs)", True, f"{ran.name} is {ran_size} bytes, as {', '.join(same)} report")
        )
    if other and (same or claims):
        checks.append(
            warn("code size (other logs)", f"{other} bytes: these runs used another revision of {ran.name}")
        )
    elif other:
        checks.append(
            Check(
                "code size (logs)",
                False,
                f"{ran.name} is {ran_size} bytes but the logs report {other}: "
                "the script was changed after every run",
            )
        )
    if not claims and not logged:
        checks.append(skip("code size", "neither submission.json nor a log states it"))
    return checks


def score_check(name: str, key: str, claim, logs: list[FolderLog]) -> Check:
    """A claimed score against the score (last final evaluation) of the given logs."""
    scored = [fl for fl in logs if fl.run.score]
    for fl in scored:
        value = getattr(fl.run.score, key)
        if matches(claim, value):
            return Check(name, True, f"claimed {claim}; {fl.path.name}: {value} ({fl.run.score.name})")
    for fl in scored:
        for e in fl.run.finals[:-1]:
            if matches(claim, getattr(e, key)):
                return warn(
                    name,
                    f"claimed {claim} is {fl.path.name}'s earlier evaluation {e.name}; its last final "
                    f"evaluation, {fl.run.score.name}, gives {getattr(fl.run.score, key)}",
                )
    if not scored:
        return Check(
            name, False, f"claimed {claim}; no final evaluation in {', '.join(fl.path.name for fl in logs)}"
        )
    found = ", ".join(f"{fl.path.name} {getattr(fl.run.score, key)}" for fl in scored)
    return Check(name, False, f"claimed {claim}; the logs score {found}")


def seed_checks_any(claims: list[tuple[str, str, dict]], logs: list[FolderLog]) -> list[Check]:
    checks = []
    for where, seed, claim in claims:
        name = f"seed {seed}" + ("" if where in SEED_KEYS else f" ({where})")
        # Logs that name no seed may hold any seed's run.
        mine = [fl for fl in logs if fl.seed == int(seed)] + [fl for fl in logs if fl.seed is None]
        if not mine:
            checks.append(skip(f"{name} log", "no log of this seed in the folder"))
            continue
        for key in ("val_bpb", "val_loss"):
            if key in claim:
                checks.append(score_check(f"{name} {key}", key, claim[key], mine))
                elsewhere = [
                    fl
                    for fl in logs
                    if fl not in mine and fl.run.score and matches(claim[key], getattr(fl.run.score, key))
                ]
                if not checks[-1].ok and elsewhere:
                    checks[-1].detail += (
                        f" (the claimed value is the score of {elsewhere[0].path.name}, seed "
                        f"{elsewhere[0].seed})"
                    )
        scored = [
            fl for fl in mine if fl.run.score and matches(claim.get("val_bpb"), fl.run.score.val_bpb)
        ] or mine
        for key in SIZE_KEYS:
            if is_number(claim.get(key)):
                sizes = {
                    s for fl in scored for s in (fl.run.artifact_bytes, fl.run.total_bytes) if s is not None
                }
                checks.append(
                    Check(
                        f"{name} {key}",
                        claim[key] in sizes,
                        f"claimed {claim[key]}; the log's artifact / total: {sorted(sizes)}",
                    )
                    if sizes
                    else skip(f"{name} {key}", "the log states no size")
                )
    return checks


def mean_checks(sub: dict, claims: list[tuple[str, str, dict]], logs: list[FolderLog]) -> list[Check]:
    """The folder's val_bpb / val_loss (and their std) against the seeds' claims, else the logs."""
    checks = []
    top = [c for where, _, c in claims if where in SEED_KEYS]
    for key in ("val_bpb", "val_loss"):
        if sub.get(key) is None:
            continue
        claimed = sub[key]
        values = [float(c[key]) for c in top if is_number(c.get(key))]
        if top and len(values) == len(top):
            mean, std = mean_std(values)
            checks.append(
                Check(
                    f"{key} mean",
                    matches(claimed, mean),
                    f"claimed {claimed}, mean of the {len(values)} seeds' claims {mean:.8f}",
                )
            )
            checks += std_check(sub, key, values)
        else:
            checks.append(log_mean_check(key, claimed, logs))
    return checks


def std_check(sub: dict, key: str, values: list[float]) -> list[Check]:
    claimed = sub.get(f"{key}_std")
    if claimed is None or len(values) < 2:
        return []
    sample, population = mean_std(values)[1], statistics.pstdev(values)
    detail = f"claimed {claimed}; seeds give sample {sample:.8f}, population {population:.8f}"
    if matches(claimed, sample) or matches(claimed, population):
        which = "sample std (ddof=1)" if matches(claimed, sample) else "population std (ddof=0)"
        return [Check(f"{key}_std", True, f"{detail}: the {which}")]
    # A std is a rough figure: off in its last digits (another rounding of the seeds) is a caveat.
    near = (
        is_number(claimed)
        and min(abs(float(claimed) - sample), abs(float(claimed) - population)) <= 0.05 * sample
    )
    return [warn(f"{key}_std", f"{detail}: within 5%") if near else Check(f"{key}_std", False, detail)]


def log_mean_check(key: str, claimed, logs: list[FolderLog]) -> Check:
    """Without per-seed claims: the mean of the logs' scores, or one log's score (a single-run claim)."""
    name = f"{key} from the logs"
    scored = [fl for fl in logs if fl.run.score]
    if not logs:
        return skip(name, f"claimed {claimed}; no training log in the folder to check it against")
    if not scored:
        return Check(name, False, f"claimed {claimed}; no log in the folder has a final evaluation")
    for metric in (key, "val_bpb"):
        values = [getattr(fl.run.score, metric) for fl in scored]
        mean = mean_std(values)[0]
        single = [fl.path.name for fl, v in zip(scored, values) if matches(claimed, v)]
        how = (
            f"the mean of {len(values)} logs ({mean:.8f})"
            if matches(claimed, mean)
            else f"the score of {', '.join(single)}"
            if single
            else None
        )
        if how and metric == key:
            return Check(name, True, f"claimed {claimed} is {how}")
        if how:
            return warn(
                name, f"claimed {claimed} is {how} in val_bpb: submission.json labels a val_bpb as {key}"
            )
    found = ", ".join(f"{fl.path.name} {getattr(fl.run.score, key)}" for fl in scored)
    return (
        score_check(name, key, claimed, scored)
        if len(scored) == 1
        else Check(name, False, f"claimed {claimed}; neither the mean nor one log's score: {found}")
    )


def size_cap_checks(
    sub: dict, claims: list[tuple[str, str, dict]], logs: list[FolderLog], cap: int
) -> list[Check]:
    sizes = {
        f"submission.json {k}": sub[k] for k in ("bytes_total", "artifact_bytes_max") if is_number(sub.get(k))
    }
    sizes.update(
        {f"seed {seed} {k}": c[k] for _, seed, c in claims for k in SIZE_KEYS if is_number(c.get(k))}
    )
    sizes.update(
        {f"{fl.path.name} total": fl.run.total_bytes for fl in logs if fl.run.total_bytes is not None}
    )
    if not sizes:
        return [skip("cap", "no size stated in submission.json or the logs")]
    over = {k: v for k, v in sizes.items() if v > cap}
    largest = max(sizes, key=sizes.get)
    checks = [
        Check(
            "cap",
            not over,
            f"over the cap of {cap:,}: " + ", ".join(f"{k} {v:,}" for k, v in over.items())
            if over
            else f"every stated size <= {cap:,} (largest: {largest} {sizes[largest]:,})",
        )
    ]
    if is_number(sub.get("bytes_total")):
        totals = {fl.path.name: fl.run.total_bytes for fl in logs if fl.run.total_bytes is not None}
        hit = [n for n, v in totals.items() if v == sub["bytes_total"]]
        checks.append(
            Check("bytes_total", True, f"{sub['bytes_total']} is {', '.join(hit)}'s total")
            if hit
            else warn("bytes_total", f"{sub['bytes_total']} is no log's total ({sorted(totals.values())})")
            if totals
            else skip("bytes_total", "no log states its total")
        )
    return checks


def general_checks(folder: Path, sub: dict, logs: list[FolderLog], cap: int) -> list[Check]:
    """Every check a record folder's files and logs allow: the code size, each seed's claims against its
    log, the means, the cap, and the reviewers' checks. `sub` is submission.json read with Decimal
    floats (a claim matches to its printed precision)."""
    claims = seed_claims(sub)
    checks = code_size_checks(folder, sub, logs)
    if not logs:
        checks.append(skip("logs", "no training log in the folder: no score can be checked"))
    checks += [
        warn(f"{fl.path.name} runs", f"holds {fl.run.runs_in_file} runs; the last one was read")
        for fl in logs
        if fl.run.runs_in_file > 1
    ]
    checks += seed_checks_any(claims, logs)
    checks += mean_checks(sub, claims, logs)
    checks += size_cap_checks(sub, claims, logs, cap)
    checks += reviewer_checks(folder, sub, logs, cap)
    return checks


# ----------------------------------------------------------------------------------------------
# What the challenge's reviewers checked, on any folder: the size as shipped, where the data came
# from, one configuration across seeds, the time limits, the recomputed mean, and legality hints
# read from the script's text (hints for a human, never a verdict)
# ----------------------------------------------------------------------------------------------
PHASE_LIMIT_S = 600.0  # training (calibration that reads training data included) and evaluation, each


@dataclass(frozen=True)
class Export:
    """A published tokenization of FineWeb: its full validation set and its train shards."""

    name: str
    vocab: int
    val_tokens: int  # as the records' logs print it
    standard_shards: int  # what the download script fetches by default
    max_shards: int  # see EXPORTS


# max_shards: the most train shards an accepted record logged together with the export's full
# validation set (sp1024: the data README's own example, 180), because the manifests that publish
# the exact counts cannot be read offline. A count beyond it did not come from the export.
EXPORTS = (
    Export("sp1024", 1024, 62_021_632, 80, 180),
    Export("sp4096", 4096, 45_508_608, 80, 143),
    Export("sp8192", 8192, 40_540_160, 80, 128),
    Export("sp8192 case-ops", 8192, 47_851_520, 80, 80),
    Export("byte260", 260, 151_130_112, 80, 476),
)
# A printed validation count may drop a last partial window or count one token more: 0.1% of slack.
VAL_SLACK = 1e-3
LOG_SHARDS = re.compile(r"(?m)^\s*(?:train_loader:dataset:\S+ )?train_shards:\s?(\d+)\s*$")
LOG_VAL_TOKENS = re.compile(r"(?m)^\s*(?:val_tokens:\s?|val_loader:shards pattern=\S+ tokens:)(\d+)")
LOG_VOCAB = re.compile(r"(?m)^\s*vocab_size:\s?(\d+)\s*$")
LOG_DATASET = re.compile(r"fineweb10B_(sp\d+|byte\d+)")
LOG_TOKEN_LIMIT = re.compile(r"(?m)^val_tokens:\d+ token_limit:(\d+)")
# Calibration after the training loop, timed by the scripts: GPTQ Hessians from training batches.
LOG_CALIBRATION = (
    re.compile(r"(?m)^GPTQ:collected \d+ Hessians in ([\d.]+)s"),
    re.compile(r"(?m)^gptq:calibrated \d+ layers in ([\d.]+)s"),
    re.compile(r"(?m)^gptq: Hessians of .* in ([\d.]+)s"),
)
# train_gpt.py's own statement of when training plus calibration ended (train time + calibration time)
LOG_TRAINING_AND_CALIBRATION = re.compile(r"(?m)^training_and_calibration: ended at ([\d.]+)s")
LOG_TOTAL_EVAL = re.compile(r"(?m)^total_eval_time:\s?([\d.]+)s")
HYPERPARAMETER = re.compile(r"^  (\w+): ?(.*)$")
HEADER_PAIRS = re.compile(r"[\w/]+:\s?\S+(?:\s+[\w/]+:\s?\S+)*")
# Settings that name a run, not its recipe (our knobs and the challenge scripts' spellings).
IDENTITY_SETTINGS = {"seed", "run_id", "logfile", "local_rank", "rank", "is_main_process", "log_dir"}
IDENTITY_SETTINGS |= {k.lower() for k in RUN_IDENTITY_KNOBS} | {"s"}  # one script prints the seed as s:N
UNTIMED_HEADER_KEYS = {"warmup_step", "model_params"}


def log_text(fl: FolderLog) -> str:
    """The text of the run the log reader read (the last one in a file with several)."""
    lines = fl.path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[fl.run.first_line - 1 :])


def track_of(folder: Path, sub: dict) -> str:
    track = sub.get("track")
    if isinstance(track, str) and track in TRACKS:
        return track
    return folder.resolve().parent.name if folder.resolve().parent.name in TRACKS else RECORD_TRACK


# -- the script as shipped ----------------------------------------------------------------------


def decompressed(data: bytes, raw_lzma: bool) -> bytes | None:
    """lzma (raw LZMA2 where the wrapper says FORMAT_RAW, else any container) or zlib; None if neither."""
    if raw_lzma:
        try:
            return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        except lzma.LZMAError:
            return None
    for decompress in (lzma.decompress, zlib.decompress):
        try:
            return decompress(data)
        except (lzma.LZMAError, zlib.error):
            continue
    return None


def unwrap(source: bytes) -> bytes | None:
    """The program a compressed wrapper runs (exec of lzma/zlib over base85/base64 text), read without
    running anything; None when the source is no such wrapper."""
    ours = extracted_source(source)
    if ours is not None:
        return ours
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr != "decompress" or not node.args or not isinstance(node.args[0], ast.Call):
            continue
        inner = node.args[0]
        decoder = getattr(inner.func, "attr", getattr(inner.func, "id", ""))
        if decoder not in ("b85decode", "b64decode") or not inner.args:
            continue
        if not isinstance(inner.args[0], ast.Constant) or not isinstance(inner.args[0].value, (str, bytes)):
            continue
        text = inner.args[0].value
        try:
            data = getattr(base64, decoder)(text)
        except ValueError:
            continue
        raw = any(k.arg == "format" and "RAW" in ast.unparse(k.value) for k in node.keywords)
        program = decompressed(data, raw)
        if program is not None:
            return program
    return None


@dataclass
class ShippedCode:
    """The counted code of a folder as it sits there, and the program text it runs."""

    files: list[Path]
    bytes: int
    source: str  # the readable program (decompressed where the script is a wrapper)
    wrapped: bool  # the script is a compressed wrapper
    wrapper_bytes: int  # what our own lzma wrapper of the readable program would weigh


def shipped_code(folder: Path) -> ShippedCode | None:
    script, _ = named_file(folder, SCRIPT, "train_gpt*.py")
    if not script.is_file():
        return None
    raw = script.read_bytes()
    files, inner = [script], unwrap(raw)
    program = inner if inner is not None else raw
    # A script that runs another file of the folder (exec(open(...)), an import) ships that file too.
    for other in sorted(folder.glob("*.py")):
        if other != script and other.name in program.decode("utf-8", "replace"):
            files.append(other)
            program += b"\n" + (unwrap(other.read_bytes()) or other.read_bytes())
    size = sum(f.stat().st_size for f in files)
    wrapper = len(self_extracting(program)) if inner is None else size
    return ShippedCode(files, size, program.decode("utf-8", "replace"), inner is not None, wrapper)


def shipped_size_check(folder: Path, sub: dict, logs: list[FolderLog], cap: int) -> list[Check]:
    """Code as the folder ships it + each seed's model bytes (its file, else its log's), against the cap
    and against the totals the logs printed (compared, not trusted)."""
    name = "size as shipped"
    code = shipped_code(folder)
    if code is None:
        return [Check(name, False, f"no {SCRIPT} in the folder")]
    models = {}
    for path in sorted(folder.glob("*.ptz")):
        models[path.name] = path.stat().st_size
    for fl in logs:
        if fl.run.artifact_bytes is not None and fl.run.score is not None:
            models.setdefault(fl.path.name, fl.run.artifact_bytes)
    files = " + ".join(f"{f.name} {f.stat().st_size:,}" for f in code.files)
    how = " (a compressed wrapper)" if code.wrapped else ""
    if not models:
        return [skip(name, f"code {files}{how}; no model file and no log states the model's bytes")]
    largest = max(models, key=models.get)
    total = code.bytes + models[largest]
    printed = [
        fl.run.total_bytes for fl in logs if fl.run.total_bytes is not None and fl.run.score is not None
    ]
    printed_note = ""
    if printed and max(printed) < total:
        printed_note = f"; the logs printed totals up to {max(printed):,}, {total - max(printed):,} less"
    detail = (
        f"code {files}{how} + model {models[largest]:,} ({largest}) = {total:,} bytes, "
        f"cap {cap:,} (slack {cap - total:,}){printed_note}"
    )
    if total <= cap:
        return [Check(name, True, detail, brief=f"{total:,}")]
    wrapped_total = code.wrapper_bytes + models[largest]
    if not code.wrapped and wrapped_total <= cap:
        return [
            Check(
                name,
                True,
                f"{detail}: over as shipped; the same program as an lzma self-extracting "
                f"{SCRIPT} ({code.wrapper_bytes:,} bytes) would total {wrapped_total:,}, which the folder "
                "does not contain",
                "WARN",
                brief=f"{total:,} (wrapped {wrapped_total:,})",
            )
        ]
    return [Check(name, False, f"{detail}: over the cap", brief=f"{total:,}")]


# -- data provenance ----------------------------------------------------------------------------


def log_provenance(text: str, run: RunLog) -> tuple[int | None, int | None, int | None, str]:
    """(train shards, validation tokens, vocabulary, dataset hint) as the log printed them."""
    shards = [int(m) for m in LOG_SHARDS.findall(text)]
    val = [int(m) for m in LOG_VAL_TOKENS.findall(text)]
    vocab = [int(m) for m in LOG_VOCAB.findall(text)]
    if run.config and isinstance(run.config.get("VOCAB_SIZE"), int):
        vocab.append(run.config["VOCAB_SIZE"])
    dataset = LOG_DATASET.search(text)
    hint = "case-ops" if re.search(r"caseops|case_ops", text) else dataset[1] if dataset else ""
    if not vocab and dataset and dataset[1].startswith("sp"):
        vocab.append(int(dataset[1][2:]))
    if not vocab and dataset and dataset[1] == "byte260":
        vocab.append(260)
    return (
        shards[-1] if shards else None,
        val[-1] if val else None,
        vocab[-1] if vocab else None,
        hint,
    )


def provenance_verdict(shards: int | None, val: int | None, vocab: int | None, hint: str) -> tuple[str, str]:
    """(status, words) for one log's data against the known exports."""
    candidates = [e for e in EXPORTS if vocab is None or e.vocab == vocab]
    if hint == "case-ops":
        candidates = [e for e in candidates if "case-ops" in e.name] or candidates
    elif vocab == 8192:
        candidates = [e for e in candidates if "case-ops" not in e.name] + [
            e for e in candidates if "case-ops" in e.name
        ]
    seen = f"train_shards {shards if shards is not None else 'not logged'}, val_tokens " + (
        f"{val:,}" if val is not None else "not logged"
    )
    if val is None:
        return ("SKIP" if shards is None else "WARN"), f"{seen}: the validation set size is not logged"
    export = next((e for e in candidates if abs(val - e.val_tokens) <= VAL_SLACK * e.val_tokens), None)
    if export is None:
        if candidates and val < min(e.val_tokens for e in candidates) * (1 - VAL_SLACK):
            smallest = min(candidates, key=lambda e: e.val_tokens)
            return "FAIL", (
                f"{seen}: a validation set smaller than the {smallest.name} export's {smallest.val_tokens:,} "
                "tokens (validation documents moved into training?)"
            )
        return "WARN", f"{seen}: matches no known export ({vocab or '?'}-token vocabulary)"
    if shards is None:
        return "WARN", f"{seen}: the {export.name} export's full validation set; train shards not logged"
    if shards > export.max_shards:
        return "FAIL", (
            f"{seen}: {shards} train shards, beyond the {export.max_shards} of the {export.name} export "
            "(data prepared another way: were validation documents among them?)"
        )
    extra = f", more than the standard {export.standard_shards}" if shards > export.standard_shards else ""
    return "PASS", f"{seen}: the {export.name} export's full validation set{extra}"


def provenance_check(logs: list[FolderLog]) -> Check:
    name = "data provenance"
    if not logs:
        return skip(name, "no training log in the folder")
    verdicts: dict[tuple[str, str], list[str]] = {}
    seen = []
    for fl in logs:
        text = log_text(fl)
        shards, val, vocab, hint = log_provenance(text, fl.run)
        status, words = provenance_verdict(shards, val, vocab, hint)
        pair = f"{'-' if shards is None else shards} / {'-' if val is None else f'{val:,}'}"
        seen += [pair] if pair not in seen else []
        limit = LOG_TOKEN_LIMIT.search(text)
        if limit and int(limit[1]):  # our VAL_TOKEN_LIMIT: a partial evaluation by choice, said in its log
            status = "WARN"
            words = (
                f"train_shards {'not logged' if shards is None else shards}: evaluated on the first "
                f"{int(limit[1]):,} validation tokens only (VAL_TOKEN_LIMIT), not a full-validation score"
            )
        verdicts.setdefault((status, words), []).append(fl.path.name)
    order = ("FAIL", "WARN", "PASS", "SKIP")
    worst = min((s for s, _ in verdicts), key=order.index)
    detail = "; ".join(f"{', '.join(names)}: {words}" for (s, words), names in verdicts.items())
    return Check(name, worst != "FAIL", detail, worst, brief="; ".join(seen))


# -- one configuration across seeds ---------------------------------------------------------------


def run_settings(text: str, run: RunLog) -> dict[str, str]:
    """The settings a log states: our config line, else a `Hyperparameters:` block, else the header's
    key:value lines; plus the code identity (sha256, else the code size)."""
    settings: dict[str, str] = {}
    if run.config:
        settings = {k.lower(): json.dumps(v) for k, v in run.config.items()}
    else:
        lines = text.splitlines()
        if "Hyperparameters:" in lines:
            for line in lines[lines.index("Hyperparameters:") + 1 :]:
                m = HYPERPARAMETER.match(line)
                if not m:
                    break
                settings[m[1].lower()] = m[2].strip()
        else:
            for line in lines:
                if STEP_LINE.match(line):
                    break
                if HEADER_PAIRS.fullmatch(line.strip()) and not line.startswith((" ", "\t")):
                    settings.update((k.lower(), v) for k, v in runlog.KEY_VALUE.findall(line))
    settings = {
        k: v for k, v in settings.items() if k not in IDENTITY_SETTINGS and k not in UNTIMED_HEADER_KEYS
    }
    if run.code_sha256:
        settings["code sha256"] = run.code_sha256
    elif run.source_code_bytes or run.code_bytes:
        settings["code size"] = str(run.source_code_bytes or run.code_bytes)
    return settings


STEP_LINE = re.compile(r"^(?:step:)?\d+/\d+ [\w/]+:")


def same_config_check(logs: list[FolderLog]) -> list[Check]:
    name = "same configuration across seeds"
    scored = [fl for fl in logs if fl.run.score is not None]
    if len(scored) < 2:
        return [skip(name, f"{len(scored)} scored log(s): nothing to compare")]
    settings = {fl.path.name: run_settings(log_text(fl), fl.run) for fl in scored}
    first = scored[0].path.name
    if not any(settings.values()):
        return [warn(name, f"{len(scored)} logs state no settings to compare")]
    differ: dict[str, list[str]] = {}
    for log_name, mine in settings.items():
        for key in sorted(settings[first].keys() | mine.keys()):
            if settings[first].get(key) != mine.get(key):
                differ.setdefault(key, []).append(log_name)
    paths = {k for k in differ if all("/" in (s.get(k) or "/") for s in settings.values())}
    real = {k: v for k, v in differ.items() if k not in paths}
    keys = f"{len(settings[first])} settings"
    if real:
        shown = "; ".join(
            f"{k}: {first} {settings[first].get(k, 'absent')} vs "
            + ", ".join(f"{n} {settings[n].get(k, 'absent')}" for n in names)
            for k, names in list(real.items())[:6]
        )
        more = f" (+{len(real) - 6} more)" if len(real) > 6 else ""
        detail = f"{len(scored)} logs differ in {len(real)} of {keys}: {shown}{more}"
        return [Check(name, False, detail, brief=f"no: {', '.join(list(real)[:3])}")]
    note = f"; only paths differ ({', '.join(sorted(paths))})" if paths else ""
    detail = f"{len(scored)} logs agree on {keys} apart from the seed{note}"
    return [Check(name, True, detail, brief=f"yes ({len(scored)} logs)")]


# -- time -----------------------------------------------------------------------------------------


def time_check(logs: list[FolderLog], track: str) -> list[Check]:
    """Training (+ calibration after the loop) and evaluation of each scored log against 600 s each."""
    scored = [fl for fl in logs if fl.run.score is not None]
    if not scored:
        return [skip("time", "no scored log in the folder")]
    over = "FAIL" if track == RECORD_TRACK else "WARN"  # the non-record track may break the limit
    checks = []
    for phase in ("train", "eval"):
        parts, worst, longest = [], "PASS", 0.0
        for fl in scored:
            text = log_text(fl)
            if phase == "train":
                train_ms = fl.run.train_time_ms
                calib = [float(m) for pattern in LOG_CALIBRATION for m in pattern.findall(text)]
                if train_ms is None:
                    parts.append(f"{fl.path.name} not logged")
                    worst = "WARN" if worst == "PASS" else worst
                    continue
                seconds = train_ms / 1000 + sum(calib)
                how = f"{train_ms / 1000:.1f}s" + (f" + calibration {sum(calib):.1f}s" if calib else "")
                ended = [float(m) for m in LOG_TRAINING_AND_CALIBRATION.findall(text)]
                if ended and max(ended) > seconds:  # the log's own end time, when later
                    seconds = max(ended)
                    how += f", ended at {seconds:.1f}s"
            else:
                total = LOG_TOTAL_EVAL.findall(text)
                eval_ms = fl.run.score.eval_time_ms
                if not total and eval_ms is None:
                    parts.append(f"{fl.path.name} not logged")
                    worst = "WARN" if worst == "PASS" else worst
                    continue
                seconds = max([float(t) for t in total] + ([eval_ms / 1000] if eval_ms is not None else []))
                how = f"{seconds:.1f}s ({fl.run.score.name})"
            longest = max(longest, seconds)
            # The loop reads the clock once per step, so the step that crosses 600 s is part of the run:
            # two average steps of grace (the last steps run slower than the average).
            allowed = PHASE_LIMIT_S + 2 * (fl.run.step_avg_ms or 0) / 1000 * (phase == "train")
            if seconds > allowed:
                worst = over if worst != "FAIL" else worst
                how += f" > {allowed:.1f}s"
            parts.append(f"{fl.path.name} {how}")
        label = "time (training incl. calibration)" if phase == "train" else "time (evaluation)"
        brief = f"{longest:.0f}s" if longest else "-"
        checks.append(Check(label, worst != "FAIL", "; ".join(parts), worst, brief=brief))
    return checks


# -- the mean, recomputed from the logs -----------------------------------------------------------


def recomputed_mean_check(sub: dict, logs: list[FolderLog]) -> Check:
    """The claimed val_bpb against the mean over seeds of the logs' scored evaluation (the one whose name
    a per-seed claim matches, else the last), one log per seed (the last in name order)."""
    name = "recomputed mean"
    claimed = sub.get("val_bpb")
    if not is_number(claimed):
        return skip(name, "submission.json states no val_bpb")
    claims = [c.get("val_bpb") for where, _, c in seed_claims(sub) if where in SEED_KEYS]
    by_seed: dict = {}
    for fl in logs:
        if fl.run.score is not None:
            by_seed[fl.seed if fl.seed is not None else fl.path.name] = fl
    if not by_seed:
        return skip(name, f"claimed {claimed}; no scored log in the folder")
    scored_name = None
    for fl in by_seed.values():
        for e in reversed(fl.run.finals):
            if any(matches(c, e.val_bpb) for c in claims) and scored_name is None:
                scored_name = e.name
    values = []
    for fl in by_seed.values():
        named = [e for e in fl.run.finals if e.name == scored_name]
        values.append((named[-1] if named else fl.run.score).val_bpb)
    mean, std = mean_std(values)
    diff = float(claimed) - mean
    spread = f", std {std:.6f}" if std is not None else ""
    detail = (
        f"claimed {claimed}; {len(values)} log(s) ({', '.join(str(k) for k in by_seed)}) give "
        f"{mean:.8f}{spread}, claimed - logs {diff:+.6f}"
    )
    brief = f"{mean:.5f}"
    if matches(claimed, mean) or abs(diff) <= 1e-6:
        return Check(name, True, detail, brief=brief)
    single = [str(k) for k, v in zip(by_seed, values) if matches(claimed, v)]
    if single and len(values) > 1:
        detail += f": the claim is the score of one run ({', '.join(single)}), not the mean"
        return Check(name, True, detail, "WARN", brief)
    if abs(diff) <= 5e-4:
        return Check(name, True, f"{detail} (another set of runs or rounding?)", "WARN", brief)
    return Check(name, False, f"{detail}: the logs do not give the claimed score", brief=brief)


# -- legality hints from the script text ------------------------------------------------------------
NGRAM = re.compile(r"\b(?:ppm|n_?gram\w*|\w*_ngram\w*)\b", re.IGNORECASE)
VAL_NAME = re.compile(r"val_(?:tokens|data|files|loader|seqs)|fineweb_val", re.IGNORECASE)
# Calibration and warm-up run before the score and may read training data only (training functions also
# validate periodically, which is legal, so they are not searched).
CALIBRATION_FUNC = re.compile(r"warm_?up|calib|hessian|gptq", re.IGNORECASE)
EVAL_FUNC = re.compile(r"ttt|^eval|_eval", re.IGNORECASE)
SCORE_TARGET = re.compile(r"loss|nll|bpb|score|sum", re.IGNORECASE)


def update_and_score_lines(nodes) -> tuple[list[int], list[int]]:
    """Lines of a function that update weights (backward, an optimizer's step) and that accumulate a
    score (`loss_sum += ...`, `loss_sum.add_(...)`)."""
    updates, scores = [], []
    for n in nodes:
        if isinstance(n, ast.AugAssign) and SCORE_TARGET.search(ast.unparse(n.target)):
            scores.append(n)
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            continue
        owner = ast.unparse(n.func.value)
        if n.func.attr == "backward" or (n.func.attr == "step" and "opt" in owner.lower()):
            updates.append(n)
        if n.func.attr in ("add_", "index_add_") and SCORE_TARGET.search(owner):
            scores.append(n)
    return _lines(updates), _lines(scores)


def _lines(nodes) -> list[int]:
    return sorted({n.lineno for n in nodes if hasattr(n, "lineno")})


def _shown(lines: list[int], source_lines: list[str]) -> str:
    shown = ", ".join(f"{n}: {source_lines[n - 1].strip()[:60]}" for n in lines[:4])
    return shown + (f" (+{len(lines) - 4} more)" if len(lines) > 4 else "")


def legality_hints(code: ShippedCode | None) -> list[Check]:
    """WARN with the lines where the script does what reviewers rejected when done wrong: evaluation or
    TTT updating before it scores, n-gram / PPM mixtures, validation data in training, warm-up or
    calibration. A hint for a human reading those lines, not a verdict."""
    name = "legality hint"
    if code is None:
        return [skip(name, f"no {SCRIPT} to read")]
    source_lines = code.source.splitlines()
    try:
        tree = ast.parse(code.source)
    except SyntaxError as err:
        tree = None
        checks = [
            warn(
                name,
                f"{SCRIPT} does not parse under Python {sys.version.split()[0]} ({err.msg}, line "
                f"{err.lineno}): only its text was searched",
            )
        ]
    else:
        checks = []
    ngram = [
        i + 1
        for i, line in enumerate(source_lines)
        if NGRAM.search(line) and not line.lstrip().startswith("#")
    ]
    if ngram:
        checks.append(
            warn(
                f"{name} (n-gram / PPM)",
                f"the distribution must stay normalised and causal: {_shown(ngram, source_lines)}",
            )
        )
    early, val_in_training = [], []
    for func in ast.walk(tree) if tree is not None else ():
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        nodes = list(ast.walk(func))
        if EVAL_FUNC.search(func.name) and not func.name.startswith("train"):
            updates, scores = update_and_score_lines(nodes)
            # Only a function that both scores and updates can be read this way; updates on tokens
            # scored elsewhere (phased global steps) are legal and not flagged.
            if updates and scores and updates[0] < scores[0]:
                early.append(f"{func.name}: update at line {updates[0]}, first score at line {scores[0]}")
        if CALIBRATION_FUNC.search(func.name) and not EVAL_FUNC.search(func.name):
            val_in_training += _lines(
                n for n in nodes if isinstance(n, ast.Name) and VAL_NAME.fullmatch(n.id)
            )
        for call in (n for n in nodes if isinstance(n, ast.Call)):
            callee = ast.unparse(call.func)
            if CALIBRATION_FUNC.search(callee) and not EVAL_FUNC.search(callee):
                if any(
                    VAL_NAME.search(ast.unparse(a)) for a in [*call.args, *(k.value for k in call.keywords)]
                ):
                    val_in_training.append(call.lineno)
    if early:
        checks.append(
            warn(
                f"{name} (update before score)",
                "score each token before any update that saw it: " + "; ".join(early[:3]),
            )
        )
    if val_in_training:
        lines = sorted(set(val_in_training))
        checks.append(
            warn(
                f"{name} (validation data in training)",
                "training, warm-up and calibration may read training data only: "
                + _shown(lines, source_lines),
            )
        )
    if not checks:
        checks.append(
            Check(
                name,
                True,
                "no n-gram/PPM mixture, no update before scoring, no validation data in training found",
            )
        )
    return checks


def layout_check(folder: Path, sub: dict) -> Check:
    """The community's submission validator (the challenge's PR #683): README.md, submission.json, a
    train_gpt*.py that parses and a train log at the folder's top level; val_bpb (or mean_val_bpb), name
    (or run_name) and date in submission.json with the right types. A folder outside records/<track>/
    (a copy being checked) is a WARN, not a FAIL."""
    name = "layout (community validator)"
    problems = [f for f in ("README.md", SUBMISSION) if not (folder / f).is_file()]
    scripts = sorted(folder.glob("train_gpt*.py"))
    if not scripts:
        problems.append("train_gpt*.py")
    top_logs = [fl for fl in folder_logs(folder) if fl.path.parent == folder]
    if not top_logs:
        problems.append("a train log at the top level")
    for script in scripts:
        try:
            ast.parse(script.read_bytes())
        except (SyntaxError, ValueError) as err:
            problems.append(f"{script.name} does not parse under Python {sys.version.split()[0]} ({err})")
    fields = (
        (("val_bpb", "mean_val_bpb"), (int, float, Decimal)),
        (("name", "run_name"), (str,)),
        (("date",), (str,)),
    )
    for keys, types in fields:
        if not any(isinstance(sub.get(k), types) and not isinstance(sub.get(k), bool) for k in keys):
            problems.append(f"submission.json {' or '.join(keys)}")
    if problems:
        return Check(name, False, "missing or invalid: " + "; ".join(problems))
    logs = ", ".join(fl.path.name for fl in top_logs)
    where = folder.resolve().parent.name
    if where not in TRACKS:
        return warn(
            name, f"files and fields as required (logs: {logs}); the folder is not under records/<track>/"
        )
    return Check(name, True, f"{where}: files and fields as required (logs: {logs})")


def reviewer_checks(folder: Path, sub: dict, logs: list[FolderLog], cap: int) -> list[Check]:
    code = shipped_code(folder)
    return [
        layout_check(folder, sub),
        *shipped_size_check(folder, sub, logs, cap),
        provenance_check(logs),
        *same_config_check(logs),
        *time_check(logs, track_of(folder, sub)),
        recomputed_mean_check(sub, logs),
        *legality_hints(code),
    ]


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def claimed_per_seed(sub: dict, metric: str) -> list[float] | None:
    """The per-seed `metric` of submission.json's top-level seed results, or None when it has none."""
    top = [c for where, _, c in seed_claims(sub) if where in SEED_KEYS]
    values = [c.get(metric) for c in top]
    if not top or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


def logged_per_seed(folder: Path, metric: str) -> tuple[list[float], list[str]]:
    """One score per seed from the folder's logs (the last log in name order where a seed has several)."""
    by_seed: dict = {}
    for fl in folder_logs(folder):
        if fl.run.score is not None:
            by_seed[fl.seed if fl.seed is not None else fl.path.name] = fl
    return [getattr(fl.run.score, metric) for fl in by_seed.values()], [
        fl.path.name for fl in by_seed.values()
    ]


def load_sample(spec: list[str], label: str, metric: str) -> Sample:
    """Numbers, or one submission.json / record folder: its per-seed `metric` as claimed, else the
    scores in its logs (one per seed)."""
    if len(spec) == 1 and Path(spec[0]).exists():
        path = Path(spec[0])
        folder, path = (path, path / SUBMISSION) if path.is_dir() else (path.parent, path)
        try:
            sub = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RecordError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
        values = claimed_per_seed(sub, metric) if isinstance(sub, dict) else None
        if values:
            return Sample(f"{label} ({metric} per seed of {path})", values)
        values, names = logged_per_seed(folder, metric)
        if not values:
            raise RecordError(
                f"{folder}: no per-seed {metric} in {SUBMISSION} and no log with a final evaluation"
            )
        return Sample(f"{label} ({metric} from the logs of {folder}: {', '.join(names)})", values)
    try:
        return Sample(label, [float(v) for v in spec])
    except ValueError:
        raise RecordError(
            f"--{label} {' '.join(spec)}: expected numbers, a submission.json or a record folder"
        ) from None


def compare(opts: argparse.Namespace) -> WelchResult:
    """The Welch test at --margin / --alpha (the exit status), then both of the challenge's rules."""
    baseline_spec, candidate_spec = opts.baseline, opts.candidate
    if opts.samples:
        if len(opts.samples) != 2 or baseline_spec or candidate_spec:
            raise RecordError(
                "compare A B: give two folders (A the baseline, B the candidate), or --baseline/--candidate"
            )
        baseline_spec, candidate_spec = [opts.samples[0]], [opts.samples[1]]
    if not baseline_spec or not candidate_spec:
        raise RecordError("compare: give A and B, or --baseline and --candidate")
    baseline = load_sample(baseline_spec, "baseline", opts.metric)
    candidate = load_sample(candidate_spec, "candidate", opts.metric)
    result = welch_test(baseline, candidate, opts.margin, opts.alpha)
    for s in (baseline, candidate):
        std = "n/a (n=1)" if s.std is None else f"{s.std:.8f}"
        print(f"{s.label}: n={s.n} mean={s.mean:.8f} std={std}")
    print(f"improvement (baseline - candidate): {result.improvement:+.8f} (margin {opts.margin:g})")
    if result.t is not None:
        print(
            f"Welch t={result.t:.4f} df={result.df:.2f} one-sided p={result.p:.4g} "
            f"(H1: improvement > {opts.margin:g})"
        )
    print(f"verdict: {result.verdict}")
    units = "" if opts.metric == "val_loss" else f" (the README's margin is in nats; these are {opts.metric})"
    for label, margin, alpha in (
        (f"README rule (beat A by {README_MARGIN:g} at p < {README_ALPHA:g})", README_MARGIN, README_ALPHA),
        (f"chronological rule (beat A at p < {CHRONOLOGICAL_ALPHA:g})", 0.0, CHRONOLOGICAL_ALPHA),
    ):
        rule = welch_test(baseline, candidate, margin, alpha)
        p = "n/a" if rule.p is None else f"{rule.p:.4g}"
        print(
            f"{label}: one-sided p={p}: {'met' if rule.significant else 'not met'}{units if margin else ''}"
        )
    return result


# ----------------------------------------------------------------------------------------------
# audit: verify every record folder of a records/ tree, one table row per folder
# ----------------------------------------------------------------------------------------------
AUDIT_COLUMNS = (
    ("size as shipped", "size as shipped"),
    ("shards / val tokens", "data provenance"),
    ("seeds consistent", "same configuration across seeds"),
    ("train", "time (training incl. calibration)"),
    ("eval", "time (evaluation)"),
)


def audit_row(folder: Path, checks: list[Check], sub_text: str) -> list[str]:
    by_name = {c.name: c for c in checks}
    try:
        claimed = json.loads(sub_text, parse_float=Decimal).get("val_bpb", "-")
    except (ValueError, AttributeError):
        claimed = "-"
    mean = by_name.get("recomputed mean")
    cells = [folder.name, str(claimed), mean.brief or "-" if mean else "-"]
    for _, check_name in AUDIT_COLUMNS:
        check = by_name.get(check_name)
        if check is None:
            cells.append("-")
            continue
        mark = "" if check.status == "PASS" else f" **{check.status}**"
        cells.append(f"{check.brief or '-'}{mark}")
    flags = [f"{c.status} {c.name}" for c in checks if c.status in ("FAIL", "WARN")]
    cells.append("; ".join(flags) or "-")
    return cells


def audit(opts: argparse.Namespace) -> int:
    """A markdown table of `verify` over every folder of both tracks under opts.root, then each FAIL."""
    root = Path(opts.root)
    folders = [f for track in TRACKS for f in sorted((root / track).glob("*")) if f.is_dir()]
    if not folders:
        raise RecordError(f"{root}: no folders under {' or '.join(TRACKS)}")
    header = ["folder", "claimed val_bpb", "recomputed mean", *(c for c, _ in AUDIT_COLUMNS), "flags"]
    tables: dict[str, list[list[str]]] = {track: [] for track in TRACKS}
    failures, totals = [], {status: 0 for status in ("PASS", "WARN", "FAIL")}
    started = time.monotonic()
    for i, folder in enumerate(folders, 1):
        print(f"audit: {i}/{len(folders)} {folder.parent.name}/{folder.name}", file=sys.stderr, flush=True)
        opts_one = argparse.Namespace(
            folder=str(folder),
            cap=opts.cap,
            data=None,
            tokenizer=None,
            token_limit=0,
            tolerance=None,
            quick=False,
        )
        checks = verify(argparse.Namespace(**vars(opts_one), device="cpu", batch_seqs=32))
        sub_path = named_file(folder, SUBMISSION, "submission*.json")[0]
        sub_text = sub_path.read_text(encoding="utf-8") if sub_path.is_file() else "{}"
        tables[folder.parent.name].append(audit_row(folder, checks, sub_text))
        failed = [c for c in checks if c.status == "FAIL"]
        verdict = "FAIL" if failed else "WARN" if any(c.status == "WARN" for c in checks) else "PASS"
        totals[verdict] += 1
        failures += [(folder, c) for c in failed]
    print(f"audit: {len(folders)} folders in {time.monotonic() - started:.0f}s", file=sys.stderr)
    for track, rows in tables.items():
        print(f"\n### {track} ({len(rows)} folders)\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    print(
        f"\nTotals: {len(folders)} folders; {totals['PASS']} pass every check, {totals['WARN']} pass with "
        f"warnings, {totals['FAIL']} have at least one FAIL ({len(failures)} FAIL checks)."
    )
    print("\n### Every FAIL, as verify printed it\n")
    for folder, check in failures:
        print(f"- `{folder.parent.name}/{folder.name}`: {check}")
    return 0


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="create records/<track>/<date>_<name>/ from run logs")
    p.add_argument("logs", nargs="+", help="one train_gpt.py log per seed")
    p.add_argument("--name", required=True, help="short name, the folder suffix")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", choices=TRACKS, default=RECORD_TRACK)
    p.add_argument(
        "--blurb", default="", help="one line; also the technique_summary (default: from the config)"
    )
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument(
        "--about", help="a markdown file: the README's opening, in place of the sections left TODO"
    )
    p.add_argument(
        "--script", default=str(REPO / SCRIPT), help="the train_gpt.py that ran (default: the repo's)"
    )
    p.add_argument(
        "--artifacts", nargs="+", help="artifact per log, in order (default: from the size_check lines)"
    )
    p.add_argument(
        "--all-artifacts", action="store_true", help="include every seed's artifact, not only the shipped one"
    )
    p.add_argument("--records-dir", default=str(REPO / "records"))
    p.add_argument("--folder", help="the record folder to write (default: RECORDS_DIR/TRACK/DATE_NAME)")
    p.add_argument(
        "--ship",
        choices=("best", "smallest"),
        default="best",
        help="which seed's artifact the folder ships: the lowest val_bpb (default) or the smallest",
    )
    p.add_argument("--cap", type=int, default=CAP_BYTES, help="size cap in bytes (default %(default)s)")
    p.add_argument(
        "--allow-partial-eval",
        action="store_true",
        help="accept VAL_TOKEN_LIMIT runs (not a score), on the non-record track only",
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--compress-code",
        action="store_true",
        help=f"count {SCRIPT} in lzma self-extracting form, with the readable script as {READABLE}",
    )
    p.add_argument("--check-data", help="validation data for the quick check (default: the log's DATA_PATH)")
    p.add_argument(
        "--check-tokenizer", help="tokenizer for the quick check (default: the log's TOKENIZER_PATH)"
    )
    p.add_argument("--check-tokens", type=int, default=16384)
    p.add_argument(
        "--check-stride", type=int, default=0, help="quick check stride (default: non-overlapping)"
    )
    p.add_argument("--batch-seqs", type=int, default=32)

    v = sub.add_parser("verify", help="check a record folder's sizes and re-evaluate its artifact")
    v.add_argument("folder")
    v.add_argument("--data", help="validation data (default: verify_check's)")
    v.add_argument("--tokenizer", help="tokenizer (default: verify_check's)")
    v.add_argument(
        "--token-limit",
        type=int,
        default=0,
        help="quick check on the first N tokens against verify_check (default: full re-evaluation)",
    )
    v.add_argument("--tolerance", type=float, help="max |val_bpb diff| (default 1e-5 quick, 1e-3 full)")
    v.add_argument(
        "--quick",
        action="store_true",
        help="every check of the files, sizes, hashes and logs; no evaluation (the re-score and the "
        "legality probes are listed as skipped)",
    )
    v.add_argument("--device", default="cpu", help="cpu or cuda")
    v.add_argument("--batch-seqs", type=int, default=32)
    v.add_argument("--cap", type=int, default=CAP_BYTES)

    a = sub.add_parser("audit", help="verify every record folder of a records/ tree: a markdown table")
    a.add_argument("root", help="a records/ folder holding track_10min_16mb/ and track_non_record_16mb/")
    a.add_argument("--cap", type=int, default=CAP_BYTES)

    c = sub.add_parser(
        "compare", help="one-sided Welch t-test: does the candidate beat the baseline by a margin"
    )
    c.add_argument("samples", nargs="*", help="A B: two record folders, A the baseline, B the candidate")
    c.add_argument("--baseline", nargs="+", help="numbers, a submission.json or a record folder")
    c.add_argument("--candidate", nargs="+", help="numbers, a submission.json or a record folder")
    c.add_argument(
        "--metric",
        choices=("val_loss", "val_bpb"),
        default="val_loss",
        help="per-seed value read from submissions (the 0.005 rule is in nats: val_loss)",
    )
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
            counts = {
                status: sum(c.status == status for c in checks) for status in ("PASS", "WARN", "SKIP", "FAIL")
            }
            made = len(checks) - counts["SKIP"]
            print(
                f"{'FAILED' if counts['FAIL'] else 'PASSED'}: {made - counts['FAIL']}/{made} checks pass "
                f"({counts['WARN']} with a warning), {counts['SKIP']} skipped"
            )
            return 1 if counts["FAIL"] else 0
        if opts.command == "audit":
            return audit(opts)
        return 0 if compare(opts).significant else 1
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as err:  # a folder or file that vanished or cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
