"""A base model's weights identity: one sha256 over its safetensors files, read in name order.

Every export records it in its lineage (``base.weights_sha256``); tests use it to show a base
was never written. flywheel-model.json's ``weights_sha256`` (:func:`service.models.prepare.weights_sha256`) is a
different value: a manifest of per-file hashes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20

# A worker exports many versions of one base: its hash is read once per (path, size, mtime).
_CACHE: dict[tuple, str] = {}


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the bytes of the model's safetensors files, concatenated in name order."""
    return _hash_files(sorted(Path(model_dir).glob("*.safetensors")))


def cached_weights_sha256(model_dir: str | Path) -> str:
    """:func:`weights_sha256`, read again only when a file's name, size or mtime changes."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    key = (str(model_dir.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in files))
    if key not in _CACHE:
        _CACHE[key] = _hash_files(files)
    return _CACHE[key]


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
