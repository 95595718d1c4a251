"""Every decoder of peer bytes, driven with hypothesis: only RemoteProtocolError ever escapes.

Inputs are arbitrary bytes, deep nesting (10 to 100,000 levels of JSON and msgpack), huge and
negative integers, and valid messages mutated (bit flips, truncation, extension, a field
swapped, replaced or added). What decodes is then used the way the node uses it (verified,
signed over, inserted into a graph, a book or an account): a value a peer sent must not raise
anything but RemoteProtocolError further in either. Link.receive_datagrams, Endpoint.route and
the Peeler raise nothing at all: they drop and count.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earendil_py.core import settlement
from earendil_py.core.accounting import (
    Account,
    AccountState,
    Counters,
    DebtClaim,
    DebtLimitNotice,
)
from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.graph import (
    AdjacencyDescriptor,
    RelayGraph,
    adjacency_unsigned,
    decode_dump,
    encode_dumps,
    sign_adjacency,
)
from earendil_py.core.identity import Identity
from earendil_py.core.ledger import GENESIS
from earendil_py.core.link import (
    DATA,
    HS_FINAL,
    HS_INIT,
    HS_RESP,
    MAX_MESSAGE_SIZE,
    U32,
    ControlReceived,
    Link,
    LinkClosed,
    LinkState,
    StreamDecoder,
    frame_for_stream,
)
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    AdjacencyGrant,
    AdjacencyRequest,
    ControlMessage,
    DockMessage,
    GraphPull,
    GraphPush,
    decode_control,
    encode_control,
)
from earendil_py.core.neighbor import unwire, wire
from earendil_py.core.packet import MAX_PAYLOAD, PACKET_SIZE, ReplyArrived, build_packet
from earendil_py.core.pow import (
    ChallengeBook,
    PowProof,
    decode_challenge,
    decode_proof,
    encode_proof,
    make_proof,
    redeem_proof,
)
from earendil_py.core.pricing import AcceptanceRule, PriceAnswer, PriceOffer, PriceTerms
from earendil_py.core.relay import Datagram, Peeler, ReplyBlocks, encode_datagram
from earendil_py.core.rpc import (
    RpcClient,
    RpcServer,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    is_request,
)
from earendil_py.core.settlement import (
    AuditPage,
    BookState,
    Proposal,
    SettlementBook,
    decode_attestation,
    decode_audit,
    decode_proposal,
    decode_rejection,
    make_rejection,
)
from tests.core.test_link import ADDR, ALICE, BOB, Pair, events, with_mac1
from tests.helpers import seeded_rng

NOW = 1_800_000_000
ALICES_ID, BOBS_ID = bytes(range(16)), bytes(range(1, 17))  # settlement ids
POW_AMOUNT = 16  # a proof this small is solved in a few dozen hashes
RULE = AcceptanceRule(max_price_umel=10, min_debt_limit_umel=1_000, methods=("pow", "manual"))

Encoding = Literal["msgpack", "json"]
# The same examples on every run (CI must not fail by chance), and no deadlines: a loaded
# machine makes any one example slow, which says nothing about the code.
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# --- input strategies ---------------------------------------------------------------------

DEPTHS = st.sampled_from([10, 998, 999, 1000, 1001, 16_000, 100_000]) | st.integers(10, 100_000)


@st.composite
def deep_bytes(draw: st.DrawFn, encoding: Encoding) -> bytes:
    """One value nested `depth` levels: unterminated, or closed as a valid document."""
    depth = draw(DEPTHS)
    if encoding == "json":
        return draw(
            st.sampled_from(
                [
                    b"[" * depth,
                    b'{"a":' * depth,
                    b'{"":' + b"[" * depth,
                    b"[" * depth + b"]" * depth,
                    b'{"a":' * depth + b"1" + b"}" * depth,
                ]
            )
        )
    return draw(
        st.sampled_from(
            [
                b"\x91" * depth + b"\xc0",  # fixarray of one
                b"\x81\xa1a" * depth + b"\xc0",  # fixmap {"a": ...}
                b"\xdd\x00\x00\x00\x01" * depth + b"\x00",  # array32 of one
                b"\x91" * depth,  # truncated
            ]
        )
    )


def deep_value(encoding: Encoding) -> st.SearchStrategy[msgspec.Raw]:
    return deep_bytes(encoding).map(msgspec.Raw)


# Values a field may be replaced with: the edges of every bound on the wire.
MSGPACK_VALUES: list[object] = [
    -(2**63),
    -1,
    0,
    1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    1.5,
    None,
    True,
    b"",
    bytes(16),
    bytes(31),
    bytes(32),
    bytes(33),
    bytes(64),
    bytes(2000),
    "",
    "x" * 65,
    "pow",
    [],
    {},
    [bytes(32)] * 5000,
]
JSON_VALUES: list[object] = [
    2**64,
    2**63,
    -(2**63) - 1,
    2**1000,
    -(2**1000),
    -1,
    0,
    1.5,
    msgspec.Raw(b"1e400"),
    msgspec.Raw(b"-1e400"),
    msgspec.Raw(b"1" + b"0" * 5000),
    None,
    True,
    "",
    "AAAA",
    "x" * 300,
    "\u202e\x1b[2J",
    [],
    {},
    ["AAAA"] * 500,
]


def field_values(encoding: Encoding) -> st.SearchStrategy[object]:
    if encoding == "json":
        return st.sampled_from(JSON_VALUES) | deep_value(encoding) | st.integers()
    integers = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
    return (
        st.sampled_from(MSGPACK_VALUES) | deep_value(encoding) | integers | st.binary(max_size=70)
    )


def _encode(tree: object, encoding: Encoding) -> bytes:
    return msgspec.json.encode(tree) if encoding == "json" else msgspec.msgpack.encode(tree)


def _decode(data: bytes, encoding: Encoding) -> Any:
    return msgspec.json.decode(data) if encoding == "json" else msgspec.msgpack.decode(data)


Path = tuple[Any, ...]


def paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """The path to every element of a decoded message, nested ones included."""
    if isinstance(tree, list):
        keys: list[Any] = list(range(len(tree)))
    elif isinstance(tree, dict):
        keys = list(tree)
    else:
        return []
    found = []
    for key in keys:
        found.append((*prefix, key))
        found += paths(tree[key], (*prefix, key))
    return found


def changed(data: bytes, encoding: Encoding, path: Path, how: str, value: object = None) -> bytes:
    """`data` with the element at `path` replaced by `value` ("replace"), swapped with its
    first sibling ("swap"), or with `value` added to it ("add", if it is an array or a map)."""
    tree = _decode(data, encoding)
    *parents, key = path
    node = tree
    for parent in parents:
        node = node[parent]
    if how == "replace":
        node[key] = value
    elif how == "swap":
        first = 0 if isinstance(node, list) else next(iter(node))
        node[key], node[first] = node[first], node[key]
    elif isinstance(node[key], list):
        node[key].append(value)
    elif isinstance(node[key], dict):
        node[key]["extra"] = value
    return _encode(tree, encoding)


@st.composite
def mutated(draw: st.DrawFn, valid: list[bytes], encoding: Encoding | None) -> bytes:
    """A valid message, changed: bytes flipped, cut, extended or spliced, or (for msgpack and
    JSON) one field swapped, replaced, or given one more element."""
    data = bytearray(draw(st.sampled_from(valid)))
    structural = ["swap", "replace", "add"] if encoding is not None else []
    how = draw(st.sampled_from(["flip", "truncate", "extend", "splice", *structural]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            bit = draw(st.integers(0, len(data) * 8 - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "extend":
        return bytes(data) + draw(st.binary(min_size=1, max_size=64))
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[at:])
    assert encoding is not None
    path = draw(st.sampled_from(paths(_decode(bytes(data), encoding))))
    return changed(bytes(data), encoding, path, how, draw(field_values(encoding)))


def peer_bytes(valid: list[bytes], encoding: Encoding | None) -> st.SearchStrategy[bytes]:
    """Everything a hostile peer might send in place of one of the `valid` messages."""
    choices = [st.binary(max_size=300), mutated(valid, encoding), st.sampled_from(valid)]
    if encoding is not None:
        choices.append(deep_bytes(encoding))
    return st.one_of(choices)


# --- valid messages, as the peer (Alice) would send them to us (Bob) ------------------------


LEFT, RIGHT, _ = adjacency_unsigned(ALICE.fingerprint, BOB.fingerprint, NOW)
_SIGNERS = {ALICE.fingerprint: ALICE, BOB.fingerprint: BOB}
ADJACENCY = AdjacencyDescriptor(
    LEFT,
    RIGHT,
    NOW,
    sign_adjacency(_SIGNERS[LEFT], LEFT, RIGHT, NOW),
    sign_adjacency(_SIGNERS[RIGHT], LEFT, RIGHT, NOW),
)
DUMPS = encode_dumps([ALICE.descriptor(NOW), BOB.descriptor(NOW)], [ADJACENCY])
CONTROL = [
    encode_control(message)
    for message in (
        GraphPush(DUMPS[0]),
        GraphPull(),
        AdjacencyRequest(ALICE.descriptor(NOW), NOW, sign_adjacency(ALICE, LEFT, RIGHT, NOW)),
        AdjacencyGrant(ADJACENCY),
        DockMessage(GLOBAL_RPC_DOCK, encode_request("1", "chat", {"id": "00" * 16, "text": "hi"})),
    )
]


def alice_account() -> Account:
    return Account(ALICE, BOB.identity_public, AccountState(BOB.fingerprint), Counters())


def bob_account() -> Account:
    return Account(BOB, ALICE.identity_public, AccountState(ALICE.fingerprint), Counters())


TERMS = PriceTerms(5, 10_000, ("pow",))
OFFER = alice_account().propose(TERMS, NOW)
ANSWER = bob_account().on_offer(OFFER, RULE, NOW)
CLAIM = alice_account().make_claim(NOW)
NOTICE = alice_account().make_limit_notice(NOW)


def book(me: Identity, them: Identity) -> SettlementBook:
    return SettlementBook(me, them.identity_public, BookState(them.fingerprint))


def propose(proposer: SettlementBook, settlement_id: bytes) -> Proposal:
    return proposer.propose(
        settlement_id=settlement_id,
        reduce_mine_umel=300,
        reduce_theirs_umel=100,
        method="manual",
        ledger_head=bytes(32),
        now=NOW,
        expiry_secs=3600,
    ).proposal


def bob_proposing() -> SettlementBook:
    """Bob's book with his proposal to Alice pending (the same one every time)."""
    bob = book(BOB, ALICE)
    propose(bob, BOBS_ID)
    return bob


def _settlement_messages() -> dict[str, bytes]:
    bobs = propose(book(BOB, ALICE), BOBS_ID)
    alice = book(ALICE, BOB)
    alice.receive(bobs, NOW, expiry_secs=3600)
    attestation = alice.approve(BOBS_ID, NOW).attestation
    assert attestation is not None
    page = alice.audit_page(GENESIS)
    assert page is not None
    return {
        "proposal": settlement.encode(propose(book(ALICE, BOB), ALICES_ID)),
        "attestation": settlement.encode(attestation),
        "rejection": settlement.encode(make_rejection(ALICE, bobs, "no_thanks", NOW)),
        "audit": settlement.encode(page),
    }


SETTLEMENT = _settlement_messages()


def challenge_book() -> ChallengeBook:
    """Bob's book, holding the challenge he gave Alice (the same one every time)."""
    book = ChallengeBook(BOB.fingerprint)
    book.issue(ALICE.fingerprint, NOW, seeded_rng(9))
    return book


CHALLENGE = challenge_book().issue(ALICE.fingerprint, NOW, seeded_rng(9))
PROOF = make_proof(CHALLENGE, ALICES_ID, POW_AMOUNT)
CHALLENGE_BYTES = msgspec.msgpack.encode(CHALLENGE)


# --- what the node does with each decoded message ------------------------------------------


def use_control(message: ControlMessage) -> None:
    """As runtime/gossip.py and runtime/node.py do, for a message from Alice."""
    graph = RelayGraph()
    graph.insert_identity(BOB.descriptor(NOW), NOW, source=None)
    match message:
        case GraphPush(dump=dump):
            graph.insert_dump(decode_dump(dump), NOW, source=ALICE.fingerprint)
        case AdjacencyRequest():
            graph.insert_identity(message.identity, NOW, source=ALICE.fingerprint)
            left, right, _ = adjacency_unsigned(
                BOB.fingerprint, ALICE.fingerprint, message.timestamp
            )
            mine = sign_adjacency(BOB, left, right, message.timestamp)
            signatures = (
                (mine, message.signature) if left == BOB.fingerprint else (message.signature, mine)
            )
            graph.insert_adjacency(
                AdjacencyDescriptor(left, right, message.timestamp, *signatures), NOW, source=None
            )
        case AdjacencyGrant(descriptor=descriptor):
            graph.insert_identity(ALICE.descriptor(NOW), NOW, source=ALICE.fingerprint)
            graph.insert_adjacency(descriptor, NOW, source=None)
        case DockMessage(data=data):
            receive_rpc(data)
        case GraphPull():
            pass


# The node's methods: a request for one of them is dispatched, any other is unknown.
RPC_METHODS = frozenset({"push_price", "push_debt", "debt_limit", "chat"})


def receive_rpc(payload: bytes) -> None:
    """As GlobalRpc.receive: a request goes to the server, whose every answer is a valid
    response (never answered in turn); anything else to the client, which completes its
    pending call with it or counts it."""
    if is_request(payload):
        server = RpcServer()
        outcome = server.receive_request(ALICE.fingerprint, payload, 0.0, methods=RPC_METHODS)
        if isinstance(outcome, bytes):
            assert not is_request(outcome)
            decode_response(outcome)
        elif outcome is not None:
            answer = encode_result(outcome.request_id, 1)
            server.complete(outcome.neighbor, outcome.request_id, answer, 0.0)
        return
    client = RpcClient()
    assert client.request(ALICE.fingerprint, "m", None, 0.0, seeded_rng(1))[0] == PENDING_ID
    outcome = client.receive_response(ALICE.fingerprint, payload)
    stats = client.statistics()
    if outcome is None:
        assert stats.malformed + stats.unmatched_responses == 1
    else:
        assert (outcome.request_id, stats.completed) == (PENDING_ID, 1)


def params_of(kind: type[Any], use: Callable[[Any], object]) -> Callable[[Any], None]:
    """Request params decoded to `kind` as core/neighbor.py does, then used."""

    def convert_and_use(request: Any) -> None:
        use(unwire(request.params, kind))

    return convert_and_use


def use_answer(response: Any) -> None:
    answer = unwire(response.result, PriceAnswer)
    account = alice_account()
    account.propose(TERMS, NOW)
    account.on_answer(answer)


def use_attestation(attestation: settlement.Attestation) -> None:
    attestation.verify(BOB.identity_public, ALICE.identity_public)
    settlement.attestation_hash(attestation)
    bob_proposing().on_approved(attestation)


def use_audit(page: AuditPage) -> object:
    """Bob, proposing, audits Alice from his head: her page answers his proposal."""
    return bob_proposing().judge_audit(page, since=GENESIS)


def use_pow_proof(proof: PowProof) -> None:
    redeem_proof(
        challenge_book(),
        encode_proof(proof),
        payer=ALICE.fingerprint,
        settlement_id=ALICES_ID,
        amount_umel=POW_AMOUNT,
        now=NOW,
    )


@dataclass(frozen=True)
class Decoder:
    name: str
    valid: list[bytes]
    decode: Callable[[bytes], Any]
    use: Callable[[Any], object]
    encoding: Encoding

    def __repr__(self) -> str:
        return self.name


def _request(method: str, params: msgspec.Struct) -> bytes:
    return encode_request("9f" * 16, method, wire(params))


RPC_REQUESTS = [
    encode_request("9f" * 16, "chat", {"id": "00" * 16, "text": "hi"}),
    encode_request(7, "m", [1, {"a": None}]),
]
# The id of the call the client below has pending (seeded_rng(1)), so that some answer it.
PENDING_ID = RpcClient().request(ALICE.fingerprint, "m", None, 0.0, seeded_rng(1))[0]
RPC_RESPONSES = [
    encode_result(PENDING_ID, {"a": [1, 2]}),
    encode_error(PENDING_ID, 1000, "refused", "bad_signature"),
]

DECODERS = [
    Decoder("control", CONTROL, decode_control, use_control, "msgpack"),
    Decoder(
        "dump",
        DUMPS,
        decode_dump,
        lambda d: RelayGraph().insert_dump(d, NOW, source=ALICE.fingerprint),
        "msgpack",
    ),
    Decoder(
        "push_price",
        [_request("push_price", OFFER)],
        decode_request,
        params_of(PriceOffer, lambda o: bob_account().on_offer(o, RULE, NOW)),
        "json",
    ),
    Decoder(
        "push_price_answer",
        [encode_result("1", wire(ANSWER))],
        decode_response,
        use_answer,
        "json",
    ),
    Decoder(
        "push_debt",
        [_request("push_debt", CLAIM)],
        decode_request,
        params_of(DebtClaim, lambda c: bob_account().on_claim(c, NOW, 8)),
        "json",
    ),
    Decoder(
        "debt_limit",
        [_request("debt_limit", NOTICE)],
        decode_request,
        params_of(DebtLimitNotice, lambda n: bob_account().verify_limit_notice(n)),
        "json",
    ),
    Decoder(
        "proposal",
        [SETTLEMENT["proposal"]],
        decode_proposal,
        lambda p: book(BOB, ALICE).check_proposal(p, NOW),
        "msgpack",
    ),
    Decoder(
        "attestation", [SETTLEMENT["attestation"]], decode_attestation, use_attestation, "msgpack"
    ),
    Decoder(
        "rejection",
        [SETTLEMENT["rejection"]],
        decode_rejection,
        lambda r: bob_proposing().on_rejected(r),
        "msgpack",
    ),
    Decoder("audit", [SETTLEMENT["audit"]], decode_audit, use_audit, "msgpack"),
    Decoder(
        "pow_challenge",
        [CHALLENGE_BYTES],
        decode_challenge,
        lambda c: make_proof(c, ALICES_ID, POW_AMOUNT),
        "msgpack",
    ),
    Decoder("pow_proof", [PROOF], decode_proof, use_pow_proof, "msgpack"),
    Decoder("rpc_request", RPC_REQUESTS, decode_request, lambda request: None, "json"),
    Decoder("rpc_response", RPC_RESPONSES, decode_response, lambda response: None, "json"),
    Decoder("rpc", RPC_REQUESTS + RPC_RESPONSES, receive_rpc, lambda nothing: None, "json"),
]


def test_every_valid_sample_decodes_and_is_used_without_error() -> None:
    """The fuzzing below starts from messages that go all the way through."""
    for decoder in DECODERS:
        for data in decoder.valid:
            decoder.use(decoder.decode(data))
    attestation = decode_attestation(SETTLEMENT["attestation"])
    assert use_audit(decode_audit(SETTLEMENT["audit"])) == [attestation]  # Alice approved


def decode_and_use(decoder: Decoder, payload: bytes) -> None:
    """Fails the test on anything but RemoteProtocolError."""
    try:
        value = decoder.decode(payload)
    except RemoteProtocolError:
        return
    with suppress(RemoteProtocolError):
        decoder.use(value)


def _nested(encoding: Encoding, depth: int) -> msgspec.Raw:
    if encoding == "json":
        return msgspec.Raw(b"[" * depth + b"]" * depth)
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


@pytest.mark.parametrize("decoder", DECODERS, ids=repr)
def test_every_field_replaced_by_every_edge_value(decoder: Decoder) -> None:
    """Deterministic: each element of each valid message replaced by each value at the edge of
    a bound, swapped with its first sibling, and given a nested extra element."""
    encoding = decoder.encoding
    nested = [_nested(encoding, depth) for depth in (50, 1000, 100_000)]
    edges = [*(MSGPACK_VALUES if encoding == "msgpack" else JSON_VALUES), *nested]
    for data in decoder.valid:
        for path in paths(_decode(data, encoding)):
            variants = [changed(data, encoding, path, "replace", value) for value in edges]
            variants.append(changed(data, encoding, path, "swap"))
            variants += [changed(data, encoding, path, "add", value) for value in nested]
            for variant in variants:
                try:
                    decode_and_use(decoder, variant)
                except Exception as exc:
                    raise AssertionError(f"{decoder.name}: {path}: {variant[:80]!r}") from exc


@pytest.mark.parametrize("decoder", DECODERS, ids=repr)
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_decoders_raise_only_remote_protocol_errors(decoder: Decoder, data: st.DataObject) -> None:
    decode_and_use(decoder, data.draw(peer_bytes(decoder.valid, decoder.encoding)))


# --- links in every state ------------------------------------------------------------------


@dataclass
class Scenario:
    """A Pair stopped at some point of its life: `link` is the one fuzzed, `peer` the other
    side when it holds transport keys (to seal frames), `resume` carries on as it would have."""

    pair: Pair
    link: Link
    peer: Link | None
    resume: Callable[[], None]


def scenario(state: str) -> Scenario:
    pair = Pair()
    a = pair.a
    (init,) = a.datagrams_to_send()
    if state == "initiator_handshaking":
        return Scenario(pair, a, None, lambda: (pair.deliver_to_b(init), pair.pump()))
    b = pair.b = pair.endpoint.route(init, ADDR, pair.now)
    assert b is not None
    if state == "responder_fresh":
        return Scenario(pair, b, None, lambda: (pair.deliver_to_b(init), pair.pump()))
    pair.deliver_to_b(init)
    (response,) = b.datagrams_to_send()
    if state == "responder_handshaking":
        return Scenario(pair, b, None, lambda: (pair.deliver_to_a(response), pair.pump()))
    pair.deliver_to_a(response)
    final, proof = a.datagrams_to_send()
    if state == "initiator_proving":
        return Scenario(
            pair, a, None, lambda: (pair.deliver_to_b(final), pair.deliver_to_b(proof), pair.pump())
        )
    pair.deliver_to_b(final)
    (bobs_proof,) = b.datagrams_to_send()
    if state == "responder_proving":
        return Scenario(
            pair,
            b,
            a,
            lambda: (pair.deliver_to_b(proof), pair.deliver_to_a(bobs_proof), pair.pump()),
        )
    pair.deliver_to_b(proof)
    pair.deliver_to_a(bobs_proof)
    assert a.state is b.state is LinkState.ESTABLISHED
    if state == "initiator_established":
        return Scenario(pair, a, b, lambda: None)
    if state == "responder_established":
        return Scenario(pair, b, a, lambda: None)
    assert state == "closed"
    a.close("shutdown", pair.now)
    pair.pump()
    assert b.state is LinkState.CLOSED
    return Scenario(pair, b, a, lambda: None)


LINK_STATES = [
    "initiator_handshaking",
    "responder_fresh",
    "responder_handshaking",
    "initiator_proving",
    "responder_proving",
    "initiator_established",
    "responder_established",
    "closed",
]


def _reference_trace() -> list[bytes]:
    """Every message of one session (the same keys and indexes as each scenario's)."""
    pair = Pair()
    pair.pump()
    assert pair.b is not None
    pair.a.send_control(b"control")
    pair.b.send_control(b"control")
    pair.pump()
    frames = [
        pair.a.encrypt_onion(bytes(32), bytes(PACKET_SIZE)),
        pair.a.encrypt_onion(b"x" * 32, b""),
    ]
    pair.advance(1.5)  # pings and pongs
    return pair.sent_to_a + pair.sent_to_b + frames


TRACE = _reference_trace()
GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.tuples(
        st.sampled_from([HS_INIT, HS_RESP, HS_FINAL, DATA, 5, 0xFF]), st.binary(max_size=200)
    ).map(lambda t: bytes([t[0]]) + t[1]),
    st.just(bytes([DATA]) * (MAX_MESSAGE_SIZE + 1)),
    mutated(TRACE, None),
).filter(lambda message: message not in TRACE)


def _cookie_holders(b_index: int) -> st.SearchStrategy[bytes]:
    """Handshake messages with a valid cookie MAC, the session's indexes and any body."""
    headers = [
        bytes([HS_INIT]) + U32.pack(1),
        bytes([HS_RESP]) + U32.pack(b_index) + U32.pack(1),
        bytes([HS_FINAL]) + U32.pack(b_index),
    ]
    return st.tuples(st.sampled_from(headers), st.binary(max_size=200)).map(
        lambda t: with_mac1(t[0] + t[1])
    )


def _snapshot(link: Link) -> tuple[object, ...]:
    return link.state, link.remote_index, link.peer_fingerprint, link.statistics().frames_in


@pytest.mark.parametrize("state", LINK_STATES)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_garbage_is_counted_and_changes_nothing_in_any_link_state(
    state: str, data: st.DataObject
) -> None:
    s = scenario(state)
    link = s.link
    events(link)  # LinkEstablished and the like: what follows must add nothing
    batch = data.draw(st.lists(GARBAGE, min_size=1, max_size=3))
    before, dropped = _snapshot(link), sum(link.statistics().drops.values())
    assert link.receive_datagrams(batch, s.pair.now) == []
    assert sum(link.statistics().drops.values()) == dropped + len(batch)
    assert _snapshot(link) == before
    assert not link.wants_service
    s.resume()
    if state != "closed":
        s.pair.a.send_control(b"after")
        s.pair.pump()
        assert s.pair.b is not None and ControlReceived(b"after") in events(s.pair.b)


@pytest.mark.parametrize("state", LINK_STATES)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_dropped_handshake_message_changes_nothing_in_any_link_state(
    state: str, data: st.DataObject
) -> None:
    """From whoever holds the route cookie: handshake messages with a valid MAC, the right
    indexes and any body. One that is dropped leaves the link as it was."""
    s = scenario(state)
    events(s.link)
    b_index = s.pair.b.local_index if s.pair.b is not None else 0
    message = data.draw(_cookie_holders(b_index))
    before, dropped = _snapshot(s.link), sum(s.link.statistics().drops.values())
    s.link.receive_datagrams([message], s.pair.now)
    if sum(s.link.statistics().drops.values()) == dropped:
        return  # taken: a cookie holder may start a handshake of its own
    if state == "responder_fresh" and message[0] == HS_INIT:
        # A datagram session exists for one HS_INIT's bytes (`Endpoint`), so one that does
        # not read ends it (test_link: a datagram session whose HS_INIT does not read...).
        assert events(s.link) == [LinkClosed("handshake_failed")]
        return
    assert _snapshot(s.link) == before
    s.resume()
    if state != "closed":
        s.pair.a.send_control(b"after")
        s.pair.pump()
        assert s.pair.b is not None and ControlReceived(b"after") in events(s.pair.b)


@pytest.mark.parametrize("state", [s for s in LINK_STATES if scenario(s).peer is not None])
@settings(FUZZ, max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 8), st.binary(max_size=200)), min_size=1, max_size=3))
def test_frames_of_any_kind_and_content_never_raise_in_any_link_state(
    state: str, frames: list[tuple[int, bytes]]
) -> None:
    """From whoever holds the session keys: DATA frames sealed by the peer."""
    s = scenario(state)
    assert s.peer is not None
    sealed = s.peer.encrypt_onions([bytes([kind]) + body for kind, body in frames])
    s.link.receive_datagrams(sealed, s.pair.now)
    s.link.handle_timer(s.pair.now + 100.0)
    s.link.datagrams_to_send()
    events(s.link)


# --- the UDP endpoint and the TCP stream decoder ------------------------------------------


# From the dialer's address, or another one; replays of the dialer's own messages come from its
# address (an attacker on the path who can replay them could as well drop them).
SOURCES = st.tuples(GARBAGE, st.sampled_from([ADDR, ("127.0.0.1", 1), ("::1", ADDR[1])]))
SOURCES |= st.tuples(st.sampled_from(TRACE), st.just(ADDR))


@settings(FUZZ, max_examples=150)
@given(st.lists(SOURCES, min_size=1, max_size=4))
def test_the_endpoint_drops_what_it_cannot_route_and_honest_dialers_still_connect(
    batch: list[tuple[bytes, tuple[str, int]]],
) -> None:
    pair = Pair()
    for message, address in batch:
        dropped = sum(pair.endpoint.statistics().drops.values())
        link = pair.endpoint.route(message, address, pair.now)
        if link is None:
            assert sum(pair.endpoint.statistics().drops.values()) == dropped + 1
        else:
            link.receive_datagrams([message], pair.now)
    pair.pump()
    assert pair.a.state is LinkState.ESTABLISHED


@settings(FUZZ, max_examples=200)
@given(
    st.lists(
        st.binary(max_size=70) | st.sampled_from([frame_for_stream(m) for m in TRACE]), max_size=8
    )
)
def test_the_stream_decoder_raises_only_bad_frame(chunks: list[bytes]) -> None:
    decoder = StreamDecoder()
    try:
        for chunk in chunks:
            decoder.receive_bytes(chunk)
            while (message := decoder.next_message()) is not None:
                assert 0 < len(message) <= MAX_MESSAGE_SIZE
    except RemoteProtocolError as exc:
        assert exc.reason == "bad_frame"


# --- onion packets -------------------------------------------------------------------------

TO_BOB = [(BOB.fingerprint, BOB.onion_public)]
VIA_BOB = [*TO_BOB, (ALICE.fingerprint, ALICE.onion_public)]


def onion(route: list[tuple[bytes, bytes]], payload: bytes, seed: int = 0) -> bytes:
    return build_packet(route, payload, seeded_rng(seed))[1]


PACKETS = [onion(TO_BOB, encode_datagram(7, b"hello")), onion(VIA_BOB, b"x"), onion(TO_BOB, b"")]
ONIONS = st.one_of(
    st.binary(max_size=2 * PACKET_SIZE),
    st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE),
    mutated(PACKETS, None).filter(lambda packet: packet not in PACKETS),
    st.builds(onion, st.just(TO_BOB), st.binary(max_size=MAX_PAYLOAD), st.integers(0, 2**32)),
)


@settings(FUZZ, max_examples=200)
@given(st.lists(ONIONS, min_size=1, max_size=3))
def test_the_peeler_drops_and_counts_every_bad_onion(packets: list[bytes]) -> None:
    peeler = Peeler(BOB.onion_secret)
    for packet in packets:
        dropped = sum(peeler.drops.values())
        outcome = peeler.peel(packet, 0.0)
        if outcome is None:
            assert sum(peeler.drops.values()) == dropped + 1
        else:
            assert isinstance(outcome, Datagram | ReplyBlocks | ReplyArrived) or (
                len(outcome[1]) == PACKET_SIZE
            )
