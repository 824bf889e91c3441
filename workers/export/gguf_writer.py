"""A merged model as a GGUF directory: model.gguf, its Ollama Modelfile and lineage.json.

f16/q8_0/tq2_0 are written by llama.cpp's converter (:mod:`workers.export.converter`);
q4_k_m/q4_0/q2_k by llama.cpp's quantizer through its Python bindings, from the converter's f16
file.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.domain.policy import EXPORT_QUANTS
from service.files import publish_dir, staging_dir
from workers.export.converter import convert_hf_to_gguf
from workers.export.identity import read_lineage, seal
from workers.export.merge import MergedResult
from workers.export.modelfile import MODELFILE, chat_template, write_modelfile
from workers.export.progress import Progress, no_progress

GGUF_FILE = "model.gguf"

# Most to least aggressive; f16 is the floor (a failed export falls back along this order).
QUANTS = EXPORT_QUANTS
# Written by llama.cpp's converter itself (its --outtype); the others are made by llama.cpp's
# quantizer (llama_model_quantize, LLAMA_FTYPE_MOSTLY_<QUANT>) from the converter's f16 output.
CONVERTER_QUANTS = ("f16", "q8_0", "tq2_0")
QUANTIZER_QUANTS = tuple(q for q in QUANTS if q not in CONVERTER_QUANTS)


@dataclass(frozen=True)
class GgufResult:
    path: Path  # the directory: model.gguf, Modelfile, lineage.json
    gguf_path: Path
    quant: str
    sha256: str  # export_sha256 of the directory
    gguf_sha256: str
    bytes: int  # size of model.gguf
    seconds: float
    tensor_types: dict[str, int]  # ggml type name -> tensor count, as written
    files: list[dict[str, Any]] = field(default_factory=list)  # file_manifest, lineage included


def to_gguf(merged_dir: str | Path, out_path: str | Path, quant: str, *,
            metadata: dict[str, Any] | None = None,
            progress: Progress = no_progress) -> dict[str, int]:
    """Write ``merged_dir`` (a Hugging Face model) as one GGUF file at ``out_path``.

    llama.cpp's own converter (:func:`convert_hf_to_gguf`) writes f16, q8_0 and tq2_0 itself;
    q4_k_m, q4_0 and q2_k are made by llama.cpp's quantizer from its f16 output (needs
    llama-cpp-python). ``metadata`` is the converter's ``--metadata`` override (general.* keys).
    Returns the count of tensors per ggml type.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if quant in QUANTIZER_QUANTS:
        f16_path = out_path.with_name(out_path.name + ".f16.tmp")
        try:
            convert_hf_to_gguf(merged_dir, f16_path, "f16", metadata=metadata,
                               progress=lambda s, f: progress(s, f * 0.6))
            progress("llama.cpp quantize", 0.6)
            llama_cpp_quantize(f16_path, out_path, quant)
        finally:
            f16_path.unlink(missing_ok=True)
    else:
        convert_hf_to_gguf(merged_dir, out_path, quant, metadata=metadata, progress=progress)
    progress("written", 0.8)
    return gguf_tensor_types(out_path)


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """Count of tensors per ggml type in a GGUF file (read with gguf's reader)."""
    import gguf  # heavy (numpy and its reader); only a written GGUF needs it

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize)."""
    import llama_cpp  # optional (the export extra) and loads llama.cpp's native library

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = 0  # llama.cpp picks
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({quant}) failed with code {rc}")


def gguf_metadata(lineage: dict[str, Any], merged_dir: Path) -> dict[str, str]:
    """The converter's --metadata override: the GGUF travels alone (Ollama pulls, edge copies),
    so its name and description say which alias, version, adapter and merge it is."""
    name = str(lineage.get("alias") or merged_dir.parent.name or merged_dir.name)
    meta = {"general.name": f"{name}-v{lineage['version']}" if "version" in lineage else name}
    if "version" in lineage:
        meta["general.version"] = f"v{lineage['version']}"
    adapter_sha = (lineage.get("adapter") or {}).get("sha256")
    parts = [f"merged sha256 {lineage['sha256']}" if lineage.get("sha256") else "",
             f"adapter sha256 {adapter_sha}" if adapter_sha else ""]
    meta["general.description"] = "; ".join(["Flywheel export of " + meta["general.name"],
                                             *filter(None, parts)])
    return meta


def llama_cpp_available() -> bool:
    """Whether llama.cpp's Python bindings import (needed for k-quants and the GGUF gate)."""
    try:
        import llama_cpp  # noqa: F401 - the probe itself: optional, native library
    except (ImportError, OSError):
        return False
    return True


def export_gguf(merged: MergedResult, out_dir: str | Path, quant: str, *,
                progress: Progress = no_progress) -> GgufResult:
    """model.gguf + Modelfile + lineage.json in ``out_dir``, from a merged export."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        merged_lineage = read_lineage(merged.path) or {}
        types = to_gguf(merged.path, tmp / GGUF_FILE, quant,
                        metadata=gguf_metadata(merged_lineage, merged.path), progress=progress)
        template = chat_template(merged.path)
        tokenizer_cfg = json.loads((merged.path / "tokenizer_config.json").read_text())
        (tmp / MODELFILE).write_text(write_modelfile(f"./{GGUF_FILE}", template, tokenizer_cfg))

        def lineage(sha: str, files: list[dict[str, Any]]) -> dict[str, Any]:
            gguf_sha = next(f["sha256"] for f in files if f["name"] == GGUF_FILE)
            return {**merged_lineage, "format": "gguf", "quant": quant, "sha256": sha,
                    "gguf_sha256": gguf_sha, "tensor_types": types,
                    "parent": {"format": "merged", "sha256": merged.sha256}}

        sha, files = seal(tmp, lineage)
        # Readers (downloads) never see a half-written export: built beside, then renamed.
        publish_dir(tmp, out_dir, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = out_dir / GGUF_FILE
    gguf_sha = next(f["sha256"] for f in files if f["name"] == GGUF_FILE)
    return GgufResult(out_dir, path, quant, sha, gguf_sha, path.stat().st_size,
                      time.perf_counter() - t0, types, files)
