"""The one reader of training logs, ours and the challenge's, and the home of the score rule.

    python3 -m tools.runlog LOG [LOG...]          # summary per log, as a short table for people
    python3 -m tools.runlog LOG --json            # the summary as JSON (one object per log)
    python3 -m tools.runlog LOG --full            # everything found, as JSON

Two paths:
- Our runs: train_gpt.py writes LOG_DIR/RUN_ID.jsonl beside RUN_ID.txt (one JSON event per line;
  the contract and the score rule are in docs/runlog.md). When that file is there it is read
  exactly and the text is not parsed (`--text` parses the text anyway).
- Any other text log (ours from before the JSONL, or a competitor's) is read leniently, by the
  shapes every script of the challenge prints: `NAME val_loss:X val_bpb:Y`, step lines
  (`step:N/M ...` or `N/M ...`), `Serialized model ...: N bytes`, `Code size ...: N bytes`,
  `Total submission size ...: N bytes`, `stopping_early: ...`. Code echoed into the log (several
  scripts print their own source first) never matches: those lines are indented or hold `{...}`.

The score rule (one place): the score of a run is its LAST final evaluation, whatever the script
named it (`final_int8_zlib_roundtrip_exact`, `legal_ttt_exact`, `quantized_ttt_phased`, ours...).
Evaluations named `diagnostic ...` and pre-quantization evaluations are never the score. A run
without a final evaluation has no score: `score` is None and the CLI says so loudly (exit 1). The
pre-quantization value is the labelled pre-quant evaluation, else the last periodic validation
(runs without EMA validate the float weights last).

Several runs in one file: the last run is read (a run starts at a start-of-run line after results
of the previous run, or where the step counter restarts), and `runs_in_file` and `notes` say so.
Lines stamped with a time (unix seconds or a date) are read without the stamp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# A number as Python prints it (including nan and inf).
NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
# Evaluation on the first N validation tokens only (our VAL_TOKEN_LIMIT): not a score.
PARTIAL = re.compile(r"\(first (\d+) tokens only: not a score\)")
# `NAME [key:value ...] val_loss:X val_bpb:Y [rest]`; NAME is words (no colon) from the line start.
EVAL = re.compile(
    rf"^(?P<name>[A-Za-z][\w.+-]*(?: [A-Za-z][\w.+-]*)*)(?P<pre>(?: [\w/]+:\s?\S+)*)"
    rf" val_loss:\s?(?P<loss>{NUM}) val_bpb:\s?(?P<bpb>{NUM})(?P<rest>.*)$"
)
# `step:N/M key:value ...` (older scripts) or `N/M key: value ...` (newer ones).
STEP = re.compile(r"^(?:step:)?(?P<step>\d+)/(?P<of>\d+) (?P<rest>[\w/]+:.*)$")
STOP = re.compile(r"^stopping_early: .*?train_time:\s?(?P<ms>\d+)ms step:\s?(?P<step>\d+)/(?P<of>\d+)")
SERIALIZED = re.compile(r"^Serialized model(?: (?P<how>[^:]+?))?: (?P<n>\d+) bytes")
CODE_SIZE = re.compile(r"^Code size(?: \((?P<how>[^)]*)\))?: (?P<n>\d+) bytes")
TOTAL = re.compile(r"^Total submission size(?: (?P<how>[^:]+?))?: (?P<n>\d+) bytes")
SEED = re.compile(r"^\s*seed[:=]\s?(\d+)\s*$")
PEAK = re.compile(r"^peak memory allocated: (\d+) MiB")
# Lines of our own trainer's text log that pack needs when no JSONL exists (older runs).
HEADER = re.compile(
    r"^python (\S+) torch (\S+) device (\S+)(?: \((.*)\))? world_size (\d+) grad_accum (\d+)$"
)
CODE_SHA = re.compile(r"^code_sha256:([0-9a-f]{64}) code_bytes:(\d+)$")
CONFIG = re.compile(r"^config (\{.*\})$")
SIZE_CHECK = re.compile(
    r"^size_check (?P<kv>.*?) (?P<verdict>OK|OVER THE CAP) artifact:(?P<path>.+?)"
    r"(?: sha256:(?P<sha>[0-9a-f]{64}))?$"
)
MOE = re.compile(r"^moe layer:\d+ ")
ROUTING_JSON = re.compile(r"^routing statistics: (.+)$")
# Where a competitor's run starts: the lines their scripts print first.
RUN_MARKERS = (HEADER, re.compile(r"^Running Python "), re.compile(r"^Hyperparameters:?$"))
KEY_VALUE = re.compile(r"([\w/]+):\s?(\S+)")
# A time stamp some scripts put before every line: unix seconds, or a date and time (maybe bracketed).
STAMP = re.compile(r"^(?:\d{10}(?:\.\d+)?|\[?\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\]?) ")
UNRECOGNISED_KEPT = 20  # the first few unrecognised lines are kept as examples


@dataclass
class Eval:
    """One evaluation of the validation split."""

    name: str
    val_loss: float
    val_bpb: float
    mode: str = ""  # "plain", "sliding" or "ttt" (from the JSONL, or guessed from the name)
    eval_time_ms: float | None = None
    stride: int | None = None
    seq_len: int | None = None
    token_limit: int = 0  # 0: the whole split; N: the first N tokens only (not a score)
    line: int | None = None  # 1-based line in the file (text logs)
    invalid: str = (
        ""  # why the trainer marked this result invalid (INVALID(...) / the event's "invalid"); "" = valid
    )


@dataclass
class Step:
    """A periodic line of training progress: train_loss, or a validation (val_loss and val_bpb)."""

    step: int
    iterations: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None
    tok_per_s: float | None = None
    mfu_pct: float | None = None
    token_limit: int = 0


def _latest(step: Step) -> tuple[int, bool]:
    """Order of progress lines: by step; at the same step the validation line comes last."""
    return step.step, step.val_bpb is not None


@dataclass
class SizeCheck:
    total: int | None
    cap: int | None
    slack: int | None
    ok: bool
    artifact_path: str | None
    sha256: str | None


@dataclass
class RunLog:
    """Everything found about the last run in one log; None / empty where absent."""

    path: Path | None = None
    source: str = "text"  # "jsonl" (our event log, exact) or "text" (lenient)
    runs_in_file: int = 0
    first_line: int = 1
    python: str | None = None
    torch: str | None = None
    device: str | None = None
    device_name: str = ""
    world_size: int | None = None
    grad_accum: int | None = None
    config: dict | None = None  # our knobs (SEED, ...); None for foreign logs
    seed: int | None = None
    code_sha256: str | None = None
    start_code_bytes: int | None = None  # train_gpt.py's size when the run started (ours)
    params: dict | None = None
    train_steps: list[Step] = field(default_factory=list)
    val_steps: list[Step] = field(default_factory=list)
    stop: tuple[int, int, float] | None = None  # (step, iterations, train_time_ms) of a wall-clock stop
    moe: list[dict] = field(default_factory=list)  # routing telemetry, each with its step
    peak_mib: int | None = None
    pre_quant: Eval | None = None
    diagnostics: list[Eval] = field(default_factory=list)  # `diagnostic ...` evaluations: never the score
    finals: list[Eval] = field(default_factory=list)  # in order; the last one is the score
    artifact_bytes: int | None = None
    code_bytes: int | None = None  # counted code bytes (the compressed size where a script prints both)
    source_code_bytes: int | None = None  # the script's plain size, where it differs from code_bytes
    total_bytes: int | None = None
    size_check: SizeCheck | None = None
    routing_json: str | None = None
    errors: list[str] = field(default_factory=list)
    status: str | None = None  # "ok" / "failed" from our JSONL's end event
    unrecognised_lines: int = 0
    unrecognised_examples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # -- the rules, in one place ------------------------------------------------------------

    @property
    def score(self) -> Eval | None:
        """The run's score: its last final evaluation (None when the log has none)."""
        return self.finals[-1] if self.finals else None

    @property
    def pre_quant_val_bpb(self) -> float | None:
        """The labelled pre-quantization evaluation, else the last periodic validation."""
        if self.pre_quant:
            return self.pre_quant.val_bpb
        return self.last_val.val_bpb if self.last_val else None

    @property
    def last_train(self) -> Step | None:
        return self.train_steps[-1] if self.train_steps else None

    @property
    def last_val(self) -> Step | None:
        return self.val_steps[-1] if self.val_steps else None

    @property
    def steps(self) -> int | None:
        if self.stop:
            return self.stop[0]
        last = [s.step for s in (self.last_train, self.last_val) if s]
        return max(last) if last else None

    @property
    def train_time_ms(self) -> float | None:
        if self.stop:
            return self.stop[2]
        timed = [s for s in (*self.train_steps, *self.val_steps) if s.train_time_ms is not None]
        return max(timed, key=_latest).train_time_ms if timed else None

    @property
    def step_avg_ms(self) -> float | None:
        """As the log prints it on its last step line, else train time / steps."""
        printed = [s for s in (*self.train_steps, *self.val_steps) if s.step_avg_ms is not None]
        if printed:
            return max(printed, key=_latest).step_avg_ms
        steps, ms = self.steps, self.train_time_ms
        return ms / steps if steps and ms is not None else None

    @property
    def partial_eval(self) -> bool:
        """Validation on the first tokens only (our VAL_TOKEN_LIMIT): its numbers are not a score."""
        if self.config and self.config.get("VAL_TOKEN_LIMIT"):
            return True
        evals = [*self.val_steps, *self.finals, *([self.pre_quant] if self.pre_quant else [])]
        return any(e.token_limit for e in evals)

    @property
    def notes(self) -> list[str]:
        where = f"{self.path}: " if self.path else ""
        if self.runs_in_file > 1:
            return [f"{where}holds {self.runs_in_file} runs; read the last one (from line {self.first_line})"]
        return []

    def moe_history(self) -> dict[int | str, list[dict]]:
        """layer (or "layer pass p") -> its routing records in step order."""
        history: dict[int, list[dict]] = {}
        for record in self.moe:  # a layer with one router per pass of the loop: one series per pass
            key = (
                record["layer"] if record.get("pass") is None else f"{record['layer']} pass {record['pass']}"
            )
            history.setdefault(key, []).append(record)
        return history

    def summary(self) -> dict:
        """The numbers a reviewer asks for first (the CLI's default output)."""
        score = self.score
        return dict(
            path=str(self.path) if self.path else None,
            source=self.source,
            final_val_bpb=score.val_bpb if score else None,
            final_val_loss=score.val_loss if score else None,
            final_name=score.name if score else None,
            final_invalid=score.invalid if score else None,
            pre_quant_val_bpb=self.pre_quant_val_bpb,
            code_bytes=self.code_bytes,
            artifact_bytes=self.artifact_bytes,
            total_bytes=self.total_bytes,
            steps=self.steps,
            step_avg_ms=self.step_avg_ms,
            train_time_ms=self.train_time_ms,
            seed=self.seed,
            partial_eval=self.partial_eval,
            runs_in_file=self.runs_in_file,
            first_line=self.first_line,
            finals=[dict(name=e.name, val_loss=e.val_loss, val_bpb=e.val_bpb) for e in self.finals],
            unrecognised_lines=self.unrecognised_lines,
            notes=self.notes + self.warnings,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(path=str(self.path) if self.path else None, summary=self.summary())
        return out


# ---------------------------------------------------------------------------- text logs


def _number(text: str) -> float | None:
    """A printed value with an optional unit (`8123ms`, `0.8m`, `41.7%`) -> float (ms for times)."""
    m = re.fullmatch(rf"({NUM})(ms|m|s|%)?,?", text)
    if not m:
        return None
    value = float(m[1])
    return value * {"m": 60_000.0, "s": 1000.0}.get(m[2] or "", 1.0)


def eval_mode(name: str) -> str:
    lowered = name.lower()
    return "ttt" if "ttt" in lowered else "sliding" if "sliding" in lowered else "plain"


def _is_pre_quant(name: str) -> bool:
    lowered = name.lower()
    post_ema_float = (
        "post" in lowered and "ema" in lowered and "quant" not in lowered
    )  # "DIAGNOSTIC post_ema"
    return bool(re.search(r"pre.?quant", lowered)) or post_ema_float


def _eval(m: re.Match, line_no: int) -> Eval:
    extras = dict(KEY_VALUE.findall(m["pre"] + " " + m["rest"]))
    partial = PARTIAL.search(m["rest"])

    def as_int(key: str) -> int | None:
        value = _number(extras.get(key, ""))
        return int(value) if value is not None else None

    invalid = re.search(r"INVALID\((.*)\)\s*$", m["rest"])
    return Eval(
        m["name"],
        float(m["loss"]),
        float(m["bpb"]),
        eval_mode(m["name"]),
        _number(extras.get("eval_time", "")),
        as_int("stride"),
        as_int("seq_len"),
        int(partial[1]) if partial else 0,
        line_no,
        invalid[1] if invalid else "",
    )


def _step(m: re.Match) -> Step | None:
    values = {k: _number(v) for k, v in KEY_VALUE.findall(m["rest"])}
    partial = PARTIAL.search(m["rest"])
    step = Step(
        int(m["step"]),
        int(m["of"]),
        values.get("train_loss"),
        values.get("val_loss"),
        values.get("val_bpb"),
        values.get("train_time"),
        values.get("step_avg"),
        values.get("tok/s"),
        values.get("mfu"),
        int(partial[1]) if partial else 0,
    )
    return step if step.train_loss is not None or step.val_bpb is not None else None


def _moe(line: str, step: int) -> dict:
    """A `moe layer:` telemetry line of our text log, by its key:value pairs."""
    kv = dict(KEY_VALUE.findall(line[len("moe ") :]))
    record = dict(layer=int(kv.get("layer", -1)), step=step)
    if "pass" in kv:
        record["pass"] = int(kv["pass"])
    if "load" in kv:
        record["load"] = [float(v) for v in kv["load"].split(",") if v]
    for key, name in (
        ("max_mean", "max_over_mean"),
        ("dead", "dead"),
        ("entropy", "entropy"),
        ("aux", "aux"),
        ("z", "z"),
        ("drop", "dropped"),
    ):
        if key in kv and _number(kv[key]) is not None:
            record[name] = _number(kv[key])
    if "dead" in record:
        record["dead"] = int(record["dead"])
    return record


def _sizes(run: RunLog, line: str) -> bool:
    """Serialized model / Code size / Total submission size lines; True when the line was one."""
    m = SERIALIZED.match(line)
    if m:  # the unqualified line is the raw torch.save of some scripts; the qualified one is the artifact
        if m["how"] or run.artifact_bytes is None:
            run.artifact_bytes = int(m["n"])
        return True
    m = CODE_SIZE.match(line)
    if m:
        if m["how"] and "uncompressed" in m["how"]:
            run.source_code_bytes = int(m["n"])
        else:
            run.code_bytes = int(m["n"])
        return True
    m = TOTAL.match(line)
    if m:
        if m["how"] or run.total_bytes is None:
            run.total_bytes = int(m["n"])
        return True
    return False


def _own_line(run: RunLog, line: str) -> bool:
    """Identity lines of our trainer's text log (header, code hash, config, size check)."""
    m = HEADER.match(line)
    if m:
        run.python, run.torch, run.device, run.device_name = m[1], m[2], m[3], m[4] or ""
        run.world_size, run.grad_accum = int(m[5]), int(m[6])
        return True
    m = CODE_SHA.match(line)
    if m:
        run.code_sha256, run.start_code_bytes = m[1], int(m[2])
        return True
    m = CONFIG.match(line)
    if m:
        try:
            config = json.loads(m[1])
        except ValueError:
            config = None
        run.config = config if isinstance(config, dict) else None
        if run.config is None:
            run.warnings.append(f"line {run.first_line}+: the config line is not valid JSON")
        elif isinstance(run.config.get("SEED"), int):
            run.seed = run.config["SEED"]
        return True
    if line.startswith("params "):  # params total:N active_matmul_per_token:N router:N moe_mode:... (ours)
        run.params = {k: int(v) if v.isdigit() else v for k, v in KEY_VALUE.findall(line[len("params ") :])}
        return bool(run.params)
    m = SIZE_CHECK.match(line)
    if m:
        kv = {k: int(v) for k, v in KEY_VALUE.findall(m["kv"]) if re.fullmatch(r"-?\d+", v)}
        run.size_check = SizeCheck(
            kv.get("total"), kv.get("cap"), kv.get("slack"), m["verdict"] == "OK", m["path"].strip(), m["sha"]
        )
        return True
    return False


def _line(run: RunLog, line: str, line_no: int) -> bool:
    """Applies one line of a text log to the run; False when no shape matched."""
    m = STEP.match(line)
    if m:
        step = _step(m)
        if step is None:
            return False
        (run.train_steps if step.train_loss is not None else run.val_steps).append(step)
        return True
    m = EVAL.match(line)
    if m:
        found = _eval(m, line_no)
        if _is_pre_quant(found.name):
            run.pre_quant = found
        elif found.name.lower().startswith("diagnostic"):
            run.diagnostics.append(found)
        else:
            run.finals.append(found)
        return True
    if _sizes(run, line) or _own_line(run, line):
        return True
    if MOE.match(line):
        run.moe.append(_moe(line, run.last_train.step if run.last_train else 0))
        return True
    for pattern, apply in (
        (STOP, lambda m: setattr(run, "stop", (int(m["step"]), int(m["of"]), float(m["ms"])))),
        (SEED, lambda m: setattr(run, "seed", run.seed if run.seed is not None else int(m[1]))),
        (PEAK, lambda m: setattr(run, "peak_mib", int(m[1]))),
        (ROUTING_JSON, lambda m: setattr(run, "routing_json", m[1])),
    ):
        m = pattern.match(line)
        if m:
            apply(m)
            return True
    return False


def split_runs(lines: list[str]) -> list[int]:
    """0-based first line of each run. A new run starts at a start-of-run line (our header,
    `Running Python`, `Hyperparameters:`) that follows a result line of the current run, or, for
    scripts that print no such line, right after the last result line where the step counter goes
    back. Start-of-run lines before any result (a script that prints two) do not split."""
    starts, last_step, last_result = [0], -1, -1
    for i, line in enumerate(lines):
        if last_result >= starts[-1] and any(p.match(line) for p in RUN_MARKERS):
            starts.append(i)
            last_step = -1
            continue
        step = STEP.match(line)
        if step and _step(step) is not None:
            if int(step["step"]) < last_step:
                starts.append(last_result + 1)
            last_step, last_result = int(step["step"]), i
        elif EVAL.match(line) or SERIALIZED.match(line) or TOTAL.match(line) or STOP.match(line):
            last_result = i
    return starts


def parse(text: str, path: str | Path | None = None) -> RunLog:
    """Everything found about the last run of a text log; never raises on content."""
    lines = [STAMP.sub("", line, count=1) for line in text.splitlines()]
    starts = split_runs(lines)
    run = RunLog(
        path=Path(path) if path is not None else None,
        first_line=starts[-1] + 1,
        runs_in_file=len(starts) if any(line.strip() for line in lines) else 0,
    )
    for number, line in enumerate(lines[starts[-1] :], start=starts[-1] + 1):
        if not _line(run, line, number) and line.strip():
            run.unrecognised_lines += 1
            if len(run.unrecognised_examples) < UNRECOGNISED_KEPT:
                run.unrecognised_examples.append(line)
    return run


# ---------------------------------------------------------------------------- our JSONL event log


def _json_eval(event: dict, name: str) -> Eval:
    ms = event.get("eval_time_ms")
    if ms is None and isinstance(event.get("eval_time_s"), (int, float)):
        ms = 1000.0 * event["eval_time_s"]
    return Eval(
        name,
        float(event["val_loss"]),
        float(event["val_bpb"]),
        event.get("mode") or eval_mode(name),
        ms,
        event.get("stride"),
        event.get("seq_len"),
        int(event.get("token_limit") or 0),
        invalid="; ".join(map(str, event.get("invalid") or [])),
    )


def _json_config(run: RunLog, event: dict) -> None:
    run.config = event.get("knobs") if isinstance(event.get("knobs"), dict) else None
    seed = (run.config or {}).get("SEED")
    run.seed = seed if isinstance(seed, int) else None
    run.code_sha256, run.start_code_bytes = event.get("code_sha256"), event.get("code_bytes")
    run.torch, run.python, run.world_size, run.grad_accum = (
        event.get(k) for k in ("torch", "python", "world_size", "grad_accum")
    )
    device = str(event.get("device") or "")
    m = re.fullmatch(r"(\S+) \((.*)\)", device)  # "cuda:0 (NVIDIA H100 80GB HBM3)"
    run.device, run.device_name = (m[1], m[2]) if m else (device or None, event.get("device_name") or "")


def _json_size_check(run: RunLog, event: dict) -> None:
    run.code_bytes, run.artifact_bytes, run.total_bytes = (
        event.get(k) for k in ("code_bytes", "artifact_bytes", "total_bytes")
    )
    run.source_code_bytes = event.get("script_bytes")  # where the counted code is the shipped wrapper
    cap, slack, total = event.get("cap"), event.get("slack"), event.get("total_bytes")
    ok = (
        event["ok"]
        if isinstance(event.get("ok"), bool)
        else (total is not None and cap is not None and total <= cap)
    )
    run.size_check = SizeCheck(
        total,
        cap,
        slack,
        ok,
        event.get("artifact_path") or event.get("artifact"),
        event.get("artifact_sha256") or event.get("sha256"),
    )


def _json_step(run: RunLog, event: dict) -> None:
    run.train_steps.append(
        Step(
            event["step"],
            event.get("iterations", 0),
            train_loss=event.get("train_loss"),
            train_time_ms=event.get("train_time_ms"),
            step_avg_ms=event.get("step_avg_ms"),
            tok_per_s=event.get("tok_s"),
            mfu_pct=event.get("mfu"),
        )
    )


def _json_val(run: RunLog, event: dict) -> None:
    run.val_steps.append(
        Step(
            event["step"],
            event.get("iterations", 0),
            val_loss=event["val_loss"],
            val_bpb=event["val_bpb"],
            train_time_ms=event.get("train_time_ms"),
            step_avg_ms=event.get("step_avg_ms"),
            token_limit=int(event.get("token_limit") or 0),
        )
    )


JSON_EVENTS = {
    "config": _json_config,
    "params": lambda run, e: setattr(
        run, "params", {k: v for k, v in e.items() if k not in ("event", "time")}
    ),
    "step": _json_step,
    "val": _json_val,
    "routing": lambda run, e: run.moe.append({k: v for k, v in e.items() if k not in ("event", "time")}),
    "pre_quant": lambda run, e: setattr(run, "pre_quant", _json_eval(e, e.get("name", "pre_quant"))),
    "size_check": _json_size_check,
    "final": lambda run, e: run.finals.append(_json_eval(e, str(e.get("name", "final")))),
    "error": lambda run, e: run.errors.append(str(e.get("message", ""))),
    "end": lambda run, e: setattr(run, "status", e.get("status")),
    "routing_report": lambda run, e: setattr(run, "routing_json", e.get("path")),
}


def _fill_from_knobs(run: RunLog) -> None:
    """Evaluation geometry the events leave out (they may carry stride, seq_len and token_limit;
    when they do not, the run's knobs say them)."""
    knobs = run.config or {}
    seq_len = knobs.get("EVAL_SEQ_LEN") or knobs.get("TRAIN_SEQ_LEN")
    limit = knobs.get("VAL_TOKEN_LIMIT") or 0
    for e in [*run.finals, *([run.pre_quant] if run.pre_quant else [])]:
        e.seq_len = e.seq_len or seq_len
        if e.stride is None and seq_len:
            e.stride = (knobs.get("EVAL_STRIDE") or seq_len) if e.mode == "sliding" else seq_len
        e.token_limit = e.token_limit or limit
    for step in run.val_steps:
        step.token_limit = step.token_limit or limit


def parse_jsonl(text: str, path: str | Path | None = None) -> RunLog:
    """Our event log, read exactly: the events of the last `config` event onwards. A malformed line or
    an event without its fields is counted as unrecognised (and warned about), never fatal."""
    records: list[tuple[int, dict]] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            records.append((number, event))
        else:
            bad.append(number)
    configs = [i for i, (_, e) in enumerate(records) if e["event"] == "config"]
    first = configs[-1] if configs else 0
    run = RunLog(
        path=Path(path) if path is not None else None,
        source="jsonl",
        runs_in_file=max(len(configs), 1),
        first_line=records[first][0] if records else 1,
    )
    for number, event in records[first:]:
        handle = JSON_EVENTS.get(event["event"])
        try:
            if handle:
                handle(run, event)
        except (KeyError, TypeError, ValueError) as err:
            bad.append(number)
            run.warnings.append(f"line {number}: {event['event']} event without a usable {err}")
    _fill_from_knobs(run)
    run.unrecognised_lines = len(bad)
    if bad:
        run.warnings.append(f"{len(bad)} line(s) not valid events (first: line {min(bad)})")
    return run


# ---------------------------------------------------------------------------- files


def jsonl_beside(path: Path) -> Path | None:
    """LOG_DIR/RUN_ID.jsonl for LOG_DIR/RUN_ID.txt (or the path itself when it is the JSONL)."""
    if path.suffix == ".jsonl":
        return path
    candidate = path.with_suffix(".jsonl")
    return candidate if candidate.is_file() else None


def read(path: str | Path, text_only: bool = False) -> RunLog:
    """The run in a log file: from its JSONL when one is beside it, else from the text. OSError when
    the file cannot be read."""
    path = Path(path)
    events = None if text_only else jsonl_beside(path)
    if events is not None:
        return parse_jsonl(events.read_text(encoding="utf-8", errors="replace"), path)
    return parse(path.read_text(encoding="utf-8", errors="replace"), path)


def _num(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def human_summary(summary: dict) -> str:
    """The summary as a few aligned lines for a person (--json gives the same numbers to programs)."""
    steps, ms, bpb = summary["steps"], summary["train_time_ms"], summary["final_val_bpb"]
    score = f"val_bpb {_num(bpb, 8)} (val_loss {_num(summary['final_val_loss'], 8)}, {summary['final_name']})"
    rows = [
        ("log", f"{summary['path']} (read from its {summary['source']})"),
        ("score", score if bpb is not None else "NONE: no final evaluation in this log"),
        *[("also", f"val_bpb {_num(e['val_bpb'], 8)} ({e['name']})") for e in summary["finals"][:-1]],
        ("pre-quant", f"val_bpb {_num(summary['pre_quant_val_bpb'], 8)}"),
        (
            "bytes",
            f"{_num(summary['total_bytes'])} total = code {_num(summary['code_bytes'])} + artifact "
            f"{_num(summary['artifact_bytes'])}",
        ),
        (
            "training",
            f"{_num(steps)} steps in {_num(ms / 1000 if ms is not None else None, 1)} s "
            f"({_num(summary['step_avg_ms'], 2)} ms/step), seed {summary['seed']}",
        ),
    ]
    if summary["final_invalid"]:
        rows.append(("INVALID", summary["final_invalid"]))
    if summary["partial_eval"]:
        rows.append(("note", "evaluated on part of the validation split only: not a score"))
    if summary["runs_in_file"] > 1:
        first = summary["first_line"]
        rows.append(
            ("note", f"{summary['runs_in_file']} runs in the file; the last (from line {first}) is shown")
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument(
        "--json", action="store_true", help="the summary as JSON (default: a short table for people)"
    )
    parser.add_argument("--full", action="store_true", help="everything found, not only the summary")
    parser.add_argument("--text", action="store_true", help="parse the text even when a JSONL is beside it")
    args = parser.parse_args(argv)
    status = 0
    for path in args.logs:
        try:
            run = read(path, text_only=args.text)
        except OSError as err:
            print(f"error: {path}: cannot read the log ({err.strerror})", file=sys.stderr)
            return 2
        for note in run.notes + run.warnings:
            print(f"note: {note}", file=sys.stderr)
        if run.score is None:
            print(
                f"WARNING: {path}: no final evaluation found: this log has NO SCORE "
                f"(crashed, still running, or not a training log); final_val_bpb is null",
                file=sys.stderr,
            )
            status = 1
        elif run.score.invalid:
            print(
                f"WARNING: {path}: the trainer marked the result INVALID ({run.score.invalid}): not a score",
                file=sys.stderr,
            )
            status = 1
        elif not all(math.isfinite(v) for v in (run.score.val_bpb, run.score.val_loss)):
            print(
                f"WARNING: {path}: the final evaluation is not finite ({run.score.val_bpb})", file=sys.stderr
            )
            status = 1
        if args.full or args.json:
            print(json.dumps(run.to_dict() if args.full else run.summary(), indent=1))
        else:
            print(human_summary(run.summary()) + ("\n" if len(args.logs) > 1 else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
