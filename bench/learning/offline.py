"""Greedy answers of a version the gateway does not serve (a rejected candidate), with
transformers + PEFT from its artifact: how the benchmark learns what a gate kept out."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class OfflineScorer:
    """Loads the base once per adapter; answers conversations greedily, as the gateway would."""

    def __init__(self, base_model: Path) -> None:
        from transformers import AutoTokenizer

        self.base_model = str(base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        self._cache: tuple[str, Any] | None = None

    def _model(self, adapter_dir: str):
        if self._cache is None or self._cache[0] != adapter_dir:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype="float32")
            self._cache = (adapter_dir, PeftModel.from_pretrained(base, adapter_dir).eval())
        return self._cache[1]

    def answer(self, adapter_dir: str, messages: list[dict], max_tokens: int) -> str:
        import torch

        model = self._model(adapter_dir)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        return self.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
