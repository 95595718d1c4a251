"""The web dashboard in a real browser (Debian's chromium, driven by Playwright), against real
nodes on loopback: signing in through the one-time link, counters and debts shown, chat both
ways, a manual settlement proposed on one dashboard and accepted on the other, one rejected,
one canceled by its proposer; the neighbour view (list, conversation, debt with its bar and
chart), a neighbour's proposal raising a banner and a browser notification and accepted from
the banner, the unread badge, a down link's reason, screenshots at 1280 and 390 px without
horizontal scrolling; and a page on another origin that tries to use the operator's session.

On a machine without chromium the test is skipped with the reason; under CI (CI=true), where
.ci/run installs it, a missing browser is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from earendil_py.netgen import Edge
from earendil_py.runtime.control import dashboard_response
from earendil_py.runtime.history import History
from earendil_py.runtime.http import call_api
from earendil_py.runtime.node import Node
from tests.helpers import converged, make_nodes
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


async def open_dashboard(
    browser: Any, node: Node, *, width: int = 1280, init_script: str | None = None
) -> Any:
    """A page `width` px wide in a browser context of its own (its own cookies), signed in to
    `node`'s dashboard through a one-time link; `page.errors` collects its script errors."""
    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    if init_script is not None:
        await page.add_init_script(init_script)
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
        row_a = page_a.locator(f'#neighbors li[data-neighbor="{b.fingerprint.hex()}"]')
        row_b = page_b.locator(f'#neighbors li[data-neighbor="{a.fingerprint.hex()}"]')
        await expect(row_a.locator(".debt-out")).to_have_text("300")
        await expect(row_b.locator(".debt-in")).to_have_text("300")
        await expect(page_b.locator("#relay-delivered")).to_have_text("300")

        # Chat: a writes, b reads and answers. The text is shown as text, not as markup.
        await row_a.locator(".nb-select").click()
        await page_a.fill("#chat-input", "<b>hello</b> from a")
        await page_a.click("#chat-send")
        await expect(page_a.locator("#chat-input")).to_have_value("")
        sent = page_a.locator('#chat-messages li[data-direction="out"] .chat-text')
        await expect(sent).to_have_text("<b>hello</b> from a")
        await row_b.locator(".nb-select").click()
        got = page_b.locator('#chat-messages li[data-direction="in"] .chat-text')
        await expect(got).to_have_text("<b>hello</b> from a")
        await page_b.fill("#chat-input", "hi a, b here")
        await page_b.press("#chat-input", "Enter")
        reply = page_a.locator('#chat-messages li[data-direction="in"] .chat-text')
        await expect(reply).to_have_text("hi a, b here")

        # A manual settlement proposed by a's operator, accepted by b's.
        await page_a.click("#settle-open")
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

        # One more, paying ahead (80 of a debt of 50): refused until prepay is ticked; b's
        # operator rejects it, and nothing changes.
        await page_a.fill("#settle-pay", str(2**53 + 1))  # would be sent rounded
        await page_a.click("#settle-submit")
        await expect(page_a.locator("#settle-status")).to_contain_text("too large")
        await page_a.fill("#settle-pay", "80")
        await page_a.click("#settle-submit")
        await expect(page_a.locator("#settle-status")).to_contain_text("needs prepay")
        # The browser logs the refused call (409) as a console error: the one expected here.
        assert len(page_a.errors) == 1 and "409" in page_a.errors.pop(), page_a.errors
        await page_a.check("#settle-prepay")
        await page_a.click("#settle-submit")
        pending = page_b.locator('#settlements tr[data-state="pending"]')
        await expect(pending).to_have_count(1)
        await pending.locator(".reject-button").click()
        await expect(page_a.locator('#settlements tr[data-state="rejected"]')).to_have_count(1)
        paid = page_a.locator('#settlements tr[data-state="rejected"] .paid-out')
        await expect(paid).to_have_text("80")
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


# a dials b over UDP and c over TCP. What a may owe b, and c may owe a, is limited to a few
# thousand µMEL, so a few hundred packets show on the bars; a settles by itself at half of b's
# limit (min_settlement_umel is lowered so the mark sits there).
STAR = [Edge(0, 1, "udp"), Edge(0, 2, "tcp")]
STAR_TOML = """
[settlement]
manual_expiry_secs = 60
min_settlement_umel = 10
"""
PRICES = {
    0: """
[out_routes.node1_udp.price]
outbound_min_debt_limit_umel = 100
[out_routes.node2_tcp.price]
inbound_debt_limit_umel = 1000
""",
    1: """
[in_routes.from_node0_udp.price]
inbound_debt_limit_umel = 2000
""",
    2: """
[in_routes.from_node0_tcp.price]
outbound_min_debt_limit_umel = 100
""",
}
# Stands in for the browser's Notification API (headless chromium shows none): it records
# what the page asks for, and starts as a browser that has not asked the operator yet.
NOTIFICATIONS = """
window.__notifications = [];
window.__permissionRequests = 0;
window.Notification = class {
  static permission = "default";
  static async requestPermission() {
    window.__permissionRequests += 1;
    window.Notification.permission = "granted";
    return "granted";
  }
  constructor(title, options) { window.__notifications.push([title, options && options.body]); }
};
"""


async def _run_until_stopped(
    node: Node, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    with scope:
        await node.run(task_status=task_status)


@asynccontextmanager
async def star(tmp_path: Path) -> AsyncIterator[tuple[list[Node], dict[Node, anyio.CancelScope]]]:
    """Three nodes as STAR, sampling their history every 0.2 s; each can be stopped alone by
    cancelling its scope."""
    nodes = make_nodes(tmp_path, 3, STAR, extra_toml=STAR_TOML, node_toml=PRICES)
    scopes = {node: anyio.CancelScope() for node in nodes}
    async with anyio.create_task_group() as tg:
        for node in nodes:
            node.history = History(interval_secs=0.2, window_secs=60)
            await tg.start(_run_until_stopped, node, scopes[node])
        with anyio.fail_after(10):
            await converged(nodes, STAR)
        yield nodes, scopes
        tg.cancel_scope.cancel()


async def no_horizontal_scroll(page: Any) -> bool:
    return bool(await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


async def inside_viewport(locator: Any, width: int) -> bool:
    box = await locator.bounding_box()
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width


@pytest.mark.anyio
async def test_the_neighbour_view_the_proposal_banner_and_a_phone_sized_screen(
    tmp_path: Path,
) -> None:
    chromium()
    from playwright.async_api import expect

    with anyio.fail_after(90):
        async with star(tmp_path / "net") as ((a, b, c), scopes), browser() as chrome:
            await owe(a, b, 300)
            await owe(c, a, 120)
            page = await open_dashboard(chrome, a, init_script=NOTIFICATIONS)
            hex_b, hex_c = b.fingerprint.hex(), c.fingerprint.hex()
            item_b = page.locator(f'#neighbors li[data-neighbor="{hex_b}"]')
            item_c = page.locator(f'#neighbors li[data-neighbor="{hex_c}"]')

            # The three parts: the list, the conversation and the debt of the selected
            # neighbour, side by side on a wide screen.
            await item_b.locator(".nb-select").click()
            await expect(item_b).to_have_class("selected")
            await expect(page.locator("#chat-neighbor")).to_have_text(hex_b[:8])
            await expect(page.locator("#debt .debt-out")).to_have_text("300")
            await expect(page.locator("#net-debt")).to_have_text("We owe them 300 µMEL net")
            boxes = [
                await page.locator(part).bounding_box()
                for part in ("#neighbors-panel", "#chat", "#debt")
            ]
            assert boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"], boxes
            assert len({round(box["y"]) for box in boxes}) == 1, boxes
            # The full fingerprint is one click away.
            await page.locator("#debt-fp .fp-toggle").click()
            await expect(page.locator("#debt-fp .fp-toggle")).to_have_text(hex_b)
            # The header speaks of relaying; the link's RTT and drops are on the page.
            await expect(page.locator("#relay-originated")).to_have_text("300")
            await expect(item_b.locator(".nb-link")).to_contain_text("rtt ")
            await expect(item_b.locator(".nb-link")).to_contain_text("drops")

            # The bar: 300 of b's limit of 2000, the automatic settlement marked at half.
            bar = page.locator("#bar-out")
            await expect(bar).to_have_attribute("aria-valuenow", "300")
            await expect(bar).to_have_attribute("aria-valuemax", "2000")
            await expect(bar).to_have_attribute("data-mark", "1000")
            assert await bar.locator(".bar-fill").evaluate("e => parseFloat(e.style.width)") == 15
            assert await bar.locator(".bar-mark").evaluate("e => parseFloat(e.style.left)") == 50
            await expect(item_c.locator(".bar.in")).to_have_attribute("aria-valuenow", "120")
            await expect(item_c.locator(".bar.in")).to_have_attribute("aria-valuemax", "1000")

            # The chart has the traffic: samples, and packets in some interval.
            chart = page.locator("#chart-debt")
            await expect(chart.locator("polyline.line-debt-out")).to_have_count(1)
            await expect(page.locator("#chart-packets")).not_to_have_attribute("data-max", "0")
            assert int(await chart.get_attribute("data-samples")) >= 2
            points = await chart.locator("polyline.line-debt-out").get_attribute("points")
            assert len(points.split()) >= 2

            # c chats: its unread badge shows, until its conversation is opened.
            await c.chat.send(a.fingerprint, "hello from c")
            badge = item_c.locator(".unread")
            await expect(badge).to_have_text("1")
            await expect(badge).to_be_visible()
            await item_c.locator(".nb-select").click()
            await expect(page.locator('#chat-messages li[data-direction="in"]')).to_have_text(
                re.compile("hello from c")
            )
            await expect(badge).to_be_hidden()
            assert a.chat.unread[c.fingerprint] == 0

            # c stops: its link is down, and the page says why and since when.
            scopes[c].cancel()
            await expect(item_c).to_have_attribute("data-link", "down")
            await expect(item_c.locator(".nb-link")).to_have_text(
                re.compile(r"down for \d+ s: (closed by the neighbour|connection refused)")
            )

            # An up route's failures from before its link came up are shown as history.
            up_failure = page.locator('#routes tr[data-state="up"] .rfailure').first
            await expect(up_failure).to_have_text(re.compile(r"^none( since it came up; .*)?$"))

            # Notifications are asked for on a click only; then b proposes a manual
            # settlement, and the banner and a notification come without a reload.
            assert await page.evaluate("window.__permissionRequests") == 0
            await page.click("#notify-button")
            await expect(page.locator("#notify-button")).to_be_hidden()
            await item_b.locator(".nb-select").click()
            proposed = await anyio.to_thread.run_sync(
                call_api,
                b.config,
                "POST",
                "/api/settlements",
                {"neighbor": a.fingerprint.hex(), "method": "manual", "request_umel": 200},
            )
            banner = page.locator(f'#proposals .proposal[data-settlement="{proposed["id"]}"]')
            await expect(banner).to_contain_text("we pay 200 µMEL of what we owe them")
            notifications = await page.evaluate("window.__notifications")
            assert notifications == [
                [f"Settlement proposal from {hex_b[:8]}", "we pay 200 µMEL of what we owe them"]
            ]

            # Screenshots, wide and phone-sized, with the banner up; nothing wider than a phone.
            await page.screenshot(path=tmp_path / "dashboard-1280.png", full_page=True)
            for width in (900, 420, 390, 360):
                await page.set_viewport_size({"width": width, "height": 800})
                assert await no_horizontal_scroll(page), width
                assert await inside_viewport(banner.locator(".accept-button"), width)
                assert await inside_viewport(item_b.locator(".debt-out"), width)
                assert await inside_viewport(page.locator("#debt .debt-out"), width)
                if width == 390:
                    await page.screenshot(path=tmp_path / "dashboard-390.png", full_page=True)
            await page.set_viewport_size({"width": 1280, "height": 900})

            # Accepted from the banner: the settlement completes, both ledgers agree.
            await banner.locator(".accept-button").click()
            await expect(banner).to_have_count(0)
            completed = page.locator(f'#settlements tr[data-settlement="{proposed["id"]}"]')
            await expect(completed).to_have_attribute("data-state", "completed")
            await expect(page.locator("#debt .debt-out")).to_have_text("100")
            assert balances(a, b)[:2] == (100, 100)
            assert page.errors == []


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
