"""Local-stack and demo tooling: the tiny model, embedded servers, the supervisor, the demo."""
