"""Peeling a batch on two threads: the same layers, in order, as on one."""

from __future__ import annotations

import os
import threading
import time

import pytest

from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.identity import Identity
from earendil_py.core.packet import Forward, build_packet
from earendil_py.core.relay import Layer, Peeler, encode_datagram
from earendil_py.runtime.peeling import PARALLEL_MIN, ParallelPeeler


def test_two_threads_peel_what_one_does_in_the_same_order() -> None:
    me, other, last = (Identity.generate(os.urandom) for _ in range(3))
    mine = [(me.fingerprint, me.onion_public), (last.fingerprint, last.onion_public)]
    theirs = [(other.fingerprint, other.onion_public)]
    packets = []
    for i in range(64):
        route = theirs if i % 7 == 3 else mine  # some built for another key: bad_mac
        packets.append(build_packet(route, encode_datagram(i, b"x" * i), os.urandom)[1])
    packets[10] = packets[10][:-1]  # bad_size
    peeler = Peeler(me.onion_secret)
    serial = [peeler.peel_layer(packet) for packet in packets]
    parallel = ParallelPeeler(peeler.peel_layer, threads=2)
    parallel.start()
    try:
        layers = parallel.peel_all(packets)
    finally:
        parallel.close()

    def summary(layer: Layer) -> object:
        if isinstance(layer, RemoteProtocolError):
            return layer.reason
        assert isinstance(layer, Forward)
        return layer.next_peeler, layer.packet, layer.replay_tag

    assert [summary(layer) for layer in layers] == [summary(layer) for layer in serial]
    assert {summary(layer) for layer in layers} >= {"bad_mac", "bad_size"}


def test_both_threads_take_work_and_close_ends_the_second() -> None:
    threads: set[int] = set()

    def slow(packet: bytes) -> Layer:
        threads.add(threading.get_ident())
        time.sleep(0.002)  # releases the GIL, as X25519 does
        return RemoteProtocolError("test", "bad_packet")

    parallel = ParallelPeeler(slow, threads=2)
    parallel.peel_all([b""] * 64)
    assert threads == {threading.get_ident()}  # not started yet
    threads.clear()
    parallel.start()
    assert len(parallel.peel_all([b""] * 64)) == 64
    assert threading.get_ident() in threads and len(threads) == 2
    parallel.close()
    threads.clear()
    parallel.peel_all([b""] * 64)
    assert threads == {threading.get_ident()}


@pytest.mark.parametrize("threads", [1, 2])
def test_small_batches_and_one_cpu_stay_on_the_calling_thread(threads: int) -> None:
    seen: set[int] = set()

    def record(packet: bytes) -> Layer:
        seen.add(threading.get_ident())
        return RemoteProtocolError("test", "bad_packet")

    parallel = ParallelPeeler(record, threads=threads)
    parallel.start()
    parallel.peel_all([b""] * (PARALLEL_MIN - 1 if threads == 2 else 64))
    assert seen == {threading.get_ident()}
    parallel.close()


def test_a_bug_on_either_thread_reaches_the_caller() -> None:
    def buggy(packet: bytes) -> Layer:
        time.sleep(0.001)
        if packet == b"bug":
            raise ValueError("a bug in peeling")
        return RemoteProtocolError("test", "bad_packet")

    parallel = ParallelPeeler(buggy, threads=2)
    parallel.start()
    for where in (0, 31, 63):
        packets = [b""] * 64
        packets[where] = b"bug"
        with pytest.raises(ValueError, match="a bug in peeling"):
            parallel.peel_all(packets)
    parallel.close()


def test_a_batch_the_caller_finished_does_not_wait_for_a_busy_second_thread() -> None:
    both_in_a = threading.Barrier(3, timeout=10)  # the two peeling threads and this test
    release = threading.Event()

    def peel(packet: bytes) -> Layer:
        if packet == b"a":  # one layer of batch A on each thread, then the second one sticks
            both_in_a.wait()
            if threading.current_thread().name == "peel":
                release.wait(10)
        return RemoteProtocolError("test", "bad_packet")

    parallel = ParallelPeeler(peel, threads=2)
    parallel.start()
    batch_a = threading.Thread(target=parallel.peel_all, args=([b"a", b"a", b"x", b"x"],))
    batch_a.start()
    try:
        both_in_a.wait()
        # The second thread is stuck in batch A (as when another process has its CPU): the
        # caller peels all of batch B itself and goes on without waiting for it.
        batch_b = threading.Thread(target=parallel.peel_all, args=([b"x"] * 8,))
        batch_b.start()
        batch_b.join(5)
        assert not batch_b.is_alive()
    finally:
        release.set()
        batch_a.join(5)
        parallel.close()


def test_other_work_shares_the_second_thread_in_order() -> None:
    # Building onions for applications goes through `map_all`, on the same two threads.
    threads: set[int] = set()

    def square(n: int) -> int:
        threads.add(threading.get_ident())
        time.sleep(0.001)  # long enough for the second thread to take some
        return n * n

    parallel = ParallelPeeler(lambda packet: RemoteProtocolError("unused", "unused"), threads=2)
    parallel.start()
    try:
        assert parallel.map_all(square, list(range(64))) == [n * n for n in range(64)]
    finally:
        parallel.close()
    assert len(threads) == 2
    assert parallel.map_all(square, [3]) == [9]  # after close: this thread alone
