"""audit: verify every record folder of a records/ tree, one markdown table row per folder, then every
FAIL as verify printed it."""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path

from tools.records.base import CAP_BYTES, SUBMISSION, TRACKS, Check, RecordError, named_file
from tools.records.verify import verify

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


def audit(root: str | Path, *, cap: int = CAP_BYTES) -> int:
    """A markdown table of `verify` (every check, full re-scores on CPU) over every folder of both tracks
    under root, then each FAIL. -> 0"""
    root = Path(root)
    folders = [f for track in TRACKS for f in sorted((root / track).glob("*")) if f.is_dir()]
    if not folders:
        raise RecordError(f"{root}: no folders under {' or '.join(TRACKS)}")
    header = ["folder", "claimed val_bpb", "recomputed mean", *(c for c, _ in AUDIT_COLUMNS), "flags"]
    tables: dict[str, list[list[str]]] = {track: [] for track in TRACKS}
    failures, totals = [], {status: 0 for status in ("PASS", "WARN", "FAIL")}
    started = time.monotonic()
    for i, folder in enumerate(folders, 1):
        print(f"audit: {i}/{len(folders)} {folder.parent.name}/{folder.name}", file=sys.stderr, flush=True)
        checks = verify(folder, cap=cap)
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
