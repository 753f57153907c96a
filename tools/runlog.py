"""The one reader of train_gpt.py's run logs (logs/<RUN_ID>.txt): every line pattern lives here.

    python tools/runlog.py logs/RUN.txt        # everything found, as JSON

`parse(text)` is lenient: it reads the last run in the text and fills a `RunLog` with whatever it
finds (a crashed run simply lacks its final fields); deciding what is missing is the caller's job
(tools/records.py refuses incomplete logs, tools/proxy_study.py marks them failed). The formats
are those of train_gpt.py: `log_header`, `log_budget_preview`, `Trainer.log_step`,
`routing_log_lines`, `export_artifact`, `export_and_report`, `final_evaluation`,
`write_routing_report` and `main`. A line no pattern knows is kept in `RunLog.unknown`.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# A number as train_gpt.py prints it (f-strings of floats, including nan and inf).
F = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
# The suffix of every evaluation line of a VAL_TOKEN_LIMIT run.
PARTIAL = r"(?: \(first (\d+) tokens only: not a score\))?"

HEADER = re.compile(r"^python (\S+) torch (\S+) device (\S+)(?: \((.*)\))? world_size (\d+) grad_accum (\d+)$")
CODE = re.compile(r"^code_sha256:([0-9a-f]{64}) code_bytes:(\d+)$")
CONFIG = re.compile(r"^config (\{.*\})$")
VAL_TOKENS = re.compile(r"^val_tokens:(\d+) token_limit:(\d+) data:(.*)$")
PARAMS = re.compile(r"^params total:(\d+) active_matmul_per_token:(\d+) router:(\d+) "
                    r"moe_mode:(\S+) moe_layers:\[([\d, ]*)\]$")
BUDGET = re.compile(r"^budget_preview: artifact ~(\d+) bytes \(([^)]*)\) \+ code (\d+) = ~(\d+) of (\d+) "
                    r"\(slack ~(-?\d+)\)$")
WARMUP = re.compile(rf"^compile_warmup: (\d+) steps in ({F})s \(not timed, undone\)$")
TRAIN_STEP = re.compile(rf"^step:(\d+)/(\d+) train_loss:({F}) train_time:(\d+)ms step_avg:({F})ms "
                        rf"tok/s:(\d+)(?: mfu:({F})%)?$")
VAL_STEP = re.compile(rf"^step:(\d+)/(\d+) val_loss:({F}) val_bpb:({F}) train_time:(\d+)ms "
                      rf"step_avg:({F})ms{PARTIAL}$")
MOE = re.compile(rf"^moe layer:(\d+) load:((?:{F},)*{F}) max_mean:({F}) dead:(\d+) entropy:({F}) "
                 rf"aux:({F}) z:({F}) bias:({F})\.\.({F}) drop:({F})$")
COLLAPSE = re.compile(rf"^WARNING moe layer:(\d+) routing collapse: one expert takes ({F})% of the tokens$")
PEAK = re.compile(r"^peak memory allocated: (\d+) MiB$")
PRE_QUANT = re.compile(rf"^pre_quant_ema val_loss:({F}) val_bpb:({F}){PARTIAL}$")
QUANT = re.compile(rf"^quant: relative squared error ({F}), artifact (\d+) bytes \+ code (\d+)$")
FIT = re.compile(rf"^fit: bits lowered (none|\{{[^}}]*\}}), pruning \+({F}), relative squared error ({F}): "
                 r"(?:predicted (\d+) bytes, over the cap|artifact (\d+) bytes)$")
FIT_FAILED = re.compile(r"^!!! ARTIFACT OVER THE CAP: (\d+) > (\d+) bytes even after every fit step !!!$")
SERIALIZED = re.compile(r"^Serialized model quant\+zstd: (\d+) bytes$")
CODE_SIZE = re.compile(r"^Code size: (\d+) bytes$")
TOTAL = re.compile(r"^Total submission size quant\+zstd: (\d+) bytes$")
SIZE_CHECK = re.compile(r"^size_check total:(\d+) cap:(\d+) slack:(-?\d+) (OK|OVER THE CAP) "
                        r"artifact:(.+?)(?: sha256:([0-9a-f]{64}))?$")
FINAL = re.compile(rf"^final_quant_zstd_(roundtrip|sliding_window)_exact val_loss:({F}) val_bpb:({F}) "
                   rf"stride:(\d+) seq_len:(\d+) eval_time:(\d+)ms{PARTIAL}$")
ROUTING_JSON = re.compile(r"^routing statistics: (.+)$")


@dataclass
class Header:
    python: str
    torch: str
    device: str  # "cpu", "cuda:0"
    device_name: str  # the GPU's name on CUDA, else ""
    world_size: int
    grad_accum: int

    @property
    def device_label(self) -> str:
        return f"{self.device} ({self.device_name})" if self.device_name else self.device


@dataclass
class Params:
    total: int
    active_matmul_per_token: int
    router: int
    moe_mode: str
    moe_layers: list[int]


@dataclass
class BudgetPreview:
    artifact_bytes: int  # the estimate
    per_class: dict[str, int]
    code_bytes: int
    total_bytes: int
    cap: int
    slack: int


@dataclass
class TrainStep:
    step: int
    iterations: int
    train_loss: float
    train_time_ms: int
    step_avg_ms: float
    tok_per_s: int
    mfu_pct: float | None  # CUDA with a known peak only


@dataclass
class ValStep:
    step: int
    iterations: int
    val_loss: float
    val_bpb: float
    train_time_ms: int
    step_avg_ms: float
    token_limit: int  # 0: the whole validation split; N: the first N tokens only (not a score)


@dataclass
class Collapse:
    step: int
    layer: int
    share_pct: float


@dataclass
class PreQuant:
    val_loss: float
    val_bpb: float
    token_limit: int


@dataclass
class Quant:
    rel_error: float
    artifact_bytes: int
    code_bytes: int


@dataclass
class FitStep:
    bits_lowered: dict[str, int]
    extra_pruning: float
    rel_error: float
    predicted_bytes: int | None  # set when the step was predicted over the cap and skipped
    artifact_bytes: int | None  # set when the step was compressed at the full level


@dataclass
class SizeCheck:
    total: int
    cap: int
    slack: int
    ok: bool
    artifact_path: str
    sha256: str | None  # absent in logs of older train_gpt.py versions


@dataclass
class FinalEval:
    val_loss: float
    val_bpb: float
    stride: int
    seq_len: int
    eval_time_ms: int
    token_limit: int  # 0: the whole validation split; N: the first N tokens only (not a score)


@dataclass
class RunLog:
    """Everything found in one run's lines; None / empty where the line is absent."""
    path: Path | None = None
    runs_in_file: int = 1  # run headers in the text; only the last run is parsed
    first_line: int = 1  # where the parsed run starts in the text (1-based)
    header: Header | None = None
    code_sha256: str | None = None
    header_code_bytes: int | None = None  # size of train_gpt.py at start; `code_bytes` is at export
    config_text: str | None = None
    config: dict | None = None  # None when absent or not valid JSON (see config_text)
    val_tokens: int | None = None
    token_limit: int | None = None
    data_path: str | None = None
    params: Params | None = None
    budget: BudgetPreview | None = None
    warmup_steps: int | None = None
    warmup_s: float | None = None
    train_steps: list[TrainStep] = field(default_factory=list)
    val_steps: list[ValStep] = field(default_factory=list)
    moe: list[dict] = field(default_factory=list)  # `moe layer:` records in order, each with its step
    collapses: list[Collapse] = field(default_factory=list)
    peak_mib: int | None = None
    pre_quant: PreQuant | None = None
    quant: Quant | None = None
    fit_steps: list[FitStep] = field(default_factory=list)
    fit_failed: tuple[int, int] | None = None  # (total, cap) when no fit step got under the cap
    artifact_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    size_check: SizeCheck | None = None
    finals: dict[str, FinalEval] = field(default_factory=dict)  # "roundtrip", "sliding_window"
    routing_json: str | None = None
    counts: Counter = field(default_factory=Counter)  # lines seen per pattern name
    unknown: list[str] = field(default_factory=list)  # non-empty lines no pattern matched

    @property
    def notes(self) -> list[str]:
        where = f"{self.path}: " if self.path else ""
        if self.runs_in_file > 1:
            return [f"{where}holds {self.runs_in_file} runs; read the last one (from line {self.first_line})"]
        return []

    @property
    def score(self) -> FinalEval | None:
        """The official number: the sliding-window eval when it ran, else the round trip."""
        return self.finals.get("sliding_window", self.finals.get("roundtrip"))

    @property
    def last_train(self) -> TrainStep | None:
        return self.train_steps[-1] if self.train_steps else None

    @property
    def last_val(self) -> ValStep | None:
        return self.val_steps[-1] if self.val_steps else None

    @property
    def partial_eval(self) -> bool:
        """Validation on the first tokens only (VAL_TOKEN_LIMIT): its numbers are not a score."""
        limits = [self.token_limit or 0] + [e.token_limit for e in (*self.val_steps, *self.finals.values())]
        return any(limits) or bool(self.pre_quant and self.pre_quant.token_limit)

    def moe_history(self) -> dict[int, list[dict]]:
        """layer -> its `moe layer:` records in step order."""
        history: dict[int, list[dict]] = {}
        for record in self.moe:
            history.setdefault(record["layer"], []).append(record)
        return history

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(path=str(self.path) if self.path else None, counts=dict(self.counts), notes=self.notes)
        return out


def split_runs(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) per run. A run starts at its `python ... torch ... device` header;
    lines before the first header (a truncated earlier run) are dropped when a header follows."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if HEADER.match(line)] or [0]
    return [(s + 1, lines[s:e]) for s, e in zip(starts, [*starts[1:], len(lines)])]


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


def _token_limit(group: str | None) -> int:
    return int(group) if group else 0


def parse_moe_line(line: str) -> dict | None:
    """One `moe layer:` telemetry line as a dict (no step), or None."""
    m = MOE.match(line)
    if not m:
        return None
    return dict(layer=int(m[1]), load=[float(v) for v in m[2].split(",")], max_over_mean=float(m[3]),
                dead=int(m[4]), entropy=float(m[5]), aux=float(m[6]), z=float(m[7]),
                bias_min=float(m[8]), bias_max=float(m[9]), drop_rate=float(m[10]))


def _header(run: RunLog, m: re.Match) -> None:
    run.header = Header(m[1], m[2], m[3], m[4] or "", int(m[5]), int(m[6]))


def _code(run: RunLog, m: re.Match) -> None:
    run.code_sha256, run.header_code_bytes = m[1], int(m[2])


def _config(run: RunLog, m: re.Match) -> None:
    run.config_text = m[1]
    try:
        config = json.loads(m[1])
    except ValueError:
        config = None
    run.config = config if isinstance(config, dict) else None


def _val_tokens(run: RunLog, m: re.Match) -> None:
    run.val_tokens, run.token_limit, run.data_path = int(m[1]), int(m[2]), m[3]


def _params(run: RunLog, m: re.Match) -> None:
    run.params = Params(int(m[1]), int(m[2]), int(m[3]), m[4], _ints(m[5]))


def _budget(run: RunLog, m: re.Match) -> None:
    per_class = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m[2])}
    run.budget = BudgetPreview(int(m[1]), per_class, int(m[3]), int(m[4]), int(m[5]), int(m[6]))


def _warmup(run: RunLog, m: re.Match) -> None:
    run.warmup_steps, run.warmup_s = int(m[1]), float(m[2])


def _train_step(run: RunLog, m: re.Match) -> None:
    run.train_steps.append(TrainStep(int(m[1]), int(m[2]), float(m[3]), int(m[4]), float(m[5]), int(m[6]),
                                     float(m[7]) if m[7] else None))


def _val_step(run: RunLog, m: re.Match) -> None:
    run.val_steps.append(ValStep(int(m[1]), int(m[2]), float(m[3]), float(m[4]), int(m[5]), float(m[6]),
                                 _token_limit(m[7])))


def _step(run: RunLog) -> int:
    """The step of the train line that telemetry follows (0 before the first)."""
    return run.train_steps[-1].step if run.train_steps else 0


def _moe(run: RunLog, m: re.Match) -> None:
    run.moe.append(dict(parse_moe_line(m[0]), step=_step(run)))


def _collapse(run: RunLog, m: re.Match) -> None:
    run.collapses.append(Collapse(_step(run), int(m[1]), float(m[2])))


def _fit(run: RunLog, m: re.Match) -> None:
    drops = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", m[1])}
    run.fit_steps.append(FitStep(drops, float(m[2]), float(m[3]), int(m[4]) if m[4] else None,
                                 int(m[5]) if m[5] else None))


def _size_check(run: RunLog, m: re.Match) -> None:
    run.size_check = SizeCheck(int(m[1]), int(m[2]), int(m[3]), m[4] == "OK", m[5], m[6])


def _final(run: RunLog, m: re.Match) -> None:
    run.finals[m[1]] = FinalEval(float(m[2]), float(m[3]), int(m[4]), int(m[5]), int(m[6]), _token_limit(m[7]))


def _setter(name: str, convert=int):
    def handle(run: RunLog, m: re.Match) -> None:
        setattr(run, name, convert(m[1]))
    return handle


# Pattern name -> (pattern, what a match does to the RunLog). A later line of a kind replaces an
# earlier one for single values (the final validation comes after periodic ones).
LINES: dict[str, tuple[re.Pattern, object]] = {
    "header": (HEADER, _header),
    "code": (CODE, _code),
    "config": (CONFIG, _config),
    "val_tokens": (VAL_TOKENS, _val_tokens),
    "params": (PARAMS, _params),
    "budget_preview": (BUDGET, _budget),
    "compile_warmup": (WARMUP, _warmup),
    "train_step": (TRAIN_STEP, _train_step),
    "val_step": (VAL_STEP, _val_step),
    "moe": (MOE, _moe),
    "collapse": (COLLAPSE, _collapse),
    "peak_memory": (PEAK, _setter("peak_mib")),
    "pre_quant": (PRE_QUANT, lambda run, m: setattr(run, "pre_quant", PreQuant(float(m[1]), float(m[2]),
                                                                              _token_limit(m[3])))),
    "quant": (QUANT, lambda run, m: setattr(run, "quant", Quant(float(m[1]), int(m[2]), int(m[3])))),
    "fit": (FIT, _fit),
    "fit_failed": (FIT_FAILED, lambda run, m: setattr(run, "fit_failed", (int(m[1]), int(m[2])))),
    "artifact_bytes": (SERIALIZED, _setter("artifact_bytes")),
    "code_bytes": (CODE_SIZE, _setter("code_bytes")),
    "total_bytes": (TOTAL, _setter("total_bytes")),
    "size_check": (SIZE_CHECK, _size_check),
    "final": (FINAL, _final),
    "routing_json": (ROUTING_JSON, _setter("routing_json", str)),
}


def parse(text: str, path: str | Path | None = None) -> RunLog:
    """Everything found in the last run of a train_gpt.py log's text; never raises on content."""
    runs = split_runs(text)
    first_line, lines = runs[-1]
    run = RunLog(path=Path(path) if path is not None else None, first_line=first_line,
                 runs_in_file=sum(1 for _, chunk in runs if chunk and HEADER.match(chunk[0])))
    for line in lines:
        for name, (pattern, handle) in LINES.items():
            m = pattern.match(line)
            if m:
                run.counts[name] += 1
                handle(run, m)
                break
        else:
            if line.strip():
                run.unknown.append(line)
    return run


def read(path: str | Path) -> RunLog:
    """parse() of a log file; OSError when it cannot be read."""
    path = Path(path)
    return parse(path.read_text(encoding="utf-8", errors="replace"), path)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python tools/runlog.py LOG...", file=sys.stderr)
        return 2
    for path in paths:
        try:
            run = read(path)
        except OSError as err:
            print(f"error: {path}: cannot read the log ({err.strerror})", file=sys.stderr)
            return 2
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(run.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
