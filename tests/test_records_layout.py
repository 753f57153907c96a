"""Every folder under records/<track>/ passes the community submission validator's layout check
(tools/records.py layout_check: README.md, submission.json with val_bpb, name and date, a train_gpt*.py
that parses, a train log at the folder's top level)."""

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
