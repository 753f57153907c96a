"""What every part of tools/records shares: the challenge's constants, the one error class, a check's
result, reading a run's log (tools/runlog.py reads it; a record needs one complete run, checked here), the
logs found in a record folder, and a record's train_gpt.py imported by file path (so a record folder is
checked with its own copy, never the repository's cached `train_gpt`)."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tools import runlog

RunLog = runlog.RunLog

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


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    # PASS, FAIL, SKIP (cannot be checked here: what it needs is absent) or WARN (passed, with a caveat
    # a reviewer should read); only FAIL fails the verification.
    status: str = ""
    brief: str = ""  # the number a summary table shows (the audit table)

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


def script_size_logged(run: RunLog) -> int | None:
    """The size of the script as it ran, from the log's export lines: a log that counts the code as its
    compressed wrapper states the script's own size beside it; older logs counted the script as run."""
    return run.source_code_bytes or run.code_bytes
