"""Merge a LoRA into its base: a standalone model with the base's tokenizer files verbatim."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engine.artifact import artifact_sha256
from service.files import publish_dir, staging_dir
from service.models.weights import cached_weights_sha256
from workers.export.identity import read_lineage, seal
from workers.export.progress import Progress, no_progress

# Copied verbatim from the base so the export tokenizes exactly as the served version does.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


@dataclass(frozen=True)
class MergedResult:
    path: Path
    sha256: str
    adapter_sha256: str
    base_sha256: str
    bytes: int
    seconds: float
    files: list[dict[str, Any]] = field(default_factory=list)  # file_manifest, lineage included


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                  lineage: dict[str, Any] | None = None,
                  progress: Progress = no_progress) -> MergedResult:
    """Merge the LoRA into the base (PEFT merge_and_unload) and save a standalone model.

    ``lineage`` (alias, version, ...) is folded into lineage.json. The merge runs in the base's
    own dtype, as the served weights are; safe_merge refuses NaN/inf results.
    """
    # Heavy (seconds to import): only a running export pays for them.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        progress("loading", 0.0)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        model = PeftModel.from_pretrained(base, adapter_dir)
        progress("merging", 0.4)
        with torch.no_grad():
            merged = model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        progress("writing", 0.8)
        _copy_tokenizer(base_dir, tmp)
        adapter_sha, base_sha = artifact_sha256(adapter_dir), cached_weights_sha256(base_dir)
        sha, files = seal(tmp, lambda sha, _: {
            "format": "merged", "sha256": sha,
            "base": {"path": str(base_dir), "weights_sha256": base_sha},
            "adapter": {"sha256": adapter_sha, "lineage": read_lineage(adapter_dir)},
            **(lineage or {}),
        })
        # Readers (downloads) never see a half-written export: built beside, then renamed.
        publish_dir(tmp, out_dir, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress("done", 1.0)
    return MergedResult(out_dir, sha, adapter_sha, base_sha, sum(f["bytes"] for f in files),
                        time.perf_counter() - t0, files)


def _copy_tokenizer(base_dir: Path, out_dir: Path) -> None:
    copied = [n for n in TOKENIZER_FILES if (base_dir / n).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FileNotFoundError(f"{base_dir} has no tokenizer.json or tokenizer.model")
    for name in copied:
        shutil.copy2(base_dir / name, out_dir / name)

