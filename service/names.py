"""Tenant ids and aliases may not contain the separator `--`.

Versions are served as `<tenant>--<alias>--v<N>` and per-tenant policies live in
`<tenant>--<alias>.yaml`: with the separator inside a name, tenant `a--b`'s alias `c` and
tenant `a`'s alias `b--c` would share a policy file and a vLLM model name. Checked wherever a
name is created (API, CLI, repositories); the database refuses new rows too (migration 0003).
"""

from __future__ import annotations

SEPARATOR = "--"


class NameRefused(ValueError):
    """A tenant id or alias that could be confused with another tenant's."""


def check_name(kind: str, value: str) -> str:
    """`value` if it can serve as a tenant id or alias (`kind` says which), else NameRefused."""
    if not value or not value.strip():
        raise NameRefused(f"{kind} must not be empty")
    if SEPARATOR in value:
        raise NameRefused(f"{kind} {value!r} contains {SEPARATOR!r}, the separator of version "
                          f"and policy names (tenant--alias--vN)")
    return value
