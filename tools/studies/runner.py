"""What every study shares: the corpus and seeds of its command line, its runs' queue (skip the finished,
set the interrupted aside, run the rest --jobs at a time), the folder's lock and script, the tables' cells,
and the shipping of record folders (packing, the validator's top level, verify). A study module holds its plan
(shape, arms, stages, seeds) and its analysis; it calls these and repeats none of them.

Resumable: a run whose log in FOLDER/runs/ is complete (it has its final evaluation) and matches the plan is
skipped, so the same command continues a study across sessions; a failed or interrupted run's files are
moved to FOLDER/runs/failed/<run id>-<n>/ with reason.json, and the run is tried again. One `run` at a time
per folder (runs/.lock). Each run is `python FOLDER/train_gpt.py` (one process, OMP_NUM_THREADS=1), the
folder's copy of the script taken at its first run: a study never mixes scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tools import records, runlog
from tools.common import REPO, StudyError, cell, sha256_file
from tools.stats import mean_std
from tools.studies import proxy_study

SCRIPT = "train_gpt.py"
NON_RECORD_TRACK = records.TRACKS[1]  # every study ships to the non-record track (proxy corpus, CPU)
# Knobs that may differ between sessions without changing the run (where the files are).
PATH_KNOBS = ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR", "RUN_ID", "ARTIFACT_PATH")
_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


# ---------------------------------------------------------------------------- the command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every study takes: the corpus, the folder, the seeds and how runs are started."""
    parser.add_argument("--data", required=True, help="the unpacked proxy corpus (prepare.sh DEST)")
    parser.add_argument("--tokenizer", help="default DATA/proxy_1024_bpe.model")
    parser.add_argument("--out", required=True, type=Path, help="the study folder")
    parser.add_argument("--seeds", default="1337,1338,1339")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--timeout", type=float, help="seconds before a run is stopped and recorded as failed"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the runs to start, run nothing")


def corpus_env(args) -> dict[str, str]:
    """DATA_PATH and TOKENIZER_PATH of --data and --tokenizer, checked before anything runs."""
    data = Path(args.data).resolve()
    tokenizer = Path(args.tokenizer or data / "proxy_1024_bpe.model").resolve()
    if not data.is_dir():
        raise StudyError(f"--data {args.data}: no such folder (unpack the proxy corpus with its prepare.sh)")
    if not tokenizer.is_file():
        raise StudyError(f"--tokenizer {tokenizer}: no such file")
    return {"DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer)}


def parse_seeds(option: str, text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StudyError(f"{option} {text!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"{option} {text!r}: expected distinct seeds")
    return seeds


def shown_folder(out: Path) -> Path:
    """A study folder as commands print it: relative to the repository where it lies inside."""
    return out.relative_to(REPO) if out.is_relative_to(REPO) else out


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args, study: Callable[[argparse.Namespace], int]) -> int:
    """A study's command under the shared rules: SIGTERM stops its runs too (run_missing), bad input and
    refusals are one `error:` line and exit status 2."""
    signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.jobs < 1:
            raise StudyError(f"--jobs {args.jobs}: must be at least 1")
        return study(args)
    except (StudyError, records.RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- runs and their folder


def runs_dir(out: Path) -> Path:
    return out / "runs"


def arm_env(run: proxy_study.Run) -> dict[str, str]:
    """What defines the run's recipe: its env without where files go and which seed."""
    return {k: v for k, v in run.env.items() if k not in (*PATH_KNOBS, "SEED", "OMP_NUM_THREADS")}


def prepare_script(out: Path, script: Path) -> Path:
    """The folder's train_gpt.py: a copy of `script` at the first run, then the same bytes or a refusal."""
    if not script.is_file():
        raise StudyError(f"--script {script}: no such file")
    copy = out / SCRIPT
    if not copy.exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(script, copy)
    elif sha256_file(copy) != sha256_file(script):
        raise StudyError(
            f"{copy} differs from {script}: the study's runs must share one script. To continue "
            f"with the folder's copy pass --script {copy}; to start over on the new script, move "
            f"the folder away"
        )
    return copy


def same_knob(logged, planned: str) -> bool:
    """A knob value as the log's config holds it (typed) against the planned env string."""
    if isinstance(logged, bool):
        return planned.strip().lower() in (("1", "true") if logged else ("0", "false"))
    if isinstance(logged, list):
        return ",".join(map(str, logged)) == ",".join(p.strip() for p in planned.split(",") if p.strip())
    if isinstance(logged, (int, float)):
        try:
            return float(planned) == float(logged)
        except ValueError:
            return False
    return str(logged) == planned


def finished(run: proxy_study.Run, logs: Path) -> dict | None:
    """The collected row of a complete run whose log matches the plan; None when it must (re)run. A
    complete log of another recipe is a refusal: the study never mixes recipes under one run id."""
    if not (logs / f"{run.run_id}.txt").is_file():
        return None
    row = proxy_study.collect(run, logs)
    if row["status"] != "ok":
        return None
    config = runlog.read(logs / f"{run.run_id}.txt").config or {}
    planned = dict(arm_env(run))
    if "XSA_LAST_N" in planned and "NUM_LAYERS" in config:  # the trainer records the layers XSA runs in
        planned["XSA_LAST_N"] = str(min(int(planned["XSA_LAST_N"]), int(config["NUM_LAYERS"])))
    differ = [k for k, v in planned.items() if k not in config or not same_knob(config[k], v)]
    if differ:
        shown = ", ".join(f"{k}={config.get(k)!r} (planned {run.env[k]})" for k in differ[:6])
        raise StudyError(
            f"{logs / run.run_id}.txt is a finished run of another recipe: {shown}. Use another "
            "--out, or the same knobs"
        )
    return row


def quarantine(run: proxy_study.Run, logs: Path, reason: str, tail: list[str] | None = None) -> Path | None:
    """Moves a failed or interrupted run's files to runs/failed/<run id>-<n>/ with reason.json."""
    files = sorted(
        p
        for p in logs.glob(f"{run.run_id}*")
        if p.is_file() and p.name[len(run.run_id) :].split(".")[0] in ("", "_model", "_routing")
    )
    if not files:
        return None
    n = 1
    while (logs / "failed" / f"{run.run_id}-{n}").exists():
        n += 1
    dest = logs / "failed" / f"{run.run_id}-{n}"
    dest.mkdir(parents=True)
    for path in files:
        path.rename(dest / path.name)
    (dest / "reason.json").write_text(
        json.dumps(
            dict(
                run_id=run.run_id,
                arm=run.name,
                seed=run.seed,
                reason=reason,
                tail=tail or [],
                time=time.strftime("%Y-%m-%d %H:%M:%S"),
            ),
            indent=1,
        )
    )
    return dest


def failures(logs: Path) -> list[dict]:
    """The set-aside attempts of a runs/ folder, from their reason.json."""
    found = []
    for reason in sorted((logs / "failed").glob("*/reason.json")):
        try:
            entry = json.loads(reason.read_text())
        except (OSError, ValueError):
            entry = dict(reason="reason.json unreadable")
        found.append(dict(entry, files=f"runs/failed/{reason.parent.name}/"))
    return found


def run_one(run: proxy_study.Run, command: list[str], logs: Path, timeout: float | None, label: str) -> dict:
    say(f"{label} {run.run_id}: started")
    outcome = proxy_study.execute(run, command, logs, timeout)
    row = proxy_study.collect(run, logs, outcome)
    if row["status"] != "ok":
        where = quarantine(run, logs, row.get("reason", "failed"), row.get("tail"))
        say(
            f"{label} {run.run_id}: FAILED ({row.get('reason')}) after {outcome['wall_s']} s; files in "
            f"{where}\n  " + "\n  ".join(row.get("tail") or ["(no output)"])
        )
    else:
        out, log = logs / f"{run.run_id}.out", logs / f"{run.run_id}.txt"
        if out.is_file() and out.read_bytes() == log.read_bytes():  # the console said nothing the log lacks
            out.unlink()
        say(
            f"{label} {run.run_id}: ok in {outcome['wall_s']} s, val_bpb {cell(row.get('score'))}, "
            f"{cell(row.get('ms_per_step'), 1)} ms/step"
        )
    return row


@contextlib.contextmanager
def folder_lock(logs: Path):
    """runs/.lock holds the pid of the `run` using the folder: a second one would move the first one's
    runs in progress aside as interrupted. A lock whose process is gone is taken over."""
    lock = logs / ".lock"
    if process_alive(lock):
        raise StudyError(
            f"{lock}: another study run (pid {lock.read_text().strip()}) is using this folder; wait for "
            "it to end"
        )
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def process_alive(lock: Path) -> bool:
    """Whether the process whose pid the lock file holds still runs (False: no file, or a stale one)."""
    try:
        holder = int(lock.read_text().strip())
        if holder <= 0:
            return False
        os.kill(holder, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except (OSError, ValueError):
        return False
    return True


def run_missing(args, todo: list[proxy_study.Run], script: Path, logs: Path) -> int:
    """Sets aside what interrupted runs left, then runs `todo` --jobs at a time. -> 1 if a run failed."""
    for run in todo:
        quarantine(run, logs, "incomplete: interrupted, or failed in an earlier session")
    command = [args.python, str(script)]
    labels = [f"[{i}/{len(todo)}]" for i in range(1, len(todo) + 1)]
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        rows = list(
            pool.map(lambda rl: run_one(rl[0], command, logs, args.timeout, rl[1]), zip(todo, labels))
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: no orphaned training may go on writing into the folder
        pool.shutdown(wait=False, cancel_futures=True)
        for pid in proxy_study.descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pool.shutdown(wait=True)
        raise StudyError(
            "interrupted: the runs in progress were stopped and set aside in runs/failed/; "
            "the same command resumes the study"
        ) from None
    pool.shutdown(wait=True)
    failed = [r["run_id"] for r in rows if r["status"] != "ok"]
    say(
        f"ran {len(rows)}: {len(rows) - len(failed)} ok"
        + (f", failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------- stages and their queue


@dataclass
class Stage:
    """Runs of one script in one folder: a study has one or more, run in the plan's order."""

    name: str
    folder: Path
    script: Path  # the script to copy into the folder (or the folder's copy)
    runs: list


def folder_groups(stages: list[Stage]) -> list[list[Stage]]:
    """Consecutive stages in one folder, together: they share one queue, so the last run of a stage does
    not train alone while the next stage waits (at most --jobs runs at a time still, in the plan's order)."""
    groups: list[list[Stage]] = []
    for stage in stages:
        if groups and groups[-1][0].folder == stage.folder:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def run_stages(args, stages: list[Stage], gitignore: str | None = None) -> int:
    """Every stage's missing runs, a folder's consecutive stages in one queue; the folder's .gitignore
    (when given) written before its first run. --dry-run prints what would start. -> 1 if a run failed."""
    status = 0
    for group in folder_groups(stages):
        folder = group[0].folder
        logs = runs_dir(folder)
        todo = []
        for stage in group:
            missing = [run for run in stage.runs if finished(run, logs) is None]
            say(
                f"stage {stage.name}: {len(stage.runs)} runs planned, {len(stage.runs) - len(missing)} "
                f"finished, {len(missing)} to run, {args.jobs} at a time"
            )
            if args.dry_run:
                for run in missing:
                    say(proxy_study.shell_line(run, [args.python, str(folder / SCRIPT)]))
            todo += missing
        if args.dry_run or not todo:
            continue
        # the same bytes for every stage of the folder, or a refusal before any run starts
        script = [prepare_script(folder, stage.script) for stage in group][0]
        logs.mkdir(parents=True, exist_ok=True)
        if gitignore is not None:
            (folder / ".gitignore").write_text(gitignore)
        with folder_lock(logs):
            status = run_missing(args, todo, script, logs) or status
    return status


# ---------------------------------------------------------------------------- tables


def pm(entry: dict, key: str, digits: int = 4) -> str:
    """`mean ± std` of entry[key_mean] and entry[key_std]; '-' without a mean."""
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def signed(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def pval(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------------------- shipping


def write_top_level(
    out: Path, seeds: list[int], logs: list[Path], blurb: str, writer: str, val_token_limit: int
) -> list[Path]:
    """A study folder's top level as the community validator reads it: copies of the given runs' logs as
    train_seed<N>.txt (and .jsonl) and a submission.json with their mean round-trip val_bpb on the first
    val_token_limit validation tokens, naming the study (manifest.json). Refuses to overwrite a
    submission.json that `writer` did not write."""
    target = out / records.SUBMISSION
    if target.is_file() and json.loads(target.read_text(encoding="utf-8")).get("written_by") != writer:
        raise StudyError(f"{target} exists and was not written by {writer}; move it away")
    written, results = [], {}
    for seed, log in zip(seeds, logs):
        name = f"train_seed{seed}.txt"
        for suffix in (".txt", ".jsonl"):
            source = log.with_suffix(suffix)
            if source.is_file():
                (out / name).with_suffix(suffix).write_bytes(source.read_bytes())
                written.append((out / name).with_suffix(suffix))
        summary = runlog.read(out / name).summary()
        results[str(seed)] = dict(
            val_bpb=summary["final_val_bpb"],
            val_loss=summary["final_val_loss"],
            steps=summary["steps"],
            log=name,
        )
    bpb = [r["val_bpb"] for r in results.values()]
    sub = dict(
        name=out.name,
        date=out.name[:10],
        track=records.TRACKS[1],
        blurb=blurb,
        val_bpb=mean_std(bpb)[0],
        val_bpb_std=mean_std(bpb)[1],
        seeds=list(seeds),
        seed_results=results,
        partial_eval=dict(val_token_limit=val_token_limit),
        study="manifest.json",
        not_fineweb=True,
        written_by=writer,
    )
    target.write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    return [*written, target]


def packed_from(target: Path, sources: dict[str, Path]) -> bool:
    """Whether target is a folder `pack` wrote, unedited since, from exactly these sources (its file name ->
    the file it was copied from: the script and the train_seed*.txt logs). Run artifacts stay out of git,
    so a fresh checkout can collect again without repacking."""
    try:
        written = json.loads((target / records.SUBMISSION).read_text(encoding="utf-8"))["packed_files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    logs_in_folder = {p.name for p in target.glob("train_seed*.txt")}
    if logs_in_folder != {name for name in sources if name.startswith("train_seed")}:
        return False
    unedited = all(
        (target / name).is_file() and sha256_file(target / name) == sha for name, sha in written.items()
    )
    return unedited and all(
        name in written and source.is_file() and sha256_file(source) == written[name]
        for name, source in sources.items()
    )


def remove_packed(folder: Path) -> None:
    """Delete a folder that `pack` wrote, file by file, only if every file in it is one pack wrote and
    nobody edited since (records.files_to_replace refuses otherwise)."""
    written = records.files_to_replace(folder, set())
    left = sorted(p.name for p in folder.iterdir() if p.name not in written)
    if left:
        raise StudyError(f"{folder}: holds files collect did not write ({', '.join(left)}); move them away")
    for name in written:
        (folder / name).unlink()
    folder.rmdir()
