"""vLLM CPU serving with a LoRA version vs the base alone, same engine, same run.

    python -m bench.bench_serving [--model smollm2] [--rounds 3] [--max-tokens 64] [--threads N]

One managed engine (as `flywheel up` starts it) serves the base model and one LoRA loaded at
runtime (r=16 on q,k,v,o,gate,up,down, as the demo trains; random weights: speed does not
depend on their values). For each concurrency, requests go to the base and to the adapter in
alternating rounds (so drift in machine load hits both), with ignore_eos so every answer has
exactly --max-tokens tokens. Output tokens per second of wall time; the median round is kept.
vLLM's published GPU figure for LoRA serving is about -34% throughput (vllm PR #11267); this
measures the CPU build on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench._stack import bench_model, save
from service.engine.managed import ManagedVllm
from service.local.embedded import free_port

PROMPTS = ["My order is late.", "How do I reset my password?", "Where is my parcel?",
           "My invoice was charged twice.", "What is the capital of France?", "Say hello."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(model: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                           task_type="CAUSAL_LM", init_lora_weights=False))
    peft.save_pretrained(out, safe_serialization=True)
    return out


def tokens_per_s(url: str, model: str, concurrency: int, max_tokens: int) -> float:
    def one(i: int) -> int:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(2 * concurrency)))
    return tokens / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", help="tiny, smollm2 or a model directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=0,
                        help="engine compute threads (0: all cores but one, as flywheel up)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model = bench_model(args.model)
    root = Path(tempfile.mkdtemp(prefix="fwbench-serving-"))
    lora = make_lora(model, root / "lora")
    engine = ManagedVllm(model, free_port(), log_path=root / "vllm.log", max_model_len=2048,
                         cpu_threads=args.threads or None, dtype=args.dtype)
    result = {"model": args.model, "max_tokens": args.max_tokens, "threads": engine.cpu_threads,
              "dtype": args.dtype, "rows": []}
    with engine:
        r = httpx.post(f"{engine.url}/v1/load_lora_adapter", timeout=120,
                       json={"lora_name": "bench-lora", "lora_path": str(lora)})
        r.raise_for_status()
        tokens_per_s(engine.url, "bench-lora", 2, 8)  # warm-up, both paths
        tokens_per_s(engine.url, "base", 2, 8)
        for conc in args.concurrency:
            base, adapter = [], []
            for _ in range(args.rounds):
                base.append(tokens_per_s(engine.url, "base", conc, args.max_tokens))
                adapter.append(tokens_per_s(engine.url, "bench-lora", conc, args.max_tokens))
            b, a = statistics.median(base), statistics.median(adapter)
            result["rows"].append({"concurrency": conc, "base_tok_s": round(b, 1),
                                   "lora_tok_s": round(a, 1), "lora_vs_base": round(a / b - 1, 3),
                                   "base_rounds": [round(x, 1) for x in base],
                                   "lora_rounds": [round(x, 1) for x in adapter]})
    print("| concurrency | base (tokens/s) | with LoRA (tokens/s) | LoRA vs base |\n|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['concurrency']} | {row['base_tok_s']} | {row['lora_tok_s']} | "
              f"{row['lora_vs_base']:+.0%} |")
    print(f"saved {save('serving', result)}")


if __name__ == "__main__":
    main()
