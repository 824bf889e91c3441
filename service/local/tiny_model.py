"""A tiny Llama-architecture chat model built entirely locally (no hub access).

Used by tests, the local default engine and the learning benchmark. The sizes are the smallest
that vLLM's CPU attention kernels accept (head_dim 64). The tokenizer is a byte-level BPE trained
on a built-in synthetic corpus, so any text round-trips and the build is reproducible offline.
"""

from __future__ import annotations

import fcntl
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.files import publish_dir, staging_dir

BUILDER_VERSION = 1  # bump when the output changes, so cached builds are rebuilt
MARKER_FILE = "flywheel_tiny_model.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]

VOCAB_SIZE = 512
MAX_POSITIONS = 1024

# The corpus (and so the tokenizer) does not depend on the model seed: every seed shares one
# tokenizer, which keeps adapters and datasets comparable across builds.
_CORPUS_SEED = 1234

# ChatML-like. The bos is rendered by the template because both transformers'
# apply_chat_template and vLLM's chat endpoint tokenize the rendered text without adding special
# tokens. Content is read as a plain string so vLLM flattens OpenAI multi-part content for us.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tiny_model(out_dir: Path, *, seed: int = 0, pretrain_steps: int = 0) -> Path:
    """Build (or reuse a cached) tiny chat model + tokenizer in ``out_dir``; return ``out_dir``.

    Deterministic for a given ``seed``/``pretrain_steps``. A marker file makes a matching
    existing build a no-op.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    wanted = {"seed": seed, "pretrain_steps": pretrain_steps, "builder_version": BUILDER_VERSION}
    with _dir_lock(out_dir):
        if _read_marker(out_dir) == wanted:
            return out_dir
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).exists():
            raise FileExistsError(f"{out_dir} exists and is not a tiny-model build; refusing to replace it")
        # Build beside the target and swap in, so readers never see a half-written model.
        tmp = staging_dir(out_dir)
        try:
            _build_into(tmp, seed=seed, pretrain_steps=pretrain_steps)
            (tmp / MARKER_FILE).write_text(json.dumps(wanted, sort_keys=True) + "\n")
            publish_dir(tmp, out_dir, replace=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def synthetic_corpus(n_sentences: int = 600, *, seed: int = _CORPUS_SEED) -> list[str]:
    """Plain English sentences on a few everyday topics (support, weather, maths, colours...)."""
    return list(_sentences(random.Random(seed), n_sentences))


def synthetic_dialogues(n: int = 400, *, seed: int = _CORPUS_SEED) -> list[tuple[str, str]]:
    """(user question, assistant answer) pairs for chat-formatted pretraining."""
    rng = random.Random(seed + 1)
    return [_dialogue(rng) for _ in range(n)]


# --- building ---------------------------------------------------------------------------------


def _build_into(path: Path, *, seed: int, pretrain_steps: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # the CPU attention kernels refuse small head dims
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    if pretrain_steps > 0:
        _pretrain(model, tokenizer, seed=seed, steps=pretrain_steps)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _pin_tokenizer_config(path)


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = synthetic_corpus() + [f"{q} {a}" for q, a in synthetic_dialogues()]
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain-text encodes (the completions endpoint) get a bos like Llama; chat prompts already
    # carry one from the template and are encoded without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _pin_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json self-sufficient for older transformers and for vLLM.

    transformers 5 names the class ``TokenizersBackend``, writes the role tokens as a list under
    ``extra_special_tokens`` (4.x expects a dict there) and keeps the chat template only in
    chat_template.jinja; older readers know none of these. Both versions read the form below.
    """
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _pretrain(model, tokenizer, *, seed: int, steps: int, seq_len: int = 96, batch: int = 16) -> None:
    """Teacher-forced next-token training on the synthetic corpus, so the model emits words."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    docs = [f"{BOS}{t}{EOS}" for t in synthetic_corpus()]
    docs += [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in synthetic_dialogues()
    ]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    stream = torch.tensor(ids, dtype=torch.long)
    n_windows = len(stream) - seq_len - 1
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, n_windows, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
    model.eval()


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _dir_lock(out_dir: Path) -> Iterator[None]:
    # Parallel test workers share one cache dir; only one of them builds.
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- synthetic text ---------------------------------------------------------------------------

_NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
_THINGS = ["car", "house", "kite", "book", "cup", "shirt", "door", "bike", "lamp", "chair"]
_CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Delhi"]
_WEATHER = ["sunny", "rainy", "cloudy", "windy", "snowy", "foggy", "warm", "cold", "humid", "dry"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_PRODUCTS = ["order", "account", "subscription", "invoice", "password", "delivery", "refund"]
_ISSUES = ["is late", "is missing", "was charged twice", "does not work", "is locked", "was cancelled"]
_ANIMALS = ["cat", "dog", "bird", "fish", "horse", "rabbit", "fox", "owl"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _sentences(rng: random.Random, n: int) -> Iterator[str]:
    makers = [
        lambda: f"The {rng.choice(_THINGS)} is {rng.choice(_COLOURS)}.",
        lambda: f"{rng.choice(_NAMES)} likes the {rng.choice(_COLOURS)} {rng.choice(_THINGS)}.",
        lambda: f"The weather in {rng.choice(_CITIES)} is {rng.choice(_WEATHER)} today.",
        lambda: f"On {rng.choice(_DAYS)} it will be {rng.choice(_WEATHER)} in {rng.choice(_CITIES)}.",
        lambda: _arith(rng),
        lambda: f"My {rng.choice(_PRODUCTS)} {rng.choice(_ISSUES)}. Can you help me?",
        lambda: f"Thank you for contacting support. We will check your {rng.choice(_PRODUCTS)} now.",
        lambda: f"I am sorry that your {rng.choice(_PRODUCTS)} {rng.choice(_ISSUES)}.",
        lambda: f"The {rng.choice(_ANIMALS)} sat next to the {rng.choice(_COLOURS)} {rng.choice(_THINGS)}.",
        lambda: f"{rng.choice(_NAMES)} and {rng.choice(_NAMES)} went to {rng.choice(_CITIES)} on {rng.choice(_DAYS)}.",
        lambda: f"Please reset my {rng.choice(_PRODUCTS)}, it {rng.choice(_ISSUES)}.",
        lambda: f"Is it {rng.choice(_WEATHER)} in {rng.choice(_CITIES)}? Yes, it is {rng.choice(_WEATHER)}.",
    ]
    for _ in range(n):
        yield rng.choice(makers)()


def _arith(rng: random.Random) -> str:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}. {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
    hi, lo = max(a, b), min(a, b)
    return f"{hi} minus {lo} is {hi - lo}."


def _dialogue(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        city, w = rng.choice(_CITIES), rng.choice(_WEATHER)
        return f"What is the weather in {city}?", f"The weather in {city} is {w} today."
    if kind == 1:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 2:
        thing, colour = rng.choice(_THINGS), rng.choice(_COLOURS)
        return f"What colour is the {thing}?", f"The {thing} is {colour}."
    if kind == 3:
        prod, issue = rng.choice(_PRODUCTS), rng.choice(_ISSUES)
        return (
            f"My {prod} {issue}.",
            f"I am sorry that your {prod} {issue}. We will check your {prod} now.",
        )
    name = rng.choice(_NAMES)
    return f"Hello, I am {name}.", f"Hello {name}! How can I help you today?"
