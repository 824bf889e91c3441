"""The ops page's routes: the page, its allow-listed static files, and /v1/whoami."""

from __future__ import annotations

import socket

import httpx
import pytest

from service.api.routes.ops_page import STATIC_FILES
from tests.helpers.auth import bearer
from tests.helpers.stack import ApiProcess, flywheel_env


@pytest.fixture(scope="module")
def page_api(db_url, broker_url, stack_root):
    """A real `flywheel api` on the session's Postgres and Redis; no vLLM, these routes need none."""
    env = flywheel_env(database_url=db_url, broker_url=broker_url, vllm_urls="",
                       data_dir=str(stack_root / "ops-page-data"))
    proc = ApiProcess(env=env, log=stack_root / "api-ops-page.log").start()
    yield proc
    proc.stop()


@pytest.fixture()
def pc(page_api):
    with httpx.Client(base_url=page_api.url, timeout=30) as c:
        yield c


def test_ops_serves_the_page_without_a_key(pc):
    r = pc.get("/ops")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "/ops/static/ops.js" in r.text and "/ops/static/ops.css" in r.text
    assert 'data-testid="key-input"' in r.text
    # The page keeps an API key: only its own scripts, no framing.
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name, media", [("ops.js", "text/javascript"), ("ops.css", "text/css"),
                                         ("ops.html", "text/html")])
def test_static_files_have_their_content_types(pc, name, media):
    r = pc.get(f"/ops/static/{name}")
    assert r.status_code == 200 and r.content
    assert r.headers["content-type"].startswith(media)
    assert set(STATIC_FILES) == {"ops.html", "ops.js", "ops.css"}


def _raw_get(url: str, path: str) -> int:
    """GET a path byte for byte (httpx would normalise the dot segments away)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(64).decode("latin-1")
    return int(head.split()[1])


@pytest.mark.parametrize("path", [
    "/ops/static/../routes/ops_page.py", "/ops/static/..%2Froutes%2Fops_page.py",
    "/ops/static/%2e%2e%2fapp.py", "/ops/static/..", "/ops/static/unknown.js",
    "/ops/static/ops.js.map", "/ops/static/OPS.JS", "/ops/static/", "/ops/static/ops.js%00",
    "/ops/static//etc/passwd",
])
def test_static_refuses_anything_outside_the_allow_list(page_api, path):
    assert _raw_get(page_api.url, path) == 404


def test_unknown_static_name_is_a_json_404(pc):
    r = pc.get("/ops/static/secrets.txt")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_whoami_for_both_roles(pc, make_key, tenant):
    for role in ("product", "ops"):
        r = pc.get("/v1/whoami", headers=bearer(make_key(tenant, role)))
        assert r.status_code == 200, r.text
        assert r.json() == {"tenant": tenant, "role": role}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer fw_not_a_real_key"},
                                     {"Authorization": "Basic abc"}])
def test_whoami_without_a_valid_key_is_401(pc, headers):
    r = pc.get("/v1/whoami", headers=headers)
    assert r.status_code == 401
    assert r.headers.get("www-authenticate") == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
