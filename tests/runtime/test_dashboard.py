"""The web dashboard in a real browser (Debian's chromium, driven by Playwright), against two
real nodes on loopback: signing in through the one-time link, counters and debts shown, chat
both ways, a manual settlement proposed on one dashboard and accepted on the other, one
rejected, one canceled by its proposer; and a page on another origin that tries to use the
operator's session.

On a machine without chromium the test is skipped with the reason; under CI (CI=true), where
.ci/run installs it, a missing browser is a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from earendil_py.runtime.control import dashboard_response
from earendil_py.runtime.http import call_api
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


async def login_link(node: Node) -> str:
    """A one-time dashboard link, as `earendil-py dashboard` gets it."""
    answer = await anyio.to_thread.run_sync(
        call_api, node.config, "POST", "/api/dashboard-link", {}
    )
    url = answer["url"]
    assert isinstance(url, str)
    return url


async def open_dashboard(browser: Any, node: Node) -> Any:
    """A page in a browser context of its own (its own cookies), signed in to `node`'s
    dashboard through a one-time link."""
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    host, port = node.config.control_listen
    response = await page.goto(await login_link(node))
    assert response.status == 200 and page.url == f"http://{host}:{port}/"
    page.errors = errors
    return page


async def expect_fingerprint(page: Any, node: Node) -> None:
    """The page shows `node`'s status (it is signed in and its API calls work)."""
    from playwright.async_api import expect

    await expect(page.locator("#node-fingerprint")).to_have_attribute(
        "data-fingerprint", node.fingerprint.hex()
    )


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


@pytest.mark.anyio
async def test_a_dashboard_link_signs_in_once_and_only_once(tmp_path: Path) -> None:
    chromium()
    async with network(tmp_path, SETTLEMENT) as (a, _), browser() as chrome:
        host, port = a.config.control_listen
        link = await login_link(a)
        first = await (await chrome.new_context()).new_page()
        assert (await first.goto(f"http://{host}:{port}/")).status == 401  # not signed in
        assert (await first.goto(link)).status == 200
        assert first.url == f"http://{host}:{port}/"
        cookies = await first.context.cookies()
        assert [(c["httpOnly"], c["sameSite"], c["path"]) for c in cookies] == [
            (True, "Strict", "/")
        ]
        second = await (await chrome.new_context()).new_page()
        refused = await second.goto(link)  # the same link again, in another browser
        assert refused.status == 403
        assert "used or has expired" in await second.content()
        assert (await second.goto(f"http://{host}:{port}/")).status == 401
        # The first browser stays signed in.
        assert (await first.reload()).status == 200
        await expect_fingerprint(first, a)


ATTACKER_PAGE = """<!DOCTYPE html>
<html><body>
<iframe name="sink"></iframe>
<!-- A text/plain form whose body is valid JSON: {{"text": "sent from another site="}} -->
<form id="form" method="POST" target="sink" enctype="text/plain"
      action="{api}/api/chat/{neighbor}">
  <input name='{{"text": "sent from another site' value='"}}'>
</form>
<script>
const API = "{api}";
const results = {{}};
async function attempt(name, run) {{
  try {{ results[name] = await run(); }} catch (err) {{ results[name] = "error: " + err.name; }}
}}
async function main() {{
  await attempt("json_post", async () => (await fetch(API + "/api/neighbors/{neighbor}/price", {{
    method: "POST", credentials: "include", headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{price_umel: 0, debt_limit_umel: 1000000000000}})}})).status);
  await attempt("dashboard_post", async () => (await fetch(API + "/api/settlements", {{
    method: "POST", credentials: "include",
    headers: {{"Content-Type": "application/json", "X-Earendil-Dashboard": "1"}},
    body: JSON.stringify({{neighbor: "{neighbor}", method: "manual", request_umel: 300}})
  }})).status);
  await attempt("no_cors_post", async () => (await fetch(API + "/api/settlements", {{
    method: "POST", mode: "no-cors", credentials: "include",
    headers: {{"Content-Type": "text/plain"}},
    body: JSON.stringify({{neighbor: "{neighbor}", method: "manual", request_umel: 300}})}})).type);
  await attempt("read_status", async () => (await (await fetch(API + "/api/status", {{
    credentials: "include"}})).text()).slice(0, 20));
  await attempt("read_metrics", async () => (await (await fetch(API + "/metrics", {{
    credentials: "include"}})).text()).slice(0, 20));
  for (const path of ["/api/receive?dock=9", "/metrics", "/api/status"]) {{
    await attempt("img " + path, () => new Promise((resolve) => {{
      const img = new Image();
      img.onload = () => resolve("loaded");
      img.onerror = () => resolve("failed");
      img.src = API + path;
    }}));
  }}
  document.getElementById("form").submit();
  document.body.dataset.results = JSON.stringify(results);
}}
main();
</script>
</body></html>
"""


async def serve_page(html: str, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve `html` for any request on a port of 127.0.0.1 of its own: another origin."""
    body = html.encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()

    async def answer(stream: Any) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            await stream.send(head + body)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(answer)


@pytest.mark.anyio
async def test_a_page_on_another_origin_can_neither_change_nor_read_anything(
    tmp_path: Path,
) -> None:
    chromium()
    async with network(tmp_path, SETTLEMENT) as (a, b), browser() as chrome:
        await owe(b, a, 300)  # b owes a: a request_umel proposal would ask b to pay
        b.send_datagram(a.fingerprint, 9, b"for the real consumer", hops=1)
        with anyio.fail_after(5):
            while a.relay.delivered < 301:
                await anyio.sleep(0.02)
        before = balances(a, b), a.accounts.neighbors[b.fingerprint].account.state.our_offer

        # The operator is signed in to a's dashboard; in the same browser, another page.
        dashboard = await open_dashboard(chrome, a)
        host, port = a.config.control_listen
        api = f"http://{host}:{port}"
        attacker_page = ATTACKER_PAGE.format(api=api, neighbor=b.fingerprint.hex())
        async with anyio.create_task_group() as tg:
            attacker_port = await tg.start(serve_page, attacker_page)
            attacker = await dashboard.context.new_page()
            seen: list[tuple[str, str, int]] = []
            attacker.on(
                "response",
                lambda r: (
                    seen.append((r.request.method, r.url, r.status))
                    if r.url.startswith(api)
                    else None
                ),
            )
            await attacker.goto(f"http://127.0.0.1:{attacker_port}/")
            results_attr = attacker.locator("body[data-results]")
            await results_attr.wait_for(state="attached")
            results = json.loads(await results_attr.get_attribute("data-results"))
            # Let the form's POST arrive too.
            with anyio.fail_after(5):
                while not any(method == "POST" and "/chat/" in url for method, url, _ in seen):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

        # Nothing could be read: the fetches that would read failed, images showed nothing.
        assert results["json_post"] == "error: TypeError"  # its preflight was refused
        assert results["dashboard_post"] == "error: TypeError"
        assert results["no_cors_post"] == "opaque"  # sent, but its answer is hidden
        assert results["read_status"] == "error: TypeError"
        assert results["read_metrics"] == "error: TypeError"
        assert results["img /api/receive?dock=9"] == "failed"
        assert results["img /metrics"] == "failed"
        # Every request whose answer the browser reports was refused, the two POSTs included.
        posts = {url.removeprefix(api) for method, url, _ in seen if method == "POST"}
        assert posts == {"/api/settlements", f"/api/chat/{b.fingerprint.hex()}"}
        assert all(status >= 400 for _, _, status in seen), seen
        # And nothing changed: the price, the balances, no settlement, the datagram waits.
        assert (
            balances(a, b),
            a.accounts.neighbors[b.fingerprint].account.state.our_offer,
        ) == before
        assert a.accounts.settlements() == b.accounts.settlements() == []
        assert await a.chat.history(b.fingerprint) == []
        assert [d.data for d in a.receive_datagrams_nowait(9)] == [b"for the real consumer"]
        # The operator's own page still works with the same session.
        await dashboard.reload()
        await expect_fingerprint(dashboard, a)
        assert dashboard.errors == []
