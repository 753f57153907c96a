"""verify: one verifier for every record folder. Any folder gets every check its files allow (the claims
family and the reviewers' family); a folder of ours adds the strict checks of checks_own. Record folders
packed inside a folder are verified too, each with its own script."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

from tools.records.base import (
    CAP_BYTES,
    READABLE,
    SCRIPT,
    SUBMISSION,
    Check,
    FolderLog,
    folder_logs,
    named_file,
    skip,
    warn,
)
from tools.records.checks_claims import (
    code_size_checks,
    mean_checks,
    seed_checks_any,
    seed_claims,
    size_cap_checks,
)
from tools.records.checks_own import VerifyOptions, own_folder_checks, own_logs
from tools.records.checks_reviewer import layout_check, reviewer_checks


def verify(
    folder: str | Path,
    *,
    data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    token_limit: int = 0,
    tolerance: float | None = None,
    quick: bool = False,
    device: str = "cpu",
    batch_seqs: int = 32,
    cap: int = CAP_BYTES,
) -> list[Check]:
    """One verifier: every check a record folder's files allow (any folder, as the challenge's reviewers
    checked them); a folder of ours (its submission.json has a verify_check) adds the strict checks, the
    re-score of its artifacts and the legality probes. Record folders packed inside the folder (a study
    shipping several arms' models) are verified too, each with its own script; their checks carry the
    inner folder's path. A folder holding only packed folders is verified through them; so is a study
    whose top-level submission.json names its study (`study`), which only gets the layout check.
    The keywords are VerifyOptions' (data and tokenizer: verify_check's when None; token_limit 0: the
    full re-score, N: the quick check on the first N tokens; quick: no evaluation at all)."""
    opts = VerifyOptions(
        data=data,
        tokenizer=tokenizer,
        token_limit=token_limit,
        tolerance=tolerance,
        quick=quick,
        device=device,
        batch_seqs=batch_seqs,
        cap=cap,
    )
    folder = Path(folder)
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


def verify_one(opts: VerifyOptions, folder: Path) -> list[Check]:
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
