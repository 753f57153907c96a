"""The strict checks of a folder this tool packed (its submission.json has a verify_check): exact sizes
and sha256s against its files, its artifacts re-scored by its own script with EVAL_ONLY (or the quick
check on the first tokens), and two legality probes on the shipped artifact (one-token-flip causality
for every evaluation mode, and the normalisation of the scored distribution)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools import runlog
from tools.common import REPO, sha256_file
from tools.dev.selfextract import extracted_source
from tools.records.base import (
    CAP_BYTES,
    READABLE,
    SCRIPT,
    SUBMISSION,
    Check,
    FolderLog,
    RecordError,
    RunLog,
    changed_knobs,
    close,
    env_value,
    load_script,
    parse_log,
    script_size_logged,
    skip,
    warn,
)
from tools.records.evaluate import (
    evaluate_artifact,
    script_evaluate,
    script_ttt_evaluate,
    script_value,
    with_script_values,
)


@dataclass(frozen=True)
class VerifyOptions:
    """How verify treats a folder of ours (the keyword arguments of `verify`)."""

    data: str | Path | None = None  # validation data (None: verify_check's)
    tokenizer: str | Path | None = None  # (None: verify_check's)
    token_limit: int = 0  # 0: re-score each artifact in full; N: the quick check on the first N tokens
    tolerance: float | None = None  # max |val_bpb diff| (None: 1e-5 quick, 1e-3 full)
    quick: bool = False  # every check of the files; no evaluation
    device: str = "cpu"
    batch_seqs: int = 32
    cap: int = CAP_BYTES


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


def own_folder_checks(folder: Path, sub: dict, opts: VerifyOptions) -> list[Check]:
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


def quick_eval_checks(
    opts: VerifyOptions, module, folder: Path, check: dict, data: str, tokenizer: str
) -> list[Check]:
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
        f"{' and '.join(missing)} not found here; rerun with: python3 -m tools.records verify {folder} "
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


def rescore_check(
    folder: Path, module, seed: str, claim: dict, data: Path, tokenizer: Path, opts: VerifyOptions
) -> Check:
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
