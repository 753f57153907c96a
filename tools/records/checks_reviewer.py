"""What the challenge's reviewers checked, on any folder: the size as shipped, where the data came from,
one configuration across seeds, the time limits, the recomputed mean, and legality hints read from the
script's text (hints for a human, never a verdict)."""

from __future__ import annotations

import ast
import base64
import json
import lzma
import re
import sys
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from tools import runlog
from tools.stats import mean_std
from tools.dev.selfextract import extracted_source, self_extracting
from tools.records.base import (
    RECORD_TRACK,
    RUN_IDENTITY_KNOBS,
    SCRIPT,
    SUBMISSION,
    TRACKS,
    Check,
    FolderLog,
    RunLog,
    folder_logs,
    named_file,
    skip,
    warn,
)
from tools.records.checks_claims import SEED_KEYS, is_number, matches, seed_claims

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
