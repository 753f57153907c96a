"""Every folder under records/<track>/ passes the community submission validator's layout check
(layout_check in tools/records/checks_reviewer.py: README.md, submission.json with val_bpb, name and
date, a train_gpt*.py that parses, a train log at the folder's top level)."""

import json

import pytest
from conftest import REPO

from tools import records

FOLDERS = sorted(p for track in records.TRACKS for p in (REPO / "records" / track).glob("*") if p.is_dir())


def test_the_repository_has_record_folders():
    assert FOLDERS


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_record_folder_passes_the_community_validator_layout(folder):
    path = folder / records.SUBMISSION
    sub = json.loads(path.read_text()) if path.is_file() else {}
    check = records.layout_check(folder, sub)
    assert check.ok and check.status != "WARN", check.detail


def test_verify_checks_only_the_layout_of_a_study_top_level(tmp_path):
    study = tmp_path / "records" / "track_non_record_16mb" / "2026-12-03_Study"
    (study / "shipped" / "dense").mkdir(parents=True)
    (study / "shipped" / "dense" / records.SUBMISSION).write_text("{}")
    (study / "README.md").write_text("a study")
    (study / "train_gpt.py").write_text("print(1)\n")
    (study / "train_seed1.txt").write_text("final_exact val_loss:3.5 val_bpb:2.09\n")
    sub = dict(name="2026-12-03_Study", date="2026-12-03", val_bpb=2.09, study="manifest.json")
    (study / records.SUBMISSION).write_text(json.dumps(sub))
    top = [c for c in records.verify(study) if not c.name.startswith("shipped/")]
    assert [(c.name, c.ok) for c in top] == [("layout (community validator)", True)]
