"""The ops page's Replicas panel in real headless Chromium, against the session's API and its real
vLLM (CPU) replica: two versions swapped in show on that replica as live and warm, with where
the replica came from. GET /v1/replicas behind it is tenant-scoped: another tenant's ops key sees
the replica but none of these versions, and a product key gets a 403."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from service.engine import swap as sw
from service.engine.vllm_admin import VllmAdmin
from tests.helpers.auth import bearer
from tests.helpers.replicas import swap_config

pytestmark = pytest.mark.vllm

SCREENSHOT = Path("/tmp/ops-replicas.png")


async def _swap_in(url: str, sessions, cfg: sw.SwapConfig, *versions) -> None:
    async with VllmAdmin(url, timeout_s=60) as admin:
        for v in versions:
            assert (await sw.swap(sessions, [admin], v, cfg)).ok


def _held(api_url: str, key: str, replica: str) -> dict[str, str]:
    """version -> role, as GET /v1/replicas shows the replica for this key's tenant."""
    r = httpx.get(f"{api_url}/v1/replicas", headers=bearer(key), timeout=10)
    assert r.status_code == 200, r.text
    [row] = [x for x in r.json()["replicas"] if x["url"] == replica]
    return {v["version"]: v["role"] for v in row["versions"]}


def test_the_replicas_panel_shows_which_version_each_replica_holds(
        api, vllm, versions, tiny_model, db_sessions, make_key, page):
    alias, _ = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    # The session's engine is started with its own LoRA flags: no sizing check here.
    cfg = dataclasses.replace(swap_config(tiny_model), engine_size=None)
    # Playwright's sync API runs its own event loop in this thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _swap_in(vllm.url, db_sessions, cfg, v1, v2)).result()
    # v2 live, v1 warm

    ops, other = make_key(versions.tenant, "ops"), make_key(f"{versions.tenant}-x", "ops")
    deadline = time.monotonic() + 20
    while _held(api.url, ops, vllm.url) != {name1: "warm", name2: "live"}:
        assert time.monotonic() < deadline, _held(api.url, ops, vllm.url)
        time.sleep(0.3)  # the API's observer reads the replica every second
    assert _held(api.url, other, vllm.url) == {}
    product = httpx.get(f"{api.url}/v1/replicas", headers=bearer(make_key(versions.tenant)))
    assert product.status_code == 403

    page.goto(f"{api.url}/ops")
    page.get_by_label("Ops API key").fill(ops)
    page.get_by_role("button", name="Sign in").click()
    row = page.locator(f'[data-testid="replica-row"][data-url="{vllm.url}"]')
    expect(row).to_contain_text("healthy")
    live = row.locator(f'[data-testid="resident-version"][data-version="{name2}"]')
    expect(live).to_have_attribute("data-role", "live")
    expect(live).to_contain_text(f"{alias} v2")
    warm = row.locator(f'[data-testid="resident-version"][data-version="{name1}"]')
    expect(warm).to_have_attribute("data-role", "warm")
    entry = page.locator(f'[data-testid="discovery-entry"][data-name="{vllm.url}"]')
    expect(entry).to_contain_text("one replica, as configured")
    expect(page.get_by_test_id("discovery-error")).to_have_count(0)
    page.locator("#replicas").screenshot(path=str(SCREENSHOT))
    assert page.problems == []
