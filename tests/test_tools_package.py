"""tools/ is one package: each module is reached by one absolute name, importing any of them does no work
(no training, no output), nothing edits the import path, and every documented command names a module
that exists."""

import ast
import importlib.util
import json
import re
import subprocess
import sys

from conftest import REPO

MODULE_SECONDS = 15  # one module's own import, torch and train_gpt already loaded: a training takes minutes

# Imports each module named in argv[3:] with stdout and stderr captured, torch and the trainer loaded first
# (their cost is every tool's, not one module's); writes what it saw as JSON to argv[1]. argv[2]: tools/.
IMPORT_EACH = """
import contextlib, importlib, io, json, sys, time
import torch
from tools.common import import_trainer
import_trainer()
report, tools_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
seen = {}
for name in names:
    out = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        importlib.import_module(name)
    seen[name] = dict(seconds=time.monotonic() - started, output=out.getvalue())
tools_modules = {
    name: module.__file__
    for name, module in list(sys.modules.items())
    if (getattr(module, "__file__", None) or "").startswith(tools_dir)
}
record_errors = {
    f"{name}.RecordError": id(module.RecordError)
    for name, module in list(sys.modules.items())
    if isinstance(getattr(module, "RecordError", None), type)
}
with open(report, "w") as f:
    json.dump(dict(seen=seen, tools_modules=tools_modules, record_errors=record_errors), f)
"""


def tools_modules() -> list[str]:
    """Every module of the tools package (its __main__ modules are commands: running them is their job)."""
    names = []
    for path in sorted((REPO / "tools").rglob("*.py")):
        relative = path.relative_to(REPO)
        if path.stem == "__main__":
            continue
        parts = relative.with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_tools_module_imports_quietly_and_once(tmp_path):
    names = tools_modules()
    assert {"tools.records", "tools.records.pack", "tools.gpu.gpu_check", "tools.dev.preview_check"} <= set(
        names
    )
    report = tmp_path / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, str(report), str(REPO / "tools"), *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60 + MODULE_SECONDS * len(names),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "" and result.stderr == ""  # nothing printed below Python's streams either
    found = json.loads(report.read_text())
    assert sorted(found["seen"]) == sorted(names)
    slow = {n: round(s["seconds"], 1) for n, s in found["seen"].items() if s["seconds"] > MODULE_SECONDS}
    assert slow == {}, "these modules work when imported"
    assert {n: s["output"] for n, s in found["seen"].items() if s["output"]} == {}
    # Each file under tools/ is one module with one absolute name: no `records` beside `tools.records`.
    files = list(found["tools_modules"].values())
    assert sorted({f for f in files if files.count(f) > 1}) == []
    assert [n for n in found["tools_modules"] if not n.startswith("tools")] == []
    # So RecordError is one class, whichever module it is reached through.
    assert len(set(found["record_errors"].values())) == 1, found["record_errors"]
    assert "tools.records.RecordError" in found["record_errors"]


def path_edits(source: str) -> list[int]:
    """Lines that change the import path: sys.path (or site.addsitedir) in code or in a script's text."""
    lines = [n.lineno for n in ast.walk(ast.parse(source)) if is_path_edit(n)]
    text = re.compile(r"\bsys\s*\.\s*path\b|\baddsitedir\b")
    return sorted(set(lines) | {i for i, line in enumerate(source.splitlines(), 1) if text.search(line)})


def is_path_edit(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr == "path":
        return isinstance(node.value, ast.Name) and node.value.id == "sys"
    return isinstance(node, ast.Attribute) and node.attr == "addsitedir"


def test_no_file_of_tools_or_tests_edits_the_import_path():
    """The repository root is the one import root (pytest's pythonpath, `python3 -m` from the root)."""
    offenders = {}
    for path in sorted([*(REPO / "tools").rglob("*.py"), *(REPO / "tests").glob("*.py")]):
        relative = path.relative_to(REPO).as_posix()
        if relative == "tests/test_tools_package.py":
            continue
        lines = path_edits(path.read_text(encoding="utf-8"))
        if lines:
            offenders[relative] = lines
    assert offenders == {}


def test_the_path_edit_finder_finds_each_form():
    assert path_edits("import sys\nsys.path.insert(0, 'x')\n") == [2]
    assert path_edits("import sys\nsys.path = ['x']\n") == [2]
    assert path_edits("import site\nsite.addsitedir('x')\n") == [2]
    assert path_edits("SCRIPT = '''\nimport sys; sys.path.append('x')\n'''\n") == [2]
    assert path_edits("import os\nos.path.join('a', 'b')\n") == []


def test_library_code_calls_functions_not_command_lines():
    """Outside a module's own main(), nothing builds an argument parser to call a library function
    (records.pack(records.build_parser().parse_args([...])) was the old form)."""
    offenders = []
    for path in sorted([*(REPO / "tools").rglob("*.py"), *(REPO / "tests").glob("*.py")]):
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Attribute) and called.attr == "build_parser":
                if isinstance(called.value, ast.Name):  # another module's parser: records.build_parser()
                    offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


def documented_commands() -> list[tuple[str, str]]:
    """(file, module) for each `python3 -m tools...` in the README, docs/ and the tools' own text."""
    found = []
    pattern = re.compile(r"python3? -m (tools(?:\.\w+)+)")  # tools.<wing>.<module> is a pattern, not one
    files = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "tools").rglob("*.py")),
    ]
    files += sorted((REPO / "tools").rglob("*.sh"))
    for path in files:
        for module in pattern.findall(path.read_text(encoding="utf-8")):
            found.append((path.relative_to(REPO).as_posix(), module))
    return found


def test_every_documented_command_names_a_module_that_runs():
    commands = documented_commands()
    assert ("README.md", "tools.records") in commands
    missing = [(f, m) for f, m in commands if importlib.util.find_spec(m) is None]
    assert missing == []
    runnable = [(f, m) for f, m in commands if not runs_as_main(m)]
    assert runnable == [], "these modules have no `if __name__ == '__main__':` (or __main__.py)"


def runs_as_main(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    if spec.submodule_search_locations:  # a package: its __main__.py
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return '__name__ == "__main__"' in open(spec.origin, encoding="utf-8").read()


def test_no_document_runs_a_tool_by_its_file_path():
    """Commands run modules from the repository root (`python3 -m tools.records`), never tools/x.py."""
    pattern = re.compile(r"python3? (?:\S+/)?tools/\S+\.py")
    offenders = []
    for path in [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "tools").rglob("*")),
    ]:
        if path.suffix not in (".md", ".py", ".sh"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:90]}")
    assert offenders == [], "\n".join(offenders)


def test_records_cli_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "tools.records", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage: python3 -m tools.records" in result.stdout
    assert all(command in result.stdout for command in ("pack", "verify", "audit", "compare"))


def test_the_trainer_is_one_module_however_a_tool_or_a_test_reaches_it():
    """import_trainer loads train_gpt.py by file path under the name an `import train_gpt` finds, so a
    test's monkeypatch of the trainer is what the tools call."""
    import train_gpt

    from tools.common import REPO as TOOLS_REPO
    from tools.common import import_trainer

    assert import_trainer() is train_gpt and TOOLS_REPO == REPO
    tool_first = (
        "from tools.common import import_trainer\n"
        "loaded = import_trainer()\n"
        "import train_gpt\n"
        "print(loaded is train_gpt)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", tool_first], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr[-2000:]
