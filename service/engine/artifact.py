"""Adapter artifact format and verification (pure functions, no HTTP).

An artifact is a directory holding exactly ``adapter_model.safetensors`` and
``adapter_config.json``, plus optionally ``lineage.json`` and ``README.md``. Its identity is
:func:`artifact_sha256`, which covers both the weights and the config, because vLLM reads both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIONAL_FILES = frozenset({"lineage.json", "README.md"})
ALLOWED_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE}) | OPTIONAL_FILES
# Sorted so the manifest is canonical.
HASHED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# vLLM falls back to torch.load on adapter_model.bin / .pt when the safetensors file is absent,
# so any pickle-capable file is refused outright, not just ignored.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_CHUNK = 1 << 20
# Key shapes vLLM's parse_fine_tuned_lora_name accepts for LoRA weights.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                       r"lora_embedding_A|lora_embedding_B)$")


class ArtifactRejected(Exception):
    """An artifact failed verification; ``code`` is a short machine string, ``reason`` prose."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Default exception pickling replays self.args, which would lose the two-field signature.
        return (type(self), (self.reason, self.code))


@dataclass(frozen=True)
class VerifiedArtifact:
    """What verification established about an artifact directory."""

    path: Path
    sha256: str
    rank: int
    alpha: float
    # A list in the config becomes a sorted tuple; a regex string stays a string.
    target_modules: tuple[str, ...] | str
    base_model: str
    n_tensors: int
    # Size of the hashed files (weights + config).
    bytes: int


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def artifact_sha256(directory: str | os.PathLike[str]) -> str:
    """Hex sha256 of the manifest of per-file hashes.

    The manifest is "adapter_config.json:<sha>\\nadapter_model.safetensors:<sha>\\n".
    """
    d = Path(directory)
    manifest = "".join(f"{name}:{file_sha256(d / name)}\n" for name in HASHED_FILES)
    return hashlib.sha256(manifest.encode()).hexdigest()


def verify_artifact(directory: str | os.PathLike[str], *, expected_sha256: str,
                    engine_base_model: str, max_lora_rank: int) -> VerifiedArtifact:
    """Check an artifact is safe and loadable by the engine, or raise ArtifactRejected.

    Blocking (hashes and reads every tensor): call it through ``asyncio.to_thread`` from async code.
    The caller must load the same directory it verified and keep it immutable afterwards.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactRejected(f"artifact directory {str(root)!r} does not exist", "missing")
    root = root.resolve()
    entries = _walk(root)

    # Before the missing-file check, so a directory with only adapter_model.bin says why.
    pickles = sorted(rel for rel, _ in entries if rel.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ArtifactRejected(f"pickle files are never loaded: {', '.join(pickles)}", "pickle")
    # Before the missing-file check, so a dangling link that escapes is reported as what it is.
    for rel, p in entries:
        target = os.path.realpath(p)
        if p.is_symlink() and not _inside(Path(target), root):
            raise ArtifactRejected(f"{rel} is a symlink pointing outside the artifact "
                                   f"(to {target!r})", "symlink")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise ArtifactRejected(f"{name} is missing from {str(root)!r}", "missing")
    unexpected = sorted(rel for rel, _ in entries if rel not in ALLOWED_FILES)
    if unexpected:
        raise ArtifactRejected(f"unexpected files in artifact: {', '.join(unexpected)} "
                               f"(allowed: {', '.join(sorted(ALLOWED_FILES))})", "unexpected_file")

    actual = artifact_sha256(root)
    expected = _normalize_sha(expected_sha256)
    if actual != expected:
        raise ArtifactRejected(f"sha256 mismatch: expected {expected[:12]}…, "
                               f"got {actual[:12]}…", "sha256_mismatch")

    cfg = _read_config(root / CONFIG_FILE)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ArtifactRejected("adapter_config.json names no base_model_name_or_path",
                               "wrong_base")
    if not same_base_model(base, engine_base_model):
        raise ArtifactRejected(f"adapter was trained on base model {base!r}, "
                               f"the engine serves {engine_base_model!r}", "wrong_base")

    rank, rank_pattern = cfg["r"], cfg.get("rank_pattern") or {}
    too_large = {k: v for k, v in rank_pattern.items() if v > max_lora_rank}
    if rank > max_lora_rank or too_large:
        detail = f"r={rank}" + (f", rank_pattern {too_large}" if too_large else "")
        raise ArtifactRejected(f"LoRA rank too large: {detail} exceeds the engine's "
                               f"max_lora_rank {max_lora_rank}", "rank_too_large")
    if cfg.get("modules_to_save"):
        raise ArtifactRejected(f"modules_to_save={cfg['modules_to_save']!r} is not empty; "
                               "vLLM refuses such adapters (vllm #9280)", "modules_to_save")

    n_tensors = _check_weights(root / WEIGHTS_FILE, max_lora_rank)
    targets = cfg["target_modules"]
    return VerifiedArtifact(
        path=root,
        sha256=actual,
        rank=rank,
        alpha=float(cfg["lora_alpha"]),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        base_model=base,
        n_tensors=n_tensors,
        bytes=sum((root / n).stat().st_size for n in HASHED_FILES),
    )


def same_base_model(adapter_base: str, engine_base: str) -> bool:
    """Compare base models: as resolved absolute paths when both look like paths, else exactly.

    A bare "org/name" is treated as a hub id (exact match) unless it exists on disk, because a
    relative path and a hub id are spelled alike.
    """
    if _looks_like_path(adapter_base) and _looks_like_path(engine_base):
        return _real(adapter_base) == _real(engine_base)
    return adapter_base == engine_base


def _looks_like_path(s: str) -> bool:
    return (os.path.isabs(s) or s.startswith(("./", "../", "~")) or s in (".", "..")
            or os.path.exists(s))


def _real(s: str) -> str:
    return os.path.realpath(os.path.expanduser(s))


def _normalize_sha(s: str) -> str:
    s = s.strip().lower()
    return s.removeprefix("sha256:")


def _inside(p: Path, root: Path) -> bool:
    return p == root or p.is_relative_to(root)


def _walk(root: Path) -> list[tuple[str, Path]]:
    """Every entry under root (files, dirs, links), relative posix path first; no link followed."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out.append((p.relative_to(root).as_posix(), p))
    return out


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """adapter_config.json, checked as verify_artifact checks it; ArtifactRejected otherwise."""
    return _read_config(Path(path))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactRejected(f"adapter_config.json is not valid JSON: {e}", "bad_config") from e
    if not isinstance(cfg, dict):
        raise ArtifactRejected("adapter_config.json is not a JSON object", "bad_config")

    def bad(msg: str) -> ArtifactRejected:
        return ArtifactRejected(f"adapter_config.json: {msg}", "bad_config")

    if cfg.get("peft_type") != "LORA":
        raise bad(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if not _positive_int(cfg.get("r")):
        raise bad(f"r must be a positive integer, got {cfg.get('r')!r}")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
    targets = cfg.get("target_modules")
    valid_list = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (valid_list or (isinstance(targets, str) and targets)):
        raise bad(f"target_modules must be a non-empty list of names or a regex, got {targets!r}")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(map(_positive_int, rank_pattern.values())):
        raise bad(f"rank_pattern must map module patterns to positive integers, "
                  f"got {rank_pattern!r}")
    # vLLM refuses these at load time; refusing here gives the reason before any swap starts.
    if cfg.get("use_dora"):
        raise bad("use_dora is set; vLLM does not support DoRA")
    if cfg.get("bias", "none") != "none":
        raise bad(f"bias={cfg.get('bias')!r}; vLLM supports only bias='none'")
    return cfg


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_weights(path: Path, max_lora_rank: int) -> int:
    """Validate keys, per-tensor rank and finiteness; return the tensor count."""
    # Imported here so config-only users of this module do not pay for torch.
    import torch

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types, or OSError/ValueError
        raise ArtifactRejected(f"{WEIGHTS_FILE} header is unreadable: {e}", "bad_weights") from e
    with handle as f:
        keys = list(f.keys())
        if not keys:
            raise ArtifactRejected(f"{WEIGHTS_FILE} holds no tensors", "bad_weights")
        # Keys and shapes come from the header alone: check them before reading any data, so a
        # full model saved under the adapter's name is refused without scanning gigabytes.
        non_lora = [k for k in keys if not _LORA_KEY.match(k)]
        if non_lora:
            shown = ", ".join(non_lora[:5]) + (" …" if len(non_lora) > 5 else "")
            raise ArtifactRejected(f"weight keys do not look like LoRA (lora_A/lora_B): {shown}",
                                   "bad_weights")
        _check_pairs_and_ranks(f, keys, max_lora_rank)
        # One tensor at a time keeps memory bounded by the largest tensor.
        for k in keys:
            t = f.get_tensor(k)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(torch.isinf(t).sum())
                raise ArtifactRejected(f"tensor {k} has non-finite values "
                                       f"({n_nan} NaN, {n_inf} Inf)", "non_finite")
    return len(keys)


def _check_pairs_and_ranks(f: Any, keys: list[str], max_lora_rank: int) -> None:
    halves: dict[str, set[str]] = {}
    for k in keys:
        m = _LORA_KEY.match(k)
        assert m is not None
        is_a = m["kind"] in ("lora_A.weight", "lora_embedding_A")
        halves.setdefault(m["module"], set()).add("A" if is_a else "B")
        shape = f.get_slice(k).get_shape()
        if len(shape) < 2:
            raise ArtifactRejected(f"tensor {k} has shape {shape}, expected a matrix",
                                   "bad_weights")
        # A is (r, in), B is (out, r): a config that understates the real rank is caught here.
        r = shape[0] if is_a else shape[-1]
        if r > max_lora_rank:
            raise ArtifactRejected(f"tensor {k} has rank {r}, above the engine's max_lora_rank "
                                   f"{max_lora_rank}", "rank_too_large")
    unpaired = sorted(m for m, h in halves.items() if h != {"A", "B"})
    if unpaired:
        raise ArtifactRejected(f"LoRA modules missing their A or B half: {', '.join(unpaired[:5])}",
                               "bad_weights")



def verifier(*, engine_base_model: str, max_lora_rank: int):
    """verify(path, sha256) -> the rejection, or None: verify_artifact with the engine's facts
    bound, for callers that load what the database says (the reconciler, rollback)."""

    def verify(path: str, sha256: str) -> ArtifactRejected | None:
        try:
            verify_artifact(path, expected_sha256=sha256, engine_base_model=engine_base_model,
                            max_lora_rank=max_lora_rank)
        except ArtifactRejected as exc:
            return exc
        return None

    return verify
