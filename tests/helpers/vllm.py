"""Helpers for tests that talk to a real vLLM server: starting one, adapters, streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.engine.managed import ManagedVllm


@contextmanager
def running(server: ManagedVllm, timeout: float = 300) -> Iterator[ManagedVllm]:
    """The server started and healthy (300 s: vLLM's CPU build boots slowly on a busy 2-core
    machine, past ManagedVllm's own 180 s), stopped on exit."""
    server.start()
    try:
        server.wait_healthy(timeout=timeout)
        yield server
    finally:
        server.stop()


def make_random_lora(base_dir: Path, out_dir: Path, *, r: int = 8, seed: int = 0) -> Path:
    """Save a PEFT LoRA (q_proj/v_proj) with random, non-zero A and B for ``base_dir``.

    PEFT's default init zeroes B (the adapter is then a no-op), so random init is asked for.
    Only adapter_config.json and adapter_model.safetensors are written.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def sse_events(response: httpx.Response) -> list[dict]:
    """Parse an OpenAI-style SSE stream into its JSON events (stops at [DONE])."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        events.append(json.loads(data))
    return events
