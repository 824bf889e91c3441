"""The system Chromium driven by Playwright (a browser download fails on these machines), for
the ops page's tests. A pytest plugin (tests/conftest.py registers it): the `browser` and `page` fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    """Fail (never skip) with the install command when Playwright or Chromium is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright (no browser download needed)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    """The system Chromium, driven by Playwright (no browser download)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


UI_TIMEOUT_MS = 15_000


@pytest.fixture()
def page(browser):
    """A fresh context and page; page.problems collects script errors, console errors and HTTP
    errors (a module may override this fixture to watch more)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    pg.problems = []
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.on("console", lambda m: pg.problems.append(f"console: {m.text}") if m.type == "error" else None)
    pg.on("response", lambda r: pg.problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    yield pg
    context.close()

