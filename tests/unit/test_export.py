"""workers.export on the tiny model with a random LoRA: merged export, GGUF, Modelfile, the gate.

The merged model must reproduce the served version (base + unmerged LoRA, which is what vLLM
serves) greedily and exactly. GGUF files are written by llama.cpp's own convert_hf_to_gguf.py
(fetched into ~/.cache/flywheel/llama-convert by scripts/bootstrap.sh, or on first use), checked
at file level always, and through llama.cpp's Python bindings when llama-cpp-python is installed
(those tests skip otherwise). The tiny model's newly trained vocabulary is unknown to llama.cpp's
pre-tokenizer table; its tokenizer.json declares GPT-2's byte-level pre-tokenization, which is
what the export writes (see workers.export.converter._CONVERT_SHIM) and what the gate's parity
check tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from service.engine.artifact import file_sha256
from service.models.weights import cached_weights_sha256, weights_sha256
from workers.export.build import FALLBACK_ORDER, less_aggressive, run_export
from workers.export.consistency import Tolerance, consistency, gguf_consistency, judge
from workers.export.converter import LLAMA_CPP_VERSION, convert_hf_to_gguf, ensure_converter, extract_converter
from workers.export.engines import Memo, TorchLM, encode_prompts, load_merged, load_served, render_prompts
from workers.export.gguf_writer import (
    CONVERTER_QUANTS,
    GGUF_FILE,
    QUANTIZER_QUANTS,
    QUANTS,
    GgufResult,
    export_gguf,
    llama_cpp_available,
    to_gguf,
)
from workers.export.identity import LINEAGE_FILE, export_sha256, file_manifest, manifest_sha256
from workers.export.merge import MergedResult, merge_adapter
from workers.export.modelfile import MODELFILE, turn_format, write_modelfile

QUESTIONS = ["What colour is the car?", "Where is Paris?", "My order is late.",
             "What is two plus three?", "Tell me about the weather in Oslo."]
MAX_NEW = 16


def _prompts(tok) -> list:
    # Golden prompts arrive as messages; held-out ones as already-rendered text: cover both.
    golden = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    heldout = [tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": q}],
                                       tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS[3:]]
    return golden + heldout


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    from tests.helpers.vllm import make_random_lora

    return make_random_lora(tiny_model, tmp_path_factory.mktemp("lora") / "adapter", seed=3)


@pytest.fixture(scope="module")
def merged(tiny_model, adapter, tmp_path_factory) -> MergedResult:
    out = tmp_path_factory.mktemp("export") / "merged"
    return merge_adapter(tiny_model, adapter, out, lineage={"alias": "demo", "version": 3})


@pytest.fixture(scope="module")
def served(tiny_model, adapter) -> Memo:
    return Memo(load_served(tiny_model, adapter))


@pytest.fixture(scope="module")
def prompt_ids(tiny_model, tokenizer) -> list[list[int]]:
    return encode_prompts(tiny_model, _prompts(tokenizer))


@pytest.fixture(scope="module")
def ggufs(merged, tmp_path_factory) -> dict[str, GgufResult]:
    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(merged, root / q, q) for q in ("f16", "q8_0", "tq2_0")}


# --- merged -----------------------------------------------------------------------------------


def test_merged_reproduces_served_greedy_exactly(served, merged, prompt_ids):
    metrics = consistency(served, load_merged(merged.path), prompt_ids,
                             max_new_tokens=MAX_NEW)
    assert metrics["exact_match"] == 1.0
    assert metrics["token_agreement"] == 1.0
    assert abs(metrics["nll_delta"]) < 1e-5
    assert judge(metrics, Tolerance(), "merged") == []
    # Non-vacuous: the LoRA changes the outputs, so matching the base would not pass.
    assert all(p["reference"] for p in metrics["per_prompt"])


def test_gate_would_catch_a_merge_that_dropped_the_adapter(served, tiny_model, prompt_ids):
    base_only = TorchLM(load_merged(tiny_model).model, served.stop_ids)
    metrics = consistency(served, base_only, prompt_ids, max_new_tokens=MAX_NEW)
    reasons = judge(metrics, Tolerance(), "merged")
    assert metrics["exact_match"] < 1.0 and reasons
    assert any("greedy output differs" in r for r in reasons)


def test_merged_export_is_a_standalone_hashed_artifact(tiny_model, adapter, merged):
    from service.engine.artifact import artifact_sha256

    files = {p.name for p in merged.path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", LINEAGE_FILE} <= files
    assert not any(n.startswith("adapter_") for n in files)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert file_sha256(merged.path / name) == file_sha256(tiny_model / name)
    lineage = json.loads((merged.path / LINEAGE_FILE).read_text())
    assert lineage["sha256"] == merged.sha256 == export_sha256(merged.path)
    assert lineage["adapter"]["sha256"] == artifact_sha256(adapter)
    assert lineage["base"]["weights_sha256"] == weights_sha256(tiny_model)
    assert (lineage["alias"], lineage["version"], lineage["format"]) == ("demo", 3, "merged")


def test_export_sha256_covers_every_file_but_lineage(merged, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(merged.path, copy)
    (copy / LINEAGE_FILE).write_text("{}")
    assert export_sha256(copy) == merged.sha256
    with open(copy / "tokenizer_config.json", "a") as fh:
        fh.write(" ")
    assert export_sha256(copy) != merged.sha256


# --- GGUF at file level -----------------------------------------------------------------------


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_carries_hparams_tokenizer_and_lineage(ggufs, merged, tokenizer):
    r = _reader(ggufs["q8_0"].gguf_path)
    cfg = json.loads((merged.path / "config.json").read_text())
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == cfg["num_hidden_layers"]
    assert _field(r, "llama.embedding_length") == cfg["hidden_size"]
    assert _field(r, "llama.feed_forward_length") == cfg["intermediate_size"]
    assert _field(r, "llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(r, "llama.context_length") == cfg["max_position_embeddings"]
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert _field(r, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(r, "tokenizer.chat_template") == tokenizer.chat_template
    # Provenance travels inside the file too (the converter's --metadata override).
    assert _field(r, "general.name") == "demo-v3" and _field(r, "general.version") == "v3"
    description = _field(r, "general.description")
    assert merged.sha256 in description and merged.adapter_sha256 in description
    assert ggufs["q8_0"].tensor_types == {"Q8_0": 16, "F32": 5}


def test_gguf_weights_roundtrip_within_quantization_error(ggufs, merged):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf = load_file(merged.path / "model.safetensors")
    cfg = json.loads((merged.path / "config.json").read_text())
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    n_head = cfg["num_attention_heads"]
    # llama.cpp stores q/k with the original (interleaved) rotary layout, not HF's.
    want = (q.reshape(n_head, 2, q.shape[0] // n_head // 2, q.shape[1]).swapaxes(1, 2)
            .reshape(q.shape))
    errors = {}
    for quant in ("f16", "q8_0", "tq2_0"):
        t = next(t for t in _reader(ggufs[quant].gguf_path).tensors
                 if t.name == "blk.0.attn_q.weight")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        errors[quant] = float(np.abs(got - want).mean() / np.abs(want).mean())
    assert errors["f16"] < 1e-3 < errors["q8_0"] < 2e-2 < errors["tq2_0"]


def test_export_dir_has_modelfile_and_lineage(ggufs, merged):
    res = ggufs["f16"]
    assert sorted(p.name for p in res.path.iterdir()) == [MODELFILE, LINEAGE_FILE,
                                                           GGUF_FILE]
    lineage = json.loads((res.path / LINEAGE_FILE).read_text())
    assert lineage["gguf_sha256"] == file_sha256(res.gguf_path) == res.gguf_sha256
    assert lineage["sha256"] == export_sha256(res.path)
    assert lineage["parent"] == {"format": "merged", "sha256": merged.sha256}
    assert lineage["quant"] == "f16" and lineage["adapter"]["sha256"]
    assert ggufs["q8_0"].bytes < ggufs["f16"].bytes * 0.6


def test_gate_refuses_to_pass_without_prompts(served, merged):
    metrics = consistency(served, load_merged(merged.path), [], max_new_tokens=MAX_NEW)
    assert judge(metrics, Tolerance(), "merged") == [
        "no held-out or golden prompts to compare on: the consistency gate cannot run"]


def test_unknown_quant_is_refused(merged, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization"):
        to_gguf(merged.path, tmp_path / "x.gguf", "q3_xx")


# --- llama.cpp's converter ----------------------------------------------------------------------


def test_every_quant_has_one_producer():
    assert set(CONVERTER_QUANTS) | set(QUANTIZER_QUANTS) == set(QUANTS)
    assert not set(CONVERTER_QUANTS) & set(QUANTIZER_QUANTS)
    assert set(QUANTIZER_QUANTS) == {"q4_k_m", "q4_0", "q2_k"}


def _fake_sdist(path: Path, *, conversion: bool = True) -> Path:
    import io
    import tarfile

    top = f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    files = {f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": b"# converter\n",
             f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"# vendored gguf\n",
             f"{top}/vendor/llama.cpp/convert_lora_to_gguf.py": b"# not needed\n",
             f"{top}/vendor/llama.cpp/src/llama.cpp": b"// not needed\n",
             f"{top}/llama_cpp/__init__.py": b"# not needed\n"}
    if conversion:
        files[f"{top}/vendor/llama.cpp/conversion/__init__.py"] = b"# models\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/vendor/llama.cpp/gguf-py/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_extract_converter_takes_only_the_converter_gguf_py_and_conversion(tmp_path):
    out = extract_converter(_fake_sdist(tmp_path / "s.tar.gz"), tmp_path / "tree")
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    assert got == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    # An older llama.cpp without conversion/ still extracts; one without the script does not.
    out = extract_converter(_fake_sdist(tmp_path / "old.tar.gz", conversion=False),
                               tmp_path / "old")
    assert not (out / "conversion").exists() and (out / "convert_hf_to_gguf.py").is_file()
    import tarfile

    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    with pytest.raises(RuntimeError, match="no vendor/llama.cpp/convert_hf_to_gguf.py"):
        extract_converter(tmp_path / "empty.tar.gz", tmp_path / "none")


def test_ensure_converter_fetches_once_into_place(tmp_path, monkeypatch):
    calls = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True)
        return _fake_sdist(dest / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz")

    monkeypatch.setattr("workers.export.converter._download_sdist", download)
    root = tmp_path / "llama-convert" / LLAMA_CPP_VERSION
    root.mkdir(parents=True)
    (root / "stale").write_text("an interrupted earlier fetch")  # no script: replaced
    assert ensure_converter(root) == root and len(calls) == 1
    assert (root / "convert_hf_to_gguf.py").is_file() and not (root / "stale").exists()
    assert ensure_converter(root) == root and len(calls) == 1  # present: nothing fetched
    leftovers = [p.name for p in root.parent.iterdir() if p.name != root.name]
    assert all(name.endswith(".lock") for name in leftovers), leftovers


def test_converter_failure_names_its_reason(merged, tmp_path):
    # A newly trained vocabulary whose tokenizer.json does not declare plain GPT-2
    # pre-tokenization (here: a normalizer) is refused by llama.cpp's converter, and the
    # export says why in the converter's own words.
    model = tmp_path / "model"
    shutil.copytree(merged.path, model)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "NFC"}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RuntimeError, match="BPE pre-tokenizer was not recognized") as err:
        convert_hf_to_gguf(model, tmp_path / "x.gguf", "f16")
    assert "convert_hf_to_gguf.py failed (exit 1)" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_converter_timeout_is_an_error(merged, tmp_path):
    with pytest.raises(RuntimeError, match=r"did not finish in 0\.5 s"):
        convert_hf_to_gguf(merged.path, tmp_path / "x.gguf", "f16", timeout_s=0.5)
    assert not (tmp_path / "x.gguf").exists()


# --- Ollama Modelfile -------------------------------------------------------------------------


def test_modelfile_template_renders_like_the_chat_template(tokenizer, tiny_model):
    cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    fmt = turn_format(tokenizer.chat_template, cfg)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    hf = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert fmt.bos == tokenizer.bos_token
    assert fmt.bos + fmt.render(msgs, True) == hf

    text = write_modelfile("./model.gguf", tokenizer.chat_template, cfg)
    assert text.startswith("FROM ./model.gguf\n")
    assert 'eq .Role "user" }}<|user|>\n{{ .Content }}</s>\n{{ else if' in text
    assert text.count('TEMPLATE """') == 1 and "<s>" not in text  # llama.cpp adds the bos
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "<|user|>"' in text


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var msgs []Message
	if err := json.Unmarshal([]byte(os.Args[2]), &msgs); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(os.Args[1]))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain")
def test_modelfile_template_executes_in_go_like_the_chat_template(ggufs, tokenizer, tmp_path):
    # Ollama renders TEMPLATE with Go's text/template over .Messages; run the real thing.
    import re
    import subprocess

    tpl = re.search(r'TEMPLATE """(.*?)"""', (ggufs["f16"].path / MODELFILE).read_text(),
                    re.S).group(1)
    (tmp_path / "main.go").write_text(GO_RENDER)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(tmp_path / "gocache")}
    out = subprocess.run(["go", "run", "main.go", tpl, json.dumps(msgs)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    hf = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token + out == hf


def test_untranslatable_chat_template_is_refused():
    first_only = ("{% for m in messages %}{% if loop.first %}[FIRST]{% endif %}"
                  "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError):
        turn_format(first_only, {})
    text = write_modelfile("./model.gguf", first_only, {"eos_token": "</s>"})
    assert "TEMPLATE" not in text and "# chat template not translated" in text
    assert 'PARAMETER stop "</s>"' in text


# --- the gate through llama.cpp ---------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama-cpp-python is not installed")


def _gguf_metrics(served, result, prompt_ids, texts):
    return gguf_consistency(served, result.gguf_path, prompt_ids, texts,
                               max_new_tokens=MAX_NEW, tie_margin=Tolerance().tie_margin)


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_passes_the_gate_in_llama_cpp(quant, served, ggufs, prompt_ids, tiny_model,
                                           tokenizer):
    texts = render_prompts(tiny_model, _prompts(tokenizer))
    metrics = _gguf_metrics(served, ggufs[quant], prompt_ids, texts)
    assert metrics["tokenizer_agreement"] == 1.0
    assert judge(metrics, Tolerance(), "gguf") == [], metrics


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_loads_and_generates_in_llama_cpp(quant, ggufs):
    from llama_cpp import Llama

    llm = Llama(model_path=str(ggufs[quant].gguf_path), n_ctx=128, n_threads=2, seed=0,
                verbose=False)
    try:
        # The chat path renders the GGUF's own chat template (jinja) and tokenizes in llama.cpp.
        out = llm.create_chat_completion([{"role": "user", "content": "Where is Paris?"}],
                                         max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] > 0
    assert isinstance(out["choices"][0]["message"]["content"], str)


@needs_llama_cpp
def test_too_aggressive_quantization_fails_the_gate_with_numbers(served, ggufs, prompt_ids,
                                                                 tiny_model, tokenizer):
    texts = render_prompts(tiny_model, _prompts(tokenizer))
    metrics = _gguf_metrics(served, ggufs["tq2_0"], prompt_ids, texts)
    reasons = judge(metrics, Tolerance(), "gguf")
    assert reasons
    assert any("token agreement" in r and f"{metrics['decisive_agreement']:.3f}" in r
               for r in reasons)
    assert any("NLL delta" in r and f"{metrics['nll_delta']:+.4f}" in r for r in reasons)
    assert less_aggressive("tq2_0") == "q2_k"


@needs_llama_cpp
def test_run_export_fails_then_falls_back_to_a_passing_quant(tiny_model, adapter, tokenizer,
                                                            tmp_path):
    events = []
    outcome = run_export(tiny_model, adapter, tmp_path, fmt="gguf", quant="tq2_0",
                            prompts=_prompts(tokenizer)[:3], fallback=True,
                            max_new_tokens=8, progress=lambda s, f: events.append(s))
    quants = [a.quant for a in outcome.attempts]
    assert quants[0] == "tq2_0" and outcome.attempts[0].status == "failed"
    assert outcome.attempts[0].reasons and outcome.attempts[0].metrics["decisive_agreement"] < 0.95
    assert outcome.status == "succeeded" and outcome.final.status == "passed"
    assert outcome.merged.status == "passed" and outcome.merged.metrics["exact_match"] == 1.0
    assert quants == list(FALLBACK_ORDER[: len(quants)])
    assert Path(outcome.final.path).is_file() and events


@needs_llama_cpp
def test_run_export_without_fallback_suggests_a_less_aggressive_quant(tiny_model, adapter,
                                                                     tokenizer, tmp_path):
    outcome = run_export(tiny_model, adapter, tmp_path, fmt="gguf", quant="tq2_0",
                            prompts=_prompts(tokenizer)[:2], max_new_tokens=8)
    assert outcome.status == "failed" and len(outcome.attempts) == 1
    assert outcome.suggestion == "q2_k"
    assert "tq2_0" in outcome.failure_reason and "try quant q2_k" in outcome.failure_reason


def test_without_llama_cpp_the_gguf_is_an_error_not_a_quality_failure(tiny_model, adapter,
                                                                      tokenizer, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr("workers.export.build.llama_cpp_available", lambda: False)
    outcome = run_export(tiny_model, adapter, tmp_path, fmt="gguf", quant="q8_0",
                            prompts=_prompts(tokenizer)[:1], fallback=True, max_new_tokens=4)
    assert outcome.status == "failed" and outcome.suggestion is None
    assert [a.status for a in outcome.attempts] == ["error"]
    assert "llama-cpp-python is not installed" in outcome.failure_reason
    assert Path(outcome.final.path).is_file()  # the file itself was written and hashed


def test_base_weights_hash_is_cached_until_a_file_changes(tmp_path):
    import hashlib

    (tmp_path / "model.safetensors").write_bytes(b"one")
    first = cached_weights_sha256(tmp_path)
    assert first == hashlib.sha256(b"one").hexdigest()
    assert cached_weights_sha256(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"other")  # new size and mtime: hashed again
    assert cached_weights_sha256(tmp_path) == hashlib.sha256(b"other").hexdigest()


def test_results_carry_the_manifest_they_were_sealed_with(merged, ggufs):
    """Each file is hashed once, when the export is sealed; the manifest matches the disk."""
    for result in (merged, ggufs["q8_0"]):
        assert result.files == file_manifest(result.path)
        assert manifest_sha256(result.files) == result.sha256 == export_sha256(result.path)
        assert "lineage.json" in {f["name"] for f in result.files}
    gguf = next(f for f in ggufs["q8_0"].files if f["name"] == "model.gguf")
    assert gguf["sha256"] == ggufs["q8_0"].gguf_sha256 == file_sha256(ggufs["q8_0"].gguf_path)
