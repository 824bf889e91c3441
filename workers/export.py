"""Edge export of a served adapter version: a merged model and GGUF, behind a consistency gate.

Pure functions over directories (no DB, no HTTP); the job wrapper owns state. Heavy imports
(torch, peft, transformers, gguf, llama_cpp) happen inside functions so importing this module
is cheap.

* :func:`merge_adapter`  base + LoRA -> merged safetensors + the base's tokenizer files verbatim.
* :func:`to_gguf`        merged dir -> one GGUF file, by llama.cpp's own convert_hf_to_gguf.py
  (f16/q8_0/tq2_0, run as a subprocess from the llama-cpp-python sdist, see
  :func:`ensure_converter`); q4_k_m/q4_0/q2_k by llama.cpp's quantizer through its Python
  bindings, from the converter's f16 file.
* :func:`write_modelfile` an Ollama Modelfile beside the GGUF.
* :func:`consistency`    greedy agreement and log-likelihood deltas, candidate vs reference.
* :func:`run_export`     all of the above plus the gate and the less-aggressive fallback.

Identity: an export's sha256 is the manifest hash of every file in it except ``lineage.json``
(which records that sha256 and so cannot be part of it), like ``artifact_sha256`` for adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.engine.artifact import artifact_sha256, file_sha256
from service.policy import EXPORT_QUANTS

LINEAGE_FILE = "lineage.json"
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
# Copied verbatim from the base so the export tokenizes exactly as the served version does.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")

# Most to least aggressive. "Less aggressive" for a suggestion or fallback means later in
# FALLBACK_ORDER; f16 is the floor.
QUANTS = EXPORT_QUANTS
FALLBACK_ORDER = QUANTS
# Written by llama.cpp's converter itself (its --outtype); the others are made by llama.cpp's
# quantizer (llama_model_quantize, LLAMA_FTYPE_MOSTLY_<QUANT>) from the converter's f16 output.
CONVERTER_QUANTS = ("f16", "q8_0", "tq2_0")
QUANTIZER_QUANTS = tuple(q for q in QUANTS if q not in CONVERTER_QUANTS)
# The converter comes from the llama-cpp-python source distribution of the version bootstrap
# builds, so the GGUF is written by the llama.cpp that quantizes and runs it.
LLAMA_CPP_VERSION = "0.3.36"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
CONVERT_TIMEOUT_S = 3600.0  # a 7B f16 conversion takes minutes; the lease is renewed meanwhile
DOWNLOAD_TIMEOUT_S = 1800.0

log = logging.getLogger(__name__)

# (stage, fraction of that stage done); run_export names stages "merge: ...", "gguf q8_0: ...".
Progress = Callable[[str, float], None]
Prompt = str | list[dict[str, str]]


def _no_progress(stage: str, fraction: float) -> None:
    return None


# --- identity ---------------------------------------------------------------------------------


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


def _seal(tmp: Path, lineage: Callable[[str, list[dict[str, Any]]], dict[str, Any]]
          ) -> tuple[str, list[dict[str, Any]]]:
    """Hash the staged files once, write lineage.json (which records that hash), and return
    (export sha256, the manifest including lineage.json)."""
    files = file_manifest(tmp)
    sha = manifest_sha256(files)
    _write_json(tmp / LINEAGE_FILE, lineage(sha, files))
    p = tmp / LINEAGE_FILE
    files = sorted([*files, {"name": LINEAGE_FILE, "bytes": p.stat().st_size,
                             "sha256": file_sha256(p)}], key=lambda f: f["name"])
    return sha, files


# A worker exports many versions of one base: its hash is read once per (path, size, mtime).
_BASE_SHA_CACHE: dict[tuple, str] = {}


def _weights_sha256(model_dir: Path) -> str:
    """sha256 over the model's safetensors files in name order (as service.tiny_model does)."""
    files = sorted(model_dir.glob("*.safetensors"))
    key = (str(model_dir.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in files))
    if key not in _BASE_SHA_CACHE:
        _BASE_SHA_CACHE[key] = _hash_files(files)
    return _BASE_SHA_CACHE[key]


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    # Readers (downloads) never see a half-written export: build beside, then rename.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _staging_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the API may serve downloads as another user
    return tmp


# --- merge ------------------------------------------------------------------------------------


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
                  progress: Progress = _no_progress) -> MergedResult:
    """Merge the LoRA into the base (PEFT merge_and_unload) and save a standalone model.

    ``lineage`` (alias, version, ...) is folded into lineage.json. The merge runs in the base's
    own dtype, as the served weights are; safe_merge refuses NaN/inf results.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    tmp = _staging_dir(out_dir)
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
        adapter_sha, base_sha = artifact_sha256(adapter_dir), _weights_sha256(base_dir)
        sha, files = _seal(tmp, lambda sha, _: {
            "format": "merged", "sha256": sha,
            "base": {"path": str(base_dir), "weights_sha256": base_sha},
            "adapter": {"sha256": adapter_sha, "lineage": _read_lineage(adapter_dir)},
            **(lineage or {}),
        })
        _swap_in(tmp, out_dir)
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


def _read_lineage(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


# --- GGUF -------------------------------------------------------------------------------------


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
            progress: Progress = _no_progress) -> dict[str, int]:
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


def converter_dir() -> Path:
    """Where llama.cpp's converter lives on this machine (scripts/bootstrap.sh fills it too)."""
    return Path.home() / ".cache" / "flywheel" / "llama-convert" / LLAMA_CPP_VERSION


def ensure_converter(root: Path | None = None) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, its conversion/ package and gguf-py/.

    Missing, they are taken from the llama-cpp-python source distribution (the one whose
    library quantizes and runs the GGUF): ``pip download`` it, extract only those, and rename
    the finished folder into place, under a file lock so concurrent workers fetch it once.
    """
    root = root or converter_dir()
    if (root / CONVERTER_SCRIPT).is_file() and (root / "gguf-py").is_dir():
        return root
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / CONVERTER_SCRIPT).is_file() and (root / "gguf-py").is_dir():
            return root  # another process fetched it while this one waited
        log.info("fetching llama.cpp's converter from llama-cpp-python %s into %s",
                 LLAMA_CPP_VERSION, root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            extract_converter(_download_sdist(tmp / "sdist"), tmp / "tree")
            if root.exists():  # an incomplete leftover (no script or no gguf-py)
                shutil.rmtree(root)
            (tmp / "tree").rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           # The sdist, never a wheel; its build backend (needed for its metadata) may be one:
           # ":all:" would build scikit-build-core and its own build tools from source too.
           "--no-deps", "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"downloading llama-cpp-python {LLAMA_CPP_VERSION}'s source (for "
                           f"llama.cpp's converter) took over {DOWNLOAD_TIMEOUT_S} s") from exc
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download llama-cpp-python {LLAMA_CPP_VERSION}'s source "
                           f"(for llama.cpp's converter): {_tail(proc.stderr + proc.stdout)}")
    return found[0]


def extract_converter(sdist: Path, dest: Path) -> Path:
    """Extract vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} of the sdist into
    ``dest`` (regular files only; conversion/ only where that llama.cpp has it)."""
    import tarfile

    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if not rel or not member.isfile() or ".." in Path(rel).parts:
                continue
            if rel != CONVERTER_SCRIPT and not rel.startswith(("conversion/", "gguf-py/")):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / CONVERTER_SCRIPT).is_file() or not (dest / "gguf-py").is_dir():
        raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/{CONVERTER_SCRIPT} and gguf-py/")
    return dest


# Runs llama.cpp's convert_hf_to_gguf.py as it is, with one addition. llama.cpp names a BPE
# vocabulary's pre-tokenizer by hashing the token ids a known model gives a test string, so it
# refuses any vocabulary it has not seen (a newly trained one, like the tiny test model's). When
# it refuses and tokenizer.json declares exactly GPT-2's pre-tokenization (ByteLevel with its
# regex, no prefix space, no normalizer), "gpt-2" (the same regex in llama.cpp) is written. The
# consistency gate then checks llama.cpp's tokenization against the served tokenizer's.
_CONVERT_SHIM = r"""
import json, sys
from pathlib import Path
sys.argv = sys.argv[1:]
import convert_hf_to_gguf as convert
from conversion.base import TextModel

known = TextModel.get_vocab_base_pre

def declares_gpt2(model_dir):
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    return (tok.get("model", {}).get("type") == "BPE" and tok.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))

def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if not declares_gpt2(self.dir_model):
            raise
        convert.logger.warning("flywheel: vocabulary unknown to llama.cpp; tokenizer.json "
                               "declares GPT-2 byte-level pre-tokenization: writing 'gpt-2'")
        return "gpt-2"

TextModel.get_vocab_base_pre = get_vocab_base_pre
convert.main()
"""


def convert_hf_to_gguf(model_dir: str | Path, out_path: str | Path, outtype: str, *,
                       metadata: dict[str, Any] | None = None,
                       timeout_s: float = CONVERT_TIMEOUT_S,
                       progress: Progress = _no_progress) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py on ``model_dir`` in a subprocess.

    ``outtype`` is the converter's own (f16, q8_0, tq2_0, ...). Its vendored gguf-py comes first
    on PYTHONPATH, so it never runs against the PyPI ``gguf``. A failure or a timeout raises
    RuntimeError with the tail of the converter's output.
    """
    import threading
    from collections import deque

    root = ensure_converter()
    model_dir, out_path = Path(model_dir).resolve(), Path(out_path).resolve()  # cwd is a tmp dir
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "gguf-py"), str(root)])
    cmd = [sys.executable, "-c", _CONVERT_SHIM, str(root / CONVERTER_SCRIPT), str(model_dir),
           "--outfile", str(out_path), "--outtype", outtype]
    tail: deque[str] = deque(maxlen=40)
    timed_out = threading.Event()
    with tempfile.TemporaryDirectory(prefix="flywheel-convert-") as tmp:
        if metadata:
            _write_json(Path(tmp) / "metadata.json", metadata)
            cmd += ["--metadata", str(Path(tmp) / "metadata.json")]
        progress("llama.cpp convert", 0.05)
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:  # text mode: tqdm's "\r" ends a line too
                if line := line.rstrip():
                    tail.append(line)
                if (m := _WRITING.match(line)) is not None:
                    progress("llama.cpp convert", round(0.1 + 0.7 * int(m.group(1)) / 100, 3))
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0 or not out_path.is_file():
        out_path.unlink(missing_ok=True)
        why = f"did not finish in {timeout_s:g} s" if timed_out.is_set() else f"failed (exit {rc})"
        raise RuntimeError(f"llama.cpp's {CONVERTER_SCRIPT} {why}: {_tail(chr(10).join(tail))}")
    return out_path


_WRITING = re.compile(r"^Writing:\s+(\d+)%")


def _tail(text: str, limit: int = 1500) -> str:
    """The end of a tool's output, for an error message (progress bars dropped)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not _WRITING.match(ln)]
    out = "\n".join(lines)
    return out if len(out) <= limit else "..." + out[-limit:]


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """Count of tensors per ggml type in a GGUF file (read with gguf's reader)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize)."""
    import ctypes

    import llama_cpp

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
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def export_gguf(merged: MergedResult, out_dir: str | Path, quant: str, *,
                progress: Progress = _no_progress) -> GgufResult:
    """model.gguf + Modelfile + lineage.json in ``out_dir``, from a merged export."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tmp = _staging_dir(out_dir)
    try:
        merged_lineage = _read_lineage(merged.path) or {}
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

        sha, files = _seal(tmp, lineage)
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = out_dir / GGUF_FILE
    gguf_sha = next(f["sha256"] for f in files if f["name"] == GGUF_FILE)
    return GgufResult(out_dir, path, quant, sha, gguf_sha, path.stat().st_size,
                      time.perf_counter() - t0, types, files)


# --- Ollama Modelfile -------------------------------------------------------------------------


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    return template if isinstance(template, str) else None


@dataclass(frozen=True)
class TurnFormat:
    """A role-marker chat format read off a Jinja template by rendering it."""

    bos: str  # what the template puts before the first message
    turns: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the content
    generation_prompt: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the Modelfile's TEMPLATE renders (bos excluded), for checking the translation."""
        body = "".join(self.turns[m["role"]][0] + m["content"] + self.turns[m["role"]][1]
                       for m in messages)
        return body + (self.generation_prompt if add_generation_prompt else "")


_SENTINEL = "\x00CONTENT\x00"


def turn_format(template: str, tokenizer_cfg: dict[str, Any]) -> TurnFormat:
    """Render the Jinja template with sentinel messages and read each role's markers off it.

    Works for templates where a turn is prefix + content + suffix and depends only on its role
    (ChatML, Llama-2-ish, Zephyr, this project's tiny model); anything else raises ValueError.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(template)
    special = {k: _token_text(tokenizer_cfg.get(k)) for k in ("bos_token", "eos_token")}

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return tpl.render(messages=messages, add_generation_prompt=gen,
                          raise_exception=_raise, **special)

    empty = render([], False)
    turns = {}
    for role in ("system", "user", "assistant"):
        try:
            one = render([{"role": role, "content": _SENTINEL}], False)
        except Exception:  # noqa: BLE001 - a template may refuse a role (e.g. no system)
            continue
        if not one.startswith(empty) or one.count(_SENTINEL) != 1:
            raise ValueError(f"chat template is not a simple role-marker format (role {role})")
        prefix, suffix = one[len(empty):].split(_SENTINEL)
        turns[role] = (prefix, suffix)
    fmt = TurnFormat(empty, turns, render([], True)[len(empty):])
    _check_format(fmt, render)
    return fmt


def _check_format(fmt: TurnFormat, render: Callable[[list[dict[str, str]], bool], str]) -> None:
    # A multi-turn render must be the concatenation of single turns, else the format is richer
    # (first-turn-only system prompts, turn counters...) than a Modelfile template can say.
    roles = [r for r in ("system", "user", "assistant", "user") if r in fmt.turns]
    msgs = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    if render(msgs, True) != fmt.bos + fmt.render(msgs, True):
        raise ValueError("chat template turns are not independent; cannot translate to Ollama")


def _raise(message: str) -> None:
    raise ValueError(message)


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return tok.get("content", "")
    return tok or ""


def _go_literal(text: str) -> str:
    # Inside a Go template, literal text needs no escaping except the delimiters.
    if "{{" in text or "}}" in text:
        raise ValueError("chat markers contain template delimiters")
    return text


def write_modelfile(gguf_ref: str, template: str | None, tokenizer_cfg: dict[str, Any]) -> str:
    """An Ollama Modelfile: FROM, a TEMPLATE translated from the chat template, stop tokens.

    The bos the Jinja template renders is left out: llama.cpp adds it when tokenizing because
    the GGUF says add_bos_token. Without a translatable template only FROM and stops are written.
    """
    eos = _token_text(tokenizer_cfg.get("eos_token"))
    lines = [f"FROM {gguf_ref}", ""]
    stops = [eos] if eos else []
    try:
        fmt = turn_format(template, tokenizer_cfg) if template else None
    except ValueError as exc:
        # Still a usable Modelfile (raw prompts); the comment tells ops why there is no TEMPLATE.
        lines += [f"# chat template not translated: {exc}", ""]
        fmt = None
    if fmt is not None:
        lines += ['TEMPLATE """' + _go_template(fmt) + '"""', ""]
        # A model that starts a new turn by itself has finished its answer.
        stops += [p.strip() for p, _ in fmt.turns.values() if p.strip() and p.strip() not in stops]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _go_template(fmt: TurnFormat) -> str:
    branches = []
    for i, (role, (prefix, suffix)) in enumerate(fmt.turns.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}'
                        f"{_go_literal(prefix)}{{{{ .Content }}}}{_go_literal(suffix)}")
    return ("{{- range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}"
            + _go_literal(fmt.generation_prompt))


# --- consistency ------------------------------------------------------------------------------


class LanguageModel(Protocol):
    """What the consistency check needs from an engine, on token ids."""

    def logprobs(self, ids: Sequence[int]):  # (len(ids), vocab) next-token log-probabilities
        ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        ...


@dataclass
class TorchLM:
    """A transformers model (PEFT-wrapped or merged) on CPU, fp32 arithmetic."""

    model: Any
    stop_ids: frozenset[int] = frozenset()

    def logprobs(self, ids: Sequence[int]):
        import torch

        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0].float()
        return torch.log_softmax(logits, dim=-1).numpy()

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch

        # A hand loop rather than generate(): identical argmax/stop rules in every engine.
        out: list[int] = []
        with torch.no_grad():
            step = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True)
            for _ in range(max_new_tokens):
                tok = int(step.logits[0, -1].argmax())
                out.append(tok)
                if tok in self.stop_ids:
                    break
                step = self.model(input_ids=torch.tensor([[tok]]),
                                  past_key_values=step.past_key_values, use_cache=True)
        return out


def load_served(base_dir: str | Path, adapter_dir: str | Path) -> TorchLM:
    """The served version as vLLM computes it: base + unmerged LoRA (PEFT), fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return TorchLM(model, _stop_ids(Path(base_dir)))


@dataclass
class Memo:
    """Caches an engine's answers, so a fallback chain scores the reference only once."""

    inner: Any
    _lp: dict = field(default_factory=dict)
    _greedy: dict = field(default_factory=dict)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.inner.stop_ids

    def logprobs(self, ids: Sequence[int]):
        key = tuple(ids)
        if key not in self._lp:
            self._lp[key] = self.inner.logprobs(ids)
        return self._lp[key]

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        key = (tuple(ids), max_new_tokens)
        if key not in self._greedy:
            self._greedy[key] = self.inner.greedy(ids, max_new_tokens)
        return list(self._greedy[key])


def load_merged(merged_dir: str | Path) -> TorchLM:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    return TorchLM(model, _stop_ids(Path(merged_dir)))


def _stop_ids(model_dir: Path) -> frozenset[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


@dataclass
class LlamaCppLM:
    """A GGUF file run through llama.cpp's Python bindings (llama-cpp-python)."""

    llm: Any
    stop_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, gguf_path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None,
             stop_ids: frozenset[int] | None = None) -> LlamaCppLM:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, seed=0,
                    n_threads=n_threads, verbose=False)
        return cls(llm, stop_ids if stop_ids is not None else frozenset([llm.token_eos()]))

    def logprobs(self, ids: Sequence[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        scores = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        return (scores - _logsumexp(scores)).astype(np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if tok in self.stop_ids:
                break
            self.llm.eval([tok])
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads ``text`` (special tokens parsed, no bos added)."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def _logsumexp(x):
    import numpy as np

    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def encode_prompts(tokenizer_dir: str | Path, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids per prompt: a message list goes through the chat template (with the
    generation prompt); a string is taken as already-rendered text (held-out records' prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for p in prompts:
        text = p if isinstance(p, str) else tok.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def render_prompts(tokenizer_dir: str | Path, prompts: Sequence[Prompt]) -> list[str]:
    """The text of each prompt as the served model sees it (for tokenizer parity checks)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [p if isinstance(p, str) else
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def consistency(reference: LanguageModel, candidate: LanguageModel,
                prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                tie_margin: float = 0.0) -> dict[str, Any]:
    """Compare a candidate engine with the reference on the reference's greedy continuations.

    * exact_match: share of prompts whose free-running greedy output is identical.
    * token_agreement: teacher-forced, share of continuation positions where the candidate's
      argmax equals the reference's (no cascade after a first divergence).
    * decisive_agreement: the same over positions where the reference's top-1 beats its top-2
      by at least ``tie_margin`` nats; near-ties flip under any change of kernel or precision,
      so they say little about the export (n_decisive counts those positions).
    * nll_reference / nll_candidate: mean per-token NLL (nats) of the reference continuation;
      nll_delta = candidate - reference, ppl_ratio = exp(nll_delta).
    * max_abs_logprob_delta: worst single-token log-prob difference; kl_mean: mean KL(ref||cand)
      of the next-token distributions over the continuation positions.
    """
    import numpy as np

    exact = agree = n_pos = agree_decisive = n_decisive = 0
    nll_ref = nll_cand = kl = 0.0
    max_delta = 0.0
    per_prompt = []
    for ids in prompts:
        ids = list(ids)
        cont = reference.greedy(ids, max_new_tokens)
        cand_cont = candidate.greedy(ids, max_new_tokens)
        exact += cand_cont == cont
        full = ids + cont
        # Row i predicts full[i + 1]; the continuation is predicted by rows len(ids)-1 .. end-1.
        rows = slice(len(ids) - 1, len(full) - 1)
        lp_ref = reference.logprobs(full)[rows].astype(np.float64)
        lp_cand = candidate.logprobs(full)[rows].astype(np.float64)
        targets = np.asarray(cont)
        t_ref = lp_ref[np.arange(len(cont)), targets]
        t_cand = lp_cand[np.arange(len(cont)), targets]
        same = lp_cand.argmax(-1) == lp_ref.argmax(-1)
        top2 = np.sort(lp_ref, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= tie_margin
        agree += int(same.sum())
        agree_decisive += int((same & decisive).sum())
        n_decisive += int(decisive.sum())
        n_pos += len(cont)
        nll_ref -= float(t_ref.sum())
        nll_cand -= float(t_cand.sum())
        max_delta = max(max_delta, float(np.abs(t_cand - t_ref).max()))
        kl += float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())
        per_prompt.append({"n_prompt": len(ids), "reference": cont, "candidate": cand_cont,
                           "token_agreement": float(same.mean())})
    n = max(n_pos, 1)
    delta = (nll_cand - nll_ref) / n
    return {
        "n_prompts": len(prompts), "n_tokens": n_pos,
        "exact_match": exact / max(len(prompts), 1),
        "token_agreement": agree / n,
        # With no decisive position at all, fall back to every position rather than pass vacuously.
        "decisive_agreement": agree_decisive / n_decisive if n_decisive else agree / n,
        "n_decisive": n_decisive, "tie_margin": tie_margin,
        "nll_reference": nll_ref / n, "nll_candidate": nll_cand / n,
        "nll_delta": delta, "ppl_ratio": math.exp(delta),
        "max_abs_logprob_delta": max_delta, "kl_mean": kl / n,
        "per_prompt": per_prompt,
    }


def tokenizer_parity(candidate: LlamaCppLM, texts: Sequence[str],
                     expected: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Share of texts llama.cpp tokenizes exactly as the served (HF) tokenizer does."""
    mismatches = [i for i, (t, e) in enumerate(zip(texts, expected, strict=True))
                  if candidate.tokenize(t) != list(e)]
    return {"tokenizer_agreement": 1 - len(mismatches) / max(len(texts), 1),
            "tokenizer_mismatches": mismatches}


# --- the gate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Limits beyond which an export fails. Merged exports must match greedily (no quantization
    happened); GGUF exports get these limits. Defaults are calibrated in BENCHMARKS.md."""

    # Teacher-forced greedy agreement, counted where the served version's top-1 leads its
    # top-2 by at least tie_margin nats (0 = every position).
    min_token_agreement: float = 0.95
    tie_margin: float = 0.05
    max_nll_delta: float = 0.02  # nats per token, absolute
    min_exact_match: float | None = None  # free-running greedy; None = not gated
    min_tokenizer_agreement: float = 1.0
    merged_exact: bool = True


def judge(metrics: dict[str, Any], tol: Tolerance, fmt: str) -> list[str]:
    """One sentence per failed criterion (empty = passed)."""
    if metrics["n_tokens"] == 0:
        return ["no held-out or golden prompts to compare on: the consistency gate cannot run"]
    reasons = []
    if fmt == "merged" and tol.merged_exact and metrics["exact_match"] < 1.0:
        reasons.append(f"merged model's greedy output differs from the served version on "
                       f"{1 - metrics['exact_match']:.0%} of prompts")
    agreement = metrics["decisive_agreement"]
    if agreement < tol.min_token_agreement:
        reasons.append(f"greedy token agreement {agreement:.3f} (on {metrics['n_decisive']} of "
                       f"{metrics['n_tokens']} positions where the served version leads by "
                       f">= {metrics['tie_margin']:g} nats; {metrics['token_agreement']:.3f} on "
                       f"all) is below {tol.min_token_agreement:.3f}")
    if abs(metrics["nll_delta"]) > tol.max_nll_delta:
        reasons.append(f"per-token NLL delta {metrics['nll_delta']:+.4f} nats (perplexity x"
                       f"{metrics['ppl_ratio']:.3f}) exceeds ±{tol.max_nll_delta:.4f}")
    if tol.min_exact_match is not None and metrics["exact_match"] < tol.min_exact_match:
        reasons.append(f"exact greedy match {metrics['exact_match']:.2f} is below "
                       f"{tol.min_exact_match:.2f}")
    tok = metrics.get("tokenizer_agreement")
    if tok is not None and tok < tol.min_tokenizer_agreement:
        reasons.append(f"llama.cpp tokenizes {1 - tok:.0%} of prompts differently from the "
                       "served tokenizer")
    return reasons


def less_aggressive(quant: str) -> str | None:
    """The next quantization up FALLBACK_ORDER, or None at f16."""
    i = FALLBACK_ORDER.index(quant)
    return FALLBACK_ORDER[i + 1] if i + 1 < len(FALLBACK_ORDER) else None


@dataclass
class Attempt:
    format: str
    quant: str | None
    status: str  # "passed" | "failed" (outside tolerance) | "error" (could not build or run)
    path: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    export_seconds: float | None = None
    gate_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)  # of the artifact's directory


@dataclass
class ExportOutcome:
    status: str  # "succeeded" | "failed"
    attempts: list[Attempt]
    merged: Attempt | None
    suggestion: str | None = None  # a less aggressive quant, when the last one failed
    failure_reason: str | None = None

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_export(base_dir: str | Path, adapter_dir: str | Path, out_root: str | Path, *,
               fmt: str, quant: str | None, prompts: Sequence[Prompt],
               tolerance: Tolerance = Tolerance(), fallback: bool = False,
               max_new_tokens: int = 16, lineage: dict[str, Any] | None = None,
               progress: Progress = _no_progress) -> ExportOutcome:
    """Merge, optionally convert to GGUF, and gate every artifact against the served version.

    Writes ``out_root/merged`` and ``out_root/gguf-<quant>`` per attempt. On a failed GGUF gate
    the next less aggressive quantization is suggested, and tried when ``fallback`` is true.
    """
    if fmt not in ("merged", "gguf"):
        raise ValueError(f"unknown export format {fmt!r}")
    if fmt == "gguf" and quant not in QUANTS:
        raise ValueError(f"gguf export needs a quantization among {', '.join(QUANTS)}")
    out_root = Path(out_root)
    served = Memo(load_served(base_dir, adapter_dir))
    ids = encode_prompts(base_dir, prompts)
    merged = merge_adapter(base_dir, adapter_dir, out_root / "merged", lineage=lineage,
                           progress=_sub(progress, "merge"))
    progress("merge: gate", 0.0)
    merged_attempt = _gate_merged(served, merged, ids, tolerance, max_new_tokens)
    if fmt == "merged" or merged_attempt.status != "passed":
        return _outcome([merged_attempt], merged_attempt, None)
    texts = render_prompts(base_dir, prompts)
    attempts: list[Attempt] = []
    while quant is not None:
        attempt = _gguf_attempt(served, merged, out_root / f"gguf-{quant}", quant, ids, texts,
                                tolerance, max_new_tokens, _sub(progress, f"gguf {quant}"))
        attempts.append(attempt)
        nxt = less_aggressive(quant) if attempt.status == "failed" else None
        if attempt.status == "passed" or not fallback:
            return _outcome(attempts, merged_attempt, nxt)
        quant = nxt
    return _outcome(attempts, merged_attempt, None)


def _sub(progress: Progress, stage: str) -> Progress:
    return lambda detail, frac: progress(f"{stage}: {detail}", frac)


def _gate_merged(served: Memo, merged: MergedResult, ids: list[list[int]], tol: Tolerance,
                 max_new_tokens: int) -> Attempt:
    t0 = time.perf_counter()
    metrics = consistency(served, load_merged(merged.path), ids, max_new_tokens=max_new_tokens,
                          tie_margin=tol.tie_margin)
    reasons = judge(metrics, tol, "merged")
    return Attempt("merged", None, "failed" if reasons else "passed", str(merged.path),
                   merged.sha256, merged.bytes, merged.seconds, time.perf_counter() - t0,
                   metrics, reasons, merged.files)


def _gguf_attempt(served: Memo, merged: MergedResult, out_dir: Path, quant: str,
                  ids: list[list[int]], texts: list[str], tol: Tolerance, max_new_tokens: int,
                  progress: Progress) -> Attempt:
    try:
        result = export_gguf(merged, out_dir, quant, progress=progress)
    except Exception as exc:  # noqa: BLE001 - recorded on the attempt, the job decides
        return Attempt("gguf", quant, "error", reasons=[f"conversion failed: {exc}"])
    attempt = Attempt("gguf", quant, "failed", str(result.gguf_path), result.sha256,
                      result.bytes, result.seconds, files=result.files)
    if not llama_cpp_available():
        # Not a quality verdict, so no less aggressive quantization is suggested.
        attempt.status = "error"
        attempt.reasons = ["llama-cpp-python is not installed: the GGUF cannot be gated"]
        return attempt
    t0 = time.perf_counter()
    progress("gate", 0.0)
    try:
        metrics = gguf_consistency(served, result.gguf_path, ids, texts,
                                   max_new_tokens=max_new_tokens, tie_margin=tol.tie_margin)
    except Exception as exc:  # noqa: BLE001 - a GGUF llama.cpp cannot run is a failed export
        attempt.status, attempt.reasons = "error", [f"llama.cpp could not run the GGUF: {exc}"]
        return attempt
    metrics["tensor_types"] = result.tensor_types
    attempt.metrics, attempt.gate_seconds = metrics, time.perf_counter() - t0
    attempt.reasons = judge(metrics, tol, "gguf")
    attempt.status = "failed" if attempt.reasons else "passed"
    return attempt


def gguf_consistency(served: LanguageModel, path: str | Path, ids: list[list[int]],
                     texts: list[str], *, max_new_tokens: int, tie_margin: float
                     ) -> dict[str, Any]:
    """:func:`consistency` of a GGUF run through llama.cpp's bindings against the served version,
    plus :func:`tokenizer_parity` on the rendered prompts."""
    lm = LlamaCppLM.load(path, n_ctx=_ctx_for(ids, max_new_tokens), stop_ids=served.stop_ids)
    try:
        metrics = consistency(served, lm, ids, max_new_tokens=max_new_tokens,
                              tie_margin=tie_margin)
        metrics.update(tokenizer_parity(lm, texts, ids))
    finally:
        lm.close()
    return metrics


def _ctx_for(ids: list[list[int]], max_new_tokens: int) -> int:
    return max(64, max((len(i) for i in ids), default=0) + max_new_tokens + 8)


def _outcome(attempts: list[Attempt], merged: Attempt, suggestion: str | None) -> ExportOutcome:
    final = attempts[-1]
    if final.status == "passed":
        return ExportOutcome("succeeded", attempts, merged)
    reason = f"{final.format}{'/' + final.quant if final.quant else ''}: " + "; ".join(final.reasons)
    if suggestion:
        reason += f" (try quant {suggestion}, less aggressive)"
    return ExportOutcome("failed", attempts, merged, suggestion, reason)
