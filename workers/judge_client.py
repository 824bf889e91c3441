"""Asking an OpenAI-compatible judge model to rate answers, and reading what it says.

Two shapes: `rate_one` (one answer, up or down, with a reason) and `rank_group` (several answers
to one conversation scored against each other, RULER-style, each 0-1). A judge that is down,
slow, or answers something that is not the verdict asked for is retried with backoff; after the
last try the call raises JudgeFailed with a short reason (`unreachable`, `timeout`,
`http_<status>`, `unparseable`) that the sweep records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, Field, ValidationError
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from service.domain.policy import JudgePolicy


class JudgeFailed(Exception):
    """The judge gave no usable verdict after its retries; `reason` is short and fixed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    @property
    def unreachable(self) -> bool:
        """Whether the endpoint itself is down (the sweep stops instead of trying every item)."""
        return self.reason in ("unreachable", "timeout")


class _Retry(Exception):
    """One try failed in a way worth another."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class Verdict(BaseModel):
    verdict: str = Field(pattern="^(up|down)$")
    reason: str = Field("", max_length=2000)


class Scored(BaseModel):
    answer: int = Field(ge=1)
    score: float = Field(ge=0, le=1)
    reason: str = Field("", max_length=2000)


class Ranking(BaseModel):
    scores: list[Scored] = Field(min_length=1)


@dataclass(frozen=True)
class Rating:
    """One answer's rating by the judge."""

    rating: str  # "up" | "down"
    reason: str
    score: float | None = None  # relative mode's 0-1 score


_ABSOLUTE_SYSTEM = """You rate one answer an AI assistant gave, by this rubric:
{rubric}

Reply with JSON only: {{"verdict": "up" or "down", "reason": "<one short sentence>"}}."""

_RELATIVE_SYSTEM = """You compare {n} answers an AI assistant gave to the same conversation, by \
this rubric:
{rubric}

Score each answer from 0 (worst) to 1 (best), relative to the others: the best answer need not \
be perfect, and answers as good as each other get the same score.
Reply with JSON only: {{"scores": [{{"answer": <number>, "score": <0-1>, "reason": "<short>"}}, \
...]}} with one entry per answer."""


def _conversation(messages: list[dict[str, Any]]) -> str:
    lines = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m.get("tool_calls"):
            content = f"{content or ''} [tool calls: {json.dumps(m['tool_calls'])[:2000]}]"
        lines.append(f"[{m.get('role', 'user')}] {content or ''}")
    return "\n".join(lines)


def absolute_messages(policy: JudgePolicy, messages: list[dict], answer: str) -> list[dict]:
    """The chat sent to the judge to rate one answer."""
    return [{"role": "system", "content": _ABSOLUTE_SYSTEM.format(rubric=policy.rubric)},
            {"role": "user", "content": f"Conversation:\n{_conversation(messages)}\n\n"
                                        f"Answer to rate:\n{answer}"}]


def relative_messages(policy: JudgePolicy, messages: list[dict], answers: list[str]) -> list[dict]:
    """The chat sent to the judge to score several answers to one conversation."""
    listed = "\n\n".join(f"Answer {n}:\n{a}" for n, a in enumerate(answers, 1))
    return [{"role": "system", "content": _RELATIVE_SYSTEM.format(n=len(answers),
                                                                  rubric=policy.rubric)},
            {"role": "user", "content": f"Conversation:\n{_conversation(messages)}\n\n{listed}"}]


def _schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": model.model_json_schema()}}


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse(model: type[BaseModel], content: str) -> BaseModel:
    """The first JSON object in the judge's text, validated; ValueError when there is none."""
    match = _JSON_OBJECT.search(content or "")
    if match is None:
        raise ValueError("no JSON object in the answer")
    try:
        return model.model_validate(json.loads(match.group(0)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"not the verdict asked for: {str(exc)[:200]}") from exc


class JudgeClient:
    """One judge endpoint (the policy's url and model); sync, for the worker."""

    def __init__(self, policy: JudgePolicy, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        if policy.url is None:
            raise ValueError("the judge policy has no url: the judge is off")
        self.policy = policy
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=policy.url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(policy.timeout_s, connect=5.0),
                                  transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rate_one(self, messages: list[dict], answer: str) -> Rating:
        """Up or down for one answer."""
        v = self._ask(absolute_messages(self.policy, messages, answer), Verdict, "verdict")
        return Rating(v.verdict, v.reason)

    def rank_group(self, messages: list[dict], answers: list[str]) -> list[Rating]:
        """Scores for several answers to one conversation, in their order; an answer the judge
        left out of its reply makes the reply unusable (it is retried)."""
        def check(r: Ranking) -> Ranking:
            got = {s.answer for s in r.scores}
            if got != set(range(1, len(answers) + 1)):
                raise ValueError(f"scored answers {sorted(got)}, expected 1..{len(answers)}")
            return r

        ranking = self._ask(relative_messages(self.policy, messages, answers), Ranking, "ranking",
                            check=check)
        by_number = {s.answer: s for s in ranking.scores}
        cut = self.policy.up_threshold
        return [Rating("up" if by_number[n].score >= cut else "down", by_number[n].reason,
                       by_number[n].score) for n in range(1, len(answers) + 1)]

    def _ask(self, chat: list[dict], model: type[BaseModel], name: str, check=None):
        p = self.policy
        body: dict[str, Any] = {"model": p.model, "messages": chat, "temperature": 0,
                                "max_tokens": p.max_tokens}
        if p.structured:
            body["response_format"] = _schema(model, name)

        def once():
            try:
                r = self._http.post("/chat/completions", json=body)
            except httpx.TimeoutException as exc:
                raise _Retry("timeout", type(exc).__name__) from exc
            except httpx.TransportError as exc:
                raise _Retry("unreachable", type(exc).__name__) from exc
            if r.status_code >= 400:
                raise _Retry(f"http_{r.status_code}", r.text[:200])
            try:
                content = r.json()["choices"][0]["message"]["content"]
                parsed = parse(model, content)
                return check(parsed) if check else parsed
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise _Retry("unparseable", str(exc)[:200]) from exc

        def worth_retrying(exc: BaseException) -> bool:
            # A request the judge refuses as malformed (400, 401, 404, ...) fails the same again.
            return isinstance(exc, _Retry) and not (exc.reason.startswith("http_4")
                                                    and exc.reason != "http_429")

        retrying = Retrying(stop=stop_after_attempt(p.retries + 1), reraise=False,
                            wait=wait_exponential(multiplier=p.backoff_s, max=30),
                            retry=retry_if_exception(worth_retrying))
        try:
            return retrying(once)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            assert isinstance(last, _Retry)  # only a _Retry is retried, so tries ran out on one
            raise JudgeFailed(last.reason, last.detail) from last
        except _Retry as exc:  # not retried (a 4xx): raised as is by tenacity
            raise JudgeFailed(exc.reason, exc.detail) from exc
