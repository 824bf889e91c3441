"""A tiny tokenizer built locally (no hub) and rated interactions, for the tests of the dataset
builder (workers.dataset) and of what is built on it (the judge's caps)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from functools import cache

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.helpers.chat_templates import TOOLS_TEMPLATE
from workers.dataset import DatasetConfig, RatedInteraction, build_dataset
from workers.redaction import RegexRedactor

# ---------------------------------------------------------------------------------------------
# A tiny tokenizer built locally (no hub): WordLevel trained on a few sentences + chat templates.

CORPUS = [
    "hello world how are you today",
    "the answer is forty two and that is final",
    "please help me with my order number",
    "you are a helpful assistant for the shop",
    "thanks a lot that fixed it",
    "what is the capital of france paris",
]
SPECIALS = [
    "[UNK]", "<s>", "</s>", "<eos>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip

TEMPLATES: dict[str, tuple[str, str, str | None]] = {
    # name: (chat_template, eos_token, bos_token)
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<|im_end|>",
        None,
    ),
    # The shape service/local/tiny_model.py serves: bos, role tokens, content, eos, newline.
    "tiny": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "</s>",
        "<s>",
    ),
    # Llama-3-like: trims content, no newline after the end token.
    "llama": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|eot_id|>",
        "<s>",
    ),
    # No end-of-turn marker at all: eos must be appended or the model never learns to stop.
    "plain": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        "<eos>",
        None,
    ),
    # Tools, tool calls, tool results and an enable_thinking switch (tests/helpers/chat_templates.py).
    "tools": (TOOLS_TEMPLATE, "</s>", "<s>"),
    # Renders a think-prefix only in the generation prompt: prompt is not a prefix of the full text.
    "mismatch": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\nthink: {% endif %}",
        "<|im_end|>",
        None,
    ),
}


@cache
def make_tokenizer(kind: str = "chatml", auto_bos: bool = False) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast over a freshly trained WordLevel model with the named chat template.

    auto_bos: the tokenizer's own call prepends "<s>" (like Llama's and service/local/tiny_model.py's).
    """
    template, eos, bos = TEMPLATES[kind]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if auto_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[UNK]",
        eos_token=eos,
        bos_token=bos,
        chat_template=template,
    )


# ---------------------------------------------------------------------------------------------
# Rated interactions and the dataset built from them

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def uid(i: int | str) -> str:
    """A stable interaction id for i."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"flywheel-test-{i}"))


def ri(
    i: int | str,
    user: str | None = None,
    response: str = "the answer is forty two",
    rating: str = "up",
    correction: str | None = None,
    rater: str = "",
    system: str | None = None,
    minutes: int | None = None,
) -> RatedInteraction:
    """Interaction i, rated: its id, default question and time (T0 + i minutes) follow from i."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": user if user is not None else f"question number {i} please"})
    return RatedInteraction(
        interaction_id=uid(i),
        messages=msgs,
        response_text=response,
        rating=rating,
        correction=correction,
        rater_id=rater,
        created_at=T0
        + timedelta(minutes=minutes if minutes is not None else (i if isinstance(i, int) else 0)),
        version="support-v1",
    )


def policy(**kw) -> DatasetConfig:
    """Nothing held out or replayed, one example enough, method auto; kw overrides."""
    base = dict(heldout_fraction=0.0, replay_fraction=0.0, min_examples=1, method="auto")
    base.update(kw)
    return DatasetConfig(**base)


def build(new, pool=(), *, kind: str = "chatml", redactor=None, **kw):
    """The dataset of `new` (and a replay `pool`) on the `kind` tokenizer, with policy(**kw)."""
    return build_dataset(
        list(new),
        list(pool),
        tokenizer=make_tokenizer(kind),
        policy=policy(**kw),
        redactor=redactor or RegexRedactor(),
    )


def addition_records(tok) -> list[dict]:
    """16 SFT records ("What is a plus b?" -> "a+b.") rendered with tok's chat template."""
    out = []
    for a in range(4):
        for b in range(4):
            msgs = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": f"{a + b}."}],
                                           tokenize=False)
            out.append({"prompt": prompt, "completion": full[len(prompt):].rstrip()})
    return out
