"""What a base model directory is, read from its files alone (no torch, no network).

`inspect_model_dir` is the check every entry point runs before it starts anything: an incomplete
directory, an architecture the engine or the trainer cannot take, pickled weights only, or a model
without a chat template is refused with a `ModelError` that names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROVENANCE_FILE = "flywheel-model.json"

# Decoder-only architectures that vLLM serves with runtime LoRA and PEFT trains with LoRA on
# plain linear layers (the q/k/v/o/gate/up/down projections Flywheel targets).
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM",
    "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
})
_WEIGHTS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelError(ValueError):
    """A base model Flywheel cannot serve or train on; the message says what and how to fix it."""


@dataclass(frozen=True)
class ModelInfo:
    """What the files of a model directory say about it."""

    path: Path
    architecture: str
    max_positions: int | None  # the model's own context (max_position_embeddings)
    provenance: dict | None  # flywheel-model.json when Flywheel prepared the directory

    def context_len(self, cap: int) -> int:
        """The context to serve and train with: the model's maximum, capped by `cap`."""
        return min(cap, self.max_positions) if self.max_positions else cap


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def _has_chat_template(root: Path) -> bool:
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    config = root / "tokenizer_config.json"
    return config.is_file() and bool(_read_json(config).get("chat_template"))


def _check_weights(root: Path) -> None:
    index = root / _WEIGHTS_INDEX
    if index.is_file():
        shards = set((_read_json(index).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ModelError(f"{root} is incomplete: {_WEIGHTS_INDEX} lists shards that are "
                             f"missing: {', '.join(missing[:5])}")
        return
    if any(root.glob("*.safetensors")):
        return
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise ModelError(f"{root} has only pickled weights (*.bin/*.pt); Flywheel loads "
                         "safetensors only. Convert them with transformers' save_pretrained("
                         "safe_serialization=True) on a trusted machine.")
    raise ModelError(f"{root} is incomplete: no *.safetensors weights")


def max_positions(config: dict) -> int | None:
    """The model's maximum context from its config.json (text_config for multimodal wrappers)."""
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def inspect_model_dir(path: str | Path) -> ModelInfo:
    """Check a Hugging Face model directory can be served and trained on; raise ModelError if not."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelError(f"base model directory {str(root)!r} does not exist")
    root = root.resolve()
    if not (root / "config.json").is_file():
        raise ModelError(f"{root} is incomplete: config.json is missing")
    config = _read_json(root / "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{root}: architecture {arch!r} is not supported (Flywheel serves and "
                         f"trains LoRA on: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    _check_weights(root)
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"{root} is incomplete: no tokenizer (tokenizer.json or tokenizer.model)")
    if not _has_chat_template(root):
        raise ModelError(f"{root} has no chat template (chat_template.jinja or tokenizer_config."
                         "json's chat_template): Flywheel serves chat and trains on chat turns, "
                         "so a base (non-instruct) model needs a template added first")
    provenance = _read_json(root / PROVENANCE_FILE) if (root / PROVENANCE_FILE).is_file() else None
    return ModelInfo(path=root, architecture=arch, max_positions=max_positions(config),
                     provenance=provenance)
