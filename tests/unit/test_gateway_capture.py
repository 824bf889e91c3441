"""What the gateway captures from vLLM's answers: text, and the tool calls an answer made.

The bodies are vLLM 0.32's own serialisations (its ChatCompletionResponse and, for streams,
ChatCompletionStreamResponse.model_dump_json(exclude_unset=True) with the DeltaToolCall pieces
its tool parsers emit: id, type and name first, then the arguments in pieces).
"""

from __future__ import annotations

import json

import httpx

from service.api.gateway import Capture, complete, merge_tool_call_deltas, relay_stream
from service.engine.replicas import ReplicaPool

ARGS = '{"city": "Oslo"}'
NON_STREAM = (
    '{"id":"chatcmpl-2","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    '"message":{"role":"assistant","content":null,"refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"tool_calls":[{"id":"chatcmpl-tool-b2","type":"function","function":'
    '{"name":"get_weather","arguments":"{\\"city\\": \\"Oslo\\"}"}}],"reasoning":null},'
    '"logprobs":null,"finish_reason":"tool_calls","stop_reason":null,"token_ids":null,'
    '"routed_experts":null}],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}}'
)
_CHOICE = '"logprobs":null,"finish_reason":null}]}'
_HEAD = '{"id":"chatcmpl-1","created":1,"model":"m","choices":'
STREAM = [
    _HEAD + '[{"index":0,"delta":{"role":"assistant","content":""},' + _CHOICE,
    _HEAD + '[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-a1","type":"function","index":0,'
    '"function":{"name":"get_weather"}}]},' + _CHOICE,
    _HEAD + '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": "}}]},'
    + _CHOICE,
    _HEAD + '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Oslo\\"}"}}]},'
    + _CHOICE,
    _HEAD + '[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"tool_calls"}]}',
    _HEAD + '[],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}}',
]
CALL = {"id": "chatcmpl-tool-a1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}


def _sse(chunks: list[str]) -> bytes:
    return "".join(f"data: {c}\n\n" for c in [*chunks, "[DONE]"]).encode()


async def _relay(chunks: list[str]) -> tuple[Capture, list[str]]:
    capture = Capture()
    response = httpx.Response(200, content=_sse(chunks))
    sent = [d async for d in relay_stream(response, capture, alias="bot", interaction_id="i-1",
                                          client_wants_usage=False)]
    return capture, sent


async def test_a_streamed_tool_call_is_assembled_from_its_pieces() -> None:
    capture, sent = await _relay(STREAM)
    assert capture.tool_calls == [CALL]
    assert json.loads(capture.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert capture.text == "" and capture.finish_reason == "tool_calls"
    assert capture.ttft_ms is not None  # the first tool-call piece is the first token
    assert (capture.prompt_tokens, capture.completion_tokens) == (5, 7)
    # The client gets every piece as vLLM sent it (only the model name is rewritten).
    relayed = [json.loads(d) for d in sent[:-1]]
    assert [c["choices"] for c in relayed] == [json.loads(c)["choices"] for c in STREAM[:-1]]
    assert sent[-1] == "[DONE]"


async def test_parallel_streamed_calls_are_kept_apart_by_index() -> None:
    def piece(delta: dict) -> str:
        return json.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}]})

    chunks = [
        piece({"id": "call-a", "type": "function", "index": 0, "function": {"name": "get_weather"}}),
        piece({"id": "call-b", "type": "function", "index": 1, "function": {"name": "get_time"}}),
        piece({"index": 1, "function": {"arguments": '{"tz": '}}),
        piece({"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}),
        piece({"index": 1, "function": {"arguments": '"CET"}'}}),
    ]
    capture, _ = await _relay(chunks)
    assert capture.tool_calls == [
        {"id": "call-a", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
        {"id": "call-b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]


async def test_a_streamed_text_answer_has_no_tool_calls() -> None:
    chunks = [json.dumps({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {"content": part}, "finish_reason": None}]}) for part in ("Hel", "lo")]
    capture, _ = await _relay(chunks)
    assert capture.text == "Hello" and capture.tool_calls is None


def test_repeated_id_and_name_are_not_doubled() -> None:
    # Some servers repeat the id and name on every piece; only the arguments are concatenated.
    calls: dict[int, dict] = {}
    for args in ('{"city": ', '"Oslo"}'):
        merge_tool_call_deltas(calls, [{"index": 0, "id": "call-a", "type": "function",
                                        "function": {"name": "get_weather", "arguments": args}}])
    assert list(calls.values()) == [
        {"id": "call-a", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]


async def test_a_non_streamed_tool_call_is_captured() -> None:
    def vllm(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is False
        return httpx.Response(200, content=NON_STREAM, headers={"content-type": "application/json"})

    pool = ReplicaPool(["http://replica"], base_name="base", connect_timeout_s=1, read_timeout_s=1)
    pool.replicas[0].client = httpx.AsyncClient(base_url="http://replica",
                                                transport=httpx.MockTransport(vllm))
    capture = Capture()
    try:
        body = await complete(pool, "base", {"messages": [{"role": "user", "content": "hi"}]}, capture)
    finally:
        await pool.aclose()
    assert capture.tool_calls == [{"id": "chatcmpl-tool-b2", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ARGS}}]
    assert capture.text == "" and capture.finish_reason == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"] == capture.tool_calls
