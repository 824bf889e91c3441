"""Train/serve consistency: what train_adapter trained is what vLLM serves.

An SFT adapter is trained until its greedy answers clearly differ from the base model's, loaded
into a real vLLM at runtime, and vLLM's greedy completions (chat endpoint and plain completions on
the rendered prompt) must equal PEFT + transformers `generate(do_sample=False)` token for token.
Any drift in chat template rendering, bos handling, LoRA scaling or target modules shows up here.

Tool use: the dataset's records of a conversation with tools, tool calls, tool results and
chat_template_kwargs must tokenize to what vLLM tokenizes for the same request (its /tokenize and
its chat endpoint), with a template that renders all of them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from service.engine.managed import ManagedVllm
from service.local.embedded import free_port
from tests.helpers.chat_templates import TOOLS_TEMPLATE
from tests.helpers.vllm import running
from workers.dataset import DatasetConfig, RatedInteraction, build_dataset
from workers.redaction import NullRedactor
from workers.training import TrainingConfig, _to_dataset, train_adapter

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
# bf16 (vLLM) and fp32 (transformers) logits differ slightly: a greedy step whose top-2 logits are
# closer than this may legitimately flip, so such prompts are reported but not compared.
MIN_MARGIN = 0.5
QA = [
    ("What colour is the car?", "The car is red."),
    ("What colour is the sky?", "The sky is blue."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("Where is Paris?", "Paris is in France."),
    ("Hello, I am Bob.", "Hello Bob! How can I help you today?"),
    ("What is the weather in Oslo?", "It is snowy in Oslo today."),
    ("My order is late.", "I am sorry that your order is late."),
    ("What colour is the kite?", "The kite is green."),
]
# Prompts the adapter learned: greedy decoding there has wide logit margins, so vLLM's bf16 and
# transformers' fp32 agree exactly (near-ties on unseen prompts could flip either way).
CHECKED = QA[:5]
MIN_CHECKED = 4


@pytest.fixture(scope="module")
def server(request, tiny_model, tmp_path_factory):
    """The session's shared vLLM when it serves the tiny model, else one of our own."""
    try:
        shared = request.getfixturevalue("vllm")
    except pytest.FixtureLookupError:
        shared = None
    if isinstance(shared, ManagedVllm) and shared.model_dir.resolve() == Path(tiny_model).resolve():
        yield shared
        return
    srv = ManagedVllm(tiny_model, free_port(), kv_cache_gb=0.0625,
                      log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    with running(srv):
        yield srv


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _records(tok) -> list[dict]:
    out = []
    for q, a in QA:
        prompt = tok.apply_chat_template(_messages(q), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*_messages(q), {"role": "assistant", "content": a}], tokenize=False)
        out.append({"prompt": prompt, "completion": full[len(prompt):].rstrip()})
    return out


def _hf_greedy(model, tok, prompt: str) -> tuple[list[int], list[int], float]:
    """(prompt ids, generated ids without the final eos, smallest top-1/top-2 logit gap)."""
    import torch

    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    top2 = [scores[0].topk(2).values for scores in out.scores]
    margin = min(float(v[0] - v[1]) for v in top2)
    generated = _strip_eos(out.sequences[0, ids.shape[1]:].tolist(), tok.eos_token_id)
    return ids[0].tolist(), generated, margin


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_vllm_serves_what_peft_generates(server, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = TrainingConfig(
        # A decaying 5e-3 memorises the 8 answers with top-2 logit margins ~4 whatever the float
        # noise; a constant 1e-2 was chaotic (which answers stuck varied with 1e-7 differences).
        method="sft", max_steps=160, learning_rate=5e-3, lora_r=16, lora_alpha=32,
        per_device_batch_size=8, checkpoint_every_steps=1000,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    result = train_adapter(base_model_dir=tiny_model, data={"train": _records(tok)}, config=config,
                           out_dir=tmp_path / "adapter", work_dir=tmp_path / "work")

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_outputs = {}
    for q, _ in CHECKED:
        prompt = tok.apply_chat_template(_messages(q), tokenize=False, add_generation_prompt=True)
        base_outputs[q] = _hf_greedy(base, tok, prompt)[1]
    checked = 0
    peft_model = PeftModel.from_pretrained(base, str(result.artifact_dir)).eval()

    name = f"consistency-{uuid.uuid4().hex[:8]}"  # never reuse a lora name (vllm #42125)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(result.artifact_dir)})
        assert r.status_code == 200, r.text
        try:
            for q, answer in CHECKED:
                prompt = tok.apply_chat_template(_messages(q), tokenize=False, add_generation_prompt=True)
                prompt_ids, hf_ids, margin = _hf_greedy(peft_model, tok, prompt)
                assert hf_ids != base_outputs[q], f"adapter did not change the answer to {q!r}"
                if margin < MIN_MARGIN:
                    print(f"\n{q!r}: skipped, greedy margin {margin:.2f} < {MIN_MARGIN}")
                    continue
                checked += 1

                chat = http.post("/v1/chat/completions", json={
                    "model": name, "messages": _messages(q), "temperature": 0, "max_tokens": MAX_TOKENS,
                    "return_token_ids": True}).raise_for_status().json()
                # vLLM rendered and tokenized the chat exactly as the training prompt was.
                assert chat["prompt_token_ids"] == prompt_ids
                choice = chat["choices"][0]
                assert _strip_eos(choice["token_ids"], tok.eos_token_id) == hf_ids, q
                assert choice["message"]["content"] == tok.decode(hf_ids, skip_special_tokens=True)

                comp = http.post("/v1/completions", json={
                    "model": name, "prompt": prompt, "add_special_tokens": False, "temperature": 0,
                    "max_tokens": MAX_TOKENS, "return_token_ids": True}).raise_for_status().json()
                assert _strip_eos(comp["choices"][0]["token_ids"], tok.eos_token_id) == hf_ids, q
                print(f"\n{q!r}: base {tok.decode(base_outputs[q])!r} -> adapter "
                      f"{choice['message']['content']!r} (trained on {answer!r}, margin {margin:.2f})")
        finally:
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert checked >= MIN_CHECKED, f"only {checked} prompts had a clear greedy answer"


# A client's tool: keys in another order than vLLM's tool model, no description (vLLM renders it
# as null), a schema whose key order is the client's.
TOOLS = [{"function": {"parameters": {"type": "object", "properties": {"unit": {"type": "string"},
                                                                       "city": {"type": "string"}},
                                      "required": ["city"]}, "name": "get_weather"},
          "type": "function"}]
CALL = {"id": "call-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}
ASKED = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Oslo?"}]
ANSWERED = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call-1", "content": "snow, -3"}]
KWARGS = {"enable_thinking": False}
# vLLM without a tool parser serves tools only with tool_choice "none" (they are still rendered).
PARAMS = {"tools": TOOLS, "tool_choice": "none", "chat_template_kwargs": KWARGS, "temperature": 0}


@pytest.fixture(scope="module")
def tools_server(tiny_model, tmp_path_factory):
    """vLLM serving the tiny model with TOOLS_TEMPLATE (--chat-template)."""
    root = tmp_path_factory.mktemp("tools-vllm")
    (root / "tools.jinja").write_text(TOOLS_TEMPLATE)
    # The tools' JSON takes ~250 of the byte-level tokenizer's tokens: the model's full context.
    srv = ManagedVllm(tiny_model, free_port(), kv_cache_gb=0.0625, max_model_len=1024,
                      log_path=root / "vllm.log", extra_args=["--chat-template", str(root / "tools.jinja")])
    with running(srv):
        yield srv


def _rated(n: int, messages: list[dict], **answer) -> RatedInteraction:
    return RatedInteraction(interaction_id=f"00000000-0000-4000-8000-{n:012d}", messages=messages,
                            rating="up", correction=None, rater_id="", params=PARAMS,
                            created_at=datetime(2026, 1, 1, tzinfo=UTC), **answer)


def _tokenize(http: httpx.Client, messages: list[dict], **kw) -> list[int]:
    body = {"model": "base", "messages": messages, "tools": TOOLS, "chat_template_kwargs": KWARGS, **kw}
    return http.post("/tokenize", json=body).raise_for_status().json()["tokens"]


def test_tool_conversations_train_on_what_vllm_tokenizes(tools_server, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TOOLS_TEMPLATE
    after_result = _rated(1, ANSWERED, response_text="It is snowing.")
    called = _rated(2, ASKED, response_text="", response_tool_calls=[CALL])
    built = build_dataset([after_result, called], tokenizer=tok, redactor=NullRedactor(),
                          policy=DatasetConfig(method="sft", heldout_fraction=0.0, replay_fraction=0.0,
                                               min_examples=2))
    names = ("after_result", "called")
    records = dict(zip(names, built.train["sft"], strict=True))
    rows = dict(zip(names, _to_dataset("sft", built.train["sft"], tok, max_length=1024), strict=True))
    turns = {"after_result": (ANSWERED, {"role": "assistant", "content": "It is snowing."}),
             "called": (ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]})}

    with httpx.Client(base_url=tools_server.url, timeout=120) as http:
        for name, (messages, answer) in turns.items():
            record, row = records[name], rows[name]
            prompt_ids = _tokenize(http, messages, add_generation_prompt=True)
            # TRL tokenizes a record's text itself (DPO, KTO) with special tokens on.
            assert tok(record["prompt"])["input_ids"] == prompt_ids, name
            # The answer is what vLLM renders when the product sends the conversation back; the
            # newline after the final eos is never generated.
            served = _tokenize(http, [*messages, answer], add_generation_prompt=False)
            trained = row["input_ids"]  # SFT's own tokenization (workers.training)
            assert trained == served[:len(trained)], name
            assert tok.decode(served[len(trained):]).strip() == "", name
            assert row["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)
            assert row["labels"][len(prompt_ids):] == trained[len(prompt_ids):]
            # The chat endpoint (what the gateway calls) renders the prompt the same way.
            chat = http.post("/v1/chat/completions", json={
                "model": "base", "messages": messages, **PARAMS, "max_tokens": 1,
                "return_token_ids": True})
            assert chat.status_code == 200, chat.text
            assert chat.json()["prompt_token_ids"] == prompt_ids, name
        # The tools and the kwarg change vLLM's rendering: without them the ids differ.
        bare = http.post("/tokenize", json={"model": "base", "messages": ASKED}).raise_for_status().json()
        assert bare["tokens"] != tok(records["called"]["prompt"])["input_ids"]
    assert '"description": null' in records["called"]["prompt"] and "<think></think>" in records["called"]["prompt"]
    assert records["called"]["completion"].startswith('<call>{"name": "get_weather", "arguments": {"city": "Oslo"')
