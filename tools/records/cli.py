"""Pack, verify, compare and audit Parameter Golf record folders (rules: docs/challenge_rules.md).

    python3 -m tools.records pack logs/a.txt logs/b.txt --name MoE10L --author "Ada" --github-id ada \\
        --track track_10min_16mb --check-data data/datasets/fineweb10B_sp1024 \\
        --check-tokenizer data/tokenizers/fineweb_1024_bpe.model
    python3 -m tools.records verify records/track_10min_16mb/2026-05-01_MoE10L --token-limit 16384
    python3 -m tools.records verify records/track_10min_16mb/2026-05-01_MoE10L --device cuda \\
        --data ... --tokenizer ...
    python3 -m tools.records compare records/.../2026-04-27_Old records/.../2026-05-01_New   # A, then B
    python3 -m tools.records audit <challenge clone>/records > records_audit_table.md

verify checks what the challenge's reviewers checked (size as shipped, data provenance, one
configuration across seeds, time, the recomputed mean, legality hints from the script text, the
community validator's layout); on a folder this tool packed it also re-scores each artifact with
EVAL_ONLY and runs the one-token-flip causality and normalisation probes on it.

Exit status: 0 on success, 1 when a verification check fails or a comparison is not significant,
2 on bad input (a refusal to pack, an unreadable log).
"""

from __future__ import annotations

import argparse
import sys
import time

from tools.common import REPO
from tools.records.audit import audit
from tools.records.base import CAP_BYTES, READABLE, RECORD_TRACK, SCRIPT, TRACKS, Check, RecordError
from tools.records.compare import compare
from tools.records.pack import pack
from tools.records.verify import verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="create records/<track>/<date>_<name>/ from run logs")
    p.add_argument("logs", nargs="+", help="one train_gpt.py log per seed")
    p.add_argument("--name", required=True, help="short name, the folder suffix")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", choices=TRACKS, default=RECORD_TRACK)
    p.add_argument(
        "--blurb", default="", help="one line; also the technique_summary (default: from the config)"
    )
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument(
        "--about", help="a markdown file: the README's opening, in place of the sections left TODO"
    )
    p.add_argument(
        "--script", default=str(REPO / SCRIPT), help="the train_gpt.py that ran (default: the repo's)"
    )
    p.add_argument(
        "--artifacts", nargs="+", help="artifact per log, in order (default: from the size_check lines)"
    )
    p.add_argument(
        "--all-artifacts", action="store_true", help="include every seed's artifact, not only the shipped one"
    )
    p.add_argument("--records-dir", default=str(REPO / "records"))
    p.add_argument("--folder", help="the record folder to write (default: RECORDS_DIR/TRACK/DATE_NAME)")
    p.add_argument(
        "--ship",
        choices=("best", "smallest"),
        default="best",
        help="which seed's artifact the folder ships: the lowest val_bpb (default) or the smallest",
    )
    p.add_argument("--cap", type=int, default=CAP_BYTES, help="size cap in bytes (default %(default)s)")
    p.add_argument(
        "--allow-partial-eval",
        action="store_true",
        help="accept VAL_TOKEN_LIMIT runs (not a score), on the non-record track only",
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--compress-code",
        action="store_true",
        help=f"count {SCRIPT} in lzma self-extracting form, with the readable script as {READABLE}",
    )
    p.add_argument("--check-data", help="validation data for the quick check (default: the log's DATA_PATH)")
    p.add_argument(
        "--check-tokenizer", help="tokenizer for the quick check (default: the log's TOKENIZER_PATH)"
    )
    p.add_argument("--check-tokens", type=int, default=16384)
    p.add_argument(
        "--check-stride", type=int, default=0, help="quick check stride (default: non-overlapping)"
    )
    p.add_argument("--batch-seqs", type=int, default=32)

    v = sub.add_parser("verify", help="check a record folder's sizes and re-evaluate its artifact")
    v.add_argument("folder")
    v.add_argument("--data", help="validation data (default: verify_check's)")
    v.add_argument("--tokenizer", help="tokenizer (default: verify_check's)")
    v.add_argument(
        "--token-limit",
        type=int,
        default=0,
        help="quick check on the first N tokens against verify_check (default: full re-evaluation)",
    )
    v.add_argument("--tolerance", type=float, help="max |val_bpb diff| (default 1e-5 quick, 1e-3 full)")
    v.add_argument(
        "--quick",
        action="store_true",
        help="every check of the files, sizes, hashes and logs; no evaluation (the re-score and the "
        "legality probes are listed as skipped)",
    )
    v.add_argument("--device", default="cpu", help="cpu or cuda")
    v.add_argument("--batch-seqs", type=int, default=32)
    v.add_argument("--cap", type=int, default=CAP_BYTES)

    a = sub.add_parser("audit", help="verify every record folder of a records/ tree: a markdown table")
    a.add_argument("root", help="a records/ folder holding track_10min_16mb/ and track_non_record_16mb/")
    a.add_argument("--cap", type=int, default=CAP_BYTES)

    c = sub.add_parser(
        "compare", help="one-sided Welch t-test: does the candidate beat the baseline by a margin"
    )
    c.add_argument("samples", nargs="*", help="A B: two record folders, A the baseline, B the candidate")
    c.add_argument("--baseline", nargs="+", help="numbers, a submission.json or a record folder")
    c.add_argument("--candidate", nargs="+", help="numbers, a submission.json or a record folder")
    c.add_argument(
        "--metric",
        choices=("val_loss", "val_bpb"),
        default="val_loss",
        help="per-seed value read from submissions (the 0.005 rule is in nats: val_loss)",
    )
    c.add_argument("--margin", type=float, default=0.005)
    c.add_argument("--alpha", type=float, default=0.01)
    return parser


def split_command(opts: argparse.Namespace) -> tuple[str, dict]:
    """The subcommand and its options as keyword arguments (the parser's names are the functions')."""
    kwargs = vars(opts).copy()
    return kwargs.pop("command"), kwargs


def compare_specs(samples: list[str], baseline: list[str] | None, candidate: list[str] | None):
    """`compare A B` or `compare --baseline ... --candidate ...` -> (baseline, candidate)."""
    if samples:
        if len(samples) != 2 or baseline or candidate:
            raise RecordError(
                "compare A B: give two folders (A the baseline, B the candidate), or --baseline/--candidate"
            )
        return [samples[0]], [samples[1]]
    return baseline, candidate


def report_checks(checks: list[Check]) -> int:
    """Each check, then the verdict line. -> 1 when a check failed, else 0."""
    for check in checks:
        print(check)
    counts = {status: sum(c.status == status for c in checks) for status in ("PASS", "WARN", "SKIP", "FAIL")}
    made = len(checks) - counts["SKIP"]
    print(
        f"{'FAILED' if counts['FAIL'] else 'PASSED'}: {made - counts['FAIL']}/{made} checks pass "
        f"({counts['WARN']} with a warning), {counts['SKIP']} skipped"
    )
    return 1 if counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    command, kwargs = split_command(build_parser().parse_args(argv))
    try:
        if command == "pack":
            folder = pack(kwargs.pop("logs"), **kwargs)
            print(f"packed {folder}")
            return 0
        if command == "verify":
            return report_checks(verify(kwargs.pop("folder"), **kwargs))
        if command == "audit":
            return audit(kwargs.pop("root"), **kwargs)
        baseline, candidate = compare_specs(
            kwargs.pop("samples"), kwargs.pop("baseline"), kwargs.pop("candidate")
        )
        return 0 if compare(baseline, candidate, **kwargs).significant else 1
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as err:  # a folder or file that vanished or cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 2
