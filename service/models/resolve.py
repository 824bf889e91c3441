"""Which base model a deployment runs on, and making sure it is there before anything starts.

`FLYWHEEL_BASE_MODEL` may be unset (the embedded default, SmolLM2-135M-Instruct, prepared once
under `FLYWHEEL_MODEL_CACHE_DIR`), a local Hugging Face directory, a `.gguf` file (converted once
into the cache) or a hub id (passed to vLLM and transformers as is; they download it on machines
that reach the hub). `Settings.resolved_base_model` names the directory without touching disk;
`ensure_base_model` prepares and checks it.
"""

from __future__ import annotations

from pathlib import Path

from service.models.inspect import ModelError, ModelInfo, inspect_model_dir
from service.models.prepare import DEFAULT_MODEL, Step, gguf_dirname, prepare_default, prepare_gguf


def resolved_path(base_model: str | None, cache_dir: Path) -> str:
    """The directory (or hub id) the engine and trainer load, computed without any I/O."""
    if not base_model:
        return str(cache_dir.expanduser() / DEFAULT_MODEL.dirname)
    if base_model.lower().endswith(".gguf"):
        return str(cache_dir.expanduser() / gguf_dirname(Path(base_model)))
    return base_model


def looks_like_hub_id(value: str) -> bool:
    """'org/name' that is not a path on this machine."""
    parts = value.split("/")
    return (len(parts) == 2 and all(parts) and not value.startswith((".", "~", "/"))
            and not Path(value).expanduser().exists())


def ensure_base_model(settings, step: Step = lambda m: None) -> ModelInfo | str:
    """Prepare the configured base model if it needs it and check it; a hub id is returned as is.

    Raises ModelError naming the problem before any server is started.
    """
    base, cache = settings.base_model, settings.model_cache_dir.expanduser()
    target = Path(resolved_path(base, cache))
    if not base:
        prepare_default(target, downloads=cache / "downloads", step=step)
    elif base.lower().endswith(".gguf"):
        prepare_gguf(Path(base), target, step=step)
    elif looks_like_hub_id(base):
        return base
    return inspect_model_dir(target)


def context_len(settings, model: ModelInfo | str) -> int:
    """The context to serve and train with: the model's own maximum, capped by the setting."""
    cap = settings.vllm_max_model_len
    return model.context_len(cap) if isinstance(model, ModelInfo) else cap


__all__ = ["ModelError", "ModelInfo", "context_len", "ensure_base_model", "looks_like_hub_id",
           "resolved_path"]
