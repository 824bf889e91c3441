"""Turn rated interactions into SFT / DPO / KTO datasets.

Pure functions, no I/O except `write_jsonl`: redaction, curation (empty, oversized, duplicates,
per-rater cap), a deterministic held-out split by interaction id, rendering with the tokenizer's
own chat template and the template arguments vLLM gave it (tools, chat_template_kwargs: see
workers/chat_request.py), example construction, method choice, replay sampling and lineage hashing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

from service.domain.policy import Policy
from service.files import atomic_write_bytes
from workers.chat_request import (
    UnsupportedRequest,
    template_args,
    template_fields,
    template_messages,
)
from workers.config_dict import from_mapping
from workers.redaction import (  # re-exported: callers configure redaction through this module
    NullRedactor,
    PresidioRedactor,
    Redactor,
    RedactorUnavailable,
    RegexRedactor,
    get_redactor,
)

__all__ = [
    "BuiltDataset",
    "DataCounts",
    "DatasetConfig",
    "DatasetError",
    "NotEnoughData",
    "NullRedactor",
    "PresidioRedactor",
    "RatedInteraction",
    "Redactor",
    "RedactorUnavailable",
    "RegexRedactor",
    "Snapshot",
    "TemplateMismatch",
    "answer_message",
    "auto_special_prefix",
    "build_dataset",
    "canonical_json",
    "cap_rater_share",
    "choose_method",
    "dataset_sha256",
    "engine_prompt",
    "get_redactor",
    "heldout_answer",
    "heldout_completion",
    "is_heldout",
    "kto_weights",
    "render_completion",
    "render_prompt",
    "sample_replay",
    "training_prompt",
    "write_jsonl",
]

METHODS = ("sft", "kto", "dpo")
POLICY_METHODS = (*METHODS, "auto")
RATINGS = ("up", "down")
JUDGE = "judge"  # feedback.source of the AI judge's ratings (service.db.models)
FORMATS = ("sft", "dpo", "kto")

# TRL's KTO guidance: weighted desirable:undesirable between 1:1 and 4:3. Aim inside, not at an edge.
KTO_RATIO_MIN = 1.0
KTO_RATIO_MAX = 4.0 / 3.0
KTO_RATIO_TARGET = 7.0 / 6.0

# The shipped policy's values: DatasetConfig's defaults are these, not numbers of its own.
_POLICY = Policy()


class DatasetError(ValueError):
    """The data or the policy cannot produce a dataset."""


class NotEnoughData(DatasetError):
    """The curated data cannot support the requested (or any) training method."""

    def __init__(self, message: str, *, stats: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.stats: dict[str, Any] = dict(stats or {})


class TemplateMismatch(DatasetError):
    """The chat template renders the prompt differently alone than inside the full conversation."""


@dataclass(frozen=True)
class RatedInteraction:
    """One chat exchange with its rating, as read from the interactions + feedback tables."""

    interaction_id: str  # UUID string
    messages: list[dict]  # OpenAI chat messages sent by the product
    response_text: str  # what the model answered
    rating: str  # "up" | "down"
    correction: str | None  # the answer the user wanted (optional)
    rater_id: str  # "" if unknown
    created_at: datetime
    version: str | None = None  # lora name that answered
    posted_by: str = ""  # the API key that posted the rating ("" if unknown)
    params: Mapping[str, Any] = field(default_factory=dict)  # the request's other fields (tools, ...)
    response_tool_calls: list[dict] | None = None  # OpenAI's tool_calls when the answer called tools
    finish_reason: str | None = None  # "pending": stored before its answer arrived
    source: str = "human"  # "judge": rated by the AI judge (capped, never held out)


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer this module uses."""

    eos_token: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """Render (or tokenize) a conversation with the model's chat template."""
        ...

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> Any:
        """Tokenize text."""
        ...

    def convert_ids_to_tokens(self, ids: list[int]) -> str | list[str]:
        """Token strings for ids (Hugging Face types one id's string in the same method)."""
        ...


@dataclass(frozen=True)
class DatasetConfig:
    """How one build turns ratings into a dataset.

    An alias's policy (service.domain.policy, policies/*.yaml) sets these through
    workers.recipe.dataset_config, and the defaults are the policy's: its dataset section's
    heldout_fraction, replay_fraction, max_chars and min_examples, training.method and
    training.seed, and judge.max_share as max_judge_share. Differences from the policy:

    - max_tokens: None, no bound in tokens (the mapping passes the policy's
      training.max_length, never above the engine's context).
    - max_rater_share, max_key_share: None, no cap (the mapping applies the policy's
      dataset.max_rater_share to each only where the data names at least two raters, or two
      posting keys: one is not capped against itself).
    - split_salt, dpo_min_pairs, dpo_min_share, kto_min_per_class: not in the policy.
    """

    method: str = _POLICY.training.method  # "sft" | "kto" | "dpo" | "auto"
    heldout_fraction: float = _POLICY.dataset.heldout_fraction
    # Share of the SFT/KTO training items drawn from earlier good data (against forgetting).
    replay_fraction: float = _POLICY.dataset.replay_fraction
    max_chars: int | None = _POLICY.dataset.max_chars  # on the rendered prompt+completion
    max_tokens: int | None = None  # same, in tokens; needs a tokenizer that can tokenize
    max_rater_share: float | None = None  # e.g. 0.5: poisoning guard; None disables
    # The same cap per posting API key: one key inventing rater ids is still one key.
    max_key_share: float | None = None
    min_examples: int = _POLICY.dataset.min_examples  # in the chosen format's training set
    seed: int = _POLICY.training.seed  # replay sampling and rater-cap tie breaking
    split_salt: str = ""  # change to re-draw the held-out set (invalidates comparability)
    dpo_min_pairs: int = 8  # auto: DPO needs at least this many correction pairs...
    dpo_min_share: float = 0.25  # ...making up at least this share of rated responses
    kto_min_per_class: int = 4  # auto: KTO needs this many desirable and undesirable examples
    # The most judge-rated items in the training set, as a share of it (0: none train).
    max_judge_share: float = _POLICY.judge.max_share

    def __post_init__(self) -> None:
        if self.method not in POLICY_METHODS:
            raise ValueError(f"method must be one of {POLICY_METHODS}, got {self.method!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError("replay_fraction must be in [0, 1)")
        if self.max_rater_share is not None and not 0.0 < self.max_rater_share <= 1.0:
            raise ValueError("max_rater_share must be in (0, 1] or None")
        for name in ("max_chars", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None")
        if self.min_examples < 1 or self.dpo_min_pairs < 1 or self.kto_min_per_class < 1:
            raise ValueError("min_examples, dpo_min_pairs and kto_min_per_class must be >= 1")
        if not 0.0 <= self.dpo_min_share <= 1.0:
            raise ValueError("dpo_min_share must be in [0, 1]")
        if not 0.0 <= self.max_judge_share < 1.0:
            raise ValueError("max_judge_share must be in [0, 1)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetConfig:
        """Build from a mapping; unknown keys are an error, not ignored."""
        return from_mapping(cls, data, "dataset policy keys")


@dataclass(frozen=True)
class DataCounts:
    """Rated responses and corrections in a training set; what method choice looks at.

    `ups`/`downs` count non-empty responses by rating (corrected ones included), `corrections`
    usable corrections, `pairs` corrections that also have a response to reject (DPO pairs).
    """

    ups: int = 0
    downs: int = 0
    corrections: int = 0
    pairs: int | None = None  # None: same as corrections

    @property
    def dpo_pairs(self) -> int:
        """Number of (chosen=correction, rejected=response) pairs."""
        return self.corrections if self.pairs is None else self.pairs

    @property
    def desirable(self) -> int:
        """KTO desirable examples: thumbs-up responses plus corrections."""
        return self.ups + self.corrections

    @property
    def undesirable(self) -> int:
        """KTO undesirable examples: thumbs-down responses."""
        return self.downs


@dataclass(frozen=True)
class Snapshot:
    """Lineage of a built dataset: which interactions went in and a hash of what came out."""

    interaction_ids: list[str]  # sorted; new train + held-out + replay
    heldout_ids: list[str]
    replay_ids: list[str]
    sha256: str  # over the canonical JSON of train + held-out examples

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the run record."""
        return asdict(self)


@dataclass
class BuiltDataset:
    """Everything a training run needs from the data, plus what a run record should keep."""

    method: str
    reason: str
    train: dict[str, list[dict[str, Any]]]  # "sft" | "dpo" | "kto" -> examples
    heldout: dict[str, list[dict[str, Any]]]
    # Per held-out interaction: interaction_id, rating, messages, params, prompt, response,
    # response_tool_calls, correction, version.
    heldout_raw: list[dict[str, Any]]
    kto_desirable_weight: float
    kto_undesirable_weight: float
    stats: dict[str, int]
    snapshot: Snapshot
    drops: list[dict[str, str]] = field(default_factory=list)  # interaction_id, reason, detail
    warnings: list[str] = field(default_factory=list)  # train/serve mismatches worth a human look

    def manifest(self) -> dict[str, Any]:
        """JSON-safe summary (no example text) for the run record and manifest.json."""
        return {
            "method": self.method,
            "reason": self.reason,
            "kto_desirable_weight": self.kto_desirable_weight,
            "kto_undesirable_weight": self.kto_undesirable_weight,
            "stats": dict(self.stats),
            "snapshot": self.snapshot.to_dict(),
            "drops": list(self.drops),
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------
# Split, hashing, sampling


def _unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from sha256 (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _norm_id(interaction_id: Any) -> str:
    # UUIDs arrive as uuid.UUID, upper- or lower-case strings: all must land on the same side.
    return str(interaction_id).strip().lower()


def is_heldout(interaction_id: str | UUID, fraction: float, salt: str = "") -> bool:
    """Whether an interaction belongs to the held-out set; stable across runs and processes.

    Monotone in `fraction`: raising it only moves interactions from train to held-out.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return _unit_hash("heldout", salt, _norm_id(interaction_id)) < fraction


def _is_good(item: RatedInteraction) -> bool:
    return item.rating == "up" or bool((item.correction or "").strip())


def sample_replay(earlier_good: Sequence[RatedInteraction], k: int, seed: int = 0) -> list[RatedInteraction]:
    """Deterministically pick up to `k` earlier thumbs-up/corrected interactions.

    Ranked by a seeded sha256 of the id, so the result does not depend on input order and the
    first k of a larger sample equal a sample of k. Thumbs-down without correction is never picked.
    """
    if k <= 0:
        return []
    unique: dict[str, RatedInteraction] = {}
    for item in earlier_good:
        if _is_good(item):
            unique.setdefault(_norm_id(item.interaction_id), item)
    ranked = sorted(unique.items(), key=lambda kv: (_unit_hash("replay", str(seed), kv[0]), kv[0]))
    return [item for _, item in ranked[:k]]


T = TypeVar("T")


def cap_rater_share(
    items: Sequence[T],
    max_share: float | None,
    *,
    rater: Callable[[T], str] = attrgetter("rater_id"),
    item_id: Callable[[T], str] = attrgetter("interaction_id"),
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """Keep as many items as possible with no rater above `max_share` of the kept items.

    Unknown raters ("") count as one rater: unattributed feedback is the easiest to flood. With a
    single rater and a share below 1 nothing can be kept. Which of a rater's items survive is
    decided by a seeded hash of the item id, so it is deterministic and not gameable by timing.
    Returns (kept, dropped), each in input order.
    """
    if not items or max_share is None or max_share >= 1.0:
        return list(items), []
    groups: dict[str, list[int]] = defaultdict(list)
    for idx, it in enumerate(items):
        groups[rater(it)].append(idx)
    sizes = [len(g) for g in groups.values()]

    def feasible(level: int) -> bool:
        return level <= max_share * sum(min(n, level) for n in sizes) + 1e-9

    # feasible() holds on an interval [0, L*] (share*kept - level is concave, 0 at 0): bisect.
    lo, hi = 0, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid - 1
    keep: set[int] = set()
    for idxs in groups.values():
        ranked = sorted(idxs, key=lambda i: (_unit_hash("rater-cap", str(seed), item_id(items[i])), i))
        keep.update(ranked[:lo])
    kept = [it for i, it in enumerate(items) if i in keep]
    dropped = [it for i, it in enumerate(items) if i not in keep]
    return kept, dropped


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the byte form hashed for lineage."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dataset_sha256(train: Mapping[str, Any], heldout: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the train and held-out examples."""
    return hashlib.sha256(canonical_json({"train": train, "heldout": heldout})).hexdigest()


# ---------------------------------------------------------------------------------------------
# Rendering


def render_prompt(
    messages: Sequence[Mapping[str, Any]], tokenizer: ChatTokenizer, *, template_args: Mapping[str, Any] | None = None
) -> str:
    """The prompt exactly as the engine renders it: the tokenizer's chat template + generation prompt.

    `template_args` are the request's tools and template kwargs as vLLM passed them
    (workers.chat_request.template_args); messages are OpenAI's, tool-call arguments as strings.
    """
    text = tokenizer.apply_chat_template(
        template_messages(messages), tokenize=False, add_generation_prompt=True, **dict(template_args or {})
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def answer_message(text: str, tool_calls: list[dict] | None = None) -> str | dict[str, Any]:
    """The assistant turn to train on: its text, or a message carrying the answer's tool calls."""
    return {"role": "assistant", "content": text, "tool_calls": tool_calls} if tool_calls else text


def render_completion(
    messages: Sequence[Mapping[str, Any]],
    target: str | Mapping[str, Any],
    tokenizer: ChatTokenizer,
    *,
    prompt: str | None = None,
    template_args: Mapping[str, Any] | None = None,
) -> str:
    """The assistant turn as the template renders it after `prompt`, ending with the eos token.

    `target` is the answer's text, or an assistant message (one with tool calls: answer_message).
    prompt + completion equals the template's rendering of the whole conversation, minus trailing
    whitespace after the final end token (generation stops at eos and never produces it). If the
    template puts no eos after the turn, eos is appended so the model learns to stop. Ending
    exactly on eos also stops TRL from appending a second one (it checks `endswith(eos_token)`).
    """
    if prompt is None:
        prompt = render_prompt(messages, tokenizer, template_args=template_args)
    turn = dict(target) if isinstance(target, Mapping) else {"role": "assistant", "content": target}
    full = tokenizer.apply_chat_template(
        template_messages([*messages, turn]), tokenize=False, add_generation_prompt=False,
        **dict(template_args or {}),
    )
    if not isinstance(full, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(full).__name__}, expected str")
    if not full.startswith(prompt):
        raise TemplateMismatch(
            "the chat template's rendering of the conversation does not start with its rendering of the "
            "prompt (add_generation_prompt=True); prompt/completion would not match what the engine serves"
        )
    completion = full[len(prompt) :].rstrip()
    eos = tokenizer.eos_token
    if isinstance(eos, str) and eos and not completion.endswith(eos):
        completion += eos
    return completion


def heldout_answer(record: Mapping[str, Any]) -> str | dict[str, Any]:
    """A held-out record's rated answer as a target: its text, or its tool calls."""
    return answer_message(record.get("response") or "", record.get("response_tool_calls"))


def heldout_completion(record: Mapping[str, Any], target: str | Mapping[str, Any], tokenizer: ChatTokenizer) -> str:
    """`target` rendered after a held-out record's prompt, with the request fields the template
    saw (a record written before they were kept reads as a request without tools or kwargs)."""
    args = template_args(record.get("params"))
    return render_completion(record["messages"], target, tokenizer, prompt=record["prompt"], template_args=args)


def auto_special_prefix(tokenizer: ChatTokenizer) -> str:
    """Text of the special tokens the tokenizer's own call puts before any text (e.g. "<s>"), or "".

    TRL 1.16 tokenizes string prompts with `tokenizer(text)`, special tokens on, while vLLM
    tokenizes the rendered chat with none. A template that renders the bos itself then trains on
    two. Dropping this prefix from the training prompt makes TRL's ids equal the engine's.
    """
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if not plain or len(with_special) <= len(plain):
        return ""
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix = with_special[:start]
            break
    else:
        return ""
    # Only strip special tokens: a tokenizer that prepends ordinary text is not adding a bos.
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    if not prefix or any(i not in special_ids for i in prefix):
        return ""
    return "".join(tokenizer.convert_ids_to_tokens(prefix))


def training_prompt(prompt: str, prefix: str) -> str:
    """`prompt` without the special-token prefix the trainer's tokenizer will add back."""
    return prompt[len(prefix) :] if prefix and prompt.startswith(prefix) else prompt


def engine_prompt(prompt: str, prefix: str) -> str:
    """The inverse of `training_prompt`: the rendered prompt with the prefix put back, for a
    trainer that tokenizes without special tokens (as the engine does)."""
    return prefix + prompt if prefix and not prompt.startswith(prefix) else prompt


def _count_tokens(text: str, tokenizer: ChatTokenizer) -> int:
    # Counted the way TRL tokenizes training text (special tokens on), so it matches the engine.
    return len(tokenizer(text)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Item preparation


class _Drop(Exception):
    """Internal: an item is excluded for `reason` (a stats key suffix)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


_ROLE_ALIASES = {"developer": "system"}
_ROLES = ("system", "user", "assistant", "tool")
_WS = re.compile(r"\s+")
Clean = Callable[[str], str]


def _norm_text(text: str) -> str:
    """Comparison form: NFC, whitespace collapsed, stripped; case is kept (it can matter)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _content_text(content: Any) -> str:
    """Flatten OpenAI content (str, None or text parts) the way vLLM does: text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise _Drop("invalid", f"unsupported content part {kind!r}")
        return "\n".join(texts)
    raise _Drop("invalid", f"unsupported content type {type(content).__name__}")


def _redact_json(value: Any, clean: Clean) -> Any:
    """value with every string in it redacted (keys are names, not content: kept)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [_redact_json(v, clean) for v in value]
    if isinstance(value, Mapping):
        return {k: _redact_json(v, clean) for k, v in value.items()}
    return value


def _clean_arguments(arguments: Any, clean: Clean) -> Any:
    """A tool call's arguments redacted. A JSON string stays a JSON string (re-encoded only when
    something was redacted: vLLM parses it before the template sees it, so spacing is not served)."""
    if not isinstance(arguments, str):
        return _redact_json(arguments, clean)
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return clean(arguments)
    cleaned = _redact_json(parsed, clean)
    return arguments if cleaned == parsed else json.dumps(cleaned, ensure_ascii=False)


def _tool_calls(calls: Any, clean: Clean) -> list[dict[str, Any]] | None:
    """OpenAI tool calls with their arguments redacted; None for none."""
    if not calls:
        return None
    if not isinstance(calls, list):
        raise _Drop("invalid", "tool_calls is not a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise _Drop("invalid", "a tool call is not a function call")  # vLLM refuses it too
        out.append({**call, "function": {**function,
                                         "arguments": _clean_arguments(function.get("arguments"), clean)}})
    return out


def _prompt_message(m: Any, clean: Clean) -> dict[str, Any]:
    """One message normalized and redacted, with the fields vLLM hands the template."""
    if not isinstance(m, Mapping):
        raise _Drop("invalid", "message is not an object")
    role = _ROLE_ALIASES.get(str(m.get("role")), str(m.get("role")))
    if role not in _ROLES:
        raise _Drop("invalid", f"unsupported role {role[:32]!r}")  # the log must not carry content
    out: dict[str, Any] = {"role": role, "content": clean(_content_text(m.get("content")))}
    if role == "assistant" and (calls := _tool_calls(m.get("tool_calls"), clean)):
        out["tool_calls"] = calls
    if role == "assistant" and isinstance(m.get("reasoning"), str):
        out["reasoning"] = clean(m["reasoning"])
    if role == "tool" and "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def _request_params(params: Mapping[str, Any] | None, clean: Clean) -> dict[str, Any]:
    """The request fields the template saw; documents (retrieved text) redacted like messages.
    Tools and template kwargs are the product's configuration and are kept as served."""
    kept = template_fields(params)
    if "documents" in kept:
        kept["documents"] = _redact_json(kept["documents"], clean)
    return kept


@dataclass
class _Item:
    """An interaction after normalization, redaction and rendering."""

    src: RatedInteraction
    id: str
    messages: list[dict[str, Any]]  # OpenAI's shape: role, content text, tool_calls, tool_call_id
    response: str  # stripped; may be "" when there is a correction or the answer called tools
    correction: str | None  # stripped; None when absent, blank or equal to the response
    rating: str
    response_tool_calls: list[dict[str, Any]] | None = None  # the answer's calls (redacted)
    params: dict[str, Any] = field(default_factory=dict)  # the request fields the template saw
    template_args: dict[str, Any] = field(default_factory=dict)  # what vLLM passed for them
    redacted_fields: int = 0
    prompt: str = ""  # exactly the template's rendering (what the engine serves)
    train_prompt: str = ""  # the same minus a bos the trainer's tokenizer adds itself
    response_completion: str | None = None
    correction_completion: str | None = None

    def key(self) -> tuple[Any, ...]:
        """Duplicate key: same normalized prompt messages and template arguments, rating,
        response (text and tool calls) and correction."""
        extras = [canonical_json({k: m[k] for k in m if k not in ("role", "content")}) for m in self.messages]
        msgs = tuple((m["role"], _norm_text(m["content"]), x) for m, x in zip(self.messages, extras, strict=True))
        corr = None if self.correction is None else _norm_text(self.correction)
        calls = canonical_json(self.response_tool_calls) if self.response_tool_calls else None
        return (msgs, canonical_json(self.template_args), self.rating, _norm_text(self.response), calls, corr)

    def renderings(self) -> list[str]:
        """Full prompt+completion texts this item contributes (for size limits)."""
        completions = (self.response_completion, self.correction_completion)
        return [self.train_prompt + c for c in completions if c is not None]


def _prepare(
    item: RatedInteraction,
    tokenizer: ChatTokenizer,
    redactor: Redactor,
    policy: DatasetConfig,
    bos_prefix: str,
) -> _Item:
    """Validate, normalize, redact, render and size-check one interaction, or raise _Drop."""
    if item.finish_reason == "pending":
        raise _Drop("pending", "stored before its answer arrived")
    rating = str(item.rating).strip().lower()
    if rating not in RATINGS:
        raise _Drop("invalid", f"rating {item.rating!r}")
    if not isinstance(item.messages, list) or not item.messages:
        raise _Drop("empty", "no prompt messages")
    redacted = 0

    def clean(text: str) -> str:
        nonlocal redacted
        out = redactor.redact(text)
        redacted += out != text
        return out

    params = _request_params(item.params, clean)
    try:
        args = template_args(params)
    except UnsupportedRequest as exc:
        raise _Drop("invalid", str(exc)) from exc
    messages = [_prompt_message(m, clean) for m in item.messages]
    if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise _Drop("empty", "prompt is blank")

    # Targets are stripped: trailing blank lines before eos are noise the model should not learn.
    response = clean(item.response_text or "").strip()
    calls = _tool_calls(item.response_tool_calls, clean)
    correction = clean(item.correction).strip() if item.correction else ""
    if correction and not calls and _norm_text(correction) == _norm_text(response):
        correction = ""  # an "edit" that changes nothing carries only the rating
    if not response and not calls and not correction:
        raise _Drop("empty", "response and correction are blank")

    prepared = _Item(
        src=item,
        id=_norm_id(item.interaction_id),
        messages=messages,
        response=response,
        correction=correction or None,
        rating=rating,
        response_tool_calls=calls,
        params=params,
        template_args=args,
        redacted_fields=redacted,
    )
    _render(prepared, tokenizer, bos_prefix)
    _check_size(prepared, tokenizer, policy)
    return prepared


def _render(item: _Item, tokenizer: ChatTokenizer, bos_prefix: str) -> None:
    """Fill the item's prompt and completions (a tool-call answer's completion is its calls; a
    correction is text), or raise _Drop when the template cannot render them consistently."""
    try:
        item.prompt = render_prompt(item.messages, tokenizer, template_args=item.template_args)
        item.train_prompt = training_prompt(item.prompt, bos_prefix)
        if item.response or item.response_tool_calls:
            item.response_completion = render_completion(
                item.messages, answer_message(item.response, item.response_tool_calls), tokenizer,
                prompt=item.prompt, template_args=item.template_args,
            )
        if item.correction:
            item.correction_completion = render_completion(
                item.messages, item.correction, tokenizer, prompt=item.prompt, template_args=item.template_args
            )
    except TemplateMismatch as exc:
        raise _Drop("template", str(exc)) from exc
    except Exception as exc:  # templates raise_exception() on roles/orders they do not support
        raise _Drop("template", f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _check_size(item: _Item, tokenizer: ChatTokenizer, policy: DatasetConfig) -> None:
    """Raise _Drop when a rendering is over the policy's size limits."""
    texts = item.renderings()
    if policy.max_chars is not None and max(len(t) for t in texts) > policy.max_chars:
        raise _Drop("oversized", f"> {policy.max_chars} chars")
    if policy.max_tokens is not None:
        n_tokens = max(_count_tokens(t, tokenizer) for t in texts)
        if n_tokens > policy.max_tokens:
            raise _Drop("oversized", f"{n_tokens} > {policy.max_tokens} tokens")


def _sort_key(item: RatedInteraction) -> tuple[Any, ...]:
    """Total order on inputs (time, id, then the rating itself) so results ignore input order."""
    ts = item.created_at
    if ts.tzinfo is None:  # naive timestamps are UTC in this project; never compare naive with aware
        ts = ts.replace(tzinfo=UTC)
    return (
        ts.timestamp(),
        _norm_id(item.interaction_id),
        item.rater_id or "",
        str(item.rating),
        item.correction or "",
        item.response_text or "",
    )


# ---------------------------------------------------------------------------------------------
# Examples, counts, method, weights


def _examples(items: Iterable[_Item], *, replay: bool = False) -> dict[str, list[dict[str, Any]]]:
    """SFT, DPO and KTO examples from prepared items. Replay items give only desirable examples."""
    out: dict[str, list[dict[str, Any]]] = {f: [] for f in FORMATS}
    for it in items:
        if it.response_completion is not None and it.rating == "up":
            out["sft"].append({"prompt": it.train_prompt, "completion": it.response_completion})
        if it.correction_completion is not None:
            out["sft"].append({"prompt": it.train_prompt, "completion": it.correction_completion})
        if replay:
            # Replay guards what was good; re-feeding old negatives would only re-push old mistakes.
            if it.response_completion is not None and it.rating == "up":
                out["kto"].append(
                    {"prompt": it.train_prompt, "completion": it.response_completion, "label": True}
                )
            if it.correction_completion is not None:
                out["kto"].append(
                    {"prompt": it.train_prompt, "completion": it.correction_completion, "label": True}
                )
            continue
        if it.correction_completion is not None and it.response_completion is not None:
            out["dpo"].append(
                {
                    "prompt": it.train_prompt,
                    "chosen": it.correction_completion,
                    "rejected": it.response_completion,
                }
            )
        if it.response_completion is not None:
            out["kto"].append(
                {"prompt": it.train_prompt, "completion": it.response_completion, "label": it.rating == "up"}
            )
        if it.correction_completion is not None:
            out["kto"].append(
                {"prompt": it.train_prompt, "completion": it.correction_completion, "label": True}
            )
    return out


def _counts(items: Iterable[_Item]) -> DataCounts:
    ups = downs = corrections = pairs = 0
    for it in items:
        if it.response_completion is not None:
            ups += it.rating == "up"
            downs += it.rating == "down"
        if it.correction_completion is not None:
            corrections += 1
            pairs += it.response_completion is not None
    return DataCounts(ups=ups, downs=downs, corrections=corrections, pairs=pairs)


def _as_counts(counts: DataCounts | Mapping[str, int]) -> DataCounts:
    if isinstance(counts, DataCounts):
        return counts
    return DataCounts(
        ups=int(counts.get("ups", 0)),
        downs=int(counts.get("downs", 0)),
        corrections=int(counts.get("corrections", 0)),
        pairs=None if counts.get("pairs") is None else int(counts["pairs"]),
    )


def choose_method(
    policy_method: str,
    counts: DataCounts | Mapping[str, int],
    *,
    dpo_min_pairs: int = 8,
    dpo_min_share: float = 0.25,
    kto_min_per_class: int = 4,
) -> tuple[str, str]:
    """Pick "sft" | "kto" | "dpo" for the policy and data; return (method, human-readable reason).

    auto: DPO with enough correction pairs making a meaningful share of the rated responses,
    else KTO with enough of both classes, else SFT on thumbs-up/corrections. Raises NotEnoughData
    when the data cannot support the requested method (or, for auto, any method).
    """
    c = _as_counts(counts)
    pairs, good, bad = c.dpo_pairs, c.desirable, c.undesirable
    rated = c.ups + c.downs
    share = pairs / rated if rated else (1.0 if pairs else 0.0)
    summary = f"{c.ups} up, {c.downs} down, {c.corrections} corrections, {pairs} pairs"
    if policy_method == "sft":
        if good < 1:
            raise NotEnoughData(f"sft needs thumbs-up or corrections; got 0 ({summary})")
        return "sft", f"policy sft: {good} desirable examples ({summary})"
    if policy_method == "dpo":
        if pairs < 1:
            raise NotEnoughData(f"dpo needs correction pairs; got 0 ({summary})")
        return "dpo", f"policy dpo: {pairs} correction pairs ({summary})"
    if policy_method == "kto":
        if good < 1 or bad < 1:
            raise NotEnoughData(
                f"kto needs desirable (thumbs-up/corrections) and undesirable (thumbs-down) examples; "
                f"got {good} desirable, {bad} undesirable ({summary})"
            )
        return "kto", f"policy kto: {good} desirable, {bad} undesirable ({summary})"
    if policy_method != "auto":
        raise ValueError(f"unknown method {policy_method!r}; expected one of {POLICY_METHODS}")

    if pairs >= dpo_min_pairs and share >= dpo_min_share:
        return "dpo", (
            f"auto -> dpo: {pairs} correction pairs (>= {dpo_min_pairs}) are {share:.0%} of rated responses "
            f"(>= {dpo_min_share:.0%}) ({summary})"
        )
    why_not_dpo = (
        f"{pairs} pairs < {dpo_min_pairs}"
        if pairs < dpo_min_pairs
        else f"pairs share {share:.0%} < {dpo_min_share:.0%}"
    )
    if good >= kto_min_per_class and bad >= kto_min_per_class:
        return "kto", (
            f"auto -> kto: {good} desirable and {bad} undesirable (each >= {kto_min_per_class}); "
            f"not dpo: {why_not_dpo} ({summary})"
        )
    why_not_kto = f"{good} desirable / {bad} undesirable, need {kto_min_per_class} each"
    if good >= 1:
        return (
            "sft",
            f"auto -> sft: {good} desirable examples; not dpo: {why_not_dpo}; "
            f"not kto: {why_not_kto} ({summary})",
        )
    raise NotEnoughData(
        f"auto: nothing to imitate or contrast: not dpo: {why_not_dpo}; not kto: {why_not_kto} ({summary})"
    )


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so the weighted ratio lies in TRL's [1, 4/3].

    Only the minority class is up-weighted (the other stays 1.0), landing on 7/6 when outside the
    band. With a class missing the ratio is undefined and (1.0, 1.0) is returned.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if KTO_RATIO_MIN <= ratio <= KTO_RATIO_MAX:
        return 1.0, 1.0
    if ratio > KTO_RATIO_MAX:
        return 1.0, round(n_desirable / (n_undesirable * KTO_RATIO_TARGET), 6)
    return round(n_undesirable * KTO_RATIO_TARGET / n_desirable, 6), 1.0


# ---------------------------------------------------------------------------------------------
# The pipeline


def _replay_k(n_new_train: int, fraction: float) -> int:
    """Replay items so they make up `fraction` of the combined training items."""
    if fraction <= 0.0 or n_new_train <= 0:
        return 0
    return round(n_new_train * fraction / (1.0 - fraction))


@dataclass
class _Curator:
    """Per-build state: configuration, stats counters and the drop log."""

    tokenizer: ChatTokenizer
    redactor: Redactor
    policy: DatasetConfig
    bos_prefix: str
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    drops: list[dict[str, str]] = field(default_factory=list)

    def drop(self, item_id: str, reason: str, detail: str = "") -> None:
        """Count and log one excluded interaction (ids and reasons only, never content)."""
        self.stats[f"dropped_{reason}"] += 1
        self.drops.append({"interaction_id": item_id, "reason": reason, "detail": detail})

    def prepare(self, raw: RatedInteraction) -> _Item:
        """_prepare with this build's configuration."""
        return _prepare(raw, self.tokenizer, self.redactor, self.policy, self.bos_prefix)

    def curate(self, new: Sequence[RatedInteraction]) -> tuple[list[_Item], set[str], set[tuple[Any, ...]]]:
        """Prepared, de-duplicated new items; plus every id and content key seen (to keep out of replay).

        One interaction rated by several raters yields one item per rater: agreeing ratings then
        collapse as content duplicates, disagreeing ones both stay (that disagreement is signal).
        """
        prepared: list[_Item] = []
        seen_ids: set[str] = set()
        seen_ratings: set[tuple[str, str]] = set()
        seen_keys: dict[tuple[Any, ...], str] = {}
        # Oldest first: the kept copy of a duplicate is the first one rated, whatever the input order.
        for raw in sorted(new, key=_sort_key):
            rid = _norm_id(raw.interaction_id)
            seen_ids.add(rid)
            if (rid, raw.rater_id or "") in seen_ratings:
                self.drop(rid, "duplicates", "same interaction and rater given twice")
                continue
            seen_ratings.add((rid, raw.rater_id or ""))
            try:
                item = self.prepare(raw)
            except _Drop as d:
                self.drop(rid, d.reason, d.detail)
                continue
            self.stats["redacted_fields"] += item.redacted_fields
            key = item.key()
            if key in seen_keys:
                self.drop(rid, "duplicates", f"same prompt, rating and target as {seen_keys[key]}")
                continue
            seen_keys[key] = rid
            prepared.append(item)
        return prepared, seen_ids, set(seen_keys)

    def cap_raters(self, items: list[_Item]) -> list[_Item]:
        """Apply the per-key share cap, then the per-rater one (raters namespaced by the key
        that posted them), logging what each drops."""
        kept, capped = cap_rater_share(
            items,
            self.policy.max_key_share,
            rater=lambda i: i.src.posted_by,
            item_id=lambda i: i.id,
            seed=self.policy.seed,
        )
        for it in capped:
            self.drop(it.id, "rater_cap", f"posting key over {self.policy.max_key_share:.0%} share")
        kept, capped = cap_rater_share(
            kept,
            self.policy.max_rater_share,
            rater=lambda i: f"{i.src.posted_by}/{i.src.rater_id or ''}",
            item_id=lambda i: i.id,
            seed=self.policy.seed,
        )
        for it in capped:
            self.drop(it.id, "rater_cap", f"rater over {self.policy.max_rater_share:.0%} share")
        return kept

    def judged(self, items: Sequence[RatedInteraction], human_ids: set[str], human_keys: set,
               n_human_train: int) -> tuple[list[_Item], set[str], set]:
        """The judge's ratings that may train: none of an interaction a human rated (the human
        wins), none whose id is held out (so it can never leak into a later held-out set), and
        at most max_judge_share of the training set. Returns them with the seen ids and keys."""
        p = self.policy
        fresh: list[RatedInteraction] = []
        for raw in items:
            rid = _norm_id(raw.interaction_id)
            if rid in human_ids:
                self.drop(rid, "judge_overridden", "a human rated it too")
            elif is_heldout(rid, p.heldout_fraction, p.split_salt):
                self.drop(rid, "judge_heldout", "held-out ids are for human ratings only")
            else:
                fresh.append(raw)
        prepared, ids, keys = self.curate(fresh)
        out: list[_Item] = []
        for it in prepared:
            if it.key() in human_keys:
                self.drop(it.id, "duplicates", "same as a human-rated example")
            else:
                out.append(it)
        share = p.max_judge_share
        cap = math.floor(share / (1.0 - share) * n_human_train + 1e-9)
        ranked = sorted(out, key=lambda it: (_unit_hash("judge-cap", str(p.seed), it.id), it.id))
        for it in ranked[cap:]:
            self.drop(it.id, "judge_cap", f"judge ratings over {share:.0%} of the training set")
        return ranked[:cap], human_ids | ids, human_keys | keys

    def replay(
        self, pool: Sequence[RatedInteraction], k: int, exclude_ids: set[str], exclude_keys: set
    ) -> list[_Item]:
        """First k pool items (in sample_replay order) that pass curation and are never held out."""
        if k <= 0:
            return []
        p = self.policy
        # Held-out is decided by id with the same salt, so an item held out in any run is never trained on.
        eligible = [
            r
            for r in pool
            if _norm_id(r.interaction_id) not in exclude_ids
            and not is_heldout(r.interaction_id, p.heldout_fraction, p.split_salt)
        ]
        chosen: list[_Item] = []
        keys = set(exclude_keys)
        for raw in sample_replay(eligible, len(eligible), p.seed):
            try:
                item = self.prepare(raw)
            except _Drop:
                continue
            key = item.key()
            if key in keys:
                continue
            keys.add(key)
            chosen.append(item)
            if len(chosen) >= k:
                break
        self.stats["redacted_fields"] += sum(it.redacted_fields for it in chosen)
        return chosen


def build_dataset(
    new: Sequence[RatedInteraction],
    replay_pool: Sequence[RatedInteraction] = (),
    *,
    tokenizer: ChatTokenizer,
    policy: DatasetConfig | None = None,
    redactor: Redactor | None = None,
) -> BuiltDataset:
    """Curate, split and render `new` ratings (+ replay from `replay_pool`) into training data.

    `policy` is the build's DatasetConfig (workers.recipe.dataset_config maps an alias's policy
    to it). `redactor` defaults to RegexRedactor (pass NullRedactor to opt out). Output does not
    depend on input order. Raises NotEnoughData (with `.stats`) when the data cannot support the method or
    its training set is below `policy.min_examples`.
    """
    policy = policy or DatasetConfig()
    cur = _Curator(tokenizer, redactor or RegexRedactor(), policy, auto_special_prefix(tokenizer))
    stats = cur.stats
    stats["input"], stats["input_replay_pool"] = len(new), len(replay_pool)

    human = [r for r in new if r.source != JUDGE]
    items, seen_ids, seen_keys = cur.curate(human)
    kept = cur.cap_raters(items)
    heldout_items = [it for it in kept if is_heldout(it.id, policy.heldout_fraction, policy.split_salt)]
    train_items = [it for it in kept if not is_heldout(it.id, policy.heldout_fraction, policy.split_salt)]
    judged, seen_ids, seen_keys = cur.judged([r for r in new if r.source == JUDGE], seen_ids,
                                             seen_keys, len(train_items))
    train_items += judged
    stats["judge_items"] = len(judged)

    counts = _counts(train_items)
    stats.update(ups=counts.ups, downs=counts.downs, corrections=counts.corrections, pairs=counts.dpo_pairs)
    stats["train_items"], stats["heldout_items"] = len(train_items), len(heldout_items)
    try:
        method, reason = choose_method(
            policy.method,
            counts,
            dpo_min_pairs=policy.dpo_min_pairs,
            dpo_min_share=policy.dpo_min_share,
            kto_min_per_class=policy.kto_min_per_class,
        )
    except NotEnoughData as exc:
        raise NotEnoughData(str(exc), stats=_finish_stats(stats)) from exc

    # DPO gets no replay: replay has no rejected side, and a pair needs one.
    k = _replay_k(len(train_items), policy.replay_fraction) if method in ("sft", "kto") else 0
    replay_items = cur.replay(replay_pool, k, seen_ids, seen_keys)
    stats["replay"] = len(replay_items)

    train, heldout = _examples(train_items), _examples(heldout_items)
    replay_ex = _examples(replay_items, replay=True)
    train["sft"].extend(replay_ex["sft"])
    train["kto"].extend(replay_ex["kto"])

    n_good = sum(1 for ex in train["kto"] if ex["label"])
    n_bad = len(train["kto"]) - n_good
    w_good, w_bad = kto_weights(n_good, n_bad)
    stats["kto_desirable"], stats["kto_undesirable"] = n_good, n_bad
    for fmt in FORMATS:
        stats[f"{fmt}_train"], stats[f"{fmt}_heldout"] = len(train[fmt]), len(heldout[fmt])
    if len(train[method]) < policy.min_examples:
        raise NotEnoughData(
            f"{method}: {len(train[method])} training examples < "
            f"min_examples {policy.min_examples} ({reason})",
            stats=_finish_stats(stats),
        )

    return BuiltDataset(
        method=method,
        reason=reason,
        train=train,
        heldout=heldout,
        heldout_raw=[_raw_record(it) for it in heldout_items],
        kto_desirable_weight=w_good,
        kto_undesirable_weight=w_bad,
        stats=_finish_stats(stats),
        snapshot=_snapshot(train_items, heldout_items, replay_items, train, heldout),
        drops=cur.drops,
        warnings=_bos_warnings(cur.bos_prefix, [*train_items, *heldout_items]),
    )


def _snapshot(
    train_items: list[_Item],
    heldout_items: list[_Item],
    replay_items: list[_Item],
    train: Mapping[str, Any],
    heldout: Mapping[str, Any],
) -> Snapshot:
    """Lineage: sorted ids by role and the hash of the examples."""
    heldout_ids = sorted({it.id for it in heldout_items})
    replay_ids = sorted({it.id for it in replay_items})
    return Snapshot(
        interaction_ids=sorted({it.id for it in train_items} | set(heldout_ids) | set(replay_ids)),
        heldout_ids=heldout_ids,
        replay_ids=replay_ids,
        sha256=dataset_sha256(train, heldout),
    )


def _bos_warnings(bos_prefix: str, items: Iterable[_Item]) -> list[str]:
    """Warn when the trainer's tokenizer adds a bos the template (and so the engine) never renders."""
    if not bos_prefix or all(it.prompt.startswith(bos_prefix) for it in items):
        return []
    # Text cannot undo a token the trainer adds: only the tokenizer or template config can.
    return [
        f"the tokenizer adds {bos_prefix!r} itself but the chat template does not render it: TRL will "
        "train with a leading token the engine never sends; set the tokenizer's add_bos_token=False "
        "or render bos in the template"
    ]


_STAT_KEYS = (
    "input",
    "input_replay_pool",
    "redacted_fields",
    "dropped_invalid",
    "dropped_pending",
    "dropped_empty",
    "dropped_template",
    "dropped_oversized",
    "dropped_duplicates",
    "dropped_rater_cap",
    "dropped_judge_overridden",
    "dropped_judge_heldout",
    "dropped_judge_cap",
    "judge_items",
    "replay",
    "ups",
    "downs",
    "corrections",
    "pairs",
    "train_items",
    "heldout_items",
    "kto_desirable",
    "kto_undesirable",
    *(f"{f}_{s}" for f in FORMATS for s in ("train", "heldout")),
)


def _finish_stats(stats: Mapping[str, int]) -> dict[str, int]:
    """Every known key present (0 if unset), in a stable order."""
    return {k: int(stats.get(k, 0)) for k in _STAT_KEYS}


def _raw_record(it: _Item) -> dict[str, Any]:
    """What an eval gate needs per held-out interaction (already redacted). `params` are the
    request fields the template saw (workers.chat_request); older files lack them and the
    response's tool calls, which reads as a request without tools."""
    return {
        "interaction_id": it.id,
        "rating": it.rating,
        "messages": it.messages,
        "params": it.params,
        "prompt": it.prompt,
        "response": it.response,
        "response_tool_calls": it.response_tool_calls,
        "correction": it.correction,
        "version": it.src.version,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _jsonl(rows: Iterable[Mapping[str, Any]], *, sort_keys: bool = True) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=sort_keys).encode("utf-8") + b"\n" for r in rows)


def write_jsonl(built: BuiltDataset, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write `{fmt}.train.jsonl`, `{fmt}.heldout.jsonl`, `heldout_raw.jsonl` and `manifest.json`.

    Returns name -> path, names like "sft_train", "kto_heldout", "heldout_raw", "manifest".
    JSON only: nothing here is a pickle.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for fmt in FORMATS:
        for split, data in (("train", built.train), ("heldout", built.heldout)):
            path = out / f"{fmt}.{split}.jsonl"
            atomic_write_bytes(path, _jsonl(data.get(fmt, [])))
            paths[f"{fmt}_{split}"] = path
    paths["heldout_raw"] = out / "heldout_raw.jsonl"
    # Key order is content there: a template dumps a request's tools (their JSON schemas) as JSON,
    # so sorting them would render another prompt than the one served.
    atomic_write_bytes(paths["heldout_raw"], _jsonl(built.heldout_raw, sort_keys=False))
    paths["manifest"] = out / "manifest.json"
    atomic_write_bytes(paths["manifest"], json.dumps(built.manifest(), indent=2, sort_keys=True).encode("utf-8"))
    return paths
