"""API keys: generated once, shown once, stored as a sha256 hash.

Keys carry 256 bits of randomness, so a fast hash is enough (no password-stretching needed) and
lets every request be checked with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "fw_"


def generate_key() -> str:
    """A new random API key, e.g. fw_3kT...; never stored in clear."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of a key, enough for a person to tell keys apart in a listing."""
    return key[:10]
