"""HTTP API: the OpenAI-compatible gateway, feedback, runs, adapters and the ops page."""
