"""The web dashboard in a real browser (Debian's chromium, driven by Playwright), against two
real nodes on loopback: counters and debts shown, chat both ways, a manual settlement proposed
on one dashboard and accepted on the other, one rejected, one canceled by its proposer.

On a machine without chromium the test is skipped with the reason; under CI (CI=true), where
.ci/run installs it, a missing browser is a failure instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from earendil_py.runtime.control import dashboard_response
from earendil_py.runtime.node import Node
from tests.runtime.test_settlement import balances, network, owe

SETTLEMENT = """
[settlement]
manual_expiry_secs = 60
min_settlement_umel = 10
"""


def chromium() -> str:
    path = os.environ.get("EARENDIL_CHROMIUM") or shutil.which("chromium")
    try:
        import playwright.async_api  # noqa: F401  (a test extra)
    except ImportError:
        path = None
    if path is None:
        message = "the dashboard test needs Debian's chromium and playwright (`make test` has it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


async def open_dashboard(browser: Any, node: Node) -> Any:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    host, port = node.config.control_listen
    await page.goto(f"http://{host}:{port}/")
    page.errors = errors
    return page


@pytest.mark.anyio
async def test_an_operator_sees_chats_and_settles_through_the_dashboard(tmp_path: Path) -> None:
    chromium()
    from playwright.async_api import expect

    async with network(tmp_path, SETTLEMENT) as (a, b), browser() as chrome:
        await owe(a, b, 300)
        page_a, page_b = await open_dashboard(chrome, a), await open_dashboard(chrome, b)
        await expect(page_a.locator("#node-fingerprint")).to_have_attribute(
            "data-fingerprint", a.fingerprint.hex()
        )
        row_a = page_a.locator(f'#neighbors tr[data-neighbor="{b.fingerprint.hex()}"]')
        row_b = page_b.locator(f'#neighbors tr[data-neighbor="{a.fingerprint.hex()}"]')
        await expect(row_a.locator(".debt-out")).to_have_text("300")
        await expect(row_b.locator(".debt-in")).to_have_text("300")
        await expect(page_b.locator("#relay-delivered")).to_have_text("300")

        # Chat: a writes, b reads and answers. The text is shown as text, not as markup.
        await row_a.locator(".chat-button").click()
        await page_a.fill("#chat-input", "<b>hello</b> from a")
        await page_a.click("#chat-send")
        await expect(page_a.locator("#chat-input")).to_have_value("")
        sent = page_a.locator('#chat-messages li[data-direction="out"] .chat-text')
        await expect(sent).to_have_text("<b>hello</b> from a")
        await row_b.locator(".chat-button").click()
        got = page_b.locator('#chat-messages li[data-direction="in"] .chat-text')
        await expect(got).to_have_text("<b>hello</b> from a")
        await page_b.fill("#chat-input", "hi a, b here")
        await page_b.press("#chat-input", "Enter")
        reply = page_a.locator('#chat-messages li[data-direction="in"] .chat-text')
        await expect(reply).to_have_text("hi a, b here")

        # A manual settlement proposed by a's operator, accepted by b's.
        await row_a.locator(".settle-button").click()
        await page_a.fill("#settle-pay", "250")
        await page_a.select_option("#settle-method", "manual")
        await page_a.click("#settle-submit")
        await expect(page_a.locator("#settle-status")).to_contain_text("pending")
        pending = page_b.locator('#settlements tr[data-state="pending"]')
        await expect(pending).to_have_count(1)
        await pending.locator(".accept-button").click()
        await expect(page_a.locator('#settlements tr[data-state="completed"]')).to_have_count(1)
        await expect(row_a.locator(".debt-out")).to_have_text("50")
        await expect(row_b.locator(".debt-in")).to_have_text("50")
        assert balances(a, b) == (50, 50, 0, 0)

        # One more, which b's operator rejects: nothing changes.
        await page_a.fill("#settle-pay", "50")
        await page_a.click("#settle-submit")
        pending = page_b.locator('#settlements tr[data-state="pending"]')
        await expect(pending).to_have_count(1)
        await pending.locator(".reject-button").click()
        await expect(page_a.locator('#settlements tr[data-state="rejected"]')).to_have_count(1)
        assert balances(a, b) == (50, 50, 0, 0)

        # And one that a's operator withdraws before b's decides.
        await page_a.fill("#settle-pay", "40")
        await page_a.click("#settle-submit")
        await expect(page_b.locator('#settlements tr[data-state="pending"]')).to_have_count(1)
        mine = page_a.locator('#settlements tr[data-state="pending"]')
        await mine.locator(".cancel-button").click()
        await expect(page_b.locator('#settlements tr[data-state="canceled"]')).to_have_count(1)
        await expect(page_a.locator('#settlements tr[data-state="canceled"]')).to_have_count(1)
        await expect(page_a.locator(".cancel-button")).to_have_count(0)
        assert balances(a, b) == (50, 50, 0, 0)
        assert page_a.errors == page_b.errors == []


def test_the_dashboard_runs_only_its_own_inline_script_and_style() -> None:
    response = dashboard_response()
    policy = dict(response.headers)["Content-Security-Policy"]
    assert "script-src 'sha256-" in policy
    assert "style-src 'sha256-" in policy
    assert "unsafe" not in policy
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
