"""Dataset building: rendering, curation, split, method choice, replay, lineage, PII-free output."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers.datasets import CORPUS, build, make_tokenizer, policy, ri, uid
from workers.dataset import (
    DataCounts,
    DatasetConfig,
    NotEnoughData,
    RatedInteraction,
    TemplateMismatch,
    auto_special_prefix,
    build_dataset,
    cap_rater_share,
    choose_method,
    heldout_answer,
    heldout_completion,
    is_heldout,
    kto_weights,
    render_completion,
    render_prompt,
    sample_replay,
    training_prompt,
    write_jsonl,
)
from workers.redaction import NullRedactor, RegexRedactor

# ---------------------------------------------------------------------------------------------
# Interactions (the tokenizer and the builders are in tests/helpers/datasets.py)


def mixed(n: int, start: int = 0) -> list[RatedInteraction]:
    """n interactions: ups, downs and corrections in a fixed pattern."""
    out = []
    for i in range(start, start + n):
        if i % 4 == 0:
            out.append(ri(i, response=f"wrong answer {i}", rating="down", correction=f"right answer {i}"))
        elif i % 4 == 1:
            out.append(ri(i, response=f"bad answer {i}", rating="down"))
        else:
            out.append(ri(i, response=f"good answer {i}", rating="up"))
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_prompt_is_exactly_the_chat_template() -> None:
    tok = make_tokenizer("chatml")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    prompt = render_prompt(msgs, tok)
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        prompt == "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )


def _random_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    words = [*" ".join(CORPUS).split(), "ünïcode", "😀", "[EMAIL]", "x{y}z", "new\nline"]

    def text() -> str:
        pad = rng.choice(["", " ", "\n", "  \n"])
        return pad + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + pad

    msgs: list[dict[str, str]] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": text()})
    for _ in range(rng.randint(0, 2)):
        msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    msgs.append({"role": "user", "content": text()})
    return msgs, text().strip()


@pytest.mark.parametrize("kind", ["chatml", "tiny", "llama"])
@pytest.mark.parametrize("seed", range(25))
def test_prompt_plus_completion_is_the_full_template_rendering(kind: str, seed: int) -> None:
    tok = make_tokenizer(kind)
    msgs, target = _random_conversation(random.Random(seed))
    prompt = render_prompt(msgs, tok)
    completion = render_completion(msgs, target, tok)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": target}], tokenize=False)
    # Equal up to whitespace after the final end token, which generation stops before.
    assert full.startswith(prompt + completion)
    assert full[len(prompt + completion) :].strip() == ""
    # Ends on exactly one eos: TRL appends another unless the completion ends with it.
    assert completion.endswith(tok.eos_token)
    assert completion.count(tok.eos_token) == 1
    assert target.strip() in completion
    # Token level: the prompt's ids prefix the full ids, so TRL's completion mask starts at the boundary.
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    pc_ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert pc_ids[: len(p_ids)] == p_ids
    assert pc_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    ("kind", "auto_bos"),
    [("chatml", False), ("tiny", False), ("tiny", True), ("llama", False), ("llama", True)],
)
@pytest.mark.parametrize("seed", range(10))
def test_trainer_ids_equal_engine_ids(kind: str, auto_bos: bool, seed: int) -> None:
    # TRL 1.16 tokenizes string prompt/completion with special tokens on; vLLM tokenizes the
    # rendered chat with none. Training ids must equal serving ids either way.
    tok = make_tokenizer(kind, auto_bos)
    msgs, target = _random_conversation(random.Random(seed))
    prompt = training_prompt(render_prompt(msgs, tok), auto_special_prefix(tok))
    completion = render_completion(msgs, target, tok)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": target}], tokenize=False)
    engine_ids = tok(full.rstrip(), add_special_tokens=False)["input_ids"]
    assert tok(prompt + completion)["input_ids"] == engine_ids
    engine_prompt_ids = tok(render_prompt(msgs, tok), add_special_tokens=False)["input_ids"]
    assert tok(prompt)["input_ids"] == engine_prompt_ids
    if kind != "chatml":  # these templates render the bos themselves: exactly one must remain
        assert engine_ids.count(tok.bos_token_id) == 1


def test_built_prompts_leave_the_bos_to_the_trainer_tokenizer() -> None:
    tok = make_tokenizer("tiny", auto_bos=True)
    assert auto_special_prefix(tok) == "<s>"
    assert auto_special_prefix(make_tokenizer("tiny")) == ""
    items = [ri(i, user="hello world", response=f"the answer {i}") for i in range(30)]
    built = build_dataset(
        items, [], tokenizer=tok, policy=policy(heldout_fraction=0.5), redactor=RegexRedactor()
    )
    assert built.train["sft"] and built.heldout_raw
    assert all(not e["prompt"].startswith("<s>") for e in built.train["sft"] + built.heldout["sft"])
    assert all(e["prompt"].startswith("<|user|>") for e in built.train["sft"])
    # The raw held-out record keeps the engine's exact rendering, bos included.
    assert all(r["prompt"].startswith("<s><|user|>") for r in built.heldout_raw)
    assert built.warnings == []


def test_bos_added_only_by_the_tokenizer_is_flagged() -> None:
    # ChatML renders no bos; a tokenizer that adds one makes TRL train on a token vLLM never sends.
    tok = make_tokenizer("chatml", auto_bos=True)
    built = build_dataset([ri(1)], [], tokenizer=tok, policy=policy(), redactor=RegexRedactor())
    assert len(built.warnings) == 1 and "add_bos_token=False" in built.warnings[0]
    assert build([ri(1)]).warnings == []


def test_template_without_end_marker_gets_eos_appended() -> None:
    tok = make_tokenizer("plain")
    msgs = [{"role": "user", "content": "hello world"}]
    prompt = render_prompt(msgs, tok)
    completion = render_completion(msgs, "how are you", tok)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "how are you"}], tokenize=False)
    assert prompt + completion == full.rstrip() + "<eos>"
    assert completion == "how are you<eos>"


def test_template_mismatch_is_detected_and_items_dropped() -> None:
    tok = make_tokenizer("mismatch")
    with pytest.raises(TemplateMismatch):
        render_completion([{"role": "user", "content": "hello"}], "hi", tok)
    with pytest.raises(NotEnoughData) as err:
        build([ri(1), ri(2)], kind="mismatch")
    assert err.value.stats["dropped_template"] == 2


# ---------------------------------------------------------------------------------------------
# Example construction


def test_examples_per_rating_kind() -> None:
    tok = make_tokenizer("chatml")
    up = ri(1, user="hello world", response="good one", rating="up")
    down = ri(2, user="how are you", response="bad one", rating="down")
    corr = ri(3, user="the answer", response="wrong one", rating="down", correction="right one")
    built = build([up, down, corr])

    def p(item: RatedInteraction) -> str:
        return render_prompt(item.messages, tok)

    def c(item: RatedInteraction, text: str) -> str:
        return render_completion(item.messages, text, tok)

    assert built.train["sft"] == [
        {"prompt": p(up), "completion": c(up, "good one")},
        {"prompt": p(corr), "completion": c(corr, "right one")},
    ]
    assert built.train["dpo"] == [
        {"prompt": p(corr), "chosen": c(corr, "right one"), "rejected": c(corr, "wrong one")}
    ]
    assert built.train["kto"] == [
        {"prompt": p(up), "completion": c(up, "good one"), "label": True},
        {"prompt": p(down), "completion": c(down, "bad one"), "label": False},
        {"prompt": p(corr), "completion": c(corr, "wrong one"), "label": False},
        {"prompt": p(corr), "completion": c(corr, "right one"), "label": True},
    ]
    assert built.train["sft"][0]["completion"] == "good one<|im_end|>"
    assert (built.stats["ups"], built.stats["downs"], built.stats["corrections"]) == (1, 2, 1)


def test_openai_content_parts_and_developer_role_are_normalized() -> None:
    item = dataclasses.replace(
        ri(1),
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
            },
        ],
    )
    built = build([item])
    assert built.train["sft"][0]["prompt"] == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhello\nworld<|im_end|>\n<|im_start|>assistant\n"
    )


def test_invalid_items_are_dropped_with_reason() -> None:
    function = dataclasses.replace(ri(1), messages=[{"role": "function", "content": "x"}])
    image = dataclasses.replace(
        ri(2), messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    )
    bad_rating = dataclasses.replace(ri(3), rating="meh")
    own_template = dataclasses.replace(ri(5), params={"chat_template": "{{ messages }}"})
    built = build([function, image, bad_rating, ri(4), own_template])
    assert built.stats["dropped_invalid"] == 4
    assert {d["interaction_id"] for d in built.drops} == {uid(1), uid(2), uid(3), uid(5)}
    assert built.stats["sft_train"] == 1


# ---------------------------------------------------------------------------------------------
# Tool calls: the turns stay, the template gets the request's tools and kwargs as vLLM gave them

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "the weather now",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "oslo"}'}}
ASKED = [{"role": "system", "content": "you are a helpful assistant"},
         {"role": "user", "content": "what is the weather in oslo"}]
TOOL_TURNS = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call-1", "content": "snow"}]
TOOL_PARAMS = {"tools": [WEATHER], "tool_choice": "auto", "chat_template_kwargs": {"enable_thinking": False},
               "temperature": 0.3}
# What vLLM hands the template for those: arguments parsed, content "" for none.
SERVED_CALL = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "oslo"}}}
SERVED_TURNS = [*ASKED, {"role": "assistant", "content": "", "tool_calls": [SERVED_CALL]},
                {"role": "tool", "content": "snow", "tool_call_id": "call-1"}]


def tool_item(i: int, messages: list[dict], *, response: str = "it is snowing", calls=None, rating: str = "up",
              correction: str | None = None, params=TOOL_PARAMS) -> RatedInteraction:
    return dataclasses.replace(ri(i, response=response, rating=rating, correction=correction),
                               messages=messages, params=params, response_tool_calls=calls)


def held_and_trained(n_held: int) -> tuple[list[int], int]:
    """Item numbers whose ids land in the held-out half, and one that trains (a build needs one)."""
    held = [i for i in range(1000) if is_heldout(uid(i), 0.5)]
    return held[:n_held], next(i for i in range(1000) if not is_heldout(uid(i), 0.5))


def served(conversation: list[dict], **kw) -> str:
    """The tools template's rendering with WEATHER and enable_thinking=False, as vLLM calls it."""
    return make_tokenizer("tools").apply_chat_template(
        conversation, tools=[WEATHER], enable_thinking=False, tokenize=False, **kw)


def test_tool_turns_stay_in_the_prompt_rendered_with_the_requests_tools_and_kwargs() -> None:
    built = build([tool_item(1, TOOL_TURNS)], kind="tools")
    (sft,) = built.train["sft"]
    assert sft["prompt"] == served(SERVED_TURNS, add_generation_prompt=True)
    for part in ('"name": "get_weather"', '<call>{"name": "get_weather", "arguments": {"city": "oslo"}}</call>',
                 '<result id="call-1">snow</result>', "<think></think>"):
        assert part in sft["prompt"], part
    assert sft["prompt"].endswith("<|assistant|>\n<think></think>\n")
    assert sft["completion"] == "it is snowing</s>"
    # Without the request's fields the same turns render without tools or the think block.
    bare = build([tool_item(1, TOOL_TURNS, params={})], kind="tools").train["sft"][0]["prompt"]
    assert "get_weather\"," not in bare.split("<|user|>")[0] and "<think>" not in bare


def test_an_answer_that_called_tools_is_trained_as_its_calls() -> None:
    up = tool_item(1, ASKED, response="", calls=[CALL])
    corrected = tool_item(2, [*ASKED[:1], {"role": "user", "content": "weather in paris"}], response="",
                          calls=[CALL], rating="down", correction="please say which city")
    built = build([up, corrected], kind="tools")
    prompt = served(ASKED, add_generation_prompt=True)
    full = served([*ASKED, {"role": "assistant", "content": "", "tool_calls": [SERVED_CALL]}])
    assert built.train["sft"][0] == {"prompt": prompt, "completion": full[len(prompt):].rstrip()}
    assert built.train["sft"][0]["completion"] == (
        '<call>{"name": "get_weather", "arguments": {"city": "oslo"}}</call></s>')
    # A correction stays text: it is chosen over the calls the answer made.
    (dpo,) = built.train["dpo"]
    assert dpo["chosen"] == "please say which city</s>"
    assert dpo["rejected"].startswith("<call>")
    assert [k["label"] for k in built.train["kto"]] == [True, False, True]


def test_a_pending_interaction_has_no_answer_to_train_on() -> None:
    pending = dataclasses.replace(ri(1, response=""), finish_reason="pending")
    built = build([pending, ri(2)])
    assert built.stats["dropped_pending"] == 1
    assert built.drops == [{"interaction_id": uid(1), "reason": "pending",
                            "detail": "stored before its answer arrived"}]


def test_tool_arguments_and_results_are_redacted_and_stay_json() -> None:
    call = {**CALL, "function": {"name": "email", "arguments": '{"to": "jane.doe@example.com", "n": 1}'}}
    turns = [{"role": "user", "content": "mail jane"},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call-1", "content": "sent to jane.doe@example.com"}]
    (held,), trained = held_and_trained(1)
    built = build([tool_item(held, turns, calls=[call], response=""), ri(trained)], kind="tools",
                  heldout_fraction=0.5)
    (raw,) = built.heldout_raw
    blob = json.dumps(raw) + json.dumps(built.heldout)
    assert "jane.doe@example.com" not in blob and "[EMAIL]" in blob
    assert json.loads(raw["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL]", "n": 1}
    assert json.loads(raw["response_tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL]", "n": 1}


def test_the_same_words_with_other_tools_are_not_duplicates() -> None:
    other = {**TOOL_PARAMS, "tools": [{**WEATHER, "function": {**WEATHER["function"], "name": "get_forecast"}}]}
    built = build([tool_item(1, TOOL_TURNS), tool_item(2, TOOL_TURNS, params=other), tool_item(3, TOOL_TURNS)],
                  kind="tools")
    assert built.stats["dropped_duplicates"] == 1 and len(built.train["sft"]) == 2


def test_heldout_records_render_their_answers_as_training_did(tmp_path: Path) -> None:
    (one, two), trained = held_and_trained(2)
    items = [tool_item(one, ASKED, response="", calls=[CALL], rating="down", correction="which city"),
             tool_item(two, TOOL_TURNS), ri(trained)]
    built = build(items, kind="tools", heldout_fraction=0.5)
    write_jsonl(built, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "heldout_raw.jsonl").read_text().splitlines()]
    by_id = {r["interaction_id"]: r for r in records}
    tok = make_tokenizer("tools")
    called, answered = by_id[uid(one)], by_id[uid(two)]
    assert called["params"] == {"tools": [WEATHER], "tool_choice": "auto",
                                "chat_template_kwargs": {"enable_thinking": False}}
    (dpo,) = built.heldout["dpo"]
    assert heldout_completion(called, heldout_answer(called), tok) == dpo["rejected"]
    assert heldout_completion(called, called["correction"], tok) == dpo["chosen"]
    assert heldout_completion(answered, heldout_answer(answered), tok) == "it is snowing</s>"
    # A record written before params were kept reads as a request without tools or kwargs: its
    # answer turn renders without the think block the kwarg adds.
    old = {k: v for k, v in answered.items() if k not in ("params", "response_tool_calls")}
    old["prompt"] = render_prompt(old["messages"], tok)
    assert not old["prompt"].endswith("<think></think>\n")
    assert old["prompt"] + heldout_completion(old, heldout_answer(old), tok) == (
        tok.apply_chat_template([*SERVED_TURNS, {"role": "assistant", "content": "it is snowing"}],
                                tokenize=False).rstrip())


# ---------------------------------------------------------------------------------------------
# PII never reaches the files

PII = [
    "jane.doe@example.com",
    "+44 20 7946 0958",
    "(415) 555-0132",
    "4111 1111 1111 1111",
    "sk-proj-A1b2C3d4E5f6G7h8I9j0K",
    "fw_3kT9xYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456",
    "AKIAIOSFODNN7EXAMPLE",
    "GB82 WEST 1234 5698 7654 32",
    "123-45-6789",
    "10.1.2.3",
]


def _pii_items(start: int, n: int) -> list[RatedInteraction]:
    out = []
    for i in range(start, start + n):
        a, b, c, d = (PII[(i + k) % len(PII)] for k in range(4))
        out.append(
            ri(
                i,
                system=f"support agent; escalate to {a}",
                user=f"my card is {b} please help {i}",
                response=f"I stored {c} for you",
                rating="down" if i % 2 else "up",
                correction=f"Never repeat secrets like {d}" if i % 3 == 0 else None,
            )
        )
    return out


def test_no_pii_in_written_files(tmp_path: Path) -> None:
    new, pool = _pii_items(0, 30), _pii_items(1000, 30)
    built = build(new, pool, heldout_fraction=0.3, replay_fraction=0.2, method="sft")
    assert built.heldout_raw and built.train["sft"] and built.stats["replay"] > 0
    paths = write_jsonl(built, tmp_path)
    assert set(paths) == {
        *(f"{fmt}_{split}" for fmt in ("sft", "dpo", "kto") for split in ("train", "heldout")),
        "heldout_raw",
        "manifest",
    }  # fmt: skip
    blob = "\n".join(p.read_text(encoding="utf-8") for p in paths.values())
    for secret in PII:
        assert secret not in blob, secret
    for placeholder in ("[EMAIL]", "[PHONE]", "[CARD]", "[SECRET]", "[IBAN]", "[SSN]", "[IP]"):
        assert placeholder in blob, placeholder
    # Every message, response and correction of the new items carried PII.
    assert built.stats["redacted_fields"] >= 30 * 3 + 10
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))


def test_written_files_are_trl_shaped_jsonl(tmp_path: Path) -> None:
    built = build(mixed(40), heldout_fraction=0.25)
    paths = write_jsonl(built, tmp_path)
    expected = {
        "sft": {"prompt", "completion"},
        "dpo": {"prompt", "chosen", "rejected"},
        "kto": {"prompt", "completion", "label"},
    }
    for fmt, keys in expected.items():
        for split in ("train", "heldout"):
            rows = [json.loads(line) for line in paths[f"{fmt}_{split}"].read_text().splitlines()]
            assert rows == getattr(built, split)[fmt]
            assert all(set(r) == keys for r in rows)
    raw = [json.loads(line) for line in paths["heldout_raw"].read_text().splitlines()]
    assert raw and {"interaction_id", "rating", "prompt", "messages", "response", "correction"} <= set(raw[0])
    assert {r["interaction_id"] for r in raw} == set(built.snapshot.heldout_ids)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["snapshot"]["sha256"] == built.snapshot.sha256 and manifest["method"] == built.method
    assert "good answer" not in paths["manifest"].read_text()  # summaries only, no example text


# ---------------------------------------------------------------------------------------------
# Curation


def test_duplicates_are_dropped_keeping_the_earliest() -> None:
    first = ri(1, user="hello world", response="the answer", minutes=5)
    same_normalized = ri(2, user="  hello   world \n", response="the answer  ", minutes=9)
    same_earlier = ri(3, user="hello world", response="the answer", minutes=1)
    other_rating = ri(4, user="hello world", response="the answer", rating="down")
    corr_a = ri(5, user="order", response="wrong", rating="down", correction="right")
    corr_b = ri(6, user="order", response="wrong", rating="down", correction="right ")
    same_id_again = dataclasses.replace(ri(7), interaction_id=uid(7).upper())  # same rater ("") too
    items = [first, same_normalized, same_earlier, other_rating, corr_a, corr_b, ri(7), same_id_again]
    for order in (items, list(reversed(items))):
        built = build(order)
        assert built.stats["dropped_duplicates"] == 4
        dup = {d["interaction_id"]: d["detail"] for d in built.drops if d["reason"] == "duplicates"}
        assert set(dup) == {uid(1), uid(2), uid(6), uid(7)}
        assert uid(3) in dup[uid(1)]  # the earliest of the three copies is the one kept
        kept = set(built.snapshot.interaction_ids)
        assert {uid(3), uid(4), uid(5), uid(7)} <= kept and not {uid(1), uid(2), uid(6)} & kept


def test_several_raters_of_one_interaction() -> None:
    base = ri(1, user="hello world", response="the answer")
    agree = [dataclasses.replace(base, rater_id=r) for r in ("a", "b")]
    disagree = dataclasses.replace(base, rater_id="c", rating="down")
    fixer = dataclasses.replace(base, rater_id="d", rating="down", correction="a better answer")
    items = [*agree, disagree, fixer]
    built = build(items)
    assert built.stats["dropped_duplicates"] == 1  # "b" says exactly what "a" said
    assert [e["label"] for e in built.train["kto"]] == [True, False, False, True]
    assert len(built.train["dpo"]) == 1 and built.snapshot.interaction_ids == [uid(1)]
    for order in (list(reversed(items)), random.Random(3).sample(items, len(items))):
        assert build(order).snapshot == built.snapshot


def test_empty_prompt_or_target_is_dropped() -> None:
    blank_prompt = ri(1, user="  \n ")
    no_messages = dataclasses.replace(ri(2), messages=[])
    blank_response = ri(3, response="   ")
    blank_response_corrected = ri(4, response=" ", rating="down", correction="the real answer")
    blank_correction = ri(5, response="fine", rating="up", correction="   ")
    noop_correction = ri(6, response="same text", rating="up", correction=" same  text ")
    built = build(
        [
            blank_prompt,
            no_messages,
            blank_response,
            blank_response_corrected,
            blank_correction,
            noop_correction,
        ]
    )
    assert built.stats["dropped_empty"] == 3
    assert {d["interaction_id"] for d in built.drops} == {uid(1), uid(2), uid(3)}
    assert [e["completion"] for e in built.train["sft"]] == [
        "the real answer<|im_end|>",
        "fine<|im_end|>",
        "same text<|im_end|>",
    ]
    assert built.train["dpo"] == []  # a blank rejected side makes no pair; a no-op edit is no pair either
    assert built.stats["corrections"] == 1


def test_oversized_dropped_by_chars() -> None:
    small, big = ri(1, response="short"), ri(2, response="word " * 200)
    corr_big = ri(3, response="short", rating="down", correction="long " * 200)
    built = build([small, big, corr_big], max_chars=300)
    assert built.stats["dropped_oversized"] == 2
    assert built.snapshot.interaction_ids == [uid(1)]


def test_oversized_dropped_by_tokens() -> None:
    tok = make_tokenizer("chatml")
    ok = ri(1, response="the answer is forty two")
    text = render_prompt(ok.messages, tok) + render_completion(ok.messages, ok.response_text, tok)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    longer = ri(2, response="the answer is forty two and that")
    built = build([ok, longer], max_tokens=n, max_chars=None)
    assert built.stats["dropped_oversized"] == 1
    assert built.snapshot.interaction_ids == [uid(1)]
    assert build([ok, longer], max_tokens=n + 2, max_chars=None).stats["dropped_oversized"] == 0


# ---------------------------------------------------------------------------------------------
# Rater cap


def test_rater_cap_keeps_the_largest_compliant_set() -> None:
    items = [ri(i, rater="A") for i in range(10)] + [
        ri(i, rater=r) for i, r in zip(range(10, 14), "BBCC", strict=True)
    ]
    kept, dropped = cap_rater_share(items, 0.5)
    kept_a = [k for k in kept if k.rater_id == "A"]
    assert len(kept_a) == 4 and len(kept) == 8 and len(dropped) == 6
    assert all(d.rater_id == "A" for d in dropped)
    # Maximal: one more item from A would put A above half.
    assert (len(kept_a) + 1) / (len(kept) + 1) > 0.5
    shuffled = random.Random(1).sample(items, len(items))
    assert {k.interaction_id for k in cap_rater_share(shuffled, 0.5)[0]} == {k.interaction_id for k in kept}
    assert cap_rater_share(items, 0.5, seed=1)[0] != kept  # the seed, not the input order, picks survivors


@pytest.mark.parametrize("seed", range(30))
def test_rater_cap_property(seed: int) -> None:
    rng = random.Random(seed)
    items = [ri(i, rater=rng.choice("ABCDE"[: rng.randint(2, 5)])) for i in range(rng.randint(5, 80))]
    share = rng.choice([0.2, 0.3, 0.5, 0.7])
    kept, dropped = cap_rater_share(items, share)
    assert len(kept) + len(dropped) == len(items)
    counts = {r: sum(k.rater_id == r for k in kept) for r in {i.rater_id for i in items}}
    for r, n in counts.items():
        assert n <= share * len(kept) + 1e-9
        # Maximal: restoring one dropped item of a capped rater breaks the cap.
        if any(d.rater_id == r for d in dropped):
            assert n + 1 > share * (len(kept) + 1)


def test_rater_cap_edge_cases() -> None:
    solo = [ri(i, rater="A") for i in range(5)]
    assert cap_rater_share(solo, 0.5) == ([], solo)
    assert cap_rater_share(solo, None) == (solo, [])
    assert cap_rater_share(solo, 1.0) == (solo, [])


def test_rater_cap_in_build() -> None:
    items = [ri(i, rater="spammer") for i in range(20)] + [ri(i, rater=f"u{i}") for i in range(20, 24)]
    built = build(items, max_rater_share=0.5)
    assert built.stats["dropped_rater_cap"] == 16
    assert sum(d["reason"] == "rater_cap" for d in built.drops) == 16
    assert built.stats["sft_train"] == 8


def test_one_key_posting_as_a_thousand_raters_is_capped_as_one_key() -> None:
    """Rotating rater ids passes the per-rater cap; the per-key cap still holds the key to its
    share (and the same rater id under two keys is two raters)."""
    from dataclasses import replace

    flood = [replace(ri(i, rater=f"sock{i}"), posted_by="key-mallory") for i in range(1000)]
    honest = [replace(ri(1000 + i, rater=f"u{i}"), posted_by=f"key-{i % 3}") for i in range(30)]
    built = build(flood + honest, max_rater_share=0.5, max_key_share=0.5)
    kept = [d for d in built.drops if d["reason"] == "rater_cap"]
    assert len(kept) == 1000 - 30  # the flood keeps as many items as everyone else together
    assert built.stats["sft_train"] == 60
    # Without the key cap the flood passes the rater cap untouched: 1,000 of 1,030.
    assert build(flood + honest, max_rater_share=0.5).stats["sft_train"] == 1030
    same_name = [replace(ri(i, rater="alice"), posted_by=f"key-{i % 2}") for i in range(4)]
    assert build(same_name, max_rater_share=0.5).stats["sft_train"] == 4  # two raters, 50% each


# ---------------------------------------------------------------------------------------------
# Held-out split


IDS = [str(uuid.UUID(int=random.Random(7).getrandbits(128) ^ i, version=4)) for i in range(10_000)]


def test_split_fraction_is_approximately_right() -> None:
    for fraction in (0.1, 0.25):
        share = sum(is_heldout(i, fraction) for i in IDS) / len(IDS)
        assert abs(share - fraction) < 0.015, share  # binomial sd is ~0.003-0.004 here


def test_split_is_deterministic_monotone_and_salted() -> None:
    first = [is_heldout(i, 0.1) for i in IDS]
    assert first == [is_heldout(i, 0.1) for i in IDS]
    wider = [is_heldout(i, 0.2) for i in IDS]
    assert all(
        w for f, w in zip(first, wider, strict=True) if f
    )  # raising the fraction only adds to held-out
    salted = [is_heldout(i, 0.1, salt="v2") for i in IDS]
    assert salted != first
    assert not any(is_heldout(i, 0.0) for i in IDS[:100]) and all(is_heldout(i, 1.0) for i in IDS[:100])
    u = uuid.UUID(IDS[3])
    assert is_heldout(str(u).upper(), 0.5) == is_heldout(str(u), 0.5) == is_heldout(u, 0.5)


def test_split_is_the_same_in_another_process() -> None:
    code = (
        "import json,sys; from workers.dataset import is_heldout; "
        "ids=json.loads(sys.stdin.read()); print(json.dumps([is_heldout(i, 0.3, salt='s') for i in ids]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(IDS[:500]),
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(out.stdout) == [is_heldout(i, 0.3, salt="s") for i in IDS[:500]]


def test_build_splits_by_id() -> None:
    items = mixed(200)
    built = build(items, heldout_fraction=0.2)
    expected = sorted(uid(i) for i in range(200) if is_heldout(uid(i), 0.2))
    assert built.snapshot.heldout_ids == expected and 20 < len(expected) < 60
    train_prompts = {e["prompt"] for fmt in ("sft", "dpo", "kto") for e in built.train[fmt]}
    heldout_prompts = {e["prompt"] for fmt in ("sft", "dpo", "kto") for e in built.heldout[fmt]}
    assert not train_prompts & heldout_prompts
    assert {r["interaction_id"] for r in built.heldout_raw} == set(expected)
    raw = {r["interaction_id"]: r for r in built.heldout_raw}
    src = {uid(i): it for i, it in enumerate(items)}
    for hid in expected:
        assert raw[hid]["rating"] == src[hid].rating
        assert raw[hid]["response"] == src[hid].response_text
        assert raw[hid]["correction"] == src[hid].correction


# ---------------------------------------------------------------------------------------------
# KTO weights


@pytest.mark.parametrize(
    ("n_good", "n_bad"),
    [
        (1, 1),
        (4, 3),
        (10, 9),
        (7, 6),
        (100, 10),
        (10, 100),
        (1, 1000),
        (1000, 1),
        (3, 4),
        (5, 50),
        (50, 37),
        (13, 14),
    ],
)
def test_kto_weighted_ratio_in_trl_band(n_good: int, n_bad: int) -> None:
    w_good, w_bad = kto_weights(n_good, n_bad)
    ratio = (n_good * w_good) / (n_bad * w_bad)
    assert 1.0 - 1e-9 <= ratio <= 4 / 3 + 1e-9, ratio
    assert 1.0 in (w_good, w_bad) and min(w_good, w_bad) >= 1.0  # only the minority is scaled up
    if 1.0 <= n_good / n_bad <= 4 / 3:
        assert (w_good, w_bad) == (1.0, 1.0)


def test_kto_weights_of_a_built_dataset() -> None:
    built = build(mixed(60), method="kto")
    labels = [e["label"] for e in built.train["kto"]]
    n_good, n_bad = labels.count(True), labels.count(False)
    assert n_good != n_bad
    ratio = (n_good * built.kto_desirable_weight) / (n_bad * built.kto_undesirable_weight)
    assert 1.0 <= ratio <= 4 / 3


# ---------------------------------------------------------------------------------------------
# Method choice


@pytest.mark.parametrize(
    ("method", "counts", "expected"),
    [
        ("sft", DataCounts(ups=1), "sft"),
        ("dpo", DataCounts(downs=1, corrections=1), "dpo"),
        ("kto", DataCounts(ups=1, downs=1), "kto"),
        ("auto", DataCounts(ups=10, downs=10, corrections=8), "dpo"),
        ("auto", DataCounts(ups=100, downs=100, corrections=8), "kto"),  # pairs too small a share
        ("auto", DataCounts(ups=10, downs=10, corrections=7), "kto"),  # too few pairs
        ("auto", DataCounts(downs=4, corrections=4, pairs=0), "kto"),  # corrections without a rejected side
        ("auto", DataCounts(ups=10, downs=3), "sft"),
        ("auto", DataCounts(corrections=2), "sft"),
        ("auto", {"ups": 5, "downs": 5, "corrections": 9}, "dpo"),
    ],
)
def test_choose_method(method: str, counts, expected: str) -> None:
    chosen, reason = choose_method(method, counts)
    assert chosen == expected
    assert expected in reason and len(reason) > 20


@pytest.mark.parametrize(
    ("method", "counts", "message"),
    [
        ("sft", DataCounts(downs=5), "sft needs thumbs-up or corrections; got 0"),
        ("dpo", DataCounts(ups=3, downs=2), "dpo needs correction pairs; got 0"),
        ("dpo", DataCounts(corrections=2, pairs=0), "dpo needs correction pairs; got 0"),
        ("kto", DataCounts(ups=5), "kto needs desirable .* got 5 desirable, 0 undesirable"),
        ("kto", DataCounts(downs=5), "got 0 desirable, 5 undesirable"),
        ("auto", DataCounts(downs=10), "auto: nothing to imitate"),
        ("auto", DataCounts(), "auto: nothing to imitate"),
    ],
)
def test_choose_method_errors(method: str, counts: DataCounts, message: str) -> None:
    with pytest.raises(NotEnoughData, match=message):
        choose_method(method, counts)


def test_choose_method_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        choose_method("ppo", DataCounts(ups=5))


def test_build_reports_why_data_is_not_enough() -> None:
    with pytest.raises(NotEnoughData, match="dpo needs correction pairs; got 0") as err:
        build([ri(i) for i in range(5)], method="dpo")
    assert err.value.stats["input"] == 5 and err.value.stats["ups"] == 5
    with pytest.raises(NotEnoughData, match="min_examples 10"):
        build([ri(i) for i in range(5)], method="sft", min_examples=10)


def test_build_auto_picks_dpo_when_corrections_dominate() -> None:
    items = [ri(i, response=f"wrong {i}", rating="down", correction=f"right {i}") for i in range(10)]
    built = build([*items, ri(100)])
    assert built.method == "dpo" and built.stats["dpo_train"] == 10
    assert "10 correction pairs" in built.reason


# ---------------------------------------------------------------------------------------------
# Replay


def test_sample_replay_is_deterministic_and_only_good() -> None:
    pool = mixed(100, start=1000)
    a = sample_replay(pool, 10, seed=3)
    assert a == sample_replay(list(reversed(pool)), 10, seed=3)
    assert a == sample_replay(pool, 50, seed=3)[:10]  # prefix-consistent
    assert a != sample_replay(pool, 10, seed=4)
    assert len(a) == 10 and all(x.rating == "up" or x.correction for x in a)
    good = [x for x in pool if x.rating == "up" or x.correction]
    assert len(sample_replay(pool + pool, 1000, seed=0)) == len(good)  # ids deduplicated, downs never
    assert sample_replay(pool, 0) == []


def test_replay_is_never_held_out_and_mixes_into_sft_kto_only() -> None:
    new, pool = mixed(80), mixed(400, start=5000)
    pool_ids = {x.interaction_id for x in pool}
    # Some pool items duplicate a new item's content or id: never replayed.
    pool += [
        dataclasses.replace(new[2], interaction_id=uid("dup-content")),
        dataclasses.replace(pool[2], interaction_id=new[3].interaction_id),
    ]
    built = build(new, pool, heldout_fraction=0.3, replay_fraction=0.2, method="kto")
    replay = set(built.snapshot.replay_ids)
    n_train = built.stats["train_items"]
    assert built.stats["replay"] == len(replay) == round(n_train * 0.2 / 0.8)
    assert replay <= pool_ids
    assert not replay & set(built.snapshot.heldout_ids)
    assert not any(is_heldout(r, 0.3) for r in replay)
    replay_prompts = {render_prompt(x.messages, make_tokenizer()) for x in pool if x.interaction_id in replay}
    assert not replay_prompts & {e["prompt"] for fmt in ("sft", "dpo", "kto") for e in built.heldout[fmt]}
    assert not replay_prompts & {e["prompt"] for e in built.train["dpo"]}
    replay_kto = [e for e in built.train["kto"] if e["prompt"] in replay_prompts]
    assert replay_kto and all(e["label"] for e in replay_kto)  # old negatives are not replayed
    assert {e["prompt"] for e in built.train["sft"]} & replay_prompts


def test_no_replay_for_dpo() -> None:
    items = [ri(i, response=f"wrong {i}", rating="down", correction=f"right {i}") for i in range(10)]
    built = build(items, mixed(50, start=900), replay_fraction=0.5, method="dpo")
    assert built.stats["replay"] == 0 and built.snapshot.replay_ids == []


# ---------------------------------------------------------------------------------------------
# Lineage


def snapshot_fixture_sha() -> str:
    """Used in-process and from a subprocess with another hash seed."""
    new = mixed(60) + _pii_items(300, 10)
    return build(new, mixed(100, start=2000), heldout_fraction=0.2, replay_fraction=0.2).snapshot.sha256


def test_snapshot_is_stable_across_runs_orders_and_processes() -> None:
    new, pool = mixed(60), mixed(100, start=2000)
    a = build(new, pool, heldout_fraction=0.2, replay_fraction=0.2)
    b = build(
        list(reversed(new)),
        random.Random(5).sample(pool, len(pool)),
        heldout_fraction=0.2,
        replay_fraction=0.2,
    )
    assert a.snapshot == b.snapshot and a.train == b.train and a.heldout == b.heldout
    assert a.snapshot.interaction_ids == sorted(a.snapshot.interaction_ids)
    assert len(a.snapshot.sha256) == 64
    code = "import sys; sys.path.insert(0, 'tests/unit'); import test_dataset as t; "
    code += "print(t.snapshot_fixture_sha())"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "999"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    assert out.stdout.strip() == snapshot_fixture_sha()


def test_snapshot_changes_when_data_changes() -> None:
    new = mixed(40)
    base = build(new, heldout_fraction=0.2).snapshot
    edited = list(new)
    edited[5] = dataclasses.replace(edited[5], response_text="a different answer")
    assert build(edited, heldout_fraction=0.2).snapshot.sha256 != base.sha256
    flipped = list(new)
    flipped[6] = dataclasses.replace(flipped[6], rating="down")
    assert build(flipped, heldout_fraction=0.2).snapshot.sha256 != base.sha256
    fewer = build(new[:-1], heldout_fraction=0.2).snapshot
    assert fewer.sha256 != base.sha256 and fewer.interaction_ids != base.interaction_ids


def test_write_jsonl_is_byte_identical_across_runs(tmp_path: Path) -> None:
    one = write_jsonl(build(mixed(30), heldout_fraction=0.2), tmp_path / "a")
    two = write_jsonl(build(mixed(30), heldout_fraction=0.2), tmp_path / "b")
    for key in one:
        assert one[key].read_bytes() == two[key].read_bytes(), key


# ---------------------------------------------------------------------------------------------
# Policy and redactor plumbing


def test_policy_validation() -> None:
    assert DatasetConfig.from_dict({"method": "kto", "heldout_fraction": 0.2}).method == "kto"
    with pytest.raises(ValueError, match="unknown dataset policy keys: heldout"):
        DatasetConfig.from_dict({"heldout": 0.2})
    for bad in (
        {"method": "ppo"},
        {"heldout_fraction": 1.0},
        {"replay_fraction": -0.1},
        {"max_rater_share": 0.0},
    ):
        with pytest.raises(ValueError):
            DatasetConfig(**bad)


def test_redactor_is_pluggable() -> None:
    item = ri(1, user="mail jane@example.com", response="ok")
    assert "[EMAIL]" in build([item]).train["sft"][0]["prompt"]
    assert "jane@example.com" in build([item], redactor=NullRedactor()).train["sft"][0]["prompt"]

    class Upper:
        def redact(self, text: str) -> str:
            return text.upper()

    assert build([item], redactor=Upper()).train["sft"][0]["completion"] == "OK<|im_end|>"
