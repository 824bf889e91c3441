"""Gateway overhead: chat completions through Flywheel vs straight to vLLM, same load, same run.

Run:  python -m bench.bench_gateway [--seconds 15] [--concurrency 8] [--max-tokens 8]
Needs wrk (apt-get install -y wrk). Both sides get identical request bodies at the same
concurrency against the same vLLM (CPU build, tiny model); the gateway side also authenticates,
resolves the alias and stores every interaction in Postgres.
"""

from __future__ import annotations

import argparse

from bench._stack import BenchStack, save
from bench._wrk import require_wrk, run_wrk
from service.db import repositories as repo
from service.db.session import session_scope


def bodies(model: str, max_tokens: int) -> list[dict]:
    prompts = ["How do I reset my password?", "What is the weather like?", "Say hello.",
               "Count to three.", "What colour is the sky?", "Where is my order?"]
    return [{"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True} for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a model directory")
    args = parser.parse_args()
    require_wrk()
    with BenchStack(with_vllm=True, model=args.model) as stack:
        key, _ = stack.key("bench")
        with session_scope(stack.sessions) as s:
            repo.ensure_adapter(s, "bench", "bot")
        common = {"path": "/v1/chat/completions", "connections": args.concurrency}
        direct_bodies = bodies("base", args.max_tokens)
        gw_bodies = bodies("bot", args.max_tokens)
        auth = {"Authorization": f"Bearer {key}"}
        run_wrk(stack.vllm.url, bodies=direct_bodies, headers={}, seconds=3, **common)  # warm-up
        run_wrk(stack.api.url, bodies=gw_bodies, headers=auth, seconds=3, **common)
        # Interleave the two sides so drift in machine load hits both equally.
        direct, gateway = [], []
        for _ in range(2):
            direct.append(run_wrk(stack.vllm.url, bodies=direct_bodies, headers={},
                                  seconds=args.seconds // 2, **common))
            gateway.append(run_wrk(stack.api.url, bodies=gw_bodies, headers=auth,
                                   seconds=args.seconds // 2, **common))
    d, g = _mean(direct), _mean(gateway)
    if not d["throughput_rps"] or not g["throughput_rps"]:
        raise SystemExit(f"no request completed (direct {d}, gateway {g}): raise --seconds or "
                         "lower --concurrency for this model")
    result = {"model": args.model, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "direct_vllm": d,
              "gateway": g, "throughput_ratio": round(g["throughput_rps"] / d["throughput_rps"], 3),
              "added_p50_ms": round(g["p50_ms"] - d["p50_ms"], 2)}
    print("| | throughput (req/s) | p50 (ms) | p99 (ms) | failed |\n|---|---|---|---|---|")
    for name, r in (("vLLM direct", d), ("through Flywheel", g)):
        print(f"| {name} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['non_2xx'] + r['socket_errors']} |")
    print(f"throughput ratio {result['throughput_ratio']}, added p50 {result['added_p50_ms']} ms; "
          f"saved {save('gateway', result)}")


def _mean(runs: list[dict]) -> dict:
    keys = ("throughput_rps", "p50_ms", "p99_ms")
    out = {k: round(sum(r[k] for r in runs) / len(runs), 2) for k in keys}
    out["non_2xx"] = sum(r["non_2xx"] for r in runs)
    out["socket_errors"] = sum(r["socket_errors"] for r in runs)
    return out


if __name__ == "__main__":
    main()
