"""Base models: the checks before anything starts, and preparation that is atomic, idempotent
and pinned by sha256. The conversion itself is faked here (it is a neighbour: transformers); the
real SmolLM2 preparation runs in tests/integration/test_smollm2.py."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from service.config import Settings
from service.models import prepare as prep
from service.models.inspect import PROVENANCE_FILE, ModelError, inspect_model_dir
from service.models.resolve import context_len, ensure_base_model, looks_like_hub_id, resolved_path


@pytest.fixture()
def model_dir(tiny_model, tmp_path) -> Path:
    """A writable copy of the tiny model (a complete Llama chat model directory)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_a_complete_chat_model_directory_passes_and_reports_its_context(model_dir):
    info = inspect_model_dir(model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_positions == json.loads((model_dir / "config.json").read_text())[
        "max_position_embeddings"]
    assert info.context_len(64) == 64 and info.context_len(10**6) == info.max_positions


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: [p.unlink() for p in d.glob("*.safetensors")], r"no \*\.safetensors weights"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer"),
    (lambda d: _edit_config(d, architectures=["BertForMaskedLM"]),
     "architecture 'BertForMaskedLM' is not supported"),
    (lambda d: _drop_template(d), "has no chat template"),
    (lambda d: ([p.rename(p.with_suffix(".bin")) for p in d.glob("*.safetensors")]),
     "only pickled weights"),
])
def test_a_model_that_cannot_be_served_or_trained_is_refused_with_the_reason(model_dir, breakage,
                                                                             message):
    breakage(model_dir)
    with pytest.raises(ModelError, match=message):
        inspect_model_dir(model_dir)


def test_a_sharded_model_with_a_missing_shard_is_incomplete(model_dir):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match="missing: model-00001-of-00002"):
        inspect_model_dir(model_dir)


def test_a_missing_directory_is_named():
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model_dir("/nonexistent/model")


def _edit_config(d: Path, **fields) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **fields}))


def _drop_template(d: Path) -> None:
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc = d / "tokenizer_config.json"
    if tc.exists():
        cfg = json.loads(tc.read_text())
        cfg.pop("chat_template", None)
        tc.write_text(json.dumps(cfg))


def test_the_configured_model_resolves_without_touching_disk(tmp_path):
    cache = tmp_path / "cache"
    assert resolved_path(None, cache) == str(cache / prep.DEFAULT_MODEL.dirname)
    assert resolved_path("/m/dir", cache) == "/m/dir"
    gguf = resolved_path("/m/x.gguf", cache)
    assert gguf.startswith(str(cache / "gguf-x-")) and gguf != resolved_path("/n/x.gguf", cache)
    assert Settings(model_cache_dir=cache).resolved_base_model == str(
        cache / prep.DEFAULT_MODEL.dirname)
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_hub_id("./local/dir") and not looks_like_hub_id("a/b/c")


def test_context_is_the_models_maximum_capped_by_the_setting(model_dir):
    info = inspect_model_dir(model_dir)
    assert context_len(Settings(vllm_max_model_len=128), info) == 128
    assert context_len(Settings(vllm_max_model_len=10**6), info) == info.max_positions
    assert context_len(Settings(vllm_max_model_len=512), "org/hub-model") == 512


# --- preparation --------------------------------------------------------------------------------


@pytest.fixture()
def fake_package(tmp_path, tiny_model, monkeypatch):
    """A pinned 'GGUF' (any bytes) and a converter that copies the tiny model: what is under test
    is the locking, the atomic publish, the sha256 pin and the provenance."""
    gguf = tmp_path / "pkg" / "Fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    spec = prep.PackagedGguf(name="Fake", package="fake-pkg", version="1.0", member="x/Fake.gguf",
                             sha256=prep.file_sha256(gguf))
    calls = []

    def convert(src: Path, out: Path, step=lambda m: None) -> None:
        calls.append(src)
        time.sleep(0.2)  # long enough for a concurrent preparer to arrive
        shutil.copytree(tiny_model, out, dirs_exist_ok=True)

    monkeypatch.setattr(prep, "convert_gguf", convert)
    monkeypatch.setattr(prep, "_locate_packaged", lambda s, d, step: (gguf, "installed"))
    return spec, gguf, calls


def test_preparation_publishes_a_complete_directory_with_provenance_once(tmp_path, fake_package):
    spec, gguf, calls = fake_package
    target = tmp_path / "cache" / spec.dirname
    # A crashed earlier preparation: a temporary sibling and a target without provenance.
    (tmp_path / "cache" / f".{spec.dirname}.tmp-999").mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")
    steps: list[str] = []
    out = prep.prepare_default(target, downloads=tmp_path / "dl", step=steps.append, spec=spec)
    assert out == target.resolve() and len(calls) == 1
    provenance = json.loads((target / PROVENANCE_FILE).read_text())
    assert provenance["source"] == {"package": "fake-pkg", "version": "1.0", "file": "x/Fake.gguf",
                                    "file_sha256": spec.sha256, "found": "installed"}
    assert provenance["weights_sha256"] == prep.weights_sha256(target)
    assert inspect_model_dir(target).provenance == provenance
    assert not list((tmp_path / "cache").glob(".*.tmp-*")), "temporary directories are cleaned"
    assert any("sha256" in s for s in steps), steps
    # Idempotent: a second call converts nothing.
    prep.prepare_default(target, downloads=tmp_path / "dl", spec=spec)
    assert len(calls) == 1


def test_two_processes_preparing_at_once_convert_once(tmp_path, fake_package):
    spec, _, calls = fake_package
    target = tmp_path / "cache" / spec.dirname
    errors = []

    def go():
        try:
            prep.prepare_default(target, downloads=tmp_path / "dl", spec=spec)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and (target / PROVENANCE_FILE).is_file()


def test_a_gguf_whose_sha256_differs_from_the_pin_is_never_loaded(tmp_path, fake_package):
    spec, gguf, calls = fake_package
    gguf.write_bytes(b"GGUF tampered")
    target = tmp_path / "cache" / spec.dirname
    with pytest.raises(ModelError, match="expected .* refusing"):
        prep.prepare_default(target, downloads=tmp_path / "dl", spec=spec)
    assert calls == [] and not target.exists()


def test_a_failed_conversion_leaves_nothing_that_looks_like_a_model(tmp_path, fake_package,
                                                                    monkeypatch):
    spec, _, _ = fake_package

    def broken(src, out, step=lambda m: None):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise ModelError("disk full")

    monkeypatch.setattr(prep, "convert_gguf", broken)
    target = tmp_path / "cache" / spec.dirname
    with pytest.raises(ModelError, match="disk full"):
        prep.prepare_default(target, downloads=tmp_path / "dl", spec=spec)
    assert not target.exists() and not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_ensure_names_a_bad_configured_model_before_anything_starts(tmp_path, model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        ensure_base_model(Settings(base_model=str(tmp_path / "missing"), model_cache_dir=tmp_path))
    with pytest.raises(ModelError, match="GGUF file .* does not exist"):
        ensure_base_model(Settings(base_model=str(tmp_path / "x.gguf"), model_cache_dir=tmp_path))
    assert ensure_base_model(Settings(base_model="org/model")) == "org/model"
    assert ensure_base_model(Settings(base_model=str(model_dir))).path == model_dir.resolve()
