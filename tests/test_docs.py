"""The docs that are generated or checked against the code: the knob reference and tracker references."""

import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import knob_docs  # noqa: E402


def test_knob_reference_is_current():
    """docs/knobs.md is exactly what tools/knob_docs.py generates from the code's knob table."""
    assert knob_docs.main(["--check"]) == 0


def test_every_knob_has_exactly_one_note():
    assert knob_docs.check_coverage(knob_docs.read_notes(knob_docs.NOTES)) == []


def test_coverage_names_a_missing_and_an_unknown_knob():
    sections = knob_docs.read_notes(knob_docs.NOTES)
    title, rows = sections[0]
    dropped = rows[0][0]
    doctored = [(title, [*rows[1:], ("NOT_A_KNOB", "made up")]), *sections[1:]]
    problems = knob_docs.check_coverage(doctored)
    assert f"{dropped}: no note in knob_notes.txt" in problems
    assert "NOT_A_KNOB: noted in knob_notes.txt but not a knob" in problems


def test_rendered_defaults_and_ranges_come_from_the_code():
    text = knob_docs.render(knob_docs.read_notes(knob_docs.NOTES))
    row = next(line for line in text.splitlines() if line.startswith("| `NUM_LAYERS` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:4] == ["int", "`11`", "1 .. inf"]
    row = next(line for line in text.splitlines() if line.startswith("| `MOE_MODE` |"))
    assert "`none`, `soft`, `topk`, `shared_routed`" in row


def test_no_tracker_references_outside_records():
    """Code and docs give reasons, not numbers of an issue tracker the reader does not have."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"\b[Ii]ssues? #?\d+")
    offenders = []
    for name in tracked:
        if name.startswith(("records/", "tests/fixtures/")) or not name.endswith(
            (".py", ".md", ".sh", ".txt")
        ):
            continue
        for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:80]}")
    assert offenders == [], "\n".join(offenders)
