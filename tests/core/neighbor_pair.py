"""Two `Neighbor`s pumped in memory: the shell's part, played by the tests.

Each side has a real hash-chained ledger (core/ledger.py entries, in a list) and runs every
effect as the runtime does: commit the entries, apply, then send the calls, run the proof of
work, keep the events. The network between them is a FIFO of calls and replies that a test may
lose, hold back or deliver; the clock is virtual. A side can be made to fail its next commit
(the effect is dropped, as the runtime drops it) or crash (everything not committed is lost
and the side is rebuilt from its ledger alone).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from earendil_py.core.identity import Identity
from earendil_py.core.ledger import GENESIS, Entry, build_entry, verify_chain
from earendil_py.core.neighbor import (
    Answered,
    Effect,
    Event,
    Neighbor,
    NoAnswer,
    Policy,
    Refused,
    Reply,
    Solve,
)
from earendil_py.core.pricing import AcceptanceRule, PriceTerms
from earendil_py.core.rpc import INTERNAL_ERROR


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


START = 1_800_000_000.0
TOLERANCE = 16
BATCH = 16  # packets per relay-loop batch


def policy(
    price_umel: int = 1,
    limit_umel: int = 1_000_000,
    *,
    methods: tuple[str, ...] = ("pow", "manual"),
    **kw: Any,
) -> Policy:
    return Policy(
        terms=PriceTerms(price_umel, limit_umel, methods),
        rule=AcceptanceRule(max_price_umel=100, min_debt_limit_umel=1_000, methods=methods),
        methods=methods,
        push_debt_secs=kw.pop("push_debt_secs", 1.0),
        claim_tolerance_packets=kw.pop("claim_tolerance_packets", TOLERANCE),
        min_settlement_umel=kw.pop("min_settlement_umel", 100),
        lease_packets=kw.pop("lease_packets", 32),
        expiry_secs=kw.pop("expiry_secs", 600),
        **kw,
    )


@dataclass
class Message:
    """A call from `caller` to `to`, or (`reply` set) the reply to `to`'s call `token`."""

    to: Side
    token: int
    method: str
    params: Any = None
    caller: Side | None = None
    life: int = 0  # the caller's incarnation: a reply to a crashed process is lost
    reply: Reply | None = None

    @property
    def is_call(self) -> bool:
        return self.reply is None


@dataclass
class Side:
    name: str
    identity: Identity
    peer_public: bytes
    policy: Policy
    rng: Callable[[int], bytes]
    neighbor: Neighbor = field(init=False)
    ledger: list[Entry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    done: dict[tuple[str, bytes], object] = field(default_factory=dict)
    work: deque[Solve] = field(default_factory=deque)
    fail_commits: int = 0  # the next this many commits fail
    fail_at: int = 0  # the commit with this number fails (1: the next one; 0: none)
    commits: int = 0  # commits tried
    failed: int = 0  # commits that failed
    sent: int = 0  # ground truth: packets this side put on the link
    received: int = 0  # ground truth: packets this side took in
    life: int = 0  # incremented by every crash
    recovery: int = 0  # packets its restarts counted as sent without sending them, in all

    def __post_init__(self) -> None:
        self.neighbor = Neighbor(self.identity, self.peer_public, self.policy, self.rng)
        self.applied = self.state()

    def state(self) -> tuple[bytes, bytes, int]:
        """What a failed step must leave as it was: account, book, ledger."""
        n = self.neighbor
        account = msgspec.msgpack.encode(n.account.state)
        return account, msgspec.msgpack.encode(n.book.state), len(self.ledger)

    @property
    def head(self) -> bytes:
        return self.ledger[-1].hash if self.ledger else GENESIS

    def kinds(self) -> list[str]:
        return [e.kind for e in self.ledger]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def rebuild(self) -> None:
        """A crash: what was not committed is gone; the side starts again from its ledger."""
        verify_chain(self.ledger)
        self.neighbor = Neighbor.restore(
            self.identity,
            self.peer_public,
            self.policy,
            self.rng,
            self.ledger,
        )
        # The lease it may not have used is counted as sent, until a claim corrects it.
        self.recovery += max(0, self.neighbor.counters.packets_out - self.sent)
        self.applied = self.state()
        self.work.clear()


class Pair:
    """Alice and Bob, neighbours. `now` is the virtual clock."""

    def __init__(
        self, alice_policy: Policy | None = None, bob_policy: Policy | None = None
    ) -> None:
        self.now = START
        alice = Identity.generate(seeded_rng(1))
        bob = Identity.generate(seeded_rng(2))
        self.a = Side("alice", alice, bob.identity_public, alice_policy or policy(), seeded_rng(11))
        self.b = Side("bob", bob, alice.identity_public, bob_policy or policy(), seeded_rng(12))
        self.network: deque[Message] = deque()
        self.linked = False

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    # --- the shell's part ---------------------------------------------------------------

    def execute(self, side: Side, effect: Effect | None) -> bool:
        """Commit, apply, send: True if it was applied (False: its commit failed)."""
        if effect is None:
            return True
        if effect.entries or effect.prunes:
            side.commits += 1
            if side.fail_commits or side.commits == side.fail_at:
                side.fail_commits = max(0, side.fail_commits - 1)
                side.failed += 1
                # Dropped: the side and its neighbour are exactly as after their last step.
                peer = self.other(side)
                assert side.state() == side.applied and peer.state() == peer.applied
                return False
            for kind, body in effect.entries:
                seq = side.ledger[-1].seq + 1 if side.ledger else 1
                entry = build_entry(
                    neighbor=side.neighbor.fingerprint,
                    seq=seq,
                    kind=kind,
                    body=body,
                    prev_hash=side.head,
                    recorded_at=effect.recorded_at,
                )
                side.ledger.append(entry)
            for kind, keep in effect.prunes:
                bodies = [i for i, e in enumerate(side.ledger) if e.kind == kind and e.body]
                for index in bodies[: max(0, len(bodies) - keep)]:
                    side.ledger[index] = side.ledger[index].pruned()
        side.neighbor.apply(effect, ledger_head=side.head)
        side.applied = side.state()
        side.events += effect.events
        side.done.update(effect.done)
        side.work.extend(effect.work)
        peer = self.other(side)
        for call in effect.calls:
            params = msgspec.json.decode(msgspec.json.encode(call.params))
            self.network.append(Message(peer, call.token, call.method, params, side, side.life))
        return True

    def deliver(self, message: Message) -> None:
        if message.is_call:
            caller, callee = message.caller, message.to
            assert caller is not None
            effect = callee.neighbor.receive_call(message.method, message.params, self.now)
            if self.execute(callee, effect):
                reply: Reply = (
                    effect.reply
                    if isinstance(effect.reply, Refused)
                    else Answered(msgspec.json.decode(msgspec.json.encode(effect.reply)))
                )
            else:
                reply = Refused(INTERNAL_ERROR, "Internal error")
            if caller.life == message.life:
                self.network.append(Message(caller, message.token, message.method, reply=reply))
        else:
            assert message.reply is not None
            side = message.to
            self.execute(side, side.neighbor.receive_reply(message.token, message.reply, self.now))

    def lose(self, index: int) -> None:
        """The message at `index` is lost; the RPC call it belongs to gives up in the end."""
        message = self.network[index]
        del self.network[index]
        caller = message.caller if message.is_call else message.to
        assert caller is not None
        if caller.life == message.life or not message.is_call:
            self.network.append(Message(caller, message.token, message.method, reply=NoAnswer()))

    def run_work(self) -> None:
        for side in (self.a, self.b):
            while side.work:
                solve = side.work.popleft()
                self.execute(side, side.neighbor.proof_ready(solve.token, solve.solve(), self.now))

    def tick(self) -> None:
        for side in (self.a, self.b):
            self.execute(side, side.neighbor.handle_timer(self.now))

    def pump(self, *, lose: Callable[[Message], bool] | None = None, limit: int = 10_000) -> None:
        """Deliver everything in flight (and what it causes), run the proofs of work, fire
        the timers due now; `lose` drops the messages it returns True for."""
        for _ in range(limit):
            self.run_work()
            self.tick()
            if not self.network:
                if not any(side.work for side in (self.a, self.b)):
                    return
                continue
            first = self.network[0]
            if lose is not None and not isinstance(first.reply, NoAnswer) and lose(first):
                self.lose(0)
                continue
            self.deliver(self.network.popleft())
        raise AssertionError("the pair never settled down")

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer on the way."""
        end = self.now + seconds
        while True:
            timers = [t for s in (self.a, self.b) if (t := s.neighbor.get_timer()) is not None]
            next_at = min(timers, default=end)
            if next_at > end:
                break
            self.now = max(self.now, next_at)
            self.pump()
        self.now = end
        self.pump()

    # --- the link and the traffic -------------------------------------------------------

    def link_up(self) -> None:
        """Both sides' link-ups; one whose commit failed is tried again until it is written
        (as runtime/neighbors.py does)."""
        self.linked = True
        for side in (self.a, self.b):
            while not self.execute(side, side.neighbor.on_link_up(self.now)):
                pass
        self.pump()

    def link_down(self) -> None:
        self.linked = False
        for side in (self.a, self.b):
            self.execute(side, side.neighbor.on_link_down(self.now))
        self.network.clear()

    def carry(self, sender: Side, packets: int, lost: int = 0) -> int:
        """`packets` from `sender`, in batches as the relay loop takes them: what its
        allowance lets out is counted sent, `lost` of those vanish, the receiver counts what
        its allowance takes, and the shell is woken at a wake mark or a refusal (its lease is
        raised, a settlement started, a notice sent). Returns how many the receiver took."""
        receiver = self.other(sender)
        taken_in_all = 0
        while packets > 0:
            out = min(packets, BATCH, sender.neighbor.allowance().outbound)
            if out == 0:
                break
            packets -= out
            sender.neighbor.counters.packets_out += out
            sender.sent += out
            arrived = max(0, out - lost)
            lost -= out - arrived
            taken = min(arrived, receiver.neighbor.allowance().inbound)
            receiver.neighbor.counters.packets_in += taken
            receiver.received += taken
            taken_in_all += taken
            if taken < arrived:
                receiver.neighbor.refusing = True
            self.tick()
        return taken_in_all

    def quiesce(self) -> None:
        """Heal everything and wait until nothing is left to do: the link up, every call
        answered, every claim taken, every open settlement answered or expired."""
        for side in (self.a, self.b):
            side.fail_commits = 0
        if not self.linked:
            self.link_up()
        self.pump()
        for _ in range(200):
            self.advance(self.a.policy.push_debt_secs)
            if not any(s.neighbor.book.state.open for s in (self.a, self.b)):
                break
        for _ in range(3):  # claims of the final counts, both ways
            self.advance(self.a.policy.push_debt_secs)

    def checkpoint(self) -> None:
        for side in (self.a, self.b):
            self.execute(side, side.neighbor.checkpoint(self.now))

    def crash(self, side: Side) -> None:
        """`side` dies: its uncommitted effects and its calls' replies are lost; it restarts
        from its ledger and the link comes up again."""
        self.network = deque(m for m in self.network if m.to is not side or m.is_call)
        side.life += 1
        side.rebuild()
        if self.linked:
            peer = self.other(side)
            self.execute(peer, peer.neighbor.on_link_down(self.now))
            self.link_up()
