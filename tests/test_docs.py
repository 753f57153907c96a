"""The docs that are generated or checked against the code: the knob reference and tracker references."""

import math
import re
import subprocess
from dataclasses import fields

from conftest import REPO
from tools.dev import knob_docs

tg = knob_docs.train_gpt


def test_knob_reference_is_current():
    """docs/knobs.md is exactly what tools/dev/knob_docs.py generates from the code's knob table."""
    assert knob_docs.main(["--check"]) == 0


def test_every_knob_is_one_row_with_a_meaning():
    rows = [knob for section in tg.KNOB_SECTIONS.values() for knob in section]
    names = [knob.name for knob in rows]
    assert sorted({n for n in names if names.count(n) > 1}) == []  # a second row would hide the first
    assert list(tg.KNOB_ROWS) == names and list(tg.KNOBS) == names
    assert [knob.name for knob in rows if not knob.meaning.strip()] == []
    assert all(knob.name == knob.name.upper() for knob in rows)


def test_every_default_lies_in_its_own_range_and_choices():
    for knob in tg.KNOB_ROWS.values():
        if knob.choices:
            assert knob.kind is str and knob.default in knob.choices, knob.name
        if knob.low is not None and knob.default is not None:
            assert knob.kind in (int, float) and knob.low <= knob.default <= knob.high, knob.name


def test_views_of_the_rows_are_what_the_trainer_checks():
    assert tg.KNOB_LIMITS["NUM_LAYERS"] == (1, math.inf) and tg.CHOICES["MOE_MODE"][0] == "none"
    assert "CAPACITY_FACTOR" in tg.MOE_ONLY_KNOBS and "CAPACITY_FACTOR" in tg.MODEL_KNOBS
    assert "MATRIX_LR" not in tg.MODEL_KNOBS and "NUM_LAYERS" not in tg.MOE_ONLY_KNOBS


def test_model_config_fields_are_knobs_or_derived_from_knobs():
    """ModelConfig is all the model classes receive: each field is a knob or names the knobs it is derived
    from, and every knob stored in the artifact reaches it."""
    reached = set()
    for f in fields(tg.ModelConfig):
        sources = f.metadata.get("derived_from")
        if sources is None:
            assert f.name.upper() in tg.KNOB_ROWS, f"ModelConfig.{f.name}: not a knob and not derived"
            reached.add(f.name.upper())
        else:
            assert set(sources) <= set(tg.KNOB_ROWS), f"ModelConfig.{f.name}: derived from unknown knobs"
            reached |= set(sources)
    assert sorted(set(tg.MODEL_KNOBS) - reached) == []


def test_rendered_defaults_and_ranges_come_from_the_rows():
    text = knob_docs.render(tg.KNOB_SECTIONS)
    row = next(line for line in text.splitlines() if line.startswith("| `NUM_LAYERS` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:5] == ["int", "`11`", "1 .. inf", "model"]
    row = next(line for line in text.splitlines() if line.startswith("| `MOE_MODE` |"))
    assert "`none`, `soft`, `topk`, `shared_routed`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `ROUTER_LR` |"))
    assert "| MoE |" in row


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
