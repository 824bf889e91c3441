"""What an export is: the manifest of its files, its sha256, and the lineage.json that records it.

An export's sha256 is the manifest hash of every file in it except ``lineage.json`` (which
records that sha256 and so cannot be part of it), like ``artifact_sha256`` for adapters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.engine.artifact import file_sha256

LINEAGE_FILE = "lineage.json"


def file_manifest(directory: str | Path) -> list[dict[str, Any]]:
    """{name, bytes, sha256} of every file under ``directory``, sorted by relative path: each
    byte is read once, and the export's own sha256 is derived from it."""
    root = Path(directory)
    return [{"name": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
             "sha256": file_sha256(p)} for p in sorted(root.rglob("*")) if p.is_file()]


def manifest_sha256(files: Sequence[dict[str, Any]]) -> str:
    """The export sha256 from a manifest: "relpath:sha256\n" of every file but lineage.json."""
    lines = "".join(f"{f['name']}:{f['sha256']}\n" for f in sorted(files, key=lambda f: f["name"])
                    if f["name"] != LINEAGE_FILE)
    return hashlib.sha256(lines.encode()).hexdigest()


def export_sha256(directory: str | Path) -> str:
    """Manifest hash over every file except lineage.json: "relpath:sha256\n", sorted by path."""
    return manifest_sha256(file_manifest(directory))


def seal(tmp: Path, lineage: Callable[[str, list[dict[str, Any]]], dict[str, Any]]
         ) -> tuple[str, list[dict[str, Any]]]:
    """Hash the staged files once, write lineage.json (which records that hash), and return
    (export sha256, the manifest including lineage.json)."""
    files = file_manifest(tmp)
    sha = manifest_sha256(files)
    p = tmp / LINEAGE_FILE
    p.write_text(json.dumps(lineage(sha, files), indent=2, sort_keys=True) + "\n")
    files = sorted([*files, {"name": LINEAGE_FILE, "bytes": p.stat().st_size,
                             "sha256": file_sha256(p)}], key=lambda f: f["name"])
    return sha, files


def read_lineage(directory: Path) -> dict[str, Any] | None:
    """The directory's lineage.json, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((directory / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
