"""Edge export (workers.export): time and size per quantization, and the consistency figures.

    /root/.cache/flywheel/venv/bin/python -m bench.bench_export                  # ~1-2 min, 2 cores
    /root/.cache/flywheel/venv/bin/python -m bench.bench_export --pretrain-steps 150

One random LoRA (r=8, q_proj/v_proj, non-zero B) on the tiny model is merged once, then
written as GGUF at every quantization. Each export is compared with the served version (base +
unmerged LoRA under transformers+PEFT, which is what vLLM computes) on the same prompts: golden
style chat prompts and rendered held-out prompts. GGUF files are run through llama.cpp's Python
bindings; without llama-cpp-python, the k-quants and all GGUF figures are reported as missing.

Export time is wall time of writing the artifact (merge, or conversion + quantization + Modelfile
+ hashing), the gate excluded. The random tiny model has flat next-token distributions (small
top-1 margins), so it is a harsh case for greedy agreement; --pretrain-steps builds a model that
emits words (cached beside the default one) for a more realistic margin.

Prints a markdown table and writes bench/results/export-<utc time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from service.tiny_model import build_tiny_model, synthetic_dialogues
from workers import export as ex

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "flywheel"
ORDER = ("f16", "q8_0", "q4_k_m", "q4_0", "q2_k", "tq2_0")


def make_prompts(tokenizer, n: int) -> list:
    """Half golden-style message lists, half rendered held-out prompts with a system turn."""
    questions = [q for q, _ in synthetic_dialogues(n, seed=11)]
    out: list = []
    for i, q in enumerate(questions):
        msgs = [{"role": "user", "content": q}]
        if i % 2:
            msgs.insert(0, {"role": "system", "content": "Answer briefly."})
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append(msgs)
    return out


def _gate_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("exact_match", "token_agreement", "decisive_agreement", "n_decisive", "nll_reference", "nll_candidate", "nll_delta",
            "ppl_ratio", "kl_mean", "max_abs_logprob_delta", "tokenizer_agreement", "n_tokens")
    return {k: metrics[k] for k in keys if k in metrics}


def bench_merged(model_dir: Path, adapter: Path, root: Path, served, ids,
                 max_new: int) -> tuple[ex.MergedResult, dict]:
    merged = ex.merge_adapter(model_dir, adapter, root / "merged")
    t0 = time.perf_counter()
    metrics = ex.consistency(served, ex.load_merged(merged.path), ids, max_new_tokens=max_new,
                             tie_margin=ex.Tolerance().tie_margin)
    reasons = ex.judge(metrics, ex.Tolerance(), "merged")
    row = {"format": "merged", "quant": "fp32", "export_s": merged.seconds,
           "bytes": merged.bytes, "gate_s": time.perf_counter() - t0,
           "passed": not reasons, "reasons": reasons, **_gate_figures(metrics)}
    return merged, row


def bench_gguf(merged: ex.MergedResult, root: Path, quant: str, served, ids, texts,
               max_new: int) -> dict:
    if quant in ex.LLAMA_CPP_QUANTS and not ex.llama_cpp_available():
        return {"format": "gguf", "quant": quant, "skipped": "needs llama-cpp-python"}
    res = ex.export_gguf(merged, root / f"gguf-{quant}", quant)
    row: dict[str, Any] = {"format": "gguf", "quant": quant, "export_s": res.seconds,
                           "bytes": res.bytes, "tensor_types": res.tensor_types}
    if not ex.llama_cpp_available():
        return {**row, "gate": "not run (no llama-cpp-python)"}
    t0 = time.perf_counter()
    metrics = ex.gguf_consistency(served, res.gguf_path, ids, texts, max_new_tokens=max_new,
                                  tie_margin=ex.Tolerance().tie_margin)
    reasons = ex.judge(metrics, ex.Tolerance(), "gguf")
    return {**row, "gate_s": time.perf_counter() - t0, "passed": not reasons,
            "reasons": reasons, **_gate_figures(metrics)}


def bench(model_dir: Path, *, n_prompts: int, seed: int, max_new: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tests.helpers.vllm import make_random_lora

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, n_prompts)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-export-") as tmp:
        root = Path(tmp)
        adapter = make_random_lora(model_dir, root / "adapter", seed=seed)
        served = ex.Memo(ex.load_served(model_dir, adapter))
        ids = ex.encode_prompts(model_dir, prompts)
        texts = ex.render_prompts(model_dir, prompts)
        merged, merged_row = bench_merged(model_dir, adapter, root, served, ids, max_new)
        rows = [merged_row] + [bench_gguf(merged, root, q, served, ids, texts, max_new)
                              for q in ORDER]
    return {"rows": rows, "n_prompts": len(ids), "prompt_tokens": [len(i) for i in ids]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| export | size | export s | gate s | exact match | token agreement (all) | "
             "token agreement (decisive) | NLL delta (nats/tok) | KL mean | tokenizer | "
             "gate (default tolerance) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = f"{r['format']} {r['quant']}"
        if "skipped" in r:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | skipped: {r['skipped']} |")
            continue
        verdict = ("pass" if r.get("passed") else "FAIL") if "passed" in r else r.get("gate", "")

        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "–"

        decisive = (f"{r['decisive_agreement']:.3f} ({r['n_decisive']}/{r['n_tokens']})"
                    if "decisive_agreement" in r else "–")
        lines.append(f"| {name} | {r['bytes'] / 1e6:.2f} MB | {r['export_s']:.2f} | "
                     f"{f('gate_s', '.1f')} | {f('exact_match', '.2f')} | "
                     f"{f('token_agreement', '.3f')} | {decisive} | {f('nll_delta', '+.5f')} | "
                     f"{f('kl_mean', '.2e')} | {f('tokenizer_agreement', '.2f')} | {verdict} |")
    return "\n".join(lines)


def write_result(prefix: str, started: datetime, model: str, ns: argparse.Namespace,
                 payload: dict[str, Any]) -> Path:
    """bench/results/<prefix>-<UTC start>.json: the run's model, arguments and machine, then
    the payload."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {"started_at": started.isoformat(), "model": model,
           "params": {k: str(v) for k, v in vars(ns).items()},
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count()},
           **payload}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}")
    return path


def _versions(names: tuple[str, ...] = ("torch", "transformers", "peft", "gguf",
                                         "llama_cpp_python")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="0 = the shared random tiny model; N builds a pre-trained one")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed")
    ns = parser.parse_args()
    name = "tiny-model-v1" if ns.pretrain_steps == 0 else f"tiny-model-pt{ns.pretrain_steps}"
    model_dir = build_tiny_model(CACHE / name, pretrain_steps=ns.pretrain_steps)
    started = datetime.now(UTC)
    out = bench(model_dir, n_prompts=ns.prompts, seed=ns.seed, max_new=ns.max_new_tokens)
    print(f"\nEdge export on the tiny model ({name}), random LoRA r=8, {out['n_prompts']} prompts x "
          f"{ns.max_new_tokens} greedy tokens, default tolerance {ex.Tolerance()}\n")
    print(markdown(out["rows"]))
    write_result("export", started, name, ns, {"tolerance": vars(ex.Tolerance()),
                                               "library_versions": _versions(), **out})

if __name__ == "__main__":
    main()
