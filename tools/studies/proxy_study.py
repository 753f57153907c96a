"""Runs configurations x seeds of train_gpt.py on the proxy corpus, one after another, and collects
the scores, speed, sizes and routing health from their logs into one table and a JSON file.

    python3 -m tools.studies.proxy_study --list                 # the built-in presets (docs/moe.md)
    python3 -m tools.studies.proxy_study --only dense,topk4 --seeds 1337,1338,1339 --dry-run
    python3 -m tools.studies.proxy_study --only topk4 --seeds 1337 --log-dir $OUT/logs         # one run
    python3 -m tools.studies.proxy_study --seeds 1337,1338,1339 --collect-only logs/proxy      # the table

Each run is `python -m torch.distributed.run --standalone --nproc_per_node=N train_gpt.py` (torchrun)
with the proxy protocol of data/README.md: the same data, VOCAB_SIZE=1024, MAX_WALLCLOCK_SECONDS
(default 240) and no periodic validation for every run. train_gpt.py's schedules are fractions of
the run, so no step-counted knob needs scaling. Run ids are <tag>_<config>_s<seed>; the console
output of each run goes to <log-dir>/<run id>.out beside train_gpt.py's <run id>.txt. A 240 s run
takes 6-9 minutes with compilation and evaluation, so one GPU command (10 minutes) holds one run:
split the study with --only and --seeds, then collect every log with --collect-only.
A run that fails is recorded as failed with the last lines of its output.

On a GPU machine (docs/gpu_runs.md; carry data/datasets/proxy_sp1024 and .wheels), one call per run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
    export PYTHONPATH=/tmp/site
    sh data/datasets/proxy_sp1024/prepare.sh /tmp/proxy;
    python3 -m tools.studies.proxy_study --only dense --seeds 1337 --log-dir $OUT/logs --timeout 540 \
        --env ARTIFACT_PATH=/tmp/model.ptz        # keeps the 15 MB artifact out of what comes back

--timeout ends a run before the command limit does, so it is still recorded (as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools import runlog
from tools.common import MOE_PRESETS, REPO, StudyError, cell, format_table
from tools.stats import mean_std

PRESETS = MOE_PRESETS  # the matched MoE-versus-dense study (docs/moe.md)
# Set by the study for every run alike; a configuration may not change them.
STUDY_KEYS = (
    "DATA_PATH",
    "TOKENIZER_PATH",
    "VOCAB_SIZE",
    "MAX_WALLCLOCK_SECONDS",
    "VAL_LOSS_EVERY",
    "SEED",
    "RUN_ID",
    "LOG_DIR",
)
TAIL_LINES = 15
TORCHRUN_FAILURE = re.compile(r"\] failed \(exitcode: -?\d+\) local_rank")


@dataclass
class Run:
    name: str
    seed: int
    run_id: str
    env: dict[str, str]


# ---------------------------------------------------------------------------- planning


def load_configs(path: Path | None) -> dict[str, dict[str, str]]:
    """The presets, or a JSON file {"name": {"ENV": "value", ...}, ...}."""
    if path is None:
        return PRESETS
    try:
        configs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"{path}: cannot read a JSON configuration file ({err})") from None
    if not isinstance(configs, dict) or not configs or not all(isinstance(v, dict) for v in configs.values()):
        raise StudyError(f'{path}: expected {{"name": {{"ENV": "value", ...}}, ...}}')
    return {name: {k: str(v) for k, v in env.items()} for name, env in configs.items()}


def select(configs: dict[str, dict[str, str]], only: str | None) -> dict[str, dict[str, str]]:
    if not only:
        return configs
    names = [n for n in only.split(",") if n]
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise StudyError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(configs)}")
    return {n: configs[n] for n in names}


def plan_runs(
    configs: dict[str, dict[str, str]], seeds: list[int], common: dict[str, str], tag: str, log_dir: Path
) -> list[Run]:
    runs = []
    for name, env in configs.items():
        fixed = [k for k in env if k in STUDY_KEYS]
        if fixed:
            raise StudyError(
                f"configuration {name} sets {', '.join(fixed)}, which the study sets for every run"
            )
        for seed in seeds:
            run_id = f"{tag}_{name}_s{seed}"
            runs.append(
                Run(
                    name,
                    seed,
                    run_id,
                    {**common, **env, "SEED": str(seed), "RUN_ID": run_id, "LOG_DIR": str(log_dir)},
                )
            )
    return runs


def launch_command(python: str, nproc: int, script: Path) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]


def shell_line(run: Run, command: list[str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items()) + " " + shlex.join(command)


# ---------------------------------------------------------------------------- running


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Ends torchrun and its workers: torchrun starts workers in sessions of their own, so killing
    its process group alone would leave them running. SIGTERM first (torchrun forwards it), then
    SIGKILL whatever is left."""
    tree = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def execute(run: Run, command: list[str], log_dir: Path, timeout: float | None) -> dict:
    """Runs one training; its console output goes to <run id>.out. -> returncode and wall seconds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in (f"{run.run_id}.txt", f"{run.run_id}.jsonl"):  # train_gpt.py refuses to reuse a log
        (log_dir / stale).unlink(missing_ok=True)
    t0 = time.time()
    with open(log_dir / f"{run.run_id}.out", "w") as out:
        # A session of its own, so a timeout ends torchrun and every worker it started.
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **run.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            return dict(
                returncode=None, wall_s=round(time.time() - t0, 1), reason=f"timed out after {timeout:.0f} s"
            )
    return dict(returncode=returncode, wall_s=round(time.time() - t0, 1))


# ---------------------------------------------------------------------------- collecting


def parse_log(log: runlog.RunLog) -> dict:
    """Scores, speed, sizes, parameters and final routing health of a run read by tools/runlog.py
    (runs_in_log says how many runs the log held when it held more than one)."""
    plain = [e.val_bpb for e in log.finals if e.mode == "plain"]
    sliding = [e.val_bpb for e in log.finals if e.mode == "sliding"]
    result = dict(
        val_bpb_sliding=sliding[-1] if sliding else None,
        val_bpb_roundtrip=plain[-1] if plain else None,
        val_bpb_prequant=log.pre_quant_val_bpb,
        partial_val=log.partial_eval,
    )
    if log.runs_in_file > 1:
        result["runs_in_log"] = log.runs_in_file
    if log.torch:
        device = f"{log.device} ({log.device_name})" if log.device_name else log.device
        result.update(torch=log.torch, device=device, world_size=log.world_size)
    if log.params:
        result.update(
            params=log.params.get("total"),
            active_params=log.params.get("active_matmul_per_token"),
            router_params=log.params.get("router"),
        )
    if log.last_train:
        result.update(
            steps=log.last_train.step,
            ms_per_step=log.last_train.step_avg_ms,
            tok_per_s=log.last_train.tok_per_s,
        )
    for key, value in (
        ("artifact_bytes", log.artifact_bytes),
        ("total_bytes", log.total_bytes),
        ("peak_mib", log.peak_mib),
    ):
        if value is not None:
            result[key] = value
    score = log.score
    result["score"] = score.val_bpb if score else None
    result.update(routing_health(log))
    return result


def routing_health(log: runlog.RunLog) -> dict:
    """Per MoE layer, from its last `moe layer:` line: max load share, dead experts, entropy."""
    final = [records[-1] for _, records in sorted(log.moe_history().items())]
    if not final:
        return {}
    layers = [
        dict(
            layer=r["layer"],
            max_load=max(r["load"]),
            dead=r["dead"],
            entropy=r["entropy"],
            load_std=r.get("load_std", statistics.pstdev(r["load"])),
        )
        for r in final
    ]
    return dict(
        routing=layers,
        max_load=max(r["max_load"] for r in layers),
        dead=sum(r["dead"] for r in layers),
        entropy=statistics.fmean(r["entropy"] for r in layers),
    )


def tail(path: Path) -> list[str]:
    """The last lines of a run's output, without torchrun's own report on its failed worker, which
    follows (and would push out of the tail) the worker's error."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    cut = next((i for i, line in enumerate(lines) if TORCHRUN_FAILURE.search(line)), len(lines))
    return lines[:cut][-TAIL_LINES:]


def failure_reason(row: dict, has_log: bool, ran: bool) -> str | None:
    if row.get("reason"):  # execute() timed out
        return row["reason"]
    if ran and row["returncode"] != 0:
        return f"exit status {row['returncode']}" + ("" if has_log else ", no log")
    if not has_log:
        return "no log"
    if row.get("score") is None:
        return "no final evaluation in the log"
    return None


def collect(run: Run, log_dir: Path, outcome: dict | None = None) -> dict:
    """One row of the study. `outcome` is execute()'s result; None when only collecting old logs."""
    log, out = log_dir / f"{run.run_id}.txt", log_dir / f"{run.run_id}.out"
    row = dict(name=run.name, seed=run.seed, run_id=run.run_id, **(outcome or {}))
    if log.is_file():
        row.update(parse_log(runlog.read(log)))
    reason = failure_reason(row, log.is_file(), outcome is not None)
    if reason is None:
        return dict(row, status="ok")
    status = "missing" if not (log.is_file() or out.is_file()) else "failed"
    return dict(row, status=status, reason=reason, tail=tail(out) or tail(log))


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration: runs ok out of planned, mean and standard deviation over seeds."""
    summary = []
    for name in dict.fromkeys(r["name"] for r in rows):
        ok = [r for r in rows if r["name"] == name and r["status"] == "ok"]
        entry = dict(name=name, ok=len(ok), runs=sum(r["name"] == name for r in rows))
        for key in ("score", "val_bpb_roundtrip", "val_bpb_prequant", "ms_per_step", "steps", "total_bytes"):
            entry[key], entry[key + "_std"] = mean_std([r[key] for r in ok if r.get(key) is not None])
        summary.append(entry)
    dense = next((s["score"] for s in summary if s["name"] == "dense" and s["score"] is not None), None)
    for entry in summary:
        entry["score_vs_dense"] = None if dense is None or entry["score"] is None else entry["score"] - dense
    return summary


# ---------------------------------------------------------------------------- output


def runs_table(rows: list[dict]) -> str:
    header = [
        "run",
        "status",
        "sliding",
        "roundtrip",
        "prequant",
        "steps",
        "ms/step",
        "tok/s",
        "artifact",
        "total",
        "peakMiB",
        "params",
        "active",
        "maxload",
        "dead",
        "entropy",
    ]
    body = [
        [
            r["run_id"],
            r["status"] + ("*" if r.get("partial_val") else ""),
            cell(r.get("val_bpb_sliding")),
            cell(r.get("val_bpb_roundtrip")),
            cell(r.get("val_bpb_prequant")),
            cell(r.get("steps")),
            cell(r.get("ms_per_step"), 1),
            cell(r.get("tok_per_s")),
            cell(r.get("artifact_bytes")),
            cell(r.get("total_bytes")),
            cell(r.get("peak_mib")),
            cell(r.get("params")),
            cell(r.get("active_params")),
            cell(r.get("max_load"), 2),
            cell(r.get("dead")),
            cell(r.get("entropy"), 3),
        ]
        for r in rows
    ]
    return format_table(header, body)


def summary_table(summary: list[dict]) -> str:
    def pm(entry: dict, key: str, digits: int = 4) -> str:
        std = entry[key + "_std"]
        return cell(entry[key], digits) + ("" if std is None else f" ±{std:.{digits}f}")

    header = [
        "config",
        "ok/runs",
        "score (bpb)",
        "vs dense",
        "roundtrip",
        "prequant",
        "ms/step",
        "steps",
        "total bytes",
    ]
    body = [
        [
            s["name"],
            f"{s['ok']}/{s['runs']}",
            pm(s, "score"),
            cell(s["score_vs_dense"]),
            pm(s, "val_bpb_roundtrip"),
            pm(s, "val_bpb_prequant"),
            pm(s, "ms_per_step", 1),
            pm(s, "steps", 0),
            pm(s, "total_bytes", 0),
        ]
        for s in summary
    ]
    return format_table(header, body)


def report(rows: list[dict], args, common: dict[str, str]) -> None:
    summary = summarize(rows)
    print(runs_table(rows))
    print()
    print(summary_table(summary))
    print(
        "score = the last final evaluation of each log (tools/runlog.py); "
        "* = validation on a token subset, not a score"
    )
    for r in rows:
        if r.get("runs_in_log"):
            print(f"\nnote: {r['run_id']}: its log holds {r['runs_in_log']} runs; the last one was read")
        if r["status"] != "ok":
            print(
                f"\n{r['run_id']} {r['status']}: {r['reason']}\n  "
                + "\n  ".join(r.get("tail") or ["(no output)"])
            )
    path = args.json or args.log_dir / f"{args.tag}_study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(common_env=common, runs=rows, summary=summary), indent=1))
    print(f"\nwrote {path}")


# ---------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, help='JSON file {"name": {"ENV": "value"}, ...} (default: the presets)'
    )
    parser.add_argument("--only", help="comma-separated configuration names to run")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds (default 1337)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "--collect-only", type=Path, metavar="LOGDIR", help="run nothing; collect the logs in LOGDIR"
    )
    parser.add_argument(
        "--data-path", default="/tmp/proxy", help="DATA_PATH (default /tmp/proxy, see docs/gpu_runs.md)"
    )
    parser.add_argument("--tokenizer-path", help="TOKENIZER_PATH (default DATA_PATH/proxy_1024_bpe.model)")
    parser.add_argument("--vocab-size", default="1024")
    parser.add_argument(
        "--wallclock", default="240", help="MAX_WALLCLOCK_SECONDS for every run (default 240)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra knob for every run"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=Path("logs/proxy"), help="LOG_DIR (default logs/proxy)"
    )
    parser.add_argument("--tag", default="proxy", help="run id prefix (default proxy)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs torchrun")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--script", type=Path, default=REPO / "train_gpt.py")
    parser.add_argument("--timeout", type=float, help="seconds before a run is killed and recorded as failed")
    parser.add_argument("--json", type=Path, help="results file (default LOG_DIR/<tag>_study.json)")
    args = parser.parse_args(argv)
    if args.collect_only:
        args.log_dir = args.collect_only
    args.log_dir = args.log_dir.resolve()  # train_gpt.py runs with the repository as its working folder
    return args


def common_env(args) -> dict[str, str]:
    env = {
        "DATA_PATH": args.data_path,
        "TOKENIZER_PATH": args.tokenizer_path or os.path.join(args.data_path, "proxy_1024_bpe.model"),
        "VOCAB_SIZE": args.vocab_size,
        "MAX_WALLCLOCK_SECONDS": args.wallclock,
        "VAL_LOSS_EVERY": "0",
    }
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs = select(load_configs(args.config), args.only)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        common = common_env(args)
        runs = plan_runs(configs, seeds, common, args.tag, args.log_dir)
    except (StudyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for name, env in configs.items():
            print(f"{name}: " + " ".join(f"{k}={v}" for k, v in env.items()))
        return 0
    command = launch_command(args.python, args.nproc, args.script)
    if args.dry_run:
        for run in runs:
            print(shell_line(run, command))
        return 0
    rows = []
    for i, run in enumerate(runs, 1):
        if args.collect_only:
            rows.append(collect(run, args.log_dir))
            continue
        print(f"[{i}/{len(runs)}] {run.run_id}: {shell_line(run, command)}", flush=True)
        rows.append(collect(run, args.log_dir, execute(run, command, args.log_dir, args.timeout)))
        print(
            f"[{i}/{len(runs)}] {run.run_id}: {rows[-1]['status']} in {rows[-1]['wall_s']} s, "
            f"score {cell(rows[-1].get('score'))}",
            flush=True,
        )
    report(rows, args, common)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
