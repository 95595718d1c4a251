"""Eight identities on one route cookie flood the target with calls, 256 each: as many as
the target's run-once cache once held in all. Half of them go to no method at all, half to a
method the target serves (so they run a handler, and are remembered). Each identity's calls
beyond its request rate are dropped unread. An honest neighbour's chat and push_debt claims
must still be served, and both ledgers keep its claims.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from earendil_py.core.neighbor import REFUSED as UNKNOWN_SETTLEMENT
from earendil_py.core.rpc import METHOD_NOT_FOUND, REQUEST_BURST_PER_NEIGHBOR, SERVER_BUSY
from tests.helpers import wait_until
from tests.hostile.harness import Pair, api
from tests.hostile.peer import HostilePeer, error_code, flood_calls

pytestmark = pytest.mark.timeout(60)

IDENTITIES = 8
CALLS_EACH = 256


def flood(peers: list[HostilePeer]) -> Counter[int | None]:
    """CALLS_EACH calls from each peer (`flood_calls`); the answers' codes."""
    for peer in peers:
        for payload in flood_calls(CALLS_EACH):
            peer.send_rpc(payload)
    codes: Counter[int | None] = Counter()
    for peer in peers:
        # Answered after the flood it follows on the same link: the flood has been served.
        codes[error_code(peer.call("no_such_method"))] += 1
        codes.update(error_code(r) for r in peer.calls.responses.values())
    return codes


def test_flood_from_many_identities_on_one_cookie(pair: Pair) -> None:
    peers = [pair.peer("udp") for _ in range(IDENTITIES)]
    try:
        with pair.attacking() as mark:
            for peer in peers:
                peer.connect()
            codes = flood(peers)
            # Not found, the settlement unknown, or over the identity's own quota: busy.
            assert set(codes) <= {METHOD_NOT_FOUND, SERVER_BUSY, UNKNOWN_SETTLEMENT}, codes
            # Each identity is answered its burst (less what connecting took, plus what came
            # back while it sent) and its last call, never its whole flood.
            assert (
                IDENTITIES <= sum(codes.values()) <= IDENTITIES * (REQUEST_BURST_PER_NEIGHBOR + 8)
            )

            # The honest neighbour's chat is served while the flood's answers are cached.
            sent = api(
                pair.honest,
                "POST",
                f"/api/chat/{pair.target.fingerprint}",
                {"text": "still here?"},
            )
            assert sent["message"]["status"] == "delivered"

            # So are its push_debt claims: the target commits each before it answers.
            claims = pair.ledger_kinds(pair.target, pair.honest_fp).count("claim_received")
            honest_mark = pair.honest_daemon.mark()

            def claimed_twice() -> bool:
                pair.exchange(1)  # counts move: there is something to claim (an idle link
                time.sleep(0.5)  # pushes no claims)
                kinds = pair.ledger_kinds(pair.target, pair.honest_fp)
                return kinds.count("claim_received") >= claims + 2

            wait_until(claimed_twice, 15)
            # And none was turned away busy (a claim a loaded machine answers late is not the
            # flood's doing: the next one supersedes it).
            busy = [
                e
                for e in pair.honest_daemon.events[honest_mark:]
                if e.get("event") == "debt_push_failed" and str(SERVER_BUSY) in e.get("error", "")
            ]
            assert busy == []
            pair.check_unharmed()
            pair.assert_no_errors(mark)
    finally:
        for peer in peers:
            peer.stop()
