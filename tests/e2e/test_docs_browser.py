"""The API docs in a real browser with no internet: headless Chromium (the Debian package, driven
by Playwright) may load nothing but the server itself, and /docs must still list the operations
(FastAPI's default page loads Swagger UI from a CDN and stays blank offline)."""

from __future__ import annotations

import pytest

from tests._browser import chromium, only


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.mark.parametrize(("page", "selector"), [("/docs", ".opblock-summary-path"),
                                                ("/redoc", "[data-section-id]")])  # fmt: skip
def test_the_api_docs_render_offline(server, tmp_path, page, selector):
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.route("**/*", only(server.url, blocked))
            tab.goto(server.url + page)
            tab.wait_for_selector(selector, timeout=30_000)
            shown = " ".join(tab.locator(selector).all_inner_texts())
            tab.screenshot(path=str(tmp_path / f"{page.strip('/')}.png"), full_page=True)
        finally:
            browser.close()
    for path in ("/classify", "/stitches", "/v2/models/{name}/infer"):
        assert path in shown or page == "/redoc", (page, path)
    assert shown.strip(), page
    if page == "/docs":
        assert not blocked, blocked  # it needed nothing from elsewhere
    else:  # ReDoc's bundle fetches its footer logo from its CDN: missing offline, nothing else
        assert all(url.endswith((".svg", ".png")) for url in blocked), blocked
