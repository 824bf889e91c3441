"""docker-compose.yml read the way `docker compose` reads it, and its services run natively.

`load()` applies compose's variable interpolation (values from .env.example, as a fresh checkout's
`cp .env.example .env` gives them). `NativeService` turns one service into a command, an
environment and a healthcheck that run on this machine: container paths become folders of the
test, service hosts become the test session's servers, published ports become free ones.
Nothing else is changed, so what fails here fails in the containers too.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from service.local.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
FLYWHEEL_IMAGE = "flywheel:latest"

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class ComposeError(ValueError):
    """What `docker compose` would refuse (a required variable unset, a bad reference)."""


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped), as compose reads .env."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ComposeError(f"{path.name}: not KEY=VALUE: {line!r}")
            env[key.strip()] = value.strip()
    return env


def _substitute(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("bare"):
            return env.get(m.group("bare"), "")
        expr = m.group("braced")
        name, op, arg = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?]|)(.*)", expr, re.S).groups()
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and unset:
            raise ComposeError(f"required variable {name} is missing a value: {arg}")
        if op.endswith("-") and unset:
            return arg
        return value or ""

    return _VAR.sub(one, text)


def interpolate(obj, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ over every string value."""
    if isinstance(obj, str):
        return _substitute(obj, env)
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    return obj


def load(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict:
    """The compose file with its variables filled from `env` (default: .env.example)."""
    raw = yaml.safe_load(path.read_text())
    return interpolate(raw, read_env_file() if env is None else env)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def flywheel_services(compose: dict) -> dict[str, dict]:
    """The services that run Flywheel's own image."""
    return {n: s for n, s in compose["services"].items() if s.get("image") == FLYWHEEL_IMAGE}


def healthcheck_argv(service: dict) -> list[str] | None:
    """The healthcheck as an argv (CMD-SHELL through sh, as Docker runs it), or None."""
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(rest)]
    if kind == "CMD":
        return rest
    raise ComposeError(f"unknown healthcheck form {kind!r}")


def mount_points(service: dict) -> list[str]:
    """Container paths of the service's volumes and binds."""
    points = []
    for v in service.get("volumes") or []:
        parts = v.split(":") if isinstance(v, str) else [v.get("source", ""), v["target"]]
        points.append(parts[1])
    return points


@dataclass
class NativeService:
    """One compose service's command, environment and healthcheck, mapped onto this machine.

    paths: container path -> local path (longest prefix wins); hosts: compose service name ->
    the URL of the server standing in for it (scheme, credentials and path come from that URL).
    """

    name: str
    service: dict
    paths: dict[str, Path]
    hosts: dict[str, str]
    ports: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unmapped = [p for p in mount_points(self.service) if self._local(p) == p]
        if unmapped:
            raise ComposeError(f"{self.name}: no local folder for its mount(s) {unmapped}")
        command = self.service.get("command") or []
        for flag, value in zip(command, command[1:], strict=False):
            if flag == "--port":
                self.ports.setdefault(int(value), free_port())

    def _local(self, value: str) -> str:
        for prefix in sorted(self.paths, key=len, reverse=True):
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return str(self.paths[prefix]) + value[len(prefix):]
        return value

    def _map_url(self, value: str) -> str:
        urls = []
        for one in value.split(","):
            host = urlsplit(one.strip()).hostname
            if host not in self.hosts:
                return value
            urls.append(self.hosts[host])
        return ",".join(urls)

    def _map_text(self, text: str) -> str:
        """Container paths and localhost ports inside a shell string or an argument."""
        # One pass over all prefixes, longest first: a mapped path is never mapped again.
        prefixes = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        text = re.sub(rf"(?<![\w./-])({prefixes})(?=/|\b|$)",
                      lambda m: str(self.paths[m.group(1)]), text)
        for inside, outside in self.ports.items():
            text = re.sub(rf"\b(localhost|127\.0\.0\.1|0\.0\.0\.0):{inside}\b", f"127.0.0.1:{outside}",
                          text)
        return text

    def port(self, inside: int) -> int:
        return self.ports[inside]

    def argv(self) -> list[str]:
        out, command = [], list(self.service.get("command") or [])
        for i, word in enumerate(command):
            prev = command[i - 1] if i else ""
            if prev == "--port":
                word = str(self.ports[int(word)])
            elif prev == "--host":
                word = "127.0.0.1"  # the container's 0.0.0.0: a CI machine publishes nothing
            out.append(self._map_text(word))
        return out

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ without Flywheel's variables, plus the service's, mapped; the venv first on
        PATH (the image's /opt/venv) and this checkout importable (the image's /app)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FLYWHEEL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        for key, value in environment(self.service).items():
            mapped = self._map_url(value) if "://" in value else self._local(value)
            env[key] = mapped
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(ROOT)
        env["HOSTNAME"] = socket.gethostname()  # Docker sets it; dash does not
        env.update(extra)
        return env

    def healthcheck(self) -> list[str] | None:
        argv = healthcheck_argv(self.service)
        return None if argv is None else [self._map_text(a) for a in argv]


def describe(argv: list[str]) -> str:
    return shlex.join(argv)
