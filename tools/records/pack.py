"""pack: a record folder from run logs. Everything is checked first (one recipe across seeds, complete
scores, the script the logs ran, artifacts under the cap, a CPU quick check of the shipped artifact), then
the folder is written, so a refusal leaves nothing behind."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tools import runlog
from tools.common import REPO, sha256_file
from tools.stats import mean_std
from tools.dev.selfextract import self_extracting
from tools.records.base import (
    CAP_BYTES,
    READABLE,
    RECORD_TRACK,
    RUN_IDENTITY_KNOBS,
    SCRIPT,
    SUBMISSION,
    TRACKS,
    TRAIN_LIMIT_MS,
    RecordError,
    RunLog,
    changed_knobs,
    env_value,
    hardware,
    load_script,
    parse_log,
    script_size_logged,
)
from tools.records.evaluate import evaluate_artifact


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
python3 -m tools.records verify <this folder> --token-limit {check["tokens"]}   # quick CPU check
python3 -m tools.records verify <this folder> --device cuda --data <val data> --tokenizer <tokenizer>
```
"""


def pack(
    logs: Sequence[str | Path],
    *,
    name: str,
    author: str,
    github_id: str,
    track: str = RECORD_TRACK,
    blurb: str = "",
    date: str | None = None,
    about: str | Path | None = None,
    script: str | Path = REPO / SCRIPT,
    artifacts: Sequence[str | Path] | None = None,
    all_artifacts: bool = False,
    records_dir: str | Path = REPO / "records",
    folder: str | Path | None = None,
    ship: str = "best",
    cap: int = CAP_BYTES,
    allow_partial_eval: bool = False,
    force: bool = False,
    compress_code: bool = False,
    check_data: str | Path | None = None,
    check_tokenizer: str | Path | None = None,
    check_tokens: int = 16384,
    check_stride: int = 0,
    batch_seqs: int = 32,
) -> Path:
    """A record folder from one log per seed -> the folder written. Everything is checked first, then the
    folder is written, so a refusal (RecordError) leaves nothing behind. date: YYYY-MM-DD (None: today);
    folder: None for records_dir/track/date_name; artifacts: None to find each from its log's size_check
    line; ship: "best" (lowest val_bpb) or "smallest"; check_*: the CPU quick check of the shipped artifact
    (data and tokenizer default to the log's)."""
    date = date or time.strftime("%Y-%m-%d")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise RecordError(f"--date {date!r}: expected YYYY-MM-DD")
    about_text = Path(about).read_text(encoding="utf-8") if about else None
    runs = [parse_log(p) for p in logs]
    check_same_recipe(runs)
    check_scores(runs, track, allow_partial_eval)
    script = Path(script)
    code_bytes = check_script(script, runs)
    if compress_code:  # the cap counts the code as it will ship
        code_bytes = len(self_extracting(script.read_bytes()))
    if artifacts and len(artifacts) != len(runs):
        raise RecordError(f"--artifacts: {len(artifacts)} paths for {len(runs)} logs")
    artifacts = [Path(a) for a in artifacts] if artifacts else [find_artifact(r) for r in runs]
    check_artifacts(runs, artifacts, code_bytes, cap, compress_code)
    folder = Path(folder) if folder else Path(records_dir) / track / f"{date}_{name}"
    if folder.exists() and not folder.is_dir():  # --force replaces a folder pack wrote, never a file
        raise RecordError(f"--folder {folder}: a file, not a folder; name a new folder")
    if folder.exists() and not force:
        raise RecordError(f"{folder} already exists (pass --force to replace it)")
    outputs = pack_outputs(runs, compress_code)
    replaced = files_to_replace(folder, outputs) if folder.exists() else []

    best = shipped_run(runs, ship)
    module = load_script(script)
    verify_check = quick_check(
        module,
        runs[best],
        artifacts[best],
        check_data=check_data,
        check_tokenizer=check_tokenizer,
        check_tokens=check_tokens,
        check_stride=check_stride,
        batch_seqs=batch_seqs,
    )

    for name in replaced:
        (folder / name).unlink()
    if replaced:
        print(f"replacing in {folder}: {', '.join(replaced)}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(script, folder / SCRIPT)
    if compress_code:
        code_bytes = write_compressed_script(folder, script)
    results = {}
    for i, (run, artifact) in enumerate(zip(runs, artifacts)):
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.txt")
        events = runlog.jsonl_beside(run.path)
        if events is not None and events != run.path:  # verify then reads the run exactly
            shutil.copyfile(events, folder / f"train_seed{run.seed}.jsonl")
        results[str(run.seed)] = seed_result(run)
        if all_artifacts or i == best:
            shutil.copyfile(artifact, folder / f"model_seed{run.seed}.ptz")
            results[str(run.seed)]["artifact"] = f"model_seed{run.seed}.ptz"
    if sha256_file(folder / verify_check["artifact"]) != verify_check["artifact_sha256"]:
        raise RecordError(
            f"{folder}: the copied artifact differs from {artifacts[best]} (changed while packing?)"
        )
    sub = build_submission(
        runs,
        results,
        runs[best],
        code_bytes,
        verify_check,
        author=author,
        github_id=github_id,
        name=name,
        blurb=blurb,
        date=date,
        track=track,
        cap=cap,
    )
    readme = render_readme(sub, changed_knobs(runs[0].config, module.KNOBS), runs[0].world_size, about_text)
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


def quick_check(
    module,
    run: RunLog,
    artifact: Path,
    *,
    check_data: str | Path | None = None,
    check_tokenizer: str | Path | None = None,
    check_tokens: int = 16384,
    check_stride: int = 0,
    batch_seqs: int = 32,
) -> dict:
    """Evaluate the best artifact on CPU on the first check_tokens tokens (windows of the run's sequence
    length, check_stride apart; 0: non-overlapping): the `verify --token-limit` reference. Data and
    tokenizer default to the run's."""
    data = check_data or run.config["DATA_PATH"]
    tokenizer = check_tokenizer or run.config["TOKENIZER_PATH"]
    if not Path(data).is_dir() or not Path(tokenizer).is_file():
        raise RecordError(
            f"quick check: validation data {data} or tokenizer {tokenizer} not found; "
            "pass --check-data and --check-tokenizer"
        )
    seq_len = run.score.seq_len
    stride = check_stride or seq_len
    sha = sha256_file(artifact)
    result = evaluate_artifact(
        module, artifact, data, tokenizer, check_tokens, (seq_len, stride, batch_seqs), "cpu"
    )
    return dict(
        seed=run.seed,
        artifact=f"model_seed{run.seed}.ptz",
        artifact_sha256=sha,
        data=str(data),
        tokenizer=str(tokenizer),
        tokens=check_tokens,
        stride=stride,
        seq_len=seq_len,
        device="cpu",
        val_loss=result.val_loss,
        val_bpb=result.val_bpb,
        val_tokens_sha256=result.val_tokens_sha256,
        tokenizer_sha256=result.tokenizer_sha256,
    )


def build_submission(
    runs: list[RunLog],
    results: dict,
    best: RunLog,
    code_bytes: int,
    verify_check: dict,
    *,
    author: str,
    github_id: str,
    name: str,
    blurb: str,
    date: str,
    track: str,
    cap: int,
) -> dict:
    """submission.json's fields: the claims (means and standard deviations over the runs, sizes, the
    shipped seed), the metadata and the quick check's reference."""
    loss_mean, loss_std = mean_std([r.score.val_loss for r in runs])
    bpb_mean, bpb_std = mean_std([r.score.val_bpb for r in runs])
    limit = best.score.token_limit
    return dict(
        author=author,
        github_id=github_id,
        name=name,
        blurb=blurb or "TODO: one-line blurb",
        date=date,
        track=track,
        val_loss=loss_mean,
        val_bpb=bpb_mean,
        val_loss_std=loss_std,
        val_bpb_std=bpb_std,
        bytes_total=code_bytes + best.artifact_bytes,
        bytes_code=code_bytes,
        cap_bytes=cap,
        seeds=[r.seed for r in runs],
        best_seed=best.seed,
        seed_results=results,
        hardware=hardware(best),
        pytorch_version=best.torch,
        technique_summary=blurb or summarize_config(best.config),
        partial_eval=dict(val_token_limit=limit, note="first tokens only: not a score") if limit else None,
        verify_check=verify_check,
    )
