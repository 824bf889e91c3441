"""The `flywheel` CLI as a child process against the session's real services.

A pytest plugin (tests/conftest.py registers it): the `cli_env` fixture, which a module may
override with an environment of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.stack import REPO, flywheel_env


def flywheel(env: dict[str, str], *args: str, policy_dir: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """`flywheel <args>` run to completion; its exit code and output captured as text."""
    if policy_dir:
        env = {**env, "FLYWHEEL_POLICY_DIR": policy_dir}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_env(db_url, broker_url, stack_root) -> dict[str, str]:
    """The CLI's environment: the session's Postgres and Redis, no reachable engine."""
    env = flywheel_env(database_url=db_url, broker_url=broker_url, data_dir=str(stack_root / "cli"),
                       vllm_urls="http://127.0.0.1:9")
    return {**env, "COLUMNS": "200"}  # rich sizes tables to the terminal
