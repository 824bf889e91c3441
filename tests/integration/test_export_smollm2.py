"""Edge export of a real chat model: a SmolLM2-135M-Instruct LoRA version to GGUF q8_0 through
``run_export`` (PEFT merge, llama.cpp's own convert_hf_to_gguf.py, the consistency gate against
the served version in llama.cpp's bindings), and llama.cpp's tokenization of the GGUF against the
served (Hugging Face) tokenizer's beyond the gate's prompts.

The LoRA is random with its B scaled down (bench.bench_export.make_small_lora, as BENCHMARKS.md
§6 uses): it moves the model's outputs without wrecking it. Kept light for 2-core CI (one q8_0
export, three prompts x 8 tokens); BENCHMARKS.md §6 has f16, q8_0 and q4_k_m on more prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.bench_export import make_small_lora
from workers.export.build import run_export
from workers.export.consistency import Tolerance
from workers.export.engines import LlamaCppLM, encode_prompts, load_merged, render_prompts
from workers.export.gguf_writer import llama_cpp_available
from workers.export.identity import LINEAGE_FILE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llama_cpp_available(),
                                 reason="llama-cpp-python not built (scripts/bootstrap.sh)")]

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "My order 4471 is late. What can I do?"}],
           [{"role": "user", "content": "Name three colours."}]]
# Beyond the prompts: digits, whitespace runs, code, accents, emoji, and the chat markers.
TEXTS = ["Order 12345 shipped on 2026-12-02 at 09:30, total $1,299.99 (3 items).",
         "  two  spaces,\ttab,\n\nnewlines   and trailing   ",
         "def f(x):\n    return x ** 2  # squared\n",
         "Où est ma commande ? 🚚 Ça fait 3 jours. Größe: XL, naïve café.",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
         "I've been 'told he's there, 'RE you sure? 3.3 3..3 33333333"]


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-export")
    adapter = make_small_lora(smollm2, root / "adapter", seed=0, scale=0.5)
    outcome = run_export(smollm2, adapter, root / "out", fmt="gguf", quant="q8_0",
                            prompts=PROMPTS, max_new_tokens=8,
                            lineage={"alias": "smol", "version": 2})
    return smollm2, adapter, outcome


def test_q8_0_export_of_a_smollm2_lora_passes_the_consistency_gate(exported):
    smollm2, adapter, outcome = exported
    assert outcome.status == "succeeded", outcome.failure_reason
    merged, gguf = outcome.merged, outcome.final
    assert merged.status == "passed" and merged.metrics["exact_match"] == 1.0
    assert (gguf.format, gguf.quant, gguf.status) == ("gguf", "q8_0", "passed")
    m = gguf.metrics
    assert m["tokenizer_agreement"] == 1.0
    assert m["decisive_agreement"] >= Tolerance().min_token_agreement
    assert abs(m["nll_delta"]) <= Tolerance().max_nll_delta
    assert m["tensor_types"]["Q8_0"] == 30 * 7 + 1  # 7 projections x 30 blocks + tied embeddings
    assert m["n_tokens"] >= 3 * 4

    # Non-vacuous: the gate's NLL criterion refuses the base model without the LoRA (an export
    # that lost the adapter), computed as consistency() does: the candidate's per-token NLL of
    # the served version's greedy continuations, minus the served version's own.
    import numpy as np

    base = load_merged(smollm2)
    nll, n = 0.0, 0
    for ids, p in zip(encode_prompts(smollm2, PROMPTS), m["per_prompt"], strict=True):
        cont = p["reference"]
        lp = base.logprobs(ids + cont)[len(ids) - 1:-1]
        nll, n = nll - float(lp[np.arange(len(cont)), cont].sum()), n + len(cont)
    assert nll / n - m["nll_reference"] > Tolerance().max_nll_delta, nll / n - m["nll_reference"]

    # What the converter wrote: llama.cpp's own tokenizer name for SmolLM2 and the lineage.
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(gguf.path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert field("general.name") == "smol-v2"
    assert merged.sha256 in field("general.description")
    lineage = json.loads((Path(gguf.path).parent / LINEAGE_FILE).read_text())
    assert lineage["quant"] == "q8_0" and lineage["parent"]["sha256"] == merged.sha256


def test_llama_cpp_tokenizes_the_gguf_as_the_served_tokenizer_does(exported):
    from transformers import AutoTokenizer

    smollm2, _, outcome = exported
    tok = AutoTokenizer.from_pretrained(smollm2)
    texts = render_prompts(smollm2, PROMPTS) + TEXTS
    lm = LlamaCppLM.load(outcome.final.path, n_ctx=256)
    try:
        got = [lm.tokenize(t) for t in texts]
    finally:
        lm.close()
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert got == want
