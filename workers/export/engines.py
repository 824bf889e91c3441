"""The language models the consistency gate compares, on token ids: the served version (base +
unmerged LoRA), a merged model, a GGUF through llama.cpp; and the prompts they are fed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

Prompt = str | list[dict[str, str]]


class LanguageModel(Protocol):
    """What the consistency check needs from an engine, on token ids."""

    def logprobs(self, ids: Sequence[int]):  # (len(ids), vocab) next-token log-probabilities
        ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        ...

    @property
    def stop_ids(self) -> frozenset[int]:  # the ids a greedy continuation stops at
        ...


@dataclass
class TorchLM:
    """A transformers model (PEFT-wrapped or merged) on CPU, fp32 arithmetic."""

    model: Any
    stop_ids: frozenset[int] = frozenset()

    def logprobs(self, ids: Sequence[int]):
        import torch  # heavy: imported only when the gate runs

        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0].float()
        return torch.log_softmax(logits, dim=-1).numpy()

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch  # heavy: imported only when the gate runs

        # A hand loop rather than generate(): identical argmax/stop rules in every engine.
        out: list[int] = []
        with torch.no_grad():
            step = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True)
            for _ in range(max_new_tokens):
                tok = int(step.logits[0, -1].argmax())
                out.append(tok)
                if tok in self.stop_ids:
                    break
                step = self.model(input_ids=torch.tensor([[tok]]),
                                  past_key_values=step.past_key_values, use_cache=True)
        return out


def load_served(base_dir: str | Path, adapter_dir: str | Path) -> TorchLM:
    """The served version as vLLM computes it: base + unmerged LoRA (PEFT), fp32."""
    # Heavy (seconds to import): only a running export pays for them.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return TorchLM(model, _stop_ids(Path(base_dir)))


@dataclass
class Memo:
    """Caches an engine's answers, so a fallback chain scores the reference only once."""

    inner: Any
    _lp: dict = field(default_factory=dict)
    _greedy: dict = field(default_factory=dict)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.inner.stop_ids

    def logprobs(self, ids: Sequence[int]):
        key = tuple(ids)
        if key not in self._lp:
            self._lp[key] = self.inner.logprobs(ids)
        return self._lp[key]

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        key = (tuple(ids), max_new_tokens)
        if key not in self._greedy:
            self._greedy[key] = self.inner.greedy(ids, max_new_tokens)
        return list(self._greedy[key])


def load_merged(merged_dir: str | Path) -> TorchLM:
    """A merged export as an engine, fp32 on CPU."""
    # Heavy (seconds to import): only a running export pays for them.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    return TorchLM(model, _stop_ids(Path(merged_dir)))


def _stop_ids(model_dir: Path) -> frozenset[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


@dataclass
class LlamaCppLM:
    """A GGUF file run through llama.cpp's Python bindings (llama-cpp-python)."""

    llm: Any
    stop_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, gguf_path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None,
             stop_ids: frozenset[int] | None = None) -> LlamaCppLM:
        from llama_cpp import Llama  # optional (the export extra); loads a native library

        llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, seed=0,
                    n_threads=n_threads, verbose=False)
        return cls(llm, stop_ids if stop_ids is not None else frozenset([llm.token_eos()]))

    def logprobs(self, ids: Sequence[int]):
        self.llm.reset()
        self.llm.eval(list(ids))
        scores = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        return (scores - _logsumexp(scores)).astype(np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if tok in self.stop_ids:
                break
            self.llm.eval([tok])
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads ``text`` (special tokens parsed, no bos added)."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def encode_prompts(tokenizer_dir: str | Path, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids per prompt: a message list goes through the chat template (with the
    generation prompt); a string is taken as already-rendered text (held-out records' prompt)."""
    from transformers import AutoTokenizer  # heavy: imported only when an export runs

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for p in prompts:
        text = p if isinstance(p, str) else tok.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def render_prompts(tokenizer_dir: str | Path, prompts: Sequence[Prompt]) -> list[str]:
    """The text of each prompt as the served model sees it (for tokenizer parity checks)."""
    from transformers import AutoTokenizer  # heavy: imported only when an export runs

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # tokenize=False: the template's text (transformers types every return form together).
    return [p if isinstance(p, str) else
            cast(str, tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
            for p in prompts]
