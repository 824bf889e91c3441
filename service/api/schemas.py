"""Request and response bodies of the gateway and feedback API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from service.db.models import JUDGE_RATER_PREFIX


def _no_nul(value: str) -> str:
    # Postgres text cannot hold U+0000: refuse it as bad input rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    return value


NoNul = AfterValidator(_no_nul)
AliasPath = Annotated[str, Path(min_length=1, max_length=100), NoNul]
AliasQuery = Annotated[str | None, Query(max_length=100), AfterValidator(
    lambda v: _no_nul(v) if v is not None else v)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request. Unknown fields are forwarded to vLLM, which validates them."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=200), NoNul]
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    user: Annotated[str, NoNul] | None = Field(default=None, max_length=200)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Feedback is per answer: one choice per interaction.
    n: Literal[1] = 1
    stream_options: dict[str, Any] | None = None

    def upstream_payload(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"n"})

    def stored_params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"messages", "model", "stream_options"})


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interaction_id: uuid.UUID
    rating: Literal["up", "down"]
    correction: str | None = Field(default=None, max_length=100_000)
    comment: str | None = Field(default=None, max_length=10_000)
    rater_id: Annotated[str, NoNul] | None = Field(default=None, max_length=200)

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("correction must not be blank; omit it instead")
        return v

    @field_validator("rater_id")
    @classmethod
    def _not_the_judge(cls, v: str | None) -> str | None:
        if v is not None and v.lower().startswith(JUDGE_RATER_PREFIX):
            raise ValueError(f"the prefix {JUDGE_RATER_PREFIX!r} is reserved for the AI judge's "
                             "ratings")
        return v


class FeedbackOut(BaseModel):
    id: uuid.UUID
    interaction_id: uuid.UUID
    rating: str
    rater_id: str
    correction: str | None = None
    comment: str | None = None
    # "human" (posted or imported) or "judge" (the AI judge; rater_id "judge:<model>").
    source: str = "human"
    replaced: bool = False
    # True (202): the interaction is in the local spool during a database outage; the rating
    # is kept there too and attached when both are written back.
    pending: bool = False
    created_at: datetime
    updated_at: datetime


class InteractionOut(BaseModel):
    id: uuid.UUID
    tenant_id: str
    alias: str
    served_model: str
    version_id: uuid.UUID | None
    user: str | None
    messages: list[Any]
    params: dict[str, Any]
    response_text: str
    # OpenAI's tool_calls when the answer called tools (null for a text answer).
    response_tool_calls: list[Any] | None = None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    ttft_ms: float | None
    stream: bool
    created_at: datetime
    # Imported interactions: the source ("openwebui", "langfuse", "jsonl"), the record's id
    # there and the import; null for what the gateway served.
    source: str | None = None
    source_id: str | None = None
    import_id: uuid.UUID | None = None
    feedback: list[FeedbackOut]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
