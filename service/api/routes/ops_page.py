"""The ops web page (static HTML/JS/CSS, no build step) and `GET /v1/whoami` for its login.

The page itself is public: it holds no data. Everything it shows comes from the API with the
key the user pastes, so a product key only ever gets 403s.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel

from service.api.deps import Caller
from service.api.errors import ApiError

router = APIRouter(tags=["ops"])

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

# An allow-list, not a directory mount: nothing but these three files can ever be served.
STATIC_FILES = {
    "ops.html": "text/html; charset=utf-8",
    "ops.js": "text/javascript; charset=utf-8",
    "ops.css": "text/css; charset=utf-8",
}

# The page holds an API key in sessionStorage: only its own scripts and styles may run, it
# talks only to this origin, and no other site may frame it.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: always revalidate so a deploy is seen at the next load.
    "Cache-Control": "no-cache",
}


def _file(name: str) -> FileResponse:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, f"no static file {name!r}", param="name", code="not_found")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)


@router.get("/ops", include_in_schema=False)
async def ops_page() -> FileResponse:
    """The ops page; it asks for an ops key and calls the API with it."""
    return _file("ops.html")


@router.get("/ops/static/{name}", include_in_schema=False)
async def ops_static(name: str) -> FileResponse:
    """The page's script and stylesheet (allow-listed names only)."""
    return _file(name)


class WhoAmI(BaseModel):
    tenant: str
    role: str


@router.get("/v1/whoami", response_model=WhoAmI)
async def whoami(caller: Caller) -> WhoAmI:
    """The tenant and role of the calling key (the ops page refuses product keys with it)."""
    return WhoAmI(tenant=caller.tenant_id, role=caller.role)
