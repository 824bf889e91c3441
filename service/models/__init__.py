"""Base models: the embedded default (SmolLM2 from pip), GGUF conversion, and the checks every
entry point runs before starting on a model. Nothing here imports torch at module level."""
