"""An Ollama Modelfile for a GGUF export: FROM, the chat template translated to Go, stop tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

MODELFILE = "Modelfile"


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    return template if isinstance(template, str) else None


@dataclass(frozen=True)
class TurnFormat:
    """A role-marker chat format read off a Jinja template by rendering it."""

    bos: str  # what the template puts before the first message
    turns: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the content
    generation_prompt: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the Modelfile's TEMPLATE renders (bos excluded), for checking the translation."""
        body = "".join(self.turns[m["role"]][0] + m["content"] + self.turns[m["role"]][1]
                       for m in messages)
        return body + (self.generation_prompt if add_generation_prompt else "")


_SENTINEL = "\x00CONTENT\x00"


def turn_format(template: str, tokenizer_cfg: dict[str, Any]) -> TurnFormat:
    """Render the Jinja template with sentinel messages and read each role's markers off it.

    Works for templates where a turn is prefix + content + suffix and depends only on its role
    (ChatML, Llama-2-ish, Zephyr, this project's tiny model); anything else raises ValueError.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(template)
    special = {k: _token_text(tokenizer_cfg.get(k)) for k in ("bos_token", "eos_token")}

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return tpl.render(messages=messages, add_generation_prompt=gen,
                          raise_exception=_raise, **special)

    empty = render([], False)
    turns = {}
    for role in ("system", "user", "assistant"):
        try:
            one = render([{"role": role, "content": _SENTINEL}], False)
        except Exception:  # noqa: BLE001 - a template may refuse a role (e.g. no system)
            continue
        if not one.startswith(empty) or one.count(_SENTINEL) != 1:
            raise ValueError(f"chat template is not a simple role-marker format (role {role})")
        prefix, suffix = one[len(empty):].split(_SENTINEL)
        turns[role] = (prefix, suffix)
    fmt = TurnFormat(empty, turns, render([], True)[len(empty):])
    _check_format(fmt, render)
    return fmt


def _check_format(fmt: TurnFormat, render: Callable[[list[dict[str, str]], bool], str]) -> None:
    # A multi-turn render must be the concatenation of single turns, else the format is richer
    # (first-turn-only system prompts, turn counters...) than a Modelfile template can say.
    roles = [r for r in ("system", "user", "assistant", "user") if r in fmt.turns]
    msgs = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    if render(msgs, True) != fmt.bos + fmt.render(msgs, True):
        raise ValueError("chat template turns are not independent; cannot translate to Ollama")


def _raise(message: str) -> None:
    raise ValueError(message)


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return tok.get("content", "")
    return tok or ""


def _go_literal(text: str) -> str:
    # Inside a Go template, literal text needs no escaping except the delimiters.
    if "{{" in text or "}}" in text:
        raise ValueError("chat markers contain template delimiters")
    return text


def write_modelfile(gguf_ref: str, template: str | None, tokenizer_cfg: dict[str, Any]) -> str:
    """An Ollama Modelfile: FROM, a TEMPLATE translated from the chat template, stop tokens.

    The bos the Jinja template renders is left out: llama.cpp adds it when tokenizing because
    the GGUF says add_bos_token. Without a translatable template only FROM and stops are written.
    """
    eos = _token_text(tokenizer_cfg.get("eos_token"))
    lines = [f"FROM {gguf_ref}", ""]
    stops = [eos] if eos else []
    try:
        fmt = turn_format(template, tokenizer_cfg) if template else None
    except ValueError as exc:
        # Still a usable Modelfile (raw prompts); the comment tells ops why there is no TEMPLATE.
        lines += [f"# chat template not translated: {exc}", ""]
        fmt = None
    if fmt is not None:
        lines += ['TEMPLATE """' + _go_template(fmt) + '"""', ""]
        # A model that starts a new turn by itself has finished its answer.
        stops += [p.strip() for p, _ in fmt.turns.values() if p.strip() and p.strip() not in stops]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _go_template(fmt: TurnFormat) -> str:
    branches = []
    for i, (role, (prefix, suffix)) in enumerate(fmt.turns.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}'
                        f"{_go_literal(prefix)}{{{{ .Content }}}}{_go_literal(suffix)}")
    return ("{{- range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}"
            + _go_literal(fmt.generation_prompt))
