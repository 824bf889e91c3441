"""Training records match what the engine serves, for the chat templates real model families publish.

workers/dataset.py renders prompts with the tokenizer's own chat template and cuts the assistant
turn out of the full conversation's rendering. test_dataset.py checks that against small made-up
templates. This file checks it against the published Llama 3.1, Qwen2.5, Mistral v0.3 and Gemma 2
templates (tests/data/chat_templates/, verbatim). A family's quirks (default system prompts,
content trimming, a bos the template renders and the tokenizer adds again, end-of-turn markers that
are not eos, system prompts a template rejects or moves) must not teach the adapter a
continuation other than the one the engine will ask for.

The tokenizer is the tiny model's byte-level BPE (any text round-trips) with the family's special
tokens, bos/eos and bos behaviour added, so both the strings and the token ids can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from workers.dataset import (
    DatasetConfig,
    RatedInteraction,
    TemplateMismatch,
    build_dataset,
    render_completion,
    render_prompt,
)
from workers.redaction import NullRedactor

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    bos: str | None  # what the tokenizer's own call prepends (None: nothing, like Qwen's)
    eos: str
    end: str  # the template's end-of-turn marker after an assistant answer
    specials: tuple[str, ...]


FAMILIES = {
    "llama-3.1": Family(
        "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
    ),
    "qwen2.5": Family(None, "<|im_end|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "mistral-v0.3": Family("<s>", "</s>", "</s>", ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
    "gemma": Family("<bos>", "<eos>", "<end_of_turn>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")),
}  # fmt: skip

SYSTEM = "You are the support bot of a small shop. Be brief."
CONVERSATIONS = {
    "single": [{"role": "user", "content": "How do I reset my password?"}],
    "system": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is my order?"}],
    "multi": [
        {"role": "user", "content": "Hi, I ordered a lamp."},
        {"role": "assistant", "content": "Thanks! What is the order number?"},
        {"role": "user", "content": "It is 4471."},
    ],
    "system_multi": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi, I ordered a lamp."},
        {"role": "assistant", "content": "Thanks! What is the order number?"},
        {"role": "user", "content": "It is 4471."},
    ],
    "non_ascii": [{"role": "user", "content": "Grüße aus Köln! Liefert ihr nach 東京? 🙂"}],
}
RESPONSE = "Öffnen Sie „Konto“ → Passwort. 好的 ✅"
CORRECTION = "Go to Account, then Password, and follow the link we email you."

# What the published templates do with a system prompt:
#   gemma raises ("System role not supported"): the engine rejects the request too.
#   mistral-v0.3 puts it into the turn that is the last message; once the answer is appended no
#   user turn is last and the system prompt disappears, so no rendering of the whole conversation
#   continues the served prompt. The dataset cannot cut a completion out of it and drops the item.
UNSUPPORTED = {
    ("gemma", "system"): "raises",
    ("gemma", "system_multi"): "raises",
    ("mistral-v0.3", "system"): "moves",
    ("mistral-v0.3", "system_multi"): "moves",
}
SUPPORTED = [(f, c) for f in FAMILIES for c in CONVERSATIONS if (f, c) not in UNSUPPORTED]

# The served prompt of CONVERSATIONS["single"], written out from each family's documented format.
GOLDEN_SINGLE = {
    "llama-3.1": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "How do I reset my password?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n<|im_start|>user\nHow do I reset my password?<|im_end|>\n<|im_start|>assistant\n",
    "mistral-v0.3": "<s>[INST] How do I reset my password?[/INST]",
    "gemma": "<bos><start_of_turn>user\nHow do I reset my password?<end_of_turn>\n<start_of_turn>model\n",
}


@cache
def family_tokenizer(tiny_model: Path, name: str) -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer dressed as `name`: its special tokens, bos/eos, template, bos rule."""
    fam = FAMILIES[name]
    raw = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    raw.add_special_tokens(list(fam.specials))
    if fam.bos:  # Llama, Mistral and Gemma tokenizers prepend bos themselves; Qwen's adds nothing
        single, pair, special = f"{fam.bos} $A", f"{fam.bos} $A $B", [(fam.bos, raw.token_to_id(fam.bos))]
    else:
        single, pair, special = "$A", "$A $B", []
    raw.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.eos,
        chat_template=(TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
    )


def rated(i: int, messages: list[dict]) -> RatedInteraction:
    """A thumbs-down answer with a correction: yields SFT, DPO and both KTO labels."""
    return RatedInteraction(
        interaction_id=f"00000000-0000-4000-8000-{i:012d}",
        messages=messages,
        response_text=RESPONSE,
        rating="down",
        correction=CORRECTION,
        rater_id="",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def build(tok: PreTrainedTokenizerFast, items: list[RatedInteraction]):
    policy = DatasetConfig(heldout_fraction=0.0, replay_fraction=0.0, min_examples=1, method="dpo")
    return build_dataset(items, tokenizer=tok, policy=policy, redactor=NullRedactor())


def ids(tok: PreTrainedTokenizerFast, text: str, *, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def served_turn(tok: PreTrainedTokenizerFast, messages: list[dict], answer: str, fam: Family) -> str:
    """The whole conversation as the template renders it, ending with the answer's end marker.

    That is the served prompt followed by what the model must generate. When the marker is not eos
    (Gemma's <end_of_turn>) the dataset appends eos after it so the model also learns to stop.
    """
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    cut = full.rindex(fam.end) + len(fam.end)
    assert full.rfind(answer, 0, cut) != -1, "the answer must come before the end marker"
    return full[:cut] + ("" if fam.end == fam.eos else fam.eos)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_template_file_renders_the_documented_prompt(tiny_model, name: str) -> None:
    tok = family_tokenizer(tiny_model, name)
    assert render_prompt(CONVERSATIONS["single"], tok) == GOLDEN_SINGLE[name]


@pytest.mark.parametrize(("name", "conv"), SUPPORTED)
def test_records_continue_the_served_prompt(tiny_model, name: str, conv: str) -> None:
    tok, fam = family_tokenizer(tiny_model, name), FAMILIES[name]
    messages = CONVERSATIONS[conv]
    served = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(messages, tok) == served

    built = build(tok, [rated(1, messages)])
    assert built.stats["dropped_template"] == 0
    (sft,), (dpo,), kto = built.train["sft"], built.train["dpo"], built.train["kto"]
    records = [
        (sft["prompt"], sft["completion"], CORRECTION),
        (dpo["prompt"], dpo["chosen"], CORRECTION),
        (dpo["prompt"], dpo["rejected"], RESPONSE),
        *((k["prompt"], k["completion"], CORRECTION if k["label"] else RESPONSE) for k in kto),
    ]
    assert len(records) == 5
    engine_prompt = ids(tok, served, special=False)  # vLLM tokenizes the rendered chat as is
    for prompt, completion, answer in records:
        expected = served_turn(tok, messages, answer, fam)
        assert expected.startswith(served)
        assert prompt + completion == expected.removeprefix(fam.bos or "")
        # What TRL feeds the model: tokenizer(prompt + completion), special tokens on (so a bos the
        # template already rendered must not be in the record's prompt).
        trained = ids(tok, prompt + completion, special=True)
        assert trained == ids(tok, expected, special=False)
        assert ids(tok, prompt, special=True) == engine_prompt == trained[: len(engine_prompt)]
        assert completion.endswith(fam.eos) and answer.strip() in completion


@pytest.mark.parametrize(("name", "conv"), list(UNSUPPORTED))
def test_system_prompt_the_template_cannot_train_on_is_dropped(tiny_model, name: str, conv: str) -> None:
    tok = family_tokenizer(tiny_model, name)
    messages = CONVERSATIONS[conv]
    if UNSUPPORTED[name, conv] == "raises":
        with pytest.raises(TemplateError, match="System role not supported"):
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        detail = "TemplateError: System role not supported"
    else:
        served = render_prompt(messages, tok)
        assert f"[INST] {SYSTEM}\n\n{messages[-1]['content']}[/INST]" in served
        answered = [*messages, {"role": "assistant", "content": RESPONSE}]
        assert SYSTEM not in tok.apply_chat_template(answered, tokenize=False)
        with pytest.raises(TemplateMismatch):
            render_completion(messages, RESPONSE, tok, prompt=served)
        detail = "the chat template's rendering of the conversation does not start with"

    good = rated(1, CONVERSATIONS["single"])
    bad = rated(2, messages)
    built = build(tok, [good, bad])
    assert built.stats["dropped_template"] == 1
    assert built.snapshot.interaction_ids == [good.interaction_id]
    (drop,) = built.drops
    assert drop["interaction_id"] == bad.interaction_id and drop["reason"] == "template"
    assert drop["detail"].startswith(detail)


# Tool use, for the two families whose templates render tools: the request's tools and template
# kwargs (Llama 3.1 reads date_string and tools_in_user_message) reach the template as vLLM passes
# them, the tool turns stay, and an answer that called a tool is trained as that call.
TOOL = {"type": "function", "function": {
    "name": "order_status", "description": "Where an order is.",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}}}
CALL = {"id": "call-7", "type": "function", "function": {"name": "order_status", "arguments": '{"order": "4471"}'}}
ASKED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is order 4471?"}]
TOOL_TURNS = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call-7", "content": '{"status": "shipped"}'}]
# The same turns as vLLM hands them to the template: arguments parsed, no content as "".
SERVED_CALL = {**CALL, "function": {"name": "order_status", "arguments": {"order": "4471"}}}
SERVED_TURNS = [*ASKED, {"role": "assistant", "content": "", "tool_calls": [SERVED_CALL]},
                {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": "call-7"}]
TOOL_KWARGS = {"qwen2.5": {}, "llama-3.1": {"date_string": "02 Dec 2026", "tools_in_user_message": False}}


@pytest.mark.parametrize("name", list(TOOL_KWARGS))
def test_tool_conversations_continue_the_served_prompt(tiny_model, name: str) -> None:
    tok, fam, kwargs = family_tokenizer(tiny_model, name), FAMILIES[name], TOOL_KWARGS[name]
    params = {"tools": [TOOL], "tool_choice": "auto", "chat_template_kwargs": kwargs}

    def served(conversation: list[dict], **kw) -> str:
        return tok.apply_chat_template(conversation, tools=[TOOL], tokenize=False, **kwargs, **kw)

    after_result = replace(rated(1, TOOL_TURNS), params=params)
    called = replace(rated(2, ASKED), params=params, response_text="", response_tool_calls=[CALL])
    built = build(tok, [after_result, called])
    assert built.stats["dropped_template"] == 0
    sft = {r["prompt"]: r["completion"] for r in built.train["sft"]}
    rejected = {r["prompt"]: r["rejected"] for r in built.train["dpo"]}

    prompt = served(SERVED_TURNS, add_generation_prompt=True)
    assert "order_status" in prompt and "shipped" in prompt
    assert all(v in prompt for v in kwargs.values() if isinstance(v, str))
    full = served([*SERVED_TURNS, {"role": "assistant", "content": CORRECTION}])
    key = prompt.removeprefix(fam.bos or "")
    assert key + sft[key] == full[: full.rindex(fam.end) + len(fam.end)].removeprefix(fam.bos or "")

    prompt = served(ASKED, add_generation_prompt=True)
    full = served([*ASKED, {"role": "assistant", "content": "", "tool_calls": [SERVED_CALL]}])
    key = prompt.removeprefix(fam.bos or "")
    assert full.startswith(prompt + rejected[key].removesuffix(fam.eos))
    assert '"4471"' in rejected[key] and rejected[key].endswith(fam.eos)
    # What TRL feeds the model is what the engine tokenizes for the whole conversation.
    assert ids(tok, key + rejected[key], special=True) == ids(tok, full.rstrip(), special=False)
