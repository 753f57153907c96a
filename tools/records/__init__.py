"""Parameter Golf record folders: pack one from run logs, verify any, compare two, audit a records/ tree.
The command line is `python3 -m tools.records {pack,verify,compare,audit} ...` (tools/records/cli.py);
code calls the functions below with keyword arguments.

Where each concern lives: base.py (the challenge's constants, RecordError, Check, reading a run's log
and a record's script), evaluate.py (an artifact scored by a folder's own script), pack.py, verify.py
(one verifier over the check families: checks_claims.py for any folder's claims against its logs,
checks_reviewer.py for what the challenge's reviewers checked, checks_own.py for the strict checks,
re-scores and legality probes of a folder this tool packed), compare.py (the Welch test and the
challenge's two rules), audit.py, cli.py."""

from tools.records.audit import audit
from tools.records.base import (
    CAP_BYTES,
    READABLE,
    RECORD_TRACK,
    SCRIPT,
    SUBMISSION,
    TRACKS,
    Check,
    LogError,
    RecordError,
    load_script,
    parse_log,
)
from tools.records.checks_reviewer import layout_check
from tools.records.cli import main
from tools.records.compare import Sample, WelchResult, compare, welch_test
from tools.records.evaluate import evaluate_artifact
from tools.records.pack import (
    build_submission,
    check_artifacts,
    check_same_recipe,
    check_scores,
    check_script,
    files_to_replace,
    find_artifact,
    pack,
    quick_check,
    seed_result,
)
from tools.records.verify import verify

__all__ = [
    "CAP_BYTES",
    "READABLE",
    "RECORD_TRACK",
    "SCRIPT",
    "SUBMISSION",
    "TRACKS",
    "Check",
    "LogError",
    "RecordError",
    "Sample",
    "WelchResult",
    "audit",
    "build_submission",
    "check_artifacts",
    "check_same_recipe",
    "check_scores",
    "check_script",
    "compare",
    "evaluate_artifact",
    "files_to_replace",
    "find_artifact",
    "layout_check",
    "load_script",
    "main",
    "pack",
    "parse_log",
    "quick_check",
    "seed_result",
    "verify",
    "welch_test",
]
