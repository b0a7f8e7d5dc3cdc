"""The API docs in a real browser with no internet: headless Chromium (the Debian package, driven
by Playwright) may load nothing but the server itself, and /docs must still list the operations
(FastAPI's default page loads Swagger UI from a CDN and stays blank offline)."""

from __future__ import annotations

import json

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


def test_try_it_out_with_a_file_in_the_docs_classifies_it(server):
    """Swagger UI's "Try it out" for the multipart form, a digit chosen, nothing else touched:
    it filled every optional field with a sample of its type (1 ms, stitch 0 and a 1 GFLOPs cap
    at once) and answered 422 until three fields were cleared. Now they are empty (the server's
    defaults apply)."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    digit = Path(__file__).resolve().parents[2] / "examples" / "digits" / "7.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.route("**/*", only(server.url, []))
            tab.goto(server.url + "/docs")
            op = tab.locator("#operations-default-classify_classify_post")
            op.locator(".opblock-summary").click()
            op.locator("button.try-out__btn").click()
            body = op.locator(".opblock-section-request-body")
            body.locator("select").first.select_option("multipart/form-data")
            body.locator("input[type=file]").first.set_input_files(str(digit))
            op.locator("button.execute").click()
            answer = op.locator(".live-responses-table .response-col_description pre").first
            answer.wait_for(timeout=30_000)
            shown = answer.inner_text()
            status = op.locator(".live-responses-table tbody .response-col_status").first
            code = status.inner_text()
        finally:
            browser.close()
    assert code.strip() == "200", (code, shown)
    assert json.loads(shown)["predictions"][0][0]["class_index"] == 7
