"""README's Architecture map matches the tree: every folder of service/ and workers/ has its line,
and every line names a folder (or file) that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _map_entries() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Architecture\n"):]
    block = section.split("```")[1]
    return [line.split()[0] for line in block.strip().splitlines() if line.strip()]


def _code_folders() -> set[str]:
    found = set()
    for top in ("service", "workers"):
        for d in (REPO / top).iterdir():
            if d.is_dir() and d.name != "__pycache__" and any(d.iterdir()):
                found.add(f"{top}/{d.name}/")
    return found


def test_every_code_folder_has_a_line_in_the_map():
    entries = set(_map_entries())
    assert sorted(_code_folders() - entries) == []


def test_every_line_of_the_map_names_something_that_exists():
    missing = [e for e in _map_entries() if not (e.endswith("*.py") or (REPO / e).exists())]
    assert missing == []
    for entry in _map_entries():
        if entry.endswith("*.py"):
            assert list((REPO / entry[:-4]).glob("*.py")), entry


def test_the_map_reads_in_loop_order():
    entries = _map_entries()
    order = ["service/api/", "service/intake/", "service/domain/", "workers/stages/", "service/engine/"]
    assert [entries.index(e) for e in order] == sorted(entries.index(e) for e in order)


def test_the_stage_and_export_lines_name_each_of_their_modules():
    text = (REPO / "README.md").read_text()
    for folder in ("workers/stages/", "workers/export/"):
        line = re.search(rf"^{re.escape(folder)} .*$", text, re.M)
        assert line, folder
        modules = {p.stem for p in (REPO / folder).glob("*.py")} - {"__init__", "progress", "build"}
        assert sorted(m for m in modules if m not in line.group(0)) == [], folder
